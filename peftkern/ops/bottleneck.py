"""``peftkern.bottleneck_adapter``: checks, backend dispatch, and the ``peftkern::bottleneck_adapter``
custom op with its fake implementation and autograd formula.

The op works on 2-D x [M, D] and stacked weights [L, ...] (one adapter is L = 1 with no ids); the public
function flattens leading dims and stacks single weights. Forward returns (y, h) where h = x @ Wd.T + bd is
the [M, Bn] pre-activation (fp32, float64 for float64 inputs), the only tensor saved for backward besides
the inputs: the activation and its derivative are recomputed from it.
"""

from __future__ import annotations

import torch

from .. import reference
from ..backends import resolve_backend
from ._checks import (
    INDEX_DTYPES,
    autocast_inputs,
    check_backend_dtypes,
    check_finite_scalar,
    check_same_device,
    check_shape,
    check_tensor,
    intermediate_dtype,
)

__all__ = ["bottleneck_adapter"]

OP = "bottleneck_adapter"


def _activation_grad(name: str, h: torch.Tensor) -> torch.Tensor:
    """d act(h) / dh, written out (the same formulas as the Triton kernels)."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
        return cdf + h * 0.3989422804014327 * torch.exp(-0.5 * h * h)
    if name == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    if name in ("silu", "swish"):
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    t = torch.tanh(h)
    return 1.0 - t * t


# ---- torch backend: plain torch ops, the same math as the kernels ---------------------------------------


def _row_masks(adapter_ids: torch.Tensor | None, num_adapters: int, like: torch.Tensor) -> list[torch.Tensor]:
    """Per adapter, a [M, 1] bool column selecting its rows (ids outside [0, L) select none).

    Rows are selected with ``torch.where``, never multiplied by a 0/1 mask: 0 * inf is NaN, and a
    non-finite activation in one row must not reach another row's output or another adapter's gradient.
    """
    if adapter_ids is None:
        return [torch.ones((like.shape[0], 1), dtype=torch.bool, device=like.device)]
    ids = adapter_ids.reshape(-1, 1)
    return [ids == adapter for adapter in range(num_adapters)]


def _torch_forward(x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation, scaling):
    compute = intermediate_dtype(x.dtype, down_weight.dtype)
    x_c = x.to(compute)
    masks = _row_masks(adapter_ids, down_weight.shape[0], x_c)
    # One product per adapter, its rows selected: simple and free of host syncs; the kernels gather per tile.
    h = x_c.new_zeros((x.shape[0], down_weight.shape[1]))
    for adapter, mask in enumerate(masks):
        part = x_c @ down_weight[adapter].to(compute).T
        if down_bias is not None:
            part = part + down_bias[adapter].to(compute)
        h = torch.where(mask, part, h)
    a = reference.apply_activation(activation, h)
    out = x_c.new_zeros(x_c.shape)
    for adapter, mask in enumerate(masks):
        part = a @ up_weight[adapter].to(compute).T
        if up_bias is not None:
            part = part + up_bias[adapter].to(compute)
        out = torch.where(mask, part, out)
    res = x if residual is None else residual
    return (res.to(compute) + scaling * out).to(x.dtype), h


def _torch_backward(grad_y, x, down_weight, up_weight, h, adapter_ids, activation, scaling, need_dx,
                    add_grad_y, need_weights, has_down_bias, has_up_bias):
    compute = h.dtype
    dy = grad_y.to(compute)
    x_c = x.to(compute)
    masks = _row_masks(adapter_ids, down_weight.shape[0], h)
    grad_a = h.new_zeros(h.shape)
    for adapter, mask in enumerate(masks):
        grad_a = torch.where(mask, dy @ up_weight[adapter].to(compute), grad_a)
    grad_h = scaling * grad_a * _activation_grad(activation, h)
    grad_x = None
    if need_dx:
        grad_x = dy.clone() if add_grad_y else x_c.new_zeros(x_c.shape)
        for adapter, mask in enumerate(masks):
            grad_x = torch.where(mask, grad_x + grad_h @ down_weight[adapter].to(compute), grad_x)
        grad_x = grad_x.to(x.dtype)
    if not need_weights:
        return grad_x, None, None, None, None
    a = reference.apply_activation(activation, h)
    d_down, d_up, d_down_bias, d_up_bias = [], [], [], []
    for mask in masks:
        dy_l = torch.where(mask, dy, 0.0)
        dh_l = torch.where(mask, grad_h, 0.0)
        d_up.append(scaling * (dy_l.T @ torch.where(mask, a, 0.0)))
        d_down.append(dh_l.T @ torch.where(mask, x_c, 0.0))
        d_up_bias.append(scaling * dy_l.sum(0))
        d_down_bias.append(dh_l.sum(0))
    wdtype = down_weight.dtype
    stack = lambda parts: torch.stack(parts).to(wdtype)
    return (
        grad_x,
        stack(d_down),
        stack(d_down_bias) if has_down_bias else None,
        stack(d_up),
        stack(d_up_bias) if has_up_bias else None,
    )


# ---- the custom ops ---------------------------------------------------------------------------------------


@torch.library.custom_op("peftkern::bottleneck_adapter", mutates_args=())
def _bottleneck_adapter_op(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    adapter_ids: torch.Tensor | None,
    activation: str,
    scaling: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ..triton_kernels.bottleneck import bottleneck_forward

        return bottleneck_forward(
            x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation, scaling
        )
    if backend == "cuda":
        from ._cuda_bottleneck import bottleneck_forward

        return bottleneck_forward(
            x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation, scaling
        )
    return _torch_forward(
        x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation, scaling
    )


@_bottleneck_adapter_op.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation, scaling, backend):
    y = x.new_empty(x.shape)
    h = x.new_empty((x.shape[0], down_weight.shape[1]), dtype=intermediate_dtype(x.dtype, down_weight.dtype))
    return y, h


@torch.library.custom_op("peftkern::bottleneck_adapter_backward", mutates_args=())
def _bottleneck_adapter_backward_op(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dX, dWd, dbd, dWu, dbu); each is an empty [0] tensor where it was not asked for."""
    grad_y = grad_y.contiguous() if grad_y.stride(-1) == 0 else grad_y  # expanded grads (e.g. from sum())
    args = (grad_y, x, down_weight, up_weight, h, adapter_ids, activation, scaling, need_dx, add_grad_y,
            need_weights, has_down_bias, has_up_bias)
    if backend == "triton":
        from ..triton_kernels.bottleneck import bottleneck_backward

        grads = bottleneck_backward(*args)
    elif backend == "cuda":
        from ._cuda_bottleneck import bottleneck_backward

        grads = bottleneck_backward(*args)
    else:
        grads = _torch_backward(*args)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_bottleneck_adapter_backward_op.register_fake
def _(grad_y, x, down_weight, up_weight, h, adapter_ids, activation, scaling, need_dx, add_grad_y,
      need_weights, has_down_bias, has_up_bias, backend):
    empty = x.new_empty(0)
    num_adapters, bottleneck, dim = down_weight.shape
    bias = lambda has, size: down_weight.new_empty((num_adapters, size)) if need_weights and has else empty
    return (
        x.new_empty(x.shape) if need_dx else empty,
        torch.empty_like(down_weight) if need_weights else empty,
        bias(has_down_bias, bottleneck),
        torch.empty_like(up_weight) if need_weights else empty,
        bias(has_up_bias, dim),
    )


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation, scaling, backend = (
        inputs
    )
    _, h = output
    ctx.save_for_backward(x, down_weight, up_weight, h, adapter_ids)
    ctx.activation, ctx.scaling, ctx.backend = activation, scaling, backend
    ctx.has_down_bias, ctx.has_up_bias = down_bias is not None, up_bias is not None
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(h)


def _backward(ctx, grad_y, _grad_h):
    x, down_weight, up_weight, h, adapter_ids = ctx.saved_tensors
    need_x, need_wd, need_bd, need_wu, need_bu, need_res = ctx.needs_input_grad[:6]
    need_weights = need_wd or need_bd or need_wu or need_bu
    grad_x = grad_wd = grad_bd = grad_wu = grad_bu = None
    if need_x or need_weights:
        grad_x, grad_wd, grad_bd, grad_wu, grad_bu = torch.ops.peftkern.bottleneck_adapter_backward(
            grad_y, x, down_weight, up_weight, h, adapter_ids, ctx.activation, ctx.scaling,
            need_x, not ctx.has_residual, need_weights, ctx.has_down_bias, ctx.has_up_bias, ctx.backend,
        )
    # A separate residual enters the output with factor 1.
    grad_res = grad_y if need_res else None
    return (
        grad_x if need_x else None,
        grad_wd if need_wd else None,
        grad_bd if need_bd else None,
        grad_wu if need_wu else None,
        grad_bu if need_bu else None,
        grad_res, None, None, None, None,
    )


_bottleneck_adapter_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public function ----------------------------------------------------------------------------------


def _check_inputs(x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation):
    check_tensor("x", x, min_ndim=1)
    dim = x.shape[-1]
    if dim == 0:
        raise ValueError(f"x: expected a last dimension D >= 1, got shape {tuple(x.shape)}")
    stacked = adapter_ids is not None
    lead = 1 if stacked else 0
    what = "[L, " if stacked else "["
    check_tensor("down_weight", down_weight, ndim=2 + lead)
    check_tensor("up_weight", up_weight, ndim=2 + lead)
    if stacked and down_weight.shape[0] == 0:
        raise ValueError("down_weight: expected at least one adapter (L >= 1), got shape with L = 0")
    num_adapters = down_weight.shape[0] if stacked else None
    adapters = (num_adapters,) if stacked else ()
    bottleneck = down_weight.shape[-2]
    if down_weight.shape[-1] != dim:
        raise ValueError(
            f"down_weight: expected shape {what}Bn, D={dim}] with D = x.shape[-1], "
            f"got {tuple(down_weight.shape)}"
        )
    if bottleneck == 0:
        raise ValueError(
            f"down_weight: expected a bottleneck size Bn >= 1, got shape {tuple(down_weight.shape)}"
        )
    check_shape("up_weight", up_weight, (*adapters, dim, bottleneck), f"{what}D, Bn] from x and down_weight")
    if down_bias is not None:
        check_tensor("down_bias", down_bias, ndim=1 + lead)
        check_shape("down_bias", down_bias, (*adapters, bottleneck), f"{what}Bn]")
    if up_bias is not None:
        check_tensor("up_bias", up_bias, ndim=1 + lead)
        check_shape("up_bias", up_bias, (*adapters, dim), f"{what}D]")
    if residual is not None:
        check_tensor("residual", residual)
        check_shape("residual", residual, tuple(x.shape), "the shape of x")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual: expected the dtype of x ({x.dtype}), got {residual.dtype}")
    if adapter_ids is not None:
        check_tensor("adapter_ids", adapter_ids, dtypes=INDEX_DTYPES)
        rows = x.numel() // dim
        if tuple(adapter_ids.shape) not in (tuple(x.shape[:-1]), (rows,)):
            raise ValueError(
                f"adapter_ids: expected shape {tuple(x.shape[:-1])} (x.shape[:-1]) or ({rows},) (one id per "
                f"row), got {tuple(adapter_ids.shape)}"
            )
    check_same_device("x", x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                      up_bias=up_bias, residual=residual, adapter_ids=adapter_ids)
    wdtype = down_weight.dtype
    if wdtype not in (x.dtype, torch.float32, torch.float64):
        raise TypeError(f"down_weight: expected the dtype of x ({x.dtype}) or float32, got {wdtype}")
    for name, value in (("down_bias", down_bias), ("up_weight", up_weight), ("up_bias", up_bias)):
        if value is not None and value.dtype != wdtype:
            raise TypeError(f"{name}: expected the dtype of down_weight ({wdtype}), got {value.dtype}")
    if not isinstance(activation, str):
        raise TypeError(
            f"activation: expected a str, one of {reference.ACTIVATIONS}, got {type(activation).__name__}"
        )
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation: expected one of {reference.ACTIVATIONS}, got {activation!r}")


def _check_id_values(adapter_ids: torch.Tensor, num_adapters: int, validate_ids: bool | None) -> None:
    """Ids lie in [-1, L). Reading them is a host sync on a GPU, so by default (``validate_ids`` None) only
    ids on the CPU are checked; True checks anywhere, False nowhere. Never while torch.compile traces or a
    CUDA graph is captured. Unchecked ids are still safe: every backend gives rows whose id lies outside
    [0, L) no adapter, and no kernel addresses memory with an id."""
    if validate_ids is None:
        validate_ids = adapter_ids.device.type == "cpu"
    if not validate_ids or adapter_ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if adapter_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = int(adapter_ids.min()), int(adapter_ids.max())
    if low < -1 or high >= num_adapters:
        bad = low if low < -1 else high
        raise ValueError(
            f"adapter_ids: expected ids in [-1, {num_adapters}) (-1: no adapter; L = {num_adapters} "
            f"adapters), got {bad}"
        )


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    activation: str = "relu",
    scaling: float = 1.0,
    residual: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate_ids: bool | None = None,
) -> torch.Tensor:
    """Fused bottleneck adapter: ``residual + scaling * up(act(down(x)))``, residual defaulting to x.

    Args:
        x: [..., D] activations (fp16, bf16, fp32; float64 on the torch backend).
        down_weight: [Bn, D]; down_bias: [Bn] or None; up_weight: [D, Bn]; up_bias: [D] or None; each
            stacked as [L, ...] when ``adapter_ids`` is given. x's dtype or float32 (fp32 adapters).
        activation: "relu" | "gelu" (erf) | "gelu_tanh" | "silu" ("swish") | "tanh".
        scaling: multiplies the adapter's output (up bias included).
        residual: [..., D] like x, or None for x itself.
        adapter_ids: [...] = x.shape[:-1] or [rows], int32/int64: row t uses adapter ``adapter_ids[t]``; -1
            passes the row through (output = residual).
        backend: "torch" | "triton" | "cuda"; see :mod:`peftkern.backends` for the default.
        validate_ids: raise ``ValueError`` for ids outside [-1, L): None (default) checks CPU ids only,
            as checking GPU ids costs a host sync; True always; False never (such rows get no adapter).
    Returns:
        [..., D] in x's dtype. Gradients flow to x, residual, and the four adapter tensors.
    """
    # Like nn.Linear under autocast: activations run in the autocast dtype; adapters keep theirs.
    x, residual = autocast_inputs(x, residual)
    _check_inputs(x, down_weight, down_bias, up_weight, up_bias, residual, adapter_ids, activation)
    scaling = check_finite_scalar("scaling", scaling)
    name = resolve_backend(x.device, OP, backend)
    check_backend_dtypes(OP, name, x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                         up_bias=up_bias, residual=residual)
    if adapter_ids is None:
        # One adapter is the stacked case with L = 1 and every row on adapter 0.
        down_weight, up_weight = down_weight.unsqueeze(0), up_weight.unsqueeze(0)
        down_bias = down_bias.unsqueeze(0) if down_bias is not None else None
        up_bias = up_bias.unsqueeze(0) if up_bias is not None else None
        ids = None
    else:
        _check_id_values(adapter_ids, down_weight.shape[0], validate_ids)
        ids = adapter_ids.reshape(-1)

    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    res2 = residual.reshape(-1, dim) if residual is not None else None
    y, _ = torch.ops.peftkern.bottleneck_adapter(
        x2, down_weight, down_bias, up_weight, up_bias, res2, ids, activation, scaling, name
    )
    return y.reshape(x.shape)
