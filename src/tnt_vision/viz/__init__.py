"""See what TNT sees: record attention maps and tokens, and draw the paper's Figures 3-7.

>>> import torch
>>> from tnt_vision import create_model, viz
>>> model = create_model("tnt_s_patch16_224", pretrained=True).eval()
>>> x = viz.preprocess(viz.read_image("cat.jpg"), model)
>>> with viz.capture(model) as rec, torch.no_grad():
...     model(x)
>>> fig = viz.class_attention(rec, viz.to_display(x, model), blocks=[0, 5, 11], rollout=True)
"""

from .capture import Recording, capture
from .figures import (
    attention_rollout,
    class_attention,
    feature_maps,
    feature_tsne,
    inner_attention,
    outer_attention,
    word_embeddings,
)
from .image import preprocess, read_image, to_display
from .report import KINDS, Picture, make_pictures, write_report

__all__ = [
    "KINDS",
    "Picture",
    "Recording",
    "attention_rollout",
    "capture",
    "class_attention",
    "feature_maps",
    "feature_tsne",
    "inner_attention",
    "make_pictures",
    "outer_attention",
    "preprocess",
    "read_image",
    "to_display",
    "word_embeddings",
    "write_report",
]
