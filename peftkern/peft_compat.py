"""peft's own LoRA layers, run by peftkern's fused kernels: what :func:`peftkern.from_peft` installs.

Design note. ``from_peft`` leaves every ``peft`` module where it is and changes only the class of each
``peft.tuners.lora.layer.Linear`` to :class:`FusedLoraLinear`, a subclass that overrides ``forward`` alone.
The layer keeps its ``lora_A`` / ``lora_B`` ModuleDicts, its Parameter objects, its ``merge`` / ``unmerge``,
``set_adapter``, ``disable_adapters`` and state-dict keys, and ``isinstance(layer, peft.tuners.lora.Linear)``
still holds. So everything else peft does (``save_pretrained`` and Trainer checkpoints,
``disable_adapter()``, ``merge_adapter`` / ``merge_and_unload(safe_merge=True)``, ``add_adapter`` /
``set_adapter`` / ``delete_adapter``, ``modules_to_save``, ``enable_input_require_grads``, gradient
checkpointing) stays peft's code and gives peft's result. The alternative, our own layers implementing peft's
``BaseTunerLayer`` contract, would re-implement all of that and follow every peft release; swapping the
forward is a few dozen lines and cannot drift from peft outside the one computation it replaces.

The forward runs ``peftkern.lora_linear`` when the layer is in a state the op computes exactly: one active
adapter, not merged, adapters enabled, a plain ``nn.Linear`` base without hooks, no LoRA variant (aLoRA, ...)
other than DoRA, no ``lora_bias``, no ``fan_in_fan_out``, dropout an ``nn.Dropout`` or ``nn.Identity``, and dtypes
the op takes (adapters in x's dtype, or fp32 beside 16-bit x, as peft casts x to ``lora_A``'s dtype). A DoRA
adapter runs ``peftkern.dora_linear`` with the layer's own ``lora_magnitude_vector`` Parameter, the frozen
``||W||^2`` cached on the layer (recomputed when the weight changes, and on merge / unmerge).
``adapter_names=`` mixed batches run ``peftkern.multi_lora_linear`` (the adapters' A/B stacked, ranks may
differ, ``"__base__"`` rows base only) when every named adapter is plain LoRA without active dropout.
peft's QLoRA layer ``lora.bnb.Linear4bit`` becomes :class:`FusedLoraLinear4bit` the same way and runs
``peftkern.lora_linear_4bit`` under the same rules (torch or triton backend; cuda has no 4-bit kernel yet), its
base a quantized ``bnb.nn.Linear4bit`` in the standard layout (not yet repacked by bitsandbytes' CPU inference
path); ``adapter_names=`` batches run peft's forward there.
In any other state the layer calls peft's own ``forward``. peft is imported here, so only ``from_peft``
imports this module: peft stays an optional dependency of peftkern.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from .backends import describe_backend
from .nn.lora import WeightNormCache
from .nn.lora4bit import is_linear_4bit, linear_4bit_forward
from .nn.multi_lora import broadcast_adapter_ids
from .ops.dora import dora_linear
from .ops.lora import lora_linear
from .ops.multi_lora import multi_lora_linear

try:
    from peft.tuners.lora.variants import DoraLinearVariant
except ImportError:  # a peft without LoRA variants: DoRA layers run peft's forward
    DoraLinearVariant = None

try:  # peft defines its 4-bit LoRA layer only when bitsandbytes is installed
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
except ImportError:
    PeftLoraLinear4bit = None

__all__ = ["FUSED_CLASSES", "FusedLoraLinear", "FusedLoraLinear4bit", "convert", "fusion_blocker"]

logger = logging.getLogger("peftkern")

_HALF_DTYPES = (torch.float16, torch.bfloat16)
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in adapter_names


def _adapter_blocker(layer: PeftLoraLinear, adapter: str) -> str | None:
    """Why adapter ``adapter`` of ``layer`` cannot run in our ops, or None."""
    if _is_dora(layer, adapter):
        magnitude = layer.lora_magnitude_vector[adapter].weight
        if PeftLoraLinear4bit is not None and isinstance(layer, PeftLoraLinear4bit):
            return "DoRA on a 4-bit base"
        if magnitude.dtype != layer.lora_A[adapter].weight.dtype:
            return "DoRA magnitude and lora_A of different dtypes"
    elif adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
        return "DoRA" if layer.use_dora.get(adapter, False) else "a LoRA variant"
    if layer.lora_A[adapter].bias is not None or layer.lora_B[adapter].bias is not None:
        return "lora_bias"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return f"dropout {type(layer.lora_dropout[adapter]).__name__}"
    if layer.lora_A[adapter].weight.dtype != layer.lora_B[adapter].weight.dtype:
        return "lora_A and lora_B of different dtypes"
    return None


def _is_dora(layer: PeftLoraLinear, adapter: str) -> bool:
    """Whether ``adapter`` of ``layer`` is a DoRA adapter of peft's linear kind (what ``dora_linear`` computes)."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return (DoraLinearVariant is not None and type(variant) is DoraLinearVariant
            and layer.use_dora.get(adapter, False) and adapter in layer.lora_magnitude_vector)


def _base_blocker(layer: PeftLoraLinear) -> str | None:
    """Why the layer's base cannot run in our ops (whatever the adapters), or None."""
    base = layer.get_base_layer()
    if PeftLoraLinear4bit is not None and isinstance(layer, PeftLoraLinear4bit):
        if not is_linear_4bit(base):
            return f"base layer {type(base).__name__}"
        state = getattr(base.weight, "quant_state", None)
        if state is None:
            return "4-bit weight not quantized yet"
        if getattr(state, "packing_format_for_cpu", False):
            # Linear4bit's first eval-mode CPU forward without grad repacks the weight for its own kernel.
            return "4-bit weight in bitsandbytes' CPU inference layout (packing_format_for_cpu)"
        if getattr(layer, "peftkern_backend", None) == "cuda":
            return "no cuda kernel for 4-bit layers yet"
    elif type(base) is not nn.Linear:
        return f"base layer {type(base).__name__}"
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return "hooks on the base layer"  # e.g. accelerate's offloading: calling the base runs them
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled"
    return None


def fusion_blocker(layer: nn.Module) -> str | None:
    """Why a plain forward (no ``adapter_names``) of ``layer`` runs peft's code rather than ours, or None
    when it runs fused. Looks at the layer's state only (the input's dtype is checked at each call)."""
    if not isinstance(layer, FUSED_CLASSES):
        return "not converted" if type(layer) in _PEFT_CLASSES else type(layer).__name__
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    return _base_blocker(layer) or _adapter_blocker(layer, active[0])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype inside the op: the autocast dtype under ``torch.autocast``, as ``F.linear`` casts it."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _dtypes_fit(x: torch.Tensor, base: nn.Linear, adapter_dtype: torch.dtype) -> bool:
    """The op takes these dtypes and computes what peft does: base in x's dtype; the low-rank part from x cast
    to the adapters' dtype (exact for adapters in x's dtype or fp32 adapters beside 16-bit x)."""
    dtype = _compute_dtype(x)
    if base.weight.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return False
    if adapter_dtype != dtype and not (adapter_dtype == torch.float32 and dtype in _HALF_DTYPES):
        return False
    return base.weight.device == x.device


class FusedLoraLinear(PeftLoraLinear):
    """peft's ``lora.Linear`` with a forward that runs ``peftkern.lora_linear`` (one adapter) or
    ``peftkern.multi_lora_linear`` (``adapter_names=`` batches) when it can, and peft's forward otherwise.

    Instances are made by :func:`convert`, which swaps the class of an existing peft layer; nothing is
    copied. ``peftkern_backend`` pins the ops' backend (None: :mod:`peftkern.backends`' default).
    """

    peftkern_backend: str | None = None

    def _weight_norm_sq(self) -> torch.Tensor | None:
        """The base weight's ``||W||^2`` for DoRA, cached on the layer (see ``nn.lora.WeightNormCache``)."""
        cache = self.__dict__.get("_peftkern_norm_cache")
        if cache is None:
            cache = self.__dict__["_peftkern_norm_cache"] = WeightNormCache()
        return cache.get(self.get_base_layer().weight)

    def merge(self, *args, **kwargs) -> None:
        self.__dict__.pop("_peftkern_norm_cache", None)  # the base weight changes (the cache would notice too)
        super().merge(*args, **kwargs)

    def unmerge(self, *args, **kwargs) -> None:
        self.__dict__.pop("_peftkern_norm_cache", None)
        super().unmerge(*args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.get("adapter_names")
        others = any(value is not None for key, value in kwargs.items() if key != "adapter_names")
        if args or others or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return super().forward(x, *args, **kwargs)
        if adapter_names is not None:
            self._check_forward_args(x, adapter_names=adapter_names)  # peft's errors, as peft raises them
            y = self._fused_mixed_batch(x, adapter_names)
        elif fusion_blocker(self) is None:
            y = self._fused_single(x)
        else:
            y = None
        return super().forward(x, *args, **kwargs) if y is None else y

    def _fused_single(self, x: torch.Tensor) -> torch.Tensor | None:
        (adapter,) = [name for name in self.active_adapters if name in self.lora_A]
        base = self.get_base_layer()
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if not _dtypes_fit(x, base, lora_a.dtype) or lora_a.device != x.device:
            return None
        dropout = self.lora_dropout[adapter]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
        if _is_dora(self, adapter):
            magnitude = self.lora_magnitude_vector[adapter].weight
            if magnitude.device != x.device:
                return None
            norm_sq = self._weight_norm_sq()
            if norm_sq is not None and torch.float64 in (x.dtype, lora_a.dtype):
                norm_sq = norm_sq.double()
            # peft drops out x (and recomputes the base product from it) only in training mode.
            return dora_linear(x, base.weight, base.bias, lora_a, lora_b, magnitude, float(self.scaling[adapter]),
                               p, self.training and dropout.training, weight_norm_sq=norm_sq,
                               backend=self.peftkern_backend)
        return lora_linear(x, base.weight, base.bias, lora_a, lora_b, float(self.scaling[adapter]), p,
                           dropout.training, backend=self.peftkern_backend)

    def _fused_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor | None:
        """peft's ``_mixed_batch_forward`` in one ``multi_lora_linear`` call: row b uses adapter
        ``adapter_names[b]``; ``"__base__"`` and names this layer does not hold run the base only (as in peft)."""
        if self.disable_adapters or x.dim() < 2 or _base_blocker(self) is not None:
            return None
        names = sorted({name for name in adapter_names if name != BASE_ADAPTER and name in self.lora_A})
        if not names:
            return None  # base only: peft's own forward is just the base layer
        for name in names:
            dropout = self.lora_dropout[name]
            active_dropout = isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training
            if _adapter_blocker(self, name) is not None or active_dropout or _is_dora(self, name):
                return None  # multi_lora_linear has no dropout, and no DoRA (peft refuses that mix itself)
        lora_as = [self.lora_A[name].weight for name in names]
        lora_bs = [self.lora_B[name].weight for name in names]
        dtype = lora_as[0].dtype
        base = self.get_base_layer()
        if any(a.dtype != dtype or a.device != x.device for a in lora_as) or not _dtypes_fit(x, base, dtype):
            return None
        ranks = [a.shape[0] for a in lora_as]
        r_max = max(ranks)
        # [L, r_max, K] and [L, N, r_max], zero past each rank (never computed: ranks tell the op where to stop).
        stacked_a = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in lora_as])
        stacked_b = torch.stack([F.pad(b, (0, r_max - b.shape[1])) for b in lora_bs])
        slot = {name: index for index, name in enumerate(names)}
        row_ids = torch.tensor([slot.get(name, -1) for name in adapter_names], dtype=torch.int32, device=x.device)
        adapter_ids = broadcast_adapter_ids(row_ids, tuple(x.shape[:-1]))
        scalings = [float(self.scaling[name]) for name in names]
        # The ids are ours and in range: no host-side check (and no sync) needed.
        return multi_lora_linear(x, base.weight, base.bias, stacked_a, stacked_b, adapter_ids, scalings, ranks,
                                 check_ids=False, backend=self.peftkern_backend)


if PeftLoraLinear4bit is not None:

    class FusedLoraLinear4bit(PeftLoraLinear4bit):
        """peft's ``lora.bnb.Linear4bit`` (QLoRA) with a forward that runs ``peftkern.lora_linear_4bit`` over the
        base's 4-bit storage when it can (one active plain-LoRA adapter; see :func:`fusion_blocker`), and peft's
        forward otherwise (``adapter_names=`` batches included). Made by :func:`convert`, like
        :class:`FusedLoraLinear`."""

        peftkern_backend: str | None = None

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            plain = not args and not any(value is not None for value in kwargs.values())
            if plain and isinstance(x, torch.Tensor) and x.is_floating_point() and fusion_blocker(self) is None:
                y = self._fused_single(x)
                if y is not None:
                    return y
            return super().forward(x, *args, **kwargs)

        def _fused_single(self, x: torch.Tensor) -> torch.Tensor | None:
            (adapter,) = [name for name in self.active_adapters if name in self.lora_A]
            lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            if lora_a.device != x.device or x.device != self.get_base_layer().weight.device:
                return None
            if lora_a.dtype not in (x.dtype, torch.float32) or torch.is_autocast_enabled(x.device.type):
                return None  # peft casts x to the adapters' dtype: exact for these two only
            if describe_backend(x.device, "lora_linear_4bit", self.peftkern_backend) not in ("torch", "triton"):
                return None  # use_backend / PEFTKERN_BACKEND chose cuda (no 4-bit kernel yet), or one that can't run
            dropout = self.lora_dropout[adapter]
            p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
            return linear_4bit_forward(self.get_base_layer(), x, lora_a, lora_b, float(self.scaling[adapter]), p,
                                       dropout.training, self.peftkern_backend)

    _PEFT_CLASSES = (PeftLoraLinear, PeftLoraLinear4bit)
    FUSED_CLASSES = (FusedLoraLinear, FusedLoraLinear4bit)
    _SWAPS = {PeftLoraLinear: FusedLoraLinear, PeftLoraLinear4bit: FusedLoraLinear4bit}
else:
    FusedLoraLinear4bit = None
    _PEFT_CLASSES = (PeftLoraLinear,)
    FUSED_CLASSES = (FusedLoraLinear,)
    _SWAPS = {PeftLoraLinear: FusedLoraLinear}


def convert(root: nn.Module, backend: str | None) -> tuple[list[str], dict[str, str]]:
    """Swap every peft ``lora.Linear`` in ``root`` to :class:`FusedLoraLinear` (in place; converted layers are
    kept, with ``backend`` set). Returns (names running fused now, {name: why not} for the other peft tuner
    layers)."""
    fused, fallback = [], {}
    for name, module in root.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) in _SWAPS:
            module.__class__ = _SWAPS[type(module)]
        if isinstance(module, FUSED_CLASSES):
            module.peftkern_backend = backend
        reason = fusion_blocker(module)
        if reason is None:
            fused.append(name)
        else:
            fallback[name] = reason
    return fused, fallback


def describe(fused: list[str], fallback: dict[str, str], limit: int = 8) -> str:
    """One log line: how many peft tuner layers run fused, and which run peft's forward and why."""
    total = len(fused) + len(fallback)
    line = f"peftkern.from_peft: {len(fused)} of {total} peft tuner layers run fused"
    if fallback:
        shown = [f"{name} ({reason})" for name, reason in list(fallback.items())[:limit]]
        more = f", and {len(fallback) - limit} more" if len(fallback) > limit else ""
        line += f"; peft's own forward for {len(fallback)}: " + ", ".join(shown) + more
    return line
