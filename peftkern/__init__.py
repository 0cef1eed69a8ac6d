"""peftkern: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning, as PyTorch layers."""

from .adapters import (
    AdapterConfig,
    inject_adapters,
    load_bottleneck_adapters,
    remove_adapters,
    save_bottleneck_adapters,
)
from .backends import cuda_backend_status, use_backend
from .nn import BottleneckAdapter, LoRALinear, use_adapter_ids
from .ops import bottleneck_adapter, lora_linear

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "BottleneckAdapter",
    "LoRALinear",
    "bottleneck_adapter",
    "inject_adapters",
    "load_bottleneck_adapters",
    "remove_adapters",
    "save_bottleneck_adapters",
    "use_adapter_ids",
    "cuda_backend_status",
    "lora_linear",
    "use_backend",
]
