"""``BottleneckAdapter``: one or several bottleneck adapters (down-project, nonlinearity, up-project,
residual) computed by ``peftkern.bottleneck_adapter``, with per-row adapter ids for multi-adapter batches."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from .._deprecation import deprecated_aliases
from ..backends import describe_backend
from ..ops._checks import check_tensor
from ..ops.bottleneck import bottleneck_adapter

__all__ = ["BottleneckAdapter", "use_bottleneck_adapter_ids", "current_bottleneck_adapter_ids"]

_INITS = ("bert", "zeros")

_adapter_ids: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "peftkern_adapter_ids", default=None
)


@contextlib.contextmanager
def use_bottleneck_adapter_ids(adapter_ids: torch.Tensor | None) -> Iterator[None]:
    """Inside this block, every ``BottleneckAdapter`` called without ``adapter_ids`` uses these.

    ``adapter_ids``: [B] (one id per sequence of a [B, T, D] batch) or one id per row of the layer's input;
    -1 means no adapter for that row. Read at forward time only; the backward pass needs no context.
    Activation checkpointing recomputes forwards during backward, where this block may no longer be current
    (autograd's device threads do not see it): layers with several adapters then raise for the missing ids.
    """
    if adapter_ids is not None and not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids: expected a torch.Tensor or None, got {type(adapter_ids).__name__}")
    token = _adapter_ids.set(adapter_ids)
    try:
        yield
    finally:
        _adapter_ids.reset(token)


def current_bottleneck_adapter_ids() -> torch.Tensor | None:
    """The ids set by the innermost :func:`use_bottleneck_adapter_ids` block, or None."""
    return _adapter_ids.get()


class BottleneckAdapter(nn.Module):
    """``y = x + scaling * up(act(down(LN(x))))`` (LN only with ``layer_norm=True``), per row of x.

    Holds ``num_adapters`` = L adapters stacked: ``down_weight`` [L, Bn, dim], ``down_bias`` [L, Bn],
    ``up_weight`` [L, dim, Bn], ``up_bias`` [L, dim], and with ``layer_norm`` the per-adapter affine
    ``ln_weight``/``ln_bias`` [L, dim]; Bn = max(1, dim // reduction_factor). Row t of a batch uses adapter
    ``adapter_ids[t]`` (-1: none, the row passes through). ``init="bert"``: weights N(0, 0.02), biases 0;
    ``init="zeros"``: the up projection and its bias 0 (down as "bert"), so the layer starts as identity.
    """

    def __init__(
        self,
        dim: int,
        reduction_factor: int = 16,
        activation: str = "relu",
        scaling: float = 1.0,
        init: str = "bert",
        num_adapters: int = 1,
        layer_norm: bool = False,
        *,
        eps: float = 1e-5,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        sizes = (("dim", dim), ("reduction_factor", reduction_factor), ("num_adapters", num_adapters))
        for name, value in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"activation: expected one of {reference.ACTIVATIONS}, got {activation!r}")
        if init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"scaling: expected a finite number, got {scaling!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        self.dim = dim
        self.reduction_factor = reduction_factor
        self.bottleneck = max(1, dim // reduction_factor)
        self.activation = activation
        self.scaling = float(scaling)
        self.num_adapters = num_adapters
        self.layer_norm = bool(layer_norm)
        self.eps = float(eps)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        adapters, bottleneck = num_adapters, self.bottleneck
        self.down_weight = nn.Parameter(torch.empty(adapters, bottleneck, dim, **factory))
        self.down_bias = nn.Parameter(torch.empty(adapters, bottleneck, **factory))
        self.up_weight = nn.Parameter(torch.empty(adapters, dim, bottleneck, **factory))
        self.up_bias = nn.Parameter(torch.empty(adapters, dim, **factory))
        if self.layer_norm:
            self.ln_weight = nn.Parameter(torch.empty(adapters, dim, **factory))
            self.ln_bias = nn.Parameter(torch.empty(adapters, dim, **factory))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "bert") -> None:
        """``bert``: weights N(0, 0.02), biases 0 (Houlsby's near-identity start); ``zeros``: as ``bert``
        but the up projection and its bias 0, so the output equals the input exactly."""
        if init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
        nn.init.normal_(self.down_weight, std=0.02)
        nn.init.zeros_(self.down_bias)
        nn.init.zeros_(self.up_bias)
        if init == "bert":
            nn.init.normal_(self.up_weight, std=0.02)
        else:
            nn.init.zeros_(self.up_weight)
        if self.layer_norm:
            nn.init.ones_(self.ln_weight)
            nn.init.zeros_(self.ln_bias)

    def _row_ids(self, x: torch.Tensor, adapter_ids: torch.Tensor | None) -> torch.Tensor | None:
        if adapter_ids is None:
            adapter_ids = current_bottleneck_adapter_ids()
        if adapter_ids is None:
            if self.num_adapters != 1:
                raise ValueError(
                    f"adapter_ids: this BottleneckAdapter holds {self.num_adapters} adapters; pass "
                    "adapter_ids or run inside peftkern.use_bottleneck_adapter_ids(...)"
                )
            return None
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError(f"adapter_ids: expected a torch.Tensor, got {type(adapter_ids).__name__}")
        rows = x.numel() // max(x.shape[-1], 1)
        # One id per sequence of a [B, T, D] batch: every token of the sequence uses it.
        if x.dim() > 2 and adapter_ids.shape == x.shape[:1] and adapter_ids.numel() != rows:
            view = adapter_ids.reshape(-1, *([1] * (x.dim() - 2)))
            adapter_ids = view.expand(x.shape[:-1])
        if adapter_ids.numel() != rows:
            raise ValueError(
                f"adapter_ids: expected shape {tuple(x.shape[:-1])} (x.shape[:-1]), ({rows},) or "
                f"({x.shape[0]},) (one id per sequence), got {tuple(adapter_ids.shape)}"
            )
        return adapter_ids.reshape(x.shape[:-1])

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., dim] -> [..., dim]. ``adapter_ids``: [...] = x.shape[:-1], [rows], or [B] for x
        [B, ..., dim]; default: the :func:`use_bottleneck_adapter_ids` context, else adapter 0 when L = 1."""
        check_tensor("x", x, min_ndim=1)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dimension {self.dim} (dim), got shape {tuple(x.shape)}")
        ids = self._row_ids(x, adapter_ids)
        if ids is None:
            weights = (self.down_weight[0], self.down_bias[0], self.up_weight[0], self.up_bias[0])
        else:
            weights = (self.down_weight, self.down_bias, self.up_weight, self.up_bias)
        inputs, residual = x, None
        if self.layer_norm:
            # The adapter sees LN(x); the skip connection carries x itself.
            normed = F.layer_norm(x, (self.dim,), eps=self.eps)
            rows = x.numel() // self.dim
            if ids is None:
                # One adapter: its LN affine folds into the down projection, down(n * g + b) =
                # (W * g) n + (W b + d), so no [rows, dim] tensor beyond LN(x) itself.
                weights = (*self._fold_layer_norm(0), *weights[2:])
                inputs = normed
            elif self.num_adapters * self.bottleneck <= rows:
                # Several adapters, the same fold for each ([L, Bn, dim] of work, below the [rows, dim] of
                # gathering each row's scale and shift).
                weights = (*self._fold_layer_norm(None), *weights[2:])
                inputs = normed
            else:
                # Few rows (decode) beside many adapters: each row's scale and shift, gathered. Clamped only
                # for the gather: the op itself rejects (or passes through) bad ids.
                safe = ids.clamp(0, self.num_adapters - 1).to(torch.int64)
                scale, shift = self.ln_weight[safe], self.ln_bias[safe]
                inputs = normed * scale.to(x.dtype) + shift.to(x.dtype)
            residual = x
        return bottleneck_adapter(
            inputs, *weights, self.activation, self.scaling, residual, ids, backend=self.backend
        )

    def _fold_layer_norm(self, adapter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down weight, down bias) with the LN affine folded in: W * g and d + W b, for one adapter (index) or
        all ([L, ...], ``adapter`` None). Differentiable: the gradients reach W, d, g and b through autograd."""
        select = (lambda t: t[adapter]) if adapter is not None else (lambda t: t)
        down_weight, down_bias = select(self.down_weight), select(self.down_bias)
        scale, shift = select(self.ln_weight), select(self.ln_bias)
        folded_weight = down_weight * scale.unsqueeze(-2)
        folded_bias = down_bias + (down_weight @ shift.unsqueeze(-1)).squeeze(-1)
        return folded_weight, folded_bias

    def extra_repr(self) -> str:
        backend = describe_backend(self.down_weight.device, "bottleneck_adapter", self.backend)
        return (
            f"dim={self.dim}, bottleneck={self.bottleneck}, num_adapters={self.num_adapters}, "
            f"activation={self.activation}, scaling={self.scaling:g}, layer_norm={self.layer_norm}, "
            f"backend={backend}"
        )


RENAMED = {"use_adapter_ids": "use_bottleneck_adapter_ids", "current_adapter_ids": "current_bottleneck_adapter_ids"}
__getattr__ = deprecated_aliases(globals(), RENAMED)
