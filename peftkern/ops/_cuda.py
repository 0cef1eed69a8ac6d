"""The CUDA C++ launchers of the fused LoRA linear: the same signatures and return conventions as
``peftkern.triton_kernels.lora``'s, calling the header-only kernels of ``csrc/include/peftkern/lora.cuh``
through ``peftkern._C`` with raw device addresses on torch's current stream.

Outputs and workspaces are allocated here with torch (so they come from torch's caching allocator and
follow its stream semantics); the extension only launches kernels.
"""

from __future__ import annotations

import torch

from ..backends import cuda_extension

__all__ = ["lora_forward", "lora_backward"]


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
    """Returns (Y [M, N] in x's dtype, S [M, r] fp32). x: [M, K] (any strides); inputs already checked."""
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
