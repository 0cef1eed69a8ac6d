"""``AdapterPool``: a fixed number of adapter slots in every targeted linear layer of a model, filled from
PEFT adapter directories, and a context to run one batch whose rows use different adapters.

    pool = AdapterPool(model, ["q_proj", "v_proj"], num_slots=8, r_max=16)
    pool.load("fr", "adapters/fr")          # a PEFT directory (adapter_config.json + safetensors)
    pool.load("de", "adapters/de")
    with pool.batch(["fr", None, "de", "fr"]):   # None = the base model for that row
        logits = model(input_ids).logits

Concurrency: ``batch`` holds a shared (reader) lock for its duration and ``load``/``evict`` an exclusive
(writer) one while they write, so a batch sees each adapter entirely old or entirely new. Validation
runs before the writer lock is taken: a failed load leaves the pool unchanged. On CUDA the slot writes
and the batches are ordered on the device by events (no host sync).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .io import read_peft_adapter
from .nn.multi_lora import MultiLoRALinear, SharedBatch
from .ops.lora_batch import LoRABatch

__all__ = ["AdapterPool", "warmup", "warmup_row_counts"]

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_PREFIX = "base_model.model."


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    Re-entrant for readers in the same thread; a thread that holds a read lock may not write (it would wait
    for itself), which raises instead of deadlocking.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            if self._depth() == 0:
                while self._writer or self._waiting_writers:
                    self._cond.wait()
            self._readers += 1
        self._local.depth = self._depth() + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        if self._depth():
            raise RuntimeError(
                "AdapterPool: cannot load or evict inside a `pool.batch(...)` block of the same thread"
            )
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex matched against the whole name; a list matches name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """peft's per-module override: the first pattern key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class AdapterPool:
    """Injects :class:`MultiLoRALinear` (``num_slots`` slots of rank <= ``r_max``) into every ``nn.Linear`` of
    ``model`` named by ``target_modules`` (peft's rule: a list of name suffixes, or a regex matched against
    the whole name), and manages which adapter lives in which slot.

    ``dtype``: the slots' dtype (default fp32 beside a 16-bit base, else the base's); ``backend``: the
    layers' backend. The slots do not require grad (serving); set ``requires_grad_`` on the layers'
    ``lora_A``/``lora_B`` to train the loaded adapters together.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: str | Sequence[str],
        num_slots: int,
        r_max: int,
        *,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(target_modules, str) and not (
            isinstance(target_modules, Sequence) and all(isinstance(t, str) for t in target_modules)
        ):
            raise TypeError(
                f"target_modules: expected a regex string or a list of names, got {target_modules!r}"
            )
        for arg, value in (("num_slots", num_slots), ("r_max", r_max)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}: expected a positive int, got {value!r}")
        self.model = model
        self.num_slots = num_slots
        self.r_max = r_max
        self._ids_var: contextvars.ContextVar[SharedBatch | LoRABatch | None] = contextvars.ContextVar(
            f"peftkern_pool_{id(self)}", default=None
        )
        self._lock = _ReadWriteLock()
        self._slots: dict[str, int] = {}
        self._events: list = []  # CUDA events of finished batches that the next write must wait for
        self._write_event = None  # CUDA event of the last write, which later batches wait for
        self.layers: dict[str, MultiLoRALinear] = {}
        targets = [
            (name, module) for name, module in model.named_modules()
            if name and isinstance(module, nn.Linear) and _matches(name, target_modules)
        ]
        if not targets:
            raise ValueError(f"target_modules: {target_modules!r} matched no torch.nn.Linear in the model")
        for name, linear in targets:
            # check_ids=False: the pool builds every id itself from loaded names, so no per-layer host sync.
            layer = MultiLoRALinear(linear, num_slots, r_max, dtype=dtype, backend=backend, check_ids=False)
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)
            layer._pool_ids = self._ids_var
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            self.layers[name] = layer
        self._device = next(iter(self.layers.values())).lora_A.device

    # ---- bookkeeping --------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Loaded adapter names, in slot order."""
        return sorted(self._slots, key=self._slots.__getitem__)

    def slot(self, name: str) -> int:
        if name not in self._slots:
            raise ValueError(f"adapter {name!r}: not loaded (loaded: {self.names})")
        return self._slots[name]

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def ids(self, names: Sequence[str | None]) -> torch.Tensor:
        """adapter_ids [len(names)] int64 on the pool's device: each name's slot, -1 for None (base model)."""
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(
                f"names: expected a sequence of adapter names or None, got {type(names).__name__}"
            )
        slots = [-1 if name is None else self.slot(name) for name in names]
        return torch.tensor(slots, dtype=torch.int64, device=self._device)

    # ---- loading ------------------------------------------------------------------------------------------

    def _plan(
        self, config: Mapping, tensors: Mapping[str, torch.Tensor], source: str
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Validate a whole adapter against the pool: {layer name: (A [r, K], B [N, r], scaling)}."""
        if not isinstance(config, Mapping):
            raise TypeError(f"{source}: config: expected a mapping (adapter_config.json), got "
                            f"{type(config).__name__}")
        peft_type = config.get("peft_type")
        if peft_type not in (None, "LORA"):
            raise ValueError(f"{source}: peft_type {peft_type!r} is not LoRA")
        for flag in ("use_dora", "fan_in_fan_out"):
            if config.get(flag):
                raise ValueError(f"{source}: {flag}=True is not supported by AdapterPool")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            match = _KEY.match(key)
            if match is None:
                dora = " but a DoRA magnitude" if key.endswith("lora_magnitude_vector") else ""
                raise ValueError(
                    f"{source}: key {key!r} is not a LoRA A/B weight{dora} (only plain LoRA is supported)"
                )
            module = match["module"].removeprefix(_PREFIX)
            if module not in self.layers:
                raise ValueError(
                    f"{source}: key {key!r} targets module {module!r}, which this pool does not adapt "
                    f"(pool modules: {sorted(self.layers)[:4]}{'...' if len(self.layers) > 4 else ''})"
                )
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"{source}: key {key!r}: expected a float tensor")
            # A NaN or inf weight would turn every row using this adapter into NaN: refuse the file.
            if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{source}: key {key!r}: holds NaN or infinite values")
            pairs.setdefault(module, {})[match["which"]] = value
        if not pairs:
            raise ValueError(f"{source}: no LoRA weights found")
        r_default = config.get("r")
        alpha_default = config.get("lora_alpha")
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        for field, value in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: config field {field!r}: expected a mapping, got {value!r}")
        use_rslora = bool(config.get("use_rslora", False))
        plan = {}
        for module, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{source}: module {module!r} has lora_{''.join(pair)} but not both A and B")
            layer = self.layers[module]
            lora_a, lora_b = pair["A"], pair["B"]
            rank = lora_a.shape[0] if lora_a.dim() == 2 else -1
            expected = _pattern_value(rank_pattern, module, r_default)
            if expected is not None and rank != expected:
                raise ValueError(
                    f"{source}: module {module!r}: lora_A has shape {tuple(lora_a.shape)}, but the config "
                    f"gives rank {expected}"
                )
            alpha = _pattern_value(alpha_pattern, module, alpha_default)
            alpha = rank if alpha is None else alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise ValueError(f"{source}: module {module!r}: lora_alpha: expected a number, got {alpha!r}")
            alpha = float(alpha)
            scaling = alpha / (math.sqrt(rank) if use_rslora else rank) if rank > 0 else 0.0
            try:
                layer.check_adapter(lora_a, lora_b, scaling)
            except ValueError as error:
                raise ValueError(f"{source}: module {module!r}: {error}") from None
            factory = {"device": layer.lora_A.device, "dtype": layer.lora_A.dtype}
            plan[module] = (lora_a.to(**factory), lora_b.to(**factory), scaling)
        return plan

    def load(
        self,
        name: str,
        source: str | os.PathLike | Mapping[str, torch.Tensor],
        config: Mapping | None = None,
    ) -> int:
        """Load adapter ``name`` into a free slot (or its own slot, replacing it); returns the slot.

        ``source``: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``; ``r``,
        ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` are honoured), or a state dict
        with peft's key names (``base_model.model.<module>.lora_A.weight``), with ``config`` holding those
        fields (without ``lora_alpha`` the scaling is 1). Modules of the pool the adapter does not cover
        get rank 0 in its slot. Raises ValueError (pool unchanged) when the adapter does not fit: a rank
        above r_max, a shape or module the model does not have, no free slot.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        if isinstance(source, (str, os.PathLike)):
            if config is not None:
                raise ValueError("config: a PEFT directory carries its own adapter_config.json; pass None")
            config, tensors = read_peft_adapter(source)
            label = f"adapter {name!r} ({os.fspath(source)})"
        elif isinstance(source, Mapping):
            if config is not None and not isinstance(config, Mapping):
                raise TypeError(f"config: expected a mapping of adapter_config.json fields or None, got "
                                f"{type(config).__name__}")
            tensors, config = source, dict(config or {})
            label = f"adapter {name!r}"
        else:
            raise TypeError(f"source: expected a directory path or a state dict, got {type(source).__name__}")
        plan = self._plan(config, tensors, label)
        with self._lock.write():
            slot = self._slots.get(name)
            if slot is None:
                used = set(self._slots.values())
                free = [s for s in range(self.num_slots) if s not in used]
                if not free:
                    raise ValueError(
                        f"adapter {name!r}: the pool is full ({self.num_slots} slots: {self.names}); "
                        "evict one first"
                    )
                slot = free[0]
            self._wait_for_batches()
            for module, layer in self.layers.items():
                if module in plan:
                    layer.set_adapter(slot, *plan[module])
                else:
                    layer.clear_adapter(slot)
            self._slots[name] = slot
            self._record_write()
        return slot

    def evict(self, name: str) -> None:
        """Free ``name``'s slot (rows asking for it afterwards raise; ids already built see the base)."""
        with self._lock.write():
            slot = self.slot(name)
            self._wait_for_batches()
            for layer in self.layers.values():
                layer.clear_adapter(slot)
            del self._slots[name]
            self._record_write()

    # ---- running ------------------------------------------------------------------------------------------

    def _shared_batch(self, names: Sequence[str | None] | torch.Tensor | LoRABatch) -> SharedBatch | LoRABatch:
        if isinstance(names, LoRABatch):
            if names.num_adapters != self.num_slots or names.device != self._device:
                raise ValueError(
                    f"names: a LoRABatch for this pool needs num_adapters={self.num_slots} and device "
                    f"{self._device}, got {names!r}"
                )
            return names
        if isinstance(names, torch.Tensor):
            if names.device != self._device:
                raise ValueError(f"names: expected slot ids on {self._device}, got a tensor on {names.device}")
            return SharedBatch(names, self.num_slots)
        # The pool makes these ids itself from loaded names: nothing to check on the host.
        return SharedBatch(self.ids(names), self.num_slots, check_ids=False)

    @contextlib.contextmanager
    def batch(self, names: Sequence[str | None] | torch.Tensor | LoRABatch) -> Iterator[torch.Tensor]:
        """Run the model on a batch whose row b uses adapter ``names[b]`` (None: the base model).

        ``names``: adapter names (a sequence of str or None); or slot ids (an int tensor on the pool's
        device, -1 = base model, e.g. from :meth:`ids` or :meth:`slot`); or a :class:`~peftkern.LoRABatch`
        over x's rows (kept by the caller and ``update``-d each step, e.g. around CUDA-graph replay).
        Ids [B] broadcast over the sequence dimension inside each layer, and the batch metadata is built
        once for all layers, not in each. Yields the ids. Loads and evictions from other threads wait
        until the block ends.
        """
        with self._lock.read():
            shared = self._shared_batch(names)
            if self._write_event is not None:
                torch.cuda.current_stream(self._device).wait_event(self._write_event)
            token = self._ids_var.set(shared)
            try:
                yield shared.adapter_ids
            finally:
                self._ids_var.reset(token)
                if self._device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(self._device))
                    with self._lock._cond:
                        self._events.append(event)

    def _wait_for_batches(self) -> None:
        # Kernels of finished batches may still be queued on their streams: order the writes after them.
        if self._device.type != "cuda":
            return
        stream = torch.cuda.current_stream(self._device)
        with self._lock._cond:
            events, self._events = self._events, []
        for event in events:
            stream.wait_event(event)

    def _record_write(self) -> None:
        if self._device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
            self._write_event = event

    def extra_repr(self) -> str:
        return (
            f"num_slots={self.num_slots}, r_max={self.r_max}, layers={len(self.layers)}, "
            f"loaded={self.names}"
        )

    def __repr__(self) -> str:
        return f"AdapterPool({self.extra_repr()})"


def warmup_row_counts(max_tokens: int) -> list[int]:
    """Row counts that reach the compiled variants and autotuning results batches of 1..max_tokens rows ask
    for: kernels are tuned per power-of-two bucket of the row count, and Triton specializes an integer
    argument on being 1 or a multiple of 16, so each bucket gets its top count, the one below it and its
    largest multiple of 16. (The prefill path's segment-tile count depends on the ids too: not covered.)"""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected an int >= 1, got {max_tokens!r}")
    counts, bucket = {1}, 2
    while bucket // 2 < max_tokens:
        top = min(bucket, max_tokens)
        counts.update(c for c in (top, top - 1, top // 16 * 16) if c > bucket // 2)
        bucket *= 2
    return sorted(counts)


def warmup(step: Callable[[int], object], max_tokens: int) -> list[int]:
    """Run ``step(num_tokens)`` (one forward of the model, or of the layers, over that many rows) for every
    count of :func:`warmup_row_counts`, under ``torch.no_grad``: every Triton kernel the batches up to
    ``max_tokens`` rows will launch is compiled and autotuned before CUDA-graph capture, where neither may
    happen. Returns the counts run. On CUDA, waits for the device at the end (once)."""
    counts = warmup_row_counts(max_tokens)
    with torch.no_grad():
        for count in counts:
            step(count)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return counts
