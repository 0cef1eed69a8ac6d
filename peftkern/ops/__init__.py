"""One module per op: input checks, backend dispatch, and the ``torch.library`` custom op registration."""

from .bottleneck import bottleneck_adapter
from .dora import dora_linear
from .lora import lora_linear
from .lora4bit import Weight4bit, lora_linear_4bit
from .lora_batch import LoRABatch
from .lora_serving import lora_expand_add, lora_shrink
from .multi_lora import multi_lora_linear
from .prompt import prefix_kv, prompt_concat

__all__ = [
    "bottleneck_adapter",
    "dora_linear",
    "lora_expand_add",
    "lora_linear",
    "lora_linear_4bit",
    "lora_shrink",
    "LoRABatch",
    "Weight4bit",
    "multi_lora_linear",
    "prefix_kv",
    "prompt_concat",
]
