"""The CUDA C++ backend of the LoRA linear, and the helpers every ``_cuda_*`` module shares.

Default path (``BASE_GEMM = "cublas"``): the frozen base GEMM is torch's (``F.linear`` / ``matmul``: cuBLAS or
cuBLASLt on the GPU), and only the low-rank part runs peftkern's own kernels, the serving pieces of
``csrc/include/peftkern/lora_serving.cuh`` (through ``_cuda_multi_lora.lora_shrink`` / ``lora_expand_add``)
with one adapter slot:

    forward   y = F.linear(x, W, b)                              cuBLAS
              s = shrink(x * keep, A) / (1 - p)                  [M, r] fp32; M <= 64: the row-parallel
                                                                 (decode) kernel, else one 64-row tile table
              y += scaling * s @ B.T                             expand-add, fp32 sum rounded once into y
    backward  dS = scaling * shrink(dY, B.T)                     [M, r] fp32
              dX = dY @ W  (+)  expand(dS, A.T) * keep / (1 - p)  cuBLAS, then expand-add (into dX directly
                                                                 without dropout; else into an fp32 buffer
                                                                 that one addcmul masks and adds)
              dA = dS.T @ (x * keep) / (1 - p), dB = scaling * dY.T @ s    small cuBLAS GEMMs in fp32 (x and
                                                                 dY read through fp32 copies, as the torch
                                                                 backend does)

The dropout keep-mask is ``_dropout.keep_mask``'s (the torch and Triton backends' stream, bit for bit).

``BASE_GEMM = "fused"`` (or ``PEFTKERN_CUDA_BASE_GEMM=fused`` in the environment) runs instead the
header-level fused kernels of ``csrc/include/peftkern/lora.cuh`` (the WMMA base GEMM with the low-rank
expand in its epilogue, and its own dropout), the option for callers without cuBLAS; an explicit opt-in, not
the default, since a hand-written 64x64 WMMA tile is far behind cuBLAS on Hopper.

Outputs and workspaces are allocated here with torch (so they come from torch's caching allocator and
follow its stream semantics); the extension only launches kernels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..backends import cuda_extension
from ._dropout import keep_mask

__all__ = ["BASE_GEMM_PATHS", "base_gemm_path", "lora_forward", "lora_backward", "lora_forward_fused",
           "lora_backward_fused"]

BASE_GEMM_PATHS = ("cublas", "fused")
# The path backend "cuda" runs for lora_linear: None = the environment's PEFTKERN_CUDA_BASE_GEMM, else "cublas".
BASE_GEMM: str | None = None
# Up to this many rows the shrink runs the row-parallel (decode) kernel; above it, 64-row tiles of one adapter
# (peftkern::kMultiLoraDecodeMaxRows, peftkern::kMultiLoraSegmentRows).
DECODE_MAX_ROWS = 64
SEGMENT_ROWS = 64


def _dtype_code(ext, dtype: torch.dtype, name: str) -> int:
    codes = {torch.float16: ext.FLOAT16, torch.bfloat16: ext.BFLOAT16, torch.float32: ext.FLOAT32}
    if dtype not in codes:
        raise TypeError(f"{name}: backend 'cuda' supports float16, bfloat16 and float32, got {dtype}")
    return codes[dtype]


def _adapter_code(ext, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> int:
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b: expected the dtype of lora_a ({lora_a.dtype}), got {lora_b.dtype}")
    if lora_a.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_a: expected the dtype of x ({x.dtype}) or float32, got {lora_a.dtype}")
    return _dtype_code(ext, lora_a.dtype, "lora_a")


def _linear_codes(ext, x, weight, bias, lora_a, lora_b):
    """(activation dtype code, adapter dtype code, bias in x's dtype or None) for the LoRA-style launchers;
    raises TypeError naming the argument for dtypes the kernels do not take."""
    dtype = _dtype_code(ext, x.dtype, "x")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected the dtype of x ({x.dtype}), got {weight.dtype}")
    adapter = _adapter_code(ext, x, lora_a, lora_b)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # the kernel reads bias in x's dtype (F.linear would require it)
    return dtype, adapter, bias


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return int(t.stride(0)), int(t.stride(1))


def _launch_context(x: torch.Tensor) -> tuple[int, int]:
    """(device index, stream handle) of torch's current stream on x's device."""
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return device, int(torch.cuda.current_stream(device).cuda_stream)


def _seed_address(seed: torch.Tensor | None, dropout_p: float, x: torch.Tensor) -> tuple[int, float]:
    if seed is None or dropout_p == 0.0:
        return 0, 0.0
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
        raise ValueError(
            f"seed: expected one int64 value on {x.device}, "
            f"got {seed.numel()} of {seed.dtype} on {seed.device}"
        )
    return int(seed.data_ptr()), float(dropout_p)


def lora_forward_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """lora.cuh's fused forward (the WMMA base GEMM, expand in its epilogue): returns (Y [M, N] in x's dtype,
    S [M, r] fp32). x: [M, K] (any strides); inputs already checked."""
    ext = cuda_extension()
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, s
    dtype, adapter, bias = _linear_codes(ext, x, weight, bias, lora_a, lora_b)
    seed_ptr, p_drop = _seed_address(seed, dropout_p, x)
    with torch.cuda.device(x.device):
        device, stream = _launch_context(x)
        ext.lora_forward(
            dtype, adapter,
            x.data_ptr(), _strides(x),
            weight.data_ptr(), _strides(weight),
            bias.data_ptr() if bias is not None else 0, int(bias.stride(0)) if bias is not None else 0,
            lora_a.data_ptr(), _strides(lora_a),
            lora_b.data_ptr(), _strides(lora_b),
            s.data_ptr(), y.data_ptr(), _strides(y),
            M, N, K, R, float(scaling), p_drop, seed_ptr, device, stream,
        )
    return y, s


def lora_backward_fused(
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
    """lora.cuh's fused backward: returns (dX [M, K] or None, dA [r, K], dB [N, r]) in the dtypes of x, A
    and B. grad_y: [M, N]; x: [M, K]; s: [M, r] fp32 (from the forward). dW and db are left to the caller.
    """
    ext = cuda_extension()
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else None
    if M == 0:
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    dtype = _dtype_code(ext, x.dtype, "x")
    adapter = _adapter_code(ext, x, lora_a, lora_b)
    grad_y = grad_y.to(x.dtype)
    if s.dtype != torch.float32 or tuple(s.shape) != (M, R):
        raise ValueError(
            f"s: expected a float32 [{M}, {R}] tensor from the forward, got {s.dtype} {tuple(s.shape)}"
        )
    s = s.contiguous()  # the kernels read s with row stride R
    grad_a = torch.empty((R, K), device=x.device, dtype=lora_a.dtype)
    grad_b = torch.empty((N, R), device=x.device, dtype=lora_b.dtype)
    workspace_floats = ext.lora_backward_workspace_floats(M, N, K, R)
    workspace = torch.empty(workspace_floats, device=x.device, dtype=torch.float32)
    seed_ptr, p_drop = _seed_address(seed, dropout_p, x)
    with torch.cuda.device(x.device):
        device, stream = _launch_context(x)
        ext.lora_backward(
            dtype, adapter,
            grad_y.data_ptr(), _strides(grad_y),
            x.data_ptr(), _strides(x),
            weight.data_ptr(), _strides(weight),
            lora_a.data_ptr(), _strides(lora_a),
            lora_b.data_ptr(), _strides(lora_b),
            s.data_ptr(),
            dx.data_ptr() if dx is not None else 0, _strides(dx) if dx is not None else (0, 0),
            grad_a.data_ptr(), grad_b.data_ptr(),
            workspace.data_ptr(), workspace_floats,
            M, N, K, R, float(scaling), p_drop, seed_ptr, device, stream,
        )
    return dx, grad_a, grad_b


# ---- the default path: cuBLAS for the base GEMM, peftkern's shrink / expand-add for the low-rank part ------


def base_gemm_path() -> str:
    """The path ``lora_linear`` runs on backend "cuda": "cublas" (the default) or "fused" (``BASE_GEMM``, else
    the environment variable ``PEFTKERN_CUDA_BASE_GEMM``)."""
    path = BASE_GEMM if BASE_GEMM is not None else (os.environ.get("PEFTKERN_CUDA_BASE_GEMM") or "cublas")
    if path not in BASE_GEMM_PATHS:
        raise ValueError(f"PEFTKERN_CUDA_BASE_GEMM: expected one of {BASE_GEMM_PATHS}, got {path!r}")
    return path


def _serving():
    """The serving launchers (``_cuda_multi_lora`` imports this module: imported on use)."""
    from . import _cuda_multi_lora

    return _cuda_multi_lora


def _one_slot(x: torch.Tensor, R: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [M] int32 zeros, ranks [1] int32 = R, scalings [1] fp32 = scale): a batch whose every row uses the
    one adapter slot, built on x's device by fills (no host-to-device copy, no sync)."""
    M = x.shape[0]
    meta = torch.zeros(M + 1, device=x.device, dtype=torch.int32)
    meta[M:].fill_(R)
    return meta[:M], meta[M:], torch.full((1,), scale, device=x.device, dtype=torch.float32)


def _one_slot_segments(M: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """None up to DECODE_MAX_ROWS rows (the shrink's row-parallel decode kernel: a block per row and 16
    ranks, threads split K with 16-byte loads); else the segment table (perm, tiles) of one adapter: rows in
    place, tiles (0, 64 t, M) (the tiled kernels: tensor cores when A is in x's 16-bit dtype)."""
    if M <= DECODE_MAX_ROWS:
        return None
    n_tiles = -(-M // SEGMENT_ROWS)
    perm = torch.arange(M, device=device, dtype=torch.int64)
    tiles = torch.empty((3, n_tiles), device=device, dtype=torch.int64)
    tiles[0].zero_()
    torch.arange(0, n_tiles * SEGMENT_ROWS, SEGMENT_ROWS, out=tiles[1])
    tiles[2].fill_(M)
    return perm, tiles


def _keep(seed: torch.Tensor | None, x: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    if seed is None or dropout_p == 0.0:
        return None
    return keep_mask(seed, tuple(x.shape), dropout_p, x.dtype)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (Y [M, N] in x's dtype, S [M, r] fp32). x: [M, K] (any strides); inputs already checked.
    See the module docstring for the path (``base_gemm_path()``)."""
    if base_gemm_path() == "fused":
        return lora_forward_fused(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    _, _, bias = _linear_codes(cuda_extension(), x, weight, bias, lora_a, lora_b)
    M, R = x.shape[0], lora_a.shape[0]
    y = F.linear(x, weight, bias)
    if M == 0:
        return y, torch.empty((0, R), device=x.device, dtype=torch.float32)
    keep = _keep(seed, x, dropout_p)
    ids, ranks, scalings = _one_slot(x, R, scaling)
    serving = _serving()
    s = serving.lora_shrink(x if keep is None else x * keep, [lora_a.unsqueeze(0)], ids, ranks,
                            _one_slot_segments(M, x.device))[0]
    if keep is not None:
        s.mul_(1.0 / (1.0 - dropout_p))
    serving.lora_expand_add(y, s.unsqueeze(0), [lora_b.unsqueeze(0)], ids, scalings, ranks, 0)
    return y, s


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
    if base_gemm_path() == "fused":
        return lora_backward_fused(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx)
    _linear_codes(cuda_extension(), x, weight, None, lora_a, lora_b)
    M, K = x.shape
    R = lora_a.shape[0]
    if M == 0:
        dx = torch.empty((0, K), device=x.device, dtype=x.dtype) if need_dx else None
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    if s.dtype != torch.float32 or tuple(s.shape) != (M, R):
        raise ValueError(
            f"s: expected a float32 [{M}, {R}] tensor from the forward, got {s.dtype} {tuple(s.shape)}"
        )
    dy = grad_y.to(x.dtype)
    keep = _keep(seed, x, dropout_p)
    inv_keep = 1.0 if keep is None else 1.0 / (1.0 - dropout_p)
    ids, ranks, scalings = _one_slot(x, R, inv_keep)
    serving = _serving()
    # dS = scaling * dY @ B: the shrink with B.T [r, N] (copied contiguous, r * N elements, for 16-byte loads).
    b_t = lora_b.t().contiguous().unsqueeze(0)
    ds = serving.lora_shrink(dy, [b_t], ids, ranks, _one_slot_segments(M, x.device))[0].mul_(scaling)
    dropped = x if keep is None else x * keep
    # The small GEMMs dA [r, K] and dB [N, r] on cuBLAS in fp32, as the torch backend computes them: rounding
    # the [M, r] operand to 16 bits instead (to read dY / x as they are) misses bf16's tolerance at M = 130
    # when the sum cancels; the fp32 copies of x and dY are this path's extra traffic.
    grad_a = ds.mul(inv_keep).t() @ dropped.float()
    grad_b = dy.t().float() @ s.mul(scaling)
    grad_a, grad_b = grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)
    if not need_dx:
        return None, grad_a, grad_b
    dx = dy @ weight
    a_t = lora_a.unsqueeze(0).transpose(1, 2)  # [1, K, r]: expand-add's B
    if keep is None:  # dX += dS @ A, summed in fp32 and rounded once into dX
        serving.lora_expand_add(dx, ds.unsqueeze(0), [a_t], ids, scalings, ranks, 0)
    else:  # dX += (dS @ A / (1 - p)) * keep: the LoRA part in fp32, masked and added in one pass
        lora = torch.zeros((M, K), device=x.device, dtype=torch.float32)
        serving.lora_expand_add(lora, ds.unsqueeze(0), [a_t.float()], ids, scalings, ranks, 0)
        dx.addcmul_(lora, keep)
    return dx, grad_a, grad_b
