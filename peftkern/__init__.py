"""peftkern: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning, as PyTorch layers."""

from .adapters import (
    AdapterConfig,
    inject_adapters,
    load_bottleneck_adapters,
    remove_adapters,
    save_bottleneck_adapters,
)
from .backends import cuda_backend_status, use_backend
from .io import load_adapter, load_soft_prompt, save_adapter, save_soft_prompt
from .model import (
    from_peft,
    inject_lora,
    mark_trainable,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)
from .nn import (
    BottleneckAdapter,
    LoRALinear,
    MultiLoRALinear,
    PrefixEncoder,
    PrefixTuningForCausalLM,
    PromptTuningEmbedding,
    PromptTuningForCausalLM,
    use_adapter_ids,
)
from .ops import (
    LoRABatch,
    bottleneck_adapter,
    lora_expand_add,
    lora_linear,
    lora_shrink,
    multi_lora_linear,
    prefix_kv,
    prompt_concat,
)
from .pool import AdapterPool

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterPool",
    "BottleneckAdapter",
    "LoRABatch",
    "LoRALinear",
    "MultiLoRALinear",
    "PrefixEncoder",
    "PrefixTuningForCausalLM",
    "PromptTuningEmbedding",
    "PromptTuningForCausalLM",
    "bottleneck_adapter",
    "cuda_backend_status",
    "from_peft",
    "inject_adapters",
    "inject_lora",
    "load_adapter",
    "load_bottleneck_adapters",
    "load_soft_prompt",
    "lora_expand_add",
    "lora_linear",
    "lora_shrink",
    "mark_trainable",
    "merge",
    "merge_and_unload",
    "multi_lora_linear",
    "prefix_kv",
    "prompt_concat",
    "remove_adapters",
    "save_adapter",
    "save_bottleneck_adapters",
    "save_soft_prompt",
    "trainable_parameters",
    "unmerge",
    "use_adapter_ids",
    "use_backend",
]
