"""TNT for detection and segmentation: a multi-scale backbone, torchvision detectors, a semantic-FPN head.

backbone.py      TNTFeaturePyramid (strides 4-32), TNTSingleScale (DETR), TNTWithFPN
detection.py     fasterrcnn_tnt, maskrcnn_tnt, retinanet_tnt, draw_detections
segmentation.py  SemanticFPNHead, TNTSegmenter, mIoU
data.py          COCO-format reading and checking, the synthetic CIFAR-10 set
engine.py        train / evaluate loops for both tasks
checkpoint.py    saving and rebuilding trained models
"""

from .backbone import TNTFeaturePyramid, TNTSingleScale, TNTWithFPN, build_trunk, pad_to_multiple, tnt_fpn_backbone
from .checkpoint import build_dense_model, load_dense_model, save_dense_model
from .data import AnnotationError, CocoData, make_synthetic_coco, read_coco
from .detection import draw_detections, fasterrcnn_tnt, maskrcnn_tnt, retinanet_tnt
from .segmentation import SemanticFPNHead, TNTSegmenter, confusion_matrix, iou_scores

__all__ = [
    "AnnotationError",
    "CocoData",
    "SemanticFPNHead",
    "TNTFeaturePyramid",
    "TNTSegmenter",
    "TNTSingleScale",
    "TNTWithFPN",
    "build_dense_model",
    "build_trunk",
    "confusion_matrix",
    "draw_detections",
    "fasterrcnn_tnt",
    "iou_scores",
    "load_dense_model",
    "make_synthetic_coco",
    "maskrcnn_tnt",
    "pad_to_multiple",
    "read_coco",
    "retinanet_tnt",
    "save_dense_model",
    "tnt_fpn_backbone",
]
