"""One module per op: input checks, backend dispatch, and the ``torch.library`` custom op registration."""

from .bottleneck import bottleneck_adapter
from .lora import lora_linear

__all__ = ["bottleneck_adapter", "lora_linear"]
