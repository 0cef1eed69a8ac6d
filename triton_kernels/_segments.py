"""Row grouping by adapter id with torch ops only (no triton import): shared by the Triton launchers, the CUDA
C++ bottleneck launchers and ``peftkern.LoRABatch``, so the CUDA backend runs where triton is not installed."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Segments", "adapter_segments", "build_segments"]


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


class Segments(NamedTuple):
    """Rows grouped by adapter.

    perm: [M] int64, row indices in the order of a stable sort by adapter id (base-only rows first).
    bounds: [2, L + 1] int64, ``bounds[0, j]:bounds[1, j]`` is the slice of ``perm`` for adapter j - 1.
    tiles: [3, n_tiles] int64, per tile (adapter, first sorted position, end of its segment); padding
        tiles past the last real one are empty (start = end = 0) with adapter -1.
    block_m: rows per tile.
    """

    perm: torch.Tensor
    bounds: torch.Tensor
    tiles: torch.Tensor
    block_m: int


def build_segments(adapter_ids: torch.Tensor, num_adapters: int, block_m: int) -> Segments:
    """Group the rows of ``adapter_ids`` [M] by adapter, on the device, without a host sync.

    Ids outside [-1, num_adapters) join the base-only group, as the kernels treat them.
    """
    device = adapter_ids.device
    M, L = adapter_ids.numel(), num_adapters
    ids = adapter_ids.reshape(-1).to(torch.int64)
    keys = torch.where((ids >= 0) & (ids < L), ids + 1, 0)  # 0 = base only, j = adapter j - 1
    sorted_keys, perm = torch.sort(keys, stable=True)
    groups = torch.arange(L + 1, device=device, dtype=torch.int64)
    starts = torch.searchsorted(sorted_keys, groups)
    ends = torch.searchsorted(sorted_keys, groups, right=True)
    tiles_per_group = (ends - starts + block_m - 1) // block_m
    tile_ends = torch.cumsum(tiles_per_group, 0)
    n_tiles = -(-M // block_m) + min(L + 1, M)  # each non-empty group adds at most one partial tile
    tile = torch.arange(n_tiles, device=device, dtype=torch.int64)
    group = torch.searchsorted(tile_ends, tile, right=True)
    real = group <= L
    group = group.clamp(max=L)
    first_tile = tile_ends[group] - tiles_per_group[group]
    start = starts[group] + (tile - first_tile) * block_m
    zero = torch.zeros_like(tile)
    tiles = torch.stack([
        torch.where(real, group - 1, -1),
        torch.where(real, start, zero),
        torch.where(real, ends[group], zero),
    ]).contiguous()
    return Segments(perm, torch.stack([starts, ends]).contiguous(), tiles, block_m)
