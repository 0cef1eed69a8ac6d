"""QLoRA kernels: LoRA over a frozen 4-bit weight in bitsandbytes' storage, dequantized inside the GEMM main loop.
Imports triton and torch only.

The weight W [N, K] is bitsandbytes' ``quantize_4bit`` storage: ``ceil(N * K / 2)`` packed bytes (flat element
j = n * K + k is the high nibble of byte j // 2 when j is even, its low nibble when odd), and one scale per block
of ``blocksize`` consecutive flat elements: ``absmax`` in float32, or double-quantized (``compress_statistics``)
as uint8 codes, block b's scale then ``nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset``
(a float32 product rounded before the sum, as bitsandbytes computes it), decoded in the kernels beside the
nibbles. Element j of W is ``code[nibble_j] * absmax[j // blocksize]`` in float32, rounded to the weight's dtype,
then to the base GEMM's dtype: exactly ``peftkern.reference.dequantize_4bit``, so the GEMM sees bitsandbytes' own
values. Each tile of W is decoded from the packed bytes into registers right before its ``tl.dot``; no dense W
(and no expanded absmax) is ever written.

Forward, two launches:
  shrink   S = dropout(X) @ A.T                                  ``lora.py``'s shrink kernel (the same stream)
  fused    Y = base(X @ W.T + b) + scaling * S @ B.T            W decoded per tile, the expand in the epilogue
Backward: ``lora.py``'s backward launcher for dA and dB, and one launch here for
  dx       dX = dY @ W + (dS @ A) * mask / (1 - p),  dS = scaling * dY @ B summed in the same loop, from the dY
           tiles the base product reads (no second pass over dY for it), the mask regenerated from the seed.

The base GEMM runs in ``base_dtype`` (bitsandbytes' compute dtype): X is cast to it, and when it is not X's dtype
the base product (+ bias) is rounded to it before the low-rank part is added, as ``Linear4bit`` rounds its output.
Shapes follow torch.nn.Linear: X [M, K], A [r, K], B [N, r]. Any strides for X, A, B; offsets in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    apply_keep,
    autotune,
    dot_in_fp32,
    dropout_keep,
    fp32_precision,
    gemm_configs,
    grouped_tile,
    interpreting,
    lowrank_dot,
    m_bucket,
    mma,
    rank_block,
)
from .lora import _dropout_args, _lora_shrink_kernel, _row_block, lora_backward

__all__ = ["lora4bit_forward", "lora4bit_backward", "DTYPE_CODES"]

# The dtypes a decoded weight passes through, as kernel switches (a tl.dtype is not a portable constexpr).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# --------------------------------------------------------------------------------------------------------
# decoding a tile of W
# --------------------------------------------------------------------------------------------------------


# Triton's CPU interpreter converts fp32 to bf16 by truncation; the GPU (and torch) round to nearest even. The
# kernels round bitsandbytes' values to bf16 as torch does, so under the interpreter they round the bits first.
_INTERPRETING: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def _cast(values, DTYPE: tl.constexpr):
    """values converted (rounded to nearest even) to the dtype of code DTYPE (``DTYPE_CODES``)."""
    if DTYPE == 1:
        out = values.to(tl.float16)
    elif DTYPE == 2:
        if _INTERPRETING:
            bits = values.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            values = bits.to(tl.float32, bitcast=True)  # now a bf16 value: truncating it is exact
        out = values.to(tl.bfloat16)
    else:
        out = values.to(tl.float32)
    return out


@triton.jit
def _code_value(code, NF4: tl.constexpr):
    """The float32 value of each 4-bit code (int32 tile in [0, 16)): bitsandbytes' NF4 or FP4 table (the values
    of ``reference.four_bit_code``, written out exactly), by a tree of selects on the code's bits: no table in
    memory, no gather."""
    bit0 = (code & 1) != 0
    bit1 = (code & 2) != 0
    bit2 = (code & 4) != 0
    bit3 = (code & 8) != 0
    if NF4:
        low = tl.where(bit2,
                       tl.where(bit1, tl.where(bit0, 0.0, -0.09105003625154495),
                                tl.where(bit0, -0.18477343022823334, -0.28444138169288635)),
                       tl.where(bit1, tl.where(bit0, -0.39491748809814453, -0.5250730514526367),
                                tl.where(bit0, -0.6961928009986877, -1.0)))
        high = tl.where(bit2,
                        tl.where(bit1, tl.where(bit0, 1.0, 0.7229568362236023),
                                 tl.where(bit0, 0.5626170039176941, 0.44070982933044434)),
                        tl.where(bit1, tl.where(bit0, 0.33791524171829224, 0.24611230194568634),
                                 tl.where(bit0, 0.16093020141124725, 0.07958029955625534)))
        return tl.where(bit3, high, low)
    # FP4: the low three bits give the magnitude, bit 3 the sign (code 8 is -0.0, as in bitsandbytes' table).
    magnitude = tl.where(bit2,
                         tl.where(bit1, tl.where(bit0, 0.25, 0.1666666716337204),
                                  tl.where(bit0, 0.5, 0.3333333432674408)),
                         tl.where(bit1, tl.where(bit0, 1.0, 0.6666666865348816),
                                  tl.where(bit0, 0.0052083334885537624, 0.0)))
    return tl.where(bit3, -magnitude, magnitude)


@triton.jit
def _mul_rounded(a, b):
    """a * b in float32, rounded on its own: never contracted with a following add into one FMA (bitsandbytes
    stores the double-quantized absmax's product before adding the offset). PTX ``mul.rn`` is never fused."""
    if _INTERPRETING:
        product = a * b
    else:
        product = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                            is_pure=True, pack=1)
    return product


@triton.jit
def _block_scales(ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, blocks, mask,
                  NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The float32 scale of each block index in ``blocks`` (0 where ``mask`` is off): absmax[block], or the
    double-quantized ``nested_code[absmax[block]] * nested_absmax[block // NESTED_BLOCKSIZE] + offset``."""
    if NESTED:
        codes = tl.load(ABSMAX + blocks, mask=mask, other=0).to(tl.int32)
        product = _mul_rounded(tl.load(NESTED_CODE + codes, mask=mask, other=0.0),
                               tl.load(NESTED_ABSMAX + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0))
        scale = tl.where(mask, product + tl.load(OFFSET), 0.0)
    else:
        scale = tl.load(ABSMAX + blocks, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize_tile(PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, ns, n_ok, k0, K,
                     NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                     NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                     W_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr, TILE_K: tl.constexpr):
    """W[ns, k0:k0 + TILE_K] as a [len(ns), TILE_K] tile in the base dtype, decoded from the packed bytes.

    Elements outside the weight (rows not in ``n_ok``, columns past K) are zeros. EVEN_K (K even): a row starts on
    a byte, so the tile reads TILE_K / 2 bytes per row and splits each into its two codes. ROW_BLOCKS (K a
    multiple of the blocksize): no block crosses a row, and a tile no wider than a block has one scale per row.
    """
    ks = k0 + tl.arange(0, TILE_K).to(tl.int64)
    k_ok = ks < K
    if EVEN_K:
        pairs = k0 // 2 + tl.arange(0, TILE_K // 2).to(tl.int64)
        packed = tl.load(PACKED + ns[:, None] * (K // 2) + pairs[None, :],
                         mask=n_ok[:, None] & (pairs < K // 2)[None, :], other=0).to(tl.int32)
        codes = tl.interleave(packed >> 4, packed & 15)
    else:
        flat = ns[:, None] * K + ks[None, :]
        packed = tl.load(PACKED + flat // 2, mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.int32)
        codes = (packed >> (4 - 4 * (flat & 1)).to(tl.int32)) & 15
    values = _code_value(codes, NF4)
    if ROW_BLOCKS and TILE_K <= BLOCKSIZE:
        # One block per row in this tile (K and k0 are multiples of TILE_K here): one scale per row.
        scale = _block_scales(ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, ns * (K // BLOCKSIZE) + k0 // BLOCKSIZE,
                              n_ok, NESTED, NESTED_BLOCKSIZE)
        values = values * scale[:, None]
    elif ROW_BLOCKS:
        scale = _block_scales(ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET,
                              ns[:, None] * (K // BLOCKSIZE) + ks[None, :] // BLOCKSIZE,
                              n_ok[:, None] & k_ok[None, :], NESTED, NESTED_BLOCKSIZE)
        values = values * scale
    else:
        scale = _block_scales(ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, (ns[:, None] * K + ks[None, :]) // BLOCKSIZE,
                              n_ok[:, None] & k_ok[None, :], NESTED, NESTED_BLOCKSIZE)
        values = values * scale
    # Masked elements decode to code * 0 (the scale's `other`); the cast is bitsandbytes' (fp32 product, rounded
    # once to the weight's dtype), then the base dtype's.
    return _cast(_cast(values, W_DTYPE), BASE_DTYPE)


# --------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). BLOCK_K 32 first, since the decoded [BLOCK_N, BLOCK_K] tile of W
# lives in registers beside the accumulator (with 64 the first config spilled; (16, 64, 128) spilled too).
_TILES = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3),
          (32, 64, 64, 4, 3), (16, 64, 64, 4, 4)]
# With an fp32 operand (fp32 activations, or fp32 adapters beside 16-bit ones) the products split it for the
# tensor cores (tf32x3) and hold more registers, and the other tiles spill on sm_90a (ptxas -v, triton 3.6, over
# tests/_triton_compile.py's workload: every tile of the dX kernel but these two, and in the forward those the
# double-quant decode pushes over), so the autotuner never considers them there.
_FP32_TILES = {
    "fwd": [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 64, 4, 3)],
    "dx": [(128, 64, 32, 8, 3), (64, 64, 32, 8, 3)],
}


def _configs(kernel: str | None = None) -> list[triton.Config]:
    """The GEMM tiles for the 4-bit kernels; ``kernel`` ("fwd", "dx"): those of its fp32 path."""
    if interpreting():
        return gemm_configs()
    tiles = _TILES if kernel is None else _FP32_TILES[kernel]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


_FWD_KEY = ["M_BUCKET", "N", "K", "R", "NF4", "BLOCKSIZE", "EVEN_K", "ROW_BLOCKS", "NESTED", "NESTED_BLOCKSIZE",
            "W_DTYPE", "BASE_DTYPE", "ROUND_BASE", "HAS_BIAS", "BASE_FP32", "LORA_FP32", "PRECISION"]


@autotune(_configs(), _FWD_KEY)
@triton.jit
def _lora4bit_fwd_kernel(
    X, PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, BIAS, S, B, Y,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    W_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr, ROUND_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BASE_FP32: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """Y = base(X @ W.T + bias) + scaling * S @ B.T, one (BLOCK_M x BLOCK_N) tile per program, W decoded per
    [BLOCK_N, BLOCK_K] tile."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
        w = _dequantize_tile(PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, cols, col_ok, k0, K, NF4, BLOCKSIZE,
                             EVEN_K, ROW_BLOCKS, NESTED, NESTED_BLOCKSIZE, W_DTYPE, BASE_DTYPE, BLOCK_K)
        acc = mma(_cast(x, BASE_DTYPE), tl.trans(w), acc, BASE_FP32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_BASE:
        # bitsandbytes' F.linear returns the compute dtype, cast to x's dtype before the LoRA term is added.
        acc = _cast(acc, BASE_DTYPE).to(Y.dtype.element_ty).to(tl.float32)
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    s = tl.load(S + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    b_t = tl.load(B + cols[None, :] * stride_bn + ranks[:, None] * stride_br,
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    acc = lowrank_dot(s * scaling, b_t, acc, LORA_FP32, PRECISION)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# The same kernel, autotuned over its fp32 path's tiles (the launcher picks by the switches): the autotuner and
# tests/_triton_compile.py see exactly the configs a launch may run.
_lora4bit_fwd_kernel_fp32 = autotune(_configs("fwd"), _FWD_KEY)(_lora4bit_fwd_kernel.fn)

_DX_KEY = ["M_BUCKET", "N", "K", "R", "NF4", "BLOCKSIZE", "EVEN_K", "ROW_BLOCKS", "NESTED", "NESTED_BLOCKSIZE",
           "W_DTYPE", "BASE_DTYPE", "ROUND_BASE", "HAS_DROPOUT", "BASE_FP32", "LORA_FP32", "PRECISION"]


@autotune(_configs(), _DX_KEY)
@triton.jit
def _lora4bit_bwd_dx_kernel(
    DY, PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, B, A, DX, SEED,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_ar, stride_ak, stride_dxm, stride_dxk,
    scaling, p_drop, inv_keep,
    NF4: tl.constexpr, BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    W_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr, ROUND_BASE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BASE_FP32: tl.constexpr, LORA_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dX = base(dY @ W) + (scaling * dY @ B) @ A * mask / (1 - p).

    dX tiles are BLOCK_M x BLOCK_N over (M x K); the reduction over N runs in steps of BLOCK_K, each step decoding
    a [BLOCK_K, BLOCK_N] tile of W and adding dY's tile times B to the [BLOCK_M, r] dS of these rows.
    """
    tile_m, tile_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP)
    k0 = tile_k.to(tl.int64) * BLOCK_N
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = k0 + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < K
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
        n_ok = ns < N
        dy = tl.load(DY + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = _dequantize_tile(PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET, ns, n_ok, k0, K, NF4, BLOCKSIZE,
                             EVEN_K, ROW_BLOCKS, NESTED, NESTED_BLOCKSIZE, W_DTYPE, BASE_DTYPE, BLOCK_N)
        acc = mma(_cast(dy, BASE_DTYPE), w, acc, BASE_FP32, PRECISION)
        # dS from the dY tile already loaded (a separate pass before the loop, to free the masked low-rank
        # tile's registers early as lora.py's dx kernel does, spilled more here: ptxas -v, sm_90).
        b = tl.load(B + ns[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=n_ok[:, None] & rank_ok[None, :], other=0.0)
        ds = mma(dy, b, ds, LORA_FP32, PRECISION)
    if ROUND_BASE:
        acc = _cast(acc, BASE_DTYPE).to(DX.dtype.element_ty).to(tl.float32)
    a = tl.load(A + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_DROPOUT:
        lowrank = lowrank_dot(ds * scaling, a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LORA_FP32,
                              PRECISION)
        acc += apply_keep(lowrank, dropout_keep(tl.load(SEED), rows, cols, K, p_drop)) * inv_keep
    else:
        acc = lowrank_dot(ds * scaling, a, acc, LORA_FP32, PRECISION)
    tl.store(DX + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


_lora4bit_bwd_dx_kernel_fp32 = autotune(_configs("dx"), _DX_KEY)(_lora4bit_bwd_dx_kernel.fn)


# --------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------


def _contiguous(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"{name}: expected contiguous {dtype}, got {tensor.dtype} (contiguous: "
                         f"{tensor.is_contiguous()})")


def _weight_args(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, quant_type, blocksize,
                 in_features, weight_dtype, base_dtype, x_dtype) -> tuple[tuple, dict]:
    """(the kernels' PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OFFSET arguments, the constexpr switches both
    kernels take for this weight)."""
    _contiguous("packed", packed, torch.uint8)
    nested = nested_absmax is not None
    if nested:
        _contiguous("absmax", absmax, torch.uint8)
        _contiguous("nested_absmax", nested_absmax, torch.float32)
        _contiguous("nested_code", nested_code, torch.float32)
        _contiguous("offset", offset, torch.float32)
        pointers = (packed, absmax, nested_code, nested_absmax, offset)
    else:
        _contiguous("absmax", absmax, torch.float32)
        pointers = (packed, absmax, absmax, absmax, absmax)  # the nested pointers are never read
    switches = dict(
        NF4=quant_type == "nf4", BLOCKSIZE=blocksize, EVEN_K=in_features % 2 == 0,
        ROW_BLOCKS=in_features % blocksize == 0, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize if nested else 1,
        W_DTYPE=DTYPE_CODES[weight_dtype], BASE_DTYPE=DTYPE_CODES[base_dtype], ROUND_BASE=base_dtype != x_dtype,
        BASE_FP32=dot_in_fp32(base_dtype),  # x is cast to the base dtype for the product
    )
    return pointers, switches


def _shrink(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, dropout_p: float,
            seed: torch.Tensor | None) -> torch.Tensor:
    """S = dropout(X) @ A.T / (1 - p), [M, r] fp32: ``lora.py``'s shrink kernel, launched as ``lora_forward``
    launches it (the same dropout stream, the same products)."""
    M, K = x.shape
    R = lora_a.shape[0]
    s = torch.empty((M, R), device=x.device, dtype=torch.float32)
    seed_arg, has_dropout, p_drop, inv_keep = _dropout_args(seed, dropout_p, s)
    block_m = _row_block()
    _lora_shrink_kernel[(triton.cdiv(M, block_m),)](
        x, lora_a, s, seed_arg, M, K, R,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1),
        p_drop, inv_keep,
        HAS_DROPOUT=has_dropout, DOT_FP32=dot_in_fp32(x.dtype, lora_a.dtype, lora_b.dtype),
        PRECISION=fp32_precision(), BLOCK_M=block_m, BLOCK_K=16 if interpreting() else 64, BLOCK_R=rank_block(R),
    )
    return s


def lora4bit_forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    out_features: int,
    weight_dtype: torch.dtype,
    base_dtype: torch.dtype,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (Y [M, N] in x's dtype, S [M, r] fp32). x: [M, K] (any strides); packed: uint8 bytes of the
    [N, K] weight; absmax: float32 [blocks], or uint8 [blocks] codes when double-quantized, with nested_absmax
    (float32, one per nested_blocksize blocks), nested_code (float32 [256]) and offset (float32, one element, on
    the device); bias: [N] in ``base_dtype`` or None; inputs already checked."""
    M, K = x.shape
    N, R = out_features, lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, torch.empty((0, R), device=x.device, dtype=torch.float32)
    s = _shrink(x, lora_a, lora_b, dropout_p, seed)
    pointers, switches = _weight_args(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize,
                                      quant_type, blocksize, K, weight_dtype, base_dtype, x.dtype)
    lora_fp32 = dot_in_fp32(x.dtype, lora_b.dtype)
    kernel = _lora4bit_fwd_kernel_fp32 if switches["BASE_FP32"] or lora_fp32 else _lora4bit_fwd_kernel
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel[grid](
        x, *pointers, bias if bias is not None else y, s, lora_b, y,
        M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        float(scaling),
        **switches, HAS_BIAS=bias is not None, LORA_FP32=lora_fp32,
        PRECISION=fp32_precision(), BLOCK_R=rank_block(R),
    )
    return y, s


def lora4bit_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    quant_type: str,
    blocksize: int,
    out_features: int,
    weight_dtype: torch.dtype,
    base_dtype: torch.dtype,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (dX [M, K] or None, dA [r, K], dB [N, r]) in the dtypes of x, A and B. grad_y: [M, N] in x's dtype;
    s: [M, r] fp32 from the forward; the weight as for :func:`lora4bit_forward`. dA and dB are ``lora.py``'s
    backward (which needs W only for its shape)."""
    M, K = x.shape
    N, R = out_features, lora_a.shape[0]
    shape_only = x.new_empty((1, 1)).expand(N, K)  # lora_backward without dX reads W's shape, never its values
    _, grad_a, grad_b = lora_backward(grad_y, x, shape_only, lora_a, lora_b, s, scaling, dropout_p, seed, False)
    if not need_dx:
        return None, grad_a, grad_b
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
    if M == 0:
        return dx, grad_a, grad_b
    seed_arg, has_dropout, p_drop, inv_keep = _dropout_args(seed, dropout_p, s)
    pointers, switches = _weight_args(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize,
                                      quant_type, blocksize, K, weight_dtype, base_dtype, x.dtype)
    lora_fp32 = dot_in_fp32(grad_y.dtype, lora_a.dtype, lora_b.dtype)
    kernel = _lora4bit_bwd_dx_kernel_fp32 if switches["BASE_FP32"] or lora_fp32 else _lora4bit_bwd_dx_kernel
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
    kernel[grid](
        grad_y, *pointers, lora_b, lora_a, dx, seed_arg,
        M, N, K, R, m_bucket(M),
        grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1),
        lora_a.stride(0), lora_a.stride(1), dx.stride(0), dx.stride(1),
        float(scaling), p_drop, inv_keep,
        **switches, HAS_DROPOUT=has_dropout, LORA_FP32=lora_fp32,
        PRECISION=fp32_precision(), BLOCK_R=rank_block(R),
    )
    return dx, grad_a, grad_b
