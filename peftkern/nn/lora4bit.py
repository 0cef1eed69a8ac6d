"""``LoRALinear4bit``: a frozen bitsandbytes ``Linear4bit`` (QLoRA base) plus a trainable low-rank update, computed
by ``peftkern.lora_linear_4bit``. The base keeps its 4-bit storage; no dense copy of its weight is made or kept."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..backends import describe_backend
from ..ops.lora4bit import Weight4bit, lora_linear_4bit
from .lora import LoRALinear

__all__ = ["LoRALinear4bit", "bnb_compute_dtype", "is_linear_4bit"]


def is_linear_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (duck-typed: bitsandbytes stays optional)."""
    return any(cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")
               for cls in type(module).__mro__)


def bnb_compute_dtype(base: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``Linear4bit.forward`` computes in for inputs of ``x_dtype``: its ``compute_dtype`` once set (as
    transformers' ``bnb_4bit_compute_dtype`` sets it), else x's dtype for fp32/bf16 x (bitsandbytes adopts it on
    the first call), else its ``compute_dtype`` or x's."""
    if not getattr(base, "compute_type_is_set", False) and x_dtype in (torch.float32, torch.bfloat16):
        return x_dtype
    return getattr(base, "compute_dtype", None) or x_dtype


def linear_4bit_forward(base: nn.Module, x: torch.Tensor, lora_a, lora_b, scaling, dropout, training, backend):
    """``base(x) + scaling * B(A(dropout(x)))`` in one ``lora_linear_4bit`` call, the base computed as bitsandbytes
    computes it (x and the bias in the compute dtype, the product cast back to x's dtype)."""
    compute = bnb_compute_dtype(base, x.dtype)
    bias = None if base.bias is None else base.bias.to(compute)
    return lora_linear_4bit(x, Weight4bit.from_bnb(base.weight), bias, lora_a, lora_b, scaling, dropout, training,
                            compute_dtype=compute, backend=backend)


class LoRALinear4bit(LoRALinear):
    """``y = base_layer(x) + scaling * B(A(dropout(x)))`` over a frozen ``bitsandbytes.nn.Linear4bit`` (NF4/FP4,
    double-quantized or not). ``LoRALinear4bit.from_linear(linear4bit, r, alpha, ...)`` wraps one in place.

    Adapters default to fp32 (as peft creates them beside a 4-bit base). The forward computes in the base's
    compute dtype (bitsandbytes' rule) and returns x's dtype. ``merge`` refuses: folding an adapter into a 4-bit
    weight re-quantizes it, which loses the adapter's small update (peft's ``merge_and_unload`` does it anyway).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "default", dtype: torch.dtype | None = None, backend: str | None = None) -> None:
        if not is_linear_4bit(base_layer):
            raise TypeError(f"base_layer: expected bitsandbytes.nn.Linear4bit, got {type(base_layer).__name__}")
        if getattr(base_layer.weight, "quant_state", None) is None:
            raise ValueError("base_layer: its weight is not quantized yet (move the Linear4bit to its device first)")
        super().__init__(base_layer, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                         dtype=dtype or torch.float32, backend=backend)

    def merge(self) -> None:
        raise ValueError(
            "LoRALinear4bit.merge: merging an adapter into a 4-bit weight re-quantizes it and loses most of the "
            "update; keep the adapter unmerged (the fused forward costs no extra pass), or dequantize the base to "
            "a torch.nn.Linear and merge there"
        )

    def unmerge(self) -> None:
        raise ValueError("LoRALinear4bit.unmerge: a 4-bit layer is never merged (merge refuses)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit_forward(self.base_layer, x, self.lora_A, self.lora_B, self.scaling, self.dropout,
                                   self.training, self.backend)

    def extra_repr(self) -> str:
        state = self.base_layer.weight.quant_state
        backend = describe_backend(self.lora_A.device, "lora_linear_4bit", self.backend)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, rslora={self.use_rslora}, "
            f"quant_type={state.quant_type}, blocksize={state.blocksize}, double_quant={bool(state.nested)}, "
            f"backend={backend}"
        )
