"""peftkern: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning, as PyTorch layers."""

from .backends import cuda_backend_status, use_backend
from .io import load_adapter, save_adapter
from .model import (
    from_peft,
    inject_lora,
    mark_trainable,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)
from .nn import LoRALinear
from .ops import lora_linear

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "from_peft",
    "inject_lora",
    "load_adapter",
    "mark_trainable",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
    "cuda_backend_status",
    "lora_linear",
    "use_backend",
]
