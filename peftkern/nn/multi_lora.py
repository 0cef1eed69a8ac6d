"""``MultiLoRALinear``: a frozen ``nn.Linear`` plus L adapter slots, each row of a batch using its own slot,
computed by ``peftkern.multi_lora_linear``."""

from __future__ import annotations

import contextvars

import torch
import torch.nn as nn

from ..backends import describe_backend
from ..ops._checks import check_finite_scalar, check_tensor
from ..ops.lora_batch import LoRABatch
from ..ops.multi_lora import multi_lora_linear

__all__ = ["MultiLoRALinear", "SharedBatch", "broadcast_adapter_ids"]


def broadcast_adapter_ids(adapter_ids: torch.Tensor, lead_shape: tuple[int, ...]) -> torch.Tensor:
    """Expand ids whose shape is a prefix of ``lead_shape`` (e.g. [B] for x [B, T, K]) to ``lead_shape``."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids: expected a torch.Tensor, got {type(adapter_ids).__name__}")
    lead_shape = tuple(lead_shape)
    shape = tuple(adapter_ids.shape)
    if shape == lead_shape:
        return adapter_ids
    if len(shape) > len(lead_shape) or lead_shape[: len(shape)] != shape:
        raise ValueError(
            f"adapter_ids: expected shape {lead_shape} (x's leading shape) or a prefix of it, got {shape}"
        )
    return adapter_ids.reshape(shape + (1,) * (len(lead_shape) - len(shape))).expand(lead_shape)


class SharedBatch:
    """A model-level batch: ids [B] (or any prefix of x's leading shape) shared by every layer, and one
    :class:`~peftkern.LoRABatch` per leading shape of x, built by the first layer that sees that shape and
    reused by all the others (so the batch metadata is built once per forward, not once per layer).

    ``check_ids`` as in LoRABatch (default: a host check on CPU only); it runs once, at construction.
    """

    def __init__(self, adapter_ids: torch.Tensor, num_adapters: int, *, check_ids: bool | None = None) -> None:
        # Validates the ids (dtype; values when checked) once, for every layer.
        self._flat = LoRABatch(adapter_ids, num_adapters, check_ids=check_ids)
        self.adapter_ids = adapter_ids
        self.num_adapters = num_adapters
        self._batches: dict[tuple[int, ...], LoRABatch] = {tuple(adapter_ids.shape): self._flat}

    def for_input(self, lead_shape: tuple[int, ...]) -> LoRABatch:
        """The LoRABatch of x's leading shape ``lead_shape`` (ids broadcast over the dims past theirs)."""
        lead_shape = tuple(lead_shape)
        batch = self._batches.get(lead_shape)
        if batch is None:
            ids = broadcast_adapter_ids(self.adapter_ids, lead_shape)
            batch = self._batches[lead_shape] = LoRABatch(ids, self.num_adapters, check_ids=False)
        return batch


class MultiLoRALinear(nn.Module):
    """``y[t] = base_layer(x)[t] + scalings[i] * B[i, :, :r_i] A[i, :r_i] x[t]``, ``i = adapter_ids[t]``.

    Holds ``num_slots`` adapter slots: ``lora_A`` [L, r_max, in_features] and ``lora_B``
    [L, out_features, r_max] (Parameters, so several adapters can train in one batch; each slot's
    gradient comes from its own rows), buffers ``scalings`` [L] (fp32) and ``ranks`` [L] (int32; slot i
    uses its first ``ranks[i]`` ranks; 0 = empty slot). The base layer is frozen in place.

    The ids come from ``forward(x, adapter_ids=...)``, else from the ``AdapterPool`` batch this layer belongs
    to, else from the attribute ``adapter_ids``; ids of shape [B] broadcast over x [B, T, K]. Each may also
    be a :class:`~peftkern.LoRABatch` of x's rows (its metadata built once for every layer) or a
    :class:`SharedBatch`. ``check_ids``: as in ``multi_lora_linear`` (None: a host check on CPU only).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_slots: int,
        r_max: int,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        check_ids: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer: expected torch.nn.Linear, got {type(base_layer).__name__}")
        for arg, value in (("num_slots", num_slots), ("r_max", r_max)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}: expected a positive int, got {value!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_slots = num_slots
        self.r_max = r_max
        self.backend = backend
        self.check_ids = check_ids
        self.adapter_ids: torch.Tensor | None = None
        # Set by AdapterPool: the context-local ids of the batch running in this thread/task.
        self._pool_ids: contextvars.ContextVar | None = None
        weight = base_layer.weight
        if dtype is None:
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.zeros(num_slots, r_max, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_slots, self.out_features, r_max, **factory))
        self.register_buffer("scalings", torch.zeros(num_slots, dtype=torch.float32, device=weight.device))
        self.register_buffer("ranks", torch.zeros(num_slots, dtype=torch.int32, device=weight.device))
        base_layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot: expected an int in [0, {self.num_slots}), got {slot!r}")
        return slot

    def check_adapter(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> int:
        """Validate one adapter for this layer (A [r, in_features], B [out_features, r]); returns r."""
        for name, value in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 2:
                shown = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected a 2-D float tensor, got {shown}")
            if value.device.type == "meta":
                raise ValueError(f"{name}: expected a tensor with values, got one on the meta device")
        rank = lora_a.shape[0]
        if not 1 <= rank <= self.r_max:
            raise ValueError(
                f"lora_a: rank {rank} is outside [1, r_max={self.r_max}] (shape {tuple(lora_a.shape)})"
            )
        if lora_a.shape[1] != self.in_features:
            raise ValueError(
                f"lora_a: expected shape [r, {self.in_features}] (in_features), got {tuple(lora_a.shape)}"
            )
        if tuple(lora_b.shape) != (self.out_features, rank):
            raise ValueError(
                f"lora_b: expected shape [{self.out_features}, {rank}] (out_features, r), "
                f"got {tuple(lora_b.shape)}"
            )
        check_finite_scalar("scaling", scaling)
        return rank

    @torch.no_grad()
    def set_adapter(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Write one adapter (A [r, in_features], B [out_features, r], r <= r_max) into ``slot``."""
        slot = self._check_slot(slot)
        rank = self.check_adapter(lora_a, lora_b, scaling)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :rank].copy_(lora_a)
        self.lora_B[slot, :, :rank].copy_(lora_b)
        self.scalings[slot] = float(scaling)
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_adapter(self, slot: int) -> None:
        """Empty ``slot``: rank 0, zero weights (rows using it get the base output)."""
        slot = self._check_slot(slot)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scalings[slot] = 0.0
        self.ranks[slot] = 0

    def _resolve_ids(self, adapter_ids):
        if adapter_ids is None and self._pool_ids is not None:
            adapter_ids = self._pool_ids.get()
        if adapter_ids is None:
            adapter_ids = self.adapter_ids
        if adapter_ids is None:
            raise ValueError(
                "adapter_ids: none given; pass forward(x, adapter_ids=...), set layer.adapter_ids, or run "
                "the model inside `with pool.batch(names):`"
            )
        return adapter_ids

    def forward(
        self, x: torch.Tensor, adapter_ids: torch.Tensor | LoRABatch | SharedBatch | None = None
    ) -> torch.Tensor:
        check_tensor("x", x, min_ndim=1)
        ids = self._resolve_ids(adapter_ids)
        if isinstance(ids, SharedBatch):
            ids = ids.for_input(x.shape[:-1])
        elif not isinstance(ids, LoRABatch):
            ids = broadcast_adapter_ids(ids, x.shape[:-1])
        return multi_lora_linear(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.lora_A,
            self.lora_B,
            ids,
            self.scalings,
            self.ranks,
            check_ids=self.check_ids,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        backend = describe_backend(self.lora_A.device, "multi_lora_linear", self.backend)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_slots={self.num_slots}, "
            f"r_max={self.r_max}, backend={backend}"
        )
