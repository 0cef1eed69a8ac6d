"""peftkern: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning, as PyTorch layers."""

from .backends import cuda_backend_status, use_backend
from .io import load_soft_prompt, save_soft_prompt
from .nn import LoRALinear
from .nn.prompt import PrefixEncoder, PrefixTuningForCausalLM, PromptTuningEmbedding, PromptTuningForCausalLM
from .ops import lora_linear
from .ops.prompt import prefix_kv, prompt_concat

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "PrefixEncoder",
    "PrefixTuningForCausalLM",
    "PromptTuningEmbedding",
    "PromptTuningForCausalLM",
    "cuda_backend_status",
    "load_soft_prompt",
    "lora_linear",
    "prefix_kv",
    "prompt_concat",
    "save_soft_prompt",
    "use_backend",
]
