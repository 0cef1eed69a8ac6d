"""The CUDA C++ launchers of prompt_concat and prefix_kv: the same signatures and return conventions as
``peftkern.triton_kernels.prompt``'s, calling the header-only kernels of ``csrc/include/peftkern/prompt.cuh``
through ``peftkern._C`` with raw device addresses on torch's current stream.

Outputs, workspaces and the backward's id sort are torch's (caching allocator, stream semantics, no host
sync); the extension only launches kernels. Ids travel as (address, strides, element bytes), so int32 and
int64 ids need no conversion; the attention mask and labels are copied bit for bit in their own dtype.
"""

from __future__ import annotations

import torch

from ..backends import cuda_extension
from ._cuda import _dtype_code, _launch_context, _strides

__all__ = ["prompt_concat_forward", "prompt_concat_backward", "prefix_kv_forward", "prefix_kv_backward"]

IGNORE_INDEX = -100
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(value: float | int, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` stored in ``dtype``, as a non-negative int (the kernels' fill values)."""
    width = torch.empty((), dtype=dtype).element_size()
    word = torch.tensor([value], dtype=dtype).view(_SAME_WIDTH_INT[width]).item()  # a CPU tensor: no sync
    return int(word) & ((1 << (8 * width)) - 1)


def prompt_concat_forward(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    prompts: torch.Tensor,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids [B, T], embed_weight [V, D], prompts [P, n, D], prompt_ids [B], attention_mask [B, T] or
    None, labels [B, T] or None -> (inputs_embeds [B, n+T, D] in embed_weight's dtype, mask [B, n+T]
    (int64 ones over everything if attention_mask is None), labels [B, n+T] or None). One launch."""
    ext = cuda_extension()
    batch, length = input_ids.shape
    vocab, dim = embed_weight.shape
    num_prompts, num_virtual, _ = prompts.shape
    total = num_virtual + length
    device = embed_weight.device
    dtype = _dtype_code(ext, embed_weight.dtype, "embed_weight")
    prompts_dtype = _dtype_code(ext, prompts.dtype, "prompts")
    out = torch.empty((batch, total, dim), dtype=embed_weight.dtype, device=device)
    # bool travels as uint8 (the same bytes); every other mask dtype is copied in its own width.
    mask_in = attention_mask
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        mask_in = attention_mask.view(torch.uint8)
    mask_dtype = torch.int64 if mask_in is None else mask_in.dtype
    mask_out = torch.empty((batch, total), dtype=mask_dtype, device=device)
    labels_out = None if labels is None else torch.empty((batch, total), dtype=labels.dtype, device=device)
    if batch and total:
        with torch.cuda.device(device):
            device_index, stream = _launch_context(embed_weight)
            ext.prompt_concat_forward(
                dtype, prompts_dtype,
                int(input_ids.data_ptr()), _strides(input_ids), input_ids.element_size(),
                int(prompt_ids.data_ptr()), int(prompt_ids.stride(0)), prompt_ids.element_size(),
                embed_weight.data_ptr(), _strides(embed_weight),
                prompts.data_ptr(), tuple(int(s) for s in prompts.stride()),
                out.data_ptr(), tuple(int(s) for s in out.stride()),
                0 if mask_in is None else mask_in.data_ptr(), (0, 0) if mask_in is None else _strides(mask_in),
                mask_out.element_size(), _bits(1, mask_dtype), mask_out.data_ptr(),
                0 if labels is None else labels.data_ptr(), (0, 0) if labels is None else _strides(labels),
                8 if labels is None else labels.element_size(),
                0 if labels is None else _bits(IGNORE_INDEX, labels.dtype),
                0 if labels_out is None else labels_out.data_ptr(),
                batch, length, num_virtual, dim, vocab, num_prompts, device_index, stream,
            )
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        mask_out = mask_out.view(torch.bool)
    return out, mask_out, labels_out


def _task_sum(ext, grad: torch.Tensor, strides: tuple[int, ...], prompt_ids: torch.Tensor, out: torch.Tensor,
              inner1: int, inner0: int) -> torch.Tensor:
    """out [P, n, C] (contiguous) = the per-task sum of grad's rows, columns split as (c2, c1, c0)."""
    num_prompts, num_virtual, width = out.shape
    batch = prompt_ids.shape[0]
    if out.numel() == 0:
        return out
    workspace_floats = ext.prompt_task_sum_workspace_floats(batch, num_prompts, num_virtual, width)
    workspace = torch.empty(workspace_floats, dtype=torch.float32, device=out.device)
    with torch.cuda.device(out.device):
        device_index, stream = _launch_context(out)
        ext.prompt_task_sum(
            _dtype_code(ext, grad.dtype, "grad"), _dtype_code(ext, out.dtype, "out"),
            grad.data_ptr(), tuple(int(s) for s in strides),
            int(prompt_ids.data_ptr()), int(prompt_ids.stride(0)), prompt_ids.element_size(),
            out.data_ptr(), workspace.data_ptr(), workspace_floats,
            batch, num_prompts, num_virtual, width, inner1, inner0, device_index, stream,
        )
    return out


def prompt_concat_backward(
    grad_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    num_prompts: int,
    prompts_dtype: torch.dtype,
    vocab: int,
    embed_dtype: torch.dtype,
    need_prompts: bool,
    need_embed: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_embeds [B, n+T, D] -> (dprompts [P, n, D] in prompts_dtype, dembed [V, D] in embed_dtype),
    each None when not needed. Deterministic: fixed-order sums, no atomics."""
    ext = cuda_extension()
    batch, total, dim = grad_embeds.shape
    length = input_ids.shape[1]
    num_virtual = total - length
    device = grad_embeds.device
    if grad_embeds.dtype != embed_dtype:
        grad_embeds = grad_embeds.to(embed_dtype)  # the kernels read the gradient in the table's dtype
    grad_prompts = grad_embed = None
    if need_prompts:
        grad_prompts = torch.empty((num_prompts, num_virtual, dim), dtype=prompts_dtype, device=device)
        s_b, s_s, s_d = grad_embeds.stride()
        _task_sum(ext, grad_embeds, (s_b, s_s, 0, 0, s_d), prompt_ids, grad_prompts, 1, max(dim, 1))
    if need_embed:
        grad_embed = torch.empty((vocab, dim), dtype=embed_dtype, device=device)
        if grad_embed.numel():
            # Segments by token id, built on the device (no host sync): a stable sort keeps index order, so
            # each id's sum runs in the same order on every call.
            flat_ids = input_ids.reshape(-1).to(torch.int64)
            sorted_ids, order = torch.sort(flat_ids, stable=True)
            starts = torch.searchsorted(sorted_ids, torch.arange(vocab + 1, device=device, dtype=torch.int64))
            with torch.cuda.device(device):
                device_index, stream = _launch_context(grad_embed)
                ext.prompt_embed_grad(
                    _dtype_code(ext, embed_dtype, "embed_weight"),
                    grad_embeds.data_ptr(), tuple(int(s) for s in grad_embeds.stride()),
                    order.data_ptr(), starts.data_ptr(), grad_embed.data_ptr(),
                    batch, length, num_virtual, dim, vocab, device_index, stream,
                )
    return grad_prompts, grad_embed


def prefix_kv_forward(prefix: torch.Tensor, prompt_ids: torch.Tensor, num_layers: int, num_kv_heads: int
                      ) -> torch.Tensor:
    """prefix [P, n, L*2*H*hd], prompt_ids [B] -> [L, 2, B, H, n, hd] (contiguous), one launch."""
    ext = cuda_extension()
    num_prompts, num_virtual, width = prefix.shape
    batch = prompt_ids.shape[0]
    head_dim = width // (num_layers * 2 * num_kv_heads)
    out = torch.empty((num_layers, 2, batch, num_kv_heads, num_virtual, head_dim), dtype=prefix.dtype,
                      device=prefix.device)
    if out.numel():
        # (layer, key/value) pairs are consecutive blocks of B*H*n*hd elements: one column index c2 = l*2 + kv.
        strides = (out.stride(2), out.stride(4), out.stride(1), out.stride(3), out.stride(5))
        with torch.cuda.device(prefix.device):
            device_index, stream = _launch_context(prefix)
            ext.prefix_kv_forward(
                _dtype_code(ext, prefix.dtype, "prefix"),
                prefix.data_ptr(), tuple(int(s) for s in prefix.stride()),
                int(prompt_ids.data_ptr()), int(prompt_ids.stride(0)), prompt_ids.element_size(),
                out.data_ptr(), tuple(int(s) for s in strides),
                batch, num_prompts, num_virtual, width, num_kv_heads, head_dim, device_index, stream,
            )
    return out


def prefix_kv_backward(grad: torch.Tensor, prompt_ids: torch.Tensor, num_prompts: int,
                       prefix_dtype: torch.dtype) -> torch.Tensor:
    """grad [L, 2, B, H, n, hd] (any strides whose (layer, key/value) dims merge) -> dprefix [P, n, L*2*H*hd],
    the per-task sum over rows in index order."""
    ext = cuda_extension()
    num_layers, _, _, num_kv_heads, num_virtual, head_dim = grad.shape
    if grad.dtype != prefix_dtype:
        grad = grad.to(prefix_dtype)
    if grad.stride(0) != 2 * grad.stride(1):
        grad = grad.contiguous()
    width = num_layers * 2 * num_kv_heads * head_dim
    out = torch.empty((num_prompts, num_virtual, width), dtype=prefix_dtype, device=grad.device)
    strides = (grad.stride(2), grad.stride(4), grad.stride(1), grad.stride(3), grad.stride(5))
    return _task_sum(ext, grad, strides, prompt_ids, out, num_kv_heads, head_dim)
