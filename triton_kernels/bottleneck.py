"""Fused bottleneck adapter kernels and their launchers. Imports triton and torch only.

Y = residual + scaling * (act(X @ Wd[id].T + bd[id]) @ Wu[id].T + bu[id]), residual defaulting to X,
with a per-row adapter id (rows whose id is outside [0, L) get no adapter: Y = residual).

Forward, two launches:
  down     H = X @ Wd.T + bd        [M, Bn] fp32, the only saved intermediate
           A = act(H)               [M, Bn] in the up GEMM's operand dtype, a forward-only temporary
  up       Y = residual + scaling * (A @ Wu.T + bu)      bias, scaling and residual in the epilogue
Backward, four launches (two when no adapter weight needs a gradient):
  dh       dH = (scaling * dY @ Wu) * act'(H)            the activation's derivative recomputed from H
  dx       dX = dY (when the residual is X) + dH @ Wd
  dw (up)  dWu[l] = scaling * dY[rows of l].T @ act(H[rows of l]),  dbu[l] = scaling * sum dY[rows of l]
  dw (dn)  dWd[l] = dH[rows of l].T @ X[rows of l],                dbd[l] = sum dH[rows of l]

With ids, the rows are grouped by adapter once per pass (a stable sort of the M ids and the groups'
starts, torch ops on the device, no host sync, no pass over X): the row GEMMs (down, up, dh, dx) tile the
rows in that order, gathering each tile's rows, so every tile holds one adapter's rows and runs one K loop
however the batch mixes adapters (each of the L + 2 groups, ids below 0 and from L up included, adds at
most one partial tile: M // BLOCK_M + L + 2 row tiles, fixed by the shapes, valid for any autotuned
BLOCK_M). Without ids, plain row tiles. Weight gradients walk each adapter's rows in the same order, split
into a fixed number of chunks whose fp32 partials are summed in a fixed order: deterministic, no atomics.
Ids are only sorted and compared with 0..L, never used as addresses: no id, whatever it holds, can address
memory out of bounds; rows whose id is outside [0, L) get no adapter.

Shapes follow torch.nn.Linear: X [M, D], Wd [L, Bn, D], bd [L, Bn], Wu [L, D, Bn], bu [L, D].
Any strides; offsets in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    TileBudget,
    autotune,
    dot_in_fp32,
    fp32_precision,
    gemm_configs,
    gemm_k_loop,
    grouped_tile,
    interpreting,
    m_bucket,
    mma,
    register_budget,
)

__all__ = ["ACTIVATION_CODES", "bottleneck_forward", "bottleneck_backward"]

# constexpr code of each activation name ("swish" is "silu").
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "swish": 3, "tanh": 4}


def _budget(args: dict) -> TileBudget:
    """Registers of the four row kernels' configs (``_common.register_budget``): their epilogues hold a
    second tile-sized value (H and its activation, the residual, act'(H), dY), and with fp32 adapters
    every K step splits fp32 tiles (tf32x3)."""
    return register_budget(args["PRECISION"], fp32_loop=args["DOT_FP32"], busy=True)


def _down_budget(args: dict) -> TileBudget:
    """:func:`_budget`, and with the fp32 loop split into TF32 halves, K steps of at most 32 operand values per
    thread: beside H, act(H) and the bias row, a 32 x 64 tile with 64-wide K steps (under 64 rows, sm_90's
    mma.sync holds its operands in registers) spilled 12 B (ptxas -v, sm_90a); 64 x 64 x 32 spills none."""
    return register_budget(args["PRECISION"], fp32_loop=args["DOT_FP32"], fp32_epilogue=args["DOT_FP32"], busy=True)


def _configs() -> list[triton.Config]:
    """The row kernels' autotune configs: the shared GEMM list and a 64 x 64 x 32 tile (the down kernel's only
    one within its fp32 budget, see :func:`_down_budget`)."""
    if interpreting():
        return gemm_configs()
    return gemm_configs() + [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP": 8}, num_warps=4,
                                           num_stages=4)]


# --------------------------------------------------------------------------------------------------------
# activations (fp32 tiles)
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    # The interpreter has no tanh; this form saturates to +-1 without overflow trouble (exp -> inf gives 1).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def activate(h, ACT: tl.constexpr):
    """act(h): 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu, 4 tanh."""
    if ACT == 0:
        out = tl.where(h < 0.0, 0.0, h)  # NaN stays NaN, as torch.relu
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        out = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    elif ACT == 3:
        out = h * tl.sigmoid(h)
    else:
        out = _tanh(h)
    return out


@triton.jit
def activate_grad(h, ACT: tl.constexpr):
    """d act(h) / dh, the same codes as :func:`activate` (relu's derivative at 0 is 0, as torch's)."""
    if ACT == 0:
        out = tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        out = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du
    elif ACT == 3:
        s = tl.sigmoid(h)
        out = s * (1.0 + h * (1.0 - s))
    else:
        t = _tanh(h)
        out = 1.0 - t * t
    return out


# --------------------------------------------------------------------------------------------------------
# the per-row-adapter GEMM tile shared by the four row kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _adapter_gemm_tile(
    X, W, rows, row_ok, live, adapter, cols, col_ok, K,
    stride_xm, stride_xk, stride_wl, stride_wn, stride_wk,
    HAS_IDS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[m, n] = sum_k X[rows[m], k] * W[adapter, n, k] over the tile, fp32.

    Every tile's rows share one adapter (see :func:`_row_tile`), so a tile costs one K loop whatever the
    batch's mix of adapters; tiles of rows with no adapter, and empty tiles, run none (zero trip count, no
    branch around the loop, which would keep the compiler from pipelining its loads).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_IDS:
        acc = gemm_k_loop(X, W + adapter * stride_wl, rows, row_ok, cols, col_ok, tl.where(live, K, 0), acc,
                          stride_xm, stride_xk, stride_wn, stride_wk, DOT_FP32, PRECISION, BLOCK_K)
    else:
        acc = gemm_k_loop(X, W, rows, row_ok, cols, col_ok, K, acc, stride_xm, stride_xk,
                          stride_wn, stride_wk, DOT_FP32, PRECISION, BLOCK_K)
    return acc


@triton.jit
def _group_start(BOUNDS, g, M, L):
    """First sorted position of row group g in 0..L + 2 (g = L + 2: M): group 0 holds ids below 0, group
    l + 1 adapter l, group L + 1 ids from L up; BOUNDS[l] is the first sorted position holding an id >= l."""
    inner = tl.load(BOUNDS + tl.minimum(tl.maximum(g - 1, 0), L))
    return tl.where(g == 0, 0, tl.where(g == L + 2, M, inner))


@triton.jit
def _row_tile(pid, M, N, L, ORDER, BOUNDS, n_steps, HAS_IDS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """Program ``pid``'s tile of an [M, N] output: (rows [BLOCK_M] int64, their mask, cols [BLOCK_N] int64,
    whether the tile has rows and an adapter, that adapter clamped into [0, L)).

    Without ids, row tile t is rows t * BLOCK_M + [0, BLOCK_M) of adapter 0. With ids the rows are taken in
    id order (ORDER, a stable sort of the ids) and cut into L + 2 groups (:func:`_group_start`); group g owns
    the row tiles from start(g) // BLOCK_M + g on, one per BLOCK_M of its rows, so no tile holds two
    adapters and the M // BLOCK_M + L + 2 row tiles cover every group for any BLOCK_M (the autotuner's): no
    host sync, no per-config table. A tile finds its group by a binary search over the group starts
    (``n_steps`` = bit length of L + 1 scalar steps) and gathers its rows through ORDER; tiles past the
    end of their group's rows (at most one per group) load and compute nothing.
    """
    if HAS_IDS:
        n_row_tiles = M // BLOCK_M + L + 2
    else:
        n_row_tiles = tl.cdiv(M, BLOCK_M)
    tile_m, tile_n = grouped_tile(pid, n_row_tiles, tl.cdiv(N, BLOCK_N), GROUP)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_IDS:
        tile = tile_m.to(tl.int64)
        lo = tl.full((), 0, tl.int64)  # invariant: group lo's first tile <= tile < group hi + 1's first
        hi = tl.full((), 0, tl.int64) + L + 1
        for _ in range(n_steps):
            mid = (lo + hi + 1) // 2
            up = _group_start(BOUNDS, mid, M, L) // BLOCK_M + mid <= tile
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid - 1)
        seg_start = _group_start(BOUNDS, lo, M, L)
        seg_end = _group_start(BOUNDS, lo + 1, M, L)
        start = seg_start + (tile - seg_start // BLOCK_M - lo) * BLOCK_M
        pos = start + tl.arange(0, BLOCK_M)
        row_ok = pos < seg_end
        rows = tl.load(ORDER + pos, mask=row_ok, other=0).to(tl.int64)
        is_adapter = (lo >= 1) & (lo <= L)
        live = is_adapter & (start < seg_end)
        adapter = tl.where(is_adapter, lo - 1, 0)
    else:
        rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        live = tl.full((), 1, tl.int1)
        adapter = tl.full((), 0, tl.int64)
    return rows, row_ok, cols, live, adapter


@triton.jit
def _adapter_bias(BIAS, adapter, live, cols, col_ok, stride_bl, stride_bn):
    """The tile's adapter's bias over ``cols`` as an fp32 [1, BLOCK_N] row (zeros when the tile has none)."""
    # (tl.where, not ``col_ok & live``: the interpreter rejects a mask from a scalar-vector bool and.)
    bias = tl.load(BIAS + adapter * stride_bl + cols * stride_bn, mask=tl.where(live, col_ok, False), other=0.0)
    return bias.to(tl.float32)[None, :]


# --------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------


@autotune(_configs(), ["M_BUCKET", "NB", "K", "L", "HAS_BIAS", "HAS_IDS", "ACT", "DOT_FP32", "PRECISION"],
          budget=_down_budget)
@triton.jit
def _bottleneck_down_kernel(
    X, W, BIAS, ORDER, BOUNDS, H, A,
    M, NB, K, L, M_BUCKET, n_steps,
    stride_xm, stride_xk, stride_wl, stride_wb, stride_wk, stride_bl, stride_bb,
    HAS_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, ACT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """H [M, NB] (fp32, contiguous) = X @ W[id].T + BIAS[id]; A [M, NB] (contiguous) = act(H)."""
    rows, row_ok, cols, live, adapter = _row_tile(tl.program_id(0), M, NB, L, ORDER, BOUNDS, n_steps,
                                                  HAS_IDS, BLOCK_M, BLOCK_N, GROUP)
    col_ok = cols < NB
    acc = _adapter_gemm_tile(X, W, rows, row_ok, live, adapter, cols, col_ok, K,
                             stride_xm, stride_xk, stride_wl, stride_wb, stride_wk,
                             HAS_IDS, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += _adapter_bias(BIAS, adapter, live, cols, col_ok, stride_bl, stride_bb)
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * NB + cols[None, :]
    tl.store(H + offsets, acc, mask=mask)
    tl.store(A + offsets, activate(acc, ACT).to(A.dtype.element_ty), mask=mask)


@autotune(_configs(), ["M_BUCKET", "N", "NB", "L", "HAS_BIAS", "HAS_IDS", "DOT_FP32", "PRECISION"],
          budget=_budget)
@triton.jit
def _bottleneck_up_kernel(
    A, W, BIAS, ORDER, BOUNDS, RES, Y,
    M, N, NB, L, M_BUCKET, n_steps,
    stride_wl, stride_wn, stride_wb, stride_bl, stride_bn, stride_rm, stride_rn, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """Y [M, N] = RES + scaling * (A @ W[id].T + BIAS[id]), A [M, NB] contiguous; no adapter: Y = RES."""
    rows, row_ok, cols, live, adapter = _row_tile(tl.program_id(0), M, N, L, ORDER, BOUNDS, n_steps,
                                                  HAS_IDS, BLOCK_M, BLOCK_N, GROUP)
    col_ok = cols < N
    acc = _adapter_gemm_tile(A, W, rows, row_ok, live, adapter, cols, col_ok, NB,
                             NB, 1, stride_wl, stride_wn, stride_wb,
                             HAS_IDS, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += _adapter_bias(BIAS, adapter, live, cols, col_ok, stride_bl, stride_bn)
    residual = tl.load(RES + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
    out = residual.to(tl.float32) + scaling * acc
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, out.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------


@autotune(_configs(), ["M_BUCKET", "NB", "N", "L", "HAS_IDS", "ACT", "DOT_FP32", "PRECISION"],
          budget=_budget)
@triton.jit
def _bottleneck_bwd_dh_kernel(
    DY, W, ORDER, BOUNDS, H, DH,
    M, NB, N, L, M_BUCKET, n_steps,
    stride_dym, stride_dyn, stride_wl, stride_wn, stride_wb,
    scaling,
    HAS_IDS: tl.constexpr, ACT: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """DH [M, NB] (contiguous) = (scaling * DY @ W[id]) * act'(H); W is the up weight [L, N, NB]."""
    rows, row_ok, cols, live, adapter = _row_tile(tl.program_id(0), M, NB, L, ORDER, BOUNDS, n_steps,
                                                  HAS_IDS, BLOCK_M, BLOCK_N, GROUP)
    col_ok = cols < NB
    # The product runs over N (the model dim), with the up weight read as [L, NB, N].
    acc = _adapter_gemm_tile(DY, W, rows, row_ok, live, adapter, cols, col_ok, N,
                             stride_dym, stride_dyn, stride_wl, stride_wb, stride_wn,
                             HAS_IDS, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * NB + cols[None, :]
    h = tl.load(H + offsets, mask=mask, other=0.0)
    tl.store(DH + offsets, (scaling * acc * activate_grad(h, ACT)).to(DH.dtype.element_ty), mask=mask)


@autotune(_configs(), ["M_BUCKET", "K", "NB", "L", "HAS_IDS", "ADD_DY", "DOT_FP32", "PRECISION"],
          budget=_budget)
@triton.jit
def _bottleneck_bwd_dx_kernel(
    DH, W, ORDER, BOUNDS, DY, DX,
    M, K, NB, L, M_BUCKET, n_steps,
    stride_wl, stride_wb, stride_wk, stride_dym, stride_dyk, stride_dxm, stride_dxk,
    HAS_IDS: tl.constexpr, ADD_DY: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """DX [M, K] = DH @ W[id] (+ DY when the residual is X); W is the down weight [L, NB, K]."""
    rows, row_ok, cols, live, adapter = _row_tile(tl.program_id(0), M, K, L, ORDER, BOUNDS, n_steps,
                                                  HAS_IDS, BLOCK_M, BLOCK_N, GROUP)
    col_ok = cols < K
    acc = _adapter_gemm_tile(DH, W, rows, row_ok, live, adapter, cols, col_ok, NB,
                             NB, 1, stride_wl, stride_wk, stride_wb,
                             HAS_IDS, DOT_FP32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    if ADD_DY:
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyk, mask=mask, other=0.0)
        acc += dy.to(tl.float32)
    tl.store(DX + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
             mask=mask)


@triton.jit
def _bottleneck_bwd_dw_kernel(
    P, Q, ORDER, SEGMENTS, DW, DB,
    M, I, J, n_chunks,
    stride_pm, stride_pi, stride_qm, stride_qj,
    scaling,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_Q: tl.constexpr, ACT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Per adapter l and row chunk c of its rows:
        DW[c, l, i, j] = scaling * sum_m P[m, i] * f(Q[m, j]),   DB[c, l, i] = scaling * sum_m P[m, i]
    with f = act when ACT_Q (Q is H), else identity. DW [C, L, I, J] and DB [C, L, I] are contiguous fp32;
    the host sums over c in a fixed order. Adapter l's rows are ORDER[SEGMENTS[l]:SEGMENTS[l + 1]].
    """
    adapter = tl.program_id(0) // n_chunks
    chunk = tl.program_id(0) % n_chunks
    tile_i = tl.program_id(1)
    tile_j = tl.program_id(2)
    n_adapters = tl.num_programs(0) // n_chunks
    if HAS_IDS:
        seg_start = tl.load(SEGMENTS + adapter).to(tl.int64)
        seg_end = tl.load(SEGMENTS + adapter + 1).to(tl.int64)
    else:
        seg_start = tl.full((), 0, tl.int64)
        seg_end = tl.full((), 0, tl.int64) + M
    per_chunk = tl.cdiv(tl.cdiv(seg_end - seg_start, n_chunks), BLOCK_M) * BLOCK_M
    start = seg_start + chunk * per_chunk
    end = tl.minimum(start + per_chunk, seg_end)
    i_s = tile_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    j_s = tile_j.to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = i_s < I
    j_ok = j_s < J
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        pos_ok = pos < end
        if HAS_IDS:
            rows = tl.load(ORDER + pos, mask=pos_ok, other=0).to(tl.int64)
        else:
            rows = pos
        p = tl.load(P + rows[:, None] * stride_pm + i_s[None, :] * stride_pi,
                    mask=pos_ok[:, None] & i_ok[None, :], other=0.0)
        q_mask = pos_ok[:, None] & j_ok[None, :]
        q = tl.load(Q + rows[:, None] * stride_qm + j_s[None, :] * stride_qj, mask=q_mask, other=0.0)
        if ACT_Q:
            q = tl.where(q_mask, activate(q.to(tl.float32), ACT), 0.0)
        if not DOT_FP32:
            q = q.to(p.dtype)
        acc = mma(tl.trans(p), q, acc, DOT_FP32, PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(p.to(tl.float32), 0)
    slot = chunk.to(tl.int64) * n_adapters + adapter
    tl.store(DW + slot * I * J + i_s[:, None] * J + j_s[None, :], acc * scaling,
             mask=i_ok[:, None] & j_ok[None, :])
    if HAS_BIAS:
        if tile_j == 0:
            tl.store(DB + slot * I + i_s, bias_acc * scaling, mask=i_ok)


# --------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------



def _row_groups(adapter_ids: torch.Tensor | None, num_adapters: int, dummy: torch.Tensor):
    """(ORDER [M] int64, BOUNDS [L + 1] int64, n_steps) for :func:`_row_tile` and the weight gradients: a
    stable sort of the ids and, for l = 0..L, the first sorted position with an id >= l (adapter l's rows
    are ORDER[BOUNDS[l]:BOUNDS[l + 1]]). Three device ops on the M ids (sort, arange, searchsorted): no
    pass over x, no host sync. Without ids, placeholders never read."""
    if adapter_ids is None:
        return dummy, dummy, 0
    sorted_ids, order = torch.sort(adapter_ids.reshape(-1), stable=True)
    levels = torch.arange(num_adapters + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return order, torch.searchsorted(sorted_ids, levels), (num_adapters + 1).bit_length()


def _row_tiles(m: int, num_adapters: int, block_m: int, has_ids: bool) -> int:
    """Row tiles of a row kernel's grid: M // BLOCK_M plus one partial tile per row group with ids."""
    return m // block_m + num_adapters + 2 if has_ids else triton.cdiv(m, block_m)


def _operand_dtype(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, torch.dtype]:
    """(whether the GEMMs run in fp32, the dtype of the A and dH operands)."""
    dot_fp32 = dot_in_fp32(x.dtype, weight.dtype)
    return dot_fp32, (torch.float32 if dot_fp32 else x.dtype)


def bottleneck_forward(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    adapter_ids: torch.Tensor | None,
    activation: str,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (Y [M, D] in x's dtype, H [M, Bn] fp32). Inputs already checked.

    x: [M, D] any strides; down_weight [L, Bn, D]; down_bias [L, Bn] or None; up_weight [L, D, Bn];
    up_bias [L, D] or None; residual [M, D] or None (then x); adapter_ids [M] int32/int64 or None (every
    row uses adapter 0).
    """
    M, D = x.shape
    L, NB = down_weight.shape[0], down_weight.shape[1]
    y = torch.empty((M, D), device=x.device, dtype=x.dtype)
    h = torch.empty((M, NB), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, h
    dot_fp32, operand = _operand_dtype(x, down_weight)
    a = torch.empty((M, NB), device=x.device, dtype=operand)
    has_ids = adapter_ids is not None
    order, bounds, n_steps = _row_groups(adapter_ids, L, h)
    res = x if residual is None else residual
    precision = fp32_precision()
    act = ACTIVATION_CODES[activation]
    bucket = m_bucket(M)

    grid = lambda meta: (_row_tiles(M, L, meta["BLOCK_M"], has_ids) * triton.cdiv(NB, meta["BLOCK_N"]),)
    _bottleneck_down_kernel[grid](
        x, down_weight, down_bias if down_bias is not None else h, order, bounds, h, a,
        M, NB, D, L, bucket, n_steps,
        x.stride(0), x.stride(1), down_weight.stride(0), down_weight.stride(1), down_weight.stride(2),
        *(down_bias.stride() if down_bias is not None else (0, 0)),
        HAS_BIAS=down_bias is not None, HAS_IDS=has_ids, ACT=act,
        DOT_FP32=dot_fp32, PRECISION=precision,
    )
    grid = lambda meta: (_row_tiles(M, L, meta["BLOCK_M"], has_ids) * triton.cdiv(D, meta["BLOCK_N"]),)
    _bottleneck_up_kernel[grid](
        a, up_weight, up_bias if up_bias is not None else h, order, bounds, res, y,
        M, D, NB, L, bucket, n_steps,
        up_weight.stride(0), up_weight.stride(1), up_weight.stride(2),
        *(up_bias.stride() if up_bias is not None else (0, 0)),
        res.stride(0), res.stride(1), y.stride(0), y.stride(1),
        float(scaling),
        HAS_BIAS=up_bias is not None, HAS_IDS=has_ids, DOT_FP32=dot_fp32, PRECISION=precision,
    )
    return y, h


def _weight_grad(
    p: torch.Tensor,
    q: torch.Tensor,
    order: torch.Tensor | None,
    segments: torch.Tensor | None,
    num_adapters: int,
    scaling: float,
    want_bias: bool,
    act: int | None,
    dot_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dW [L, I, J], db [L, I] or None) in fp32: per adapter, scaling * P.T @ f(Q) and scaling * sum P."""
    M, I = p.shape
    J = q.shape[1]
    block_m = 16 if interpreting() else 64
    block_i = 16 if interpreting() else 64
    block_j = 16 if interpreting() else 64
    tiles = num_adapters * triton.cdiv(I, block_i) * triton.cdiv(J, block_j)
    # Enough programs to fill the device, few enough partials to keep the workspace small.
    n_chunks = max(1, min(triton.cdiv(M, block_m), 8, 1024 // tiles))
    dw = torch.empty((n_chunks, num_adapters, I, J), device=p.device, dtype=torch.float32)
    db = torch.empty((n_chunks, num_adapters, I), device=p.device, dtype=torch.float32) if want_bias else dw
    _bottleneck_bwd_dw_kernel[(num_adapters * n_chunks, triton.cdiv(I, block_i), triton.cdiv(J, block_j))](
        p, q, order if order is not None else dw, segments if segments is not None else dw, dw, db,
        M, I, J, n_chunks,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        float(scaling),
        HAS_IDS=order is not None, HAS_BIAS=want_bias, ACT_Q=act is not None, ACT=act or 0,
        DOT_FP32=dot_fp32, PRECISION=fp32_precision(),
        BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_J=block_j,
    )
    return dw.sum(0), (db.sum(0) if want_bias else None)


def bottleneck_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    h: torch.Tensor,
    adapter_ids: torch.Tensor | None,
    activation: str,
    scaling: float,
    need_dx: bool,
    add_grad_y: bool,
    need_weights: bool,
    has_down_bias: bool,
    has_up_bias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Returns (dX, dWd, dbd, dWu, dbu), each None where not asked for, in the dtypes of x and the weights.

    grad_y: [M, D]; x: [M, D]; h: [M, Bn] fp32 from the forward. ``add_grad_y``: the residual is x, so
    dX also gets dY. ``need_weights``: compute the four adapter gradients (bias ones where they exist).
    """
    M, D = x.shape
    L, NB = down_weight.shape[0], down_weight.shape[1]
    wdtype = down_weight.dtype
    if M == 0:
        dx = torch.empty((0, D), device=x.device, dtype=x.dtype) if need_dx else None
        if not need_weights:
            return dx, None, None, None, None
        zeros = lambda *shape: torch.zeros(shape, device=x.device, dtype=wdtype)
        return (dx, zeros(L, NB, D), zeros(L, NB) if has_down_bias else None,
                zeros(L, D, NB), zeros(L, D) if has_up_bias else None)
    dot_fp32, operand = _operand_dtype(x, down_weight)
    precision = fp32_precision()
    act = ACTIVATION_CODES[activation]
    bucket = m_bucket(M)
    has_ids = adapter_ids is not None
    # One grouping of the rows by adapter serves the dh, dx and weight-gradient kernels.
    order, bounds, n_steps = _row_groups(adapter_ids, L, h)

    dh = torch.empty((M, NB), device=x.device, dtype=operand)
    grid = lambda meta: (_row_tiles(M, L, meta["BLOCK_M"], has_ids) * triton.cdiv(NB, meta["BLOCK_N"]),)
    _bottleneck_bwd_dh_kernel[grid](
        grad_y, up_weight, order, bounds, h, dh,
        M, NB, D, L, bucket, n_steps,
        grad_y.stride(0), grad_y.stride(1), up_weight.stride(0), up_weight.stride(1), up_weight.stride(2),
        float(scaling),
        HAS_IDS=has_ids, ACT=act, DOT_FP32=dot_fp32, PRECISION=precision,
    )
    dx = None
    if need_dx:
        dx = torch.empty((M, D), device=x.device, dtype=x.dtype)
        grid = lambda meta: (_row_tiles(M, L, meta["BLOCK_M"], has_ids) * triton.cdiv(D, meta["BLOCK_N"]),)
        _bottleneck_bwd_dx_kernel[grid](
            dh, down_weight, order, bounds, grad_y, dx,
            M, D, NB, L, bucket, n_steps,
            down_weight.stride(0), down_weight.stride(1), down_weight.stride(2),
            grad_y.stride(0), grad_y.stride(1), dx.stride(0), dx.stride(1),
            HAS_IDS=has_ids, ADD_DY=add_grad_y, DOT_FP32=dot_fp32, PRECISION=precision,
        )
    if not need_weights:
        return dx, None, None, None, None
    if not has_ids:
        order = bounds = None
    d_up, d_up_bias = _weight_grad(grad_y, h, order, bounds, L, scaling, has_up_bias, act, dot_fp32)
    d_down, d_down_bias = _weight_grad(dh, x, order, bounds, L, 1.0, has_down_bias, None, dot_fp32)
    cast = lambda t: None if t is None else t.to(wdtype)
    return dx, cast(d_down), cast(d_down_bias), cast(d_up), cast(d_up_bias)
