"""The specification of every peftkern op, in plain PyTorch.

Readable and slow; runs on any device and dtype. Tests run it in float64 on the CPU and compare every
backend against it. Imports nothing of ours.

Dropout randomness is part of the spec: every backend draws its keep-mask from the same counter-based
stream, Philox-4x32-10 keyed by a 64-bit seed and counted by the element's flat index, exactly as
``triton.language.rand(seed, offset)`` with an int64 offset draws it. So a mask can be regenerated in
the backward pass from the seed alone, and all backends agree element for element.
"""

from __future__ import annotations

import torch

__all__ = [
    "philox_uniform",
    "dropout_mask",
    "lora_linear",
    "multi_lora_linear",
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


def philox_uniform(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 draws in [0, 1) for each int64 counter in ``offsets`` (any shape).

    Bit-exact with ``tl.rand(seed, offsets)`` for int64 offsets: counter (lo32(offset), hi32(offset), 0, 0),
    key (lo32(seed), hi32(seed)), ten Philox rounds, the first output word mapped to float.
    ``seed`` is a Python int or a 0-d/1-element integer tensor (kept on the device: no host sync).
    """
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
    # Reinterpret as int32 and fold negatives onto [0, 2**31): x < 0 -> ~x.
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_mask(seed: int | torch.Tensor, shape: tuple[int, int], p: float, device=None) -> torch.Tensor:
    """Keep-mask [rows, cols] (bool) of inverted dropout with drop probability ``p``.

    Element (i, j) of a row-major [rows, cols] matrix is kept when its draw at counter ``i * cols + j`` is
    at least ``p``; kept values are scaled by ``1 / (1 - p)`` by the caller.
    """
    rows, cols = shape
    if device is None and isinstance(seed, torch.Tensor):
        device = seed.device
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).reshape(rows, cols)
    return philox_uniform(seed, offsets) >= p


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
    dropout_mask_: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA linear: ``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T``.

    x: [..., K]; weight W: [N, K]; bias b: [N] or None; lora_a A: [r, K]; lora_b B: [N, r].
    Dropout (inverted, drop probability ``dropout_p``) touches only the low-rank path and only when
    ``training``. Its keep-mask over x viewed as [M, K] is ``dropout_mask_`` if given, else the Philox
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
        if dropout_mask_ is None and seed is not None:
            dropout_mask_ = dropout_mask(seed, tuple(x2.shape), dropout_p, device=x.device)
        if dropout_mask_ is None:
            dropped = torch.nn.functional.dropout(x2, dropout_p, training=True)
        else:
            dropped = x2 * dropout_mask_.reshape(x2.shape).to(x2.dtype) / (1.0 - dropout_p)
    out = out + scaling * ((dropped @ lora_a.T) @ lora_b.T)
    return out.reshape(*lead, weight.shape[0])


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
        i = int(ids[t])
        if not -1 <= i < lora_a.shape[0]:
            raise ValueError(f"adapter_ids: expected values in [-1, {lora_a.shape[0]}), got {i} at row {t}")
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
