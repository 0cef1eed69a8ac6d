"""Drop-in layers. Each holds parameters and calls ops; no kernel code here."""

from .._deprecation import deprecated_aliases
from . import bottleneck
from .bottleneck import BottleneckAdapter, current_bottleneck_adapter_ids, use_bottleneck_adapter_ids
from .lora import LoRALinear
from .lora4bit import LoRALinear4bit
from .multi_lora import MultiLoRALinear
from .prompt import PrefixEncoder, PrefixTuningForCausalLM, PromptTuningEmbedding, PromptTuningForCausalLM

__all__ = [
    "BottleneckAdapter",
    "LoRALinear",
    "LoRALinear4bit",
    "MultiLoRALinear",
    "PrefixEncoder",
    "PrefixTuningForCausalLM",
    "PromptTuningEmbedding",
    "PromptTuningForCausalLM",
    "current_bottleneck_adapter_ids",
    "use_bottleneck_adapter_ids",
]

__getattr__ = deprecated_aliases(globals(), bottleneck.RENAMED)
