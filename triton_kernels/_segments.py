"""Row grouping by adapter id with torch ops only (no triton import): shared by the Triton and the CUDA C++
bottleneck launchers, so the CUDA backend runs where triton is not installed."""

from __future__ import annotations

import torch

__all__ = ["adapter_segments"]


def adapter_segments(adapter_ids: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [M] int64, segments [L + 2] int64): rows sorted by adapter (stable), and where each adapter's
    rows start; ids outside [0, L) go to a last segment that no kernel reads. Device ops, no host sync."""
    key = adapter_ids.reshape(-1).to(torch.int64)
    key = torch.where((key >= 0) & (key < num_adapters), key, torch.full_like(key, num_adapters))
    counts = torch.zeros(num_adapters + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    segments = torch.zeros(num_adapters + 2, dtype=torch.int64, device=key.device)
    segments[1:] = torch.cumsum(counts, 0)
    return torch.argsort(key, stable=True), segments
