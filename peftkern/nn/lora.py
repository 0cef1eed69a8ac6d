"""``LoRALinear``: a frozen ``nn.Linear`` plus a trainable low-rank update, computed by ``peftkern.lora_linear``."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from ..backends import describe_backend
from ..ops._checks import check_finite_scalar, check_probability
from ..ops.dora import dora_linear, weight_norm_sq
from ..ops.lora import lora_linear

__all__ = ["LoRALinear"]

_INITS = ("default", "gaussian", "zeros")


class WeightNormCache:
    """``||W_n||^2`` of a frozen weight, recomputed when the weight changes: another tensor behind the
    Parameter (``.data =``, FSDP unsharding, ``.to``), an in-place write (``copy_``, ``load_state_dict``:
    the version counter moves), or :meth:`clear` (merge / unmerge / load call it)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def clear(self) -> None:
        self._key = self._value = None

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The cached value for ``weight`` (computed on a miss); None while traced (the op computes it)."""
        if torch.compiler.is_compiling() or type(weight) not in (torch.Tensor, nn.Parameter):
            return None
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        if key != self._key:
            self._value, self._key = weight_norm_sq(weight), key
        return self._value


class LoRALinear(nn.Module):
    """``y = base_layer(x) + scaling * B(A(dropout(x)))`` with the frozen ``base_layer``.

    Parameters: ``lora_A`` [r, in_features] and ``lora_B`` [out_features, r] (trainable), and the base
    layer's own ``weight``/``bias`` (frozen; kept as the same Parameter objects, so FSDP and optimisers
    see one copy). ``scaling`` is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, as in ``peft``.

    ``use_dora=True``: DoRA as peft computes it (``peftkern.dora_linear``), with the trainable magnitude
    ``lora_magnitude_vector`` [out_features] (peft's name), initialised to ``||W + scaling * B A||`` per
    output row; the layer caches the frozen ``||W||^2`` (:class:`WeightNormCache`).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected torch.nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        check_probability("dropout", dropout)
        if init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
        check_finite_scalar("alpha", alpha)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.backend = backend
        self.merged = False
        self.use_dora = bool(use_dora)
        self._weight_norm_sq = WeightNormCache()
        self._merged_norm: torch.Tensor | None = None  # DoRA: the column norm the merge divided by
        weight = base_layer.weight
        if dtype is None:
            # As peft's autocast_adapter_dtype: fp32 adapters beside a 16-bit base, else the base's dtype.
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))
        base_layer.requires_grad_(False)
        self.reset_lora_parameters(init)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        **kwargs,
    ) -> LoRALinear:
        """Wrap ``linear`` (frozen in place) with a rank-``r`` adapter (DoRA with ``use_dora=True``)."""
        if use_dora:
            if "use_dora" not in inspect.signature(cls.__init__).parameters:
                raise ValueError(f"use_dora: {cls.__name__} does not support DoRA yet; use plain LoRA")
            kwargs["use_dora"] = True
        return cls(linear, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, **kwargs)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """``default``: A Kaiming-uniform (a=sqrt(5)), B zeros, as ``peft`` (the layer starts as the base);
        ``gaussian``: A ~ N(0, 1/r), B zeros; ``zeros``: both zero, for weights about to be loaded. DoRA's
        magnitude becomes the column norm ``||W + scaling * B A||`` (= ``||W||`` with B = 0), as in peft."""
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.zeros_(self.lora_A)
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: set the magnitude to the current column norm ``||W + scaling * B A||`` (the layer then
        computes what its plain LoRA would)."""
        self.lora_magnitude_vector.copy_(self._column_norm(self.base_layer.weight))

    def _column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||weight + scaling * B A||`` per output row (weight unmerged), fp32 or wider, dense (merge only)."""
        merged = weight.to(torch.promote_types(weight.dtype, torch.float32)) + self.delta_weight()
        return torch.linalg.vector_norm(merged, dim=1)

    def delta_weight(self) -> torch.Tensor:
        """The adapter's update to the base weight, ``scaling * B @ A`` [out, in], in fp32 or wider."""
        compute = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (inference); ``unmerge`` undoes it. DoRA (as peft):
        ``W' = (m / ||W + s B A||) * (W + s B A)`` per output row, the norm kept for ``unmerge``."""
        if self.merged:
            return
        weight, delta = self.base_layer.weight, self.delta_weight()
        merged = weight.to(delta.dtype) + delta
        if self.use_dora:
            self._merged_norm = torch.linalg.vector_norm(merged, dim=1)
            merged = merged * (self.lora_magnitude_vector.to(delta.dtype) / self._merged_norm)[:, None]
        weight.copy_(merged.to(weight.dtype))
        self._weight_norm_sq.clear()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, delta = self.base_layer.weight, self.delta_weight()
        merged = weight.to(delta.dtype)
        if self.use_dora:
            merged = merged / (self.lora_magnitude_vector.to(delta.dtype) / self._merged_norm)[:, None]
            self._merged_norm = None
        weight.copy_((merged - delta).to(weight.dtype))
        self._weight_norm_sq.clear()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.use_dora:
            weight = self.base_layer.weight
            norm_sq = self._weight_norm_sq.get(weight)
            if norm_sq is not None and torch.float64 in (x.dtype, self.lora_A.dtype):
                norm_sq = norm_sq.double()  # the op's intermediates are float64 beside any float64 input
            return dora_linear(x, weight, self.base_layer.bias, self.lora_A, self.lora_B,
                               self.lora_magnitude_vector, self.scaling, self.dropout, self.training,
                               weight_norm_sq=norm_sq, backend=self.backend)
        return lora_linear(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.dropout,
            self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        op = "dora_linear" if self.use_dora else "lora_linear"
        backend = describe_backend(self.lora_A.device, op, self.backend)
        dora = ", dora=True" if self.use_dora else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"rslora={self.use_rslora}{dora}, merged={self.merged}, backend={backend}"
        )
