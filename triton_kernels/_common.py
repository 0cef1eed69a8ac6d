"""Pieces shared by the Triton kernels: dtype switches, dropout, tile helpers. Imports triton and torch only."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_in_fp32(*dtypes: torch.dtype) -> bool:
    """Whether a tile product over operands of these dtypes must run in fp32.

    It must when any operand is fp32 (mixed fp32 adapters with 16-bit activations), and under the
    interpreter whenever any is bf16: its ``tl.dot`` gives wrong bf16 results, while loads, stores and
    ``.to(tl.float32)`` are right. On a GPU bf16/fp16 tiles stay native for the tensor cores.
    """
    if torch.float32 in dtypes:
        return True
    return interpreting() and torch.bfloat16 in dtypes


def fp32_precision() -> str:
    """``tl.dot`` input precision for fp32 operands (fp32 adapters, fp32 intermediates, fp32 activations).

    Always on the tensor cores. By default ``"tf32x3"``: each fp32 operand is split into a TF32 head and a
    TF32 tail and three TF32 products are summed, which keeps about 22 of fp32's 24 significand bits (what
    ``input_precision="ieee"`` would give, but on FMA units, several times slower and with 255 registers
    per thread). A 16-bit operand upcast to fp32 is exact in TF32, so its tail is zero. When the user asks
    for the faster rounding (``torch.backends.cuda.matmul.allow_tf32 = True``, as for torch's own fp32
    matmuls), one plain TF32 product (10 significand bits).
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def gemm_configs(wide: bool = False) -> list[triton.Config]:
    """Autotune configs for the row-by-column GEMM kernels (meta-parameters BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP); ``wide`` adds a 128 x 256 tile. Under the interpreter, one small config: tuning there only
    costs time."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP": 4}, num_warps=1)]
    shapes = [(128, 256, 64, 8, 3)] if wide else []
    shapes += [
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (16, 64, 128, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


class TileBudget(NamedTuple):
    """Per-thread tile sizes a config may have and still fit sm_90's 255 registers without spilling.

    ``accumulator``: the fp32 output tile's values per thread, BLOCK_M * BLOCK_N / (32 * num_warps), held
    across the K loop. ``operands``: the values per thread of one K step's input tiles,
    (BLOCK_M + BLOCK_N) * BLOCK_K / (32 * num_warps); None when they do not count (16-bit and plain TF32
    tiles go from shared memory straight to the tensor cores).
    """

    accumulator: int
    operands: int | None = None

    def fits(self, config: triton.Config) -> bool:
        accumulator, operands = tile_values(config)
        return accumulator <= self.accumulator and (self.operands is None or operands <= self.operands)


def tile_values(config: triton.Config) -> tuple[int, int]:
    """(accumulator, operand) values per thread of a GEMM config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    meta, threads = config.kwargs, 32 * config.num_warps
    return (meta["BLOCK_M"] * meta["BLOCK_N"] // threads,
            (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] // threads)


def register_budget(precision: str, fp32_loop: bool = False, fp32_epilogue: bool = False,
                    busy: bool = False) -> TileBudget:
    """The :class:`TileBudget` of one launch, from its constexpr switches.

    Fitted to ``ptxas -v`` for sm_90a (triton 3.6; tests/_triton_compile.py, the static report's
    kernels.json) over every GEMM kernel, config and switch here; each step is where spills began:

    - a 16-bit K loop (fp32 adapters in a rank-r product before it count as 16-bit): an accumulator of 128
      values per thread (128 x 256 with 8 warps, 128 x 128 with 4) compiles to about 250 registers, no spill.
    - ``busy``: something else tile-sized is live beside it (the dropout mask of LoRA's dX, the bottleneck's
      activation, residual or H tiles), or ``fp32_loop`` with plain TF32 (32-bit tiles): at 128 values
      they spill (0.3-3 KB), at 64 (128 x 128 with 8 warps, 64 x 128 with 4) none does.
    - ``fp32_epilogue`` with tf32x3 (an fp32 rank-r product split into TF32 head and tail beside the
      accumulator, after the K loop): 64 values spill a few bytes, 32 none.
    - ``fp32_loop`` with tf32x3 (every K step splits its fp32 tiles in registers): also the operands
      count; at most 32 accumulator and 64 operand values (64 x 64 x 64 or 32 x 64 x 64 with 4 warps), and
      32 operand values with an ``fp32_epilogue`` as well (64 x 64 x 64 spilled 8 B there, 64 x 64 x 32
      uses 186 registers).

    Measured at the benches' shapes, whose sizes and strides are multiples of 16. Where they are not (K = 33,
    a column-major x of 40 rows), Triton cannot vectorize the loads and larger tiles spill anyway.
    """
    split = precision == "tf32x3"
    if fp32_loop and split:
        return TileBudget(32, 32 if fp32_epilogue else 64)
    if fp32_epilogue and split:
        return TileBudget(32)
    if fp32_loop or fp32_epilogue or busy:
        return TileBudget(64)
    return TileBudget(128)


def fitting_configs(configs: list[triton.Config], budget: TileBudget) -> list[triton.Config]:
    """The configs within ``budget``; never none: if no config fits, the one with the smallest tiles."""
    kept = [config for config in configs if budget.fits(config)]
    return kept or [min(configs, key=tile_values)]


def autotune(configs: list[triton.Config], key: list[str],
             budget: Callable[[dict[str, Any]], TileBudget] | None = None):
    """``triton.autotune`` as every kernel here uses it: ``key`` names the sizes that change the best config and
    the constexpr switches (dropout, bias, ids, activation, precision) that change the kernel itself, so a
    config tuned without dropout is never reused with it; results are cached on disk (Triton's cache, where
    the installed Triton can), so a new process does not tune again.

    ``budget(arguments)`` (the launch's arguments by name, constexpr switches included) gives the launch's
    :func:`register_budget`: configs beyond it would spill registers, so they are dropped before timing
    (Triton's ``early_config_prune``; tests/_triton_compile.py compiles what is left, the same list).
    """
    options: dict[str, Any] = {"configs": configs, "key": key}
    if budget is not None:
        options["prune_configs_by"] = {"early_config_prune": _pruner(budget)}
    if _AUTOTUNE_CACHES:
        options["cache_results"] = True
    return triton.autotune(**options)


def _pruner(budget: Callable[[dict[str, Any]], TileBudget]):
    """Triton's ``early_config_prune`` (configs, positional arguments by name, keyword arguments) for
    ``budget``, which it keeps as ``.budget``."""

    def prune(configs, named_args, **kwargs):
        return fitting_configs(configs, budget({**named_args, **kwargs}))

    prune.budget = budget
    return prune


# Triton 3.4 and later can keep autotuning results on disk; 3.2 and 3.3 (torch 2.6 and 2.7's) cannot.
_AUTOTUNE_CACHES = "cache_results" in inspect.signature(triton.autotune).parameters


def m_bucket(m: int) -> int:
    """Autotune key for the row count: its power-of-two bucket, not the exact M, which varies every step."""
    return triton.next_power_of_2(max(m, 1))


def rank_block(rank: int) -> int:
    """Padded tile width for the rank dimension: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(rank))


@triton.jit
def _tf32_split(v):
    """(head, tail) of an fp32 tile, both on TF32's grid (so the tensor cores' own conversion of either is
    exact): head is v truncated to TF32's 10 stored significand bits, tail the rest (under 2**-10 |v|)
    rounded to nearest on that grid, so that head + tail is within 2**-21 |v| of v."""
    bits = v.to(tl.uint32, bitcast=True)
    head = (bits & 0xFFFFE000).to(tl.float32, bitcast=True)
    tail = ((v - head).to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000
    return head, tail.to(tl.float32, bitcast=True)


@triton.jit
def dot_fp32(a, b, acc, PRECISION: tl.constexpr):
    """acc += a @ b in fp32 on the tensor cores, at fp32-level accuracy unless PRECISION is "tf32".

    PRECISION "tf32x3" (the default, see :func:`fp32_precision`): when one operand is 16-bit it is exact in
    TF32, so only the fp32 operand is split and two TF32 products suffice (the 16-bit tile is never split
    and stays small in registers); with two fp32 operands, Triton's own three-product tf32x3.
    """
    if PRECISION == "tf32x3":
        if a.dtype != tl.float32:
            b_head, b_tail = _tf32_split(b.to(tl.float32))
            a32 = a.to(tl.float32)
            acc = tl.dot(a32, b_tail, acc, input_precision="tf32")
            return tl.dot(a32, b_head, acc, input_precision="tf32")
        if b.dtype != tl.float32:
            a_head, a_tail = _tf32_split(a)
            b32 = b.to(tl.float32)
            acc = tl.dot(a_tail, b32, acc, input_precision="tf32")
            return tl.dot(a_head, b32, acc, input_precision="tf32")
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b with an fp32 accumulator: in fp32 (:func:`dot_fp32`) when DOT_FP32, else b cast to a's
    type."""
    if DOT_FP32:
        return dot_fp32(a, b, acc, PRECISION)
    return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def gemm_k_loop(X, W, rows, row_ok, cols, col_ok, K, acc, stride_xm, stride_xk, stride_wc, stride_wk,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + sum_k X[rows, k] * W~[k, cols] over k < K, W~[k, c] at ``W + c * stride_wc + k * stride_wk``;
    rows outside ``row_ok`` read as zeros. The base-GEMM main loop every GEMM kernel here shares.

    Without DOT_FP32 the X tile is cast to W's dtype first: fp32 intermediates (the bottleneck's dH) meet
    16-bit weights on the tensor cores in the weights' type; a no-op when the two dtypes already agree.
    """
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(W + cols[None, :] * stride_wc + ks[:, None] * stride_wk,
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if not DOT_FP32:
            x = x.to(w_t.dtype)
        acc = mma(x, w_t, acc, DOT_FP32, PRECISION)
    return acc


def tma_target() -> bool:
    """Whether the kernels may load tiles with TMA (device-side tensor descriptors): a CUDA target of sm_90 or
    later under a Triton that has ``tl.make_tensor_descriptor`` (3.4 and later), and the interpreter, which runs
    descriptor loads on CPU, so the CPU tests reach the TMA kernel bodies. sm_80 keeps the cp.async path."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if interpreting():
        return True
    target = triton.runtime.driver.active.get_current_target()
    return target.backend == "cuda" and isinstance(target.arch, int) and target.arch >= 90


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA can read every one of these 2-D tensors: base address 16-byte aligned, last stride 1,
    row stride a multiple of 16 bytes (what a tensor map requires). Otherwise (odd K in a 16-bit dtype, a
    transposed or sliced view, a misaligned offset) the kernels keep the pointer path: never a wrong answer."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
               for t in tensors)


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # The caching allocator's blocks are 512-byte aligned (alignment asks for at most 128), on the current
    # device (where Triton launches) and stream; safe inside CUDA graph capture.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_scratch() -> None:
    """Device-side descriptors live in a small global scratch (128 bytes per descriptor and program) that
    Triton asks its allocator for at launch: install a torch one, unless the caller already set their own."""
    from triton.runtime import _allocation

    holder = getattr(_allocation, "_allocator", None)
    if holder is None or isinstance(holder.get(), getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_torch_scratch)


@triton.jit
def gemm_k_loop_tma(X, W, row0, col0, n_rows, n_cols, K, acc, stride_xm, stride_wn,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`gemm_k_loop` for the output tile at (row0, col0) with X [n_rows, K] and W [n_cols, K] (nn.Linear's
    forward, W~[k, c] = W[c, k]) read by TMA (sm_90): both row-major, 16-byte aligned (:func:`tma_ready`). Rows,
    columns and k past the ends load as zeros (the tensor map's bounds), so no masks.

    The descriptors are built on the device from the kernel's own BLOCK_* constexprs, so every autotune
    config gets its block shape without a host-side descriptor per config (no Config.pre_hook)."""
    x_desc = tl.make_tensor_descriptor(X, shape=[n_rows, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[n_cols, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([row0, k0])
        w_t = tl.trans(w_desc.load([col0, k0]))
        if not DOT_FP32:
            x = x.to(w_t.dtype)
        acc = mma(x, w_t, acc, DOT_FP32, PRECISION)
    return acc


@triton.jit
def lowrank_dot(s, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += s @ b, ``s`` an fp32 rank-r intermediate tile (S, dS or a transpose) and ``b`` a tile of an
    adapter or of the activations.

    With 16-bit activations and adapters (not DOT_FP32) ``s`` is rounded to b's dtype so the product runs
    on the tensor cores in the accumulator's own layout, as peft's 16-bit layers round their intermediate;
    an fp32 product would hold a second copy of the tile in another layout.
    """
    if DOT_FP32:
        return dot_fp32(s, b, acc, PRECISION)
    return tl.dot(s.to(b.dtype), b, acc)


@triton.jit
def _dropout_groups(rows, n_cols):
    """Philox calls per row of a [*, n_cols] mask, and the first call of each row (int64 rows, [BLOCK_M, 1])."""
    groups_per_row = (n_cols + 3) // 4
    return rows.to(tl.int64)[:, None] * groups_per_row


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p_drop):
    """Dropout keep-mask (bool) for the tile (rows x cols) of a row-major [*, n_cols] matrix, any columns.

    ``peftkern.reference.dropout_mask``: element (i, j) is decided by word j % 4 of the Philox call at
    counter i * ceil(n_cols / 4) + j // 4. This general form draws a call per element; kernels whose tile
    starts at a multiple of 4 use :func:`dropout_keep_tile`, a call per 4 elements. Callers multiply by the
    mask (exact in any dtype, and NaN stays NaN as in torch) and apply 1/(1-p) to the fp32 accumulator, so
    the 16-bit operands are never rounded twice.
    """
    cols = cols.to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, _dropout_groups(rows, n_cols) + cols // 4)
    word = cols % 4
    bits = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    return tl.uint_to_uniform_float(bits) >= p_drop


@triton.jit
def dropout_keep_tile(seed, rows, col0, n_cols, p_drop, BLOCK_N: tl.constexpr):
    """The keep-mask of :func:`dropout_keep` for columns [col0, col0 + BLOCK_N), col0 a multiple of 4 (every
    tile start here): one Philox call per 4 elements, its four words spread over neighbouring columns."""
    first = _dropout_groups(rows, n_cols) + col0 // 4  # col0 < n_cols: int32 is enough
    w0, w1, w2, w3 = tl.randint4x(seed, first + tl.arange(0, BLOCK_N // 4)[None, :])
    k0 = tl.uint_to_uniform_float(w0) >= p_drop
    k1 = tl.uint_to_uniform_float(w1) >= p_drop
    k2 = tl.uint_to_uniform_float(w2) >= p_drop
    k3 = tl.uint_to_uniform_float(w3) >= p_drop
    # interleave(a, b) = a0 b0 a1 b1 ...: so this is k0 k1 k2 k3 of call 0, then of call 1, ...
    return tl.interleave(tl.interleave(k0, k2), tl.interleave(k1, k3))


@triton.jit
def apply_keep(x, keep):
    """x * keep (bool tile) in x's dtype: exact, and NaN stays NaN where dropped, as with torch dropout.

    Computed in fp32 (exact for a 0/1 factor): the interpreter has no bf16 arithmetic.
    """
    return (x.to(tl.float32) * keep.to(tl.float32)).to(x.dtype)


@triton.jit
def grouped_tile(pid, n_rows_tiles, n_cols_tiles, GROUP: tl.constexpr):
    """Map a linear program id to (row tile, column tile), GROUP row tiles at a time, for L2 reuse."""
    tiles_per_group = GROUP * n_cols_tiles
    group = pid // tiles_per_group
    first_row = group * GROUP
    group_rows = tl.minimum(n_rows_tiles - first_row, GROUP)
    row_tile = first_row + (pid % tiles_per_group) % group_rows
    col_tile = (pid % tiles_per_group) // group_rows
    return row_tile, col_tile
