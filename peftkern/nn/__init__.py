"""Drop-in layers. Each holds parameters and calls ops; no kernel code here."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
