"""``peftkern.LoRABatch``: the per-batch metadata of a multi-adapter step, built once and handed to every
layer (``multi_lora_linear``, ``lora_shrink``, ``lora_expand_add``) instead of being rebuilt in each.

It owns a copy of the ids ([max_tokens] int64 on their device) and, once a kernel backend asks for it, the
segment table (rows grouped by adapter) of the Triton prefill kernels, built on the device with torch ops
(no host sync) and then shared by every layer's forward and backward. ``update`` writes new ids into the
same buffers and rebuilds what was built, in place: a CUDA graph captured over a step that used the batch
replays with the new ids.
"""

from __future__ import annotations

import numbers

import torch

from ._checks import INDEX_DTYPES, check_tensor, host_check_default

__all__ = ["LoRABatch", "check_adapter_ids"]


def check_adapter_ids(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    """Raise ValueError if any id lies outside [-1, num_adapters). Reads the ids on the host: syncs."""
    if adapter_ids.device.type == "meta":  # no values to check; the fake implementation gives the shapes
        return
    bad = (adapter_ids < -1) | (adapter_ids >= num_adapters)
    if adapter_ids.numel() and bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"adapter_ids: expected values in [-1, {num_adapters}) (-1 = base only; L = {num_adapters} "
            f"adapter slots), got {int(adapter_ids[position])} at index {position}"
        )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class LoRABatch:
    """Which adapter each row (token) of a batch uses, prepared once for all the layers of a step.

    Args:
        adapter_ids: int32/int64 tensor of any shape (flattened to the batch's M rows, row-major as
            ``x.reshape(-1, K)``); values in [-1, num_adapters), -1 = no adapter (base model only).
        num_adapters: L, the adapter slots of the weights the batch is used with.
        max_tokens: capacity of the buffers (default M): ``update`` then accepts up to this many rows
            without allocating.
        device: where the batch lives (default: the ids' device). Ids on the CPU, as a scheduler makes
            them, are checked there for free and copied to it without waiting for the device
            (``non_blocking``; from pinned memory the copy is asynchronous, so keep that buffer unchanged
            until the step's kernels ran).
        check_ids: check the ids' values on the host (ValueError on a bad id). Default: when the ids given
            are on the CPU yes, on CUDA no (no host sync; every backend then treats ids outside [-1, L) as
            -1, never reading out of bounds). Applies to ``update`` too.

    Attributes: ``adapter_ids`` ([M] int64 view of the owned buffer), ``num_adapters``, ``num_tokens`` (M),
    ``max_tokens``, ``device``.
    """

    def __init__(
        self,
        adapter_ids: torch.Tensor,
        num_adapters: int,
        max_tokens: int | None = None,
        *,
        device: torch.device | str | None = None,
        check_ids: bool | None = None,
    ) -> None:
        check_tensor("adapter_ids", adapter_ids, dtypes=INDEX_DTYPES)
        self.num_adapters = _positive_int("num_adapters", num_adapters)
        rows = adapter_ids.numel()
        if max_tokens is None:
            max_tokens = max(rows, 1)
        self.max_tokens = _positive_int("max_tokens", max_tokens)
        self.device = adapter_ids.device if device is None else torch.device(device)
        self.check_ids = check_ids
        self._ids = torch.full((self.max_tokens,), -1, dtype=torch.int64, device=self.device)
        self.num_tokens = 0
        # block_m -> Segments, built on first request by a kernel backend, rebuilt in place by update().
        self._segments: dict[int, object] = {}
        self.update(adapter_ids)

    @property
    def adapter_ids(self) -> torch.Tensor:
        """[M] int64, the batch's ids (a view of the owned buffer)."""
        return self._ids[: self.num_tokens]

    def update(self, adapter_ids: torch.Tensor, *, check_ids: bool | None = None) -> LoRABatch:
        """Refresh the batch in place with new ids (at most ``max_tokens`` rows, on the batch's device or the
        CPU).

        With the same row count as before, every buffer keeps its address (CUDA-graph replay sees the new
        ids); no host sync on CUDA unless ``check_ids`` asks for one. Do not update a batch between a
        forward and its backward. Returns the batch.
        """
        check_tensor("adapter_ids", adapter_ids, dtypes=INDEX_DTYPES)
        if adapter_ids.device not in (self.device, torch.device("cpu")):
            raise ValueError(
                f"adapter_ids: expected a tensor on {self.device} (the batch's device) or the CPU, got one on "
                f"{adapter_ids.device}"
            )
        rows = adapter_ids.numel()
        if rows > self.max_tokens:
            raise ValueError(
                f"adapter_ids: expected at most max_tokens={self.max_tokens} ids, got {rows} (shape "
                f"{tuple(adapter_ids.shape)}); build a new LoRABatch with a larger max_tokens"
            )
        check = host_check_default(self.check_ids if check_ids is None else check_ids, adapter_ids.device)
        if check:
            check_adapter_ids(adapter_ids, self.num_adapters)
        self._ids[:rows].copy_(adapter_ids.reshape(-1), non_blocking=True)
        if rows != self.num_tokens:
            self.num_tokens = rows
            self._segments.clear()
        else:
            for block_m, table in self._segments.items():
                fresh = self._build_segments(block_m)
                for old, new in zip(table[:3], fresh[:3]):
                    old.copy_(new)
        return self

    def _build_segments(self, block_m: int):
        from ..triton_kernels._segments import build_segments

        return build_segments(self.adapter_ids, self.num_adapters, block_m)

    def segments(self, block_m: int):
        """The prefill kernels' segment table (``triton_kernels._segments.Segments``) with tiles of ``block_m``
        rows (the Triton kernels' height, or the CUDA C++ kernels' 64): built on the first call (device ops,
        no host sync), then the same tensors."""
        table = self._segments.get(block_m)
        if table is None:
            table = self._segments[block_m] = self._build_segments(block_m)
        return table

    def check(self, num_adapters: int, rows: int, device: torch.device, name: str = "batch") -> None:
        """Raise ValueError unless the batch fits weights of ``num_adapters`` slots and ``rows`` rows on
        ``device``."""
        if self.num_adapters != num_adapters:
            raise ValueError(
                f"{name}: built for num_adapters={self.num_adapters}, but the adapter weights hold "
                f"L={num_adapters} slots"
            )
        if self.num_tokens != rows:
            raise ValueError(f"{name}: holds ids for {self.num_tokens} rows, but the input has {rows} rows")
        if self.device != device:
            raise ValueError(f"{name}: its ids are on {self.device}, but the input is on {device}")

    def __repr__(self) -> str:
        return (
            f"LoRABatch(num_tokens={self.num_tokens}, num_adapters={self.num_adapters}, "
            f"max_tokens={self.max_tokens}, device={self.device})"
        )
