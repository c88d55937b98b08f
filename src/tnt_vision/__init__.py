"""tnt-vision: Transformer in Transformer (Han et al., NeurIPS 2021) for PyTorch."""

from .models import (
    TNT,
    CheckpointError,
    TNTConfig,
    count_flops,
    count_params,
    create_model,
    list_models,
    load_checkpoint,
)

__version__ = "0.1.0"
__all__ = [
    "TNT",
    "CheckpointError",
    "TNTConfig",
    "__version__",
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "load_checkpoint",
]
