"""The serving pieces' kernels and launchers: a LoRA shrink and expand-add that a serving stack calls around
its own base GEMM. Imports triton and torch only.

Shapes: X [M, K]; each slice j of A [L, R, K] (shrink) or B [L, N_j, R] (expand), any strides (a view such
as ``lora_a[layer]`` of a stacked per-layer tensor reads in place); adapter_ids [M] (-1 = no adapter);
ranks [L] int32; scalings [L] fp32.
  shrink      S[j, t, r] = X[t] @ A_j[i, r]     (r < rank_i, else 0; rows with i = -1 give 0), S fp32
  expand-add  Y[t, o_j + n] += scale_i * sum_{r < rank_i} S[j, t, r] B_j[i, n, r]   (rows with i = -1 and
              ids outside [0, L) are not written), o_j = offset + N_0 + ... + N_(j-1)
Up to ``MAX_SLICES`` slices (merged projections such as q/k/v, or gate/up) run in one launch: the slice
is the grid's last axis and each program picks its slice's pointer and strides by index, so no table of
pointers is built on the device (nothing to copy from the host, nothing to cache across CUDA-graph replays).

Two paths per piece, chosen by the caller from M alone (as ``multi_lora``'s):
  decode  one program per (row, rank chunk | column tile, slice): rows gather their adapter by id. A few
          rows leave most SMs idle, so the shrink also splits K (fp32 partials summed in a fixed order:
          deterministic) and the expand narrows its column tiles until the grid fills the device.
  segment one program per (segment tile, rank chunk | column tile, slice) over the segment table of
          ``multi_lora.build_segments`` (tiles of rows that share one adapter): dense tensor-core tiles.
Work past an adapter's rank is skipped (no padded compute); ids outside [-1, L) act as -1; offsets int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import multi_lora as _multi_lora
from ._common import dot_in_fp32, fp32_precision, interpreting, lowrank_dot
from .multi_lora import (
    _EXPAND_CHUNK,
    Segments,
    _rank_chunk,
    adapter_rank,
    gemv_rank_chunk,
    segment_tile_rows,
    tile_shrink,
)

__all__ = ["MAX_SLICES", "lora_shrink", "lora_expand_add"]

# Slices per launch; longer lists run in groups of this many.
MAX_SLICES = 4
# Warps of the segment kernels: their int64 row addresses of 64- or 128-row tiles spill at 4 warps on sm_90.
_SEGMENT_WARPS = 8


@triton.jit
def _pick(index, v0, v1, v2, v3):
    """v_index for index in 0..3: one slice's pointer or stride, selected without a pointer table."""
    out = tl.where(index == 1, v1, v0)
    out = tl.where(index == 2, v2, out)
    return tl.where(index == 3, v3, out)


@triton.jit
def _lora_shrink_decode_kernel(
    X, A0, A1, A2, A3, IDS, RANKS, S,
    M, K, R, L, k_split,
    stride_xm, stride_xk, stride_sp, stride_sj, stride_sm, stride_sr,
    sl0, sr0, sk0, sl1, sr1, sk1, sl2, sr2, sk2, sl3, sr3, sk3,
    N_CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[p, j, m, r] = sum_{k in part p} X[m, k] A_j[i, r, k] with i = ids[m]: one program per (row,
    (K part, rank chunk), slice); part p covers k in [p * k_split, (p + 1) * k_split)."""
    row = tl.program_id(0).to(tl.int64)
    part, chunk = tl.program_id(1) // N_CHUNKS, tl.program_id(1) % N_CHUNKS
    piece = tl.program_id(2)
    k0 = part.to(tl.int64) * k_split
    stride_ak = _pick(piece, sk0, sk1, sk2, sk3)
    adapter, rank = adapter_rank(RANKS, tl.load(IDS + row).to(tl.int64), L, R)
    acc, ranks, _ = gemv_rank_chunk(
        X + k0 * stride_xk, _pick(piece, A0, A1, A2, A3) + k0 * stride_ak, row, adapter, rank, chunk,
        tl.minimum(K - k0, k_split), stride_xm, stride_xk,
        _pick(piece, sl0, sl1, sl2, sl3), _pick(piece, sr0, sr1, sr2, sr3), stride_ak, BLOCK_K, BLOCK_R,
    )
    tl.store(S + part.to(tl.int64) * stride_sp + piece.to(tl.int64) * stride_sj + row * stride_sm
             + ranks * stride_sr, acc.to(S.dtype.element_ty), mask=ranks < R)


@triton.jit
def _lora_shrink_segment_kernel(
    X, A0, A1, A2, A3, PERM, TILES, RANKS, S,
    M, K, R, L, n_tiles,
    stride_xm, stride_xk, stride_sj, stride_sm, stride_sr,
    sl0, sr0, sk0, sl1, sr1, sk1, sl2, sr2, sk2, sl3, sr3, sk3,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """As the decode shrink over one segment tile (rows of one adapter): one program per (tile, rank chunk,
    slice), a [BLOCK_M, BLOCK_R] tensor-core tile."""
    piece = tl.program_id(2)
    adapter, rows, row_ok, _ = segment_tile_rows(PERM, TILES, tl.program_id(0).to(tl.int64), n_tiles, M, BLOCK_M)
    adapter, rank = adapter_rank(RANKS, adapter, L, R)
    acc, ranks, _ = tile_shrink(
        X, _pick(piece, A0, A1, A2, A3), rows, row_ok, adapter, rank, tl.program_id(1), K, stride_xm, stride_xk,
        _pick(piece, sl0, sl1, sl2, sl3), _pick(piece, sr0, sr1, sr2, sr3), _pick(piece, sk0, sk1, sk2, sk3),
        DOT_FP32, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R,
    )
    tl.store(S + piece.to(tl.int64) * stride_sj + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
             acc.to(S.dtype.element_ty), mask=row_ok[:, None] & (ranks < R)[None, :])


@triton.jit
def _expand_slice(piece, B0, B1, B2, B3, n0, n1, n2, n3, o0, o1, o2, o3,
                  sl0, sn0, sr0, sl1, sn1, sr1, sl2, sn2, sr2, sl3, sn3, sr3):
    """Slice ``piece``'s (B pointer, N_j, first output column o_j, strides l, n, r)."""
    return (_pick(piece, B0, B1, B2, B3), _pick(piece, n0, n1, n2, n3), _pick(piece, o0, o1, o2, o3),
            _pick(piece, sl0, sl1, sl2, sl3), _pick(piece, sn0, sn1, sn2, sn3), _pick(piece, sr0, sr1, sr2, sr3))


@triton.jit
def _lora_expand_add_decode_kernel(
    Y, S, B0, B1, B2, B3, IDS, RANKS, SCALES,
    M, R, L,
    stride_ym, stride_yn, stride_sj, stride_sm, stride_sr,
    n0, n1, n2, n3, o0, o1, o2, o3,
    sl0, sn0, sr0, sl1, sn1, sr1, sl2, sn2, sr2, sl3, sn3, sr3,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y[m, o_j + n] += scale_i * sum_{r < rank_i} S[j, m, r] B_j[i, n, r]: one program per (row, column
    tile, slice) reads a [BLOCK_N, BLOCK_R] tile of B_j per rank chunk, the rank contiguous when B_j's is."""
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(2)
    B, N, col0, stride_bl, stride_bn, stride_br = _expand_slice(
        piece, B0, B1, B2, B3, n0, n1, n2, n3, o0, o1, o2, o3,
        sl0, sn0, sr0, sl1, sn1, sr1, sl2, sn2, sr2, sl3, sn3, sr3)
    adapter, rank = adapter_rank(RANKS, tl.load(IDS + row).to(tl.int64), L, R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    s_row = S + piece.to(tl.int64) * stride_sj + row * stride_sm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r_ok = ranks < rank
        s = tl.load(s_row + ranks * stride_sr, mask=r_ok, other=0.0).to(tl.float32)
        b = tl.load(B + adapter * stride_bl + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b * s[None, :], axis=1)
    # Rows without an adapter (or of rank 0) are not written at all.
    live = cols < tl.where(rank > 0, N, 0)
    y_ptrs = Y + row * stride_ym + (col0 + cols) * stride_yn
    y = tl.load(y_ptrs, mask=live, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * tl.load(SCALES + adapter)).to(Y.dtype.element_ty), mask=live)


@triton.jit
def _lora_expand_add_segment_kernel(
    Y, S, B0, B1, B2, B3, PERM, TILES, RANKS, SCALES,
    M, R, L, n_tiles,
    stride_ym, stride_yn, stride_sj, stride_sm, stride_sr,
    n0, n1, n2, n3, o0, o1, o2, o3,
    sl0, sn0, sr0, sl1, sn1, sr1, sl2, sn2, sr2, sl3, sn3, sr3,
    EXPAND_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """As the decode expand-add over one segment tile (rows of one adapter): one program per (tile, column
    tile, slice), a dense [BLOCK_M, rank] x [rank, BLOCK_N] product added to the gathered rows of Y."""
    piece = tl.program_id(2)
    B, N, col0, stride_bl, stride_bn, stride_br = _expand_slice(
        piece, B0, B1, B2, B3, n0, n1, n2, n3, o0, o1, o2, o3,
        sl0, sn0, sr0, sl1, sn1, sr1, sl2, sn2, sr2, sl3, sn3, sr3)
    adapter, rows, row_ok, _ = segment_tile_rows(PERM, TILES, tl.program_id(0).to(tl.int64), n_tiles, M, BLOCK_M)
    adapter, rank = adapter_rank(RANKS, adapter, L, R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    s_rows = S + piece.to(tl.int64) * stride_sj + rows[:, None] * stride_sm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r_ok = ranks < rank
        s = tl.load(s_rows + ranks[None, :] * stride_sr, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(B + adapter * stride_bl + ranks[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc = lowrank_dot(s, b, acc, EXPAND_FP32, PRECISION)
    live = row_ok[:, None] & (cols < tl.where(rank > 0, N, 0))[None, :]
    y_ptrs = Y + rows[:, None] * stride_ym + (col0 + cols)[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=live, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * tl.load(SCALES + adapter)).to(Y.dtype.element_ty), mask=live)


# --------------------------------------------------------------------------------------------------------
# launchers (tensors already checked: ids [M] int32/int64 contiguous, ranks [L] int32, scalings [L] fp32)
# --------------------------------------------------------------------------------------------------------


def _groups(slices: list[torch.Tensor]) -> list[tuple[int, list[torch.Tensor]]]:
    """(index of the first slice, up to MAX_SLICES slices) per launch."""
    return [(start, slices[start:start + MAX_SLICES]) for start in range(0, len(slices), MAX_SLICES)]


def _padded(values: list, fill) -> list:
    return values + [fill] * (MAX_SLICES - len(values))


def _slice_strides(group: list[torch.Tensor], order: tuple[int, int, int]) -> list[int]:
    """Each slice's strides in ``order``, flattened and padded to MAX_SLICES slices."""
    strides = [tuple(t.stride(d) for d in order) for t in group]
    return [v for triple in _padded(strides, strides[0]) for v in triple]


def _programs_wanted(t: torch.Tensor) -> int:
    """Programs that fill ``t``'s device (through the module: tests/_triton_compile.py's compile-only driver
    stands in for the device there)."""
    return _multi_lora._device_programs(t.device.index if t.device.type == "cuda" else 0)


def lora_shrink(
    x: torch.Tensor,
    slices: list[torch.Tensor],
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    segments: Segments | None,
) -> torch.Tensor:
    """S [n, M, R] fp32 with S[j] = the shrink of slice j (A_j [L, R, K]); ``segments`` None: the decode kernel."""
    M, K = x.shape
    L, R = slices[0].shape[:2]
    s = torch.empty((len(slices), M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return s
    block_r = _rank_chunk(R)
    n_chunks = triton.cdiv(R, block_r)
    for start, group in _groups(slices):
        out = s[start:]
        common = (M, K, R, L)
        pointers = _padded(group, group[0])
        if segments is None:
            block_k = 16 if interpreting() else 64
            parts, k_split = _multi_lora.decode_parts(x, K, M * n_chunks * len(group), block_k)
            # Several K parts: fp32 partials [parts, n, M, R], then one sum over the parts (fixed order).
            partial = out if parts == 1 else torch.empty((parts, len(group), M, R), device=x.device,
                                                         dtype=torch.float32)
            stride_sp = partial.stride(0) if parts > 1 else 0
            strides = (x.stride(0), x.stride(1), stride_sp, *partial.stride()[-3:],
                       *_slice_strides(group, (0, 1, 2)))
            _lora_shrink_decode_kernel[(M, parts * n_chunks, len(group))](
                x, *pointers, adapter_ids, ranks, partial, *common, k_split, *strides,
                N_CHUNKS=n_chunks, BLOCK_K=block_k, BLOCK_R=block_r,
            )
            if parts > 1:
                torch.sum(partial, dim=0, out=out[:len(group)])
        else:
            n_tiles = segments.tiles.shape[1]
            strides = (x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
                       *_slice_strides(group, (0, 1, 2)))
            _lora_shrink_segment_kernel[(n_tiles, n_chunks, len(group))](
                x, *pointers, segments.perm, segments.tiles, ranks, out, *common, n_tiles, *strides,
                DOT_FP32=dot_in_fp32(x.dtype, group[0].dtype), PRECISION=fp32_precision(),
                BLOCK_M=segments.block_m, BLOCK_K=16 if interpreting() else 64, BLOCK_R=block_r,
                num_warps=_SEGMENT_WARPS,
            )
    return s


def lora_expand_add(
    y: torch.Tensor,
    s: torch.Tensor,
    slices: list[torch.Tensor],
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    offset: int,
    segments: Segments | None,
) -> None:
    """y[:, o_j : o_j + N_j] += the expand of slice j (B_j [L, N_j, R], from s[j]), in place.

    s: [n, M, R] any float dtype and strides; ``segments`` None: the decode kernel.
    """
    M = y.shape[0]
    L, _, R = slices[0].shape
    if M == 0:
        return
    widths = [t.shape[1] for t in slices]
    starts = [offset + sum(widths[:j]) for j in range(len(slices))]
    block_n = 16 if interpreting() else 64
    if segments is None:  # decode: narrower column tiles while a few rows leave the device idle
        while block_n > 16 and M * triton.cdiv(max(widths), block_n) * min(len(slices), MAX_SLICES) \
                < _programs_wanted(y):
            block_n //= 2
    for start, group in _groups(slices):
        part = s[start:]
        n_cols = _padded(widths[start:start + len(group)], 0)
        col0 = _padded(starts[start:start + len(group)], 0)
        common = (M, R, L)
        args = (y.stride(0), y.stride(1), part.stride(0), part.stride(1), part.stride(2), *n_cols, *col0,
                *_slice_strides(group, (0, 1, 2)))
        pointers = _padded(group, group[0])
        grid_n = triton.cdiv(max(n_cols), block_n)
        if segments is None:
            _lora_expand_add_decode_kernel[(M, grid_n, len(group))](
                y, part, *pointers, adapter_ids, ranks, scalings, *common, *args,
                BLOCK_N=block_n, BLOCK_R=16 if interpreting() else 32,
            )
        else:
            n_tiles = segments.tiles.shape[1]
            _lora_expand_add_segment_kernel[(n_tiles, grid_n, len(group))](
                y, part, *pointers, segments.perm, segments.tiles, ranks, scalings, *common, n_tiles, *args,
                EXPAND_FP32=dot_in_fp32(y.dtype, group[0].dtype), PRECISION=fp32_precision(),
                # 128-row tiles: 32 columns, or the fp32 path spills on sm_90 (ptxas, triton 3.6 and 3.9).
                BLOCK_M=segments.block_m, BLOCK_N=block_n if segments.block_m <= 64 else 32,
                BLOCK_R=_EXPAND_CHUNK, num_warps=_SEGMENT_WARPS,
            )
