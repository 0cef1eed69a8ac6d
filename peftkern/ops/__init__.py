"""One module per op: input checks, backend dispatch, and the ``torch.library`` custom op registration."""

from .lora import lora_linear
from .multi_lora import multi_lora_linear

__all__ = ["lora_linear", "multi_lora_linear"]
