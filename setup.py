"""Build script. Metadata and packages live in pyproject.toml; this file adds two optional extensions.

``peftkern._cpu`` (``csrc/cpu/*.cpp``, the host C++ compiler, pybind11, no torch) holds the torch backend's CPU
kernels (the dropout keep-mask, QLoRA's 4-bit dequantize); when it cannot be built, a warning says so and the
torch backend computes the same values with torch ops, much slower.

``peftkern._C`` is built with nvcc through ninja when nvcc is found (``$CUDA_HOME/bin``, ``PATH``, or
``/usr/local/cuda/bin``), and skipped when it is not or when ``PEFTKERN_NO_CUDA=1``. No torch is involved:
the module links the CUDA runtime statically (``-cudart static``) and imports on machines without one.

Environment:
    PEFTKERN_CUDA_ARCHS   ";"-separated compute capabilities, default "80;90a" ("90a" is Hopper's own target)
    PEFTKERN_NO_CUDA=1    build no extension
    MAX_JOBS              parallel compile jobs (default: ninja's)
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
# Every csrc/*.cu is a kernel translation unit (nvcc; one per op and dtype, so they compile in parallel) and
# every csrc/bindings*.cpp a pybind11 unit (the host compiler): a new op adds files, not entries here.
KERNEL_SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))
HOST_SOURCES = sorted(p.name for p in CSRC.glob("bindings*.cpp"))
DEFAULT_ARCHS = "80;90a"


def find_nvcc() -> str | None:
    """The nvcc to build with, or None when there is none or PEFTKERN_NO_CUDA is set."""
    if os.environ.get("PEFTKERN_NO_CUDA", "0") not in ("", "0"):
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for "80;90a": machine code for each, plus PTX of the lowest plain arch so that
    newer GPUs can JIT it (arch-specific targets such as 90a have no forward-compatible PTX)."""
    names = [a.strip().removeprefix("sm_") for a in re.split(r"[;, ]+", archs) if a.strip()]
    if not names:
        raise ValueError(f"PEFTKERN_CUDA_ARCHS: expected compute capabilities like '80;90a', got {archs!r}")
    flags = []
    for name in names:
        if not re.fullmatch(r"\d{2,3}[af]?", name):
            raise ValueError(
                f"PEFTKERN_CUDA_ARCHS: expected entries like 80 or 90a, got {name!r} in {archs!r}"
            )
        flags.append(f"-gencode=arch=compute_{name},code=sm_{name}")
    plain = sorted(int(n) for n in names if n.isdigit())
    if plain:
        flags.append(f"-gencode=arch=compute_{plain[0]},code=compute_{plain[0]}")
    return flags


def cuda_include_dirs(nvcc: str) -> list[Path]:
    """Where cuda_runtime_api.h is, for the host compiler: as nvcc reports it (nvcc may be a wrapper script
    outside the toolkit), else beside nvcc, else CUDA_HOME."""
    found: list[Path] = []
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if "INCLUDES=" in line:
                found += [Path(p[2:]) for p in shlex.split(line.split("=", 1)[1]) if p.startswith("-I")]
    except (OSError, subprocess.SubprocessError):
        pass
    found.append(Path(nvcc).resolve().parent.parent / "include")
    if os.environ.get("CUDA_HOME"):
        found.append(Path(os.environ["CUDA_HOME"]) / "include")
    found = [p for p in found if (p / "cuda_runtime_api.h").is_file()]
    if not found:
        raise RuntimeError(f"peftkern._C: cannot find cuda_runtime_api.h for nvcc {nvcc}; set CUDA_HOME")
    return found[:1]


class NvccBuildExt(build_ext):
    """Builds peftkern._C: the kernel units with nvcc, the pybind11 bindings with the host C++ compiler
    (nvcc never sees pybind11), linked by nvcc with the static CUDA runtime. Through ninja when it is
    installed (parallel, incremental), else a thread pool."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "peftkern._cpu":
            return self._build_cpu_extension(ext)
        if ext.name != "peftkern._C":
            return super().build_extension(ext)
        import pybind11

        nvcc = find_nvcc()
        archs = os.environ.get("PEFTKERN_CUDA_ARCHS", DEFAULT_ARCHS)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "peftkern_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        includes = [CSRC / "include", CSRC, *cuda_include_dirs(nvcc)]
        include_flags = [f"-I{p}" for p in includes]
        nvcc_flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode_flags(archs)]
        cxx = os.environ.get("CXX", "c++")
        py_include = sysconfig.get_paths()["include"]
        cxx_flags = [
            "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden",
            f"-I{pybind11.get_include()}", f"-I{py_include}", f'-DPEFTKERN_CUDA_ARCHS="{archs}"',
        ]

        compile_jobs = []  # (output, command, depfile)
        for source in KERNEL_SOURCES:
            obj = build_dir / (source + ".o")
            cmd = [nvcc, "-c", str(CSRC / source), "-o", str(obj), *nvcc_flags, *include_flags,
                   "-MD", "-MF", f"{obj}.d"]
            compile_jobs.append((obj, cmd))
        for source in HOST_SOURCES:
            obj = build_dir / (source + ".o")
            cmd = [cxx, "-c", str(CSRC / source), "-o", str(obj), *cxx_flags, *include_flags,
                   "-MMD", "-MF", f"{obj}.d"]
            compile_jobs.append((obj, cmd))
        link = [nvcc, "-shared", *[str(o) for o, _ in compile_jobs], "-o", str(out), "-cudart", "static"]

        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg

                ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
            except ImportError:
                ninja = None
        if ninja is not None:
            self._run_ninja(ninja, build_dir, compile_jobs, link, out)
        else:
            self._run_pool(compile_jobs, link)

    def _build_cpu_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args, ext.extra_link_args = ["/O2", "/std:c++17"], []
        try:
            import pybind11

            ext.include_dirs = [*ext.include_dirs, pybind11.get_include()]
            super().build_extension(ext)
        except (ImportError, CCompilerError, BaseError, OSError) as error:
            warnings.warn(
                f"peftkern._cpu was not built ({error}); the torch backend's dropout and 4-bit dequantize fall "
                "back to torch ops (the same values; the masks about 50x slower, the dequantize 10x or more)",
                stacklevel=1,
            )
            # Nothing to install for it: an editable install would otherwise fail copying the missing file.
            self.extensions = [e for e in self.extensions if e is not ext]

    def _run_ninja(self, ninja: str, build_dir: Path, compile_jobs, link: list[str], out: Path) -> None:
        lines = [
            "ninja_required_version = 1.3",
            "rule compile",
            "  command = $cmd",
            "  description = compile $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            "  command = $cmd",
            "  description = link $out",
        ]
        for obj, cmd in compile_jobs:
            source = cmd[2]
            lines += [f"build {_ninja_escape(str(obj))}: compile {_ninja_escape(source)}",
                      f"  cmd = {_ninja_escape(shlex.join(cmd))}"]
        objs = " ".join(_ninja_escape(str(o)) for o, _ in compile_jobs)
        lines += [f"build {_ninja_escape(str(out))}: link {objs}",
                  f"  cmd = {_ninja_escape(shlex.join(link))}"]
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        command = [ninja, "-C", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            command += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(command, check=True)

    def _run_pool(self, compile_jobs, link: list[str]) -> None:
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for result in pool.map(lambda job: subprocess.run(job[1], check=True), compile_jobs):
                del result
        subprocess.run(link, check=True)


def _ninja_escape(text: str) -> str:
    return text.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def extensions() -> list[Extension]:
    cpu = Extension(
        "peftkern._cpu",
        sources=[f"csrc/cpu/{p.name}" for p in sorted((CSRC / "cpu").glob("*.cpp"))],
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-pthread", "-ffp-contract=off"],
        extra_link_args=["-pthread"],
        language="c++",
    )
    if find_nvcc() is None:
        return [cpu]
    sources = [f"csrc/{s}" for s in KERNEL_SOURCES + HOST_SOURCES]
    return [cpu, Extension("peftkern._C", sources=sources)]


setup(ext_modules=extensions(), cmdclass={"build_ext": NvccBuildExt})
