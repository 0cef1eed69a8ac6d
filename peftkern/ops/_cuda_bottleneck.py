"""The CUDA C++ launchers of the fused bottleneck adapter: the same signatures and return conventions as
``peftkern.triton_kernels.bottleneck``'s, calling the header-only kernels of
``csrc/include/peftkern/bottleneck.cuh`` through ``peftkern._C`` with raw device addresses on torch's
current stream.

Outputs and workspaces (the forward's act(H) operand, the backward's dH and fp32 partial sums) are allocated
here with torch; the extension only launches kernels. The weight gradients walk each adapter's rows in the
order that ``adapter_segments`` builds on the device (the Triton path's grouping, no host sync).
"""

from __future__ import annotations

import torch

from ..backends import cuda_extension
from ._cuda import _dtype_code, _launch_context, _strides

__all__ = ["ACTIVATION_CODES", "bottleneck_forward", "bottleneck_backward"]

# The kernels' activation codes (peftkern::BottleneckActivation; the Triton kernels use the same).
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "swish": 3, "tanh": 4}


def _weight_code(ext, x: torch.Tensor, weight: torch.Tensor) -> int:
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"down_weight: expected the dtype of x ({x.dtype}) or float32, got {weight.dtype}")
    return _dtype_code(ext, weight.dtype, "down_weight")


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return int(t.stride(0)), int(t.stride(1)), int(t.stride(2))


def _ids(adapter_ids: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    """(contiguous ids or None, their address or 0, their bit width)."""
    if adapter_ids is None:
        return None, 0, 64
    ids = adapter_ids.contiguous()
    return ids, int(ids.data_ptr()), 32 if ids.dtype == torch.int32 else 64


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
    up_bias [L, D] or None (biases in the weights' dtype); residual [M, D] or None (then x);
    adapter_ids [M] int32/int64 or None (every row uses adapter 0).
    """
    ext = cuda_extension()
    M, D = x.shape
    L, NB = down_weight.shape[0], down_weight.shape[1]
    y = torch.empty((M, D), device=x.device, dtype=x.dtype)
    h = torch.empty((M, NB), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, h
    dtype = _dtype_code(ext, x.dtype, "x")
    adapter = _weight_code(ext, x, down_weight)
    act = torch.empty((M, NB), device=x.device, dtype=down_weight.dtype)
    ids, ids_ptr, ids_bits = _ids(adapter_ids)
    with torch.cuda.device(x.device):
        device, stream = _launch_context(x)
        ext.bottleneck_forward(
            dtype, adapter,
            x.data_ptr(), _strides(x),
            down_weight.data_ptr(), _strides3(down_weight),
            down_bias.data_ptr() if down_bias is not None else 0,
            _strides(down_bias) if down_bias is not None else (0, 0),
            up_weight.data_ptr(), _strides3(up_weight),
            up_bias.data_ptr() if up_bias is not None else 0,
            _strides(up_bias) if up_bias is not None else (0, 0),
            residual.data_ptr() if residual is not None else 0,
            _strides(residual) if residual is not None else (0, 0),
            ids_ptr, ids_bits,
            h.data_ptr(), act.data_ptr(), y.data_ptr(), _strides(y),
            M, D, NB, L, ACTIVATION_CODES[activation], float(scaling), device, stream,
        )
    return y, h


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
    ext = cuda_extension()
    M, D = x.shape
    L, NB = down_weight.shape[0], down_weight.shape[1]
    wdtype = down_weight.dtype
    dx = torch.empty((M, D), device=x.device, dtype=x.dtype) if need_dx else None
    if M == 0:
        if not need_weights:
            return dx, None, None, None, None
        zeros = lambda *shape: torch.zeros(shape, device=x.device, dtype=wdtype)
        return (dx, zeros(L, NB, D), zeros(L, NB) if has_down_bias else None,
                zeros(L, D, NB), zeros(L, D) if has_up_bias else None)
    dtype = _dtype_code(ext, x.dtype, "x")
    adapter = _weight_code(ext, x, down_weight)
    if up_weight.dtype != wdtype:
        raise TypeError(f"up_weight: expected the dtype of down_weight ({wdtype}), got {up_weight.dtype}")
    grad_y = grad_y.to(x.dtype)
    if h.dtype != torch.float32 or tuple(h.shape) != (M, NB):
        raise ValueError(f"h: expected a float32 [{M}, {NB}] tensor from the forward, got {h.dtype} {tuple(h.shape)}")
    h = h.contiguous()  # the kernels read h with row stride Bn
    ids, ids_ptr, ids_bits = _ids(adapter_ids)
    dh = torch.empty((M, NB), device=x.device, dtype=wdtype)
    grads = [None, None, None, None]  # dWd, dbd, dWu, dbu
    order = segments = workspace = None
    workspace_floats = 0
    if need_weights:
        grads = [
            torch.empty((L, NB, D), device=x.device, dtype=wdtype),
            torch.empty((L, NB), device=x.device, dtype=wdtype) if has_down_bias else None,
            torch.empty((L, D, NB), device=x.device, dtype=wdtype),
            torch.empty((L, D), device=x.device, dtype=wdtype) if has_up_bias else None,
        ]
        if ids is not None:
            from ..triton_kernels._segments import adapter_segments  # torch ops only (no triton): the same grouping

            order, segments = adapter_segments(ids, L)
        workspace_floats = ext.bottleneck_backward_workspace_floats(M, D, NB, L)
        workspace = torch.empty(workspace_floats, device=x.device, dtype=torch.float32)
    address = lambda t: t.data_ptr() if t is not None else 0
    with torch.cuda.device(x.device):
        device, stream = _launch_context(x)
        ext.bottleneck_backward(
            dtype, adapter,
            grad_y.data_ptr(), _strides(grad_y),
            x.data_ptr(), _strides(x),
            down_weight.data_ptr(), _strides3(down_weight),
            up_weight.data_ptr(), _strides3(up_weight),
            h.data_ptr(), ids_ptr, ids_bits,
            address(order), address(segments),
            address(dx), _strides(dx) if dx is not None else (0, 0), bool(add_grad_y),
            *(address(g) for g in grads),
            dh.data_ptr(), address(workspace), workspace_floats,
            M, D, NB, L, ACTIVATION_CODES[activation], float(scaling), device, stream,
        )
    return (dx, *grads)
