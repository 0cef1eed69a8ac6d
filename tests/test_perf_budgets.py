"""Performance budgets, held on the committed static report (benchmarks/results/static/, `make perf-report`).

No GPU and no compiler here: these tests read the JSON files, so they run in CI in seconds. Regenerate the
report after changing a kernel or an op (`make perf-report`; `make perf-report-check` says whether the
committed one is current). A budget today's code misses is an expected failure (strict) naming the issue
that fixes it: when the fix lands and the report is regenerated, the test passes, strictness fails it,
and its key must leave the tables below (a new miss must be fixed, or entered there with its issue).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "static"


def _rows(name: str) -> list[dict]:
    path = STATIC / name
    return json.loads(path.read_text())["rows"] if path.is_file() else []


KERNELS = _rows("kernels.json")
OPS = _rows("ops.json")
CUDA_KERNELS = _rows("cuda_kernels.json")

# ---- expected failures: begin (today's misses; each names the issue that fixes it)
# (kernel, case) with a config that has no tensor-core instruction (issue 18 put every fp32 product on them).
NO_TENSOR_CORES: dict[tuple[str, str], str] = {}
# (kernel, case) with a config whose tile products run on FMA.
FMA_PRODUCTS: dict[tuple[str, str], str] = {}
# (arch, kernel, case) with a config that fits in shared memory (so autotuning may pick it) and spills.
# Issues 18 and 21 left none: autotuning drops the configs over their register budgets (_common.register_budget).
SPILLS: dict[tuple[str, str, str], str] = {}
# (op, mode, shape id) of ours that read device values on the host (issue 19 removed the last: check_ids is
# off by default on CUDA tensors).
SYNCS: dict[tuple[str, str, str], str] = {}
# (op, mode, shape id) of ours over its launch budget (issue 18 brought the LoRA backward to 3: dY read once).
LAUNCHES_OVER: dict[tuple[str, str, str], str] = {}
# (op, mode, shape id) of ours whose decode grids leave SMs idle.
GRIDS_UNDER: dict[tuple[str, str, str], str] = {}
# (op, mode, shape id) of ours over its bytes budget.
BYTES_OVER: dict[tuple[str, str, str], str] = {}
# ---- expected failures: end


def _shape_id(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _param(key: tuple, known: dict[tuple, str]):
    marks = [pytest.mark.xfail(strict=True, reason=known[key])] if key in known else []
    return pytest.param(*key, marks=marks, id="/".join(str(k) for k in key))


def test_the_report_is_there():
    assert KERNELS and OPS, f"no static report in {STATIC}: run `make perf-report`"


# ---- kernels ----------------------------------------------------------------------------------------------

_GEMMS = sorted({(r["kernel"], r["case"]) for r in KERNELS if r["gemm"]})


@pytest.mark.parametrize("kernel, case", [_param(key, NO_TENSOR_CORES) for key in _GEMMS])
def test_every_gemm_kernel_uses_tensor_cores(kernel, case):
    rows = [r for r in KERNELS if (r["kernel"], r["case"]) == (kernel, case)]
    without = [(r["arch"], r["config"], r["switches"]) for r in rows if r["tensor_core_instructions"] == 0]
    assert not without, f"{kernel} ({case}) has no wgmma/mma instruction in: {without}"


# A tile product on the FMA units (tl.dot with fp32 operands and input_precision="ieee") compiles to at
# least 512 fma instructions in every kernel here; epilogues (bias, scaling, activation) to at most 64.
FMA_TILE_PRODUCT = 256
@pytest.mark.parametrize("kernel, case", [_param(key, FMA_PRODUCTS) for key in _GEMMS])
def test_no_tile_product_runs_on_fma(kernel, case):
    rows = [r for r in KERNELS if (r["kernel"], r["case"]) == (kernel, case)]
    fma = [(r["arch"], r["config"], r["fma_instructions"]) for r in rows
           if r["fma_instructions"] >= FMA_TILE_PRODUCT]
    assert not fma, f"{kernel} ({case}): fma instructions of a tile product (arch, config, count): {fma}"


_TUNED = sorted({(r["arch"], r["kernel"], r["case"]) for r in KERNELS})


@pytest.mark.parametrize("arch, kernel, case", [_param(key, SPILLS) for key in _TUNED])
def test_no_config_autotuning_may_pick_spills(arch, kernel, case):
    rows = [r for r in KERNELS if (r["arch"], r["kernel"], r["case"]) == (arch, kernel, case)]
    spilling = [(r["config"], r["switches"], r["spill_bytes"]) for r in rows
                if r["fits_shared"] and r["spill_bytes"] != 0]
    assert not spilling, f"{kernel} ({case}, {arch}) spills (config, switches, bytes): {spilling}"


# ---- ops --------------------------------------------------------------------------------------------------


def _ours(op: str | None = None, mode: str | None = None) -> list[dict]:
    return [r for r in OPS if r["provider"] == "ours" and op in (None, r["op"]) and mode in (None, r["mode"])]


def _key(row: dict) -> tuple[str, str, str]:
    return row["op"], row["mode"], _shape_id(row["shape"])


def _row(op: str, mode: str, shape: str, provider: str = "ours") -> dict:
    return next(r for r in OPS if r["provider"] == provider and _key(r) == (op, mode, shape))


@pytest.mark.parametrize("op, mode, shape", [_param(_key(r), SYNCS) for r in _ours()])
def test_ours_never_syncs_the_host(op, mode, shape):
    row = _row(op, mode, shape)
    assert row["host_syncs"] == 0, f"{op} {mode} {shape}: host reads {row['synced']}"


# op, mode -> launches per call at most (multi_lora_linear: per layer)
LAUNCH_BUDGETS = {("lora_linear", "forward"): 2, ("lora_linear", "backward"): 3,
                  ("lora_linear_4bit", "forward"): 2, ("lora_linear_4bit", "backward"): 5,
                  ("multi_lora_linear", "forward"): 3, ("prompt_concat", "forward"): 2,
                  ("lora_shrink", "forward"): 2, ("lora_expand_add", "forward"): 1}
# multi_lora_linear's budget is per layer: one layer's call with the step's LoRABatch built beforehand (once
# per step for all layers); the "ours" rows with plain ids build it in the call.
LAUNCH_PROVIDER = {("multi_lora_linear", "forward"): "ours_prebuilt_batch"}


def _launch_cases():
    rows = [r for r in OPS if (r["op"], r["mode"]) in LAUNCH_BUDGETS
            and r["provider"] == LAUNCH_PROVIDER.get((r["op"], r["mode"]), "ours")]
    # lora_linear with default arguments: dropout 0
    rows = [r for r in rows if r["shape"].get("dropout_p", 0.0) == 0.0]
    return [_param(_key(r), LAUNCHES_OVER) for r in rows]


@pytest.mark.parametrize("op, mode, shape", _launch_cases())
def test_launches_per_call(op, mode, shape):
    row = _row(op, mode, shape, LAUNCH_PROVIDER.get((op, mode), "ours"))
    budget = LAUNCH_BUDGETS[op, mode]
    assert row["launches"] <= budget, f"{op} {mode} {shape}: {row['launches']} launches > {budget}: {row['launched']}"


BYTES_BUDGETS = {("multi_lora_linear", "forward", "decode"): 1.10, ("prompt_concat", "forward", None): 1.05,
                 ("lora_shrink", "forward", "decode"): 1.10, ("lora_expand_add", "forward", "decode"): 1.10}


def _bytes_cases():
    cases = []
    for r in _ours():
        for (op, mode, path), _ in BYTES_BUDGETS.items():
            if (r["op"], r["mode"]) == (op, mode) and r["shape"].get("path") == path:
                cases.append(_param(_key(r), BYTES_OVER))
    return cases


@pytest.mark.parametrize("op, mode, shape", _bytes_cases())
def test_bytes_moved_near_the_floor(op, mode, shape):
    row = _row(op, mode, shape)
    budget = BYTES_BUDGETS[op, mode, row["shape"].get("path")]
    ratio = row["bytes_per_launch_sum"] / row["floor_bytes"]
    assert ratio <= budget, f"{op} {mode} {shape}: bytes / floor = {ratio:.3f} > {budget}: {row['launched']}"


# Decode (a few rows) must still fill an H100 / H200: every Triton launch's grid has at least one program per SM.
SMS = 132
GRID_PROVIDER = {"multi_lora_linear": "ours_prebuilt_batch", "lora_shrink": "ours", "lora_expand_add": "ours"}


def _grid_cases():
    rows = [r for r in OPS if r["mode"] == "forward" and r["shape"].get("path") == "decode"
            and r["provider"] == GRID_PROVIDER.get(r["op"])]
    return [_param(_key(r), GRIDS_UNDER) for r in rows]


@pytest.mark.parametrize("op, mode, shape", _grid_cases())
def test_decode_grids_fill_the_device(op, mode, shape):
    row = _row(op, mode, shape, GRID_PROVIDER[op])
    small = {kernel: programs for kernel, programs in row["programs"].items() if min(programs) < SMS}
    assert not small, f"{op} {mode} {shape}: grids of fewer than {SMS} programs: {small}"


# ---- CUDA C++ kernels (cuda_kernels.json: every csrc/*.cu unit compiled for sm_90a by nvcc) -----------------


def test_the_cuda_kernels_are_reported():
    """Every unit's kernels with ptxas's usage (no budgets on them yet: the figures are the evidence)."""
    assert CUDA_KERNELS, f"no CUDA C++ kernel rows in {STATIC}/cuda_kernels.json: run `make perf-report` with nvcc"
    assert {r["unit"] for r in CUDA_KERNELS} == {p.stem for p in (STATIC.parents[2] / "csrc").glob("*.cu")}
    assert all(isinstance(r.get("registers"), int) and "spill_store_bytes" in r for r in CUDA_KERNELS)
