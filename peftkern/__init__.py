"""peftkern: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning, as PyTorch layers."""

from .backends import cuda_backend_status, use_backend
from .nn import LoRALinear, MultiLoRALinear
from .ops import lora_linear, multi_lora_linear
from .pool import AdapterPool

__version__ = "0.1.0"

__all__ = [
    "AdapterPool",
    "LoRALinear",
    "MultiLoRALinear",
    "cuda_backend_status",
    "lora_linear",
    "multi_lora_linear",
    "use_backend",
]
