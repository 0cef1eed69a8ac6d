"""``peftkern.multi_lora_linear``: checks, backend dispatch, and the ``peftkern::multi_lora_linear`` custom op
with its fake implementation and autograd formula.

The op works on 2-D x [M, K] with adapter_ids [M]; the public function flattens leading dims. Forward
returns (y, s) where s = x[t] @ A[i, :r_i].T (zero past each row's rank and for base-only rows) is the
[M, r_max] intermediate (fp32; float64 for float64 inputs) saved for backward with x.

Checking the ids' values (and those of tensor ``ranks``/``scalings``) reads them on the host, which syncs
with the device. ``check_ids=False`` skips those value checks, for CUDA-graph capture and
``torch.compile``; the kernels still never read out of bounds: ids outside [-1, L) then act as -1 (base
only) and ranks are clamped to [0, r_max], on every backend.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backends import cuda_extension, resolve_backend
from ._checks import (
    INDEX_DTYPES,
    autocast_inputs,
    check_backend_dtypes,
    check_same_device,
    check_shape,
    check_tensor,
    host_check_default,
    intermediate_dtype,
)
from .lora_batch import LoRABatch, check_adapter_ids

__all__ = ["multi_lora_linear"]

OP = "multi_lora_linear"
PATHS = ("auto", "decode", "prefill")
# Rows per gather in the torch backend: bounds its [rows, r_max, K] and [rows, N, r_max] temporaries.
_TORCH_ROW_CHUNK = 256


# ---- torch backend: plain torch ops, no host sync, same semantics as the kernels ---------------------------


def _row_meta(adapter_ids, scalings, ranks, r_max, compute):
    """Per row: (valid [M] bool, safe ids [M] in [0, L), keep [M, r_max] bool, scale [M] or None without
    ``scalings``)."""
    num_adapters = ranks.shape[0]
    ids = adapter_ids.to(torch.int64)
    valid = (ids >= 0) & (ids < num_adapters)
    safe = torch.where(valid, ids, 0)
    row_ranks = torch.where(valid, ranks.to(torch.int64).clamp(0, r_max)[safe], 0)
    keep = torch.arange(r_max, device=ids.device) < row_ranks[:, None]
    scale = None if scalings is None else torch.where(valid, scalings.to(compute)[safe], 0.0)
    return valid, safe, keep, scale


def torch_shrink_rows(x_rows, lora_a, safe, keep, compute):
    """s [c, r_max] = x_rows[t] @ A[safe[t]].T where ``keep`` [c, r_max], else 0.

    The padding past each rank is never computed: masked with where (not a product), so whatever it holds
    (even NaN or inf) cannot reach the output, as in the reference.
    """
    a = torch.where(keep[:, :, None], lora_a[safe].to(compute), 0.0)  # [c, r_max, K]
    s_rows = torch.bmm(a, x_rows.to(compute).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, s_rows, 0.0)


def torch_expand_rows(s_rows, lora_b, safe, keep, scale, compute):
    """[c, N] = scale[t] * s_rows[t, keep] @ B[safe[t], :, keep].T."""
    b = torch.where(keep[:, None, :], lora_b[safe].to(compute), 0.0)  # [c, N, r_max]
    return torch.bmm(b, s_rows.unsqueeze(-1)).squeeze(-1) * scale[:, None]


def _torch_forward(x, weight, bias, lora_a, lora_b, adapter_ids, scalings, ranks):
    compute = intermediate_dtype(x.dtype, lora_a.dtype)
    M = x.shape[0]
    r_max = lora_a.shape[1]
    valid, safe, keep, scale = _row_meta(adapter_ids, scalings, ranks, r_max, compute)
    s = torch.empty((M, r_max), device=x.device, dtype=compute)
    lora = torch.empty((M, weight.shape[0]), device=x.device, dtype=compute)
    for start in range(0, M, _TORCH_ROW_CHUNK):
        rows = slice(start, start + _TORCH_ROW_CHUNK)
        s_rows = torch_shrink_rows(x[rows], lora_a, safe[rows], keep[rows], compute)
        lora_rows = torch_expand_rows(s_rows, lora_b, safe[rows], keep[rows], scale[rows], compute)
        s[rows] = s_rows
        lora[rows] = torch.where(valid[rows, None], lora_rows, 0.0)
    y = (F.linear(x, weight, bias).to(compute) + lora).to(x.dtype)
    return y, s


def _torch_backward(grad_y, x, weight, lora_a, lora_b, adapter_ids, scalings, ranks, s, need_dx):
    compute = s.dtype
    M = x.shape[0]
    num_adapters, r_max = lora_a.shape[:2]
    valid, safe, keep, scale = _row_meta(adapter_ids, scalings, ranks, r_max, compute)
    grad_a = torch.zeros(lora_a.shape, device=x.device, dtype=compute)
    grad_b = torch.zeros(lora_b.shape, device=x.device, dtype=compute)
    lora_dx = torch.empty((M, x.shape[1]), device=x.device, dtype=compute) if need_dx else None
    keep_slots = torch.arange(r_max, device=x.device) < ranks.to(torch.int64).clamp(0, r_max)[:, None]
    for start in range(0, M, _TORCH_ROW_CHUNK):
        rows = slice(start, start + _TORCH_ROW_CHUNK)
        dy = grad_y[rows].to(compute)
        b = torch.where(keep[rows, None, :], lora_b[safe[rows]].to(compute), 0.0)
        grad_s = torch.bmm(dy.unsqueeze(1), b).squeeze(1) * scale[rows, None]
        grad_s = torch.where(keep[rows], grad_s, 0.0)
        if need_dx:
            a = torch.where(keep[rows, :, None], lora_a[safe[rows]].to(compute), 0.0)
            lora_dx[rows] = torch.bmm(grad_s.unsqueeze(1), a).squeeze(1)
        # Per-adapter sums in a fixed order (deterministic, no index_add). Rows of other adapters are
        # dropped with where, not multiplied by 0: a non-finite x in one adapter's row must not turn
        # another adapter's gradient into NaN (0 * inf), as it does not in the reference.
        x_rows = x[rows].to(compute)
        for adapter in range(num_adapters):
            mine = ((safe[rows] == adapter) & valid[rows])[:, None]  # [c, 1]
            grad_s_mine = torch.where(mine, grad_s, 0.0)
            grad_a[adapter] += grad_s_mine.T @ torch.where(mine, x_rows, 0.0)
            dy_mine = torch.where(mine, dy * scale[rows, None], 0.0)
            grad_b[adapter] += dy_mine.T @ torch.where(mine, s[rows], 0.0)
    # The padding past each rank gets no gradient (0 * inf there would be NaN).
    grad_a = torch.where(keep_slots[:, :, None], grad_a, 0.0)
    grad_b = torch.where(keep_slots[:, None, :], grad_b, 0.0)
    grad_x = None
    if need_dx:
        grad_x = ((grad_y @ weight).to(compute) + lora_dx).to(x.dtype)
    return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)


# ---- the custom ops ---------------------------------------------------------------------------------------


def _segments(perm, bounds, tiles, block_m):
    """The Triton kernels' ``Segments`` from the op's arguments, or None (then the launcher builds one)."""
    if perm is None:
        return None
    from ..triton_kernels.multi_lora import Segments

    return Segments(perm, bounds, tiles, block_m)


@torch.library.custom_op("peftkern::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    backend: str,
    path: str,
    perm: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    tiles: torch.Tensor | None = None,
    block_m: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, bounds, tiles, block_m): a prebuilt segment table (``LoRABatch``) for the Triton kernels, or
    None to build one in the call."""
    if backend == "triton":
        from ..triton_kernels.multi_lora import multi_lora_forward

        return multi_lora_forward(x, weight, bias, lora_a, lora_b, adapter_ids, scalings, ranks, path,
                                  _segments(perm, bounds, tiles, block_m))
    if backend == "cuda":
        from ._cuda_multi_lora import multi_lora_forward as cuda_multi_lora_forward

        return cuda_multi_lora_forward(x, weight, bias, lora_a, lora_b, adapter_ids, scalings, ranks, path,
                                       _segments(perm, bounds, tiles, block_m))
    return _torch_forward(x, weight, bias, lora_a, lora_b, adapter_ids, scalings, ranks)


@_multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, adapter_ids, scalings, ranks, backend, path, perm=None, bounds=None,
      tiles=None, block_m=0):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s = x.new_empty((x.shape[0], lora_a.shape[1]), dtype=intermediate_dtype(x.dtype, lora_a.dtype))
    return y, s


@torch.library.custom_op("peftkern::multi_lora_linear_backward", mutates_args=())
def _multi_lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    s: torch.Tensor,
    need_dx: bool,
    backend: str,
    path: str,
    perm: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
    tiles: torch.Tensor | None = None,
    block_m: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dX, dA, dB); dX is an empty [0] tensor when ``need_dx`` is False."""
    grad_y = grad_y.contiguous() if grad_y.stride(-1) == 0 else grad_y  # expanded grads (e.g. from sum())
    args = (grad_y, x, weight, lora_a, lora_b, adapter_ids, scalings, ranks, s, need_dx)
    if backend == "triton":
        from ..triton_kernels.multi_lora import multi_lora_backward

        grad_x, grad_a, grad_b = multi_lora_backward(*args, path, _segments(perm, bounds, tiles, block_m))
    elif backend == "cuda":
        from ._cuda_multi_lora import multi_lora_backward as cuda_multi_lora_backward

        grad_x, grad_a, grad_b = cuda_multi_lora_backward(*args, path, _segments(perm, bounds, tiles, block_m))
    else:
        grad_x, grad_a, grad_b = _torch_backward(*args)
    return (grad_x if grad_x is not None else x.new_empty(0)), grad_a, grad_b


@_multi_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, adapter_ids, scalings, ranks, s, need_dx, backend, path, perm=None,
      bounds=None, tiles=None, block_m=0):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, adapter_ids, scalings, ranks, backend, path, *table = inputs
    perm, bounds, tiles, block_m = table + [None, None, None, 0][len(table):]
    _, s = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, adapter_ids, scalings, ranks, s, perm, bounds, tiles)
    ctx.backend, ctx.path, ctx.block_m = backend, path, block_m
    ctx.mark_non_differentiable(s)


def _backward(ctx, grad_y, _grad_s):
    x, weight, lora_a, lora_b, adapter_ids, scalings, ranks, s, perm, bounds, tiles = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a or need_b:
        grad_x, grad_a, grad_b = torch.ops.peftkern.multi_lora_linear_backward(
            grad_y, x, weight, lora_a, lora_b, adapter_ids, scalings, ranks, s, need_x, ctx.backend, ctx.path,
            perm, bounds, tiles, ctx.block_m,
        )
        grad_x = grad_x if need_x else None
        grad_a = grad_a if need_a else None
        grad_b = grad_b if need_b else None
    # The frozen base gets gradients only when it asks for them.
    if need_w:
        grad_w = (grad_y.T @ x.to(grad_y.dtype)).to(weight.dtype)
    if need_bias:
        grad_bias = grad_y.sum(0).to(weight.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None, None, None, None, None, None


_multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---- input checks -----------------------------------------------------------------------------------------


def _check_inputs(x, weight, bias, lora_a, lora_b, adapter_ids):
    """Shapes, dtypes and devices; ``adapter_ids`` None when a LoRABatch gives them (checked apart)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_a", lora_a, ndim=3)
    check_tensor("lora_b", lora_b, ndim=3)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    if adapter_ids is not None:
        check_tensor("adapter_ids", adapter_ids, dtypes=INDEX_DTYPES)
    out_features, in_features = weight.shape
    num_adapters, r_max = lora_a.shape[:2]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected last dimension {in_features} (weight is [N={out_features}, K={in_features}]), "
            f"got shape {tuple(x.shape)}"
        )
    check_shape("lora_a", lora_a, (None, None, in_features), "[L, r_max, K] with K = weight.shape[1]")
    if num_adapters == 0 or r_max == 0:
        raise ValueError(
            f"lora_a: expected L >= 1 adapter slots and r_max >= 1, got shape {tuple(lora_a.shape)}"
        )
    check_shape("lora_b", lora_b, (num_adapters, out_features, r_max),
                "[L, N, r_max] with L, r_max from lora_a and N = weight.shape[0]")
    if bias is not None:
        check_shape("bias", bias, (out_features,), "[N]")
    if adapter_ids is not None:
        check_shape("adapter_ids", adapter_ids, tuple(x.shape[:-1]), "x's leading shape")
    check_same_device("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, adapter_ids=adapter_ids)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected the dtype of x ({x.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected the dtype of x ({x.dtype}), got {bias.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b: expected the dtype of lora_a ({lora_a.dtype}), got {lora_b.dtype}")
    if lora_a.dtype not in (x.dtype, torch.float32, torch.float64):
        raise TypeError(
            f"lora_a: expected the dtype of x ({x.dtype}) or float32 (fp32 adapters), got {lora_a.dtype}"
        )


def _as_scalings(scalings, num_adapters: int, x: torch.Tensor, dtype, check_values: bool) -> torch.Tensor:
    device = x.device
    if isinstance(scalings, torch.Tensor):
        check_tensor("scalings", scalings, ndim=1)
        check_shape("scalings", scalings, (num_adapters,), "[L], one per adapter slot")
        check_same_device("x", x, scalings=scalings)
        if check_values and not bool(torch.isfinite(scalings).all()):  # host sync
            raise ValueError(f"scalings: expected finite values, got {scalings.tolist()}")
        return scalings.to(dtype).contiguous()
    if not isinstance(scalings, Sequence) or isinstance(scalings, str):
        raise TypeError(
            f"scalings: expected a float tensor [L] or a sequence of L numbers, got {type(scalings).__name__}"
        )
    if len(scalings) != num_adapters:
        raise ValueError(
            f"scalings: expected {num_adapters} values (one per adapter slot), got {len(scalings)}"
        )
    for index, value in enumerate(scalings):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"scalings[{index}]: expected a real number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise ValueError(f"scalings[{index}]: expected a finite number, got {value}")
    return torch.tensor([float(v) for v in scalings], dtype=dtype, device=device)


def _as_ranks(ranks, num_adapters: int, r_max: int, x: torch.Tensor, check_values: bool) -> torch.Tensor:
    device = x.device
    if ranks is None:
        return torch.full((num_adapters,), r_max, dtype=torch.int32, device=device)
    if isinstance(ranks, torch.Tensor):
        check_tensor("ranks", ranks, ndim=1, dtypes=INDEX_DTYPES)
        check_shape("ranks", ranks, (num_adapters,), "[L], one per adapter slot")
        check_same_device("x", x, ranks=ranks)
        if check_values and bool(((ranks < 0) | (ranks > r_max)).any()):  # host sync
            raise ValueError(f"ranks: expected values in [0, r_max={r_max}], got {ranks.tolist()}")
        return ranks.to(torch.int32).contiguous()
    if not isinstance(ranks, Sequence) or isinstance(ranks, str):
        raise TypeError(
            f"ranks: expected an int tensor [L], a sequence of L ints or None, got {type(ranks).__name__}"
        )
    if len(ranks) != num_adapters:
        raise ValueError(f"ranks: expected {num_adapters} values (one per adapter slot), got {len(ranks)}")
    for index, value in enumerate(ranks):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"ranks[{index}]: expected an int, got {type(value).__name__}")
        if not 0 <= value <= r_max:
            raise ValueError(f"ranks[{index}]: expected a value in [0, r_max={r_max}], got {value}")
    return torch.tensor([int(v) for v in ranks], dtype=torch.int32, device=device)


def batch_segments(batch: LoRABatch, path: str, backward: bool = False, backend: str = "triton") -> tuple:
    """(perm, bounds, tiles, block_m) of the batch's segment table for the kernels of ``backend`` ("triton":
    its tile height; "cuda": the CUDA C++ kernels' 64 rows), or Nones (and 0) where no kernel reads one: the
    decode forward without a backward to come, an empty batch. Built on the batch's first request, so once
    per batch for every layer, forward and backward."""
    rows = batch.num_tokens
    if rows == 0:
        return None, None, None, 0
    if backend == "cuda":
        ext = cuda_extension()
        decode = path == "decode" or (path == "auto" and rows <= ext.MULTI_LORA_DECODE_MAX_ROWS)
        block_m = ext.MULTI_LORA_SEGMENT_ROWS
    else:
        from ..triton_kernels.multi_lora import _use_decode, segment_block

        decode, block_m = _use_decode(path, rows), segment_block(rows)
    if decode and not backward:
        return None, None, None, 0
    segments = batch.segments(block_m)
    return segments.perm, segments.bounds, segments.tiles, segments.block_m


# ---- the public function ----------------------------------------------------------------------------------


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor | LoRABatch,
    scalings: torch.Tensor | Sequence[float],
    ranks: torch.Tensor | Sequence[int] | None = None,
    *,
    check_ids: bool | None = None,
    backend: str | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """Batched multi-LoRA linear: row t adds adapter ``i = adapter_ids[t]``'s update (-1: base only).

    ``y[t] = x[t] @ W.T + b + scalings[i] * (x[t] @ A[i, :r_i].T) @ B[i, :, :r_i].T``, r_i = ranks[i].

    Args:
        x: [..., K] activations (fp16, bf16, fp32; float64 on the torch backend).
        weight: [N, K] frozen base weight, x's dtype. bias: [N] or None.
        lora_a: [L, r_max, K]; lora_b: [L, N, r_max]: x's dtype or float32. Slot i uses its first r_i ranks.
        adapter_ids: int32/int64 with x's leading shape, values in [-1, L); or a :class:`~peftkern.LoRABatch`
            of x's rows, whose metadata (ids, the prefill segment table) is built once and shared by every
            layer of a step, forward and backward.
        scalings: [L] float tensor or sequence (alpha / r, or alpha / sqrt(r) with rsLoRA, per slot).
        ranks: [L] int tensor or sequence with values in [0, r_max]; None means r_max for every slot.
        check_ids: validate the values of adapter_ids (and of tensor ranks/scalings) on the host. Default
            (None): on CPU tensors yes, on CUDA tensors no (a check syncs with the device and fails in
            CUDA-graph capture); pass False for ``torch.compile``. Unchecked, ids outside [-1, L) act as
            -1 and ranks are clamped into [0, r_max]: never out of bounds. A LoRABatch's ids are checked
            (or not) when the batch is built.
        backend: "torch" | "triton" | "cuda" (see :mod:`peftkern.backends`). "cuda" runs the kernels of
            ``csrc/include/peftkern/multi_lora.cuh`` (fp16/bf16/fp32 x, adapters in x's dtype or fp32).
        path: "decode" (rows gather their adapter), "prefill" (rows grouped by adapter), or None/"auto"
            (decode for at most ``DECODE_MAX_ROWS`` rows). Kernel backends only; results agree.
    Returns:
        [..., N] in x's dtype. Gradients flow to x, lora_a, lora_b (each adapter's from its own rows),
        and to weight/bias only if they require grad.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    batch = adapter_ids if isinstance(adapter_ids, LoRABatch) else None
    _check_inputs(x, weight, bias, lora_a, lora_b, None if batch is not None else adapter_ids)
    check_ids = host_check_default(check_ids, x.device)
    path = "auto" if path is None else path
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS} or None, got {path!r}")
    num_adapters, r_max = lora_a.shape[:2]
    name = resolve_backend(x.device, OP, backend)
    check_backend_dtypes(OP, name, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    scale_dtype = intermediate_dtype(x.dtype, lora_a.dtype)
    scalings_t = _as_scalings(scalings, num_adapters, x, scale_dtype, check_ids)
    ranks_t = _as_ranks(ranks, num_adapters, r_max, x, check_ids)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    table = (None, None, None, 0)
    if batch is not None:
        batch.check(num_adapters, x2.shape[0], x.device, "adapter_ids")
        ids = batch.adapter_ids
        if name in ("triton", "cuda"):
            backward = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)
            )
            table = batch_segments(batch, path, backward, name)
    else:
        if check_ids:
            check_adapter_ids(adapter_ids, num_adapters)
        ids = adapter_ids.reshape(-1).contiguous()
    y, _ = torch.ops.peftkern.multi_lora_linear(
        x2, weight, bias, lora_a, lora_b, ids, scalings_t, ranks_t, name, path, *table
    )
    return y.reshape(*lead, weight.shape[0])
