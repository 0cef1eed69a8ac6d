"""Build and run a CUDA C++ test program on the CPU emulator (tests/cuda_emulator/emulate.h).

The headers of csrc/include/peftkern are copied with every ``kernel<<<grid, block, smem, stream>>>(args)``
rewritten to ``::emu::launch(kernel, grid, block, smem, stream, args)`` and every ``__shared__`` declaration
followed by ``::emu::shared_region(&name, sizeof(name));`` (the emulator fills shared memory with 0xFF before
each block), then the program is compiled by g++ with AddressSanitizer and UBSan (buffers are sized exactly to
their strides, so any out-of-bounds access aborts). Without the sanitizer runtimes the build fails: a test
that silently ran without them would check far less. Each op's test calls :func:`build` with its program in
tests/cuda_emulator/.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADERS = ROOT / "csrc" / "include" / "peftkern"
EMULATOR = ROOT / "tests" / "cuda_emulator"
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
)
AVAILABLE = NVCC is not None and shutil.which("g++") is not None
needs_emulator = pytest.mark.skipif(not AVAILABLE, reason="needs the CUDA headers (nvcc) and g++")
# PEFTKERN_EMULATE_FULL=1: each program's full case list instead of CI's quick one.
FULL = os.environ.get("PEFTKERN_EMULATE_FULL", "0") not in ("", "0")

_LAUNCH = re.compile(r"([\w:]+(?:<[^<>]*>)?)<<<(.*?)>>>\(", flags=re.S)
# A __shared__ declaration (code, not a comment): its name is the last identifier before the array bounds.
_SHARED = re.compile(r"^(\s*__shared__\s[^;{}/]*?(\w+)\s*(?:\[[^\]]*\]\s*)*;)", flags=re.M)


def cuda_include_dir() -> Path | None:
    """Where cuda_runtime.h lives, as nvcc reports it (nvcc may be a wrapper outside the toolkit)."""
    dry = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    for line in (dry.stdout + dry.stderr).splitlines():
        if "INCLUDES=" in line:
            for flag in shlex.split(line.split("=", 1)[1]):
                if flag.startswith("-I") and (Path(flag[2:]) / "cuda_runtime.h").is_file():
                    return Path(flag[2:])
    return None


def emulated_headers(tmp_path: Path) -> dict[str, int]:
    """Copy every header into tmp_path/peftkern with its launches rewritten; returns launches per header."""
    out = tmp_path / "peftkern"
    out.mkdir(exist_ok=True)
    counts = {}
    for header in sorted(HEADERS.glob("*.cuh")):
        emulated, counts[header.name] = _LAUNCH.subn(r"::emu::launch(\1, \2, ", header.read_text())
        assert "<<<" not in emulated, f"{header.name}: a launch the rewrite did not catch"
        emulated, shared = _SHARED.subn(r"\1 ::emu::shared_region(&\2, sizeof(\2));", emulated)
        declared = len(re.findall(r"^\s*__shared__\s", emulated, flags=re.M))
        assert shared == declared, f"{header.name}: {declared - shared} __shared__ declarations the rewrite missed"
        (out / header.name).write_text(emulated)
    for header in sorted(HEADERS.glob("*.h")):  # plain C headers (the C API's declarations): no kernels
        (out / header.name).write_text(header.read_text())
    return counts


SANITIZERS = {
    # out-of-bounds reads and writes (buffers sized exactly to their strides), undefined behaviour
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    # data races between emulated CUDA threads: shared-memory accesses no __syncthreads orders
    "thread": ["-fsanitize=thread"],
}


def build(tmp_path: Path, program: str, sanitizer: str = "address") -> Path:
    """Compile tests/cuda_emulator/<program>.cpp against the emulated headers with ``sanitizer`` ("address":
    ASan + UBSan; "thread": TSan); skips without the tools, fails without the sanitizer's runtime."""
    if not AVAILABLE:
        pytest.skip("needs the CUDA headers (nvcc) and g++")
    include = cuda_include_dir()
    if include is None:
        pytest.skip("nvcc did not report its include directory")
    emulated_headers(tmp_path)
    binary = tmp_path / program
    command = [
        "g++", "-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", f"-I{tmp_path}", f"-I{include}",
        f"-I{EMULATOR}", str(EMULATOR / f"{program}.cpp"), "-o", str(binary),
    ]
    result = subprocess.run(command + SANITIZERS[sanitizer], capture_output=True, text=True, timeout=900)
    if result.returncode != 0 and re.search(r"lib(?:a|t|ub)san|-l(?:a|t|ub)san|sanitizer", result.stderr):
        pytest.fail(
            f"the emulator's {sanitizer} build needs g++'s sanitizer runtimes (AddressSanitizer and UBSan runtimes "
            "libasan, libubsan; ThreadSanitizer's libtsan: e.g. `apt-get install libasan8 libubsan1 libtsan2` for "
            "the installed g++); without them the programs would check values only:\n" + result.stderr[-2000:]
        )
    assert result.returncode == 0, result.stderr[-4000:]
    return binary


def run(binary: Path, *args: str, timeout: int = 1800) -> str:
    """Run an emulated program (``--quick`` unless PEFTKERN_EMULATE_FULL); returns stdout, asserts exit 0."""
    command = [str(binary), *args] + ([] if FULL else ["--quick"])
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout
