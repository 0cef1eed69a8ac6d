"""``peftkern.dora_linear``: checks, backend dispatch, and the ``peftkern::dora_linear`` custom op with its
fake implementation and autograd formula. DoRA as ``peft`` computes it (``reference.dora_linear``).

With g = magnitude / ||W + s B A|| per output column (detached) and V = xd @ W.T + s (xd @ A.T) @ B.T:
  no dropout:  y = g * V + b                           (xd = x)
  dropout:     y = g * V + b + (x - xd) @ W.T          (xd = dropout(x): peft's base product from dropout(x))
The norm comes from the low-rank identity (``reference.dora_weight_norm``): one pass over W for W @ A.T,
never a dense [N, K] matrix; ``||W||^2`` [N] is an argument (the layer caches it while W is frozen).
Z = g * V + b is what the LoRA fused kernel writes with its per-column scale hook; it is y itself without
dropout (saved as y: no extra memory), a separate [M, N] tensor with dropout.

Backward, with G = dY and Gs = G * g:
  dA, dB, and dX1 = Gs @ W + s (Gs @ B) @ A   the LoRA backward on Gs (over xd, no dropout)
  dX = dX1                                    without dropout
  dX = G @ W + keep / (1 - p) * (dX1 - G @ W) with dropout
  dm = sum_t G[t] * (Z[t] - b) / m           (= sum_t G V / ||.||: peft's magnitude gradient)
So the magnitude's gradient reads Z, which holds g * V: a column whose magnitude is exactly 0 has lost V, and
gets dm = 0 there (peft would give sum_t G V / ||.||). The dropped-out x is materialised ([M, K], as peft does)
and regenerated from the seed in backward; without dropout the Triton path materialises nothing [M, K] (the
torch backend's rank-r products take an fp32 copy of 16-bit x, as its LoRA op does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import resolve_backend
from . import lora as _lora
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
from .lora import _keep_mask, dropout_seed

__all__ = ["dora_linear", "weight_norm_sq"]

OP = "dora_linear"


def weight_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """``||W_n||^2`` per row of weight [N, K]: fp32 [N] (float64 for float64 weights). What a DoRA layer caches
    while its base weight is frozen, and passes to :func:`dora_linear` as ``weight_norm_sq``."""
    dtype = intermediate_dtype(weight.dtype)
    return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=dtype).square()


# ---- the column norm and scale -------------------------------------------------------------------------


def _torch_scale(weight, lora_a, lora_b, magnitude, weight_norm_sq, scaling):
    """g = magnitude / ||W + s B A|| per row [N] in the intermediate dtype, by the low-rank identity."""
    compute = weight_norm_sq.dtype
    # W @ A.T in W's dtype (tensor cores, fp32 accumulation): W is never copied to another dtype.
    wa = (weight @ lora_a.to(weight.dtype).T).to(compute)
    a, b = lora_a.to(compute), lora_b.to(compute)
    cross = torch.linalg.vecdot(wa, b)
    square = torch.linalg.vecdot(b @ (a @ a.T), b)
    norm_sq = weight_norm_sq + (2.0 * scaling) * cross + (scaling * scaling) * square
    return magnitude.to(compute) / norm_sq.clamp_min_(0.0).sqrt_()


def _scale(weight, lora_a, lora_b, magnitude, weight_norm_sq, scaling, backend):
    if backend == "triton":
        from ..triton_kernels.dora import dora_scale

        return dora_scale(weight, lora_a, lora_b, magnitude, weight_norm_sq, scaling)
    return _torch_scale(weight, lora_a, lora_b, magnitude, weight_norm_sq, scaling)


def _fused(x, weight, bias, lora_a, lora_b, scaling, scale, backend):
    """(Z = g * (x @ W.T + s (x @ A.T) @ B.T) + b in x's dtype, S = x @ A.T)."""
    if backend == "triton":
        from ..triton_kernels.lora import lora_forward

        return lora_forward(x, weight, bias, lora_a, lora_b, scaling, 0.0, None, col_scale=scale)
    if backend == "torch" and scaling != 0.0 and lora_a.dtype == x.dtype:
        # g * (x W^T) in place on the base GEMM's output, then the rank-r term with g folded into B ([N, r]):
        # two passes over [M, N] in x's dtype, as peft's own layer makes with adapters in x's dtype (fp32
        # adapters beside 16-bit x: peft's DoRA term is fp32, so is the general path below's). (scaling 0: the
        # general path keeps the spec's 0 * inf = NaN, which addmm's alpha = 0 would drop.)
        compute = scale.dtype
        s = x.to(compute) @ lora_a.to(compute).T
        y = F.linear(x, weight).mul_(scale.to(x.dtype))
        scaled_b = (lora_b.to(compute) * scale[:, None]).T
        y = y.addmm_(s.to(x.dtype), scaled_b.to(x.dtype), alpha=scaling)
        return (y if bias is None else y.add_(bias)), s
    # Other backends: their LoRA forward, then the column scale and bias in one elementwise pass.
    product, s = _lora._forward_impl(x, weight, None, lora_a, lora_b, scaling, 0.0, None, backend)
    if bias is None:
        return (product.to(scale.dtype) * scale).to(x.dtype), s
    return torch.addcmul(bias.to(scale.dtype), product.to(scale.dtype), scale).to(x.dtype), s


def _dropped(x, seed, dropout_p, backend):
    """(dropout(x) in x's dtype, keep-mask 0/1 in x's dtype), the mask from the seed's Philox stream."""
    keep = None
    if backend == "triton":
        from ..triton_kernels._common import interpreting

        if not interpreting():  # the same bits in one launch (the torch backend's draw on CUDA tensors)
            from ..triton_kernels.dropout import dropout_keep_mask

            keep = dropout_keep_mask(seed.reshape(1), tuple(x.shape), dropout_p, x.dtype)
    if keep is None:
        keep = _keep_mask(seed, x, dropout_p)
    return (x * keep).div_(1.0 - dropout_p), keep


def _forward_impl(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, dropout_p, seed, backend):
    """(y, S, Z or an empty [0] tensor without dropout, g)."""
    scale = _scale(weight, lora_a, lora_b, magnitude, weight_norm_sq, scaling, backend)
    if seed is None or dropout_p == 0.0:
        y, s = _fused(x, weight, bias, lora_a, lora_b, scaling, scale, backend)
        return y, s, x.new_empty(0), scale
    dropped, _ = _dropped(x, seed, dropout_p, backend)
    z, s = _fused(dropped, weight, bias, lora_a, lora_b, scaling, scale, backend)
    # peft adds the base product of x and removes that of dropout(x): the frozen GEMM of their difference.
    y = torch.addmm(z, x - dropped, weight.T)
    return y, s, z, scale


def _scaled_grad_and_dm(grad_y, z, bias, magnitude, scale, backend):
    """(Gs = dY * g in dY's dtype, dm in the magnitude's dtype)."""
    if backend == "triton":
        from ..triton_kernels.dora import dora_scale_grad

        return dora_scale_grad(grad_y, z, bias, magnitude, scale)
    # In dY's dtype, summed in the intermediate dtype: one pass over dY and Z (two with a bias).
    compute = scale.dtype
    product = z if bias is None else z - bias
    grad_m = (grad_y * product).sum(0, dtype=compute)
    magnitude = magnitude.to(compute)
    grad_m = torch.where(magnitude != 0, grad_m / magnitude, torch.zeros_like(grad_m))
    return grad_y * scale.to(grad_y.dtype), grad_m


def _backward_impl(grad_y, x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, scaling, dropout_p, seed,
                   need_dx, backend):
    """(dX or None, dA, dB, dm); ``z`` is y itself without dropout."""
    grad_scaled, grad_m = _scaled_grad_and_dm(grad_y, z, bias, magnitude, scale, backend)
    grad_m = grad_m.to(magnitude.dtype)
    if seed is None or dropout_p == 0.0:
        grad_x, grad_a, grad_b = _lora._backward_impl(
            grad_scaled, x, weight, lora_a, lora_b, s, scaling, 0.0, None, need_dx, backend
        )
        return grad_x, grad_a, grad_b, grad_m
    dropped, keep = _dropped(x, seed, dropout_p, backend)
    grad_x, grad_a, grad_b = _lora._backward_impl(
        grad_scaled, dropped, weight, lora_a, lora_b, s, scaling, 0.0, None, need_dx, backend
    )
    if need_dx:
        compute = scale.dtype
        base = (grad_y @ weight).to(compute)
        keep = keep.to(compute).mul_(1.0 / (1.0 - dropout_p))
        grad_x = torch.addcmul(base, keep, grad_x.to(compute).sub_(base)).to(x.dtype)
    return grad_x, grad_a, grad_b, grad_m


# ---- the custom ops (what torch.compile traces) -----------------------------------------------------------


@torch.library.custom_op("peftkern::dora_linear", mutates_args=())
def _dora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm_sq: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, dropout_p, seed,
                         backend)


@_dora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, dropout_p, seed, backend):
    compute = intermediate_dtype(x.dtype, lora_a.dtype)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=compute)
    z = x.new_empty((x.shape[0], weight.shape[0]) if seed is not None and dropout_p > 0.0 else (0,))
    return y, s, z, x.new_empty((weight.shape[0],), dtype=compute)


@torch.library.custom_op("peftkern::dora_linear_backward", mutates_args=())
def _dora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dX, dA, dB, dm); dX is an empty [0] tensor when ``need_dx`` is False."""
    grad_x, grad_a, grad_b, grad_m = _backward_impl(
        grad_y, x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, scaling, dropout_p, seed, need_dx, backend
    )
    return (grad_x if grad_x is not None else x.new_empty(0)), grad_a, grad_b, grad_m


@_dora_linear_backward_op.register_fake
def _(grad_y, x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, scaling, dropout_p, seed, need_dx, backend):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(magnitude)


def _save(ctx, x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, seed, y, scaling, dropout_p, backend):
    dropout = seed is not None and dropout_p > 0.0
    ctx.save_for_backward(x, weight, bias, lora_a, lora_b, magnitude, s, z if dropout else y, scale, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, _, scaling, dropout_p, seed, backend = inputs
    y, s, z, scale = output
    _save(ctx, x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, seed, y, scaling, dropout_p, backend)
    ctx.mark_non_differentiable(s, z, scale)


def _gradients(ctx, grad_y, run_backward):
    """The gradients of (x, weight, bias, lora_a, lora_b, magnitude, *the rest); ``run_backward`` computes
    (dX, dA, dB, dm) from ``_backward_impl``'s arguments (the custom op when traced, the implementation eagerly)."""
    x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
    grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
    if need_x or need_a or need_b or need_m:
        grad_x, grad_a, grad_b, grad_m = run_backward(
            grad_y, x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, ctx.scaling, ctx.dropout_p, seed,
            need_x, ctx.backend,
        )
        grad_x = grad_x if need_x else None
        grad_a = grad_a if need_a else None
        grad_b = grad_b if need_b else None
        grad_m = grad_m if need_m else None
    # The frozen base gets gradients only when it asks for them (the norm stays detached, as in peft).
    if need_w:
        grad_scaled = grad_y * scale.to(grad_y.dtype)
        if seed is None or ctx.dropout_p == 0.0:
            grad_w = grad_scaled.T @ x.to(grad_y.dtype)
        else:
            dropped, _ = _dropped(x, seed, ctx.dropout_p, ctx.backend)
            grad_w = grad_y.T @ x.to(grad_y.dtype) + (grad_scaled - grad_y).T @ dropped.to(grad_y.dtype)
        grad_w = grad_w.to(weight.dtype)
    if need_bias:
        grad_bias = grad_y.sum(0).to(weight.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m, None, None, None, None, None


def _backward(ctx, grad_y, _grad_s, _grad_z, _grad_scale):
    return _gradients(ctx, grad_y, torch.ops.peftkern.dora_linear_backward)


_dora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerDoRALinear(torch.autograd.Function):
    """The custom ops' forward and backward without their per-call dispatch, for plain eager calls (as
    ``ops.lora._EagerLoRALinear``). No double backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, dropout_p, seed, backend):
        y, s, z, scale = _forward_impl(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling,
                                       dropout_p, seed, backend)
        _save(ctx, x, weight, bias, lora_a, lora_b, magnitude, s, z, scale, seed, y, scaling, dropout_p, backend)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, _backward_impl)


# ---- the public function ----------------------------------------------------------------------------------


def _check_dora(x, out_features, lora_a, magnitude, norm_sq):
    check_tensor("magnitude", magnitude, ndim=1)
    check_shape("magnitude", magnitude, (out_features,), "[N] with N = weight.shape[0]")
    if magnitude.dtype != lora_a.dtype:
        raise TypeError(f"magnitude: expected the dtype of lora_a ({lora_a.dtype}), got {magnitude.dtype}")
    check_tensor("weight_norm_sq", norm_sq, ndim=1)
    check_shape("weight_norm_sq", norm_sq, (out_features,), "[N] with N = weight.shape[0]")
    expected = intermediate_dtype(x.dtype, lora_a.dtype)
    if norm_sq.dtype != expected:
        raise TypeError(f"weight_norm_sq: expected {expected} (see peftkern.ops.dora.weight_norm_sq), "
                        f"got {norm_sq.dtype}")
    check_same_device("x", x, magnitude=magnitude, weight_norm_sq=norm_sq)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    weight_norm_sq: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused DoRA linear, as ``peft``'s ``use_dora=True`` layer computes it (see ``reference.dora_linear``).

    Args:
        x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, seed, backend: as
            :func:`peftkern.lora_linear`.
        magnitude: [N], lora_a's dtype: the per-output-column magnitude (peft's ``lora_magnitude_vector``).
        weight_norm_sq: [N] ``||W_n||^2`` in fp32 (float64 for float64 inputs) from
            :func:`peftkern.ops.dora.weight_norm_sq`; computed here when None (callers that keep W frozen
            cache it). It must match ``weight``: nothing checks that it does.
    Returns:
        [..., N] in x's dtype. Gradients flow to x, lora_a, lora_b, magnitude (the column norm is detached,
        as in peft), and to weight/bias only if they require grad.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    _lora._check_inputs(x, weight, bias, lora_a, lora_b)
    scaling = check_finite_scalar("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    name = resolve_backend(x.device, OP, backend)
    if weight_norm_sq is None:
        weight_norm_sq = weight_norm_sq_for(weight, x, lora_a)
    _check_dora(x, weight.shape[0], lora_a, magnitude, weight_norm_sq)
    check_backend_dtypes(OP, name, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude)

    dropout_p, seed_tensor = dropout_seed(x, dropout_p, training, seed)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    args = (x2, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, scaling, dropout_p, seed_tensor, name)
    if plain_eager(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq, seed_tensor):
        y = _EagerDoRALinear.apply(*args)
    else:
        y, *_ = torch.ops.peftkern.dora_linear(*args)
    return y.reshape(*lead, weight.shape[0])


def weight_norm_sq_for(weight: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``weight_norm_sq(weight)`` in the dtype :func:`dora_linear` takes beside x and lora_a."""
    return weight_norm_sq(weight).to(intermediate_dtype(x.dtype, lora_a.dtype))

