"""One module per op: input checks, backend dispatch, and the ``torch.library`` custom op registration."""

from .bottleneck import bottleneck_adapter
from .lora import lora_linear
from .multi_lora import multi_lora_linear
from .prompt import prefix_kv, prompt_concat

__all__ = ["bottleneck_adapter", "lora_linear", "multi_lora_linear", "prefix_kv", "prompt_concat"]
