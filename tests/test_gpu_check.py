"""The one-call GPU check (benchmarks/gpu_check.py) and its bundle (benchmarks/gpu_bundle.py), on CPU.

The plan cannot rot: the quick form of ``make gpu-check-dry`` runs here (one step of each stage on tiny shapes
through Triton's interpreter, then the real run's launches of one step looked up in a bundle). With an empty
bundle every launch must be reported as not covered: that is the key walker finding the launches. The output
rules of the device tool (files, sizes, depth, names), the cache relocation and the correctness verdict (a
wrong op fails) are checked directly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402 (benchmarks/ is a directory of scripts)

LAST_LINE = re.compile(r"gpu-check dry run: (\d+) steps, (\d+) compiles in the bundle, (\d+) not covered")


def test_plan_has_every_stage_and_safe_unique_names():
    names = [s.name for s in gpu_check.PLAN]
    assert len(names) == len(set(names))
    assert {s.stage for s in gpu_check.PLAN} == set(gpu_check.STAGES)
    for name in names:
        assert re.fullmatch(r"[a-z0-9_/.-]+", name), name
    for case in gpu_check.OP_CASES:
        assert len(case.shapes["gpu"]) == len(case.shapes["tiny"]) == 2, case.op
        for backend in case.backends:
            for index in range(2):
                assert f"correctness/{case.op}/{backend}/s{index}" in names
    # The sanitizer reruns correctness steps that exist.
    for pattern in gpu_check.SANITIZED:
        assert pattern.format(backend="triton") in names


def test_correctness_verdict_fails_a_wrong_op():
    from peftkern import reference

    ctx = gpu_check.Context("dry", torch.device("cpu"), Path("."))
    shape = {"M": 9, "K": 16, "N": 8, "r": 4}

    def case(factor):
        def make(shape, dtype, device):
            inputs = gpu_check._lora_inputs(shape, dtype, device)
            inputs.call = lambda backend, a: reference.lora_linear(*a.values()) * factor
            return inputs

        return gpu_check.OpCase("lora", {}, make, backends=("torch",))

    good = gpu_check.check_case(ctx, case(1.0), shape, "torch")
    assert good["status"] == "pass" and good["forward"] < 1e-6, good
    assert set(good["backward"]) == {"x", "lora_a", "lora_b"}
    bad = gpu_check.check_case(ctx, case(1.01), shape, "torch")
    assert bad["status"] == "fail" and bad["forward"] > 1e-3, bad


def test_output_rules(tmp_path):
    folder = tmp_path / "nvidia-h200"
    folder.mkdir()
    for i in range(8):
        (folder / f"f{i}.json").write_text("{}")
    assert gpu_check.check_outputs(tmp_path) == []
    (folder / "one too many.json").write_text("{}")
    problems = gpu_check.check_outputs(tmp_path)
    assert any("9 files" in p for p in problems) and any("name has characters" in p for p in problems)
    (folder / "one too many.json").unlink()
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (folder / "f0.json").unlink()
    (deep / "x.json").write_text("{}")
    assert any("two folders deep" in p for p in gpu_check.check_outputs(tmp_path))


def test_relocate_cache_points_groups_at_where_the_cache_is(tmp_path):
    group_dir = tmp_path / "cache" / "ABC"
    group_dir.mkdir(parents=True)
    (group_dir / "k.json").write_text("{}")
    (group_dir / "k.cubin").write_bytes(b"\0")
    children = {"k.json": "/elsewhere/ABC/k.json", "k.cubin": "/elsewhere/ABC/k.cubin",
                "k.source": "/elsewhere/ABC/k.source"}  # not packed: dropped
    (group_dir / "__grp__k.json").write_text(json.dumps({"child_paths": children}))
    assert gpu_check.relocate_cache(tmp_path / "cache") == 1
    relocated = json.loads((group_dir / "__grp__k.json").read_text())["child_paths"]
    assert relocated == {"k.json": str(group_dir / "k.json"), "k.cubin": str(group_dir / "k.cubin")}


@pytest.mark.skipif(not (REPO / ".triton-compat" / "3.6.0" / "triton").is_dir(),
                    reason="needs triton 3.6 in .triton-compat/ (make install)")
def test_quick_dry_run(tmp_path):
    """``gpu_check.py --dry --quick`` with an empty bundle: every stage's first step runs, the outputs keep the
    device tool's rules, and the key check finds the launches of the real run's first step, none covered."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry", "--quick",
                           "--bundle", str(tmp_path / "no-bundle"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-5:]
    steps, compiles, missing = map(int, match.groups())
    assert steps == len(gpu_check.STAGES)
    assert compiles == 0 and missing > 0  # an empty bundle covers nothing; the walker saw the launches
    assert gpu_check.check_outputs(out) == []
    report = json.loads((out / "cpu-dry" / "gpu_check.json").read_text())
    assert [s["stage"] for s in report["stages"]] == list(gpu_check.STAGES)
    statuses = {name: result["status"] for name, result in report["steps"].items()}
    assert statuses["correctness/lora/triton/s0"] == "pass", report["steps"]["correctness/lora/triton/s0"]
    assert all(status in ("pass", "skipped") for status in statuses.values()), statuses


@pytest.mark.skipif(not list((REPO / ".triton-compat" / "wheels").glob("triton-3.6.0-cp312-*.whl"))
                    or not (REPO / ".triton-compat" / "3.6.0" / "triton").is_dir(),
                    reason="needs triton 3.6 and its cp312 wheel in .triton-compat/ (make gpu-bundle)")
def test_target_key_differs_from_this_tritons_only_by_libtriton():
    """The GPU machines' triton_key (cp312) is this triton's (cp311) with libtriton.so's hash replaced."""
    script = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_bundle\n"
              "from triton.runtime.cache import triton_key\n"
              "mine = triton_key(); target, why = gpu_bundle.target_triton_key()\n"
              "print(mine != target, len(mine) == len(target), why)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / ".triton-compat" / "3.6.0"), str(REPO)])
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("True True ") and "sources identical" in done.stdout, done.stdout
