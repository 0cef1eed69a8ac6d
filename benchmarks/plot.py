"""Turn one run's JSON rows (``<out>/<device-slug>/*.json``) into PNGs under ``<dir>/plots/``.

    python3 benchmarks/plot.py benchmarks/results/nvidia-h100-80gb-hbm3

For every op with a sweep over ``tokens``, ``rank`` or ``adapters``: each provider's speedup over a
baseline measured in the same run (``ratios["vs_<baseline>"]``, inverted so that > 1 is faster), per mode,
with the other sizes held at the headline case where it was measured. For rows with ``bytes_moved``: the
achieved bandwidth as a fraction of the run's device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)

SWEEP_KEYS = ("tokens", "rank", "adapters")
# The value other sizes are held at, where a sweep measured it; otherwise the most common value.
HEADLINE = {"tokens": 8192, "hidden": 4096, "rank": 16, "dropout_p": 0.1, "adapters": 8}
BASELINES = ("torch_unfused", "peft", "peft_style", "base")
NOT_PLOTTED = {"base", "base_two_gemms", "d2d_copy"}


def load_rows(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("*.json")):
        document = json.loads(path.read_text())
        if isinstance(document, dict) and isinstance(document.get("rows"), list):
            rows.extend(document["rows"])
    return rows


def _settings(row: dict) -> dict:
    return {**row["shapes"], **row["params"]}


def _held_values(rows: list[dict], sweep: str) -> dict:
    """For every size other than ``sweep``: the headline value if some row has it, else the most common."""
    counts: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        for key, value in _settings(row).items():
            if key != sweep:
                counts[key][json.dumps(value)] += 1
    held = {}
    for key, seen in counts.items():
        headline = json.dumps(HEADLINE.get(key))
        held[key] = json.loads(headline if headline in seen else max(seen, key=seen.get))
    return held


def plot_speedup(rows: list[dict], op: str, sweep: str, out_dir: Path) -> list[Path]:
    """One PNG per mode: speedup over the op's baseline against ``sweep``, one line per provider."""
    rows = [r for r in rows if r["op"] == op and sweep in r["shapes"] and r["median_ms"] is not None]
    providers = {r["provider"] for r in rows}
    baseline = next((b for b in BASELINES if b in providers), None)
    if baseline is None:
        return []
    ratio_key = f"vs_{baseline}"
    written = []
    for mode in sorted({r["mode"] for r in rows}):
        mode_rows = [r for r in rows if r["mode"] == mode and ratio_key in r["ratios"]]
        mode_rows = [r for r in mode_rows if r["provider"] not in NOT_PLOTTED]
        if not mode_rows:
            continue
        held = _held_values(mode_rows, sweep)
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in mode_rows:
            settings = _settings(row)
            if all(settings.get(k) == v for k, v in held.items() if k in settings):
                lines[row["provider"]].append((settings[sweep], 1.0 / row["ratios"][ratio_key]))
        swept = {point[0] for points in lines.values() for point in points}
        if not lines or (len(swept) < 2 and not mode_rows[0]["smoke"]):  # not swept in this run: no plot
            continue
        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        for provider, points in sorted(lines.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xscale("log", base=2)
        axis.set_xlabel(sweep)
        axis.set_ylabel(f"speedup over {baseline} (x)")
        note = " [CPU smoke: not GPU results]" if mode_rows[0]["smoke"] else ""
        held_text = ", ".join(f"{k}={v}" for k, v in sorted(held.items()))
        axis.set_title(f"{op} {mode}, {mode_rows[0]['dtype']} on {mode_rows[0]['device']}{note}\n{held_text}",
                       fontsize=8)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / f"{op}_speedup_vs_{sweep}_{mode}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def plot_bandwidth(rows: list[dict], out_dir: Path) -> list[Path]:
    """Achieved bandwidth / the run's device-to-device copy bandwidth, one bar per measured row."""
    copies = [r for r in rows if r["provider"] == "d2d_copy" and r["bandwidth_gbps"]]
    measured = [r for r in rows if r["provider"] != "d2d_copy" and r["bandwidth_gbps"]]
    if not copies or not measured:
        return []
    copy_bandwidth = max(r["bandwidth_gbps"] for r in copies)
    labels = [f"{r['op']}/{r['provider']}/{r['mode']}\n" + ",".join(map(str, r["shapes"].values()))
              for r in measured]
    fractions = [r["bandwidth_gbps"] / copy_bandwidth for r in measured]
    figure, axis = plt.subplots(figsize=(max(6.4, 0.6 * len(measured)), 4.2))
    axis.bar(range(len(measured)), fractions)
    axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xticks(range(len(measured)), labels, rotation=60, ha="right", fontsize=6)
    axis.set_ylabel(f"fraction of D2D copy bandwidth ({copy_bandwidth:.0f} GB/s)")
    note = " [CPU smoke: not GPU results]" if measured[0]["smoke"] else ""
    axis.set_title(f"bandwidth fraction on {measured[0]['device']}{note}", fontsize=8)
    figure.tight_layout()
    path = out_dir / "bandwidth_fraction.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def plot_directory(directory: Path, out_dir: Path | None = None) -> list[Path]:
    rows = load_rows(directory)
    out_dir = out_dir or directory / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op in sorted({r["op"] for r in rows}):
        for sweep in SWEEP_KEYS:
            written += plot_speedup(rows, op, sweep, out_dir)
    written += plot_bandwidth(rows, out_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot one benchmark run's JSON rows")
    parser.add_argument("directory", type=Path, help="results/<device-slug> of one run")
    parser.add_argument("--out", type=Path, default=None, help="where PNGs go (default <directory>/plots)")
    args = parser.parse_args(argv)
    written = plot_directory(args.directory, args.out)
    for path in written:
        print(path)
    if not written:
        print(f"plot: nothing to plot in {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
