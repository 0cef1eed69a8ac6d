"""One module per op: input checks, backend dispatch, and the ``torch.library`` custom op registration."""

from .bottleneck import bottleneck_adapter
from .lora import lora_linear
from .lora_batch import LoRABatch
from .lora_serving import lora_expand_add, lora_shrink
from .multi_lora import multi_lora_linear
from .prompt import prefix_kv, prompt_concat

__all__ = [
    "LoRABatch",
    "bottleneck_adapter",
    "lora_expand_add",
    "lora_linear",
    "lora_shrink",
    "multi_lora_linear",
    "prefix_kv",
    "prompt_concat",
]
