"""The CUDA C++ backend: the extension peftkern._C, its status reporting, the vendoring example, and (on a
GPU) lora_linear on backend "cuda" against the float64 reference, outputs and every gradient."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import _emulator
import pytest
import torch
from _helpers import (
    DTYPES,
    EXTENSION_PRESENT,
    assert_close,
    assert_graph_replay_follows,
    cuda_ext,
    make_lora_inputs,
    needs_extension,
)

import peftkern
from peftkern import backends, reference
from peftkern.backends import cuda_backend_available, cuda_backend_status, resolve_backend

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
)
# The install builds the extension wherever nvcc is found, unless PEFTKERN_NO_CUDA is set.
SHOULD_BE_BUILT = NVCC is not None and os.environ.get("PEFTKERN_NO_CUDA", "0") in ("", "0")
HAS_GPU = torch.cuda.is_available()

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc here")


# ---- CPU: the build, the status, the errors ----------------------------------------------------------------


@pytest.mark.skipif(not SHOULD_BE_BUILT, reason="no nvcc here (or PEFTKERN_NO_CUDA=1): nothing to build")
def test_extension_is_built_and_imports():
    assert EXTENSION_PRESENT, "nvcc is here but peftkern._C was not built: reinstall with `make install`"
    ext = cuda_ext()
    assert isinstance(ext.cuda_archs, str) and ext.cuda_archs
    assert ext.cudart_version >= 11000
    assert (ext.FLOAT16, ext.BFLOAT16, ext.FLOAT32) == (0, 1, 2)


@pytest.mark.skipif(HAS_GPU, reason="checks the report on a machine without a GPU")
def test_status_reports_why_the_backend_cannot_run_here():
    status = cuda_backend_status()
    assert status.startswith("unavailable: ")
    if EXTENSION_PRESENT:
        assert "no CUDA device" in status
        assert cuda_ext().cuda_archs in status
    else:
        assert "not built" in status
    assert cuda_backend_available() is False


@pytest.fixture
def fresh_extension_cache():
    backends._load_cuda_extension.cache_clear()
    yield
    backends._load_cuda_extension.cache_clear()


def test_status_when_the_extension_is_missing_or_unloadable(monkeypatch, fresh_extension_cache):
    """A missing or broken binary is reported, never raised at import, and the cuda backend names it."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "peftkern._C" else real_find_spec(name, *a),
    )
    assert "unavailable: the CUDA C++ extension peftkern._C is not built" in cuda_backend_status()
    assert not cuda_backend_available()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run: .*not built"):
        backends.cuda_extension()
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    backends._load_cuda_extension.cache_clear()

    real_import = importlib.import_module

    def broken_import(name, *args):
        if name == "peftkern._C":
            raise ImportError("libcuda.so.1: undefined symbol cuFoo")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken_import)
    if importlib.util.find_spec("peftkern._C") is None:
        pytest.skip("peftkern._C is not built here: the load-failure path needs a binary to find")
    status = cuda_backend_status()
    assert status.startswith("unavailable: the CUDA C++ extension peftkern._C failed to load: ImportError: ")
    assert "undefined symbol cuFoo" in status
    assert not cuda_backend_available()


@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a GPU")
def test_choosing_the_cuda_backend_raises_a_clear_error():
    # A CUDA device name is enough to reach the availability check; nothing is allocated on it.
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run: unavailable: "):
        resolve_backend(torch.device("cuda"), "lora_linear", "cuda")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        peftkern.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), backend="cuda")
    with peftkern.use_backend("cuda"), pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        peftkern.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2))


@needs_extension
def test_host_philox_is_the_reference_stream_bit_for_bit():
    """The kernels' Philox function, run on the host, against reference.philox_uniform (= tl.rand)."""
    ext = cuda_ext()
    offsets = list(range(0, 2000, 7)) + [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62 + 11]
    for seed in (0, 1, 1234, 2**32 - 1, 2**32 + 7, 0x123456789ABC, 2**62 - 1):
        got = torch.tensor(ext.philox_uniform(seed, offsets), dtype=torch.float32)
        expected = reference.philox_uniform(seed, torch.tensor(offsets, dtype=torch.int64))
        assert torch.equal(got, expected), f"seed {seed}: {(got != expected).nonzero()[:5].tolist()}"
        assert bool(((got >= 0) & (got < 1)).all())


@needs_extension
def test_bindings_check_arguments_before_any_launch():
    ext = cuda_ext()
    good = dict(
        dtype=ext.FLOAT16, adapter_dtype=ext.FLOAT16, x=16, x_strides=(8, 1), weight=16,
        weight_strides=(8, 1), bias=0, bias_stride=0, lora_a=16, lora_a_strides=(8, 1), lora_b=16,
        lora_b_strides=(2, 1), s=16, y=16, y_strides=(4, 1), M=3, N=4, K=8, R=2, scaling=1.0, dropout_p=0.0,
        seed=0, device=0, stream=0,
    )
    cases = [
        ({"dtype": 7}, r"dtype: expected a code in"),
        ({"adapter_dtype": ext.BFLOAT16}, r"adapter_dtype: expected the activation dtype \(float16\)"),
        ({"R": 0}, r"R: expected rank >= 1, got 0"),
        ({"M": -1}, r"sizes: expected M, N, K >= 0"),
        ({"dropout_p": 1.0}, r"dropout_p: expected a probability in \[0, 1\)"),
        ({"dropout_p": 0.5, "seed": 0}, r"seed: expected the address of an int64 seed"),
        ({"x": 0}, r"x: expected a device address, got 0 for a \[3, 8\] matrix"),
        ({"s": 0}, r"s: expected a device address"),
        ({"device": -1}, r"device: expected a CUDA device index >= 0"),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ext.lora_forward(**{**good, **override})
    # M == 0 is a no-op that touches no device (so it works even here).
    assert ext.lora_forward(**{**good, "M": 0, "x": 0, "s": 0, "y": 0}) is None
    with pytest.raises(ValueError, match=r"workspace: expected at least \d+ floats"):
        ext.lora_backward(
            ext.FLOAT32, ext.FLOAT32, 16, (4, 1), 16, (8, 1), 16, (8, 1), 16, (8, 1), 16, (2, 1), 16, 0,
            (0, 0), 16, 16, 16, 1, 3, 4, 8, 2, 1.0, 0.0, 0, 0, 0,
        )
    assert ext.lora_backward_workspace_floats(3, 4, 8, 2) > 3 * 2


@needs_nvcc
def test_vendoring_example_compiles_and_runs_where_it_can(tmp_path):
    """The header-only example builds with nvcc alone (one arch, to stay quick); it runs only on a GPU."""
    binary = tmp_path / "lora_forward_example"
    build = subprocess.run(
        [NVCC, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}", "-gencode=arch=compute_80,code=sm_80",
         str(ROOT / "csrc" / "examples" / "lora_forward_example.cu"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    if HAS_GPU:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "0 out of tolerance" in run.stdout
    else:
        assert run.returncode == 2, run.stdout + run.stderr
        assert "no CUDA device here" in run.stdout


@needs_nvcc
def test_two_vendored_copies_and_the_c_api_build_into_one_program(tmp_path):
    """csrc/examples/vendored_twice_example.cu includes the headers twice, under two PEFTKERN_ABI_NAMESPACEs (the
    second copy in a folder of its own, as `make cuda-example` lays it out), and the C API from the first;
    it compiles for sm_90a with nvcc alone and runs only on a GPU."""
    second = tmp_path / "vendor" / "peftkern_b"
    second.mkdir(parents=True)
    for header in (ROOT / "csrc" / "include" / "peftkern").iterdir():
        (second / header.name).write_text("// vendored copy B of peftkern\n" + header.read_text())
    binary = tmp_path / "vendored_twice_example"
    build = subprocess.run(
        [NVCC, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}", f"-I{tmp_path / 'vendor'}",
         "-gencode=arch=compute_90a,code=sm_90a", str(ROOT / "csrc" / "examples" / "vendored_twice_example.cu"),
         "-o", str(binary)],
        capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    symbols = subprocess.run(["nm", "-C", str(binary)], capture_output=True, text=True).stdout
    for copy in ("copy_a", "copy_b"):  # each copy's kernels are symbols of their own
        assert f"peftkern::{copy}::multi_lora_detail::shrink_rows_kernel" in symbols, copy
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    if HAS_GPU:
        assert run.returncode == 0 and "0 out of tolerance" in run.stdout, run.stdout + run.stderr
    else:
        assert run.returncode == 2 and "no CUDA device here" in run.stdout, run.stdout + run.stderr


@needs_nvcc
def test_c_api_header_is_plain_c(tmp_path):
    """peftkern_c.h compiles as C (for FFI callers): its enum codes are the bindings' dtype codes."""
    include = _emulator.cuda_include_dir()
    if include is None or shutil.which("gcc") is None:
        pytest.skip("no gcc or CUDA include directory")
    program = tmp_path / "c_api.c"
    program.write_text(
        "#include <peftkern/peftkern_c.h>\n"
        "_Static_assert(PEFTKERN_FLOAT16 == 0 && PEFTKERN_BFLOAT16 == 1 && PEFTKERN_FLOAT32 == 2, \"codes\");\n"
        "int main(void) { peftkern_segments s = {0}; return (int)s.n_tiles; }\n"
    )
    result = subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-Werror", "-fsyntax-only", f"-I{ROOT / 'csrc' / 'include'}", f"-I{include}",
         str(program)], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if EXTENSION_PRESENT:
        ext = cuda_ext()
        assert (ext.FLOAT16, ext.BFLOAT16, ext.FLOAT32) == (0, 1, 2)


def test_serving_kernels_have_no_data_race_under_thread_sanitizer(tmp_path):
    """lora_serving.cuh's program (segment table, decode / tiled / tensor-core shrinks, expand-add) under
    ThreadSanitizer: each emulated CUDA thread is a host thread, so a shared-memory access that no
    __syncthreads orders against another thread's write is reported as a data race (the emulator's racecheck)."""
    binary = _emulator.build(tmp_path, "lora_serving_emulated", sanitizer="thread")
    result = subprocess.run([str(binary), "--quick"], capture_output=True, text=True, timeout=1200)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[:4000]
    assert result.returncode == 0 and result.stdout.strip().endswith("0 failures"), result.stdout[-2000:]


def test_emulator_build_fails_without_the_sanitizer_runtimes(tmp_path, monkeypatch):
    """A missing libasan / libubsan fails the build loudly; it never falls back to an unsanitized program."""
    if not _emulator.AVAILABLE:
        pytest.skip("needs the CUDA headers (nvcc) and g++")
    real_run, compiles = subprocess.run, []

    def run_without_asan(command, *args, **kwargs):
        if command[0] == "g++":
            compiles.append(command)
            return subprocess.CompletedProcess(command, 1, "", "/usr/bin/ld: cannot find -lasan: No such file")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(_emulator.subprocess, "run", run_without_asan)
    with pytest.raises(pytest.fail.Exception, match="AddressSanitizer and UBSan runtimes"):
        _emulator.build(tmp_path, "lora_emulated")
    assert len(compiles) == 1 and "-fsanitize=address,undefined" in compiles[0]


def test_kernels_on_the_cpu_emulator_match_float64_and_stay_in_bounds(tmp_path):
    """No GPU here, so run the header's launchers on a CPU emulation of the CUDA model
    (tests/cuda_emulator): one thread per CUDA thread, buffers sized exactly to their strides, under
    AddressSanitizer. Covers every index, guard, stride path, dropout counter and partial-sum reduction of
    forward and backward, for fp32, fp16 with fp32 adapters and bf16, with WMMA emulated per thread (its
    pointer alignment and ldm rules checked). Not covered: real asynchronous copies and warp-level timing."""
    binary = _emulator.build(tmp_path, "lora_emulated")
    assert _emulator.emulated_headers(tmp_path)["lora.cuh"] >= 5
    # PEFTKERN_EMULATE_FULL=1: every shape x dtype pairing x layout (210 cases, minutes) instead of CI's 48.
    expected = "210 cases, 0 failures" if _emulator.FULL else "48 cases, 0 failures"
    assert _emulator.run(binary).strip().endswith(expected)


# ---- CPU: the default path's composition (cuBLAS base GEMM + serving shrink / expand-add) -----------------
# The launchers of lora_serving.cuh are checked on the emulator (test_lora_serving.py); here they are replaced
# by float64 row loops (peftkern.reference) that also assert the contract the real bindings impose, so that
# _cuda.lora_forward / lora_backward (dropout mask, transposed views, path choice, the small GEMMs, rounding)
# run on CPU tensors against the reference.


class CpuServingKernels:
    """Stand-ins for _cuda_multi_lora.lora_shrink / lora_expand_add on CPU tensors; records each call."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _check_batch(M, adapter_ids, ranks, L):
        assert adapter_ids.dtype == torch.int32 and tuple(adapter_ids.shape) == (M,)
        assert ranks.dtype == torch.int32 and tuple(ranks.shape) == (L,)

    def shrink(self, x, slices, adapter_ids, ranks, segments):
        M = x.shape[0]
        assert x.dtype in DTYPES and slices[0].dtype in (x.dtype, torch.float32)
        assert slices[0].ndim == 3 and slices[0].shape[2] == x.shape[1]
        self._check_batch(M, adapter_ids, ranks, slices[0].shape[0])
        if M <= 64:
            assert segments is None, "up to 64 rows the shrink must run the row-parallel decode kernel"
        else:  # the one-adapter table: tiles (0, start, end) whose 64-row windows cover every row once
            perm, tiles = segments
            assert perm.dtype == tiles.dtype == torch.int64 and torch.equal(perm, torch.arange(M))
            covered = torch.zeros(M, dtype=torch.int64)
            for adapter, start, end in tiles.t().tolist():
                assert adapter == 0
                covered[start:min(end, M, start + 64)] += 1
            assert torch.equal(covered, torch.ones(M, dtype=torch.int64))
        self.calls.append(("shrink", M, segments is not None))
        return reference.lora_shrink(x, slices, adapter_ids, ranks).to(torch.float32)

    def expand_add(self, y, s, slices, adapter_ids, scalings, ranks, offset):
        M = y.shape[0]
        assert y.dtype in DTYPES and slices[0].dtype in (y.dtype, torch.float32)
        assert s.dtype == torch.float32 and tuple(s.shape) == (len(slices), M, slices[0].shape[2])
        assert scalings.dtype == torch.float32 and offset == 0
        self._check_batch(M, adapter_ids, ranks, slices[0].shape[0])
        self.calls.append(("expand_add", M, y.dtype))
        reference.lora_expand_add(y, list(s), slices, adapter_ids, scalings, offset, ranks)


@pytest.fixture
def cpu_serving(monkeypatch):
    from types import SimpleNamespace

    from peftkern.ops import _cuda, _cuda_multi_lora

    kernels = CpuServingKernels()
    monkeypatch.setattr(_cuda_multi_lora, "lora_shrink", kernels.shrink)
    monkeypatch.setattr(_cuda_multi_lora, "lora_expand_add", kernels.expand_add)
    monkeypatch.setattr(_cuda, "cuda_extension", lambda: SimpleNamespace(FLOAT16=0, BFLOAT16=1, FLOAT32=2))
    monkeypatch.setattr(_cuda, "BASE_GEMM", None)
    monkeypatch.delenv("PEFTKERN_CUDA_BASE_GEMM", raising=False)
    return kernels


def run_default_path(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed=77, need_dx=True):
    """_cuda.lora_forward / lora_backward against the float64 reference and its autograd."""
    from peftkern.ops import _cuda

    seed_t = torch.tensor([seed], dtype=torch.int64) if dropout_p else None
    with torch.no_grad():
        y, s = _cuda.lora_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed_t)
        grad = torch.randn(y.shape).to(x.dtype)
        dx, da, db = _cuda.lora_backward(grad, x, weight, lora_a, lora_b, s, scaling, dropout_p, seed_t, need_dx)
    x64, w64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, weight, lora_a, lora_b))
    bias64 = None if bias is None else bias.detach().double()
    y64 = reference.lora_linear(x64, w64, bias64, a64, b64, scaling, dropout_p, seed=seed if dropout_p else None)
    y64.backward(grad.double())
    dtype = x.dtype
    assert y.dtype == dtype and s.dtype == torch.float32 and tuple(s.shape) == (x.shape[0], lora_a.shape[0])
    assert_close(y, y64, "y", dtype)
    assert da.dtype == lora_a.dtype and db.dtype == lora_b.dtype
    assert_close(da, a64.grad, "dA", dtype)
    assert_close(db, b64.grad, "dB", dtype)
    if need_dx:
        assert dx.dtype == dtype
        assert_close(dx, x64.grad, "dx", dtype)
    else:
        assert dx is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 17, 33, 1), (33, 65, 17, 16), (130, 33, 19, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_default_path_composes_cublas_and_the_serving_kernels(cpu_serving, dtype, shape, dropout_p):
    M, K, N, r = shape
    x, weight, bias, lora_a, lora_b = (
        t.detach() if t is not None else None for t in make_lora_inputs(M, K, N, r, dtype)
    )
    run_default_path(x, weight, bias, lora_a, lora_b, 0.75, dropout_p)
    tiled = M > 64
    # forward: one shrink (decode kernel up to 64 rows, else the tile table), one expand-add into y;
    # backward: the shrink of dY with B.T, one expand-add (into dX, or into an fp32 buffer with dropout).
    assert cpu_serving.calls == [
        ("shrink", M, tiled), ("expand_add", M, dtype),
        ("shrink", M, tiled), ("expand_add", M, torch.float32 if dropout_p else dtype),
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_default_path_fp32_adapters_transposed_views_no_dx(cpu_serving, dtype):
    M, K, N, r = 70, 40, 23, 6
    x, weight, bias, lora_a, lora_b = (
        t.detach() for t in make_lora_inputs(M, K, N, r, dtype, adapter_dtype=torch.float32)
    )
    wide = torch.randn(M, 2 * K).to(dtype)
    x_strided = wide[:, ::2]
    x_strided.copy_(x)
    w_t, a_t, b_t = (t.T.contiguous().T for t in (weight, lora_a, lora_b))
    assert not x_strided.is_contiguous() and a_t.stride() == (1, r)
    run_default_path(x_strided, w_t, None, a_t, b_t, 2.0, 0.2, need_dx=False)
    run_default_path(x_strided, w_t, bias, a_t, b_t, 0.0, 0.0)


def test_default_path_empty_batch_and_bad_s(cpu_serving):
    from peftkern.ops import _cuda

    x, weight, bias, lora_a, lora_b = (t.detach() for t in make_lora_inputs(1, 17, 9, 4, torch.float32))
    y, s = _cuda.lora_forward(x[:0], weight, bias, lora_a, lora_b, 1.0, 0.3, torch.tensor([5]))
    assert y.shape == (0, 9) and s.shape == (0, 4) and s.dtype == torch.float32
    dx, da, db = _cuda.lora_backward(y, x[:0], weight, lora_a, lora_b, s, 1.0, 0.3, torch.tensor([5]), True)
    assert dx.shape == (0, 17)
    assert torch.equal(da, torch.zeros_like(lora_a)) and torch.equal(db, torch.zeros_like(lora_b))
    assert cpu_serving.calls == []
    with pytest.raises(ValueError, match=r"s: expected a float32 \[1, 4\] tensor from the forward"):
        _cuda.lora_backward(torch.ones(1, 9), x, weight, lora_a, lora_b, torch.ones(1, 4, dtype=torch.float64),
                            1.0, 0.0, None, True)
    with pytest.raises(TypeError, match=r"x: backend 'cuda' supports float16, bfloat16 and float32"):
        _cuda.lora_forward(x.double(), weight.double(), None, lora_a.double(), lora_b.double(), 1.0, 0.0, None)


def test_fused_path_is_an_explicit_opt_in(cpu_serving, monkeypatch):
    from peftkern.ops import _cuda

    assert _cuda.base_gemm_path() == "cublas"
    calls = []
    monkeypatch.setattr(_cuda, "lora_forward_fused", lambda *args: calls.append("forward") or "fused forward")
    monkeypatch.setattr(_cuda, "lora_backward_fused", lambda *args: calls.append("backward") or "fused backward")
    monkeypatch.setenv("PEFTKERN_CUDA_BASE_GEMM", "fused")
    assert _cuda.base_gemm_path() == "fused"
    assert _cuda.lora_forward(*[None] * 8) == "fused forward"
    assert _cuda.lora_backward(*[None] * 10) == "fused backward"
    assert calls == ["forward", "backward"] and cpu_serving.calls == []
    monkeypatch.setattr(_cuda, "BASE_GEMM", "cublas")  # the module setting wins over the environment
    assert _cuda.base_gemm_path() == "cublas"
    monkeypatch.setattr(_cuda, "BASE_GEMM", "wmma")
    with pytest.raises(ValueError, match=r"PEFTKERN_CUDA_BASE_GEMM: expected one of \('cublas', 'fused'\), got 'wmma'"):
        _cuda.base_gemm_path()


# ---- GPU: every dtype and odd shape against the float64 reference ------------------------------------------

# (M, K, N, r): odd sizes, none a multiple of a tile (64 x 64 x 32, rank chunks of 16); ranks past one chunk.
SHAPES = [(1, 17, 33, 1), (17, 33, 17, 8), (33, 65, 65, 16), (65, 17, 1, 17), (130, 100, 70, 33)]


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True):
    return make_lora_inputs(M, K, N, r, dtype, adapter_dtype, bias, "cuda")


def run_and_compare(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed=1234):
    """Forward and backward on backend "cuda" and in float64 through the reference (same seed, so the same
    dropout mask); compare the output and every gradient."""
    y = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed=seed, backend="cuda")
    grad = torch.randn_like(y)
    y.backward(grad)

    x64, w64, a64, b64 = (
        t.detach().cpu().double().requires_grad_(t.requires_grad) for t in (x, weight, lora_a, lora_b)
    )
    bias64 = None if bias is None else bias.detach().cpu().double()
    y64 = reference.lora_linear(x64, w64, bias64, a64, b64, scaling, dropout_p, seed=seed)
    y64.backward(grad.cpu().double())

    dtype = x.dtype
    assert y.dtype == x.dtype and y.shape == y64.shape
    assert_close(y, y64, "y", dtype)
    if x.requires_grad:
        assert_close(x.grad, x64.grad, "dx", dtype)
    assert lora_a.grad.dtype == lora_a.dtype and lora_b.grad.dtype == lora_b.dtype
    assert_close(lora_a.grad, a64.grad, "dA", dtype)
    assert_close(lora_b.grad, b64.grad, "dB", dtype)


@pytest.mark.gpu
def test_status_reports_available_on_a_gpu():
    assert cuda_backend_available(), cuda_backend_status()
    assert cuda_backend_status().startswith("available: ")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_reference(dtype, shape, dropout_p, no_tf32):
    run_and_compare(*make_inputs(*shape, dtype), scaling=0.75, dropout_p=dropout_p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_fused_wmma_opt_in_matches_reference(dtype, shape, dropout_p, no_tf32, monkeypatch):
    """BASE_GEMM = "fused": lora.cuh's WMMA GEMM with the expand in its epilogue (the header-level option)."""
    from peftkern.ops import _cuda

    monkeypatch.setattr(_cuda, "BASE_GEMM", "fused")
    run_and_compare(*make_inputs(*shape, dtype), scaling=0.75, dropout_p=dropout_p)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 65, 300])
def test_default_path_decode_and_tiled_shrink_agree(M, no_tf32):
    """Up to 64 rows the row-parallel decode shrink, above them the tiled one: both the reference's s."""
    from peftkern.ops import _cuda

    x, weight, bias, lora_a, lora_b = (t.detach() for t in make_inputs(M, 200, 48, 24, torch.bfloat16))
    y, s = _cuda.lora_forward(x, weight, bias, lora_a, lora_b, 0.5, 0.0, None)
    expected = x.double() @ lora_a.double().T
    assert_close(s, expected, "s", torch.bfloat16)
    assert_close(y, (x.double() @ weight.double().T + bias.double()) + 0.5 * expected @ lora_b.double().T, "y",
                 torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_fp32_adapters_with_16bit_activations(dtype, dropout_p, no_tf32):
    run_and_compare(*make_inputs(33, 65, 47, 20, dtype, adapter_dtype=torch.float32), 2.0, dropout_p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias_and_no_input_gradient(dtype, no_tf32):
    x, weight, _, lora_a, lora_b = make_inputs(17, 33, 19, 3, dtype, bias=False)
    run_and_compare(x.detach(), weight, None, lora_a, lora_b, 1.5, 0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype):
    x, weight, bias, lora_a, lora_b = make_inputs(1, 17, 9, 4, dtype)
    x0 = torch.empty(0, 17, device="cuda", dtype=dtype, requires_grad=True)
    y = peftkern.lora_linear(x0, weight, bias, lora_a, lora_b, 1.0, 0.3, seed=5, backend="cuda")
    assert y.shape == (0, 9)
    y.sum().backward()
    assert x0.grad.shape == (0, 17)
    assert torch.equal(lora_a.grad, torch.zeros_like(lora_a))
    assert torch.equal(lora_b.grad, torch.zeros_like(lora_b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_leading_dims_non_contiguous_x_and_transposed_weight(dtype, dropout_p, no_tf32):
    M, K, N, r = 3 * 11, 40, 23, 5
    x, weight, bias, lora_a, lora_b = make_inputs(M, K, N, r, dtype)
    # x: [3, 11, 40] taken as every other column of a wider buffer (not contiguous, odd row stride);
    # weight: [N, K] with strides (1, N) (stored transposed); lora_a and lora_b transposed views too.
    wide = torch.randn(3, 11, 2 * K, device="cuda").to(dtype)
    x3 = wide[..., ::2].detach().requires_grad_(True)
    w_t = weight.detach().T.contiguous().T
    a_t = lora_a.detach().T.contiguous().T.requires_grad_(True)
    b_t = lora_b.detach().T.contiguous().T.requires_grad_(True)
    assert not x3.is_contiguous() and w_t.stride() == (1, N) and a_t.stride() == (1, r)
    run_and_compare(x3, w_t, bias, a_t, b_t, 0.5, dropout_p)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 7, 2**62 - 5])
def test_dropout_mask_is_the_reference_stream(seed):
    """With A = identity and x = 1, S = keep / (1 - p) exactly: the kernel's mask, element by element."""
    from peftkern.ops._cuda import lora_backward, lora_forward

    M, K, p = 67, 45, 0.3
    x = torch.ones(M, K, device="cuda")
    eye = torch.eye(K, device="cuda")
    weight = torch.zeros(3, K, device="cuda")
    seed_t = torch.tensor([seed], device="cuda", dtype=torch.int64)
    _, s = lora_forward(x, weight, None, eye, torch.zeros(3, K, device="cuda"), 1.0, p, seed_t)
    keep = reference.dropout_mask(seed, (M, K), p, device="cpu")
    expected = keep.float() * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(s.cpu(), expected), f"{int((s.cpu() != expected).sum())} mask elements differ"
    # The backward regenerates the same mask: with dS = 1 per element, dX's LoRA part is keep / (1 - p).
    grad_y = torch.zeros(M, 3, device="cuda")
    b = torch.zeros(3, K, device="cuda")
    dx, _, _ = lora_backward(grad_y, x, weight, eye, b, s, 1.0, p, seed_t, True)
    assert torch.equal(dx.cpu(), torch.zeros(M, K))  # dS = dY @ B = 0: no LoRA part, base part 0
    grad_y = torch.ones(M, 3, device="cuda")
    b = torch.zeros(3, K, device="cuda")
    b[0] = 1.0  # dS = dY @ B = ones [M, K]; dX = dY @ W (0) + (dS @ I) * keep / (1 - p)
    dx, _, _ = lora_backward(grad_y, x, weight, eye, b, s, 1.0, p, seed_t, True)
    assert torch.equal(dx.cpu(), expected)


@pytest.mark.gpu
def test_cuda_and_triton_draw_the_same_mask():
    pytest.importorskip("triton")
    from peftkern.ops._cuda import lora_forward as cuda_forward
    from peftkern.triton_kernels.lora import lora_forward as triton_forward

    M, K, p = 40, 33, 0.4
    x = torch.ones(M, K, device="cuda")
    eye = torch.eye(K, device="cuda")
    weight = torch.zeros(2, K, device="cuda")
    seed_t = torch.tensor([987654321987], device="cuda", dtype=torch.int64)
    _, s_cuda = cuda_forward(x, weight, None, eye, torch.zeros(2, K, device="cuda"), 1.0, p, seed_t)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _, s_triton = triton_forward(x, weight, None, eye, torch.zeros(2, K, device="cuda"), 1.0, p, seed_t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert torch.equal(s_cuda > 0, s_triton > 0)


@pytest.mark.gpu
def test_backward_is_deterministic():
    x, weight, bias, lora_a, lora_b = make_inputs(130, 100, 70, 33, torch.float32)
    grads = []
    for _ in range(2):
        lora_a.grad = lora_b.grad = x.grad = None
        y = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.2, seed=3, backend="cuda")
        y.backward(torch.ones_like(y))
        grads.append((x.grad.clone(), lora_a.grad.clone(), lora_b.grad.clone()))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.gpu
def test_torch_compile_treats_the_cuda_op_as_opaque(no_tf32):
    x, weight, bias, lora_a, lora_b = make_inputs(17, 33, 19, 4, torch.float32)

    def f(x, weight, bias, lora_a, lora_b):
        return peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 0.5, 0.0, backend="cuda")

    eager = f(x, weight, bias, lora_a, lora_b)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, weight, bias, lora_a, lora_b)
    assert_close(compiled, eager, "compiled y", torch.float32)


@pytest.mark.gpu
@pytest.mark.slow
def test_offsets_past_2_31_elements():
    """x with more than 2**31 elements: int64 offsets (and dropout counters) give the right far rows."""
    K, N, r = 4096, 32, 8
    M = 2**31 // K + 64
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    lora_a = torch.randn(r, K, device="cuda") / K**0.5
    lora_b = torch.randn(N, r, device="cuda")
    y = peftkern.lora_linear(x, weight, None, lora_a, lora_b, 1.0, 0.1, seed=5, backend="cuda")
    tail = slice(M - 96, M)
    mask = reference.dropout_mask(5, (96, K), 0.1, first_row=M - 96)
    expected = reference.lora_linear(
        x[tail].cpu().double(), weight.cpu().double(), None, lora_a.cpu().double(), lora_b.cpu().double(),
        1.0, 0.1, keep_mask=mask,
    )
    assert_close(y[tail], expected, "y tail", torch.bfloat16)


@pytest.mark.gpu
def test_opcheck_cuda_backend():
    x, weight, bias, lora_a, lora_b = make_inputs(5, 12, 7, 3, torch.float32)
    seed = torch.tensor([3], dtype=torch.int64, device="cuda")
    torch.library.opcheck(
        torch.ops.peftkern.lora_linear.default,
        (x, weight, bias, lora_a, lora_b, 0.5, 0.2, seed, "cuda"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.gpu
def test_lora_linear_layer_on_the_cuda_backend(no_tf32):
    """The layer path end to end (base frozen, adapters trained) on backend "cuda"."""
    base = torch.nn.Linear(40, 24, device="cuda")
    layer = peftkern.LoRALinear.from_linear(base, r=6, alpha=12, dropout=0.0, backend="cuda")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 40, device="cuda", requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    x64 = x.detach().cpu().double().requires_grad_(True)
    a64 = layer.lora_A.detach().cpu().double().requires_grad_(True)
    b64 = layer.lora_B.detach().cpu().double().requires_grad_(True)
    y64 = reference.lora_linear(
        x64, base.weight.detach().cpu().double(), base.bias.detach().cpu().double(), a64, b64, 2.0, 0.0
    )
    y64.square().sum().backward()
    assert_close(y, y64, "y", torch.float32)
    assert_close(x.grad, x64.grad, "dx", torch.float32)
    assert_close(layer.lora_A.grad, a64.grad, "dA", torch.float32)
    assert_close(layer.lora_B.grad, b64.grad, "dB", torch.float32)


@pytest.mark.gpu
def test_forward_captures_in_a_cuda_graph(no_tf32):
    """No host sync, no allocation in the extension: the forward replays from a CUDA graph."""
    x, weight, bias, lora_a, lora_b = make_inputs(33, 65, 47, 8, torch.bfloat16)
    seed = torch.tensor([21], device="cuda", dtype=torch.int64)
    x = x.detach()

    def run():
        return peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 0.5, 0.3, seed=seed, backend="cuda")

    assert_graph_replay_follows(run, x)


def test_cuda_static_figures_classify_ptx_loads():
    """benchmarks/cuda_static.py's PTX counts: vector vs scalar global loads, async copies, tensor cores."""
    import importlib.util as util

    spec = util.spec_from_file_location("cuda_static", ROOT / "benchmarks" / "cuda_static.py")
    cuda_static = util.module_from_spec(spec)
    spec.loader.exec_module(cuda_static)
    ptx = (
        ".visible .entry _Z1av(\n  ld.global.nc.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1];\n  ld.global.f32 %f1, [%rd2];\n"
        "  ld.global.nc.u16 %rs1, [%rd3];\n  cp.async.cg.shared.global [%r5], [%rd4], 16;\n"
        "  wmma.mma.sync.aligned.row.col.m16n16k16.f32.f16 {%f2}, {%r6}, {%r7}, {%f3};\n"
        "  fma.rn.f32 %f4, %f5, %f6, %f7;\n"
        "  ld.shared.v2.f32 {%f8, %f9}, [%r8];\n  ld.shared.f32 %f10, [%r9];\n}\n"
        ".visible .entry _Z1bv(\n  ld.global.u32 %r10, [%rd5];\n}\n"
    )
    bodies = cuda_static._split_functions(ptx, re.compile(r"\.entry (\w+)\("))
    counts = {name: {key: len(re.findall(p, body)) for key, p in cuda_static.PTX_COUNTS.items()}
              for name, body in bodies.items()}
    assert counts["_Z1av"] == {"global_loads_vector": 1, "global_loads_scalar": 2, "async_copies": 1,
                               "shared_loads_vector": 1, "shared_loads_scalar": 1, "tensor_core": 1, "fp32_fma": 1}
    assert counts["_Z1bv"]["global_loads_scalar"] == 1 and counts["_Z1bv"]["global_loads_vector"] == 0
