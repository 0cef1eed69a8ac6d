"""Every Triton kernel compiles for sm_90 through the real compiler and ptxas, on a machine without a GPU.

The CPU tests run Triton's interpreter, which accepts code the compiler rejects; tests/_triton_compile.py
compiles what the ops launch instead (nothing runs). Twice: with the installed triton and with the one
torch 2.11 pins (3.6, what the project's GPU machines run; `make install` puts it in .triton-compat/),
since a kernel can compile with one and not the other. CI runs the quick form (first autotune configs,
bf16 and fp32 with TF32); ``make triton-compile-check`` compiles every config and dtype case.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
COMPAT = TESTS.parent / ".triton-compat"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _run(args: list[str], script: Path | None = None, interpret: bool = False, timeout: int = 1500,
         triton_dir: Path | None = None):
    """Run tests/_triton_compile.py with ``args`` (or ``script``) in a process of its own, importing triton
    from ``triton_dir`` when given."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    path = [str(triton_dir)] if triton_dir else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*path, str(TESTS), env.get("PYTHONPATH")]))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, *([str(script)] if script else [str(TESTS / "_triton_compile.py"), *args])]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _compat_versions() -> list[str]:
    found = sorted(p.name for p in COMPAT.iterdir() if (p / "triton").is_dir()) if COMPAT.is_dir() else []
    return found or ["compat"]


@pytest.mark.parametrize("version", ["installed", *_compat_versions()])
def test_every_kernel_compiles_for_sm90(version):
    triton_dir = None if version == "installed" else COMPAT / version
    if triton_dir is not None and not (triton_dir / "triton").is_dir():
        pytest.skip("no triton in .triton-compat/ (`make install` puts torch 2.11's triton 3.6 there)")
    result = _run(["--arch", "90", "--quick"], triton_dir=triton_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "sm_90:" in output and "0 problem(s)" in output, output[-3000:]
    if triton_dir is not None:
        assert f"triton {version}," in output, output[:500]  # the compat copy, not the installed one


# A loop-carried value that changes type: the interpreter runs it, the compiler refuses it.
_BAD_KERNEL = """
import torch, triton, triton.language as tl

@triton.jit
def bad(X, n):
    acc = tl.zeros((16,), tl.float32)
    for i in range(n):
        acc = acc.to(tl.float16) + 1
    tl.store(X + tl.arange(0, 16), acc)

x = torch.zeros(16)
"""


def test_the_interpreter_accepts_what_the_compiler_rejects(tmp_path):
    interpreted = tmp_path / "interpreted.py"  # triton.jit needs its source in a file
    interpreted.write_text(_BAD_KERNEL + "bad[(1,)](x, 3)\nprint('RAN', x[0].item())\n")
    result = _run([], interpreted, interpret=True)
    assert "RAN 3.0" in result.stdout, result.stdout + result.stderr

    compiled = tmp_path / "compiled.py"
    compiled.write_text("import _triton_compile as check\nfrom triton.compiler.errors import CompilationError\n"
                        + _BAD_KERNEL + textwrap.dedent("""
        with check.compile_only(90, True, lambda *_: None):
            try:
                bad[(1,)](x, 3)
            except CompilationError as error:
                print("REFUSED", type(error).__name__)
        print("LAUNCHED NOTHING", x[0].item())
        """))
    result = _run([], compiled)
    assert "REFUSED CompilationError" in result.stdout, result.stdout + result.stderr
    assert "LAUNCHED NOTHING 0.0" in result.stdout


# An autotuned kernel with a register budget: compile_only compiles what the autotuner would time, the configs
# left after its pruning (benchmarks/perf_report.py's static report sees the same).
_BUDGETED_KERNEL = """
import torch, triton, triton.language as tl
import _triton_compile as check
from peftkern.triton_kernels._common import TileBudget, autotune

configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4) for m in (128, 64, 32)]

@autotune(configs, ["n"], budget=lambda args: TileBudget(16 if args["SMALL"] else 32))
@triton.jit
def fill(X, n, SMALL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK_M), tl.zeros((BLOCK_M,), tl.float32))

x = torch.zeros(128)
for small in (False, True):
    for first in (False, True):
        seen = []
        with check.compile_only(90, first, lambda name, kernel, config, seconds: seen.append(config)):
            fill[(1,)](x, 128, SMALL=small)
        print("SMALL" if small else "LARGE", "FIRST" if first else "ALL", [c.split(",")[0] for c in seen])
"""


def test_compile_only_compiles_the_configs_left_after_pruning(tmp_path):
    script = tmp_path / "budgeted.py"
    script.write_text(_BUDGETED_KERNEL)
    result = _run([], script)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "LARGE ALL ['BLOCK_M: 64', 'BLOCK_M: 32']" in output, output  # 128 x 64 / 128 threads = 64 > 32
    assert "LARGE FIRST ['BLOCK_M: 64']" in output, output
    assert "SMALL ALL ['BLOCK_M: 32']" in output, output
    assert "SMALL FIRST ['BLOCK_M: 32']" in output, output
