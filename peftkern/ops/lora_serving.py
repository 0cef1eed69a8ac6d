"""``peftkern.lora_shrink`` and ``peftkern.lora_expand_add``: the two LoRA halves a serving stack calls around
its own base GEMM (often quantized or tensor-parallel), with a :class:`~peftkern.LoRABatch` built once per
step. Checks, backend dispatch, and the ``peftkern::lora_shrink`` / ``peftkern::lora_expand_add`` custom ops
(with fake implementations, so ``torch.compile`` sees through them). Inference only: no autograd formula.

Semantics: ``peftkern.reference.lora_shrink`` / ``lora_expand_add`` (a float64 row loop). No host sync on
CUDA tensors unless ``check_ids=True``, or scalings/ranks are given as Python sequences (copied to the device
in each call, a copy that waits for it: pass tensors); the kernels never read out of bounds whatever the ids
hold.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from ..backends import resolve_backend
from ._checks import (
    check_backend_dtypes,
    check_same_device,
    check_shape,
    check_tensor,
    host_check_default,
    intermediate_dtype,
)
from .lora_batch import LoRABatch
from .multi_lora import (
    _TORCH_ROW_CHUNK,
    PATHS,
    _as_ranks,
    _as_scalings,
    _row_meta,
    _segments,
    batch_segments,
    torch_expand_rows,
    torch_shrink_rows,
)

__all__ = ["lora_shrink", "lora_expand_add"]


# ---- torch backend: gathers per row chunk, no host sync ----------------------------------------------------


def _torch_shrink(x, slices, adapter_ids, ranks):
    compute = intermediate_dtype(x.dtype, slices[0].dtype)
    r_max = slices[0].shape[1]
    _, safe, keep, _ = _row_meta(adapter_ids, None, ranks, r_max, compute)
    s = torch.empty((len(slices), x.shape[0], r_max), device=x.device, dtype=compute)
    for j, lora_a in enumerate(slices):
        for start in range(0, x.shape[0], _TORCH_ROW_CHUNK):
            rows = slice(start, start + _TORCH_ROW_CHUNK)
            s[j, rows] = torch_shrink_rows(x[rows], lora_a, safe[rows], keep[rows], compute)
    return s


def _torch_expand_add(y, s, slices, adapter_ids, scalings, ranks, offset):
    compute = intermediate_dtype(y.dtype, s.dtype, slices[0].dtype)
    r_max = slices[0].shape[2]
    valid, safe, keep, scale = _row_meta(adapter_ids, scalings, ranks, r_max, compute)
    column = offset
    for j, lora_b in enumerate(slices):
        target = y.narrow(1, column, lora_b.shape[1])
        for start in range(0, y.shape[0], _TORCH_ROW_CHUNK):
            rows = slice(start, start + _TORCH_ROW_CHUNK)
            update = torch_expand_rows(s[j, rows].to(compute), lora_b, safe[rows], keep[rows], scale[rows],
                                       compute)
            current = target[rows]
            current.copy_(torch.where(valid[rows, None], (current.to(compute) + update).to(y.dtype), current))
        column += lora_b.shape[1]


# ---- the custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("peftkern::lora_shrink", mutates_args=())
def _lora_shrink_op(
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    perm: torch.Tensor | None,
    tiles: torch.Tensor | None,
    block_m: int,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        from ..triton_kernels.lora_serving import lora_shrink as triton_shrink

        return triton_shrink(x, lora_a, adapter_ids, ranks, _segments(perm, None, tiles, block_m))
    if backend == "cuda":
        from ._cuda_multi_lora import lora_shrink as cuda_shrink

        return cuda_shrink(x, lora_a, adapter_ids, ranks, None if perm is None else (perm, tiles))
    return _torch_shrink(x, lora_a, adapter_ids, ranks)


@_lora_shrink_op.register_fake
def _(x, lora_a, adapter_ids, ranks, perm, tiles, block_m, backend):
    dtype = intermediate_dtype(x.dtype, lora_a[0].dtype)
    return x.new_empty((len(lora_a), x.shape[0], lora_a[0].shape[1]), dtype=dtype)


@torch.library.custom_op("peftkern::lora_expand_add", mutates_args=("y",))
def _lora_expand_add_op(
    y: torch.Tensor,
    s: torch.Tensor,
    lora_b: list[torch.Tensor],
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    offset: int,
    perm: torch.Tensor | None,
    tiles: torch.Tensor | None,
    block_m: int,
    backend: str,
) -> None:
    if backend == "triton":
        from ..triton_kernels.lora_serving import lora_expand_add as triton_expand_add

        triton_expand_add(y, s, lora_b, adapter_ids, scalings, ranks, offset, _segments(perm, None, tiles, block_m))
        return
    if backend == "cuda":
        from ._cuda_multi_lora import lora_expand_add as cuda_expand_add

        cuda_expand_add(y, s, lora_b, adapter_ids, scalings, ranks, offset)
        return
    _torch_expand_add(y, s, lora_b, adapter_ids, scalings, ranks, offset)


@_lora_expand_add_op.register_fake
def _(y, s, lora_b, adapter_ids, scalings, ranks, offset, perm, tiles, block_m, backend):
    return None


# ---- input checks -------------------------------------------------------------------------------------------


def _as_slices(name: str, value: object, expected, meaning: str, like_name: str, like: torch.Tensor):
    """``value`` (a tensor, or a non-empty list/tuple of tensors) as a list of 3-D tensors, each of shape
    ``expected(first slice's shape)`` (None: any size), one dtype: ``like``'s (the activations) or fp32."""
    if isinstance(value, torch.Tensor):
        slices, labels = [value], [name]
    elif isinstance(value, (list, tuple)) and value:
        slices, labels = list(value), [f"{name}[{j}]" for j in range(len(value))]
    else:
        raise TypeError(f"{name}: expected a tensor [L, ., .] or a non-empty list of them, got {type(value).__name__}")
    for label, tensor in zip(labels, slices):
        check_tensor(label, tensor, ndim=3)
        if tensor.dtype != slices[0].dtype:
            raise TypeError(f"{label}: expected the dtype of {labels[0]} ({slices[0].dtype}), got {tensor.dtype}")
        check_shape(label, tensor, expected(slices[0].shape), meaning)
    if 0 in (slices[0].shape[0], slices[0].shape[2 if name == "lora_b" else 1]):
        raise ValueError(f"{name}: expected L >= 1 adapter slots and R >= 1, got shape {tuple(slices[0].shape)}")
    if slices[0].dtype not in (like.dtype, torch.float32, torch.float64):
        raise TypeError(f"{name}: expected the dtype of {like_name} ({like.dtype}) or float32, got {slices[0].dtype}")
    check_same_device(like_name, like, **dict(zip(labels, slices)))
    return slices


def _as_batch(batch: object, rows: int, num_adapters: int, device: torch.device, check_ids: bool | None):
    """A LoRABatch fitting ``rows`` rows and ``num_adapters`` slots (an ids tensor builds a one-off one)."""
    if isinstance(batch, torch.Tensor):
        batch = LoRABatch(batch, num_adapters, check_ids=check_ids)
    elif not isinstance(batch, LoRABatch):
        raise TypeError(f"batch: expected a peftkern.LoRABatch or an adapter ids tensor, got {type(batch).__name__}")
    batch.check(num_adapters, rows, device)
    return batch


def _check_path(path: str | None) -> str:
    path = "auto" if path is None else path
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS} or None, got {path!r}")
    return path


def _dispatch(op: str, device: torch.device, backend: str | None, batch: LoRABatch, path: str, **tensors):
    """(backend name, perm, tiles, block_m): the batch's segment table where the backend's prefill kernels
    read one (Triton: both pieces, its own tile height; CUDA C++: the shrink, 64-row tiles)."""
    name = resolve_backend(device, op, backend)
    check_backend_dtypes(op, name, **tensors)
    if name == "triton" or (name == "cuda" and op == "lora_shrink"):
        perm, _, tiles, block_m = batch_segments(batch, path, backend=name)
        return name, perm, tiles, block_m
    return name, None, None, 0


# ---- the public functions -----------------------------------------------------------------------------------


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor | Sequence[torch.Tensor],
    batch: LoRABatch | torch.Tensor,
    ranks: torch.Tensor | Sequence[int] | None = None,
    *,
    backend: str | None = None,
    path: str | None = None,
    check_ids: bool | None = None,
) -> torch.Tensor:
    """The LoRA shrink of a multi-adapter batch: ``s[t, :r_i] = x[t] @ lora_a[i, :r_i].T``, ``i`` = row t's id.

    Args:
        x: [..., K] activations (fp16, bf16, fp32; float64 on the torch backend), any strides.
        lora_a: A [L, R, K] (x's dtype or fp32), any strides (e.g. ``stacked[layer]``), or a list of up to
            any number of them with one shape (merged slices such as q/k/v: one launch per 4 slices).
        batch: a :class:`~peftkern.LoRABatch` of x's rows (``x.numel() // K``) and L slots; an ids tensor
            is accepted too (a LoRABatch is built for this call).
        ranks: [L] int tensor or sequence in [0, R] (None: R everywhere). Adapter i uses its first r_i ranks;
            nothing past r_i is computed, and s is zero there.
        backend: "torch" | "triton" | "cuda" (csrc/include/peftkern/lora_serving.cuh).
        path: "decode" (rows gather their adapter), "prefill" (rows grouped by adapter through the batch's
            segment table), None/"auto" (decode up to 64 rows). Triton only; results agree.
        check_ids: only for an ids tensor ``batch``: see :class:`~peftkern.LoRABatch`.
    Returns:
        float32 (float64 for float64 inputs) [..., R] for one ``lora_a`` tensor, [n, ..., R] for a list of
        n; rows with id -1 (or an id outside [-1, L)) are zero. Not differentiable (serving).
    """
    check_tensor("x", x, min_ndim=1)
    slices = _as_slices("lora_a", lora_a, lambda first: (first[0], first[1], x.shape[-1]),
                        "[L, R, K] with K = x.shape[-1], one shape for every slice", "x", x)
    num_adapters, r_max = slices[0].shape[:2]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    batch = _as_batch(batch, x2.shape[0], num_adapters, x.device, check_ids)
    path = _check_path(path)
    ranks_t = _as_ranks(ranks, num_adapters, r_max, x, host_check_default(check_ids, x.device))
    name, perm, tiles, block_m = _dispatch("lora_shrink", x.device, backend, batch, path, x=x, lora_a=slices[0])
    s = torch.ops.peftkern.lora_shrink(x2, slices, batch.adapter_ids, ranks_t, perm, tiles, block_m, name)
    s = s.reshape(len(slices), *lead, r_max)
    return s[0] if isinstance(lora_a, torch.Tensor) else s


def lora_expand_add(
    y: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor | Sequence[torch.Tensor],
    batch: LoRABatch | torch.Tensor,
    scalings: torch.Tensor | Sequence[float],
    offset: int = 0,
    ranks: torch.Tensor | Sequence[int] | None = None,
    *,
    backend: str | None = None,
    path: str | None = None,
    check_ids: bool | None = None,
) -> torch.Tensor:
    """The LoRA expand of a multi-adapter batch, added in place:
    ``y[t, o_j : o_j + N_j] += scalings[i] * s_j[t, :r_i] @ lora_b_j[i, :, :r_i].T``, ``i`` = row t's id.

    Args:
        y: [M, N_total] output of the caller's base GEMM (fp16, bf16, fp32; float64 on torch), any strides;
            updated in place. Rows with id -1 (or an id outside [-1, L)) are not touched.
        s: [M, R] for one ``lora_b`` tensor, [n, M, R] for a list of n (e.g. from :func:`lora_shrink`), any
            float dtype and strides.
        lora_b: B [L, N, R] (any strides), or a list of them with one L and R (N_j may differ): slice j is
            written at columns ``o_j = offset + N_0 + ... + N_(j-1)``, one launch per 4 slices.
        batch: a :class:`~peftkern.LoRABatch` of M rows and L slots (or an ids tensor).
        scalings: [L] float tensor or sequence (alpha / r per slot). ranks: as in :func:`lora_shrink`.
        offset: first column of y written (``offset + sum N_j <= y.shape[1]``).
        backend, path, check_ids: as in :func:`lora_shrink`.
    Returns:
        y. Not differentiable (serving).
    """
    check_tensor("y", y, ndim=2)
    check_tensor("s", s)
    slices = _as_slices("lora_b", lora_b, lambda first: (first[0], None, first[2]),
                        "[L, N_j, R], one L and R for every slice", "y", y)
    num_adapters, _, r_max = slices[0].shape
    rows = y.shape[0]
    one = isinstance(lora_b, torch.Tensor)
    expected = (rows, r_max) if one else (len(slices), rows, r_max)
    if tuple(s.shape) != expected:
        meaning = "[M, R] for one lora_b" if one else f"[n={len(slices)}, M, R] for a list of n lora_b"
        raise ValueError(f"s: expected shape {expected} ({meaning}), got {tuple(s.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
    width = sum(t.shape[1] for t in slices)
    if offset + width > y.shape[1]:
        raise ValueError(
            f"y: expected at least offset + sum(N_j) = {offset} + {width} = {offset + width} columns, "
            f"got shape {tuple(y.shape)}"
        )
    check_same_device("y", y, s=s)
    batch = _as_batch(batch, rows, num_adapters, y.device, check_ids)
    path = _check_path(path)
    host = host_check_default(check_ids, y.device)
    scale_dtype = intermediate_dtype(y.dtype, s.dtype, slices[0].dtype)
    scalings_t = _as_scalings(scalings, num_adapters, y, scale_dtype, host)
    ranks_t = _as_ranks(ranks, num_adapters, r_max, y, host)
    name, perm, tiles, block_m = _dispatch(
        "lora_expand_add", y.device, backend, batch, path, y=y, s=s, lora_b=slices[0]
    )
    s3 = s.unsqueeze(0) if one else s
    torch.ops.peftkern.lora_expand_add(
        y, s3, slices, batch.adapter_ids, scalings_t, ranks_t, int(offset), perm, tiles, block_m, name
    )
    return y

