"""Drop-in layers. Each holds parameters and calls ops; no kernel code here."""

from .bottleneck import BottleneckAdapter, current_adapter_ids, use_adapter_ids
from .lora import LoRALinear
from .multi_lora import MultiLoRALinear
from .prompt import PrefixEncoder, PrefixTuningForCausalLM, PromptTuningEmbedding, PromptTuningForCausalLM

__all__ = [
    "BottleneckAdapter",
    "LoRALinear",
    "MultiLoRALinear",
    "PrefixEncoder",
    "PrefixTuningForCausalLM",
    "PromptTuningEmbedding",
    "PromptTuningForCausalLM",
    "current_adapter_ids",
    "use_adapter_ids",
]
