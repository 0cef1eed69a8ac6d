"""The dropout keep-mask alone, for the torch backend on CUDA tensors (the fused kernels draw it inline).

The mask of ``peftkern.reference.dropout_mask`` over a row-major [rows, cols] matrix, drawn with the fused
kernels' own helper (``_common.dropout_keep_tile``: one Philox call per 4 elements), so the torch backend's
masks equal the fused kernels' bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dropout_keep_tile, interpreting

__all__ = ["dropout_keep_mask"]


@triton.jit
def _dropout_keep_mask_kernel(SEED, KEEP, rows_total, cols_total, p_drop,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    keep = dropout_keep_tile(tl.load(SEED), rows, col0, cols_total, p_drop, BLOCK_N)
    tl.store(KEEP + rows[:, None] * cols_total + cols[None, :], keep.to(KEEP.dtype.element_ty),
             mask=(rows < rows_total)[:, None] & (cols < cols_total)[None, :])


def dropout_keep_mask(
    seed: torch.Tensor, shape: tuple[int, int], p: float, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Keep-mask [rows, cols] on ``seed``'s device, as bool or as 0/1 in ``dtype``; ``seed`` is a 1-element int64
    tensor (read by the kernel: no host sync)."""
    rows, cols = shape
    keep = torch.empty((rows, cols), dtype=dtype, device=seed.device)
    if rows * cols:
        block_m, block_n = (4, 32) if interpreting() else (8, 256)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
        _dropout_keep_mask_kernel[grid](seed, keep, rows, cols, float(p), BLOCK_M=block_m, BLOCK_N=block_n)
    return keep
