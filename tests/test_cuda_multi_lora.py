"""multi_lora_linear on the CUDA C++ backend (csrc/include/peftkern/multi_lora.cuh): the header's launchers on
the CPU emulator, the bindings' argument checks, and (on a GPU) outputs and dX/dA/dB against the float64
reference on both paths, against Triton, determinism, CUDA-graph replay with new ids, opcheck."""

from __future__ import annotations

import contextlib
import re
import subprocess
import types
from pathlib import Path

import _emulator
import pytest
import torch
from _helpers import assert_close, capture_in_cuda_graph, cuda_ext, needs_extension

import peftkern
from peftkern import reference

ROOT = Path(__file__).resolve().parent.parent
HAS_GPU = torch.cuda.is_available()


# ---- CPU: the header on the emulator ------------------------------------------------------------------------


def test_kernels_on_the_cpu_emulator_match_float64_and_stay_in_bounds(tmp_path):
    """The header's launchers on a CPU emulation of the CUDA model under AddressSanitizer: the device-built
    segment table against a host stable sort (int32/int64 ids, -1, out of range, unsorted, groups longer
    than one tile, several sort chunks), and forward (decode and prefill) and backward against float64
    loops for one adapter, every row its own adapter, mixed ranks {4, 8, 16} with r_max 16 and a rank-0
    slot, M = 0 / 1 / 17 / 33, strided and transposed layouts, fp32, fp16 + fp32 adapters, bf16, fp16. The
    adapters' padding past each rank is NaN, so a read past a rank fails the comparison."""
    binary = _emulator.build(tmp_path, "multi_lora_emulated")
    assert _emulator.emulated_headers(tmp_path)["multi_lora.cuh"] >= 8
    expected = "193 cases, 0 failures" if _emulator.FULL else "105 cases, 0 failures"
    assert _emulator.run(binary).strip().endswith(expected)


@pytest.mark.skipif(_emulator.NVCC is None, reason="no nvcc here")
def test_vendoring_example_compiles_and_runs_where_it_can(tmp_path):
    """csrc/examples/multi_lora_forward_example.cu builds with nvcc and the header alone (one arch, to stay
    quick); on a GPU it runs both paths against its host loop."""
    binary = tmp_path / "multi_lora_forward_example"
    build = subprocess.run(
        [_emulator.NVCC, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}",
         "-gencode=arch=compute_80,code=sm_80", str(ROOT / "csrc" / "examples" / "multi_lora_forward_example.cu"),
         "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    if HAS_GPU:
        assert run.returncode == 0, run.stdout + run.stderr
        assert "decode path: 0 out of tolerance" in run.stdout and "prefill path: 0 out of tolerance" in run.stdout
    else:
        assert run.returncode == 2, run.stdout + run.stderr
        assert "no CUDA device here" in run.stdout


# ---- CPU: the bindings refuse bad arguments before any launch ----------------------------------------------


def _forward_args(ext, **override):
    args = dict(
        dtype=ext.FLOAT16, adapter_dtype=ext.FLOAT16, x=256, x_strides=(8, 1), weight=256, weight_strides=(8, 1),
        bias=0, bias_stride=0, lora_a=256, lora_a_strides=(16, 8, 1), lora_b=256, lora_b_strides=(8, 2, 1),
        adapter_ids=256, ids_int64=True, scalings=256, ranks=256, s=256, y=256, y_strides=(4, 1), workspace=0,
        workspace_bytes=0, M=3, N=4, K=8, L=2, R=2, path=1, device=0, stream=0,
    )
    args.update(override)
    return args


@needs_extension
def test_bindings_check_arguments_before_any_launch():
    ext = cuda_ext()
    cases = [
        ({"dtype": 7}, r"dtype: expected a code in"),
        ({"adapter_dtype": ext.BFLOAT16}, r"adapter_dtype: expected the activation dtype \(float16\)"),
        ({"L": 0}, r"L: expected at least 1 adapter slot, got 0"),
        ({"R": 0}, r"R: expected r_max >= 1, got 0"),
        ({"M": -1}, r"sizes: expected M, N, K >= 0"),
        ({"path": 3}, r"path: expected a code in \{0: auto, 1: decode, 2: prefill\}, got 3"),
        ({"x": 0}, r"x: expected a device address, got 0 for a \[3, 8\] matrix"),
        ({"lora_a": 0}, r"lora_a: expected a device address, got 0 for 32 elements"),
        ({"lora_b": 0}, r"lora_b: expected a device address"),
        ({"adapter_ids": 0}, r"adapter_ids: expected a device address, got 0 for 3 elements"),
        ({"scalings": 0}, r"scalings: expected a device address"),
        ({"ranks": 0}, r"ranks: expected a device address"),
        ({"s": 0}, r"s: expected a device address"),
        ({"path": 2}, r"workspace: expected at least \d+ bytes \(multi_lora_forward_workspace_bytes\), got 0"),
        ({"path": 2, "workspace": 1000, "workspace_bytes": 1 << 20}, r"workspace: expected a 256-byte aligned"),
        ({"device": -1}, r"device: expected a CUDA device index >= 0"),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ext.multi_lora_forward(**_forward_args(ext, **override))
    # M == 0 is a no-op that touches no device (so it works even here).
    assert ext.multi_lora_forward(**_forward_args(ext, M=0, x=0, s=0, y=0, adapter_ids=0, path=2)) is None

    backward = dict(
        dtype=ext.FLOAT32, adapter_dtype=ext.FLOAT32, grad_y=256, grad_y_strides=(4, 1), x=256, x_strides=(8, 1),
        weight=256, weight_strides=(8, 1), lora_a=256, lora_a_strides=(16, 8, 1), lora_b=256,
        lora_b_strides=(8, 2, 1), adapter_ids=256, ids_int64=False, scalings=256, ranks=256, s=256, grad_x=0,
        grad_x_strides=(0, 0), grad_a=256, grad_b=256, workspace=256, workspace_bytes=0, M=3, N=4, K=8, L=2, R=2,
        path=0, device=0, stream=0,
    )
    with pytest.raises(ValueError, match=r"workspace: expected at least \d+ bytes \(multi_lora_backward"):
        ext.multi_lora_backward(**backward)
    with pytest.raises(ValueError, match=r"grad_a: expected a device address"):
        ext.multi_lora_backward(**{**backward, "grad_a": 0})
    with pytest.raises(ValueError, match=r"grad_y: expected a device address"):
        ext.multi_lora_backward(**{**backward, "grad_y": 0})


@needs_extension
def test_workspace_sizes_follow_the_shapes_only():
    ext = cuda_ext()
    # decode: no segment table; a shallow reduction is not split, a deep one is (fp32 partial tiles)
    assert ext.multi_lora_forward_workspace_bytes(8, 16, 32, 4, 1) == 0
    assert ext.multi_lora_forward_workspace_bytes(8, 16, 32, 4, 0) == 0  # auto with M <= 64 is decode
    assert ext.multi_lora_forward_workspace_bytes(64, 4096, 4096, 8, 0) == 4 * 64 * 4096 * 4  # 4 splits
    assert ext.multi_lora_forward_workspace_bytes(65, 16, 32, 4, 0) > 0
    prefill = ext.multi_lora_forward_workspace_bytes(8, 16, 32, 4, 2)
    assert prefill == ext.multi_lora_segments_workspace_bytes(8, 4) and prefill % 256 == 0
    assert ext.multi_lora_backward_workspace_bytes(8, 16, 32, 4, 16, 1) >= prefill + 8 * 16 * 4
    assert ext.multi_lora_backward_workspace_bytes(0, 16, 32, 4, 16, 1) == 0
    # The tile table: cdiv(M, 64) + min(L + 1, M), as the Triton build_segments with 64-row tiles.
    for M, L in [(0, 3), (1, 3), (64, 1), (65, 1), (1000, 7), (5, 40)]:
        assert ext.multi_lora_segment_tiles(M, L) == -(-M // 64) + min(L + 1, M)
    assert (ext.MULTI_LORA_DECODE_MAX_ROWS, ext.MULTI_LORA_SEGMENT_ROWS) == (64, 64)
    with pytest.raises(ValueError, match="path: expected a code"):
        ext.multi_lora_forward_workspace_bytes(8, 16, 32, 4, 9)
    with pytest.raises(ValueError, match="L: expected at least 1 adapter slot"):
        ext.multi_lora_segments_workspace_bytes(8, 0)


@needs_extension
def test_launchers_pass_the_bindings_arguments_in_order(monkeypatch):
    """No GPU here, so check the Python launchers' plumbing against the real bindings' parameter lists:
    every address, stride, size and code lands on the parameter of that name."""
    ext = cuda_ext()
    import peftkern.ops._cuda_multi_lora as launchers

    calls = {}

    def recorder(name):
        names = re.findall(r"(\w+): ", getattr(ext, name).__doc__.split(") ->")[0])

        def record(*args):
            calls[name] = dict(zip(names, args, strict=True))

        return record

    fake = types.SimpleNamespace(
        FLOAT16=ext.FLOAT16, BFLOAT16=ext.BFLOAT16, FLOAT32=ext.FLOAT32,
        multi_lora_forward=recorder("multi_lora_forward"), multi_lora_backward=recorder("multi_lora_backward"),
        multi_lora_forward_workspace_bytes=ext.multi_lora_forward_workspace_bytes,
        multi_lora_backward_workspace_bytes=ext.multi_lora_backward_workspace_bytes,
    )
    monkeypatch.setattr(launchers, "cuda_extension", lambda: fake)
    monkeypatch.setattr(launchers, "_launch_context", lambda t: (3, 12345))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())

    M, K_, N_, L, R = 70, 24, 20, 3, 16
    x = torch.randn(M, 2 * K_, dtype=torch.float16)[:, ::2]
    weight = torch.randn(K_, N_, dtype=torch.float16).T
    bias = torch.randn(N_, dtype=torch.float16)
    lora_a = torch.randn(L, R, K_)
    lora_b = torch.randn(L, R, N_).transpose(1, 2)
    ids = torch.tensor([(t % 4) - 1 for t in range(M)], dtype=torch.int32)
    scalings, ranks = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([16, 4, 8], dtype=torch.int32)
    y, s = launchers.multi_lora_forward(x, weight, bias, lora_a, lora_b, ids, scalings, ranks, path="prefill")
    assert y.shape == (M, N_) and y.dtype == torch.float16 and s.shape == (M, R) and s.dtype == torch.float32
    f = calls["multi_lora_forward"]
    assert (f["dtype"], f["adapter_dtype"], f["path"], f["device"], f["stream"]) == (ext.FLOAT16, ext.FLOAT32, 2, 3,
                                                                                     12345)
    assert (f["M"], f["N"], f["K"], f["L"], f["R"]) == (M, N_, K_, L, R)
    assert f["x"] == x.data_ptr() and f["x_strides"] == x.stride() == (2 * K_, 2)
    assert f["weight"] == weight.data_ptr() and f["weight_strides"] == (1, N_)
    assert f["bias"] == bias.data_ptr() and f["bias_stride"] == 1
    assert f["lora_a"] == lora_a.data_ptr() and f["lora_a_strides"] == lora_a.stride()
    assert f["lora_b"] == lora_b.data_ptr() and f["lora_b_strides"] == lora_b.stride() == (R * N_, 1, N_)
    assert f["adapter_ids"] == ids.data_ptr() and f["ids_int64"] is False
    assert f["s"] == s.data_ptr() and f["y"] == y.data_ptr() and f["y_strides"] == (N_, 1)
    assert f["workspace_bytes"] == ext.multi_lora_forward_workspace_bytes(M, N_, K_, L, 2) > 0

    grad_y = torch.randn(M, N_, dtype=torch.float16)
    dx, da, db = launchers.multi_lora_backward(grad_y, x, weight, lora_a, lora_b, ids.long(), scalings, ranks, s,
                                               need_dx=True, path="decode")
    assert dx.shape == x.shape and da.shape == lora_a.shape and db.shape == lora_b.shape
    assert da.is_contiguous() and db.is_contiguous() and db.dtype == torch.float32
    bwd = calls["multi_lora_backward"]
    assert (bwd["path"], bwd["ids_int64"], bwd["M"], bwd["N"], bwd["K"], bwd["L"], bwd["R"]) == (1, True, M, N_, K_,
                                                                                                L, R)
    assert bwd["grad_y"] == grad_y.data_ptr() and bwd["grad_y_strides"] == (N_, 1)
    assert bwd["x"] == x.data_ptr() and bwd["weight_strides"] == (1, N_) and bwd["s"] == s.data_ptr()
    assert bwd["grad_x"] == dx.data_ptr() and bwd["grad_x_strides"] == (K_, 1)
    assert bwd["grad_a"] == da.data_ptr() and bwd["grad_b"] == db.data_ptr()
    assert bwd["workspace_bytes"] == ext.multi_lora_backward_workspace_bytes(M, N_, K_, L, R, 1)
    launchers.multi_lora_backward(grad_y, x, weight, lora_a, lora_b, ids, scalings, ranks, s, need_dx=False)
    assert calls["multi_lora_backward"]["grad_x"] == 0 and calls["multi_lora_backward"]["path"] == 0


def test_launcher_refuses_an_unknown_path():
    from peftkern.ops._cuda_multi_lora import _path_code

    assert [_path_code(p) for p in ("auto", "decode", "prefill")] == [0, 1, 2]
    with pytest.raises(ValueError, match="path: expected one of"):
        _path_code("sideways")


# ---- GPU: against the float64 reference ----------------------------------------------------------------------

K, N = 40, 33

# name: (M, L, r_max, ids, ranks)
SCENARIOS = {
    "one_adapter": (33, 3, 16, [2] * 33, [16, 4, 8]),
    "every_row_distinct": (17, 17, 16, [(5 * t + 3) % 17 for t in range(17)], [(4, 8, 16)[i % 3] for i in range(17)]),
    "mixed_ranks_unsorted_base_rows": (
        33, 4, 16, [(-1 if t % 5 == 0 else (t * 7) % 4) for t in range(33)], [4, 8, 16, 0],
    ),
    "single_row": (1, 2, 8, [1], [8, 5]),
    "prefill_sized": (130, 5, 16, [((t * 11) % 6) - 1 for t in range(130)], [16, 4, 8, 12, 1]),
}
PATHS = ["decode", "prefill", "auto"]
DTYPE_PAIRS = [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
]


def _pair_id(pair):
    return "-".join(str(t).removeprefix("torch.") for t in pair)


def _problem(M, L, r_max, ids, ranks, dtype, adapter_dtype, bias=True, seed=0, K=K, N=N):
    """float64 CPU tensors already rounded to the tested dtypes (the reference sees the backend's values)."""
    g = torch.Generator().manual_seed(seed + 97 * M + L)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype).double()
    weight = (torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5).to(dtype).double()
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).double() if bias else None
    lora_a = (torch.randn(L, r_max, K, generator=g, dtype=torch.float64) / K**0.5).to(adapter_dtype).double()
    lora_b = (torch.randn(L, N, r_max, generator=g, dtype=torch.float64) / r_max**0.5).to(adapter_dtype).double()
    grad_y = torch.randn(M, N, generator=g, dtype=torch.float64).to(dtype).double()
    scalings = torch.tensor([0.5 + 0.25 * i for i in range(L)], dtype=torch.float32)
    return (x, weight, b, lora_a, lora_b, torch.as_tensor(ids, dtype=torch.int64).reshape(M),
            scalings, torch.as_tensor(ranks, dtype=torch.int32), grad_y)


def _reference(problem):
    x, weight, b, lora_a, lora_b, ids, scalings, ranks, grad_y = problem
    rx, ra, rb = (t.clone().requires_grad_() for t in (x, lora_a, lora_b))
    y = reference.multi_lora_linear(rx, weight, b, ra, rb, ids, scalings.double(), ranks)
    y.backward(grad_y)
    return y.detach(), rx.grad, ra.grad, rb.grad


def _run_cuda(problem, dtype, adapter_dtype, path, backend="cuda", ids_dtype=torch.int64, strided=False):
    """Forward + backward on the GPU; returns (y, dX, dA, dB)."""
    x, weight, b, lora_a, lora_b, ids, scalings, ranks, grad_y = problem
    tx = x.to("cuda", dtype).requires_grad_()
    ta = lora_a.to("cuda", adapter_dtype).requires_grad_()
    tb = lora_b.to("cuda", adapter_dtype).requires_grad_()
    x_in = tx
    if strided:  # every other column of a wider buffer: odd row stride, not 16-byte aligned rows
        x_in = torch.stack([tx, torch.zeros_like(tx)], dim=-1).flatten(-2)[:, ::2]
        assert not x_in.is_contiguous()
    y = peftkern.multi_lora_linear(
        x_in, weight.to("cuda", dtype), None if b is None else b.to("cuda", dtype), ta, tb,
        ids.to("cuda", ids_dtype), scalings.to("cuda"), ranks.to("cuda"), backend=backend, path=path,
    )
    y.backward(grad_y.to("cuda", dtype))
    return y.detach(), tx.grad, ta.grad, tb.grad


def _compare(got, expected, dtype, scale=1.0):
    for name, g, e in zip(("y", "dX", "dA", "dB"), got, expected):
        assert_close(g, e, name, dtype=dtype, scale=scale)


@pytest.mark.gpu
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_matches_reference(scenario, path, pair, no_tf32):
    dtype, adapter_dtype = pair
    problem = _problem(*SCENARIOS[scenario], dtype, adapter_dtype)
    got = _run_cuda(problem, dtype, adapter_dtype, path, ids_dtype=torch.int32 if path == "auto" else torch.int64)
    assert got[2].dtype == adapter_dtype and got[3].dtype == adapter_dtype
    # dA and dB sum a segment's rows in 16-bit storage: twice the element tolerance there.
    _compare(got, _reference(problem), dtype, scale=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_x_no_bias_and_ids_out_of_range_unchecked(path, dtype, no_tf32):
    """Strided x, no bias; ids L, L + 3 and -5 act as -1 (check_ids=False: nothing read out of bounds)."""
    M, L, r_max = 37, 3, 16
    ids = [(t % 6) - 1 if t % 4 else (L + t % 5 if t % 8 else -5) for t in range(M)]
    problem = _problem(M, L, r_max, ids, [16, 4, 8], dtype, dtype, bias=False)
    as_base = problem[5].clone()
    as_base[(as_base < -1) | (as_base >= L)] = -1
    expected = _reference((*problem[:5], as_base, *problem[6:]))
    x, weight, _, lora_a, lora_b, ids_t, scalings, ranks, grad_y = problem
    tx = x.to("cuda", dtype).requires_grad_()
    ta, tb = (t.to("cuda", dtype).requires_grad_() for t in (lora_a, lora_b))
    x_in = torch.stack([tx, torch.zeros_like(tx)], dim=-1).flatten(-2)[:, ::2]
    y = peftkern.multi_lora_linear(x_in, weight.to("cuda", dtype), None, ta, tb, ids_t.cuda(), scalings.cuda(),
                                   ranks.cuda(), check_ids=False, backend="cuda", path=path)
    y.backward(grad_y.to("cuda", dtype))
    _compare((y.detach(), tx.grad, ta.grad, tb.grad), expected, dtype, scale=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
def test_empty_batch(pair):
    dtype, adapter_dtype = pair
    x = torch.empty(0, K, device="cuda", dtype=dtype, requires_grad=True)
    lora_a = torch.randn(3, 8, K, device="cuda", dtype=adapter_dtype, requires_grad=True)
    lora_b = torch.randn(3, N, 8, device="cuda", dtype=adapter_dtype, requires_grad=True)
    y = peftkern.multi_lora_linear(x, torch.randn(N, K, device="cuda", dtype=dtype), None, lora_a, lora_b,
                                   torch.empty(0, device="cuda", dtype=torch.int64), [1.0, 2.0, 3.0],
                                   backend="cuda")
    assert y.shape == (0, N)
    y.sum().backward()
    assert x.grad.shape == (0, K)
    assert torch.equal(lora_a.grad, torch.zeros_like(lora_a)) and torch.equal(lora_b.grad, torch.zeros_like(lora_b))


@pytest.mark.gpu
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=_pair_id)
def test_decode_splits_deep_reductions(pair, no_tf32):
    """Few rows, deep K and N: the decode GEMMs (y over K, dX over N) split their reduction and sum the fp32
    partial tiles in a fixed order."""
    dtype, adapter_dtype = pair
    M, L = 6, 3
    problem = _problem(M, L, 16, [2, -1, 0, 1, 2, 0], [16, 4, 8], dtype, adapter_dtype, K=1100, N=700)
    got = _run_cuda(problem, dtype, adapter_dtype, "decode")
    _compare(got, _reference(problem), dtype, scale=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_and_prefill_paths_agree(dtype, no_tf32):
    problem = _problem(*SCENARIOS["mixed_ranks_unsorted_base_rows"], dtype, dtype)
    decode = _run_cuda(problem, dtype, dtype, "decode")
    prefill = _run_cuda(problem, dtype, dtype, "prefill")
    _compare(decode, prefill, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_agrees_with_triton(path, no_tf32):
    pytest.importorskip("triton")
    dtype = torch.bfloat16
    problem = _problem(*SCENARIOS["prefill_sized"], dtype, torch.float32)
    cuda = _run_cuda(problem, dtype, torch.float32, path)
    triton = _run_cuda(problem, dtype, torch.float32, path, backend="triton")
    _compare(cuda, triton, dtype, scale=2.0)


@pytest.mark.gpu
def test_segment_table_matches_the_triton_builder():
    pytest.importorskip("triton")
    from peftkern.ops._cuda_multi_lora import build_segments
    from peftkern.triton_kernels.multi_lora import build_segments as triton_build_segments

    g = torch.Generator(device="cuda").manual_seed(3)
    for M, L in [(1, 1), (17, 3), (300, 5), (1000, 64), (4099, 2)]:
        for dtype in (torch.int32, torch.int64):
            ids = torch.randint(-3, L + 2, (M,), device="cuda", generator=g).to(dtype)
            perm, bounds, tiles = build_segments(ids, L)
            expected = triton_build_segments(ids, L, 64)
            assert torch.equal(perm, expected.perm), (M, L)
            assert torch.equal(bounds, expected.bounds), (M, L)
            assert torch.equal(tiles, expected.tiles), (M, L)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_backward_is_deterministic(path):
    problem = _problem(*SCENARIOS["prefill_sized"], torch.float32, torch.float32)
    first = _run_cuda(problem, torch.float32, torch.float32, path)
    second = _run_cuda(problem, torch.float32, torch.float32, path)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_many_rows_of_few_adapters_split_the_gradient_sums(no_tf32):
    """Few adapters, many rows: dA / dB are summed in parts (fp32 partials added in a fixed order)."""
    M, L = 1500, 2
    problem = _problem(M, L, 16, [(t % 3) - 1 for t in range(M)], [16, 8], torch.float32, torch.float32)
    _compare(_run_cuda(problem, torch.float32, torch.float32, "prefill"), _reference(problem), torch.float32,
             scale=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("path,M", [("decode", 8), ("prefill", 96)])
def test_cuda_graph_capture_and_replay_with_new_ids(path, M, no_tf32):
    L, r_max, K_, N_ = 6, 16, 256, 320
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K_, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(N_, K_, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    lora_a = torch.randn(L, r_max, K_, device="cuda", dtype=torch.bfloat16, generator=g) / 16
    lora_b = torch.randn(L, N_, r_max, device="cuda", dtype=torch.bfloat16, generator=g) / 4
    scalings = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5, 3.0], device="cuda")
    ranks = torch.tensor([16, 4, 8, 16, 1, 12], device="cuda", dtype=torch.int32)
    static_ids = torch.zeros(M, device="cuda", dtype=torch.int64)

    def run():
        return peftkern.multi_lora_linear(x, weight, None, lora_a, lora_b, static_ids, scalings, ranks,
                                          check_ids=False, backend="cuda", path=path)

    with torch.no_grad():
        graph, out = capture_in_cuda_graph(run)
    for trial in range(3):
        new_ids = torch.randint(-1, L, (M,), device="cuda", generator=g)
        static_ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.multi_lora_linear(x.double().cpu(), weight.double().cpu(), None,
                                               lora_a.double().cpu(), lora_b.double().cpu(), new_ids.cpu(),
                                               scalings.cpu().double(), ranks.cpu())
        assert_close(out, expected, f"replay {trial}", dtype=torch.bfloat16)


@pytest.mark.gpu
def test_opcheck_cuda_backend():
    problem = _problem(*SCENARIOS["mixed_ranks_unsorted_base_rows"], torch.float32, torch.float32)
    x, weight, b, lora_a, lora_b, ids, scalings, ranks, _ = problem
    args = (x.float().cuda().requires_grad_(), weight.float().cuda(), b.float().cuda(),
            lora_a.float().cuda().requires_grad_(), lora_b.float().cuda().requires_grad_(), ids.cuda(),
            scalings.cuda(), ranks.cuda(), "cuda")
    for path in ("decode", "prefill"):
        torch.library.opcheck(
            torch.ops.peftkern.multi_lora_linear.default, (*args, path),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
