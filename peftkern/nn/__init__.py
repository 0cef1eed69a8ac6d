"""Drop-in layers. Each holds parameters and calls ops; no kernel code here."""

from .lora import LoRALinear
from .prompt import PrefixEncoder, PrefixTuningForCausalLM, PromptTuningEmbedding, PromptTuningForCausalLM

__all__ = [
    "LoRALinear",
    "PrefixEncoder",
    "PrefixTuningForCausalLM",
    "PromptTuningEmbedding",
    "PromptTuningForCausalLM",
]
