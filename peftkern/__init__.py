"""peftkern: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning, as PyTorch layers.

One page per use, in the repository's ``docs/``:

- ``docs/training.md``: train with peft + ``transformers.Trainer`` and :func:`from_peft` (or
  :func:`inject_lora` without peft); :func:`save_adapter` / :func:`load_adapter`; QLoRA
  (:class:`LoRALinear4bit`, :func:`lora_linear_4bit`); DoRA (``use_dora=True``, :func:`dora_linear`).
- ``docs/serving.md``: a mixed batch (one adapter per row) with :class:`AdapterPool` and
  :func:`multi_lora_linear`.
- ``docs/serving-api.md``: a serving stack's own base GEMM with :class:`LoRABatch`, :func:`lora_shrink` and
  :func:`lora_expand_add` around it (vLLM's ``PunicaWrapper`` calls mapped onto them).
- ``docs/soft-prompts.md``: :class:`PromptTuningForCausalLM`, :class:`PrefixTuningForCausalLM`.
- ``docs/bottleneck-adapters.md``: :class:`BottleneckConfig`, :func:`inject_bottleneck_adapters`.
- ``docs/vendoring.md``: using ``triton_kernels/`` or the ``csrc/include/peftkern/`` headers alone.
"""

from . import adapters, nn
from ._deprecation import deprecated_aliases
from .adapters import (
    BottleneckConfig,
    inject_bottleneck_adapters,
    load_bottleneck_adapters,
    remove_bottleneck_adapters,
    save_bottleneck_adapters,
)
from .backends import cuda_backend_status, use_backend
from .io import load_adapter, load_soft_prompt, save_adapter, save_soft_prompt
from .model import (
    from_peft,
    fused_layers,
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
    LoRALinear4bit,
    MultiLoRALinear,
    PrefixEncoder,
    PrefixTuningForCausalLM,
    PromptTuningEmbedding,
    PromptTuningForCausalLM,
    use_bottleneck_adapter_ids,
)
from .ops import (
    LoRABatch,
    Weight4bit,
    bottleneck_adapter,
    dora_linear,
    lora_expand_add,
    lora_linear,
    lora_linear_4bit,
    lora_shrink,
    multi_lora_linear,
    prefix_kv,
    prompt_concat,
)
from .pool import AdapterPool, warmup, warmup_row_counts

__version__ = "0.1.0"

__all__ = [
    "BottleneckConfig",
    "AdapterPool",
    "BottleneckAdapter",
    "LoRABatch",
    "LoRALinear",
    "LoRALinear4bit",
    "MultiLoRALinear",
    "PrefixEncoder",
    "PrefixTuningForCausalLM",
    "PromptTuningEmbedding",
    "PromptTuningForCausalLM",
    "Weight4bit",
    "bottleneck_adapter",
    "cuda_backend_status",
    "dora_linear",
    "from_peft",
    "fused_layers",
    "inject_bottleneck_adapters",
    "inject_lora",
    "load_adapter",
    "load_bottleneck_adapters",
    "load_soft_prompt",
    "lora_expand_add",
    "lora_linear",
    "lora_linear_4bit",
    "lora_shrink",
    "mark_trainable",
    "merge",
    "merge_and_unload",
    "multi_lora_linear",
    "prefix_kv",
    "prompt_concat",
    "remove_bottleneck_adapters",
    "save_adapter",
    "save_bottleneck_adapters",
    "save_soft_prompt",
    "trainable_parameters",
    "unmerge",
    "use_bottleneck_adapter_ids",
    "use_backend",
    "warmup",
    "warmup_row_counts",
]

__getattr__ = deprecated_aliases(globals(), {**adapters.RENAMED, **nn.bottleneck.RENAMED})
