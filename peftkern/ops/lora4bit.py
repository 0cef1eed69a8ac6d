"""``peftkern.lora_linear_4bit``: LoRA over a frozen bitsandbytes 4-bit base (QLoRA): checks, backend dispatch,
and the ``peftkern::lora_linear_4bit`` custom op with its fake implementation and autograd formula.

The base weight stays in bitsandbytes' storage (:class:`Weight4bit`: packed nibbles, absmax, optionally
double-quantized). The torch backend dequantizes it for the one matmul that needs it and drops it: the dense
weight is never saved for backward (backward dequantizes again) and never stored on a layer. The low-rank
part, the dropout stream and the saved [M, r] intermediate are ``lora_linear``'s (the same code).
The triton backend (``triton_kernels/lora4bit.py``) decodes tiles of the packed weight inside its GEMM main loops
(forward and dX), so no dense weight is ever written; a double-quantized absmax is decoded there too (no
expanded copy either). The cuda backend has no 4-bit kernel yet and raises.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import reference
from ..backends import resolve_backend
from ._checks import (
    INDEX_DTYPES,
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
from ._dropout import _cpu_kernels, cpu_threads
from .lora import _check_adapters, _torch_backward, _torch_forward, dropout_seed

__all__ = ["Weight4bit", "lora_linear_4bit"]

OP = "lora_linear_4bit"
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Weight4bit(NamedTuple):
    """A frozen [N, K] weight in bitsandbytes' 4-bit storage (see :func:`peftkern.reference.dequantize_4bit`).

    ``packed``: the ``ceil(N * K / 2)`` bytes (uint8, or a ``quant_storage`` dtype read as bytes);
    ``absmax``: float32 [blocks], or uint8 [blocks] when double-quantized, with ``nested_absmax`` (float32),
    ``nested_code`` (float32 [256]), ``nested_blocksize`` and ``offset`` (float32 scalar tensor);
    ``dtype``: the dtype bitsandbytes dequantizes to (its ``quant_state.dtype``) before the cast to x's dtype.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    quant_type: str = "nf4"
    blocksize: int = 64
    dtype: torch.dtype = torch.float32
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: torch.Tensor | None = None

    @classmethod
    def from_bnb(cls, weight: torch.Tensor) -> Weight4bit:
        """The storage of a ``bitsandbytes.nn.Params4bit`` (``Linear4bit.weight``), shared, not copied.

        Refuses (``ValueError``) a weight not quantized yet (still on the CPU before ``.cuda()``, or built without
        ``quant_state``) and one in bitsandbytes' CPU inference layout (``quant_state.packing_format_for_cpu``:
        ``Linear4bit`` repacks its weight so the first time it runs on the CPU in eval mode without grad; the
        bytes are interleaved per 32 rows and absmax is rounded to bfloat16)."""
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError("weight: expected a quantized bitsandbytes Params4bit (with a quant_state), got none")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(
                "weight: is in bitsandbytes' CPU inference layout (quant_state.packing_format_for_cpu: repacked by "
                "Linear4bit's first eval-mode forward on the CPU), which peftkern does not read; run it with "
                "bitsandbytes, or save and reload the layer (its state dict restores the standard layout)"
            )
        nested = bool(getattr(state, "nested", False))
        state2 = state.state2 if nested else None
        return cls(
            packed=weight.data,
            absmax=state.absmax,
            shape=(int(state.shape[0]), int(state.shape[1])),
            quant_type=state.quant_type,
            blocksize=int(state.blocksize),
            dtype=state.dtype,
            nested_absmax=state2.absmax if nested else None,
            nested_code=state2.code if nested else None,
            nested_blocksize=int(state2.blocksize) if nested else 256,
            offset=torch.as_tensor(state.offset, dtype=torch.float32) if nested else None,
        )


# ---- the torch backend: dequantize for one matmul, then lora_linear's own torch code --------------------------


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the values of a byte's high and low nibble, so one gather decodes two elements."""
    code = reference.four_bit_code(quant_type, device)
    byte = torch.arange(256, device=device)
    return torch.stack((code[byte >> 4], code[byte & 0xF]), dim=-1)


@functools.cache
def _cpu_code(quant_type: str) -> torch.Tensor:
    """The 16 float32 nibble values the C++ kernel reads (kept alive here, its address passed)."""
    return reference.four_bit_code(quant_type).contiguous()


# The output dtypes of peftkern._cpu.dequantize_4bit and their codes.
_CPU_OUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dequantize_cpu(data, numel, absmax, nested_absmax, nested_code, offset, quant_type, blocksize,
                    nested_blocksize, dtype):
    """``peftkern._cpu.dequantize_4bit``: the same bits as the torch ops below, in one vectorised pass."""
    dense = torch.empty(numel, dtype=dtype)
    nested = nested_absmax is not None
    absmax = absmax.contiguous()
    if nested:
        nested_absmax, nested_code = nested_absmax.contiguous(), nested_code.contiguous()
    _cpu_kernels().dequantize_4bit(
        data.data_ptr(), numel, _cpu_code(quant_type).data_ptr(), blocksize, absmax.data_ptr(),
        nested_code.data_ptr() if nested else 0, nested_absmax.data_ptr() if nested else 0, nested_blocksize,
        float(offset) if nested else 0.0, dense.data_ptr(), _CPU_OUT_KINDS[dtype], cpu_threads(numel),
    )
    return dense


def _dequantize(in_features, packed, absmax, nested_absmax, nested_code, offset, meta):
    """W [N, K] in the base GEMM's dtype: ``reference.dequantize_4bit`` in ``weight_dtype``, cast as bitsandbytes
    casts it. On the CPU ``peftkern._cpu``'s kernel (AVX-512 / AVX2); elsewhere, traced, or without the
    extension, the same float32 products (so the same bits) in torch ops with fewer temporaries than the
    reference: one int32 gather per byte and the block scaling in place, where the reference indexes per element
    with int64."""
    quant_type, blocksize, nested_blocksize, out_features, weight_dtype, base_dtype = meta
    numel = out_features * in_features
    data = packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)
    # A float32 weight is rounded once, to the base dtype: the same as through float32.
    dtype = base_dtype if weight_dtype == torch.float32 and base_dtype in _CPU_OUT_KINDS else weight_dtype
    # hasattr: an extension built before the kernel existed (an older editable install) has only the dropout.
    if (data.device.type == "cpu" and hasattr(_cpu_kernels(), "dequantize_4bit")
            and plain_eager(data, absmax, nested_absmax, nested_code, offset)):
        dense = _dequantize_cpu(data.contiguous(), numel, absmax, nested_absmax, nested_code, offset, quant_type,
                                blocksize, nested_blocksize, dtype)
        return dense.view(out_features, in_features).to(base_dtype)
    # index_select: the same bytes as advanced indexing, 2.6x faster on the CPU (1M elements, one thread)
    values = _pair_table(quant_type, data.device).index_select(0, data.reshape(-1).int()).reshape(-1)
    if nested_absmax is not None:  # [blocks] values: the reference's few operations are cheap
        absmax = reference.dequantize_4bit_absmax(absmax, nested_absmax, nested_code, nested_blocksize, offset)
    if numel % blocksize == 0:
        values = values[:numel].view(-1, blocksize).mul_(absmax.float().reshape(-1, 1))
    else:
        values = reference.scale_blocks(values[:numel], absmax.float(), blocksize)
    return values.reshape(out_features, in_features).to(weight_dtype).to(base_dtype)


def _no_kernel(backend: str) -> ValueError:
    return ValueError(
        f"{OP}: backend {backend!r} has no kernel for this op yet; use backend 'triton' (the fused 4-bit GEMM) "
        "or 'torch' (bitsandbytes' weight dequantized for the matmul, never kept)"
    )


def _kernel_storage(packed, absmax, nested_absmax, nested_code, offset):
    """(packed bytes as contiguous uint8, absmax): what the Triton kernels read; a double-quantized absmax stays
    in its codes (the kernels decode it per tile), passed as keywords with its nested tables."""
    data = packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)
    nested = {}
    if nested_absmax is not None:
        nested = dict(nested_absmax=nested_absmax.reshape(-1).contiguous(),
                      nested_code=nested_code.reshape(-1).contiguous(), offset=offset.reshape(-1).contiguous())
    return (data.reshape(-1).contiguous(), absmax.reshape(-1).contiguous()), nested


def _kernel_meta(meta):
    quant_type, blocksize, nested_blocksize, out_features, weight_dtype, base_dtype = meta
    return (quant_type, blocksize, out_features, weight_dtype, base_dtype), {"nested_blocksize": nested_blocksize}


def _forward_impl(x, quant, bias, lora_a, lora_b, scaling, dropout_p, seed, meta, backend):
    if backend == "triton":
        from ..triton_kernels.lora4bit import lora4bit_forward

        bias = None if bias is None else bias.contiguous()
        (data, absmax), nested = _kernel_storage(*quant)
        positional, keywords = _kernel_meta(meta)
        return lora4bit_forward(x, data, absmax, bias, lora_a, lora_b, scaling, dropout_p, seed, *positional,
                                **keywords, **nested)
    if backend != "torch":
        raise _no_kernel(backend)
    weight = _dequantize(x.shape[1], *quant, meta)
    return _torch_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, base_dtype=meta[-1])


def _backward_impl(grad_y, x, quant, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, meta, backend):
    if backend == "triton":
        from ..triton_kernels.lora4bit import lora4bit_backward

        (data, absmax), nested = _kernel_storage(*quant)
        positional, keywords = _kernel_meta(meta)
        return lora4bit_backward(grad_y, x, data, absmax, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx,
                                 *positional, **keywords, **nested)
    if backend != "torch":
        raise _no_kernel(backend)
    weight = _dequantize(x.shape[1], *quant, meta) if need_dx else None
    return _torch_backward(grad_y, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx,
                           base_dtype=meta[-1])


# ---- the custom ops (what torch.compile traces) ------------------------------------------------------------


@torch.library.custom_op("peftkern::lora_linear_4bit", mutates_args=())
def _lora_linear_4bit_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    weight_dtype: torch.dtype,
    base_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    meta = (quant_type, blocksize, nested_blocksize, out_features, weight_dtype, base_dtype)
    quant = (packed, absmax, nested_absmax, nested_code, offset)
    return _forward_impl(x, quant, bias, lora_a, lora_b, scaling, dropout_p, seed, meta, backend)


@_lora_linear_4bit_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_a, lora_b, scaling, dropout_p, seed,
      quant_type, blocksize, nested_blocksize, out_features, weight_dtype, base_dtype, backend):
    y = x.new_empty((x.shape[0], out_features))
    s = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=intermediate_dtype(x.dtype, lora_a.dtype))
    return y, s


@torch.library.custom_op("peftkern::lora_linear_4bit_backward", mutates_args=())
def _lora_linear_4bit_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    quant_type: str,
    blocksize: int,
    nested_blocksize: int,
    out_features: int,
    weight_dtype: torch.dtype,
    base_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dX, dA, dB); dX is an empty [0] tensor when ``need_dx`` is False."""
    meta = (quant_type, blocksize, nested_blocksize, out_features, weight_dtype, base_dtype)
    quant = (packed, absmax, nested_absmax, nested_code, offset)
    grad_x, grad_a, grad_b = _backward_impl(
        grad_y, x, quant, lora_a, lora_b, s, scaling, dropout_p, seed, need_dx, meta, backend
    )
    return (grad_x if grad_x is not None else x.new_empty(0)), grad_a, grad_b


@_lora_linear_4bit_backward_op.register_fake
def _(grad_y, x, packed, absmax, nested_absmax, nested_code, offset, lora_a, lora_b, s, scaling, dropout_p, seed,
      need_dx, quant_type, blocksize, nested_blocksize, out_features, weight_dtype, base_dtype, backend):
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _save(ctx, x, quant, bias, lora_a, lora_b, s, seed, scaling, dropout_p, meta, backend):
    ctx.save_for_backward(x, *quant, lora_a, lora_b, s, seed)
    ctx.scaling, ctx.dropout_p, ctx.meta, ctx.backend = scaling, dropout_p, meta, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gradients(ctx, grad_y, traced: bool):
    """Gradients of (x, the 5 storage tensors, bias, lora_a, lora_b, *the non-tensor inputs): the frozen 4-bit
    weight gets none; the bias one only when it asks."""
    x, packed, absmax, nested_absmax, nested_code, offset, lora_a, lora_b, s, seed = ctx.saved_tensors
    quant = (packed, absmax, nested_absmax, nested_code, offset)
    need_x, need_bias, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 6, 7, 8))
    grad_x = grad_bias = grad_a = grad_b = None
    if need_x or need_a or need_b:
        if traced:
            grad_x, grad_a, grad_b = torch.ops.peftkern.lora_linear_4bit_backward(
                grad_y, x, *quant, lora_a, lora_b, s, ctx.scaling, ctx.dropout_p, seed, need_x, *ctx.meta, ctx.backend
            )
        else:
            grad_x, grad_a, grad_b = _backward_impl(grad_y, x, quant, lora_a, lora_b, s, ctx.scaling,
                                                    ctx.dropout_p, seed, need_x, ctx.meta, ctx.backend)
        grad_x = grad_x if need_x else None
        grad_a = grad_a if need_a else None
        grad_b = grad_b if need_b else None
    if need_bias:
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias, grad_a, grad_b


def _setup_context(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs[:12]
    *meta, backend = inputs[12:]
    _, s = output
    _save(ctx, x, (packed, absmax, nested_absmax, nested_code, offset), bias, lora_a, lora_b, s, seed, scaling,
          dropout_p, tuple(meta), backend)
    ctx.mark_non_differentiable(s)


def _backward(ctx, grad_y, _grad_s):
    return *_gradients(ctx, grad_y, traced=True), *([None] * 10)


_lora_linear_4bit_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoRALinear4bit(torch.autograd.Function):
    """The custom ops' forward and backward without their per-call dispatch, for plain eager calls only (as
    ``lora_linear``'s ``_EagerLoRALinear``); no double backward."""

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, nested_code, offset, bias, lora_a, lora_b, scaling,
                dropout_p, seed, meta, backend):
        quant = (packed, absmax, nested_absmax, nested_code, offset)
        y, s = _forward_impl(x, quant, bias, lora_a, lora_b, scaling, dropout_p, seed, meta, backend)
        _save(ctx, x, quant, bias, lora_a, lora_b, s, seed, scaling, dropout_p, meta, backend)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return *_gradients(ctx, grad_y, traced=False), None, None, None, None, None


# ---- the public function -------------------------------------------------------------------------------------


def _check_weight(weight: object, x: torch.Tensor) -> Weight4bit:
    if not isinstance(weight, Weight4bit):
        raise TypeError(f"weight: expected a peftkern Weight4bit (Weight4bit.from_bnb(layer.weight)), got "
                        f"{type(weight).__name__}")
    if weight.quant_type not in QUANT_TYPES:
        raise ValueError(f"weight.quant_type: expected one of {QUANT_TYPES}, got {weight.quant_type!r}")
    if weight.blocksize not in BLOCKSIZES:
        raise ValueError(f"weight.blocksize: expected one of {BLOCKSIZES}, got {weight.blocksize!r}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight.dtype: expected one of {WEIGHT_DTYPES}, got {weight.dtype!r}")
    shape = tuple(weight.shape)
    if len(shape) != 2 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ValueError(f"weight.shape: expected (N, K) with positive ints, got {weight.shape!r}")
    out_features, in_features = shape
    numel = out_features * in_features
    blocks = -(-numel // weight.blocksize)
    check_tensor("weight.packed", weight.packed, dtypes=(torch.uint8, *WEIGHT_DTYPES, *INDEX_DTYPES))
    nbytes = weight.packed.numel() * weight.packed.element_size()
    if nbytes != -(-numel // 2):
        raise ValueError(f"weight.packed: expected {-(-numel // 2)} bytes (two 4-bit codes per byte of an "
                         f"[N={out_features}, K={in_features}] weight), got {nbytes}")
    nested = weight.nested_absmax is not None
    check_tensor("weight.absmax", weight.absmax, dtypes=(torch.uint8,) if nested else (torch.float32,))
    if weight.absmax.numel() != blocks:
        raise ValueError(f"weight.absmax: expected {blocks} values (one per block of {weight.blocksize}), got "
                         f"{weight.absmax.numel()}")
    if nested:
        check_tensor("weight.nested_absmax", weight.nested_absmax, dtypes=(torch.float32,))
        check_tensor("weight.nested_code", weight.nested_code, dtypes=(torch.float32,))
        check_shape("weight.nested_code", weight.nested_code.reshape(-1), (256,), "the 8-bit code table")
        if weight.nested_absmax.numel() != -(-blocks // weight.nested_blocksize):
            raise ValueError(f"weight.nested_absmax: expected {-(-blocks // weight.nested_blocksize)} values, got "
                             f"{weight.nested_absmax.numel()}")
        check_tensor("weight.offset", weight.offset, dtypes=(torch.float32,))
        if weight.offset.numel() != 1:
            raise ValueError(f"weight.offset: expected one value, got shape {tuple(weight.offset.shape)}")
    elif weight.absmax.dtype != torch.float32:
        raise TypeError(f"weight.absmax: expected float32 (uint8 only with nested_absmax), got {weight.absmax.dtype}")
    check_same_device("x", x, **{f"weight.{name}": getattr(weight, name) for name in
                                 ("packed", "absmax", "nested_absmax", "nested_code", "offset")})
    return weight


def lora_linear_4bit(
    x: torch.Tensor,
    weight: Weight4bit,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    compute_dtype: torch.dtype | None = None,
    seed: int | torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """QLoRA linear: ``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T`` with W in bitsandbytes' 4-bit storage.

    Args:
        x: [..., K] activations (fp16, bf16, fp32; float64 on the torch backend).
        weight: :class:`Weight4bit` of an [N, K] weight (``Weight4bit.from_bnb(linear4bit.weight)``): W is
            ``reference.dequantize_4bit`` of it in ``weight.dtype``, cast to ``compute_dtype``.
        bias: [N] in ``compute_dtype``, or None.
        compute_dtype: the dtype of the base GEMM (bitsandbytes' ``compute_dtype``): x is cast to it for
            ``x @ W.T + b`` and the product cast back to x's dtype, as ``Linear4bit`` computes; None: x's dtype.
            Under ``torch.autocast`` x, the bias and the base GEMM take the autocast dtype.
            The low-rank part reads x itself, exactly as :func:`peftkern.lora_linear` (adapters in x's dtype or
            fp32; the same dropout stream: equal seeds drop equal elements).
        backend: "torch" (dequantize for the matmul) or "triton" (the packed weight decoded inside the fused
            GEMMs; fp16, bf16, fp32); "cuda" has no kernel for this op yet and raises ``ValueError``.
    Returns:
        [..., N] in x's dtype. Gradients flow to x, lora_a, lora_b (and bias if it requires grad); the 4-bit
        weight is frozen and its dense form is never kept (backward dequantizes again).
    """
    x, bias = autocast_inputs(x, bias)
    check_tensor("x", x, min_ndim=1)
    weight = _check_weight(weight, x)
    base_dtype = x.dtype if compute_dtype is None else compute_dtype
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        base_dtype = x.dtype  # the autocast dtype, which F.linear inside Linear4bit would compute in too
    if base_dtype not in WEIGHT_DTYPES and base_dtype != x.dtype:
        raise TypeError(f"compute_dtype: expected one of {WEIGHT_DTYPES} or None, got {compute_dtype!r}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected last dimension {in_features} (weight is [N={out_features}, K={in_features}]), "
                         f"got shape {tuple(x.shape)}")
    _check_adapters(x, out_features, in_features, None, lora_a, lora_b)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (out_features,), "[N]")
        check_same_device("x", x, bias=bias)
        if bias.dtype != base_dtype:
            raise TypeError(f"bias: expected the compute dtype ({base_dtype}), got {bias.dtype}")
    scaling = check_finite_scalar("scaling", scaling)
    dropout_p = check_probability("dropout_p", dropout_p)
    name = resolve_backend(x.device, OP, backend)
    if name == "cuda":
        raise _no_kernel(name)
    check_backend_dtypes(OP, name, x=x, bias=bias, lora_a=lora_a, lora_b=lora_b)
    dropout_p, seed_tensor = dropout_seed(x, dropout_p, training, seed)

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    quant = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset)
    meta = (weight.quant_type, weight.blocksize, weight.nested_blocksize, out_features, weight.dtype, base_dtype)
    head = (x2, *quant, bias, lora_a, lora_b, scaling, dropout_p, seed_tensor)
    if plain_eager(x2, *quant, bias, lora_a, lora_b, seed_tensor):
        y = _EagerLoRALinear4bit.apply(*head, meta, name)
    else:
        y, _ = torch.ops.peftkern.lora_linear_4bit(*head, *meta, name)
    return y.reshape(*lead, out_features)
