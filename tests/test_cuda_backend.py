"""The CUDA C++ backend: the extension peftkern._C, its status reporting, the vendoring example, and (on a
GPU) lora_linear on backend "cuda" against the float64 reference, outputs and every gradient."""

from __future__ import annotations

import importlib
import importlib.util
import os
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
