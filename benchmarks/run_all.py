"""Run every ``benchmarks/bench_*.py`` present, in one process, and write one run's results:

    <out>/<device-slug>/<op>.json      rows of each bench (harness.ROW_KEYS)
    <out>/<device-slug>/limits.json    the device-to-device copy bandwidth of this run
    <out>/<device-slug>/summary.json   issue 8's headline ratios, one number per key, only those measured
    <out>/<device-slug>/summary.md     the same with targets, plus every row as a Markdown table
    <out>/<device-slug>/run.json       what ran, what was skipped and why, versions

    python3 benchmarks/run_all.py --out benchmarks/results --plot   # GPU (make bench)
    python3 benchmarks/run_all.py --smoke --out /tmp/bench          # CPU plumbing check (make bench-smoke)
    python3 benchmarks/run_all.py --only lora --headline            # options a bench defines pass through

A bench module defines ``OP`` and ``run(bench)``, and optionally ``summarize(rows, smoke)`` and
``add_arguments(parser)``. A module that cannot be imported because the op it measures is not part of this
checkout yet (ImportError, harness.ProviderUnavailable) is recorded as skipped; any other failure is
recorded as an error and makes the exit status 1 after everything else has been written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

import harness

BENCH_DIR = Path(__file__).resolve().parent
# Run order: the op microbenchmarks first, the long end-to-end training last; unknown names in between.
ORDER = ("bench_lora", "bench_multi_lora", "bench_prompt", "bench_adapter")
LAST = ("bench_train",)

# issue 8 (and issue 3's Performance section): key -> (comparison, threshold), on an H100 in bf16.
TARGETS: dict[str, tuple[str, float]] = {
    "lora_fwd_vs_base": ("<=", 1.05),
    "lora_train_speedup_vs_peft": (">=", 1.3),
    "lora_train_vs_base": ("<=", 1.15),
    "lora_memory_ratio_vs_peft": ("<", 1.0),
    "dora_train_vs_lora": ("<=", 1.1),
    "dora_train_speedup_vs_peft": (">=", 1.8),
    "dora_memory_ratio_vs_peft": ("<=", 1.0),
    # the four above are with fp32 adapters (peft's default beside a bf16 model, issue 18); these with bf16 ones
    "lora_fwd_vs_base_bf16_adapters": ("<=", 1.05),
    "lora_train_speedup_vs_peft_bf16_adapters": (">=", 1.3),
    "lora_train_vs_base_bf16_adapters": ("<=", 1.15),
    "lora_memory_ratio_vs_peft_bf16_adapters": ("<", 1.0),
    "multi_lora_decode_vs_base": ("<=", 1.15),
    "multi_lora_decode64_vs_floor": ("<=", 1.25),
    "multi_lora_decode_speedup_vs_peft": (">=", 10.0),
    "multi_lora_prefill_vs_base": ("<=", 1.1),
    "multi_lora_prefill_ragged_vs_base": ("<=", 1.1),  # issue 19: ragged requests end mid-tile
    "multi_lora_train_speedup_vs_loop": (">=", 1.3),  # issue 5
    "prompt_concat_speedup": (">=", 1.5),
    "prompt_concat_bandwidth_fraction": (">=", 0.8),
    "adapter_train_speedup_vs_unfused": (">=", 1.3),  # issue 9
    "adapter_train_vs_two_gemms": ("<=", 1.1),
    "train_e2e_speedup_vs_peft": (">=", 1.3),
    "train_e2e_memory_ratio_vs_peft": ("<", 1.0),
    # issue 21 (QLoRA): one layer's train step and the whole model's against peft + bitsandbytes.
    "qlora_train_speedup_vs_peft": (">=", 1.5),
    "qlora_fwd_speedup_vs_peft": (">=", 1.0),
    "qlora_memory_ratio_vs_peft": ("<=", 1.0),
    "qlora_e2e_speedup_vs_peft": (">=", 1.5),
    "qlora_e2e_memory_ratio_vs_peft": ("<=", 1.0),
}


def discover(only: set[str] | None, skip: set[str], bench_dir: Path = BENCH_DIR) -> list[str]:
    """Module names of the bench scripts in ``bench_dir``, in run order, filtered by op name."""
    names = sorted(path.stem for path in bench_dir.glob("bench_*.py"))
    rank = {name: i for i, name in enumerate(ORDER)}
    names.sort(key=lambda n: (n in LAST, rank.get(n, len(ORDER)), n))
    selected = []
    for name in names:
        op = name.removeprefix("bench_")
        if (only is None or op in only) and op not in skip:
            selected.append(name)
    return selected


def holds(key: str, value: float) -> bool | None:
    if key not in TARGETS:
        return None
    comparison, threshold = TARGETS[key]
    return {"<=": value <= threshold, "<": value < threshold, ">=": value >= threshold}[comparison]


def _module_options(module, args: argparse.Namespace, extra: list[str]) -> argparse.Namespace:
    """The module's own options (from ``extra``, the arguments run_all does not know; those the module
    does not know either are ignored), overlaid with the run-wide options."""
    parser = argparse.ArgumentParser()
    harness.common_arguments(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    options, _ = parser.parse_known_args(extra)
    for key, value in vars(args).items():
        setattr(options, key, value)
    return options


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format(v)}" for k, v in value.items())
    return str(value)


def markdown(summary: dict[str, float], rows: list[dict], env: dict, manifest: dict) -> str:
    smoke = env["smoke"]
    lines = [f"# Benchmark run on {env['device']}", ""]
    if smoke:
        lines += [
            "**CPU smoke run**: tiny shapes timed with time.perf_counter; these figures test the harness "
            "only and are not GPU results. Target checks do not apply.", "",
        ]
    lines += [
        f"torch {env['torch_version']}, triton {env['triton_version']}, CUDA {env['cuda_version']}, "
        f"commit {env['git_commit']}, {env['timestamp']}, timer {env['timer']}.", "",
        "## Summary (each ratio from rows of this run)", "",
        "| key | value | target | holds |", "|---|---|---|---|",
    ]
    for key in [*TARGETS, *(k for k in summary if k not in TARGETS)]:
        target = " ".join(map(str, TARGETS[key])) if key in TARGETS else ""
        if key not in summary:
            lines.append(f"| {key} | not measured in this run | {target} | |")
            continue
        verdict = holds(key, summary[key])
        shown = "n/a (smoke)" if smoke else ("" if verdict is None else ("yes" if verdict else "no"))
        lines.append(f"| {key} | {summary[key]:.4g} | {target} | {shown} |")
    lines.append("")
    for entry in manifest["skipped"]:
        lines.append(f"- skipped {entry.get('op')} / {entry.get('provider', '-')}: {entry['reason']}")
    for entry in manifest["errors"]:
        where = " ".join(_format(entry.get(k)) for k in ("provider", "shapes", "params") if entry.get(k))
        lines.append(f"- error in {entry['module']} {where}: {entry['error']}")
    lines += [
        "", "## Rows", "",
        "| op | provider | mode | shapes | params | dtype | median ms | p20-p80 ms | peak MiB | ratios |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak = "" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**20:.1f}"
        spread = "" if row["p20_ms"] is None else f"{row['p20_ms']:.4g}-{row['p80_ms']:.4g}"
        lines.append(
            f"| {row['op']} | {row['provider']} | {row['mode']} | {_format(row['shapes'])} | "
            f"{_format(row['params'])} | {row['dtype']} | {_format(row['median_ms'])} | {spread} | {peak} | "
            f"{_format(row['ratios'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every peftkern benchmark present")
    harness.common_arguments(parser)
    parser.add_argument("--only", default=None, help="comma-separated ops (lora, train, ...) to run")
    parser.add_argument("--skip", default="", help="comma-separated ops to leave out")
    parser.add_argument("--plot", action="store_true", help="also write PNGs (plot.py) into <dir>/plots")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)  # tests
    args, extra = parser.parse_known_args(argv)
    bench_dir = args.bench_dir.resolve()
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    only = None if not args.only else {name.strip() for name in args.only.split(",")}
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}

    limits = harness.make_bench("limits", args)
    env = limits.env
    out_dir = Path(args.out) / env["device_slug"]
    manifest: dict = {"env": env, "ran": [], "skipped": [], "errors": [], "files": []}
    limits.copy_bandwidth()
    manifest["files"].append(str(limits.write(args.out)))

    all_rows: list[dict] = list(limits.rows)
    summary: dict[str, float] = {}
    for name in discover(only, skip, bench_dir):
        try:
            module = importlib.import_module(name)
            bench = harness.make_bench(module.OP, _module_options(module, args, extra))
            module.run(bench)
        except (ImportError, harness.ProviderUnavailable) as error:
            reason = f"{type(error).__name__}: {error}"
            manifest["skipped"].append({"op": name.removeprefix("bench_"), "reason": reason})
            print(f"[run_all] skipped {name}: {error}", file=sys.stderr)
            continue
        except Exception as error:  # one broken bench must not lose the others' results
            traceback.print_exc()
            manifest["errors"].append({"module": name, "error": f"{type(error).__name__}: {error}"})
            continue
        manifest["ran"].append(name)
        manifest["skipped"].extend(bench.skipped)
        manifest["errors"].extend({"module": name, **entry} for entry in bench.errors)
        manifest["files"].append(str(bench.write(args.out)))
        all_rows.extend(bench.rows)
        if hasattr(module, "summarize"):
            # A key whose rows were not measured is left out, never invented.
            summary.update(harness.drop_missing(module.summarize(bench.rows, bench.smoke)))

    ordered = {key: summary[key] for key in TARGETS if key in summary}
    ordered.update({key: value for key, value in summary.items() if key not in ordered})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(ordered, indent=1) + "\n")
    (out_dir / "summary.md").write_text(markdown(ordered, all_rows, env, manifest))
    (out_dir / "run.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"[run_all] {len(all_rows)} rows, {len(ordered)} summary keys -> {out_dir}")
    if args.plot:
        try:
            import plot
        except ImportError as error:  # matplotlib is an optional extra ([bench])
            print(f"[run_all] no plots: {error}", file=sys.stderr)
        else:
            for path in plot.plot_directory(out_dir):
                print(f"[run_all] plot {path}")
    for key, value in ordered.items():
        print(f"[run_all] {key} = {value:.4g}" + (" (CPU smoke)" if env["smoke"] else ""))
    return 1 if manifest["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
