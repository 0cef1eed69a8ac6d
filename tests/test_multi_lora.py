"""multi_lora_linear: every backend and path against the float64 reference, outputs and dX/dA/dB."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, assert_close

import peftkern
from peftkern import reference
from peftkern.nn.multi_lora import broadcast_adapter_ids

# (backend, path): the torch backend, and the Triton decode (per-row gather) and prefill (segment) paths.
IMPLS = [("torch", None), ("triton", "decode"), ("triton", "prefill")]
IMPL_IDS = ["torch", "triton-decode", "triton-prefill"]

K, N = 33, 17


def _device(backend: str) -> str:
    """Triton runs on a GPU when there is one (on CPU only through the interpreter, set by conftest)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _problem(M, L, r_max, ids, ranks, dtype=torch.float32, adapter_dtype=None, bias=True, lead=None):
    """Random float64 tensors for one problem, plus casts for the backend under test."""
    adapter_dtype = adapter_dtype or dtype
    g = torch.Generator().manual_seed(1234 + M + L)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    if lead is not None:
        x = x.reshape(*lead, K)
    weight = torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    lora_a = torch.randn(L, r_max, K, generator=g, dtype=torch.float64) / K**0.5
    lora_b = torch.randn(L, N, r_max, generator=g, dtype=torch.float64) / r_max**0.5
    scalings = [0.5 + 0.25 * i for i in range(L)]
    grad_y = torch.randn(*x.shape[:-1], N, generator=g, dtype=torch.float64)
    # Round to the tested dtypes first, so the reference sees exactly the values the backend sees.
    x, weight = x.to(dtype).double(), weight.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    lora_a, lora_b = lora_a.to(adapter_dtype).double(), lora_b.to(adapter_dtype).double()
    grad_y = grad_y.to(dtype).double()
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(x.shape[:-1])
    ranks = torch.as_tensor(ranks, dtype=torch.int32)
    return x, weight, b, lora_a, lora_b, ids, scalings, ranks, grad_y


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider tensor), with autograd."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]


def _check(problem, backend, path, dtype, adapter_dtype=None, ids_dtype=torch.int64, scale=1.0,
           noncontiguous=False):
    x, weight, b, lora_a, lora_b, ids, scalings, ranks, grad_y = problem
    adapter_dtype = adapter_dtype or dtype
    rx, ra, rb = (t.clone().requires_grad_() for t in (x, lora_a, lora_b))
    expected = reference.multi_lora_linear(rx, weight, b, ra, rb, ids, scalings, ranks)
    expected.backward(grad_y)

    device = _device(backend)
    tx = x.to(device, dtype).requires_grad_()
    ta = lora_a.to(device, adapter_dtype).requires_grad_()
    tb = lora_b.to(device, adapter_dtype).requires_grad_()
    x_in, w_in = tx, weight.to(device, dtype)
    if noncontiguous:
        x_in, w_in = _strided(tx), _strided(w_in)
        assert not x_in.is_contiguous() and x_in.reshape(-1, K).stride() == (2 * K, 2)
        assert w_in.stride() == (2 * K, 2)
    out = peftkern.multi_lora_linear(
        x_in, w_in, None if b is None else b.to(device, dtype), ta, tb, ids.to(device, ids_dtype), scalings,
        ranks.to(device), backend=backend, path=path,
    )
    assert out.dtype == dtype and out.shape == expected.shape
    out.backward(grad_y.to(device, dtype))
    assert_close(out, expected, "y", dtype=dtype, scale=scale)
    assert_close(tx.grad, rx.grad, "dX", dtype=dtype, scale=scale)
    assert_close(ta.grad, ra.grad, "dA", dtype=dtype, scale=scale)
    assert_close(tb.grad, rb.grad, "dB", dtype=dtype, scale=scale)
    return ta.grad, tb.grad


SCENARIOS = {
    # name: (M, L, r_max, ids, ranks)
    "one_adapter": (17, 3, 16, [1] * 17, [16, 16, 16]),
    "every_row_distinct": (9, 9, 8, [3, 0, 8, 5, 1, 7, 2, 6, 4], [8] * 9),
    "base_rows_mixed_in": (33, 4, 16, [(-1 if t % 3 == 0 else t % 4) for t in range(33)], [16] * 4),
    "mixed_ranks": (33, 3, 16, [(t * 7) % 3 for t in range(33)], [4, 8, 16]),
    "unsorted_ids_and_empty_slot": (
        21, 5, 16, [4, 1, -1, 4, 0, 1, 1, 4, -1, 0, 3, 3, 0, 4, 1, -1, 0, 3, 4, 1, 0], [16, 4, 8, 12, 1]
    ),
    "single_row": (1, 2, 8, [1], [8, 5]),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_scenarios_fp32(scenario, backend, path):
    M, L, r_max, ids, ranks = SCENARIOS[scenario]
    _check(_problem(M, L, r_max, ids, ranks), backend, path, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_half_dtypes_mixed_ranks(dtype, backend, path):
    M, L, r_max, ids, ranks = SCENARIOS["unsorted_ids_and_empty_slot"]
    # dA and dB sum over a segment's rows in 16-bit storage: allow twice the element tolerance.
    _check(_problem(M, L, r_max, ids, ranks, dtype=dtype), backend, path, dtype, scale=2.0)


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_fp32_adapters_with_bf16_activations_int32_ids_no_bias(backend, path):
    M, L, r_max, ids, ranks = SCENARIOS["mixed_ranks"]
    problem = _problem(M, L, r_max, ids, ranks, dtype=torch.bfloat16, adapter_dtype=torch.float32, bias=False)
    grad_a, _ = _check(problem, backend, path, torch.bfloat16, adapter_dtype=torch.float32,
                       ids_dtype=torch.int32)
    assert grad_a.dtype == torch.float32


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_3d_input_and_noncontiguous_views(backend, path):
    M, L, r_max = 12, 3, 8
    ids = [2, -1, 0, 1, 1, 2, 0, 0, -1, 2, 1, 0]
    problem = _problem(M, L, r_max, ids, [8, 3, 6], lead=(3, 4))
    _check(problem, backend, path, torch.float32, noncontiguous=True)


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_zero_rows(backend, path):
    device = _device(backend)
    x = torch.zeros(0, K, device=device, requires_grad=True)
    lora_a = torch.randn(2, 4, K, device=device, requires_grad=True)
    lora_b = torch.randn(2, N, 4, device=device, requires_grad=True)
    ids = torch.zeros(0, dtype=torch.int64, device=device)
    y = peftkern.multi_lora_linear(x, torch.randn(N, K, device=device), None, lora_a, lora_b, ids, [1.0, 2.0],
                                   backend=backend, path=path)
    assert y.shape == (0, N)
    y.sum().backward()
    assert x.grad.shape == (0, K)
    assert torch.equal(lora_a.grad, torch.zeros_like(lora_a))
    assert torch.equal(lora_b.grad, torch.zeros_like(lora_b))


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("bad", [4, -2, 1000])
def test_out_of_range_ids_raise(backend, path, bad):
    x, weight, b, lora_a, lora_b, ids, scalings, ranks, _ = _problem(5, 4, 8, [0, 1, 2, 3, 0], [8] * 4)
    ids[3] = bad
    dev = _device(backend)
    x, weight, b, lora_a, lora_b = (t.to(dev, torch.float32) for t in (x, weight, b, lora_a, lora_b))
    with pytest.raises(ValueError, match=r"adapter_ids: expected values in \[-1, 4\).*index \(3,\)"):
        peftkern.multi_lora_linear(x, weight, b, lora_a, lora_b, ids.to(dev), scalings, ranks.to(dev),
                                   backend=backend, path=path)


def test_reference_rejects_out_of_range_ids():
    x, weight, b, lora_a, lora_b, ids, scalings, ranks, _ = _problem(3, 2, 4, [0, -2, 1], [4, 4])
    with pytest.raises(ValueError, match="got -2 at row 1"):
        reference.multi_lora_linear(x, weight, b, lora_a, lora_b, ids, scalings, ranks)


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_unchecked_out_of_range_ids_act_as_base_and_ranks_clamp(backend, path):
    """check_ids=False (CUDA-graph capture): bad ids read nothing out of bounds and give the base output."""
    x, weight, b, lora_a, lora_b, ids, scalings, _, _ = _problem(7, 3, 8, [0, 5, 1, -7, 2, 3, 2**40], [8] * 3)
    ranks = torch.tensor([8, 99, -5], dtype=torch.int32)  # clamped to [0, 8]
    dev = _device(backend)
    out = peftkern.multi_lora_linear(
        x.to(dev, torch.float32), weight.to(dev, torch.float32), b.to(dev, torch.float32),
        lora_a.to(dev, torch.float32), lora_b.to(dev, torch.float32), ids.to(dev),
        torch.tensor(scalings, device=dev), ranks.to(dev), check_ids=False, backend=backend, path=path,
    )
    valid = torch.where((ids >= 0) & (ids < 3), ids, -1)
    clamped = torch.tensor([8, 8, 0])
    expected = reference.multi_lora_linear(x, weight, b, lora_a, lora_b, valid, scalings, clamped)
    assert_close(out, expected, "y", dtype=torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_before_launch(backend):
    dev = _device(backend)
    x, w = torch.randn(4, K, device=dev), torch.randn(N, K, device=dev)
    a, b = torch.randn(2, 8, K, device=dev), torch.randn(2, N, 8, device=dev)
    ids = torch.tensor([0, 1, -1, 0], device=dev)
    call = lambda **kw: peftkern.multi_lora_linear(
        kw.get("x", x), w, None, kw.get("a", a), kw.get("b", b), kw.get("ids", ids), kw.get("s", [1.0, 2.0]),
        kw.get("ranks"), backend=backend,
    )
    with pytest.raises(TypeError, match="adapter_ids: expected dtype"):
        call(ids=ids.float())
    with pytest.raises(ValueError, match="adapter_ids: expected shape"):
        call(ids=ids[:3])
    with pytest.raises(ValueError, match="lora_b: expected shape"):
        call(b=torch.randn(2, N, 4, device=dev))
    with pytest.raises(ValueError, match="lora_a: expected shape"):
        call(a=torch.randn(2, 8, K + 1, device=dev))
    with pytest.raises(ValueError, match="scalings: expected 2 values"):
        call(s=[1.0])
    with pytest.raises(ValueError, match=r"scalings\[1\]: expected a finite number"):
        call(s=[1.0, float("nan")])
    with pytest.raises(ValueError, match="scalings: expected finite values"):
        call(s=torch.tensor([1.0, float("inf")], device=dev))
    with pytest.raises(ValueError, match=r"ranks\[0\]: expected a value in \[0, r_max=8\]"):
        call(ranks=[9, 1])
    with pytest.raises(ValueError, match=r"ranks: expected values in \[0, r_max=8\]"):
        call(ranks=torch.tensor([3, 9], device=dev))
    with pytest.raises(TypeError, match="bias: expected the dtype of x"):
        bias64 = torch.zeros(N, dtype=torch.float64, device=dev)
        peftkern.multi_lora_linear(x, w, bias64, a, b, ids, [1.0, 2.0])
    with pytest.raises(ValueError, match="path: expected one of"):
        peftkern.multi_lora_linear(x, w, None, a, b, ids, [1.0, 2.0], path="sideways")


def test_cuda_backend_refuses_cpu_tensors():
    """Backend "cuda" runs csrc/include/peftkern/multi_lora.cuh (tests/test_cuda_multi_lora.py); CPU
    tensors are refused before any launch."""
    x = torch.randn(2, K)
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        peftkern.multi_lora_linear(x, torch.randn(N, K), None, torch.randn(1, 4, K), torch.randn(1, N, 4),
                                   torch.zeros(2, dtype=torch.int64), [1.0], backend="cuda")


def test_backward_is_deterministic_on_triton():
    problem = _problem(33, 3, 16, [(t * 5) % 4 - 1 for t in range(33)], [16, 4, 9])
    first = _check(problem, "triton", "prefill", torch.float32)
    second = _check(problem, "triton", "prefill", torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_float64_torch_backend_and_frozen_base_grads():
    """The torch backend in float64 matches the reference tightly, including dW/db when they require grad."""
    ids = [0, 2, -1, 1] * 2 + [2, 2]
    x, weight, b, lora_a, lora_b, ids, scalings, ranks, grad_y = _problem(10, 3, 8, ids, [8, 5, 2])
    leaves = [t.clone().requires_grad_() for t in (x, weight, b, lora_a, lora_b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, b, lora_a, lora_b)]
    peftkern.multi_lora_linear(*leaves, ids, scalings, ranks, backend="torch").backward(grad_y)
    reference.multi_lora_linear(*ref_leaves, ids, scalings, ranks).backward(grad_y)
    for name, got, want in zip(["dX", "dW", "db", "dA", "dB"], leaves, ref_leaves):
        assert_close(got.grad, want.grad, name)


@pytest.mark.parametrize("backend,path", [IMPLS[0], IMPLS[2]], ids=[IMPL_IDS[0], IMPL_IDS[2]])
def test_opcheck(backend, path):
    dtype = torch.float64 if backend == "torch" else torch.float32
    dev = {"device": _device(backend)}
    x = torch.randn(6, K, dtype=dtype, requires_grad=True, **dev)
    a = torch.randn(3, 8, K, dtype=dtype, requires_grad=True, **dev)
    b = torch.randn(3, N, 8, dtype=dtype, requires_grad=True, **dev)
    args = (x, torch.randn(N, K, dtype=dtype, **dev), torch.randn(N, dtype=dtype, **dev), a, b,
            torch.tensor([0, 2, -1, 1, 1, 0], **dev), torch.tensor([1.0, 0.5, 2.0], dtype=dtype, **dev),
            torch.tensor([8, 3, 5], dtype=torch.int32, **dev), backend, path or "auto")
    torch.library.opcheck(torch.ops.peftkern.multi_lora_linear.default, args)


def test_torch_compile_fullgraph_without_host_checks():
    """check_ids=False leaves no host sync in the function: the whole call compiles into one graph."""
    weight = torch.randn(N, K)
    ranks, scalings = torch.tensor([8, 3, 5], dtype=torch.int32), torch.tensor([1.0, 0.5, 2.0])
    call = lambda x, a, b, ids: peftkern.multi_lora_linear(x, weight, None, a, b, ids, scalings, ranks,
                                                           check_ids=False, backend="torch")
    leaves = [torch.randn(6, K), torch.randn(3, 8, K), torch.randn(3, N, 8)]
    ids = torch.tensor([0, 2, -1, 1, 1, 0])
    compiled = [t.clone().requires_grad_() for t in leaves]
    eager = [t.clone().requires_grad_() for t in leaves]
    y = torch.compile(call, fullgraph=True)(*compiled, ids)
    y_eager = call(*eager, ids)
    y.square().sum().backward()
    y_eager.square().sum().backward()
    assert_close(y, y_eager.double(), "y")
    for name, got, want in zip(["dX", "dA", "dB"], compiled, eager):
        assert_close(got.grad, want.grad.double(), name)


def test_auto_path_picks_by_row_count_only():
    from peftkern.triton_kernels.multi_lora import DECODE_MAX_ROWS, _use_decode

    assert _use_decode("auto", DECODE_MAX_ROWS) and not _use_decode("auto", DECODE_MAX_ROWS + 1)
    assert _use_decode("decode", 10_000) and not _use_decode("prefill", 1)


def test_segments_group_rows_stably():
    from peftkern.triton_kernels.multi_lora import build_segments

    ids = torch.tensor([2, -1, 0, 2, 7, 0, 2, -1, 2, 2])  # 7 is out of range: grouped with the base rows
    seg = build_segments(ids, 3, block_m=2)
    assert seg.perm.tolist() == [1, 4, 7, 2, 5, 0, 3, 6, 8, 9]
    assert seg.bounds.tolist() == [[0, 3, 5, 5], [3, 5, 5, 10]]
    real = seg.tiles[:, seg.tiles[1] < seg.tiles[2]]
    # base: rows 0-2 in two tiles; adapter 0: one tile; adapter 2: three tiles; never two adapters in one tile
    assert real.tolist() == [[-1, -1, 0, 2, 2, 2], [0, 2, 3, 5, 7, 9], [3, 3, 5, 10, 10, 10]]
    assert seg.tiles.shape[1] == 5 + 4


def test_broadcast_adapter_ids():
    ids = torch.tensor([1, -1])
    assert broadcast_adapter_ids(ids, (2, 3)).tolist() == [[1, 1, 1], [-1, -1, -1]]
    with pytest.raises(ValueError, match="prefix"):
        broadcast_adapter_ids(ids, (3, 2))


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_layer_trains_two_adapters_in_one_batch(backend, path):
    """MultiLoRALinear: one mixed batch gives each slot the gradient of its own rows only."""
    torch.manual_seed(0)
    dev = _device(backend)
    layer = peftkern.MultiLoRALinear(torch.nn.Linear(K, N, device=dev), num_slots=3, r_max=8, backend=backend)
    layer.set_adapter(0, torch.randn(4, K), torch.randn(N, 4), 2.0)
    layer.set_adapter(2, torch.randn(8, K), torch.randn(N, 8), 0.5)
    x = torch.randn(2, 5, K, device=dev)
    ids = torch.tensor([2, 0], device=dev)  # [B], broadcast over the 5 positions
    layer.zero_grad()
    y = layer.forward(x, adapter_ids=ids) if path is None else peftkern.multi_lora_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, broadcast_adapter_ids(ids, (2, 5)),
        layer.scalings, layer.ranks, backend=backend, path=path)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    for slot, row in ((0, 1), (2, 0)):
        rank = int(layer.ranks[slot])
        a = layer.lora_A.detach()[slot, :rank].cpu().double().requires_grad_()
        b = layer.lora_B.detach()[slot, :, :rank].cpu().double().requires_grad_()
        out = reference.lora_linear(x[row].cpu().double(), layer.weight.cpu().double(),
                                    layer.bias.cpu().double(), a.cpu(), b.cpu(), float(layer.scalings[slot]))
        assert_close(y[row], out, f"y row {row}")
        out.backward(grad_y[row].cpu().double())
        assert_close(layer.lora_A.grad[slot, :rank], a.grad, f"dA slot {slot}")
        assert_close(layer.lora_B.grad[slot, :, :rank], b.grad, f"dB slot {slot}")
    # The unused slot and the ranks past slot 0's rank get exactly zero.
    assert torch.count_nonzero(layer.lora_A.grad[1]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[0, 4:]) == 0
    assert layer.weight.grad is None


def test_layer_without_ids_raises():
    layer = peftkern.MultiLoRALinear(torch.nn.Linear(K, N), num_slots=2, r_max=4)
    with pytest.raises(ValueError, match="adapter_ids: none given"):
        layer(torch.randn(2, K))
    with pytest.raises(ValueError, match="rank 5 is outside"):
        layer.set_adapter(0, torch.randn(5, K), torch.randn(N, 5), 1.0)
    with pytest.raises(ValueError, match="lora_b: expected shape"):
        layer.set_adapter(0, torch.randn(4, K), torch.randn(N + 1, 4), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("path,M", [("decode", 8), ("prefill", 96)])
def test_cuda_graph_capture_and_replay_with_new_ids(path, M):
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    L, r_max, K_, N_ = 6, 16, 256, 320
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K_, device=device, dtype=torch.bfloat16, generator=g)
    weight = torch.randn(N_, K_, device=device, dtype=torch.bfloat16, generator=g) / 16
    lora_a = torch.randn(L, r_max, K_, device=device, dtype=torch.bfloat16, generator=g) / 16
    lora_b = torch.randn(L, N_, r_max, device=device, dtype=torch.bfloat16, generator=g) / 4
    scalings = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5, 3.0], device=device)
    ranks = torch.tensor([16, 4, 8, 16, 1, 12], device=device, dtype=torch.int32)
    static_ids = torch.zeros(M, device=device, dtype=torch.int64)
    run = lambda: peftkern.multi_lora_linear(x, weight, None, lora_a, lora_b, static_ids, scalings, ranks,
                                             check_ids=False, backend="triton", path=path)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():  # warm up (autotune) outside the capture
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = run()
    for trial in range(3):
        new_ids = torch.randint(-1, L, (M,), device=device, generator=g)
        static_ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.multi_lora_linear(x.double().cpu(), weight.double().cpu(), None,
                                               lora_a.double().cpu(), lora_b.double().cpu(), new_ids.cpu(),
                                               scalings.cpu(), ranks.cpu())
        assert_close(out, expected, f"replay {trial}", dtype=torch.bfloat16)

