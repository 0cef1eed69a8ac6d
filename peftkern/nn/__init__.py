"""Drop-in layers. Each holds parameters and calls ops; no kernel code here."""

from .lora import LoRALinear
from .multi_lora import MultiLoRALinear

__all__ = ["LoRALinear", "MultiLoRALinear"]
