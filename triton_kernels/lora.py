"""Fused LoRA linear kernels and their launchers. Imports triton and torch only.

Forward, two launches:
  shrink   S = dropout(X) @ A.T                      [M, r] fp32, the only saved intermediate
  fused    Y = X @ W.T + b + scaling * S @ B.T       the rank-r expand rides in the base GEMM's epilogue
Backward, three launches (and cuBLAS for dW, db when the frozen weight does require grad), dY read once:
  dx       dX = dY @ W + (dS @ A) * mask / (1 - p)            the mask regenerated from the seed; its loop
           over N also accumulates the row block's dS = scaling * dY @ B in registers (the epilogue needs
           it whole; the row block's first column tile stores it) and writes partial dB = dY.T @ S per
           row block
  reduce   dB = scaling * sum(partial dB)                     in a fixed order: deterministic
  da       dA = dS.T @ (X * mask / (1 - p))                   summed over all rows in registers
When x needs no gradient (three launches: no dx), or the rank is over ``_reads_dy_once``'s limit (four: dx
reads dY again and takes dS whole), a kernel of their own computes dS and dB from one read of dY:
  dy       partial dS = dY @ B and dB = dY.T @ S               per column split and row chunk (at most 16)
  reduce   dS = scaling * sum(partial dS), dB = scaling * sum(partial dB)   in a fixed order: deterministic
  dx, da   as above
No memset, sum, scale or cast runs around them: every partial is written once and reduced by a kernel, and
the gradients leave the kernels in the adapters' dtype.
The products with S or dS (``_common.lowrank_dot``; the fused and dx expands accumulate straight into the
base tile) run on tensor cores in the activation dtype when activations and adapters are 16-bit, S or dS
rounded to it as peft's own layers round their intermediate, and in fp32 otherwise; S stays fp32.
The two base GEMMs (fused forward, dx) read X / dY and W by TMA on sm_90 when those tensors are TMA-ready
(``_common.tma_ready``), through descriptors built on the device from the autotuned block sizes; otherwise,
and on sm_80, by pointer loads (cp.async).

Shapes follow torch.nn.Linear: X [M, K], W [N, K], A [r, K], B [N, r]. Any strides; offsets in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    apply_keep,
    autotune,
    dot_in_fp32,
    dropout_keep_tile,
    ensure_tma_scratch,
    fp32_precision,
    gemm_configs,
    gemm_k_loop,
    gemm_k_loop_tma,
    grouped_tile,
    interpreting,
    lowrank_dot,
    m_bucket,
    mma,
    rank_block,
    register_budget,
    tma_ready,
    tma_target,
)

__all__ = ["lora_forward", "lora_backward"]



def _row_block() -> int:
    return 16 if interpreting() else 64


def _col_block() -> int:
    return 16 if interpreting() else 128


_DY_WARPS = 8


def _dy_row_block(dy_dtype: torch.dtype, precision: str) -> int:
    """Rows per step of the dy kernel: 64, but 32 when dY is fp32 and split for tf32x3 (its TF32 head and
    tail, for dS and transposed for dB, live beside the partial dB: 64 rows spilled 684 B per thread, 32
    use 214 registers and none; ptxas -v, sm_90a, triton 3.6). Halving the columns instead would double
    the dS partials' workspace."""
    if not interpreting() and dy_dtype == torch.float32 and precision == "tf32x3":
        return 32
    return _row_block()


# --------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    X, A, S, SEED,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak,
    p_drop, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[M, R] (fp32, contiguous) = dropout(X) @ A.T; one program per BLOCK_M rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_ok = cols < K
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = apply_keep(x, dropout_keep_tile(seed, rows, k0, K, p_drop, BLOCK_K))
        a_t = tl.load(A + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = mma(x, a_t, acc, DOT_FP32, PRECISION)
    if HAS_DROPOUT:
        acc *= inv_keep
    tl.store(S + rows[:, None] * R + ranks[None, :], acc, mask=row_ok[:, None] & rank_ok[None, :])


@autotune(gemm_configs(wide=True),
          ["M_BUCKET", "N", "K", "R", "HAS_BIAS", "BASE_FP32", "LORA_FP32", "PRECISION", "COL_SCALE", "USE_TMA"],
          budget=lambda args: register_budget(args["PRECISION"], fp32_loop=args["BASE_FP32"]))
@triton.jit
def _lora_fwd_kernel(
    X, W, BIAS, S, B, Y, SCALE,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, BASE_FP32: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    COL_SCALE: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    """Y = X @ W.T + bias + scaling * S @ B.T, one (BLOCK_M x BLOCK_N) tile per program; with COL_SCALE,
    Y = SCALE[col] * (X @ W.T + scaling * S @ B.T) + bias (DoRA's m / ||W + s B A||, fp32 [N]).
    USE_TMA (sm_90, X and W aligned row-major): the base GEMM's tiles come by TMA, else by cp.async."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # The rank-r expand, one [BLOCK_M, r] x [r, BLOCK_N] product, first: it is the base loop's initial
    # accumulator, so its operands (and, with fp32 adapters, their TF32 splits) are dead before the loop
    # and never live beside the loaded tiles (after the loop, the 128 x 256 config spilled: ptxas -v, sm_90).
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    s = tl.load(S + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    b_t = tl.load(B + cols[None, :] * stride_bn + ranks[:, None] * stride_br,
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    acc = lowrank_dot(s * scaling, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LORA_FP32, PRECISION)
    if USE_TMA:
        acc = gemm_k_loop_tma(X, W, tile_m * BLOCK_M, tile_n * BLOCK_N, M, N, K, acc, stride_xm, stride_wn,
                              BASE_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = gemm_k_loop(X, W, rows, row_ok, cols, col_ok, K, acc,
                          stride_xm, stride_xk, stride_wn, stride_wk, BASE_FP32, PRECISION, BLOCK_K)
    if COL_SCALE:
        acc *= tl.load(SCALE + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _lora_bwd_dy_kernel(
    DY, B, S, DS_PART, DB_PART,
    M, N, R, rows_per_chunk,
    stride_dym, stride_dyn, stride_bn, stride_br,
    LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Both rank-r products of dY from one read of it.

    Program (chunk, split) owns rows [chunk * rows_per_chunk, ...) and the BLOCK_N columns of block ``split``:
      DS_PART[split, rows]  = dY[rows, cols] @ B[cols]       one store per row block
      DB_PART[chunk, cols]  = dY[rows, cols].T @ S[rows]     summed in registers over the chunk, one store
    Each workspace element is written once, by one program, and never read back here: no memset, no
    atomics, no ordering between threads to get wrong. B's tile is loaded once per program.
    """
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    row_start = chunk.to(tl.int64) * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, M)
    cols = split.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    b = tl.load(B + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.load(S + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        ds = mma(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), LORA_FP32, PRECISION)
        tl.store(DS_PART + split.to(tl.int64) * M * R + rows[:, None] * R + ranks[None, :], ds,
                 mask=row_ok[:, None] & rank_ok[None, :])
        db = mma(tl.trans(dy), s, db, LORA_FP32, PRECISION)
    tl.store(DB_PART + chunk.to(tl.int64) * N * R + cols[:, None] * R + ranks[None, :], db,
             mask=col_ok[:, None] & rank_ok[None, :])


@triton.jit
def _lora_bwd_reduce_kernel(
    DS_PART, DS, DB_PART, DB, CHUNKS,
    M, N, R, n_splits, n_chunks, row_programs, ds_part_stride, db_part_stride,
    stride_dbn, stride_dbr,
    scaling,
    CHUNKS_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The partial sums of the dy kernel (or of the dX kernel), in a fixed order (deterministic), scaled, in
    one launch: programs [0, row_programs) write DS[rows] = scaling * sum_split DS_PART[split, rows] (fp32,
    contiguous), the others DB[cols] = scaling * sum_chunk DB_PART[chunk, cols] in DB's dtype (dB, the
    adapter's gradient). CHUNKS_ON_DEVICE: the chunk count is read from CHUNKS (the dX kernel wrote it: its
    autotuned row block decides it), not ``n_chunks``.
    """
    pid = tl.program_id(0)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    if pid < row_programs:
        rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & rank_ok[None, :]
        offsets = rows[:, None] * R + ranks[None, :]
        acc = tl.zeros((BLOCK, BLOCK_R), dtype=tl.float32)
        for split in range(0, n_splits):
            acc += tl.load(DS_PART + split * ds_part_stride + offsets, mask=mask, other=0.0)
        tl.store(DS + offsets, acc * scaling, mask=mask)
    else:
        cols = (pid - row_programs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = (cols < N)[:, None] & rank_ok[None, :]
        offsets = cols[:, None] * R + ranks[None, :]
        acc = tl.zeros((BLOCK, BLOCK_R), dtype=tl.float32)
        if CHUNKS_ON_DEVICE:
            n_chunks = tl.load(CHUNKS)
        for chunk in range(0, n_chunks):
            acc += tl.load(DB_PART + chunk * db_part_stride + offsets, mask=mask, other=0.0)
        tl.store(DB + cols[:, None] * stride_dbn + ranks[None, :] * stride_dbr,
                 (acc * scaling).to(DB.dtype.element_ty), mask=mask)


def _dx_configs() -> list[triton.Config]:
    """The dX kernel's configs: the forward's with at least ``_dx_min_rows()`` rows per tile and at most 16
    per warp, and a shorter step for fp32 (split into TF32 halves, 64 x 64 x 64 spilled 136 B, x 32 none).

    Each row block writes one fp32 partial of dB ([N, r]), so small row tiles would move more partial bytes
    than the second read of dY they replace (16 rows at 8192 x 4096, r 16: 134 MB of partials against 67 MB
    of dY). The rank-r tiles held across the loop (dS, S and, for fp32 adapters, their TF32 halves) grow
    with the rows per warp: at 32 (128 x 64 with 4 warps) fp32 adapters spilled 472 B, fp32 with TF32 180 B
    (ptxas -v, sm_90a, triton 3.6)."""
    if interpreting():
        return gemm_configs(wide=True)
    configs = [c for c in gemm_configs(wide=True)
               if c.kwargs["BLOCK_M"] >= _dx_min_rows() and c.kwargs["BLOCK_M"] // c.num_warps <= 16]
    return configs + [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP": 8}, num_warps=4,
                                    num_stages=4)]


def _dx_min_rows() -> int:
    return 16 if interpreting() else 64


@triton.jit
def _dy_rank_products(dy, ns, n_ok, B, s, ds, DB_PART, chunk, N, R, ranks, rank_ok, stride_bn, stride_br,
                      owns_db, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One N step of the dX loop's rank-r work on the dY tile it already holds: ds += dY @ B[ns], and, in the
    row block's first column tile only (``owns_db``), DB_PART[chunk, ns] = dY.T @ S[rows] (written once)."""
    b = tl.load(B + ns[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=n_ok[:, None] & rank_ok[None, :], other=0.0)
    ds = mma(dy, b, ds, LORA_FP32, PRECISION)
    if owns_db:
        db = mma(tl.trans(dy), s, tl.zeros((dy.shape[1], s.shape[1]), dtype=tl.float32), LORA_FP32, PRECISION)
        tl.store(DB_PART + chunk.to(tl.int64) * N * R + ns[:, None] * R + ranks[None, :], db,
                 mask=n_ok[:, None] & rank_ok[None, :])
    return ds


@autotune(
    _dx_configs(),
    ["M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "BASE_FP32", "LORA_FP32", "PRECISION", "USE_TMA"],
    # Busy with dropout (the mask beside the tile) and with fp32 adapters (dS's products split into TF32
    # halves every step: 128 x 256 spilled 3.7 KB there); with an fp32 loop as well, those products count
    # as the fp32 epilogue did (64 x 64 x 64 spilled 136 B).
    budget=lambda args: register_budget(args["PRECISION"], fp32_loop=args["BASE_FP32"],
                                        fp32_epilogue=args["BASE_FP32"] and args["LORA_FP32"],
                                        busy=args["HAS_DROPOUT"] or args["LORA_FP32"]),
)
@triton.jit
def _lora_bwd_dx_kernel(
    DY, W, B, S, A, DX, DS, DB_PART, CHUNKS, SEED,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    scaling, p_drop, inv_keep,
    HAS_DROPOUT: tl.constexpr, BASE_FP32: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    USE_TMA: tl.constexpr = False, DS_READY: tl.constexpr = False,
):
    """dX = dY @ W + (dS @ A) * mask / (1 - p), and dS, dB's partials, from one read of dY.

    The loop over N (steps of BLOCK_K) that reads dY for the base GEMM also accumulates the row block's
    dS = dY @ B in registers ([BLOCK_M, r] fp32; every column tile of the row block repeats it, an extra
    MMA of r / BLOCK_N of the main one and no extra bytes), so the low-rank epilogue has the complete dS
    after the loop. The row block's first column tile also writes DB_PART[row block] = dY.T @ S (fp32, one
    store per N step, never read back here) and DS = scaling * dS for the da kernel; program 0 writes the
    row-block count to CHUNKS, the reduce kernel's trip count (the autotuned BLOCK_M decides it; no host
    sync). USE_TMA as in the forward (dY and W by TMA). Tiles are BLOCK_M x BLOCK_N over (M x K).
    DS_READY (ranks where the partials would outweigh that read, see ``_reads_dy_once``): dS, scaled, is
    read from DS (the dy kernel's) and the loop is the base GEMM alone; B, S, DB_PART, CHUNKS are not used.
    """
    tile_m, tile_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP)
    if not DS_READY and tl.program_id(0) == 0:
        tl.store(CHUNKS, tl.cdiv(M, BLOCK_M))
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < K
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    owns_db = tile_k == 0
    rank_tile = row_ok[:, None] & rank_ok[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DS_READY:
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        ds = tl.load(DS + rows[:, None] * R + ranks[None, :], mask=rank_tile, other=0.0)
    else:
        s = tl.load(S + rows[:, None] * R + ranks[None, :], mask=rank_tile, other=0.0)
        ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # dY @ W: the reduction runs over N, W~[n, k] = W[n, k].
    if USE_TMA:
        dy_desc = tl.make_tensor_descriptor(DY, shape=[M, N], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_K, BLOCK_N])
        for n0 in range(0, N, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
            dy = dy_desc.load([tile_m * BLOCK_M, n0])
            w = w_desc.load([n0, tile_k * BLOCK_N])
            acc = mma(dy if BASE_FP32 else dy.to(w.dtype), w, acc, BASE_FP32, PRECISION)
            if not DS_READY:
                ds = _dy_rank_products(dy, ns, ns < N, B, s, ds, DB_PART, tile_m, N, R, ranks, rank_ok,
                                       stride_bn, stride_br, owns_db, LORA_FP32, PRECISION)
    else:
        for n0 in range(0, N, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
            n_ok = ns < N
            dy = tl.load(DY + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                         mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(W + ns[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(dy if BASE_FP32 else dy.to(w.dtype), w, acc, BASE_FP32, PRECISION)
            if not DS_READY:
                ds = _dy_rank_products(dy, ns, n_ok, B, s, ds, DB_PART, tile_m, N, R, ranks, rank_ok,
                                       stride_bn, stride_br, owns_db, LORA_FP32, PRECISION)
    if not DS_READY:
        ds *= scaling
        if owns_db:
            tl.store(DS + rows[:, None] * R + ranks[None, :], ds, mask=rank_tile)
    a = tl.load(A + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_DROPOUT:
        low = lowrank_dot(ds, a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LORA_FP32, PRECISION)
        acc += apply_keep(low, dropout_keep_tile(tl.load(SEED), rows, tile_k * BLOCK_N, K, p_drop, BLOCK_N)) * inv_keep
    else:
        acc = lowrank_dot(ds, a, acc, LORA_FP32, PRECISION)
    tl.store(DX + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_bwd_da_kernel(
    X, DS, DA, SEED,
    M, K, R,
    stride_xm, stride_xk, stride_dar, stride_dak,
    p_drop, inv_keep,
    HAS_DROPOUT: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """DA[:, cols] = dS.T @ (X[:, cols] * mask / (1 - p)) over all rows, in DA's dtype: one program per
    BLOCK_K columns, the sum over rows in registers (no partials to reduce afterwards)."""
    tile_k = tl.program_id(0)
    cols = tile_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < M
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = apply_keep(x, dropout_keep_tile(seed, rows, tile_k * BLOCK_K, K, p_drop, BLOCK_K))
        ds = tl.load(DS + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = lowrank_dot(tl.trans(ds), x, acc, LORA_FP32, PRECISION)
    if HAS_DROPOUT:
        acc *= inv_keep
    tl.store(DA + ranks[:, None] * stride_dar + cols[None, :] * stride_dak, acc.to(DA.dtype.element_ty),
             mask=rank_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------



def _dropout_args(seed: torch.Tensor | None, dropout_p: float, like: torch.Tensor):
    if seed is None or dropout_p == 0.0:
        return like, False, 0.0, 1.0  # SEED is never read without dropout; any pointer will do
    return seed, True, float(dropout_p), 1.0 / (1.0 - dropout_p)


def _use_tma(*tensors: torch.Tensor) -> bool:
    """Whether the base GEMM reads these operands by TMA: an sm_90+ target and TMA-ready tensors (see
    ``_common.tma_ready``); the allocator for the device-side descriptors is installed here when needed."""
    if not (tma_target() and tma_ready(*tensors)):
        return False
    if tensors[0].is_cuda:
        ensure_tma_scratch()
    return True


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    col_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (Y [M, N] in x's dtype, S [M, r] fp32). x: [M, K] (any strides); inputs already checked.
    ``col_scale`` (fp32 [N], contiguous): Y = col_scale * (X @ W.T + scaling * S @ B.T) + b (DoRA)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, s
    seed_arg, has_dropout, p_drop, inv_keep = _dropout_args(seed, dropout_p, s)
    block_r = rank_block(R)
    precision = fp32_precision()
    lora_fp32 = dot_in_fp32(x.dtype, lora_a.dtype, lora_b.dtype)
    block_m = _row_block()
    _lora_shrink_kernel[(triton.cdiv(M, block_m),)](
        x, lora_a, s, seed_arg, M, K, R,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
        p_drop, inv_keep,
        HAS_DROPOUT=has_dropout, DOT_FP32=lora_fp32, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_K=16 if interpreting() else 64, BLOCK_R=block_r,
    )
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else y, s, lora_b, y, col_scale if col_scale is not None else y,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, BASE_FP32=dot_in_fp32(x.dtype, weight.dtype),
        LORA_FP32=dot_in_fp32(x.dtype, lora_b.dtype),
        PRECISION=precision, BLOCK_R=block_r, COL_SCALE=col_scale is not None, USE_TMA=_use_tma(x, weight),
    )
    return y, s


def _chunks(total: int, block: int, max_chunks: int) -> tuple[int, int]:
    """Split ``total`` rows into at most ``max_chunks`` chunks of whole blocks: (n_chunks, rows_per_chunk)."""
    blocks = triton.cdiv(total, block)
    n_chunks = max(1, min(blocks, max_chunks))
    rows_per_chunk = triton.cdiv(blocks, n_chunks) * block
    return triton.cdiv(total, rows_per_chunk), rows_per_chunk


def _reads_dy_once(rank: int, dy_element_size: int) -> bool:
    """Whether the dX kernel also computes dS and dB's partials (dY read once, 3 launches) rather than the dy
    kernel (dY read twice, 4 launches). Its partials are one [N, r] fp32 block per row block of at least 64
    rows on a GPU, written and read back: at most 8 r / 64 bytes per element of dY, no more than the second
    read of dY they replace while r <= 8 x dY's element size (16 for 16-bit dY, 32 for fp32). Above that,
    the dy kernel's partials (at most 16 row chunks) cost less than reading dY again. The same rule under
    the interpreter, so the CPU tests take the GPU's path."""
    return rank <= 8 * dy_element_size


def lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (dX [M, K] or None, dA [r, K], dB [N, r]) in the dtypes of x, A and B.

    grad_y: [M, N]; x: [M, K]; s: [M, r] fp32 (from the forward). dW and db are left to the caller.
    """
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else None
    if M == 0:
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    device = x.device
    seed_arg, has_dropout, p_drop, inv_keep = _dropout_args(seed, dropout_p, s)
    block_r = rank_block(R)
    precision = fp32_precision()
    lora_fp32 = dot_in_fp32(grad_y.dtype, lora_a.dtype, lora_b.dtype)
    block_m, block_n = _row_block(), _col_block()

    ds = torch.empty((M, R), device=device, dtype=torch.float32)
    grad_b = torch.empty((N, R), device=device, dtype=lora_b.dtype)
    block = _row_block()
    once = need_dx and _reads_dy_once(R, grad_y.element_size())
    if once:
        # One read of dY: the dX kernel's loop over N also accumulates dS (whole, per row block, in
        # registers) and writes dB's partials, one [N, r] fp32 block per row block of its autotuned BLOCK_M
        # (at least _dx_min_rows(), so the workspace is sized for that) and the count to `chunks`.
        db_part = torch.empty((triton.cdiv(M, _dx_min_rows()), N, R), device=device, dtype=torch.float32)
        chunks = torch.empty((1,), device=device, dtype=torch.int32)
    else:
        # dS and dB from one read of dY by a kernel of their own: row chunks x column blocks, partial sums in
        # fp32 workspaces written once each (at most 16 row chunks), then reduced in a fixed order
        # (deterministic) and scaled by one launch; the dX kernel (if any) reads dY again for its GEMM.
        dy_block_m = _dy_row_block(grad_y.dtype, precision)
        n_chunks, rows_per_chunk = _chunks(M, dy_block_m, 16)
        n_splits = triton.cdiv(N, block_n)
        ds_part = torch.empty((n_splits, M, R), device=device, dtype=torch.float32)
        db_part = torch.empty((n_chunks, N, R), device=device, dtype=torch.float32)
        _lora_bwd_dy_kernel[(n_chunks, n_splits)](
            grad_y, lora_b, s, ds_part, db_part,
            M, N, R, rows_per_chunk,
            grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1),
            LORA_FP32=lora_fp32, PRECISION=precision,
            BLOCK_M=dy_block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=_DY_WARPS,
        )
        row_programs = triton.cdiv(M, block)
        _lora_bwd_reduce_kernel[(row_programs + triton.cdiv(N, block),)](
            ds_part, ds, db_part, grad_b, ds,
            M, N, R, n_splits, n_chunks, row_programs, M * R, N * R,
            grad_b.stride(0), grad_b.stride(1),
            float(scaling),
            CHUNKS_ON_DEVICE=False, BLOCK=block, BLOCK_R=block_r,
        )
        chunks = ds  # never read with DS_READY
    if need_dx:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
        _lora_bwd_dx_kernel[grid](
            grad_y, weight, lora_b, s, lora_a, dx, ds, db_part, chunks, seed_arg,
            M, N, K, R, m_bucket(M),
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            lora_b.stride(0), lora_b.stride(1), lora_a.stride(0), lora_a.stride(1), dx.stride(0), dx.stride(1),
            float(scaling), p_drop, inv_keep,
            HAS_DROPOUT=has_dropout, BASE_FP32=dot_in_fp32(grad_y.dtype, weight.dtype),
            LORA_FP32=lora_fp32, PRECISION=precision, BLOCK_R=block_r, USE_TMA=_use_tma(grad_y, weight),
            DS_READY=not once,
        )
    if once:
        # dB = sum over row blocks, in a fixed order (deterministic); dS is already whole and scaled.
        _lora_bwd_reduce_kernel[(triton.cdiv(N, block),)](
            ds, ds, db_part, grad_b, chunks,
            M, N, R, 0, 0, 0, 0, N * R,
            grad_b.stride(0), grad_b.stride(1),
            float(scaling),
            CHUNKS_ON_DEVICE=True, BLOCK=block, BLOCK_R=block_r,
        )

    # dA in one pass over x: a program per column block sums over all rows in registers and writes dA in
    # the adapter's dtype. 32-column blocks give a 4096-wide layer 128 programs.
    block_k = 16 if interpreting() else 32
    grad_a = torch.empty((R, K), device=device, dtype=lora_a.dtype)
    _lora_bwd_da_kernel[(triton.cdiv(K, block_k),)](
        x, ds, grad_a, seed_arg,
        M, K, R,
        x.stride(0), x.stride(1), grad_a.stride(0), grad_a.stride(1),
        p_drop, inv_keep,
        HAS_DROPOUT=has_dropout, LORA_FP32=dot_in_fp32(x.dtype, lora_a.dtype), PRECISION=precision,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
    )
    return dx, grad_a, grad_b
