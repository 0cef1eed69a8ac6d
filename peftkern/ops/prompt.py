"""``peftkern.prompt_concat`` and ``peftkern.prefix_kv``: checks, backend dispatch, and the
``peftkern::prompt_concat`` / ``peftkern::prefix_kv`` custom ops with fake implementations and autograd.

prompt_concat returns three tensors from one launch (inputs_embeds, the extended mask, the extended labels);
the op always returns a labels tensor, empty ([0]) when no labels were given, and the public function turns
that back into None. Gradients go to ``prompts`` (summed per task) and to ``embed_weight`` only if it
requires grad; the Triton and CUDA C++ backwards are deterministic (fixed-order sums, no atomics). The CUDA
backend (csrc/include/peftkern/prompt.cuh, launched from ``_cuda_prompt``) mirrors the Triton kernels.
"""

from __future__ import annotations

import torch

from .. import reference
from ..backends import resolve_backend
from ._checks import (
    INDEX_DTYPES,
    check_backend_dtypes,
    check_same_device,
    check_shape,
    check_tensor,
    host_check_default,
)

__all__ = ["prompt_concat", "prefix_kv"]

MASK_DTYPES = (
    torch.bool, torch.uint8, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ---- torch backend ----------------------------------------------------------------------------------------


def _torch_prompt_backward(grad, input_ids, prompt_ids, prompts, embed_weight, need_prompts, need_embed):
    num_virtual = prompts.shape[1]
    dim = embed_weight.shape[1]
    compute = _compute_dtype(grad.dtype, prompts.dtype, embed_weight.dtype)
    grad_prompts = grad_embed = None
    if need_prompts:
        # A one-hot [P, B] product sums each task's rows: deterministic on every device, unlike index_add_.
        tasks = torch.arange(prompts.shape[0], device=grad.device)
        onehot = (prompt_ids[None, :] == tasks[:, None]).to(compute)
        rows = grad[:, :num_virtual].reshape(grad.shape[0], num_virtual * dim).to(compute)
        grad_prompts = (onehot @ rows).reshape(prompts.shape).to(prompts.dtype)
    if need_embed:
        tokens = grad[:, num_virtual:].reshape(-1, dim).to(compute)
        grad_embed = torch.zeros(embed_weight.shape, dtype=compute, device=grad.device)
        # index_put_ with accumulate sorts the indices on CUDA: deterministic, unlike index_add_'s atomics.
        grad_embed.index_put_((input_ids.reshape(-1).to(torch.int64),), tokens, accumulate=True)
        grad_embed = grad_embed.to(embed_weight.dtype)
    return grad_prompts, grad_embed


def _torch_prefix_backward(grad, prompt_ids, prefix):
    num_layers, _, batch, num_kv_heads, num_virtual, head_dim = grad.shape
    compute = _compute_dtype(grad.dtype, prefix.dtype)
    rows = grad.permute(2, 4, 0, 1, 3, 5).reshape(batch, prefix.shape[1] * prefix.shape[2]).to(compute)
    onehot = (prompt_ids[None, :] == torch.arange(prefix.shape[0], device=grad.device)[:, None]).to(compute)
    return (onehot @ rows).reshape(prefix.shape).to(prefix.dtype)


# ---- prompt_concat custom ops -----------------------------------------------------------------------------


@torch.library.custom_op("peftkern::prompt_concat", mutates_args=())
def _prompt_concat_op(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    prompts: torch.Tensor,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ..triton_kernels.prompt import prompt_concat_forward

        embeds, mask, new_labels = prompt_concat_forward(
            input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels
        )
    elif backend == "cuda":
        from ._cuda_prompt import prompt_concat_forward as cuda_forward

        embeds, mask, new_labels = cuda_forward(input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels)
    else:
        embeds, mask, new_labels = reference.prompt_concat(
            input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels
        )
    return embeds, mask, (new_labels if new_labels is not None else input_ids.new_empty(0))


@_prompt_concat_op.register_fake
def _(input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels, backend):
    batch, length = input_ids.shape
    total = prompts.shape[1] + length
    embeds = embed_weight.new_empty((batch, total, embed_weight.shape[1]))
    mask_dtype = torch.int64 if attention_mask is None else attention_mask.dtype
    mask = input_ids.new_empty((batch, total), dtype=mask_dtype)
    new_labels = input_ids.new_empty(0) if labels is None else labels.new_empty((batch, total))
    return embeds, mask, new_labels


@torch.library.custom_op("peftkern::prompt_concat_backward", mutates_args=())
def _prompt_concat_backward_op(
    grad: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    prompts: torch.Tensor,
    embed_weight: torch.Tensor,
    need_prompts: bool,
    need_embed: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dprompts [P, n, D], dembed [V, D]); a gradient not needed is an empty [0] tensor."""
    if backend == "triton":
        from ..triton_kernels.prompt import prompt_concat_backward

        grad_prompts, grad_embed = prompt_concat_backward(
            grad, input_ids, prompt_ids, prompts.shape[0], prompts.dtype, embed_weight.shape[0],
            embed_weight.dtype, need_prompts, need_embed,
        )
    elif backend == "cuda":
        from ._cuda_prompt import prompt_concat_backward as cuda_backward

        grad_prompts, grad_embed = cuda_backward(
            grad, input_ids, prompt_ids, prompts.shape[0], prompts.dtype, embed_weight.shape[0],
            embed_weight.dtype, need_prompts, need_embed,
        )
    else:
        grad_prompts, grad_embed = _torch_prompt_backward(
            grad, input_ids, prompt_ids, prompts, embed_weight, need_prompts, need_embed
        )
    return (
        grad_prompts if grad_prompts is not None else prompts.new_empty(0),
        grad_embed if grad_embed is not None else embed_weight.new_empty(0),
    )


@_prompt_concat_backward_op.register_fake
def _(grad, input_ids, prompt_ids, prompts, embed_weight, need_prompts, need_embed, backend):
    return (
        torch.empty_like(prompts) if need_prompts else prompts.new_empty(0),
        torch.empty_like(embed_weight) if need_embed else embed_weight.new_empty(0),
    )


def _prompt_setup_context(ctx, inputs, output):
    input_ids, embed_weight, prompts, prompt_ids, _, _, backend = inputs
    ctx.save_for_backward(input_ids, prompt_ids, prompts, embed_weight)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1], output[2])


def _prompt_backward(ctx, grad_embeds, _grad_mask, _grad_labels):
    input_ids, prompt_ids, prompts, embed_weight = ctx.saved_tensors
    need_embed, need_prompts = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_prompts = grad_embed = None
    if need_prompts or need_embed:
        grad_prompts, grad_embed = torch.ops.peftkern.prompt_concat_backward(
            grad_embeds, input_ids, prompt_ids, prompts, embed_weight, need_prompts, need_embed, ctx.backend
        )
    return (
        None,
        grad_embed if need_embed else None,
        grad_prompts if need_prompts else None,
        None,
        None,
        None,
        None,
    )


_prompt_concat_op.register_autograd(_prompt_backward, setup_context=_prompt_setup_context)


# ---- prefix_kv custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("peftkern::prefix_kv", mutates_args=())
def _prefix_kv_op(
    prefix: torch.Tensor, prompt_ids: torch.Tensor, num_layers: int, num_kv_heads: int, backend: str
) -> torch.Tensor:
    if backend == "triton":
        from ..triton_kernels.prompt import prefix_kv_forward

        return prefix_kv_forward(prefix, prompt_ids, num_layers, num_kv_heads)
    if backend == "cuda":
        from ._cuda_prompt import prefix_kv_forward as cuda_forward

        return cuda_forward(prefix, prompt_ids, num_layers, num_kv_heads)
    return reference.prefix_kv(prefix, prompt_ids, num_layers, num_kv_heads)


@_prefix_kv_op.register_fake
def _(prefix, prompt_ids, num_layers, num_kv_heads, backend):
    num_virtual, width = prefix.shape[1], prefix.shape[2]
    head_dim = width // (num_layers * 2 * num_kv_heads)
    return prefix.new_empty((num_layers, 2, prompt_ids.shape[0], num_kv_heads, num_virtual, head_dim))


@torch.library.custom_op("peftkern::prefix_kv_backward", mutates_args=())
def _prefix_kv_backward_op(
    grad: torch.Tensor, prompt_ids: torch.Tensor, prefix: torch.Tensor, backend: str
) -> torch.Tensor:
    if backend == "triton":
        from ..triton_kernels.prompt import prefix_kv_backward

        return prefix_kv_backward(grad, prompt_ids, prefix.shape[0], prefix.dtype)
    if backend == "cuda":
        from ._cuda_prompt import prefix_kv_backward as cuda_backward

        return cuda_backward(grad, prompt_ids, prefix.shape[0], prefix.dtype)
    return _torch_prefix_backward(grad, prompt_ids, prefix)


@_prefix_kv_backward_op.register_fake
def _(grad, prompt_ids, prefix, backend):
    return torch.empty_like(prefix)


def _prefix_setup_context(ctx, inputs, output):
    prefix, prompt_ids, _, _, backend = inputs
    ctx.save_for_backward(prompt_ids, prefix)
    ctx.backend = backend


def _prefix_backward(ctx, grad):
    prompt_ids, prefix = ctx.saved_tensors
    grad_prefix = None
    if ctx.needs_input_grad[0]:
        grad_prefix = torch.ops.peftkern.prefix_kv_backward(grad, prompt_ids, prefix, ctx.backend)
    return grad_prefix, None, None, None, None


_prefix_kv_op.register_autograd(_prefix_backward, setup_context=_prefix_setup_context)


# ---- checks -----------------------------------------------------------------------------------------------


def _check_ids_in_range(name: str, ids: torch.Tensor, upper: int, meaning: str) -> None:
    """Every id in [0, upper): one host sync, skipped while torch.compile traces (data-dependent)."""
    if ids.numel() == 0 or ids.device.type == "meta" or torch.compiler.is_compiling():
        return
    low, high = torch.stack([ids.min(), ids.max()]).tolist()
    if low < 0 or high >= upper:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: expected ids in [0, {upper}) ({meaning}), got {bad}")


def _as_prompt_ids(prompt_ids: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(prompt_ids, int) and not isinstance(prompt_ids, bool):
        return torch.full((batch,), prompt_ids, dtype=torch.int64, device=device)
    check_tensor("prompt_ids", prompt_ids, ndim=1, dtypes=INDEX_DTYPES)
    return prompt_ids


def _check_prompt_inputs(input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels, check_ids):
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("embed_weight", embed_weight, ndim=2)
    check_tensor("prompts", prompts, ndim=3)
    batch, length = input_ids.shape
    vocab, dim = embed_weight.shape
    num_prompts, num_virtual, prompt_dim = prompts.shape
    if prompt_dim != dim:
        raise ValueError(
            f"prompts: expected shape (*, *, {dim}) (last dim = embed_weight.shape[1], the hidden size), "
            f"got {tuple(prompts.shape)}"
        )
    if num_prompts == 0 or num_virtual == 0:
        raise ValueError(
            f"prompts: expected at least one task and one virtual token, got {tuple(prompts.shape)}"
        )
    check_shape("prompt_ids", prompt_ids, (batch,), "[B], one task per row of input_ids")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2, dtypes=MASK_DTYPES)
        check_shape("attention_mask", attention_mask, (batch, length), "[B, T] like input_ids")
    if labels is not None:
        check_tensor("labels", labels, ndim=2, dtypes=INDEX_DTYPES)
        check_shape("labels", labels, (batch, length), "[B, T] like input_ids")
    check_same_device(
        "embed_weight", embed_weight, input_ids=input_ids, prompts=prompts, prompt_ids=prompt_ids,
        attention_mask=attention_mask, labels=labels,
    )
    if prompts.dtype not in (embed_weight.dtype, torch.float32, torch.float64):
        raise TypeError(
            f"prompts: expected the dtype of embed_weight ({embed_weight.dtype}) or float32 (fp32 prompts "
            f"beside a 16-bit model), got {prompts.dtype}"
        )
    if host_check_default(check_ids, embed_weight.device):
        _check_ids_in_range("input_ids", input_ids, vocab, "rows of embed_weight")
        _check_ids_in_range("prompt_ids", prompt_ids, num_prompts, "tasks in prompts")


# ---- the public functions ---------------------------------------------------------------------------------


def prompt_concat(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    prompts: torch.Tensor,
    prompt_ids: torch.Tensor | int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    check_ids: bool | None = None,
) -> reference.PromptConcatOutput:
    """Prompt tuning's model input in one pass: each row's soft prompt, then its token embeddings.

    Args:
        input_ids: [B, T] int32/int64 token ids, each in [0, V).
        embed_weight: [V, D] the model's input embedding table (fp16, bf16, fp32; float64 on torch).
        prompts: [P, n, D] one soft prompt per task; embed_weight's dtype or float32.
        prompt_ids: [B] int32/int64, each row's task in [0, P) (or one int for every row).
        attention_mask: [B, T] or None; labels: [B, T] int or None.
        backend: "torch" | "triton" | "cuda"; see :mod:`peftkern.backends`.
        check_ids: reject out-of-range ids with a ValueError (one host sync). Default (None): on CPU tensors
            yes, on CUDA tensors no (no host sync: CUDA graphs, serving). Unchecked, the Triton and CUDA
            kernels still read nothing out of bounds (such rows come out zero), while the torch backend
            raises torch's own indexing error (a device-side assert on CUDA).
    Returns:
        ``PromptConcatOutput(inputs_embeds [B, n+T, D] in embed_weight's dtype, attention_mask [B, n+T]
        (ones over the prompt; int64 ones if none was given), labels [B, n+T] with -100 over the prompt or
        None)``. Gradients flow to prompts, and to embed_weight only if it requires grad.
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INDEX_DTYPES)
    prompt_ids = _as_prompt_ids(prompt_ids, input_ids.shape[0], input_ids.device)
    _check_prompt_inputs(input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels, check_ids)
    name = resolve_backend(embed_weight.device, "prompt_concat", backend)
    check_backend_dtypes("prompt_concat", name, embed_weight=embed_weight, prompts=prompts)
    embeds, mask, new_labels = torch.ops.peftkern.prompt_concat(
        input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels, name
    )
    return reference.PromptConcatOutput(embeds, mask, new_labels if labels is not None else None)


def prefix_kv(
    prefix: torch.Tensor,
    prompt_ids: torch.Tensor | int,
    num_layers: int,
    num_kv_heads: int,
    *,
    batch_size: int | None = None,
    backend: str | None = None,
    check_ids: bool | None = None,
) -> torch.Tensor:
    """Each row's prefix keys and values for every layer, gathered in one launch.

    Args:
        prefix: [P, n, num_layers * 2 * num_kv_heads * head_dim] per-task tables in ``peft``'s layout
            (last dim ordered (layer, key/value, head, head_dim)); float dtypes.
        prompt_ids: [B] int32/int64 tasks in [0, P), or one int for every row (then ``batch_size`` rows).
        num_layers, num_kv_heads: the model's layer count and key/value head count (GQA: fewer than the
            query heads).
        check_ids: as in :func:`prompt_concat` (default: a host check on CPU tensors only; unchecked, bad ids
            give zero rows on Triton and CUDA).
    Returns:
        [num_layers, 2, B, num_kv_heads, n, head_dim], contiguous: ``out[l, 0]`` / ``out[l, 1]`` are layer
        l's key / value prefix [B, H_kv, n, head_dim]. Gradients flow to ``prefix``, summed per task.
    """
    check_tensor("prefix", prefix, ndim=3)
    for arg, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    num_prompts, num_virtual, width = prefix.shape
    if num_prompts == 0 or num_virtual == 0:
        raise ValueError(
            f"prefix: expected at least one task and one virtual token, got {tuple(prefix.shape)}"
        )
    if width == 0 or width % (2 * num_layers * num_kv_heads):
        raise ValueError(
            f"prefix: expected a last dim that is a positive multiple of 2 * num_layers * num_kv_heads = "
            f"{2 * num_layers * num_kv_heads} ([P, n, L * 2 * H_kv * head_dim]), "
            f"got shape {tuple(prefix.shape)}"
        )
    if isinstance(prompt_ids, int) and not isinstance(prompt_ids, bool):
        if batch_size is None:
            raise ValueError("batch_size: expected the number of rows when prompt_ids is a single int")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size: expected an int >= 0, got {batch_size!r}")
        prompt_ids = torch.full((batch_size,), prompt_ids, dtype=torch.int64, device=prefix.device)
    check_tensor("prompt_ids", prompt_ids, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device("prefix", prefix, prompt_ids=prompt_ids)
    if host_check_default(check_ids, prefix.device):
        _check_ids_in_range("prompt_ids", prompt_ids, num_prompts, "tasks in prefix")
    name = resolve_backend(prefix.device, "prefix_kv", backend)
    check_backend_dtypes("prefix_kv", name, prefix=prefix)
    return torch.ops.peftkern.prefix_kv(prefix, prompt_ids, num_layers, num_kv_heads, name)
