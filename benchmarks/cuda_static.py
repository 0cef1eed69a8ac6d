"""Static figures for the CUDA C++ kernels, no GPU needed: each kernel translation unit (``csrc/<unit>.cu``)
compiled for one architecture by nvcc, and per kernel

- from ptxas (``-Xptxas -v``): registers, spill stores / loads (bytes), static shared memory (bytes);
- from the SASS (``cuobjdump -sass``, where the toolkit has it) or else from the PTX nvcc kept: global loads
  by width (vector = 64/128-bit, scalar = 32-bit or narrower), async copies (``cp.async`` / ``LDGSTS``),
  shared-memory loads by width, tensor-core instructions (``wmma``/``mma`` / ``HMMA``) and fp32 FMAs.

The static report can include :func:`cuda_kernel_stats`'s rows; on its own::

    python benchmarks/cuda_static.py --arch 90a --units multi_lora_f32 lora_bf16 --out /tmp/cuda_static.json

Compiling one unit for one arch takes about half a minute to a few minutes on a small machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")

# (name, regex) counted per kernel in PTX; the SASS patterns below mean the same things.
PTX_COUNTS = {
    "global_loads_vector": r"\bld\.global(?:\.\w+)*\.v[24]\.",
    "global_loads_scalar": r"\bld\.global(?!(?:\.\w+)*\.v[24]\.)(?:\.\w+)*\s",
    "async_copies": r"\bcp\.async\.(?:ca|cg)\.",
    "shared_loads_vector": r"\bld\.shared(?:\.\w+)*\.v[24]\.",
    "shared_loads_scalar": r"\bld\.shared(?!(?:\.\w+)*\.v[24]\.)(?:\.\w+)*\s",
    "tensor_core": r"\b(?:wmma\.mma|mma\.sync|wgmma\.mma_async)\.",
    "fp32_fma": r"\bfma\.rn\.f32\b",
}
SASS_COUNTS = {
    "global_loads_vector": r"\bLDG\.E\.(?:64|128)\b",
    "global_loads_scalar": r"\bLDG\.E(?:\.(?:U8|S8|U16|S16|CONSTANT|EF|EL|LU|EU|NA|STRONG\.\w+|SYS|GPU))*\s",
    "async_copies": r"\bLDGSTS\b",
    "shared_loads_vector": r"\b(?:LDS\.(?:64|128)|LDSM)\b",
    "shared_loads_scalar": r"\bLDS(?:\.U(?:8|16)|\.S(?:8|16))?\s",
    "tensor_core": r"\b(?:HMMA|HGMMA)\b",
    "fp32_fma": r"\bFFMA\b",
}


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _split_functions(text: str, header: re.Pattern) -> dict[str, str]:
    """Function name -> its body, for PTX (.entry) or SASS (Function :) listings."""
    marks = [(m.group(1), m.start()) for m in header.finditer(text)]
    return {name: text[start:(marks[i + 1][1] if i + 1 < len(marks) else len(text))]
            for i, (name, start) in enumerate(marks)}


def compile_unit(unit: str, arch: str, nvcc: str = "nvcc", workdir: Path | None = None) -> list[dict]:
    """Per-kernel figures of csrc/<unit>.cu for sm_<arch> (e.g. "90a", "80")."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cubin = Path(tmp) / f"{unit}.cubin"
        cmd = [nvcc, "-cubin", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               f"-I{CSRC / 'include'}", f"-I{CSRC}", "-Xptxas", "-v", "-keep", f"-keep-dir={tmp}",
               str(CSRC / f"{unit}.cu"), "-o", str(cubin)]
        build = subprocess.run(cmd, capture_output=True, text=True)
        if build.returncode != 0:
            raise RuntimeError(f"nvcc failed for {unit}:\n{build.stderr[-3000:]}")
        rows: dict[str, dict] = {}
        current = None
        for line in build.stderr.splitlines():
            if (m := _ENTRY.search(line)):
                current = rows.setdefault(m.group(1), {"unit": unit, "arch": m.group(2)})
            elif current is not None and (m := _PROPS.search(line)):
                current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                               spill_load_bytes=int(m.group(3)))
            elif current is not None and (m := _USED.search(line)):
                smem = _SMEM.search(line)  # ptxas leaves it out when a kernel has no static shared memory
                current.update(registers=int(m.group(1)), static_smem_bytes=int(smem.group(1)) if smem else 0)
        cuobjdump = shutil.which("cuobjdump") or (
            str(Path(nvcc).resolve().parent / "cuobjdump") if (Path(nvcc).resolve().parent / "cuobjdump").is_file()
            else None)
        if cuobjdump is not None:
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
            bodies, patterns, source = _split_functions(sass, re.compile(r"Function : (\w+)")), SASS_COUNTS, "sass"
        else:
            ptx = "\n".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
            bodies, patterns, source = _split_functions(ptx, re.compile(r"\.entry (\w+)\(")), PTX_COUNTS, "ptx"
        for name, body in bodies.items():
            row = rows.setdefault(name, {"unit": unit, "arch": f"sm_{arch}"})
            row["instruction_source"] = source
            for key, pattern in patterns.items():
                row[key] = len(re.findall(pattern, body))
    pretty = _demangle(sorted(rows))
    return [{"kernel": pretty[name], "symbol": name, **row} for name, row in sorted(rows.items())]


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def nvcc_version() -> str | None:
    """nvcc's release line (e.g. "Cuda compilation tools, release 13.0, V13.0.48"), or None without nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return lines[-2] if len(lines) >= 2 else (lines[-1] if lines else None)


def cuda_kernel_stats(units: list[str] | None = None, arch: str = "90a", nvcc: str | None = None) -> list[dict]:
    """Rows for every kernel of ``units`` (default: every csrc/*.cu); [] without nvcc."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return []
    units = units or sorted(p.stem for p in CSRC.glob("*.cu"))
    return [row for unit in units for row in compile_unit(unit, arch, nvcc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90a")
    parser.add_argument("--units", nargs="*", help="csrc/<unit>.cu stems (default: all)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (default: print a table)")
    args = parser.parse_args()
    rows = cuda_kernel_stats(args.units, args.arch)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    keys = ("registers", "spill_store_bytes", "static_smem_bytes", "global_loads_vector", "global_loads_scalar",
            "async_copies", "tensor_core", "fp32_fma")
    print("kernel | " + " | ".join(keys))
    for row in rows:
        print(f"{row['kernel'][:110]} | " + " | ".join(str(row.get(k, "")) for k in keys))


if __name__ == "__main__":
    main()
