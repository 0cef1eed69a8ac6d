"""Shared benchmark harness: providers side by side, one row schema, JSON under ``results/<device>/``.

A bench script is one short file ``benchmarks/bench_<op>.py`` (see ``bench_lora.py``); ``run_all.py``
finds it by name::

    import harness                       # first: sets TRITON_INTERPRET=1 when no GPU is visible
    import torch

    OP = "my_op"                         # -> results/<device>/my_op.json

    def run(bench: harness.Bench) -> None:
        for tokens in ((64,) if bench.smoke else (1024, 8192)):
            shapes, params = {"tokens": tokens, "hidden": 4096}, {"dropout_p": 0.0}
            x = torch.randn(tokens, 4096, device=bench.device, requires_grad=True)
            bench.time_modes("base", lambda: F.linear(x, w), shapes, torch.bfloat16, grads=[x])

            def build():                 # raise harness.ProviderUnavailable(reason) to skip
                from peftkern import my_op
                return (lambda: my_op(x, ...)), [x, a]
            bench.time_provider("triton", build, shapes, torch.bfloat16, params, expected=reference_out)
        bench.add_ratios("base")         # ratios["vs_base"] on every row with a matching base row

    def summarize(rows: list[dict], smoke: bool) -> dict[str, float | None]:   # optional
        return {"my_key": harness.ratio_of(rows, {"provider": "triton", "mode": "forward"},
                                           {"provider": "base", "mode": "forward"})}   # None: left out

    def add_arguments(parser) -> None: ...   # optional extra options (run_all passes unknown ones on)

    if __name__ == "__main__":
        harness.main(OP, run, summarize, add_arguments)

Conventions, so that ratios, plots and summaries line up: ``shapes`` holds sizes (``tokens``, ``hidden``,
``rank``, ``adapters``, ...), ``params`` everything else (``dropout_p``, ...). A baseline row matches every
row whose shapes and params contain its own (``base`` timed at {tokens, hidden} serves every rank).
Memory-bound ops pass ``bytes_moved={"forward": n, ...}`` and call ``bench.add_bandwidth_ratios()``
(``ratios["vs_floor"]``, ``ratios["bandwidth_fraction"]`` against this run's ``bench.copy_bandwidth()``).
Other measurements: ``bench.time(provider, mode, fn, ...)`` for any callable, and
``bench.record(bench.row(..., metrics={...}))`` for what is not a kernel time (bench_train.py).

Timing: on CUDA ``triton.testing.do_bench`` (median with 20/80 quantiles, ``grad_to_none`` reset between
calls), after one untimed call so that compilation (torch.compile, Triton autotuning) is not timed.
Without a GPU only ``--smoke`` runs: a short ``time.perf_counter`` loop whose rows say
``timer: "cpu_perf_counter_smoke"`` and ``smoke: true``; they test the plumbing and are never GPU results.

Modes, for a workload given as a ``forward() -> Tensor`` callable and the tensors that get gradients:
``forward`` (autograd recording, as in training), ``backward`` (``y.backward(dy)`` on a kept graph),
``full`` (forward + backward). Memory: on CUDA every row carries ``peak_mem_bytes``, the peak of
``torch.cuda.max_memory_allocated`` above what was allocated before one call of the timed function
(inputs excluded; activations, outputs and gradients included); ``None`` on CPU.

A provider that computes something other than ``expected`` (checked once before timing), or raises, is
recorded in ``bench.errors`` (exit status 1) and the sweep goes on; ``ProviderUnavailable`` is a skip.

Physical limits measured in the same run: ``Bench.copy_bandwidth()`` (device-to-device copy, bytes read +
written per second) and the base ``F.linear`` rows of the LoRA bench. ``add_ratios`` and ``ratio_of``
relate rows of the same run only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Without a GPU, Triton runs only through its interpreter, which reads TRITON_INTERPRET when triton is
# imported: set it before any bench script imports triton (as tests/conftest.py does for the tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

MODES = ("forward", "backward", "full")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# The keys every row has, in this order (None where a value does not apply). tests/test_benchmarks.py
# checks rows against this list.
ROW_KEYS = (
    "op",
    "provider",
    "mode",
    "shapes",
    "params",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_bytes",
    "bytes_moved",
    "bandwidth_gbps",
    "ratios",
    "metrics",
    "timer",
    "smoke",
    "device",
    "device_slug",
    "torch_version",
    "triton_version",
    "cuda_version",
    "git_commit",
    "timestamp",
)

CPU_SMOKE_TIMER = "cpu_perf_counter_smoke"
CUDA_TIMER = "triton.testing.do_bench"


class ProviderUnavailable(RuntimeError):
    """A provider cannot run here (missing package, missing backend); the run records it as skipped."""


def pick(option: str | None, values: Sequence, cast: Callable) -> tuple:
    """A bench's sweep values, or the comma-separated subset a command-line option names (cast each)."""
    return tuple(values) if option is None else tuple(cast(v) for v in option.split(","))


def require_cuda_kernel(forward: Callable[[], object]) -> None:
    """Run ``forward`` once; ProviderUnavailable when the built CUDA backend has no kernel for this op (the
    op's own RuntimeError naming backend 'cuda'), so the provider is recorded as skipped, not failed."""
    try:
        with torch.no_grad():
            forward()
    except RuntimeError as error:
        if "backend 'cuda'" in str(error):
            raise ProviderUnavailable(str(error)) from error
        raise


# ---- environment -------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(device: torch.device) -> str:
    """Directory name for a device: ``nvidia-h100-80gb-hbm3``; ``cpu`` without a GPU (ignored by git)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device, smoke: bool) -> dict[str, Any]:
    """The per-run fields every row carries (device, versions, commit, time)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "timer": CUDA_TIMER if device.type == "cuda" else CPU_SMOKE_TIMER,
        "smoke": bool(smoke),
        "device": device_name(device),
        # A GPU smoke run never lands beside (or overwrites) a full run's results.
        "device_slug": device_slug(device) + ("-smoke" if smoke and device.type == "cuda" else ""),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "git_commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing and memory -------------------------------------------------------------------------------------


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    # Linear interpolation between order statistics, as torch.quantile / numpy's default.
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _reset_grads(grads: Iterable[torch.Tensor]) -> None:
    for tensor in grads:
        tensor.grad = None


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    grads: Sequence[torch.Tensor] = (),
    warmup_ms: int = 25,
    rep_ms: int = 100,
    cpu_reps: int = 5,
) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``; ``grads`` get ``.grad = None`` before each call.

    CUDA: ``triton.testing.do_bench``. CPU (smoke only): ``cpu_reps`` calls timed with perf_counter.
    One untimed call comes first either way, so compilation and autotuning are not timed.
    """
    _reset_grads(grads)
    fn()
    synchronize(device)
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None, quantiles=[0.5, 0.2, 0.8]
        )
        return float(median), float(p20), float(p80)
    samples = []
    for _ in range(cpu_reps):
        _reset_grads(grads)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return _quantile(samples, 0.5), _quantile(samples, 0.2), _quantile(samples, 0.8)


def peak_memory(
    fn: Callable[[], Any], device: torch.device, grads: Sequence[torch.Tensor] = ()
) -> int | None:
    """Bytes allocated at the peak of one ``fn()`` call above what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    _reset_grads(grads)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    _reset_grads(grads)
    return int(peak)


def mode_callables(
    forward: Callable[[], torch.Tensor], modes: Sequence[str], grads: Sequence[torch.Tensor]
) -> dict[str, Callable[[], Any]]:
    """The timed function per mode for a workload ``forward() -> y`` (y gets a random upstream gradient)."""
    calls: dict[str, Callable[[], Any]] = {}
    if "forward" in modes:
        calls["forward"] = forward
    if "backward" in modes or "full" in modes:
        y = forward()
        grad_y = torch.randn_like(y)
        if "backward" in modes:
            # The kept graph is reused by every call: backward alone, without the forward.
            calls["backward"] = lambda: y.backward(grad_y, retain_graph=True)
        if "full" in modes:
            calls["full"] = lambda: forward().backward(grad_y)
    return calls


# ---- rows and ratios ---------------------------------------------------------------------------------------


def _matches(row: dict, selector: dict) -> bool:
    for key, expected in selector.items():
        actual = row.get(key)
        if isinstance(expected, dict):
            if not isinstance(actual, dict) or any(actual.get(k) != v for k, v in expected.items()):
                return False
        elif actual != expected:
            return False
    return True


def find_rows(rows: Iterable[dict], **selector: Any) -> list[dict]:
    """Rows whose fields equal ``selector``'s; dict values (``shapes``, ``params``) match as subsets."""
    return [row for row in rows if _matches(row, selector)]


def find_row(rows: Iterable[dict], **selector: Any) -> dict | None:
    """The one row matching ``selector`` (see :func:`find_rows`), or None; several matches raise."""
    found = find_rows(rows, **selector)
    if len(found) > 1:
        raise ValueError(f"selector {selector} matches {len(found)} rows, expected at most one")
    return found[0] if found else None


def ratio_of(
    rows: Iterable[dict], numerator: dict, denominator: dict, field: str = "median_ms"
) -> float | None:
    """``numerator_row[field] / denominator_row[field]`` for the rows the two selectors pick, or None when
    either row or value is missing (a summary key is then left out, never invented)."""
    rows = list(rows)
    top, bottom = find_row(rows, **numerator), find_row(rows, **denominator)
    if top is None or bottom is None:
        return None
    a, b = _field(top, field), _field(bottom, field)
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def _field(row: dict, field: str) -> Any:
    # "metrics.tokens_per_s" reaches into the metrics dict.
    value: Any = row
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def drop_missing(values: dict[str, float | None]) -> dict[str, float]:
    """Keep only the keys that were measured."""
    return {key: float(value) for key, value in values.items() if value is not None and math.isfinite(value)}


def _subset(small: dict, large: dict) -> bool:
    return all(k in large and large[k] == v for k, v in small.items())


def add_ratios(
    rows: list[dict],
    baseline_provider: str,
    *,
    name: str | None = None,
    baseline_mode: str | None = None,
    providers: Iterable[str] | None = None,
    modes: Iterable[str] | None = None,
) -> None:
    """Set ``ratios[name]`` = row median / baseline median (and ``ratios[name + "_mem"]`` for peak memory)
    on every row with a baseline row of the same op and dtype whose shapes and params are subsets of the
    row's (a base GEMM timed once per (tokens, hidden) matches every rank and dropout), and whose mode is
    ``baseline_mode`` or the row's own. ``providers`` / ``modes`` restrict the rows that get the ratio.
    """
    name = name or f"vs_{baseline_provider}"
    wanted = None if providers is None else set(providers)
    wanted_modes = None if modes is None else set(modes)
    baselines = [row for row in rows if row["provider"] == baseline_provider]
    for row in rows:
        if wanted is not None and row["provider"] not in wanted:
            continue
        if wanted_modes is not None and row["mode"] not in wanted_modes:
            continue
        mode = baseline_mode or row["mode"]
        for base in baselines:
            if base is row or base["mode"] != mode or base["op"] != row["op"]:
                continue
            if base["dtype"] != row["dtype"]:
                continue
            if not (_subset(base["shapes"], row["shapes"]) and _subset(base["params"], row["params"])):
                continue
            if base["median_ms"]:
                row["ratios"][name] = row["median_ms"] / base["median_ms"]
            if base["peak_mem_bytes"] and row["peak_mem_bytes"] is not None:
                row["ratios"][name + "_mem"] = row["peak_mem_bytes"] / base["peak_mem_bytes"]
            break


class ProviderWrong(AssertionError):
    """A provider's output differs from the expected one: its timing would be meaningless."""


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """Raise ProviderWrong unless ``|actual - expected| <= atol + rtol * |expected|`` everywhere."""
    if actual.shape != expected.shape:
        raise ProviderWrong(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a, e = actual.detach().float(), expected.detach().float()
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if not bool((excess <= 0).all()):  # NaN fails too
        worst = int(torch.nan_to_num(excess, nan=float("inf")).argmax())
        raise ProviderWrong(
            f"{name}: output differs from the expected one (atol={atol:g}, rtol={rtol:g}): worst at flat "
            f"index {worst}: got {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g}"
        )


def validate_row(row: dict) -> None:
    """Raise ValueError when ``row`` does not follow the schema (used by tests and before writing)."""
    if tuple(row) != ROW_KEYS:
        raise ValueError(f"row keys: expected {ROW_KEYS}, got {tuple(row)}")
    for key in ("op", "provider", "mode", "dtype", "timer", "device", "device_slug", "torch_version"):
        if not isinstance(row[key], str) or not row[key]:
            raise ValueError(f"row[{key!r}]: expected a non-empty string, got {row[key]!r}")
    for key in ("shapes", "params", "ratios", "metrics"):
        if not isinstance(row[key], dict):
            raise ValueError(f"row[{key!r}]: expected a dict, got {type(row[key]).__name__}")
    for key in ("median_ms", "p20_ms", "p80_ms"):
        value = row[key]
        if value is not None and not (isinstance(value, float) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"row[{key!r}]: expected a finite float >= 0 or None, got {value!r}")
    if row["median_ms"] is not None and not row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]:
        raise ValueError(f"row quantiles: expected p20 <= median <= p80, got {row['p20_ms']}, "
                         f"{row['median_ms']}, {row['p80_ms']}")
    if row["timer"] == CPU_SMOKE_TIMER and not row["smoke"]:
        raise ValueError("row: CPU perf_counter timings must be marked smoke")
    if row["peak_mem_bytes"] is not None and not isinstance(row["peak_mem_bytes"], int):
        raise ValueError(f"row['peak_mem_bytes']: expected an int or None, got {row['peak_mem_bytes']!r}")


# ---- the per-op run ----------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Bench:
    """One op's rows for one run. Bench scripts call ``time_modes`` / ``time`` / ``record`` / ``skip``."""

    def __init__(
        self,
        op: str,
        device: torch.device,
        smoke: bool,
        modes: Sequence[str] = MODES,
        providers: Sequence[str] | None = None,
        memory: bool = True,
        options: argparse.Namespace | None = None,
    ) -> None:
        self.op = op
        self.device = device
        self.smoke = smoke
        self.modes = tuple(modes)
        self.providers = None if providers is None else tuple(providers)
        self.memory = memory
        self.options = options or argparse.Namespace()
        self.env = environment(device, smoke)
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.errors: list[dict] = []
        self._copy_bandwidth: float | None = None

    def wants(self, provider: str) -> bool:
        """False when ``--providers`` leaves ``provider`` out."""
        return self.providers is None or provider in self.providers

    def row(
        self,
        provider: str,
        mode: str,
        shapes: dict,
        dtype: torch.dtype | str,
        params: dict | None = None,
        timing: tuple[float, float, float] | None = None,
        peak_mem_bytes: int | None = None,
        bytes_moved: int | None = None,
        metrics: dict | None = None,
    ) -> dict:
        """A schema row (not yet recorded); bandwidth follows from ``bytes_moved`` and the median."""
        median, p20, p80 = timing if timing is not None else (None, None, None)
        bandwidth = None
        if bytes_moved is not None and median:
            bandwidth = bytes_moved / (median * 1e-3) / 1e9
        row = {
            "op": self.op,
            "provider": provider,
            "mode": mode,
            "shapes": dict(shapes),
            "params": dict(params or {}),
            "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
            "peak_mem_bytes": peak_mem_bytes,
            "bytes_moved": bytes_moved,
            "bandwidth_gbps": bandwidth,
            "ratios": {},
            "metrics": dict(metrics or {}),
            **self.env,
        }
        validate_row(row)
        return row

    def record(self, row: dict) -> dict:
        validate_row(row)
        self.rows.append(row)
        return row

    def skip(self, provider: str, reason: str, shapes: dict | None = None) -> None:
        """Note that ``provider`` did not run (once per provider and reason)."""
        entry = {"op": self.op, "provider": provider, "reason": reason}
        if entry not in self.skipped:
            self.skipped.append(entry)
            print(f"[{self.op}] skipped {provider}: {reason}", file=sys.stderr)

    def time(
        self,
        provider: str,
        mode: str,
        fn: Callable[[], Any],
        shapes: dict,
        dtype: torch.dtype | str,
        params: dict | None = None,
        grads: Sequence[torch.Tensor] = (),
        bytes_moved: int | None = None,
        metrics: dict | None = None,
    ) -> dict:
        """Time ``fn()`` (and its peak memory on CUDA) and record one row."""
        timing = time_fn(fn, self.device, grads, **self._timer_options())
        peak = peak_memory(fn, self.device, grads) if self.memory else None
        row = self.row(provider, mode, shapes, dtype, params, timing, peak, bytes_moved, metrics)
        return self.record(row)

    def time_modes(
        self,
        provider: str,
        forward: Callable[[], torch.Tensor],
        shapes: dict,
        dtype: torch.dtype | str,
        params: dict | None = None,
        grads: Sequence[torch.Tensor] = (),
        modes: Sequence[str] | None = None,
        bytes_moved: dict[str, int] | None = None,
    ) -> list[dict]:
        """Time the workload ``forward() -> y`` in each mode of ``modes`` (default: the run's modes);
        ``grads`` are the tensors that receive gradients (reset between calls). Returns the new rows.
        ProviderUnavailable is recorded as skipped, any other exception as an error of this provider and
        case (the run goes on with the next one)."""
        return self.time_provider(
            provider, lambda: (forward, grads), shapes, dtype, params, modes, bytes_moved
        )

    def time_provider(
        self,
        provider: str,
        build: Callable[[], tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]],
        shapes: dict,
        dtype: torch.dtype | str,
        params: dict | None = None,
        modes: Sequence[str] | None = None,
        bytes_moved: dict[str, int] | None = None,
        expected: torch.Tensor | None = None,
        tolerance: tuple[float, float] = (2e-2, 2e-2),
    ) -> list[dict]:
        """``build()`` returns ``(forward, grads)`` for one provider and case, or raises
        ProviderUnavailable (recorded as skipped); unwanted providers (``--providers``) are not built.
        With ``expected``, one ``forward()`` is first checked against it (``check_close`` with
        ``tolerance`` = (atol, rtol)): a provider that computes something else is an error, not a time.
        Then as :meth:`time_modes`."""
        if not self.wants(provider):
            return []
        wanted = [mode for mode in (modes or self.modes) if mode in self.modes]
        new: list[dict] = []
        try:
            forward, grads = build()
            if expected is not None:
                with torch.no_grad():
                    check_close(f"{self.op}/{provider}", forward(), expected, *tolerance)
            for mode, fn in mode_callables(forward, wanted, grads).items():
                moved = None if bytes_moved is None else bytes_moved.get(mode)
                new.append(self.time(provider, mode, fn, shapes, dtype, params, grads, moved))
        except ProviderUnavailable as error:
            self.skip(provider, str(error), shapes)
        except Exception as error:  # an OOM or a wrong result in one case must not lose the sweep
            self.fail(provider, error, shapes, params)
        return new

    def fail(self, provider: str, error: BaseException, shapes: dict | None, params: dict | None) -> None:
        """Record that ``provider`` raised ``error`` on one case; the run's exit status becomes 1."""
        message = f"{type(error).__name__}: {error}"
        self.errors.append({
            "op": self.op, "provider": provider, "shapes": shapes, "params": params, "error": message[:2000],
        })
        print(f"[{self.op}] ERROR {provider} {shapes} {params}: {message[:500]}", file=sys.stderr)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _timer_options(self) -> dict:
        return {
            "warmup_ms": getattr(self.options, "warmup_ms", 25),
            "rep_ms": getattr(self.options, "rep_ms", 100),
            "cpu_reps": getattr(self.options, "cpu_reps", 3 if self.smoke else 5),
        }

    def copy_bandwidth(self, nbytes: int | None = None) -> float:
        """Device-to-device copy bandwidth in GB/s (bytes read + written per second), measured once per
        Bench and recorded as a ``d2d_copy`` row: the floor for memory-bound ops."""
        if self._copy_bandwidth is None:
            row = measure_copy(self, nbytes)
            self._copy_bandwidth = row["bandwidth_gbps"]
        return self._copy_bandwidth

    def add_ratios(self, baseline_provider: str, **kwargs: Any) -> None:
        add_ratios(self.rows, baseline_provider, **kwargs)

    def floor_ms(self, bytes_moved: int) -> float:
        """The memory-bound floor: time to move ``bytes_moved`` at this run's copy bandwidth."""
        return bytes_moved / (self.copy_bandwidth() * 1e9) * 1e3

    def add_bandwidth_ratios(self) -> None:
        """On every row with ``bytes_moved`` (the copy row aside): ``ratios["vs_floor"]`` = median / floor
        and ``ratios["bandwidth_fraction"]`` = achieved / copy bandwidth, both from this run's copy."""
        for row in self.rows:
            if row["provider"] == "d2d_copy" or not row["bytes_moved"] or not row["median_ms"]:
                continue
            floor = self.floor_ms(row["bytes_moved"])
            row["ratios"]["vs_floor"] = row["median_ms"] / floor
            row["ratios"]["bandwidth_fraction"] = floor / row["median_ms"]

    def document(self) -> dict:
        return {
            "op": self.op, "env": self.env, "skipped": self.skipped, "errors": self.errors, "rows": self.rows,
        }

    def write(self, out_dir: Path, merge: bool | None = None) -> Path:
        """Write ``<out_dir>/<device-slug>/<op>.json``; returns its path. With ``merge`` (default: the
        ``--merge`` option), rows already in the file that this run did not measure again are kept, so a
        sweep split over several invocations ends up in one file (each row keeps its own timestamp; ratios
        are only ever taken within one invocation)."""
        directory = Path(out_dir) / self.env["device_slug"]
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.op}.json"
        document = self.document()
        if merge is None:
            merge = bool(getattr(self.options, "merge", False))
        if merge and path.exists():
            fresh = {_row_key(row) for row in self.rows}
            kept = [row for row in json.loads(path.read_text())["rows"] if _row_key(row) not in fresh]
            document = {**document, "rows": kept + self.rows}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(tmp, path)
        return path


def _row_key(row: dict) -> str:
    # What a row measured, without when or how fast: a re-measured case replaces the old row.
    return json.dumps([row[k] for k in ("op", "provider", "mode", "shapes", "params", "dtype")], sort_keys=True)


def measure_copy(bench: Bench, nbytes: int | None = None) -> dict:
    """Record a ``d2d_copy`` row: ``dst.copy_(src)`` of ``nbytes`` (default 1 GiB on CUDA, 1 MiB in smoke);
    bytes_moved counts the read and the write."""
    if nbytes is None:
        nbytes = (1 << 20) if bench.device.type != "cuda" else (1 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=bench.device).normal_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), bench.device, **bench._timer_options())
    row = bench.row(
        "d2d_copy", "forward", {"bytes": nbytes}, "bfloat16", timing=timing, bytes_moved=2 * nbytes,
    )
    return bench.record(row)


# ---- command line ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def saved_bytes(exclude: Iterable[torch.Tensor]) -> Iterator[list[int]]:
    """Yields [bytes]: the storages autograd saves for backward inside, each counted once, those of
    ``exclude`` (the parameters) left out: the activation memory a step holds, the same on any device."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}
    total = [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and not isinstance(t, torch.nn.Parameter):
            storages[storage.data_ptr()] = storage.nbytes()
            total[0] = sum(storages.values())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results root (benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="one tiny case; the only mode without a GPU")
    parser.add_argument("--modes", default=",".join(MODES), help="subset of forward,backward,full")
    parser.add_argument("--providers", default=None, help="comma-separated providers (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--merge", action="store_true", help="keep rows of earlier runs not measured again")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)


def check_device(device: torch.device, smoke: bool) -> None:
    if device.type != "cuda" and not smoke:
        raise SystemExit(
            "benchmarks: no CUDA GPU visible; full runs time GPU kernels. Use --smoke on CPU "
            "(its timings test the plumbing only and are never GPU results)."
        )


def make_bench(op: str, args: argparse.Namespace, device: torch.device | None = None) -> Bench:
    device = device or default_device()
    check_device(device, args.smoke)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU smoke shares a small machine: no thread oversubscription noise
    modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise SystemExit(f"--modes: expected a subset of {MODES}, got {unknown}")
    providers = None if not args.providers else tuple(p.strip() for p in args.providers.split(","))
    return Bench(op, device, args.smoke, modes, providers, memory=not args.no_memory, options=args)


def main(
    op: str,
    run: Callable[[Bench], None],
    summarize: Callable[[list[dict], bool], dict[str, float]] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: Sequence[str] | None = None,
) -> Bench:
    """Standalone entry point of a bench script: parse arguments, run, write ``<out>/<slug>/<op>.json``."""
    parser = argparse.ArgumentParser(description=f"peftkern benchmark: {op}")
    common_arguments(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    bench = make_bench(op, args)
    run(bench)
    path = bench.write(args.out)
    print(f"[{op}] {len(bench.rows)} rows -> {path}")
    if summarize is not None:
        for key, value in summarize(bench.rows, bench.smoke).items():
            print(f"[{op}] {key} = {value:.4g}")
    if bench.errors:
        raise SystemExit(f"[{op}] {len(bench.errors)} provider/case errors (listed in {path})")
    if bench.providers is not None and not bench.rows and bench.skipped:
        raise SystemExit(f"[{op}] nothing ran: " + "; ".join(s["reason"] for s in bench.skipped))
    return bench
