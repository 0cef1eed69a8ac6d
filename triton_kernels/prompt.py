"""Soft-prompt kernels (prompt tuning and prefix tuning) and their launchers. Imports triton and torch only.

prompt_concat forward, one launch:
  OUT[b, s] = PROMPTS[PIDS[b], s]        for s <  n   (the row's soft prompt)
  OUT[b, s] = EMBED[IDS[b, s - n]]       for s >= n   (the token embedding)
  plus the extended attention mask (ones over the prompt) and labels (-100 over the prompt), written by the
  same programs: every position's mask and label costs one more element in the same pass.
prompt_concat backward:
  dPROMPTS[p, j] = sum over rows b with PIDS[b] == p of dOUT[b, j], rows summed in index order (one launch)
  dEMBED[v]      = sum over (b, t) with IDS[b, t] == v of dOUT[b, n + t], in index order (stable sort);
                   two launches: full chunks of ~sqrt(B*T) sorted positions holding one id summed in
                   parallel, then per id its leftover rows and its chunks' partials, in a fixed order
prefix_kv forward / backward, one launch each: the same gather / per-task sum over a [P, n, C] table whose
  C = (layer, key/value, head, head_dim) columns land in a [L, 2, B, H, n, head_dim] cache layout.

Every per-task or per-token sum is a fixed-order reduction (long ones split into partials summed in a
fixed order): deterministic, no atomics. Ids that are out of range (the ops reject them before launching)
read nothing: their rows come out zero.
All offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

__all__ = ["prompt_concat_forward", "prompt_concat_backward", "prefix_kv_forward", "prefix_kv_backward"]

IGNORE_INDEX = -100


def _blocks(width: int) -> tuple[int, int, int]:
    """(rows per program, columns per tile, warps): wide vector tiles over the feature dim."""
    if interpreting():
        # The interpreter's cost is per program and per op: few, large tiles.
        return 32, min(128, triton.next_power_of_2(max(width, 1))), 1
    return 8, min(512, triton.next_power_of_2(max(width, 1))), 4


# --------------------------------------------------------------------------------------------------------
# prompt_concat
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _prompt_concat_fwd_kernel(
    IDS, EMBED, PROMPTS, PIDS, OUT, MASK_IN, LABELS_IN, MASK_OUT, LABELS_OUT,
    T, NV, D, V, P, n_pos_blocks,
    stride_ib, stride_it, stride_ev, stride_ed, stride_pp, stride_pn, stride_pd, stride_pid,
    stride_ob, stride_os, stride_od, stride_mb, stride_mt, stride_lb, stride_lt,
    HAS_MASK: tl.constexpr, HAS_LABELS: tl.constexpr, IGNORE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (row b, BLOCK_S output positions): copies prompt rows and gathers embeddings."""
    pid = tl.program_id(0)
    b = (pid // n_pos_blocks).to(tl.int64)
    pos = (pid % n_pos_blocks).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    pos_ok = pos < NV + T
    is_prompt = pos < NV
    is_token = pos_ok & (pos >= NV)
    t = pos - NV
    # The row's task, broadcast over the tile (a load mask must be a tensor of the tile's shape).
    task = tl.load(PIDS + b * stride_pid + pos * 0).to(tl.int64)
    prompt_ok = is_prompt & (task >= 0) & (task < P)
    token = tl.load(IDS + b * stride_ib + t * stride_it, mask=is_token, other=0).to(tl.int64)
    token_ok = is_token & (token >= 0) & (token < V)
    prompt_rows = PROMPTS + task * stride_pp + pos * stride_pn
    embed_rows = EMBED + token * stride_ev
    out_rows = OUT + b * stride_ob + pos * stride_os
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        col_ok = cols < D
        soft = tl.load(prompt_rows[:, None] + cols[None, :] * stride_pd,
                       mask=prompt_ok[:, None] & col_ok[None, :], other=0.0)
        emb = tl.load(embed_rows[:, None] + cols[None, :] * stride_ed,
                      mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        # Exactly one of the two loads touched memory for each position; the other is zeros.
        value = tl.where(is_prompt[:, None], soft.to(OUT.dtype.element_ty), emb.to(OUT.dtype.element_ty))
        tl.store(out_rows[:, None] + cols[None, :] * stride_od, value, mask=pos_ok[:, None] & col_ok[None, :])
    if HAS_MASK:
        # Masked-off (prompt) positions read as 1: the extension costs nothing extra.
        mask = tl.load(MASK_IN + b * stride_mb + t * stride_mt, mask=is_token, other=1)
    else:
        mask = tl.full((BLOCK_S,), 1, tl.int32)
    tl.store(MASK_OUT + b * (NV + T) + pos, mask.to(MASK_OUT.dtype.element_ty), mask=pos_ok)
    if HAS_LABELS:
        label = tl.load(LABELS_IN + b * stride_lb + t * stride_lt, mask=is_token, other=IGNORE)
        tl.store(LABELS_OUT + b * (NV + T) + pos, label.to(LABELS_OUT.dtype.element_ty), mask=pos_ok)


@triton.jit
def _task_sum_kernel(
    G, PIDS, OUT,
    B, NV, C, INNER1, INNER0, rows_per_split,
    stride_gb, stride_gj, stride_g2, stride_g1, stride_g0, stride_pid,
    stride_os, stride_op, stride_oj, stride_oc,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """OUT[s, p, j, c] = sum over rows b of split s (in index order) with PIDS[b] == p of G[b, j, c].

    Split s owns rows [s * rows_per_split, (s + 1) * rows_per_split): with one split OUT is the result,
    with several the host sums the fp32 partials over s (a fixed-order reduction: still deterministic).

    Column c of the [P, n, C] table splits as (c2, c1, c0) with c0 < INNER0, c1 < INNER1, each with its
    own stride in G: so G may be the prompt part of dOUT ([B, n, D]: INNER1 = 1) or a prefix cache
    gradient [L, 2, B, H, n, head_dim] (c2 = layer * 2 + key/value, c1 = head, c0 = head_dim).
    One program per (task p, virtual token j, BLOCK_C columns, split); tasks no row uses come out zero.
    """
    p = tl.program_id(0) // NV
    j = (tl.program_id(0) % NV).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    c0 = cols % INNER0
    c1 = (cols // INNER0) % INNER1
    c2 = cols // (INNER0 * INNER1)
    col_offsets = j * stride_gj + c2 * stride_g2 + c1 * stride_g1 + c0 * stride_g0
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b0 in range(row_start, row_end, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        task = tl.load(PIDS + rows * stride_pid, mask=rows < row_end, other=-1)
        selected = task == p
        g = tl.load(G + rows[:, None] * stride_gb + col_offsets[None, :],
                    mask=selected[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(OUT + split * stride_os + p.to(tl.int64) * stride_op + j * stride_oj + cols * stride_oc,
             acc.to(OUT.dtype.element_ty), mask=col_ok)


@triton.jit
def _embed_rows_sum(G, ORDER, start, end, T, NV, stride_gb, stride_gs, stride_gd, cols, col_ok, acc,
                    BLOCK_R: tl.constexpr):
    """acc + the sum of dOUT[b, n + t, cols] over sorted positions [start, end) of ORDER, BLOCK_R rows per
    step (each step's rows added as one fixed reduction tree): a fixed order for fixed ids."""
    for i0 in range(start, end, BLOCK_R):
        i = i0 + tl.arange(0, BLOCK_R).to(tl.int64)
        i_ok = i < end
        flat = tl.load(ORDER + i, mask=i_ok, other=0).to(tl.int64)
        rows = G + (flat // T) * stride_gb + (NV + flat % T) * stride_gs
        g = tl.load(rows[:, None] + cols[None, :] * stride_gd, mask=i_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    return acc


@triton.jit
def _embed_chunk_kernel(
    G, ORDER, SORTED, PART,
    T, NV, D, chunk,
    stride_gb, stride_gs, stride_gd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """PART[k, :] = sum of the ``chunk`` sorted positions [k * chunk, (k + 1) * chunk) when they all hold one
    id (an interior chunk of a long segment); other chunks are left unwritten and never read.

    One program per (full chunk, BLOCK_D columns): a token seen 10^4 times is summed by many programs at
    once, not by one walking all its occurrences.
    """
    k = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = k * chunk
    interior = tl.load(SORTED + start) == tl.load(SORTED + start + chunk - 1)
    end = tl.where(interior, start + chunk, start)
    acc = _embed_rows_sum(G, ORDER, start, end, T, NV, stride_gb, stride_gs, stride_gd, cols, col_ok,
                          tl.zeros((BLOCK_D,), dtype=tl.float32), BLOCK_R)
    tl.store(PART + k * D + cols, acc, mask=cols < tl.where(interior, D, 0))


@triton.jit
def _embed_grad_kernel(
    G, ORDER, STARTS, PART, OUT,
    T, NV, D, chunk,
    stride_gb, stride_gs, stride_gd, stride_ov, stride_od,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[v, :] = sum of dOUT[b, n + t, :] over the token positions (b, t) holding id v.

    ORDER lists flat positions b * T + t sorted stably by id; STARTS[v]..STARTS[v + 1] is id v's segment.
    One program per (vocabulary row, BLOCK_D columns). The full chunks of ``chunk`` sorted positions that
    lie inside the segment come summed by ``_embed_chunk_kernel`` (PART); this program adds, in this
    order, the segment's rows before the first such chunk, the chunks' partials, and the rows after the
    last: at most 2 * chunk rows and cnt / chunk partials, a fixed order, so deterministic and bit-stable.
    """
    v = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start = tl.load(STARTS + v)
    end = tl.load(STARTS + v + 1)
    first = (start + chunk - 1) // chunk  # the first chunk starting inside the segment
    last = end // chunk  # one past the last chunk ending inside it
    has_mid = first < last
    head_end = tl.where(has_mid, first * chunk, end)
    tail_start = tl.where(has_mid, last * chunk, end)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc = _embed_rows_sum(G, ORDER, start, head_end, T, NV, stride_gb, stride_gs, stride_gd, cols, col_ok, acc,
                          BLOCK_R)
    for k in range(first, tl.where(has_mid, last, first)):
        acc += tl.load(PART + k * D + cols, mask=col_ok, other=0.0)
    acc = _embed_rows_sum(G, ORDER, tail_start, end, T, NV, stride_gb, stride_gs, stride_gd, cols, col_ok, acc,
                          BLOCK_R)
    tl.store(OUT + v * stride_ov + cols * stride_od, acc.to(OUT.dtype.element_ty), mask=col_ok)


def _embed_chunk(occurrences: int) -> tuple[int, int]:
    """(sorted positions per chunk, rows per step) for the embedding gradient, from the number of token
    positions alone: about sqrt(occurrences) per chunk, so one id's program adds at most ~2 sqrt rows and
    ~sqrt partials however often the id occurs (a padding token seen 10^4 times: ~260 steps, not 10^4)."""
    if interpreting():
        return 8, 4  # small, so CPU tests cover ids spanning several chunks
    return min(4096, max(64, triton.next_power_of_2(int(occurrences ** 0.5)))), 8


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
    batch, length = input_ids.shape
    vocab, dim = embed_weight.shape
    num_prompts, num_virtual, _ = prompts.shape
    total = num_virtual + length
    device = embed_weight.device
    if interpreting() and embed_weight.dtype == torch.bfloat16 and prompts.dtype != torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even): round on the host.
        prompts = prompts.to(torch.bfloat16)
    out = torch.empty((batch, total, dim), dtype=embed_weight.dtype, device=device)
    # bool tensors travel as uint8 (the same bytes) so that loads and stores stay plain integers.
    mask_in = attention_mask
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        mask_in = attention_mask.view(torch.uint8)
    mask_dtype = torch.int64 if attention_mask is None else mask_in.dtype
    mask_out = torch.empty((batch, total), dtype=mask_dtype, device=device)
    labels_out = None if labels is None else torch.empty((batch, total), dtype=labels.dtype, device=device)
    if batch and total:
        block_s, block_d, warps = _blocks(dim)
        n_pos_blocks = triton.cdiv(total, block_s)
        dummy = mask_out
        _prompt_concat_fwd_kernel[(batch * n_pos_blocks,)](
            input_ids, embed_weight, prompts, prompt_ids, out,
            dummy if mask_in is None else mask_in, dummy if labels is None else labels,
            mask_out, dummy if labels_out is None else labels_out,
            length, num_virtual, dim, vocab, num_prompts, n_pos_blocks,
            input_ids.stride(0), input_ids.stride(1), embed_weight.stride(0), embed_weight.stride(1),
            prompts.stride(0), prompts.stride(1), prompts.stride(2), prompt_ids.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            0 if mask_in is None else mask_in.stride(0), 0 if mask_in is None else mask_in.stride(1),
            0 if labels is None else labels.stride(0), 0 if labels is None else labels.stride(1),
            HAS_MASK=mask_in is not None, HAS_LABELS=labels is not None, IGNORE=IGNORE_INDEX,
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=warps,
        )
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        mask_out = mask_out.view(torch.bool)
    return out, mask_out, labels_out


def _task_sum(grad: torch.Tensor, prompt_ids: torch.Tensor, out: torch.Tensor, inner1: int, inner0: int,
              strides: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Launch ``_task_sum_kernel`` writing every element of ``out`` [P, n, C]."""
    num_prompts, num_virtual, width = out.shape
    batch = prompt_ids.shape[0]
    if out.numel() == 0:
        return out
    _, block_c, warps = _blocks(width)
    programs = num_prompts * num_virtual * triton.cdiv(width, block_c)
    if interpreting():
        # Small blocks and two splits whenever there are enough rows, so CPU tests cover the split path.
        block_b, splits = 4, min(2, triton.cdiv(max(batch, 1), 4))
    else:
        # Few (task, token, column-block) programs and many rows (one prompt, a large batch): split the rows
        # so that the GPU fills up, each split at least 4 row blocks long.
        block_b = 8
        splits = max(1, min(1024 // programs, triton.cdiv(batch, 4 * block_b)))
    rows_per_split = triton.cdiv(max(batch, 1), splits * block_b) * block_b
    splits = triton.cdiv(max(batch, 1), rows_per_split)
    target = out
    if splits > 1:
        shape = (splits, num_prompts, num_virtual, width)
        target = torch.empty(shape, dtype=torch.float32, device=out.device)
    stride_os = target.stride(0) if splits > 1 else 0
    inner = target[0] if splits > 1 else target
    _task_sum_kernel[(num_prompts * num_virtual, triton.cdiv(width, block_c), splits)](
        grad, prompt_ids, target,
        batch, num_virtual, width, inner1, inner0, rows_per_split,
        *strides, prompt_ids.stride(0),
        stride_os, inner.stride(0), inner.stride(1), inner.stride(2),
        BLOCK_B=block_b, BLOCK_C=block_c, num_warps=warps,
    )
    if splits > 1:
        out.copy_(target.sum(0))
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
    batch, total, dim = grad_embeds.shape
    length = input_ids.shape[1]
    num_virtual = total - length
    device = grad_embeds.device
    grad_prompts = grad_embed = None
    if need_prompts:
        grad_prompts = torch.empty((num_prompts, num_virtual, dim), dtype=prompts_dtype, device=device)
        strides = (grad_embeds.stride(0), grad_embeds.stride(1), 0, 0, grad_embeds.stride(2))
        _task_sum(grad_embeds, prompt_ids, grad_prompts, 1, dim, strides)
    if need_embed:
        grad_embed = torch.empty((vocab, dim), dtype=embed_dtype, device=device)
        if grad_embed.numel():
            # Segments by token id, built on the device (no host sync): a stable sort keeps index order.
            flat_ids = input_ids.reshape(-1).to(torch.int64)
            sorted_ids, order = torch.sort(flat_ids, stable=True)
            starts = torch.searchsorted(sorted_ids, torch.arange(vocab + 1, device=device, dtype=torch.int64))
            _, block_d, warps = _blocks(dim)
            occurrences = flat_ids.numel()
            chunk, block_r = _embed_chunk(occurrences)
            n_chunks = occurrences // chunk
            part = torch.empty((max(n_chunks, 1), dim), dtype=torch.float32, device=device)
            strides = (grad_embeds.stride(0), grad_embeds.stride(1), grad_embeds.stride(2))
            if n_chunks:
                _embed_chunk_kernel[(n_chunks, triton.cdiv(dim, block_d))](
                    grad_embeds, order, sorted_ids, part,
                    max(length, 1), num_virtual, dim, chunk, *strides,
                    BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
                )
            _embed_grad_kernel[(vocab, triton.cdiv(dim, block_d))](
                grad_embeds, order, starts, part, grad_embed,
                max(length, 1), num_virtual, dim, chunk, *strides,
                grad_embed.stride(0), grad_embed.stride(1),
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
            )
    return grad_prompts, grad_embed


# --------------------------------------------------------------------------------------------------------
# prefix_kv
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _prefix_kv_fwd_kernel(
    PREFIX, PIDS, OUT,
    NV, C, P, INNER1, INNER0,
    stride_pp, stride_pj, stride_pc, stride_pid, stride_ob, stride_oj, stride_o2, stride_o1, stride_o0,
    BLOCK_C: tl.constexpr,
):
    """OUT[c2, b, c1, j, c0] = PREFIX[PIDS[b], j, c]: one program per (row b, virtual token j, BLOCK_C
    columns), a contiguous read of the task's table row scattered into the cache layout."""
    b = (tl.program_id(0) // NV).to(tl.int64)
    j = (tl.program_id(0) % NV).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    task = tl.load(PIDS + b * stride_pid + cols * 0).to(tl.int64)
    ok = col_ok & (task >= 0) & (task < P)
    value = tl.load(PREFIX + task * stride_pp + j * stride_pj + cols * stride_pc, mask=ok, other=0.0)
    c0 = cols % INNER0
    c1 = (cols // INNER0) % INNER1
    c2 = cols // (INNER0 * INNER1)
    tl.store(OUT + b * stride_ob + j * stride_oj + c2 * stride_o2 + c1 * stride_o1 + c0 * stride_o0,
             value.to(OUT.dtype.element_ty), mask=col_ok)


def prefix_kv_forward(prefix: torch.Tensor, prompt_ids: torch.Tensor, num_layers: int, num_kv_heads: int
                      ) -> torch.Tensor:
    """prefix [P, n, L*2*H*hd], prompt_ids [B] -> [L, 2, B, H, n, hd] (contiguous), one launch."""
    num_prompts, num_virtual, width = prefix.shape
    batch = prompt_ids.shape[0]
    head_dim = width // (num_layers * 2 * num_kv_heads)
    out = torch.empty((num_layers, 2, batch, num_kv_heads, num_virtual, head_dim), dtype=prefix.dtype,
                      device=prefix.device)
    if out.numel():
        _, block_c, warps = _blocks(width)
        s_lk = out.stride(1)  # (layer, key/value) pairs are consecutive blocks of B*H*n*hd elements
        _prefix_kv_fwd_kernel[(batch * num_virtual, triton.cdiv(width, block_c))](
            prefix, prompt_ids, out,
            num_virtual, width, num_prompts, num_kv_heads, head_dim,
            prefix.stride(0), prefix.stride(1), prefix.stride(2), prompt_ids.stride(0),
            out.stride(2), out.stride(4), s_lk, out.stride(3), out.stride(5),
            BLOCK_C=block_c, num_warps=warps,
        )
    return out


def prefix_kv_backward(grad: torch.Tensor, prompt_ids: torch.Tensor, num_prompts: int,
                       prefix_dtype: torch.dtype) -> torch.Tensor:
    """grad [L, 2, B, H, n, hd] (any strides whose (layer, key/value) dims merge) -> dprefix [P, n, L*2*H*hd],
    the per-task sum over rows in index order."""
    num_layers, _, _, num_kv_heads, num_virtual, head_dim = grad.shape
    if grad.stride(0) != 2 * grad.stride(1):
        grad = grad.contiguous()
    width = num_layers * 2 * num_kv_heads * head_dim
    out = torch.empty((num_prompts, num_virtual, width), dtype=prefix_dtype, device=grad.device)
    strides = (grad.stride(2), grad.stride(4), grad.stride(1), grad.stride(3), grad.stride(5))
    return _task_sum(grad, prompt_ids, out, num_kv_heads, head_dim, strides)
