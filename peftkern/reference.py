"""The specification of every peftkern op, in plain PyTorch.

Readable and slow; runs on any device and dtype. Tests run it in float64 on the CPU and compare every
backend against it. Imports nothing of ours.

Dropout randomness is part of the spec: every backend draws its keep-mask from the same counter-based
stream, Philox-4x32-10 keyed by a 64-bit seed, exactly as ``triton.language.randint4x(seed, offset)``
with an int64 offset draws it; each call's four output words decide four neighbouring elements of a row
(see :func:`dropout_mask`). So a mask can be regenerated in the backward pass from the seed alone, and all
backends agree element for element.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "philox_words",
    "uniform_from_words",
    "philox_uniform",
    "DROPOUT_WORDS",
    "dropout_mask",
    "lora_linear",
    "dora_weight_norm",
    "dora_linear",
    "ACTIVATIONS",
    "apply_activation",
    "bottleneck_adapter",
    "PromptConcatOutput",
    "prompt_concat",
    "prefix_kv",
    "multi_lora_linear",
    "lora_shrink",
    "lora_expand_add",
    "NF4_CODE",
    "FP4_CODE",
    "four_bit_code",
    "scale_blocks",
    "dequantize_4bit_absmax",
    "dequantize_4bit",
]

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
# The largest float32 scale such that (2**31 - 1) * scale < 1: uniform draws lie in [0, 1).
_UNIFORM_SCALE = 4.6566127342e-10


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b holds uint32 values in int64; the product wraps mod 2**64, whose low 64 bits are exact.
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox_words(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The four Philox-4x32-10 output words [..., 4] (uint32 values held in int64) for each int64 counter in
    ``offsets`` (any shape): counter (lo32(offset), hi32(offset), 0, 0), key (lo32(seed), hi32(seed)), ten
    rounds; bit-exact with ``tl.randint4x(seed, offsets)``. ``seed`` is a Python int or a 0-d/1-element
    integer tensor (kept on the device: no host sync)."""
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=offsets.device, dtype=torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """Philox words (uint32 values in int64) to float32 uniforms in [0, 1), as ``tl.uint_to_uniform_float``:
    read as int32, negatives folded onto [0, 2**31) (x < 0 -> ~x), times the largest scale below 2**-31."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 draws in [0, 1) for each int64 counter in ``offsets`` (any shape), from the first of
    its four words: bit-exact with ``tl.rand(seed, offsets)`` for int64 offsets."""
    return uniform_from_words(philox_words(seed, offsets)[..., 0])


# Keep decisions per Philox call: one per output word.
DROPOUT_WORDS = 4


def dropout_mask(
    seed: int | torch.Tensor, shape: tuple[int, int], p: float, device=None, first_row: int = 0
) -> torch.Tensor:
    """Keep-mask [rows, cols] (bool) of inverted dropout with drop probability ``p``.

    Each row is cut into groups of 4 columns (the last one padded): element (i, j) is decided by word
    ``j % 4`` of the Philox call at counter ``i * ceil(cols / 4) + j // 4``, kept when that word's uniform
    draw (:func:`uniform_from_words`) is at least ``p``; kept values are scaled by ``1 / (1 - p)`` by the
    caller. One Philox call decides four elements, and a kernel's tile of columns starting at a multiple of
    4 needs only its own calls. ``first_row``: the mask of rows [first_row, first_row + rows) of a taller
    matrix with the same columns.
    """
    rows, cols = shape
    if device is None and isinstance(seed, torch.Tensor):
        device = seed.device
    groups = -(-cols // DROPOUT_WORDS)
    row_ids = torch.arange(first_row, first_row + rows, dtype=torch.int64, device=device)
    counters = row_ids[:, None] * groups + torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    uniform = uniform_from_words(philox_words(seed, counters)).reshape(rows, groups * DROPOUT_WORDS)
    return uniform[:, :cols] >= p


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA linear: ``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T``.

    x: [..., K]; weight W: [N, K]; bias b: [N] or None; lora_a A: [r, K]; lora_b B: [N, r].
    Dropout (inverted, drop probability ``dropout_p``) touches only the low-rank path and only when
    ``training``. Its keep-mask over x viewed as [M, K] is ``keep_mask`` if given, else the Philox
    stream of ``seed`` (see :func:`dropout_mask`), else a fresh ``torch`` draw.
    Computes in the promoted dtype of its inputs; returns [..., N].
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = x2 @ weight.T
    if bias is not None:
        out = out + bias
    dropped = x2
    if training and dropout_p > 0.0:
        if keep_mask is None and seed is not None:
            keep_mask = dropout_mask(seed, tuple(x2.shape), dropout_p, device=x.device)
        if keep_mask is None:
            dropped = torch.nn.functional.dropout(x2, dropout_p, training=True)
        else:
            dropped = x2 * keep_mask.reshape(x2.shape).to(x2.dtype) / (1.0 - dropout_p)
    out = out + scaling * ((dropped @ lora_a.T) @ lora_b.T)
    return out.reshape(*lead, weight.shape[0])


# ---- DoRA (weight-decomposed LoRA) ---------------------------------------------------------------------------


def dora_weight_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight_norm_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``||W + scaling * B @ A||`` per output row [N], without the dense [N, K] matrix.

    ``||W_n + s (BA)_n||^2 = ||W_n||^2 + 2 s ((W A^T) . B)_n + s^2 ((B (A A^T)) . B)_n`` (row sums of
    elementwise products): O(N r + r^2) memory. weight [N, K], lora_a [r, K], lora_b [N, r];
    ``weight_norm_sq`` [N] is ``||W_n||^2`` (computed when None; constant while W is frozen).
    Computes in the promoted dtype of its inputs.
    """
    if weight_norm_sq is None:
        weight_norm_sq = (weight * weight).sum(1)
    cross = ((weight @ lora_a.T) * lora_b).sum(1)
    square = ((lora_b @ (lora_a @ lora_a.T)) * lora_b).sum(1)
    # Rounding can take a (near-)zero row a hair below 0; the true value is >= 0.
    return (weight_norm_sq + 2.0 * scaling * cross + scaling * scaling * square).clamp_min(0.0).sqrt()


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA linear, exactly as ``peft`` (``use_dora=True``) computes it.

    With g = magnitude / ||W + scaling * B @ A|| per output column (the norm detached: it gets no gradient,
    DoRA paper section 4.3) and xd = dropout(x):
      no dropout (eval, or p = 0):  ``g * (x @ W.T + scaling * (x @ A.T) @ B.T) + b``
      dropout in training:          ``x @ W.T + b + (g - 1) * (xd @ W.T) + g * scaling * (xd @ A.T) @ B.T``
    (peft recomputes the base product from the dropped-out x in that case). Shapes as :func:`lora_linear`;
    magnitude [N] (peft's ``lora_magnitude_vector``). Dropout's mask as in :func:`lora_linear`.
    Computes in the promoted dtype of its inputs; returns [..., N].
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    norm = dora_weight_norm(weight, lora_a, lora_b, scaling).detach()
    scale = magnitude / norm
    base = x2 @ weight.T
    if training and dropout_p > 0.0:
        if keep_mask is None and seed is not None:
            keep_mask = dropout_mask(seed, tuple(x2.shape), dropout_p, device=x.device)
        if keep_mask is None:
            dropped = torch.nn.functional.dropout(x2, dropout_p, training=True)
        else:
            dropped = x2 * keep_mask.reshape(x2.shape).to(x2.dtype) / (1.0 - dropout_p)
        out = base + (scale - 1.0) * (dropped @ weight.T) + scale * scaling * ((dropped @ lora_a.T) @ lora_b.T)
    else:
        out = scale * (base + scaling * ((x2 @ lora_a.T) @ lora_b.T))
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, weight.shape[0])


# Names accepted by ``bottleneck_adapter``; "swish" is another name for "silu".
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swish", "tanh")


def apply_activation(name: str, h: torch.Tensor) -> torch.Tensor:
    """The bottleneck adapter's nonlinearity: relu, gelu (exact, erf), gelu_tanh, silu/swish, tanh."""
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return torch.nn.functional.gelu(h, approximate="none")
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    if name in ("silu", "swish"):
        return torch.nn.functional.silu(h)
    if name == "tanh":
        return torch.tanh(h)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


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
) -> torch.Tensor:
    """Bottleneck adapter: ``residual + scaling * up(act(down(x)))``, residual defaulting to x.

    x: [..., D]. One adapter (``adapter_ids`` None): down_weight [Bn, D], down_bias [Bn] or None,
    up_weight [D, Bn], up_bias [D] or None. Several (``adapter_ids`` [rows], rows = x.numel() // D, or
    x.shape[:-1]): the same shapes stacked as [L, ...]; row t uses adapter ``adapter_ids[t]``, and id -1
    passes the row through (output = residual). residual: x's shape. Returns x's shape.
    """
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    res = (x if residual is None else residual).reshape(-1, dim)
    if adapter_ids is None:
        h = x2 @ down_weight.T
        if down_bias is not None:
            h = h + down_bias
        out = apply_activation(activation, h) @ up_weight.T
        if up_bias is not None:
            out = out + up_bias
        return (res + scaling * out).reshape(x.shape)
    ids = adapter_ids.reshape(-1).to(torch.int64)
    active = ids >= 0
    safe = torch.where(active, ids, torch.zeros_like(ids))
    # A -1 row reaches no adapter, not even through its gradient: its x is dropped (not multiplied by 0,
    # which would carry a NaN or inf of x into adapter 0's weight gradient).
    x2 = torch.where(active[:, None], x2, torch.zeros_like(x2))
    # Gather each row's own weights: [rows, Bn, D] and [rows, D, Bn]. Slow and clear.
    h = torch.einsum("td,tbd->tb", x2, down_weight[safe])
    if down_bias is not None:
        h = h + down_bias[safe]
    out = torch.einsum("tb,tdb->td", apply_activation(activation, h), up_weight[safe])
    if up_bias is not None:
        out = out + up_bias[safe]
    out = torch.where(active[:, None], out, torch.zeros_like(out))
    return (res + scaling * out).reshape(x.shape)


class PromptConcatOutput(NamedTuple):
    """What :func:`prompt_concat` returns: ``inputs_embeds`` [B, n+T, D], ``attention_mask`` [B, n+T],
    ``labels`` [B, n+T] or None."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None


IGNORE_INDEX = -100


def prompt_concat(
    input_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    prompts: torch.Tensor,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> PromptConcatOutput:
    """Prompt tuning's input: each row's soft prompt, then its token embeddings.

    input_ids: [B, T] token ids into embed_weight [V, D]; prompts: [P, n, D] (one soft prompt per task);
    prompt_ids: [B], row b uses prompts[prompt_ids[b]]. Returns
      inputs_embeds  [B, n+T, D] in embed_weight's dtype: prompts[prompt_ids[b]], then
                     embed_weight[input_ids[b]]
      attention_mask [B, n+T]: ones over the prompt, then ``attention_mask`` (all ones, int64, if None)
      labels         [B, n+T]: -100 over the prompt, then ``labels`` (None if None)
    """
    batch, _ = input_ids.shape
    num_virtual = prompts.shape[1]
    tokens = embed_weight[input_ids]
    soft = prompts[prompt_ids].to(embed_weight.dtype)
    inputs_embeds = torch.cat([soft, tokens], dim=1)
    if attention_mask is None:
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.int64, device=input_ids.device)
    else:
        ones = torch.ones(batch, num_virtual, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)
    if labels is not None:
        ignored = torch.full((batch, num_virtual), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        labels = torch.cat([ignored, labels], dim=1)
    return PromptConcatOutput(inputs_embeds, mask, labels)


def prefix_kv(
    prefix: torch.Tensor, prompt_ids: torch.Tensor, num_layers: int, num_kv_heads: int
) -> torch.Tensor:
    """Prefix tuning's per-row keys and values for every layer.

    prefix: [P, n, num_layers * 2 * num_kv_heads * head_dim], one table per task in ``peft``'s layout
    (the last dim is (layer, key/value, head, head_dim), row-major); prompt_ids: [B].
    Returns [num_layers, 2, B, num_kv_heads, n, head_dim]: ``out[l, 0]`` is layer l's key prefix and
    ``out[l, 1]`` its value prefix, each [B, H_kv, n, head_dim] as a ``transformers`` cache holds them.
    """
    tasks, num_virtual, width = prefix.shape
    head_dim = width // (num_layers * 2 * num_kv_heads)
    rows = prefix[prompt_ids].reshape(prompt_ids.shape[0], num_virtual, num_layers, 2, num_kv_heads, head_dim)
    return rows.permute(2, 3, 0, 4, 1, 5).contiguous()


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scalings,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched multi-LoRA linear: each row picks its own adapter.

    For every row t of x (viewed as [M, K]) with ``i = adapter_ids[t]``:
    ``y[t] = x[t] @ W.T + b + scalings[i] * (x[t] @ A[i, :r_i].T) @ B[i, :, :r_i].T`` with
    ``r_i = ranks[i]``; ``i = -1`` means the base model only.

    x: [..., K]; weight W: [N, K]; bias b: [N] or None; lora_a A: [L, r_max, K]; lora_b B: [L, N, r_max];
    adapter_ids: integer tensor with x's leading shape, values in [-1, L); scalings: [L] (tensor or
    sequence); ranks: [L] integers in [0, r_max], or None for r_max everywhere.
    Computes in the promoted dtype of its inputs; returns [..., N].
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1)
    r_max = lora_a.shape[1]
    out = x2 @ weight.T
    if bias is not None:
        out = out + bias
    rows = []
    for t in range(x2.shape[0]):
        i = _row_adapter(ids, t, lora_a.shape[0])
        row = out[t]
        if i != -1:
            rank = r_max if ranks is None else int(ranks[i])
            a = lora_a[i, :rank]
            b = lora_b[i, :, :rank]
            row = row + float(scalings[i]) * ((x2[t] @ a.T) @ b.T)
        rows.append(row)
    if rows:
        out = torch.stack(rows)
    return out.reshape(*lead, weight.shape[0])


def _row_adapter(adapter_ids: torch.Tensor, t: int, num_adapters: int) -> int:
    i = int(adapter_ids[t])
    if not -1 <= i < num_adapters:
        raise ValueError(f"adapter_ids: expected values in [-1, {num_adapters}), got {i} at row {t}")
    return i


def lora_shrink(x: torch.Tensor, lora_a, adapter_ids: torch.Tensor, ranks=None) -> torch.Tensor:
    """The serving shrink: ``s[t, :r_i] = x[t] @ A[i, :r_i].T`` with ``i = adapter_ids[t]``, zero past r_i
    and for rows with i = -1.

    x: [M, K]; lora_a: A [L, R, K] (returns [M, R]) or a list of n of them (merged slices such as q/k/v:
    returns [n, M, R]); adapter_ids: [M] in [-1, L); ranks: [L] in [0, R] or None (R everywhere).
    Returns float64 for float64 inputs, else float32 (computed in float64 here).
    """
    slices = [lora_a] if isinstance(lora_a, torch.Tensor) else list(lora_a)
    num_adapters, r_max = slices[0].shape[:2]
    wide = torch.float64 if torch.float64 in (x.dtype, slices[0].dtype) else torch.float32
    out = torch.zeros(len(slices), x.shape[0], r_max, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        i = _row_adapter(adapter_ids, t, num_adapters)
        if i == -1:
            continue
        rank = r_max if ranks is None else int(ranks[i])
        for j, a in enumerate(slices):
            out[j, t, :rank] = x[t].double() @ a[i, :rank].double().T
    out = out.to(wide)
    return out[0] if isinstance(lora_a, torch.Tensor) else out


def lora_expand_add(
    y: torch.Tensor, s: torch.Tensor, lora_b, adapter_ids: torch.Tensor, scalings, offset: int = 0, ranks=None
) -> torch.Tensor:
    """The serving expand-add, in place: ``y[t, o_j : o_j + N_j] += scalings[i] * s_j[t, :r_i] @
    B_j[i, :, :r_i].T`` with ``i = adapter_ids[t]``; rows with i = -1 are left untouched.

    y: [M, >= offset + sum N_j]; lora_b: B [L, N, R] with s [M, R], or a list of n of them with s
    [n, M, R], slice j written at ``o_j = offset + N_0 + ... + N_(j-1)``; scalings: [L]; ranks: [L] or
    None. Computed in float64, rounded once to y's dtype. Returns y.
    """
    slices = [lora_b] if isinstance(lora_b, torch.Tensor) else list(lora_b)
    inputs = [s] if isinstance(lora_b, torch.Tensor) else list(s)
    num_adapters, _, r_max = slices[0].shape
    for t in range(y.shape[0]):
        i = _row_adapter(adapter_ids, t, num_adapters)
        if i == -1:
            continue
        rank = r_max if ranks is None else int(ranks[i])
        column = offset
        for s_j, b in zip(inputs, slices):
            width = b.shape[1]
            update = float(scalings[i]) * (s_j[t, :rank].double() @ b[i, :, :rank].double().T)
            y[t, column : column + width] = (y[t, column : column + width].double() + update).to(y.dtype)
            column += width
    return y


# ---- bitsandbytes' 4-bit storage (QLoRA) -------------------------------------------------------------------

# The 16 levels of NormalFloat4 (quantiles of N(0, 1) scaled to [-1, 1]), indexed by the 4-bit code.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in code order, before dividing by its maximum 12;
# the float32 table is these divided by 12 in float32, as bitsandbytes builds it.
FP4_CODE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def four_bit_code(quant_type: str, device=None) -> torch.Tensor:
    """The float32 value of each 4-bit code [16] for ``quant_type`` "nf4" or "fp4"."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_CODE, dtype=torch.float32, device=device) / 12.0
    raise ValueError(f"quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")


def scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values [n] (float32) times the scale of their block of ``blocksize`` consecutive elements."""
    numel = values.numel()
    padded = torch.nn.functional.pad(values, (0, -numel % blocksize))
    return (padded.view(-1, blocksize) * scales.reshape(-1, 1)).reshape(-1)[:numel]


def dequantize_4bit_absmax(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int,
    offset: torch.Tensor | float,
) -> torch.Tensor:
    """Double-quantized absmax (uint8 codes) as float32: ``nested_code[absmax[b]] * nested_absmax[b //
    nested_blocksize] + offset``, bitsandbytes' 8-bit blockwise dequantization plus the offset, in float32."""
    scales = nested_code.float()[absmax.reshape(-1).long()]
    return scale_blocks(scales, nested_absmax.float(), nested_blocksize) + offset


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    offset: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """bitsandbytes' 4-bit weight (``quantize_4bit``'s storage) as a dense tensor of ``shape`` in ``dtype``.

    packed: the weight's ``ceil(numel / 2)`` bytes (any shape; a ``quant_storage`` dtype other than uint8 is
    read as its bytes): element 2i is the high nibble of byte i, element 2i + 1 its low nibble, row-major over
    ``shape``. The elements form blocks of ``blocksize`` consecutive values (across rows when a row is not a
    multiple of it); element j is ``code[nibble_j] * absmax[j // blocksize]`` in float32, then rounded once
    to ``dtype``. ``code`` is :func:`four_bit_code` of ``quant_type``.

    absmax: float32 [blocks], or, double-quantized (``compress_statistics``), uint8 [blocks] codes into
    ``nested_code`` [256] (float32) scaled per block of ``nested_blocksize`` by ``nested_absmax`` (float32)
    plus ``offset``: ``absmax[b] = nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset``.
    """
    data = packed if packed.dtype == torch.uint8 else packed.contiguous().view(torch.uint8)
    data = data.reshape(-1)
    numel = math.prod(shape)
    codes = torch.stack((data >> 4, data & 0xF), dim=-1).reshape(-1)[:numel]
    values = four_bit_code(quant_type, packed.device)[codes.long()]
    if nested_absmax is not None:
        absmax = dequantize_4bit_absmax(absmax, nested_absmax, nested_code, nested_blocksize, offset)
    return scale_blocks(values, absmax.float(), blocksize).reshape(shape).to(dtype)
