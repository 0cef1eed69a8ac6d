"""``peftkern.lora_linear``: checks, backend dispatch, and the ``peftkern::lora_linear`` custom op with its
fake implementation and autograd formula.

The op works on 2-D x [M, K]; the public function flattens leading dims. Forward returns (y, s) where
s = dropout(x) @ A.T / (1 - p) is the [M, r] intermediate (fp32, float64 for float64 inputs) saved for
backward with x: no dropout mask and no dropped copy of x is stored; the mask is regenerated from the seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import resolve_backend
from ._checks import (
    autocast_inputs,
    check_backend_dtypes,
    check_finite_scalar,
    check_probability,
    check_same_device,
    check_shape,
    check_tensor,
    intermediate_dtype,
    plain_eager,
)
from ._dropout import keep_mask

__all__ = ["lora_linear", "new_dropout_seed"]

OP = "lora_linear"


def _keep_mask(seed: torch.Tensor | None, x: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    # 0/1 in x's dtype: x * keep is then one plain pass (a bool operand would be converted first).
    if seed is None or dropout_p == 0.0:
        return None
    return keep_mask(seed, tuple(x.shape), dropout_p, x.dtype)


# ---- torch backend: plain torch ops, the same math and the same dropout stream as the kernels ----------
# Scalars fold into the small [M, r] / [r, K] / [N, r] tensors and into addmm's alpha, so the [M, N] and
# [M, K] tensors are touched as few times as peft's own layer touches them. Multiplying by the 0/1 mask is
# exact in any dtype (and NaN stays NaN where dropped, as with torch's dropout).


def _torch_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, base_dtype=None):
    """(y, s). ``base_dtype``: the base GEMM's dtype when it is not x's (``lora_linear_4bit``, as bitsandbytes
    computes: x cast to it, the product cast back); weight and bias are in it."""
    compute = intermediate_dtype(x.dtype, lora_a.dtype)
    keep = _keep_mask(seed, x, dropout_p)
    dropped = x if keep is None else x * keep
    s = dropped.to(compute) @ lora_a.to(compute).T
    if keep is not None:
        s = s.div_(1.0 - dropout_p)
    if base_dtype is None or base_dtype == x.dtype:
        y = F.linear(x, weight, bias)
    else:
        y = F.linear(x.to(base_dtype), weight, bias).to(x.dtype)
    if scaling == 0.0:  # addmm drops the product when alpha is 0; the spec keeps 0 * inf = NaN
        lora = (s @ lora_b.to(compute).T).mul_(scaling)
        return (y.to(compute) + lora).to(x.dtype), s
    if y.dtype == compute:
        return y.addmm_(s, lora_b.to(compute).T, alpha=scaling), s
    return torch.addmm(y.to(compute), s, lora_b.to(compute).T, alpha=scaling).to(x.dtype), s


def _torch_backward(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, base_dtype=None):
    compute = s.dtype
    dy = grad_y.to(compute)
    grad_s = (dy @ lora_b.to(compute)).mul_(scaling)
    grad_b = (dy.T @ s).mul_(scaling).to(lora_b.dtype)
    keep = _keep_mask(seed, x, dropout_p)
    dropped = x if keep is None else x * keep
    grad_a = grad_s.T @ dropped.to(compute)
    if keep is not None:
        grad_a = grad_a.div_(1.0 - dropout_p)
        grad_s = grad_s.div_(1.0 - dropout_p)
    grad_a = grad_a.to(lora_a.dtype)
    if not need_dx:
        return None, grad_a, grad_b
    if base_dtype is None or base_dtype == x.dtype:
        grad_x = grad_y @ weight
    else:
        grad_x = (grad_y.to(base_dtype) @ weight).to(x.dtype)
    if grad_x.dtype == compute and keep is None:
        return grad_x.addmm_(grad_s, lora_a.to(compute)), grad_a, grad_b
    lora = grad_s @ lora_a.to(compute)
    if keep is not None:
        lora = lora.mul_(keep)
    if grad_x.dtype == compute:
        return grad_x.add_(lora), grad_a, grad_b
    return (grad_x.to(compute) + lora).to(x.dtype), grad_a, grad_b


# ---- dispatch to a backend -------------------------------------------------------------------------------


def _forward_impl(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
    if backend == "triton":
        from ..triton_kernels.lora import lora_forward

        return lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    if backend == "cuda":
        from ._cuda import lora_forward as cuda_lora_forward

        return cuda_lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    return _torch_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


def _backward_impl(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, backend):
    if backend == "triton":
        from ..triton_kernels.lora import lora_backward

        return lora_backward(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx)
    if backend == "cuda":
        from ._cuda import lora_backward as cuda_lora_backward

        return cuda_lora_backward(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx)
    return _torch_backward(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx)


# ---- the custom ops (what torch.compile traces) -----------------------------------------------------------


@torch.library.custom_op("peftkern::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=intermediate_dtype(x.dtype, lora_a.dtype))
    return y, s


@torch.library.custom_op("peftkern::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dX, dA, dB); dX is an empty [0] tensor when ``need_dx`` is False."""
    grad_x, grad_a, grad_b = _backward_impl(
        grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, backend
    )
    return (grad_x if grad_x is not None else x.new_empty(0)), grad_a, grad_b


@_lora_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, backend):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend = inputs
    _, s = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.mark_non_differentiable(s)
    # s never gets a gradient: without this, autograd would fill a zero [M, r] tensor for it (a launch).
    ctx.set_materialize_grads(False)


def _gradients(ctx, grad_y, run_backward):
    """The gradients of (x, weight, bias, lora_a, lora_b, *the non-tensor inputs); ``run_backward`` computes
    (dX, dA, dB) from ``_backward_impl``'s arguments (the custom op when traced, the implementation eagerly)."""
    x, weight, lora_a, lora_b, s, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x or need_a or need_b:
        grad_x, grad_a, grad_b = run_backward(
            grad_y, x, weight, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, seed, need_x, ctx.backend
        )
        grad_x = grad_x if need_x else None
        grad_a = grad_a if need_a else None
        grad_b = grad_b if need_b else None
    # The frozen base gets gradients only when it asks for them (full fine-tuning next to LoRA).
    if need_w:
        grad_w = (grad_y.T @ x.to(grad_y.dtype)).to(weight.dtype)
    if need_bias:
        grad_bias = grad_y.sum(0).to(weight.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def _backward(ctx, grad_y, _grad_s):
    if grad_y is None:  # y did not reach the loss (grads are not materialised: see _setup_context)
        return (None,) * 9
    return _gradients(ctx, grad_y, torch.ops.peftkern.lora_linear_backward)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoRALinear(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their per-call dispatch (tens of
    microseconds a call in eager mode, as much as a small layer's whole work on the CPU). Used only for plain
    eager calls (see :func:`._checks.plain_eager`); torch.compile, export, make_fx, fake tensors and functorch
    transforms get the custom ops. Like them, no double backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend):
        y, s = _forward_impl(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, weight, lora_a, lora_b, s, seed)
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, _backward_impl)


# ---- the public function ----------------------------------------------------------------------------------


def new_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh dropout seed drawn from torch's generator on ``device`` (no host sync; reproducible under
    ``torch.manual_seed`` and replayed by activation checkpointing, which restores the RNG state)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _check_inputs(x, weight, bias, lora_a, lora_b):
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected last dimension {in_features} (weight is [N={out_features}, K={in_features}]), "
            f"got shape {tuple(x.shape)}"
        )
    check_same_device("x", x, weight=weight)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected the dtype of x ({x.dtype}), got {weight.dtype}")
    _check_adapters(x, out_features, in_features, bias, lora_a, lora_b)


def _check_adapters(x, out_features, in_features, bias, lora_a, lora_b):
    """bias [N] and the adapters A [r, K], B [N, r] beside x [..., K] (also ``lora_linear_4bit``'s checks)."""
    check_tensor("lora_a", lora_a, ndim=2)
    check_tensor("lora_b", lora_b, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    rank = lora_a.shape[0]
    check_shape("lora_a", lora_a, (None, in_features), "[r, K] with K = weight.shape[1]")
    if rank == 0:
        raise ValueError("lora_a: expected rank r >= 1, got shape with r = 0")
    check_shape("lora_b", lora_b, (out_features, rank), "[N, r] with N = weight.shape[0], r = lora_a.shape[0]")
    if bias is not None:
        check_shape("bias", bias, (out_features,), "[N]")
    check_same_device("x", x, bias=bias, lora_a=lora_a, lora_b=lora_b)
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected the dtype of x ({x.dtype}), got {bias.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b: expected the dtype of lora_a ({lora_a.dtype}), got {lora_b.dtype}")
    if lora_a.dtype not in (x.dtype, torch.float32, torch.float64):
        raise TypeError(
            f"lora_a: expected the dtype of x ({x.dtype}) or float32 (fp32 adapters), got {lora_a.dtype}"
        )


def dropout_seed(
    x: torch.Tensor, dropout_p: float, training: bool, seed: int | torch.Tensor | None
) -> tuple[float, torch.Tensor | None]:
    """(dropout_p, seed tensor) as the ops take them: (0.0, None) when no dropout runs, else the checked
    ``seed`` as a 1-element int64 tensor on x's device (a fresh one drawn when None)."""
    if not training or dropout_p == 0.0:
        return 0.0, None
    if seed is None:
        return dropout_p, new_dropout_seed(x.device)
    if isinstance(seed, torch.Tensor):
        check_tensor("seed", seed, dtypes=(torch.int64,))
        if seed.numel() != 1:
            raise ValueError(f"seed: expected a single int64 value, got shape {tuple(seed.shape)}")
        check_same_device("x", x, seed=seed)
        return dropout_p, seed.reshape(1)
    return dropout_p, torch.tensor([int(seed)], dtype=torch.int64, device=x.device)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused LoRA linear: ``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T``.

    Args:
        x: [..., K] activations (fp16, bf16, fp32; float64 on the torch backend).
        weight: [N, K] frozen base weight, x's dtype. bias: [N] or None.
        lora_a: [r, K]; lora_b: [N, r]: x's dtype or float32 (fp32 adapters with 16-bit activations).
        scaling: alpha / r (or alpha / sqrt(r) with rsLoRA).
        dropout_p: dropout on the low-rank path's input, in [0, 1); active only when ``training``.
        seed: dropout seed (int or int64 tensor); drawn from torch's generator when None.
        backend: "torch" | "triton" | "cuda"; see :mod:`peftkern.backends` for the default.
    Returns:
        [..., N] in x's dtype. Gradients flow to x, lora_a, lora_b, and to weight/bias only if they
        require grad.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check_inputs(x, weight, bias, lora_a, lora_b)
    scaling = check_finite_scalar("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    name = resolve_backend(x.device, OP, backend)
    check_backend_dtypes(OP, name, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)

    dropout_p, seed_tensor = dropout_seed(x, dropout_p, training, seed)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    args = (x2, weight, bias, lora_a, lora_b, scaling, dropout_p, seed_tensor, name)
    if plain_eager(x, weight, bias, lora_a, lora_b, seed_tensor):
        y = _EagerLoRALinear.apply(*args)
    else:
        y, _ = torch.ops.peftkern.lora_linear(*args)
    return y.reshape(*lead, weight.shape[0])
