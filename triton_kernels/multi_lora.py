"""Batched multi-LoRA kernels and launchers: every row picks its own adapter. Imports triton and torch only.

Shapes: X [M, K], W [N, K], A [L, R, K], B [L, N, R] (R = r_max), adapter_ids [M] (-1 = base only),
scalings [L] fp32, ranks [L] int32 (an adapter's rows use A[i, :ranks[i]], B[i, :, :ranks[i]]).

Two forward paths, chosen from M alone (a shape, never the ids' values, so nothing syncs):
  decode  (small M)  rows stay in place; each row gathers its adapter by id.
      shrink   S[t] = X[t] @ A[i].T              one program per (row, rank chunk), a gathered GEMV
      fused    Y = X @ W.T + b + s_i S[t] @ B[i].T  base GEMM tiles; the expand is gathered per row in the
                                                    epilogue, looping only up to the tile's largest rank
  prefill (large M)  rows grouped by adapter: a stable sort of the ids and segment offsets, built on the
                     device with torch ops (:func:`build_segments`), so both products are dense
                     tensor-core tiles:
      shrink   S[rows] = X[rows] @ A[i, chunk].T   one program per (tile of one adapter's rows, rank
                                                    chunk), from the table of BLOCK_M tiles that never
                                                    straddle two adapters
      fused    Y[rows] as above over dense BLOCK_M tiles of the sorted rows (full base tiles however
               ragged the requests); the epilogue runs a [BLOCK_M, r] x [r, BLOCK_N] product per adapter
               present in the tile, the other rows masked
  The tile table has a fixed length cdiv(M, BLOCK_M) + min(L + 1, M) (an upper bound on the tiles of any
  grouping), so grids never depend on the ids and a step can be captured in a CUDA graph.
Backward (the segment table always, the forward's path for the row-wise kernels):
  shrink   dS[t] = s_i dY[t] @ B[i]              (the forward's shrink kernel, B in place of A)
  fused    dX = dY @ W + dS[t] @ A[i]            (the forward's fused kernel, W transposed by strides)
  grad     dA[i] = dS[seg i].T @ X[seg i], dB[i] = s_i dY[seg i].T @ S[seg i]   one program per
           (adapter, column tile, rank chunk), summing its segment's rows in a fixed order; with few
           adapters each segment is cut into a few parts (fp32 partials summed in a fixed order) to fill
           the device. Deterministic, no atomics.
The products with S or dS in the prefill epilogue and in grad run on tensor cores in the activation dtype
when activations and adapters are 16-bit (``_common.lowrank_dot``), in fp32 otherwise.
Work beyond an adapter's rank is skipped: rank chunks past it run no loop iterations and load nothing.
S stays in the original row order, so the saved intermediate does not depend on the path.

Ids outside [-1, L) act as -1 inside the kernels (clamped addresses, masked loads): whatever the ids
hold, nothing reads out of bounds. Ranks are clamped to [0, R] the same way. Offsets in int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    autotune,
    dot_in_fp32,
    fp32_precision,
    gemm_k_loop,
    grouped_tile,
    interpreting,
    lowrank_dot,
    m_bucket,
    mma,
    register_budget,
)
from ._segments import Segments, build_segments

__all__ = ["DECODE_MAX_ROWS", "Segments", "build_segments", "multi_lora_forward", "multi_lora_backward"]

# Up to this many rows the forward gathers per row (decode); above it, rows are grouped by adapter.
DECODE_MAX_ROWS = 64
PATHS = ("auto", "decode", "prefill")


def _decode_configs() -> list[triton.Config]:
    """Decode: at most DECODE_MAX_ROWS rows, so small BLOCK_M and many column tiles to spread W's read.
    (32 x 64 with BLOCK_K 64, not 128: with fp16 that one put 8 B in local memory at 96 registers; ptxas -v,
    sm_90a, triton 3.6.)"""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP": 4}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 64, 4, 4),
            (32, 128, 64, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
        ]
    ]


def _dense_configs() -> list[triton.Config]:
    """Prefill fused kernel: dense tiles of the sorted rows, so BLOCK_M is tuned with the rest. (No 128 x 256
    tile, and 128 x 128 only with 8 warps: with the per-adapter epilogue loop the others spill in fp32, TF32
    included, on sm_90 with triton 3.6 and 3.9.) The last two are for fp32 adapters with tf32x3 (within
    ``_common.register_budget``): BLOCK_K 64 beside 16-bit activations, 32 beside fp32 ones."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP": 4}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 128, 4, 3),
            (64, 64, 64, 4, 4), (64, 64, 32, 4, 4),
        ]
    ]


def segment_block(m: int) -> int:
    """Rows per tile of the segment table (the prefill shrink's BLOCK_M), from M alone: a tile holds one
    adapter's rows, so each adapter present costs at most one partial tile there (cheap: the shrink's
    output has only R columns). The fused base GEMM tiles the sorted rows densely instead."""
    if interpreting():
        return 16
    return 128 if m >= 2048 else 64


def _rank_chunk(r_max: int) -> int:
    """Rank columns per shrink/grad program: adapters of smaller rank skip the chunks past their rank."""
    return 16 if interpreting() else min(32, max(16, triton.next_power_of_2(r_max)))


# Rank columns per step of the prefill epilogue loop (``tl.dot``'s minimum inner size).
_EXPAND_CHUNK = 16



# --------------------------------------------------------------------------------------------------------
# segment metadata (torch ops on the device: no host sync, shapes from M and L only)
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def adapter_rank(RANKS, adapter, L, R):
    """(adapter clamped into [0, L), rank clamped into [0, R] or 0 when ``adapter`` is not in [0, L))."""
    ok = (adapter >= 0) & (adapter < L)
    safe = tl.where(ok, adapter, 0)
    rank = tl.load(RANKS + safe).to(tl.int64)
    rank = tl.where(ok, tl.minimum(tl.maximum(rank, 0), R), 0)
    return safe, rank


@triton.jit
def _base_tile(
    IN, W, rows, row_ok, cols, col_ok, J,
    stride_im, stride_ij, stride_wj, stride_wc,
    BASE_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """sum_j IN[rows, j] * W~[j, cols] as an fp32 [BLOCK_M, BLOCK_N] tile."""
    return gemm_k_loop(IN, W, rows, row_ok, cols, col_ok, J, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                       stride_im, stride_ij, stride_wc, stride_wj, BASE_FP32, PRECISION, BLOCK_K)


@triton.jit
def gemv_rank_chunk(IN, F, row, adapter, rank, chunk, J, stride_im, stride_ij, stride_fl, stride_fr, stride_fj,
                    BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """(acc [BLOCK_R] fp32 = sum_j IN[row, j] F[adapter, r, j] for the chunk's ranks r < rank, else 0; the
    chunk's ranks; their mask r < rank). A gathered GEMV: memory-bound, so it loads nothing past the rank."""
    ranks = chunk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rank_ok = ranks < rank
    j_end = tl.where(chunk * BLOCK_R < rank, J, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for j0 in range(0, j_end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = js < J
        v = tl.load(IN + row * stride_im + js * stride_ij, mask=j_ok, other=0.0).to(tl.float32)
        f = tl.load(F + adapter * stride_fl + ranks[:, None] * stride_fr + js[None, :] * stride_fj,
                    mask=rank_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(f * v[None, :], axis=1)
    return acc, ranks, rank_ok


@triton.jit
def segment_tile_rows(PERM, TILES, tile, n_tiles, M, BLOCK_M: tl.constexpr):
    """Tile ``tile`` of the segment table: (its adapter id as stored, or -1; its rows in x [BLOCK_M] int64;
    their mask; whether the tile has any row: padding tiles have none)."""
    adapter = tl.load(TILES + tile)
    row_start = tl.load(TILES + n_tiles + tile)
    row_end = tl.minimum(tl.load(TILES + 2 * n_tiles + tile), M)
    sorted_rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = sorted_rows < row_end
    rows = tl.load(PERM + sorted_rows, mask=row_ok, other=0)
    return adapter, rows, row_ok, row_start < row_end


@triton.jit
def tile_shrink(IN, F, rows, row_ok, adapter, rank, chunk, J, stride_im, stride_ij, stride_fl, stride_fr,
                stride_fj, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """As :func:`gemv_rank_chunk` for a tile of rows that share one adapter: a [BLOCK_M, BLOCK_R] GEMM tile."""
    ranks = chunk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rank_ok = ranks < rank
    j_end = tl.where(chunk * BLOCK_R < rank, J, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j0 in range(0, j_end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = js < J
        v = tl.load(IN + rows[:, None] * stride_im + js[None, :] * stride_ij,
                    mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        f_t = tl.load(F + adapter * stride_fl + ranks[None, :] * stride_fr + js[:, None] * stride_fj,
                      mask=j_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = mma(v, f_t, acc, DOT_FP32, PRECISION)
    return acc, ranks, rank_ok


@triton.jit
def _multi_lora_shrink_decode_kernel(
    IN, F, IDS, RANKS, SCALES, T,
    M, J, R, L, j_split,
    stride_im, stride_ij, stride_fl, stride_fr, stride_fj,
    HAS_SCALE: tl.constexpr, N_CHUNKS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """T[p, m, r] = scale_i * sum_{j in part p} IN[m, j] F[i, r, j] with i = ids[m], zero for r >= rank_i or
    i = -1; part p covers j in [p * j_split, (p + 1) * j_split) (the caller sums the parts).

    One program per (row, (part, rank chunk)): a gathered GEMV (:func:`gemv_rank_chunk`).
    """
    row = tl.program_id(0).to(tl.int64)
    part, chunk = tl.program_id(1) // N_CHUNKS, tl.program_id(1) % N_CHUNKS
    j0 = part.to(tl.int64) * j_split
    adapter, rank = adapter_rank(RANKS, tl.load(IDS + row).to(tl.int64), L, R)
    acc, ranks, rank_ok = gemv_rank_chunk(IN + j0 * stride_ij, F + j0 * stride_fj, row, adapter, rank, chunk,
                                          tl.minimum(J - j0, j_split), stride_im, stride_ij,
                                          stride_fl, stride_fr, stride_fj, BLOCK_J, BLOCK_R)
    if HAS_SCALE:
        acc = tl.where(rank_ok, acc * tl.load(SCALES + adapter), 0.0)
    tl.store(T + (part.to(tl.int64) * M + row) * R + ranks, acc, mask=ranks < R)


@triton.jit
def _multi_lora_shrink_segment_kernel(
    IN, F, PERM, TILES, RANKS, SCALES, T,
    M, J, R, L, n_tiles,
    stride_im, stride_ij, stride_fl, stride_fr, stride_fj,
    HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """As the decode shrink, over one tile of rows that share an adapter (:func:`tile_shrink`)."""
    adapter, rows, row_ok, _ = segment_tile_rows(PERM, TILES, tl.program_id(0).to(tl.int64), n_tiles, M, BLOCK_M)
    adapter, rank = adapter_rank(RANKS, adapter, L, R)
    acc, ranks, rank_ok = tile_shrink(IN, F, rows, row_ok, adapter, rank, tl.program_id(1), J, stride_im,
                                      stride_ij, stride_fl, stride_fr, stride_fj, DOT_FP32, PRECISION,
                                      BLOCK_M, BLOCK_J, BLOCK_R)
    if HAS_SCALE:
        acc = tl.where(rank_ok[None, :], acc * tl.load(SCALES + adapter), 0.0)
    tl.store(T + rows[:, None] * R + ranks[None, :], acc, mask=row_ok[:, None] & (ranks < R)[None, :])


@autotune(_decode_configs(), ["M_BUCKET", "C", "J", "R", "HAS_BIAS", "HAS_SCALE", "BASE_FP32", "PRECISION"],
          budget=lambda args: register_budget(args["PRECISION"], fp32_loop=args["BASE_FP32"]))
@triton.jit
def _multi_lora_fused_decode_kernel(
    IN, W, BIAS, T, E, IDS, RANKS, SCALES, OUT,
    M, C, J, R, L, M_BUCKET,
    stride_im, stride_ij, stride_wj, stride_wc, stride_el, stride_er, stride_ec, stride_om, stride_oc,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BASE_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """OUT[m, c] = sum_j IN[m, j] W~[j, c] + bias[c] + scale_i sum_{r < rank_i} T[m, r] E[i, r, c].

    Rows in place, each gathering its adapter's E rows in the epilogue; the rank loop stops at the
    largest rank in the tile and rows past their own rank load nothing.
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP)
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < C
    acc = _base_tile(IN, W, rows, row_ok, cols, col_ok, J, stride_im, stride_ij, stride_wj, stride_wc,
                     BASE_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    ids = tl.load(IDS + rows, mask=row_ok, other=-1).to(tl.int64)
    ok = (ids >= 0) & (ids < L)
    adapters = tl.where(ok, ids, 0)
    row_ranks = tl.load(RANKS + adapters, mask=ok, other=0).to(tl.int64)
    row_ranks = tl.where(ok, tl.minimum(tl.maximum(row_ranks, 0), R), 0)
    if HAS_SCALE:
        row_scales = tl.load(SCALES + adapters, mask=ok, other=0.0)
    # Accumulate straight into the base tile: no second [BLOCK_M, BLOCK_N] register tile. The per-row
    # values are [BLOCK_M, 1] columns: with 1-D row vectors inside this loop, triton 3.6's layout pass
    # fails on some tiles ("mask type matches ptr type", seen compiling BLOCK_M 32 x BLOCK_K 128).
    row_ranks_2d = row_ranks[:, None]
    t_ptrs = T + rows[:, None] * R
    e_ptrs = E + adapters[:, None] * stride_el + cols[None, :] * stride_ec
    if HAS_SCALE:
        row_scales_2d = row_scales[:, None]
    for r in range(0, tl.max(row_ranks, axis=0)):
        r_ok = r < row_ranks_2d
        t = tl.load(t_ptrs + r, mask=r_ok, other=0.0)
        if HAS_SCALE:
            t = tl.where(r_ok, t * row_scales_2d, 0.0)
        e = tl.load(e_ptrs + r * stride_er, mask=r_ok & col_ok[None, :], other=0.0).to(tl.float32)
        acc += t * e
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_oc, acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@autotune(
    _dense_configs(), ["M_BUCKET", "C", "J", "R", "HAS_BIAS", "HAS_SCALE", "BASE_FP32", "PRECISION", "EXPAND_FP32"],
    budget=lambda args: register_budget(args["PRECISION"], fp32_loop=args["BASE_FP32"],
                                        fp32_epilogue=args["EXPAND_FP32"]),
)
@triton.jit
def _multi_lora_fused_segment_kernel(
    IN, W, BIAS, T, E, PERM, IDS, RANKS, SCALES, OUT,
    M, C, J, R, L, M_BUCKET,
    stride_im, stride_ij, stride_wj, stride_wc, stride_el, stride_er, stride_ec, stride_om, stride_oc,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BASE_FP32: tl.constexpr, PRECISION: tl.constexpr,
    EXPAND_FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """As the decode fused kernel over dense tiles of the rows sorted by adapter (PERM, so each adapter's
    rows are contiguous): full base tiles whatever the request lengths, and an epilogue that runs one
    dense [BLOCK_M, rank] x [rank, BLOCK_N] product per adapter present in the tile (rows of the others
    masked), usually one or two."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP)
    sorted_rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = sorted_rows < M
    rows = tl.load(PERM + sorted_rows, mask=row_ok, other=0)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    acc = _base_tile(IN, W, rows, row_ok, cols, col_ok, J, stride_im, stride_ij, stride_wj, stride_wc,
                     BASE_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # Each row's adapter, or L for none (ids outside [0, L) act as -1); non-decreasing along the tile.
    keys = tl.load(IDS + rows, mask=row_ok, other=-1).to(tl.int64)
    keys = tl.where(row_ok & (keys >= 0) & (keys < L), keys, L)
    adapter = tl.min(keys, axis=0)
    while adapter < L:
        mine = keys == adapter
        _, rank = adapter_rank(RANKS, adapter, L, R)
        if HAS_SCALE:
            scale = tl.load(SCALES + adapter)
        for r0 in range(0, rank, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            r_ok = ranks < rank
            t = tl.load(T + rows[:, None] * R + ranks[None, :], mask=mine[:, None] & r_ok[None, :], other=0.0)
            if HAS_SCALE:
                t = t * scale
            e = tl.load(E + adapter * stride_el + ranks[:, None] * stride_er + cols[None, :] * stride_ec,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = lowrank_dot(t, e, acc, EXPAND_FP32, PRECISION)
        adapter = tl.min(tl.where(keys > adapter, keys, L), axis=0)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_oc, acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _multi_lora_grad_kernel(
    T, IN, PERM, BOUNDS, RANKS, SCALES, G,
    M, C, R, L,
    stride_im, stride_ic, stride_gs, stride_gl, stride_gr, stride_gc,
    HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """G[s, i, r, c] = scale_i * sum_{t in part s of segment i} T[t, r] IN[t, c] (zero for r >= rank_i).

    One program per (adapter, column tile, rank chunk x split) walks its part of the adapter's rows in
    sorted order: each output element is written once, summed in a fixed order. With SPLITS > 1 (few
    adapters: more programs to fill the device) the caller sums the parts in a fixed order too.
    """
    adapter = tl.program_id(0).to(tl.int64)
    tile_c = tl.program_id(1)
    chunk = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    adapter, rank = adapter_rank(RANKS, adapter, L, R)
    seg_start = tl.load(BOUNDS + adapter + 1)
    seg_end = tl.minimum(tl.load(BOUNDS + (L + 1) + adapter + 1), M)
    if SPLITS > 1:
        part = tl.cdiv(tl.cdiv(seg_end - seg_start, SPLITS), BLOCK_M) * BLOCK_M
        seg_start = tl.minimum(seg_start + split * part, seg_end)
        seg_end = tl.minimum(seg_start + part, seg_end)
    cols = tile_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ranks = chunk * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rank_ok = ranks < rank
    row_end = tl.where(chunk * BLOCK_R < rank, seg_end, seg_start)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(seg_start, row_end, BLOCK_M):
        sorted_rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = sorted_rows < row_end
        rows = tl.load(PERM + sorted_rows, mask=row_ok, other=0)
        t = tl.load(T + rows[:, None] * R + ranks[None, :],
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        v = tl.load(IN + rows[:, None] * stride_im + cols[None, :] * stride_ic,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = lowrank_dot(tl.trans(t), v, acc, DOT_FP32, PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(SCALES + adapter)
    # Zero past the rank even where a non-finite activation made 0 * inf = NaN in the (unused) padding.
    acc = tl.where(rank_ok[:, None], acc, 0.0)
    tl.store(G + split.to(tl.int64) * stride_gs + adapter * stride_gl + ranks[:, None] * stride_gr
             + cols[None, :] * stride_gc, acc.to(G.dtype.element_ty),
             mask=(ranks < R)[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# launchers (tensors already checked: ids [M] int32/int64, scalings [L] fp32, ranks [L] int32, same device)
# --------------------------------------------------------------------------------------------------------


def _use_decode(path: str, M: int) -> bool:
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    return path == "decode" or (path == "auto" and M <= DECODE_MAX_ROWS)


def _shrink(inp, f, f_strides, ids, segments, ranks, scales, R, L, decode):
    """T [M, R] fp32 = scale_i * inp[t] @ F[i].T, F[i, r, j] addressed by ``f_strides`` (l, r, j)."""
    M, J = inp.shape
    t = torch.empty((M, R), device=inp.device, dtype=torch.float32)
    block_r = _rank_chunk(R)
    has_scale = scales is not None
    scales = scales if has_scale else t
    if decode:
        n_chunks, block_j = triton.cdiv(R, block_r), 16 if interpreting() else 64
        parts, j_split = decode_parts(inp, J, M * n_chunks, block_j)
        # Several parts: fp32 partials [parts, M, R], then one sum over the parts (a fixed order).
        partial = t if parts == 1 else torch.empty((parts, M, R), device=inp.device, dtype=torch.float32)
        _multi_lora_shrink_decode_kernel[(M, parts * n_chunks)](
            inp, f, ids, ranks, scales, partial, M, J, R, L, j_split,
            inp.stride(0), inp.stride(1), *f_strides,
            HAS_SCALE=has_scale, N_CHUNKS=n_chunks, BLOCK_J=block_j, BLOCK_R=block_r,
        )
        if parts > 1:
            torch.sum(partial, dim=0, out=t)
    else:
        n_tiles = segments.tiles.shape[1]
        _multi_lora_shrink_segment_kernel[(n_tiles, triton.cdiv(R, block_r))](
            inp, f, segments.perm, segments.tiles, ranks, scales, t, M, J, R, L, n_tiles,
            inp.stride(0), inp.stride(1), *f_strides,
            HAS_SCALE=has_scale, DOT_FP32=dot_in_fp32(inp.dtype, f.dtype), PRECISION=fp32_precision(),
            BLOCK_M=segments.block_m, BLOCK_J=16 if interpreting() else 64, BLOCK_R=block_r,
        )
    return t


def _fused(inp, w, w_strides, bias, t, e, e_strides, ids, segments, ranks, scales, out, L, decode):
    """out [M, C] = inp @ W~ + bias + scale_i * t[row] @ E[i]; W~[j, c] and E[i, r, c] by strides."""
    M, J = inp.shape
    C, R = out.shape[1], t.shape[1]
    has_scale = scales is not None
    common = dict(
        HAS_BIAS=bias is not None, HAS_SCALE=has_scale,
        BASE_FP32=dot_in_fp32(inp.dtype, w.dtype), PRECISION=fp32_precision(),
    )
    bias = bias if bias is not None else out
    scales = scales if has_scale else t
    strides = (inp.stride(0), inp.stride(1), *w_strides, *e_strides, out.stride(0), out.stride(1))
    if decode:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)
        _multi_lora_fused_decode_kernel[grid](
            inp, w, bias, t, e, ids, ranks, scales, out, M, C, J, R, L, m_bucket(M), *strides, **common,
        )
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)
        _multi_lora_fused_segment_kernel[grid](
            inp, w, bias, t, e, segments.perm, ids, ranks, scales, out, M, C, J, R, L, m_bucket(M), *strides,
            EXPAND_FP32=dot_in_fp32(inp.dtype, e.dtype), BLOCK_R=_EXPAND_CHUNK, **common,
        )


@functools.lru_cache(maxsize=8)
def _device_programs(device_index: int) -> int:
    """Programs that fill the device: a few per SM (the interpreter: a small number, to test splitting)."""
    if interpreting():
        return 16
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_parts(t: torch.Tensor, J: int, programs: int, block_j: int) -> tuple[int, int]:
    """(parts, length of a part: a multiple of block_j) that split the reduction over J of a decode GEMV
    grid of ``programs`` programs until the grid fills ``t``'s device, each part at least one block long."""
    device_programs = _device_programs(t.device.index if t.device.type == "cuda" else 0)
    parts = max(1, min(triton.cdiv(device_programs, max(programs, 1)), J // block_j))
    if parts == 1:
        return 1, J
    j_split = triton.cdiv(triton.cdiv(J, parts), block_j) * block_j
    return triton.cdiv(J, j_split), j_split


def _segment_grad(t, inp, segments, ranks, scales, shape, dtype, layout):
    """Per-adapter G[i, r, c] = scale_i sum_{rows of i} T[row, r] inp[row, c], returned in ``shape``
    ([L, R, C] for layout (0, 1, 2), [L, C, R] for (0, 2, 1)) and ``dtype``."""
    M, C = inp.shape
    L, R = ranks.shape[0], t.shape[1]
    block_r, block_c = _rank_chunk(R), 16 if interpreting() else 64
    block_m = 16 if interpreting() else 64
    n_col_tiles, n_chunks = triton.cdiv(C, block_c), triton.cdiv(R, block_r)
    programs = L * n_col_tiles * n_chunks
    device_index = inp.device.index if inp.device.type == "cuda" else 0
    # Split each adapter's rows only when there are too few programs, and never past one block per part.
    splits = max(1, min(8, triton.cdiv(_device_programs(device_index), programs), triton.cdiv(M, block_m)))
    if splits == 1:
        out = torch.empty(shape, device=inp.device, dtype=dtype)
        strides = (0, out.stride(layout[0]), out.stride(layout[1]), out.stride(layout[2]))
    else:
        out = torch.empty((splits, L, R, C), device=inp.device, dtype=torch.float32)
        strides = out.stride()
    has_scale = scales is not None
    _multi_lora_grad_kernel[(L, n_col_tiles, n_chunks * splits)](
        t, inp, segments.perm, segments.bounds, ranks, scales if has_scale else t, out, M, C, R, L,
        inp.stride(0), inp.stride(1), *strides,
        HAS_SCALE=has_scale, DOT_FP32=dot_in_fp32(inp.dtype, dtype), PRECISION=fp32_precision(), SPLITS=splits,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r,
    )
    if splits == 1:
        return out
    summed = out.sum(0)  # fixed-order reduction over the parts: deterministic
    if layout == (0, 2, 1):
        summed = summed.transpose(1, 2)
    return summed.to(dtype).contiguous()


def multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    path: str = "auto",
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (Y [M, N] in x's dtype, S [M, R] fp32, unscaled, zero past each row's rank).

    x: [M, K] any strides; weight [N, K]; lora_a [L, R, K]; lora_b [L, N, R]; adapter_ids [M] contiguous;
    scalings [L] fp32; ranks [L] int32. ``path``: "auto" | "decode" | "prefill". ``segments``: the ids'
    table with ``segment_block(M)``-row tiles when already built (a ``LoRABatch``'s), else built here.
    """
    M, K = x.shape
    N = weight.shape[0]
    L, R = lora_a.shape[:2]
    decode = _use_decode(path, M)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, torch.empty((0, R), device=x.device, dtype=torch.float32)
    if decode:
        segments = None
    elif segments is None:
        segments = build_segments(adapter_ids, L, segment_block(M))
    a_strides = (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2))
    s = _shrink(x, lora_a, a_strides, adapter_ids, segments, ranks, None, R, L, decode)
    _fused(x, weight, (weight.stride(1), weight.stride(0)), bias, s, lora_b,
           (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
           adapter_ids, segments, ranks, scalings, y, L, decode)
    return y, s


def multi_lora_backward(
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
    path: str = "auto",
    segments: Segments | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (dX [M, K] or None, dA [L, R, K], dB [L, N, R]) in the dtypes of x, A and B.

    grad_y: [M, N]; s: [M, R] fp32 from the forward. Each adapter's dA/dB sums only its own rows; slots
    no row uses get zeros. dW and db are left to the caller. ``segments``: as in :func:`multi_lora_forward`.
    """
    M, K = x.shape
    L, R = lora_a.shape[:2]
    device = x.device
    decode = _use_decode(path, M)
    dx = torch.empty((M, K), device=device, dtype=x.dtype) if need_dx else None
    if M == 0:
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    if segments is None:
        segments = build_segments(adapter_ids, L, segment_block(M))
    row_segments = None if decode else segments
    # dS = s_i * dY @ B[i]: the shrink with F[i, r, j=n] = B[i, n, r].
    ds = _shrink(grad_y, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
                 adapter_ids, row_segments, ranks, scalings, R, L, decode)
    if need_dx:
        # dX = dY @ W + dS @ A[i]: the fused kernel with W~[j=n, c=k] = W[n, k], E = A.
        _fused(grad_y, weight, (weight.stride(0), weight.stride(1)), None, ds, lora_a,
               (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)),
               adapter_ids, row_segments, ranks, None, dx, L, decode)
    # dA[i] = dS[seg].T @ X[seg]: G[i, r, c=k].
    grad_a = _segment_grad(ds, x, segments, ranks, None, lora_a.shape, lora_a.dtype, (0, 1, 2))
    # dB[i][n, r] = s_i * sum_t dY[t, n] S[t, r]: G[i, r, c=n], stored through dB's [L, N, R] layout.
    grad_b = _segment_grad(s, grad_y, segments, ranks, scalings, lora_b.shape, lora_b.dtype, (0, 2, 1))
    return dx, grad_a, grad_b
