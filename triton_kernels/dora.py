"""DoRA's own kernels (the LoRA GEMMs are ``lora.py``'s). Imports triton and torch only.

  scale       g[n] = m[n] / ||W_n + s (B A)_n|| by the low-rank identity
              ||W_n + s (BA)_n||^2 = ||W_n||^2 + 2 s (W A^T)_n . B_n + s^2 (B (A A^T))_n . B_n,
              (W A^T) accumulated in one pass over W and reduced against B in the epilogue: the dense
              [N, K] update is never formed. ||W_n||^2 comes in (cached by the layer); A A^T [r, r] is
              computed by the launcher.
  scale_grad  Gs = dY * g and the magnitude's partial gradients sum_t dY[t, n] (Z[t, n] - b[n]) per row
              chunk, from one read of dY and Z; the launcher sums the chunks in a fixed order and divides
              by m (Z = g V + b holds g V, so that is sum_t dY V / ||.||).
The forward's column scale rides in ``lora.py``'s fused kernel's epilogue (its COL_SCALE switch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_in_fp32, fp32_precision, interpreting, mma, rank_block

__all__ = ["dora_scale", "dora_scale_grad"]


@triton.jit
def _dora_scale_kernel(
    W, A, B, AAT, NORM_SQ, MAG, SCALE,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """SCALE[rows] = MAG / sqrt(NORM_SQ + 2 s rowsum((W A^T) * B) + s^2 rowsum((B AAT) * B)); BLOCK_N rows of W
    per program, one pass over them."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < K
        w = tl.load(W + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a_t = tl.load(A + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        wa = mma(w, a_t, wa, DOT_FP32, PRECISION)
    b = tl.load(B + rows[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
    aat = tl.load(AAT + ranks[:, None] * R + ranks[None, :], mask=rank_ok[:, None] & rank_ok[None, :], other=0.0)
    # [BLOCK_N, r] x [r, r] in fp32: small, and the square term wants the precision.
    baat = tl.dot(b, aat, input_precision=PRECISION)
    norm_sq = tl.load(NORM_SQ + rows, mask=row_ok, other=1.0)
    norm_sq += 2.0 * scaling * tl.sum(wa * b, axis=1) + scaling * scaling * tl.sum(baat * b, axis=1)
    magnitude = tl.load(MAG + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(SCALE + rows, magnitude / tl.sqrt(tl.maximum(norm_sq, 0.0)), mask=row_ok)


@triton.jit
def _dora_scale_grad_kernel(
    DY, Z, BIAS, SCALE, DYS, DM_PART,
    M, N, rows_per_chunk,
    stride_dym, stride_dyn, stride_zm, stride_zn, stride_sm, stride_sn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DYS = DY * SCALE[col]; DM_PART[chunk, cols] = sum over the chunk's rows of DY * (Z - BIAS)."""
    tile_n = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    scale = tl.load(SCALE + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    row_start = chunk.to(tl.int64) * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        z = tl.load(Z + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z = tl.where(mask, z - bias[None, :], 0.0)
        dy = dy.to(tl.float32)
        acc += tl.sum(dy * z, axis=0)
        tl.store(DYS + rows[:, None] * stride_sm + cols[None, :] * stride_sn,
                 (dy * scale[None, :]).to(DYS.dtype.element_ty), mask=mask)
    tl.store(DM_PART + chunk.to(tl.int64) * N + cols, acc, mask=col_ok)


def dora_scale(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm_sq: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """g = magnitude / ||W + scaling B A|| per row: fp32 [N]. weight [N, K], lora_a [r, K], lora_b [N, r],
    magnitude [N], weight_norm_sq fp32 [N] (contiguous); inputs already checked."""
    N, K = weight.shape
    R = lora_a.shape[0]
    scale = torch.empty(N, device=weight.device, dtype=torch.float32)
    if N == 0:
        return scale
    a32 = lora_a.float()
    aat = (a32 @ a32.T).contiguous()  # [r, r]: r^2 K flops, nothing next to the pass over W
    precision = fp32_precision()
    block_n = 16 if interpreting() else 64
    _dora_scale_kernel[(triton.cdiv(N, block_n),)](
        weight, lora_a, lora_b, aat, weight_norm_sq.contiguous(), magnitude.contiguous(), scale,
        N, K, R,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        float(scaling),
        DOT_FP32=dot_in_fp32(weight.dtype, lora_a.dtype), PRECISION=precision,
        BLOCK_N=block_n, BLOCK_K=16 if interpreting() else 64, BLOCK_R=rank_block(R),
    )
    return scale


def dora_scale_grad(
    grad_y: torch.Tensor,
    z: torch.Tensor,
    bias: torch.Tensor | None,
    magnitude: torch.Tensor,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY * g in dY's dtype [M, N], dm fp32 [N] = sum_t dY (Z - b) / m, 0 where m = 0).
    grad_y, z: [M, N] (any strides); bias [N] or None; magnitude [N]; scale fp32 [N] contiguous."""
    M, N = grad_y.shape
    grad_scaled = torch.empty((M, N), device=grad_y.device, dtype=grad_y.dtype)
    if M == 0 or N == 0:
        return grad_scaled, torch.zeros(N, device=grad_y.device, dtype=torch.float32)
    block_m, block_n = (16, 16) if interpreting() else (32, 128)
    n_col_tiles = triton.cdiv(N, block_n)
    # Enough programs to fill the device; partials summed in a fixed order (deterministic).
    chunks = max(1, min(triton.cdiv(M, block_m), 1024 // n_col_tiles))
    rows_per_chunk = triton.cdiv(triton.cdiv(M, block_m), chunks) * block_m
    chunks = triton.cdiv(M, rows_per_chunk)
    dm_part = torch.empty((chunks, N), device=grad_y.device, dtype=torch.float32)
    _dora_scale_grad_kernel[(n_col_tiles, chunks)](
        grad_y, z, bias if bias is not None else z, scale, grad_scaled, dm_part,
        M, N, rows_per_chunk,
        grad_y.stride(0), grad_y.stride(1), z.stride(0), z.stride(1), grad_scaled.stride(0), grad_scaled.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=1 if interpreting() else 8,  # 16 elements a thread per tensor: no spills at odd strides
    )
    magnitude = magnitude.float()
    grad_m = dm_part.sum(0)
    return grad_scaled, torch.where(magnitude != 0, grad_m / magnitude, torch.zeros_like(grad_m))
