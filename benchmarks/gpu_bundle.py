"""Build ``.gpu-bundle/`` on a CPU machine, so that ``make gpu-check`` compiles nothing on the GPU machine.

    make gpu-bundle     # everything below; at most 30 minutes on 2 cores (the CUDA build is incremental)

What it holds (``manifest.json`` lists it all, with versions):
  peftkern/_C.cpython-312-*.so, _cpu.cpython-312-*.so   built by setup.py with this machine's nvcc for
                        PEFTKERN_CUDA_ARCHS (default "90a;80") against the GPU machines' Python (3.12)
  triton-cache/         every Triton kernel specialization and autotune config that benchmarks/gpu_check.py
                        launches, compiled for sm_90 by triton 3.6.0 (the GPU machines' version) through
                        the stand-in driver of tests/_triton_compile.py (nothing runs), binaries only
  manifest.json

Why the keys match. Triton finds a compiled kernel by a hash of: its own key (triton_key(): the version, the
sha256 of its Python sources and of libtriton.so), the kernel's source, the specialization (argument
dtypes; pointers 16-byte aligned or not; integers == 1 or divisible by 16), constexprs, the options
(warps, stages, target arch) and the backend (ptxas version, sm_90). The plan's steps run here in *walk*
mode: the same code at the same shapes and dtypes on CPU tensors (fresh tensors are 16-byte aligned here as
on the GPU), so the launches are the same launches. Random values differ (CPU and CUDA generators), which
does not matter: no launch argument depends on tensor values, since ours read no device value on the host
on CUDA (``host_syncs`` 0 in benchmarks/results/static/ops.json; the walk takes CUDA's defaults).
One part differs by construction: libtriton.so of the
cp312 wheel (the GPU machines' Python) is not that of the cp311 one this process runs, so the key is
computed with the cp312 wheel's libtriton hash, read from its RECORD after checking that every hashed
Python source is byte-identical in both wheels. Triton also stores absolute paths in its cache groups:
gpu_check.py rewrites them where the cache lands (``relocate_cache``).

    python benchmarks/gpu_bundle.py --compile --bundle .gpu-bundle [--jobs 2]   # the Triton cache
    python benchmarks/gpu_bundle.py --keys --bundle .gpu-bundle --report F      # the dry run's key check
    python benchmarks/gpu_bundle.py --manifest --bundle .gpu-bundle             # manifest.json

``--compile`` and ``--keys`` need triton 3.6.0 first on PYTHONPATH (.triton-compat/3.6.0) and
TRITON_INTERPRET unset; the Makefile sets both.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPAT = REPO / ".triton-compat" / "3.6.0"
WHEELS = REPO / ".triton-compat" / "wheels"
TARGET_PYTHON = "cp312"
ARCHIVE = "triton-cache.tar.xz"
BUILD_CACHE = REPO / ".gpu-bundle-build" / "triton-cache"
ARCH = 90


# ---- the GPU machines' triton_key ---------------------------------------------------------------------


def _record(lines: list[str]) -> dict[str, str]:
    """RECORD path -> sha256 hex."""
    hashes = {}
    for line in lines:
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            digest = parts[1].removeprefix("sha256=")
            hashes[parts[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return hashes


def target_wheel() -> Path:
    found = sorted(WHEELS.glob(f"triton-3.6.0-{TARGET_PYTHON}-*.whl"))
    if not found:
        raise SystemExit(f"gpu_bundle: no triton 3.6.0 {TARGET_PYTHON} wheel in {WHEELS} (make gpu-bundle "
                         "downloads it with pip download)")
    return found[0]


@functools.cache
def target_triton_key() -> tuple[str, str]:
    """(the triton_key() the GPU machines' triton computes, why it can be trusted): this process's key with
    libtriton.so's hash replaced by the cp312 wheel's, after checking every other hashed file is identical."""
    import triton
    from triton.runtime.cache import triton_key

    if triton.__version__ != "3.6.0":
        raise SystemExit(f"gpu_bundle: needs triton 3.6.0 first on PYTHONPATH, got {triton.__version__}")
    local_record = next(Path(triton.__file__).parent.parent.glob("triton-3.6.0.dist-info/RECORD"))
    local = _record(local_record.read_text().splitlines())
    with zipfile.ZipFile(target_wheel()) as wheel:
        target = _record(wheel.read("triton-3.6.0.dist-info/RECORD").decode().splitlines())
    hashed = [p for p in target if p.endswith(".py") and p.split("/")[1:2] in (["compiler"], ["backends"],
                                                                               ["language"])]
    # triton_key()'s frontend file; the options' libdevice (hashed by content) and the backend's ptxas version.
    hashed += ["triton/runtime/cache.py", "triton/backends/nvidia/bin/ptxas"]
    hashed += [p for p in target if p.startswith("triton/backends/nvidia/lib/")]
    different = [p for p in hashed if local.get(p) != target.get(p)]
    if different:
        raise SystemExit(f"gpu_bundle: the cp312 wheel's sources differ from this triton's: {different[:5]}")
    library = "triton/_C/libtriton.so"
    mine = triton_key()
    if mine.count(local[library]) != 1:
        raise SystemExit("gpu_bundle: libtriton.so's hash is not once in triton_key(): layout changed")
    return mine.replace(local[library], target[library]), f"{len(hashed)} sources identical; libtriton from the wheel"


def use_target_key() -> str:
    from triton.runtime import cache

    key, _ = target_triton_key()
    cache.triton_key = lambda: key
    return key


# ---- walking the plan -------------------------------------------------------------------------------------


def _plan_steps(only: list[str] | None, shard: tuple[int, int]):
    import gpu_check

    chosen = [s for s in gpu_check.PLAN if only is None or any(s.name.startswith(p) for p in only)]
    return [s for i, s in enumerate(chosen) if i % shard[1] == shard[0]]


@contextlib.contextmanager
def _walking():
    """The stand-in sm_90 driver, every autotune config, products skipped (perf_report's counting)."""
    import perf_report

    with perf_report.counting(perf_report.Count(), ARCH, first_config=False, record=lambda *_: None):
        yield


def walk(only: list[str] | None, shard: tuple[int, int], log) -> dict[str, dict]:
    import gpu_check
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        ctx = gpu_check.Context("walk", torch.device("cpu"), Path(scratch))
        for item in _plan_steps(only, shard):
            start = time.perf_counter()
            with _walking():
                result = gpu_check._run_step(ctx, item)
            results[item.name] = result
            log(f"{item.name}: {result['status']} {time.perf_counter() - start:.0f} s "
                f"{result.get('error', '')[:300]}")
    return results


def key_check(has, only: list[str] | None, log, read=None) -> dict:
    """Every launch of the plan: its cache key (as triton computes it on the GPU machine) and whether
    ``has(relative path)`` finds its cache entry (group, metadata, cubin); nothing compiled."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import _base32, get_cache_key
    from triton.runtime.jit import JITFunction

    try:
        use_target_key()
        basis = f"triton_key of the {TARGET_PYTHON} wheel"
    except SystemExit as error:  # no wheel (a checkout without a bundle): every launch is missing anyway
        basis = f"this triton's own triton_key ({error})"
        log(f"key basis: {basis}")
    seen: dict[str, tuple[str, bool]] = {}
    launchers: set[str] = set()

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        _, _, target, backend, _ = self.device_caches[device]
        src = self.ASTSource(self, signature, constexprs, attrs)
        parsed = backend.parse_options(dict(options.__dict__, **src.parse_options()))
        digest = hashlib.sha256(get_cache_key(src, backend, parsed, get_cache_invalidating_env_vars())
                                .encode()).hexdigest()
        folder, name = _base32(digest), src.name[:150]
        present = all(has(f"{folder}/{file}") for file in (f"__grp__{name}.json", f"{name}.json", f"{name}.cubin"))
        constants = {self.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
        pointers = ",".join(v for v in signature.values() if str(v).startswith("*"))
        seen[folder] = (f"{name} warps={parsed.num_warps} stages={parsed.num_stages} pointers {pointers} "
                        f"{constants}", present)
        if present and read is not None:  # the host launcher the GPU machine builds for this kernel
            launchers.add(launcher_source(src, json.loads(read(f"{folder}/{name}.json"))))
        return None  # nothing compiled, nothing launched

    original = JITFunction._do_compile
    JITFunction._do_compile = do_compile
    try:
        steps = walk(only, (0, 1), log)
    finally:
        JITFunction._do_compile = original
    return {"launches": len(seen), "key_basis": basis, "folders": sorted(seen), "launcher_sources": sorted(launchers),
            "missing": sorted(what for what, present in seen.values() if not present),
            "steps": {n: r["status"] for n, r in steps.items()},
            "step_errors": {n: r.get("error") for n, r in steps.items() if r["status"] == "error"}}


def launcher_source(src, metadata: dict) -> str:
    """The C source of the host launcher triton 3.6 generates for a compiled kernel (CudaLauncher)."""
    from triton.backends.nvidia.driver import make_launcher

    arg_index = lambda x: (src.fn.arg_names.index(x), ) if isinstance(x, str) else x
    constants = {arg_index(k): v for k, v in getattr(src, "constants", {}).items()}
    return make_launcher(constants, dict(src.signature), metadata.get("tensordesc_meta"))


def host_modules(sources: list[str]) -> list[tuple[str, str]]:
    """(module name, C source) of every host module the GPU machine's triton would compile: the driver's
    cuda_utils, and one __triton_launcher per kernel signature."""
    from triton.backends.nvidia import driver

    return [("cuda_utils", (Path(driver.dirname) / "driver.c").read_text())] + \
        [("__triton_launcher", source) for source in sources]


def build_host_modules(cache: Path, modules: list[tuple[str, str]], py_include: str, ext_suffix: str,
                       log) -> list[str]:
    """Compile each host module for the GPU machines' Python into ``cache`` where triton looks for it
    (key: sha256 of the source and the platform; file: name + that Python's EXT_SUFFIX); returns the
    cache folders. libcuda.so.1 is linked through an empty stand-in, kept as NEEDED (--no-as-needed): the
    driver's symbols resolve against the real one when the module is loaded there."""
    from triton.backends.nvidia import driver
    from triton.runtime.build import platform_key
    from triton.runtime.cache import _base32

    stub = cache.parent / "libcuda-stub"
    stub.mkdir(parents=True, exist_ok=True)
    if not (stub / "libcuda.so.1").is_file():
        (stub / "empty.c").write_text("")
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub / "libcuda.so.1"),
                        str(stub / "empty.c")], check=True)
    folders, built = [], 0
    for name, source in modules:
        folder = _base32(hashlib.sha256((source + platform_key()).encode()).hexdigest())
        target = cache / folder / f"{name}{ext_suffix}"
        folders.append(folder)
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            c_file = Path(tmp) / f"{name}.c"
            c_file.write_text(source)
            out = Path(tmp) / target.name
            subprocess.run(["gcc", str(c_file), "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o", str(out),
                            "-Wl,--no-as-needed", "-l:libcuda.so.1", f"-L{driver.libdevice_dir}",
                            f"-L{stub}",
                            *[f"-I{d}" for d in driver.include_dirs], f"-I{tmp}", f"-I{py_include}"],
                           check=True, stdout=subprocess.DEVNULL)
            os.replace(out, target)
        built += 1
    log(f"host modules: {len(modules)} ({built} built now) for {ext_suffix}")
    return folders


def bundle_names(bundle: Path) -> set[str]:
    """The files in the bundle's packed cache (``<folder>/<file>``)."""
    archive = bundle / ARCHIVE
    if not archive.is_file():
        return set()
    with tarfile.open(archive) as tar:
        return {name for name in tar.getnames() if name.count("/") == 1}


def count_kernels(names) -> int:
    return sum(1 for name in names if name.split("/")[-1].startswith("__grp__"))


def pack(cache: Path, bundle: Path, only: list[str] | None, log, py_include: str | None,
         ext_suffix: str | None) -> dict:
    """Pack the cache entries the plan launches (found by their keys: nothing stale) into the bundle, with
    the host launchers built for the GPU machines' Python when its headers are given."""
    result = key_check(lambda rel: (cache / rel).is_file(), only, log, read=lambda rel: (cache / rel).read_text())
    if not result["key_basis"].startswith("triton_key of the"):
        raise SystemExit(f"gpu_bundle --pack: the GPU machines' cache keys cannot be computed: {result['key_basis']}")
    host = []
    if py_include and ext_suffix and not result["missing"]:
        host = build_host_modules(cache, host_modules(result["launcher_sources"]), py_include, ext_suffix, log)
    elif not result["missing"]:
        log("host launchers not prebuilt (no --py-include / --ext-suffix): the GPU machine builds them")
    result["host_modules"] = len(host)
    if result["missing"]:
        return {**result, "step_errors": {**result["step_errors"], "pack": f"{len(result['missing'])} launches "
                                          "not compiled (run --compile first)"}}
    bundle.mkdir(parents=True, exist_ok=True)
    tmp = bundle / (ARCHIVE + ".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for folder in result["folders"]:
            for path in sorted((cache / folder).iterdir()):
                if path.suffix in (".json", ".cubin"):  # the rest (IR, source) is not read on a hit
                    tar.add(path, arcname=f"{folder}/{path.name}")
        for folder in host:
            for path in sorted((cache / folder).glob(f"*{ext_suffix}")):
                tar.add(path, arcname=f"{folder}/{path.name}")
    os.replace(tmp, bundle / ARCHIVE)
    result.pop("launcher_sources")
    return {**result, "bundle_compiles": count_kernels(bundle_names(bundle))}


def compile_plan(cache: Path, only: list[str] | None, shard: tuple[int, int], log) -> dict:
    """Compile every launch of the plan into ``cache`` (TRITON_CACHE_DIR, set before triton was imported)."""
    import triton

    use_target_key()
    counts = {"compiled": 0, "hits": 0}

    def listener(src, metadata, metadata_group, times, cache_hit, **_):
        counts["hits" if cache_hit else "compiled"] += 1

    triton.knobs.compilation.listener = listener
    steps = walk(only, shard, log)
    return {**counts, "steps": {n: r["status"] for n, r in steps.items()},
            "step_errors": {n: r.get("error") for n, r in steps.items() if r["status"] == "error"}}


# ---- manifest -----------------------------------------------------------------------------------------------


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable: {error}"


def manifest(bundle: Path, extra: dict) -> dict:
    import gpu_check
    import perf_report
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    key = use_target_key()
    names = bundle_names(bundle)
    kernels: dict[str, int] = {}
    for name in names:
        base = name.split("/")[-1]
        if base.startswith("__grp__"):
            kernel = base.removeprefix("__grp__").removesuffix(".json")
            kernels[kernel] = kernels.get(kernel, 0) + 1
    files = [p for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json"]
    nvcc = _run(["nvcc", "--version"])
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "source_sha256": perf_report.source_sha256(),
        "triton": triton.__version__, "triton_python": TARGET_PYTHON,
        "triton_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "triton_key_basis": target_triton_key()[1],
        "target": f"cuda sm_{ARCH}, warp 32", "ptxas": get_ptxas_version(ARCH).strip().splitlines()[-1],
        "nvcc": nvcc.splitlines()[-1] if nvcc else None,
        "cuda_archs": os.environ.get("PEFTKERN_CUDA_ARCHS", "90a;80"),
        "extensions": sorted(p.name for p in (bundle / "peftkern").glob("*.so")),
        "kernels": count_kernels(names), "kernel_names": dict(sorted(kernels.items())),
        "host_modules": sorted({n.split("/")[-1] for n in names if n.endswith(".so")}),
        "host_module_count": sum(1 for n in names if n.endswith(".so")),
        "plan": [s.name for s in gpu_check.PLAN],
        "size_bytes": sum(p.stat().st_size for p in files), "files": len(files), **extra,
    }


# ---- command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compile", action="store_true", help="compile the plan's launches into --cache")
    mode.add_argument("--pack", action="store_true", help="pack the plan's entries of --cache into the bundle")
    mode.add_argument("--keys", action="store_true", help="look the plan's launches up in the bundle")
    mode.add_argument("--manifest", action="store_true", help="write manifest.json")
    parser.add_argument("--bundle", type=Path, default=REPO / ".gpu-bundle")
    parser.add_argument("--cache", type=Path, default=BUILD_CACHE, help="the unpacked cache compiled into")
    parser.add_argument("--only", nargs="+", default=None, help="step name prefixes")
    parser.add_argument("--jobs", type=int, default=1, help="--compile: processes (each walks every n-th step)")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--py-include", default=None, help="--pack: the GPU machines' Python headers")
    parser.add_argument("--ext-suffix", default=None, help="--pack: that Python's EXT_SUFFIX")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("gpu_bundle: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    cache = args.cache.resolve()
    start = time.perf_counter()
    log = lambda text: print(f"[gpu-bundle {time.perf_counter() - start:6.1f}s] {text}", flush=True)

    if args.compile and args.jobs > 1:  # n processes over the steps; Triton's cache writes are atomic
        cache.mkdir(parents=True, exist_ok=True)
        reports = [Path(tempfile.mkstemp(suffix=".json")[1]) for _ in range(args.jobs)]
        children = [subprocess.Popen([sys.executable, __file__, "--compile", "--cache", str(cache),
                                      "--shard", f"{i}/{args.jobs}", "--report", str(reports[i])]
                                     + (["--only", *args.only] if args.only else [])) for i in range(args.jobs)]
        codes = [child.wait() for child in children]
        merged = {"compiled": 0, "hits": 0, "steps": {}, "step_errors": {}}
        for report in reports:
            part = json.loads(report.read_text()) if report.stat().st_size else {}
            report.unlink()
            for k in ("compiled", "hits"):
                merged[k] += part.get(k, 0)
            merged["steps"].update(part.get("steps", {}))
            merged["step_errors"].update(part.get("step_errors", {}))
        merged["seconds"] = round(time.perf_counter() - start, 1)
        log(f"{merged['compiled']} compiled, {merged['hits']} already there, "
            f"{len(merged['step_errors'])} step errors")
        if args.report:
            args.report.write_text(json.dumps(merged, indent=1))
        return 1 if any(codes) or merged["step_errors"] else 0

    if args.compile:
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TRITON_CACHE_DIR"] = str(cache)
        os.environ["TRITON_STORE_BINARY_ONLY"] = "1"  # cubin + metadata: no IR (not part of the key)
    sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]
    shard = tuple(int(x) for x in args.shard.split("/"))
    if args.compile:
        result = compile_plan(cache, args.only, shard, log)
        log(f"shard {args.shard}: {result['compiled']} compiled, {result['hits']} already there")
    elif args.pack:
        result = pack(cache, args.bundle, args.only, log, args.py_include, args.ext_suffix)
        log(f"packed {result.get('bundle_compiles', 0)} kernels of {result['launches']} distinct launches into "
            f"{args.bundle / ARCHIVE}; {len(result['missing'])} not compiled")
    elif args.keys:
        names = bundle_names(args.bundle)
        result = key_check(names.__contains__, args.only, log)
        result["bundle_compiles"] = count_kernels(names)
        result["launcher_sources"] = len(result["launcher_sources"])
        log(f"{result['launches']} distinct launches, {len(result['missing'])} not in the bundle "
            f"({result['bundle_compiles']} kernels there)")
    else:
        result = manifest(args.bundle, json.loads(args.extra))
        (args.bundle / "manifest.json").write_text(json.dumps(result, indent=1) + "\n")
        log(f"manifest: {result['kernels']} kernels, {result['size_bytes'] / 2**20:.1f} MiB, "
            f"{result['extensions']}")
    if args.report:
        args.report.write_text(json.dumps(result, indent=1, default=str))
    return 1 if result.get("step_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
