"""TNT models: configuration, layers, registry and checkpoints."""

from .checkpoint import CheckpointError, detect_format, load_checkpoint, read_state_dict, to_native
from .flops import count_flops, count_params, paper_flops
from .registry import ModelSpec, create_model, get_spec, list_models, register
from .tnt import TNT, TNTConfig

__all__ = [
    "TNT",
    "CheckpointError",
    "ModelSpec",
    "TNTConfig",
    "count_flops",
    "count_params",
    "create_model",
    "detect_format",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "paper_flops",
    "read_state_dict",
    "register",
    "to_native",
]
