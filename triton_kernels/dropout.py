"""The dropout keep-mask alone, for the torch backend on CUDA tensors (the fused kernels draw it inline).

``keep[i] = tl.rand(seed, i) >= p`` over a row-major [rows, cols] matrix: the stream of
``peftkern.reference.dropout_mask``, so the torch backend's masks equal the fused kernels' bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dropout_keep

__all__ = ["dropout_keep_mask"]

BLOCK = 1024


@triton.jit
def _dropout_keep_mask_kernel(SEED, KEEP, numel, p_drop, BLOCK: tl.constexpr):
    # One row of `numel` columns: the counter is the flat index, as dropout_keep computes it.
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.zeros((1,), dtype=tl.int64)
    keep = dropout_keep(tl.load(SEED), rows, cols, numel, p_drop)
    tl.store(KEEP + cols[None, :], keep.to(KEEP.dtype.element_ty), mask=cols[None, :] < numel)


def dropout_keep_mask(
    seed: torch.Tensor, shape: tuple[int, int], p: float, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Keep-mask [rows, cols] on ``seed``'s device, as bool or as 0/1 in ``dtype``; ``seed`` is a 1-element int64
    tensor (read by the kernel: no host sync)."""
    rows, cols = shape
    keep = torch.empty((rows, cols), dtype=dtype, device=seed.device)
    numel = rows * cols
    if numel:
        _dropout_keep_mask_kernel[(triton.cdiv(numel, BLOCK),)](seed, keep, numel, float(p), BLOCK=BLOCK)
    return keep
