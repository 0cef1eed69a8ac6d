"""The serving pieces (LoRABatch, lora_shrink, lora_expand_add) on every backend and path against the float64
row loop of peftkern.reference: slices, offsets, heterogeneous ranks, -1 rows, reused and updated batches,
strided views, fp32/fp16/bf16; and multi_lora_linear / MultiLoRALinear / AdapterPool with a prebuilt batch."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, assert_close, capture_in_cuda_graph, cuda_ext, needs_extension

import peftkern
from peftkern import reference

IMPLS = [("torch", None), ("triton", "decode"), ("triton", "prefill")]
IMPL_IDS = ["torch", "triton-decode", "triton-prefill"]
K = 33


def _device(backend: str) -> str:
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def _problem(M, L, R, widths, ids, ranks, seed=0):
    """float64 x [M, K], A slices [L, R, K], B slices [L, N_j, R], ids [M], ranks [L], scalings [L]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    lora_a = [torch.randn(L, R, K, generator=g, dtype=torch.float64) / K**0.5 for _ in widths]
    lora_b = [torch.randn(L, n, R, generator=g, dtype=torch.float64) / R**0.5 for n in widths]
    scalings = [0.5 + 0.25 * i for i in range(L)]
    return x, lora_a, lora_b, torch.tensor(ids, dtype=torch.int64), torch.tensor(ranks, dtype=torch.int32), scalings


def _rounded(tensors, dtype):
    """Round to ``dtype`` and back, so the reference sees exactly the values the backend sees."""
    return [t.to(dtype).double() for t in tensors]


def _stacked_view(t: torch.Tensor, dev: str, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """``t`` as layer 1 of a stacked per-layer tensor [3, ...] (optionally stored with its last two dims
    swapped): a strided view, no copy."""
    if transposed:
        stacked = torch.zeros(3, t.shape[0], t.shape[2], t.shape[1], dtype=dtype, device=dev)
        stacked[1] = t.transpose(1, 2).to(dev, dtype)
        return stacked[1].transpose(1, 2)
    stacked = torch.zeros(3, *t.shape, dtype=dtype, device=dev)
    stacked[1] = t.to(dev, dtype)
    return stacked[1]


def _run(problem, backend, path, dtype, adapter_dtype=None, offset=0, strided=False, batch=None, pad=3):
    """Shrink then expand-add through the public API; returns (s, y, y_before, expected s, expected y)."""
    x, lora_a, lora_b, ids, ranks, scalings = problem
    adapter_dtype = adapter_dtype or dtype
    x = _rounded([x], dtype)[0]
    lora_a, lora_b = _rounded(lora_a, adapter_dtype), _rounded(lora_b, adapter_dtype)
    dev = _device(backend)
    M, width = x.shape[0], sum(b.shape[1] for b in lora_b)
    if strided:
        tx = torch.zeros(M, 2 * K, dtype=dtype, device=dev)[:, ::2]
        tx.copy_(x)
        ta = [_stacked_view(a, dev, adapter_dtype) for a in lora_a]
        tb = [_stacked_view(b, dev, adapter_dtype, transposed=True) for b in lora_b]
        assert not ta[0].is_contiguous() or ta[0].storage_offset() > 0
        assert tb[0].stride(2) != 1
    else:
        tx = x.to(dev, dtype)
        ta = [a.to(dev, adapter_dtype) for a in lora_a]
        tb = [b.to(dev, adapter_dtype) for b in lora_b]
    batch = batch if batch is not None else peftkern.LoRABatch(ids.to(dev), len(scalings))
    one = len(lora_a) == 1
    s = peftkern.lora_shrink(tx, ta[0] if one else ta, batch, ranks.to(dev), backend=backend, path=path)
    expected_s = reference.lora_shrink(x, lora_a[0] if one else lora_a, ids, ranks)
    y_full = torch.randn(M, offset + width + pad, dtype=torch.float64).to(dtype)
    y_before = y_full.double()
    # The slices land at columns offset.. of a wider output (a fused QKV GEMM's), written in place.
    y = y_full.to(dev)
    out = peftkern.lora_expand_add(y, s, tb[0] if one else tb, batch, torch.tensor(scalings, device=dev),
                                   offset, ranks.to(dev), backend=backend, path=path)
    assert out is y
    expected_y = y_before.clone()
    reference.lora_expand_add(expected_y, expected_s, lora_b[0] if one else lora_b, ids, scalings, offset, ranks)
    return s, y, y_before, expected_s, expected_y


SCENARIOS = {
    # name: (M, L, R, widths of the slices, ids, ranks)
    "qkv_mixed_ranks_base_rows": (13, 3, 16, [17, 9, 9], [2, -1, 0, 1, 1, 2, -1, 0, 0, 2, 1, -1, 2], [16, 4, 9]),
    "one_slice_empty_slot": (9, 4, 8, [21], [3, 0, 3, 1, -1, 0, 3, 1, 1], [8, 3, 0, 5]),
    "five_slices_two_launches": (6, 2, 8, [5, 4, 3, 6, 2], [1, 0, -1, 1, 1, 0], [8, 2]),
    "single_row": (1, 2, 16, [11, 7], [1], [16, 12]),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_shrink_expand_match_reference_fp32(scenario, backend, path):
    M, L, R, widths, ids, ranks = SCENARIOS[scenario]
    s, y, y_before, expected_s, expected_y = _run(_problem(M, L, R, widths, ids, ranks), backend, path,
                                                  torch.float32, offset=5)
    assert s.dtype == torch.float32
    assert s.shape == ((M, R) if len(widths) == 1 else (len(widths), M, R))
    assert_close(s, expected_s, "s")
    assert_close(y, expected_y, "y")
    # Rows with id -1 are untouched bit for bit, and so are the columns outside the slices.
    base = torch.tensor(ids) == -1
    assert torch.equal(y.cpu()[base].double(), y_before[base])
    assert torch.equal(y.cpu()[:, :5].double(), y_before[:, :5])
    assert torch.equal(y.cpu()[:, 5 + sum(widths):].double(), y_before[:, 5 + sum(widths):])


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_half_dtypes_strided_views(dtype, backend, path):
    """16-bit activations and adapters; x, every A and B strided views of stacked per-layer tensors (B stored
    rank-major), y a column slice: all read and written in place."""
    M, L, R, widths, ids, ranks = SCENARIOS["qkv_mixed_ranks_base_rows"]
    s, y, _, expected_s, expected_y = _run(_problem(M, L, R, widths, ids, ranks, seed=1), backend, path, dtype,
                                           offset=2, strided=True)
    assert_close(s, expected_s, "s", dtype=dtype)
    assert_close(y, expected_y, "y", dtype=dtype)


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_fp32_adapters_with_bf16_activations(backend, path):
    M, L, R, widths, ids, ranks = SCENARIOS["one_slice_empty_slot"]
    s, y, _, expected_s, expected_y = _run(_problem(M, L, R, widths, ids, ranks, seed=2), backend, path,
                                           torch.bfloat16, adapter_dtype=torch.float32, offset=1)
    assert_close(s, expected_s, "s", dtype=torch.float32)
    assert_close(y, expected_y, "y", dtype=torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's device size (16 programs) on CPU")
def test_decode_shrink_splits_k_deterministically(monkeypatch):
    """A few decode rows leave the device idle, so the shrink splits K into parts (here 4 parts of 32, the
    last ragged) whose fp32 partials are summed in a fixed order: equal to the reference, and bit-identical
    run to run."""
    from peftkern.triton_kernels import multi_lora as kernels

    seen = []
    decode_parts = kernels.decode_parts
    monkeypatch.setattr(kernels, "decode_parts", lambda *args: seen.append(decode_parts(*args)) or seen[-1])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 100, generator=g, dtype=torch.float64)
    lora_a = torch.randn(3, 8, 100, generator=g, dtype=torch.float64)
    ids, ranks = torch.tensor([2, 0]), torch.tensor([8, 8, 5], dtype=torch.int32)
    batch = peftkern.LoRABatch(ids, 3)
    s = peftkern.lora_shrink(x.float(), lora_a.float(), batch, ranks, backend="triton", path="decode")
    assert seen == [(4, 32)]
    assert_close(s, reference.lora_shrink(x.float().double(), lora_a.float().double(), ids, ranks), "s")
    again = peftkern.lora_shrink(x.float(), lora_a.float(), batch, ranks, backend="triton", path="decode")
    assert torch.equal(s, again)


def test_float64_on_the_torch_backend():
    x, lora_a, lora_b, ids, ranks, scalings = _problem(7, 3, 8, [6], [0, 2, -1, 1, 1, 0, 2], [8, 5, 2])
    s = peftkern.lora_shrink(x, lora_a[0], ids, ranks, backend="torch")
    assert s.dtype == torch.float64
    assert_close(s, reference.lora_shrink(x, lora_a[0], ids, ranks), "s")
    y = torch.zeros(7, 6, dtype=torch.float64)
    peftkern.lora_expand_add(y, s, lora_b[0], ids, scalings, ranks=ranks, backend="torch")
    expected = reference.lora_expand_add(torch.zeros(7, 6, dtype=torch.float64), s, lora_b[0], ids, scalings, 0, ranks)
    assert_close(y, expected, "y")


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_reused_and_updated_batch(backend, path):
    """One LoRABatch serves several calls; update() refreshes it in place (same buffers) and the next calls
    follow the new ids."""
    M, L, R, widths = 10, 3, 8, [7, 5]
    first = [0, 1, 2, -1, 0, 1, 2, -1, 0, 1]
    second = [2, 2, -1, 0, 1, 1, 0, 2, -1, -1]
    dev = _device(backend)
    batch = peftkern.LoRABatch(torch.tensor(first, device=dev), L)
    problem = _problem(M, L, R, widths, first, [8, 4, 6], seed=3)
    for _ in range(2):  # reused as is
        s, y, _, expected_s, expected_y = _run(problem, backend, path, torch.float32, batch=batch)
        assert_close(s, expected_s, "s")
        assert_close(y, expected_y, "y")
    ids_buffer = batch.adapter_ids.data_ptr()
    table = batch._segments.get(next(iter(batch._segments), None))
    batch.update(torch.tensor(second, dtype=torch.int32, device=dev))
    assert batch.adapter_ids.data_ptr() == ids_buffer and batch.adapter_ids.tolist() == second
    if table is not None:  # the prefill segment table was rebuilt in the same tensors
        assert batch._segments[table.block_m] is table
        from peftkern.triton_kernels._segments import build_segments

        fresh = build_segments(torch.tensor(second), L, table.block_m)
        assert all(torch.equal(old.cpu(), new) for old, new in zip(table[:3], fresh[:3]))
    x, lora_a, lora_b, _, ranks, scalings = problem
    s, y, _, expected_s, expected_y = _run((x, lora_a, lora_b, torch.tensor(second), ranks, scalings), backend,
                                           path, torch.float32, batch=batch)
    assert_close(s, expected_s, "s after update")
    assert_close(y, expected_y, "y after update")


def test_batch_capacity_and_update_checks():
    batch = peftkern.LoRABatch(torch.tensor([0, 1, -1]), 2, max_tokens=5)
    assert (batch.num_tokens, batch.max_tokens) == (3, 5) and batch.adapter_ids.tolist() == [0, 1, -1]
    batch.update(torch.tensor([[1, 1], [0, -1]]))  # any shape, flattened; fewer or more rows up to max_tokens
    assert batch.num_tokens == 4 and batch.adapter_ids.tolist() == [1, 1, 0, -1]
    with pytest.raises(ValueError, match="adapter_ids: expected at most max_tokens=5 ids, got 6"):
        batch.update(torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"adapter_ids: expected values in \[-1, 2\).*got 2 at index \(1,\)"):
        batch.update(torch.tensor([0, 2]))  # CPU ids: checked on the host by default
    batch.update(torch.tensor([0, 2]), check_ids=False)  # unchecked: the kernels treat 2 as -1
    with pytest.raises(TypeError, match="adapter_ids: expected dtype in"):
        peftkern.LoRABatch(torch.tensor([0.0]), 2)
    with pytest.raises(ValueError, match="num_adapters: expected a positive int"):
        peftkern.LoRABatch(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="max_tokens: expected a positive int"):
        peftkern.LoRABatch(torch.tensor([0]), 1, max_tokens=0)
    with pytest.raises(ValueError, match="adapter_ids: expected at most max_tokens=1"):
        peftkern.LoRABatch(torch.tensor([0, 0]), 1, max_tokens=1)
    with pytest.raises(TypeError, match="check_ids: expected a bool or None"):
        peftkern.LoRABatch(torch.tensor([0]), 1, check_ids="yes")
    with pytest.raises(ValueError, match=r"adapter_ids: expected a tensor on cpu \(the batch's device\) or the CPU"):
        batch.update(torch.zeros(1, dtype=torch.int64, device="meta"))
    # CPU ids for a batch elsewhere are checked on the CPU (free) and copied over.
    moved = peftkern.LoRABatch(torch.tensor([1, -1]), 2, device="meta")
    assert moved.device == torch.device("meta") and moved.adapter_ids.device.type == "meta"
    with pytest.raises(ValueError, match=r"adapter_ids: expected values in \[-1, 2\)"):
        moved.update(torch.tensor([0, 5]))


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_unchecked_bad_ids_act_as_no_adapter(backend, path):
    """check_ids=False (the CUDA default): ids outside [-1, L) read nothing out of bounds and act as -1."""
    ids = [0, 5, 1, -7, 2, 2**40, 1]
    dev = _device(backend)
    x, lora_a, lora_b, _, ranks, scalings = _problem(7, 3, 8, [9], ids[:1] * 7, [8, 8, 8], seed=4)
    batch = peftkern.LoRABatch(torch.tensor(ids, device=dev), 3, check_ids=False)
    s = peftkern.lora_shrink(x.float().to(dev), lora_a[0].float().to(dev), batch, backend=backend, path=path)
    valid = torch.tensor([i if 0 <= i < 3 else -1 for i in ids])
    expected_s = reference.lora_shrink(x, lora_a[0], valid)
    assert_close(s, expected_s, "s")
    y = torch.ones(7, 9, device=dev)
    peftkern.lora_expand_add(y, s, lora_b[0].float().to(dev), batch, scalings, backend=backend, path=path)
    expected = reference.lora_expand_add(torch.ones(7, 9, dtype=torch.float64), expected_s, lora_b[0], valid,
                                         scalings)
    assert_close(y, expected, "y")


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_zero_rows(backend, path):
    dev = _device(backend)
    batch = peftkern.LoRABatch(torch.zeros(0, dtype=torch.int64, device=dev), 2)
    s = peftkern.lora_shrink(torch.zeros(0, K, device=dev), [torch.randn(2, 4, K, device=dev)] * 2, batch,
                             backend=backend, path=path)
    assert s.shape == (2, 0, 4)
    y = torch.zeros(0, 6, device=dev)
    peftkern.lora_expand_add(y, s, [torch.randn(2, 3, 4, device=dev)] * 2, batch, [1.0, 1.0], backend=backend,
                             path=path)


def test_host_checks_default_to_cpu_tensors_only():
    """check_ids=None (every op's default): a host check for CPU tensors, none for CUDA ones (no sync)."""
    from peftkern.ops._checks import host_check_default

    assert host_check_default(None, torch.device("cpu")) is True
    assert host_check_default(None, torch.device("cuda", 0)) is False
    assert host_check_default(True, torch.device("cuda", 0)) is True
    assert host_check_default(False, torch.device("cpu")) is False


def test_cpu_default_checks_ids_and_reference_rejects_bad_ids():
    x, lora_a, lora_b, ids, ranks, scalings = _problem(3, 2, 4, [5], [0, 1, 0], [4, 4])
    with pytest.raises(ValueError, match=r"adapter_ids: expected values in \[-1, 2\)"):
        peftkern.lora_shrink(x, lora_a[0], torch.tensor([0, 2, 1]), backend="torch")
    with pytest.raises(ValueError, match="got -2 at row 1"):
        reference.lora_shrink(x, lora_a[0], torch.tensor([0, -2, 1]))


def _bad_call(what: str, **overrides):
    x, a, b = torch.randn(4, K), torch.randn(2, 8, K), torch.randn(2, 6, 8)
    batch = peftkern.LoRABatch(torch.tensor([0, 1, -1, 0]), 2)
    args = dict(x=x, lora_a=a, batch=batch, y=torch.zeros(4, 6), s=torch.zeros(4, 8), lora_b=b,
                scalings=[1.0, 2.0], offset=0, ranks=None)
    args.update(overrides)
    if what == "shrink":
        return peftkern.lora_shrink(args["x"], args["lora_a"], args["batch"], args["ranks"], backend="torch")
    return peftkern.lora_expand_add(args["y"], args["s"], args["lora_b"], args["batch"], args["scalings"],
                                    args["offset"], args["ranks"], backend="torch")


BAD_CASES = [
    ("shrink", {"x": torch.randn(4, K + 1)}, ValueError, r"lora_a: expected shape \(2, 8, 34\) \(\[L, R, K\]"),
    ("shrink", {"x": torch.randn(5, K)}, ValueError, "batch: holds ids for 4 rows, but the input has 5 rows"),
    ("shrink", {"x": torch.randn(4, K).half(), "lora_a": torch.randn(2, 8, K).bfloat16()}, TypeError,
     "lora_a: expected the dtype of x"),
    ("shrink", {"lora_a": [torch.randn(2, 8, K), torch.randn(2, 4, K)]}, ValueError, r"lora_a\[1\]: expected shape"),
    ("shrink", {"lora_a": [torch.randn(2, 8, K), torch.randn(2, 8, K).half()]}, TypeError,
     r"lora_a\[1\]: expected the dtype of lora_a\[0\]"),
    ("shrink", {"lora_a": []}, TypeError, "lora_a: expected a tensor"),
    ("shrink", {"lora_a": torch.randn(3, 8, K)}, ValueError, "batch: built for num_adapters=2"),
    ("shrink", {"lora_a": torch.randn(8, K)}, ValueError, "lora_a: expected 3 dimensions"),
    ("shrink", {"batch": [0, 1, -1, 0]}, TypeError, "batch: expected a peftkern.LoRABatch or an adapter ids"),
    ("shrink", {"ranks": [9, 1]}, ValueError, r"ranks\[0\]: expected a value in \[0, r_max=8\]"),
    ("shrink", {"ranks": torch.tensor([3, 9])}, ValueError, r"ranks: expected values in \[0, r_max=8\]"),
    ("expand", {"s": torch.zeros(4, 7)}, ValueError, r"s: expected shape \(4, 8\) \(\[M, R\] for one lora_b\)"),
    ("expand", {"lora_b": [torch.randn(2, 3, 8)] * 2}, ValueError, r"s: expected shape \(2, 4, 8\)"),
    ("expand", {"lora_b": [torch.randn(2, 3, 8), torch.randn(2, 3, 4)], "s": torch.zeros(2, 4, 8)}, ValueError,
     r"lora_b\[1\]: expected shape \(2, \*, 8\) \(\[L, N_j, R\], one L and R"),
    ("expand", {"lora_b": torch.randn(2, 6, 0), "s": torch.zeros(4, 0)}, ValueError, "lora_b: expected L >= 1"),
    ("expand", {"offset": 1}, ValueError, r"y: expected at least offset \+ sum\(N_j\) = 1 \+ 6 = 7 columns"),
    ("expand", {"offset": -1}, ValueError, "offset: expected an int >= 0"),
    ("expand", {"offset": 1.0}, ValueError, "offset: expected an int >= 0"),
    ("expand", {"y": torch.zeros(4, 6).half(), "lora_b": torch.randn(2, 6, 8).bfloat16()}, TypeError,
     "lora_b: expected the dtype of y"),
    ("expand", {"y": torch.zeros(24)}, ValueError, "y: expected 2 dimensions"),
    ("expand", {"s": torch.zeros(4, 8, dtype=torch.int32)}, TypeError, "s: expected dtype in"),
    ("expand", {"scalings": [1.0]}, ValueError, "scalings: expected 2 values"),
    ("expand", {"scalings": [1.0, float("nan")]}, ValueError, r"scalings\[1\]: expected a finite number"),
    ("expand", {"scalings": torch.tensor([1.0, float("inf")])}, ValueError, "scalings: expected finite values"),
]


@pytest.mark.parametrize("what, overrides, error, pattern", BAD_CASES, ids=lambda v: str(v)[:30])
def test_bad_inputs_raise_naming_the_argument(what, overrides, error, pattern, monkeypatch):
    from peftkern.ops import lora_serving

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(lora_serving, "_torch_shrink", no_launch)
    monkeypatch.setattr(lora_serving, "_torch_expand_add", no_launch)
    with pytest.raises(error, match=pattern):
        _bad_call(what, **overrides)


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="lora_shrink: backend 'cuda' needs CUDA tensors"):
        peftkern.lora_shrink(torch.randn(2, K), torch.randn(1, 4, K), torch.zeros(2, dtype=torch.int64),
                             backend="cuda")


def _serving_bindings():
    ext = cuda_ext()
    if not hasattr(ext, "lora_shrink"):
        pytest.skip("this peftkern._C was built before the serving bindings: rebuild it (pip install -e .)")
    return ext


@needs_extension
def test_cuda_bindings_check_arguments_before_any_launch():
    ext = _serving_bindings()
    shrink = dict(dtype=ext.FLOAT16, adapter_dtype=ext.FLOAT16, x=256, x_strides=(8, 1), slices=[(256, (16, 8, 1))],
                  adapter_ids=256, ids_int64=True, perm=0, tiles=0, n_tiles=0, ranks=256, s=256, M=3, K=8, L=2, R=2,
                  device=0, stream=0)
    cases = [
        ({"slices": []}, r"slices: expected 1 to 8 slices, got 0"),
        ({"slices": [(256, (16, 8, 1))] * 9}, r"slices: expected 1 to 8 slices, got 9"),
        ({"slices": [(256, (16, 8, 1)), (0, (16, 8, 1))]}, r"slices: expected a device address, got 0"),
        ({"adapter_dtype": ext.BFLOAT16}, r"adapter_dtype: expected the activation dtype"),
        ({"L": 0}, r"L: expected at least 1 adapter slot"),
        ({"x": 0}, r"x: expected a device address, got 0 for a \[3, 8\] matrix"),
        ({"s": 0}, r"s: expected a device address, got 0 for 6 elements"),
        ({"perm": 256}, r"perm, tiles: expected both addresses or neither"),
        ({"perm": 256, "tiles": 256, "n_tiles": 2}, r"n_tiles: expected multi_lora_segment_tiles\(M, L\) = 4"),
        ({"device": -1}, r"device: expected a CUDA device index >= 0"),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ext.lora_shrink(**{**shrink, **override})
    assert ext.lora_shrink(**{**shrink, "M": 0, "x": 0, "s": 0, "adapter_ids": 0}) is None  # no device touched
    expand = dict(dtype=ext.FLOAT32, adapter_dtype=ext.FLOAT32, y=256, y_strides=(9, 1), s=256,
                  slices=[(256, (8, 2, 1)), (256, (8, 2, 1))], cols=[4, 3], adapter_ids=256, ids_int64=False,
                  ranks=256, scalings=256, offset=2, M=3, L=2, R=2, device=0, stream=0)
    cases = [
        ({"cols": [4]}, r"cols: expected one width per slice \(2\), got 1"),
        ({"cols": [4, -1]}, r"cols: expected widths >= 0"),
        ({"offset": -1}, r"offset: expected >= 0, got -1"),
        ({"scalings": 0}, r"scalings: expected a device address"),
        ({"y": 0}, r"y: expected a device address, got 0 for a \[3, 9\] matrix"),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ext.lora_expand_add(**{**expand, **override})
    # multi_lora_forward / _backward take a caller's segment table: all three addresses and its length.
    from test_cuda_multi_lora import _forward_args

    with pytest.raises(ValueError, match="perm, bounds, tiles: expected all three addresses"):
        ext.multi_lora_forward(**_forward_args(ext, perm=256))
    with pytest.raises(ValueError, match=r"n_tiles: expected multi_lora_segment_tiles\(M, L\) = 4"):
        ext.multi_lora_forward(**_forward_args(ext, perm=256, bounds=256, tiles=256, n_tiles=3))


@needs_extension
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_cuda_backend_passes_the_bindings_arguments_in_order(path, monkeypatch):
    """No GPU here: the public functions on backend 'cuda' reach the real bindings' parameter lists with every
    address, stride, size and code in place, the batch's 64-row segment table for a prefill shrink."""
    import contextlib
    import re
    import types

    from peftkern.ops import _cuda_multi_lora as launchers
    from peftkern.ops import lora_serving
    from peftkern.ops import multi_lora as multi_lora_op

    ext = _serving_bindings()
    calls = {}

    def recorder(name):
        names = re.findall(r"(\w+): ", getattr(ext, name).__doc__.split(") ->")[0])
        return lambda *args: calls.setdefault(name, []).append(dict(zip(names, args, strict=True)))

    fake = types.SimpleNamespace(
        FLOAT16=ext.FLOAT16, BFLOAT16=ext.BFLOAT16, FLOAT32=ext.FLOAT32, lora_shrink=recorder("lora_shrink"),
        lora_expand_add=recorder("lora_expand_add"), MULTI_LORA_DECODE_MAX_ROWS=ext.MULTI_LORA_DECODE_MAX_ROWS,
        MULTI_LORA_SEGMENT_ROWS=ext.MULTI_LORA_SEGMENT_ROWS,
    )
    for module in (launchers, multi_lora_op):
        monkeypatch.setattr(module, "cuda_extension", lambda: fake)
    monkeypatch.setattr(lora_serving, "resolve_backend", lambda device, op, backend: "cuda")
    monkeypatch.setattr(launchers, "_launch_context", lambda t: (3, 12345))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())

    M, L, R = 70, 3, 16
    x = torch.randn(M, 2 * K, dtype=torch.bfloat16)[:, ::2]
    stacked = torch.randn(2, L, R, K, dtype=torch.bfloat16)
    lora_a = [stacked[1]] * 9  # nine slices: two launches of at most eight
    batch = peftkern.LoRABatch(torch.tensor([(t % 4) - 1 for t in range(M)], dtype=torch.int32), L)
    ranks = torch.tensor([16, 4, 0], dtype=torch.int32)
    s = peftkern.lora_shrink(x, lora_a, batch, ranks, path=path)
    assert s.shape == (9, M, R) and s.dtype == torch.float32
    first, second = calls["lora_shrink"]
    assert len(first["slices"]) == 8 and len(second["slices"]) == 1 and second["s"] == s[8].data_ptr()
    assert (first["dtype"], first["adapter_dtype"], first["device"], first["stream"]) == (ext.BFLOAT16,
                                                                                        ext.BFLOAT16, 3, 12345)
    assert (first["M"], first["K"], first["L"], first["R"]) == (M, K, L, R)
    assert first["x"] == x.data_ptr() and first["x_strides"] == (2 * K, 2) and first["s"] == s.data_ptr()
    assert first["slices"][0] == (stacked[1].data_ptr(), (R * K, K, 1))
    assert first["adapter_ids"] == batch.adapter_ids.data_ptr() and first["ids_int64"] is True
    if path == "prefill":
        table = batch.segments(64)
        assert (first["perm"], first["tiles"], first["n_tiles"]) == (table.perm.data_ptr(), table.tiles.data_ptr(),
                                                                     ext.multi_lora_segment_tiles(M, L))
    else:
        assert (first["perm"], first["tiles"], first["n_tiles"]) == (0, 0, 0)

    y = torch.zeros(M, 40, dtype=torch.bfloat16)
    lora_b = [torch.randn(L, R, n).transpose(1, 2) for n in (5, 7)]  # fp32 adapters, rank-major storage
    peftkern.lora_expand_add(y, s[:2], lora_b, batch, torch.tensor([0.5, 1.0, 2.0]), 3, ranks, path=path)
    (e,) = calls["lora_expand_add"]
    assert (e["dtype"], e["adapter_dtype"], e["offset"], e["cols"]) == (ext.BFLOAT16, ext.FLOAT32, 3, [5, 7])
    assert e["y"] == y.data_ptr() and e["y_strides"] == (40, 1) and e["s"] == s.data_ptr()
    assert e["slices"] == [(b.data_ptr(), (R * n, 1, n)) for b, n in zip(lora_b, (5, 7))]
    assert (e["M"], e["L"], e["R"], e["ids_int64"]) == (M, L, R, True)


@needs_extension
@pytest.mark.parametrize("rows", [8, 70])
def test_cuda_multi_lora_linear_reads_the_batch_table(rows, monkeypatch):
    """Backend 'cuda', a prebuilt LoRABatch: the forward (prefill) and the backward get the batch's 64-row
    segment table instead of building one per layer; the decode forward gets none (it reads no table)."""
    import contextlib
    import re
    import types

    from peftkern.ops import _cuda_multi_lora as launchers
    from peftkern.ops import multi_lora as multi_lora_op

    ext = _serving_bindings()
    calls = {}

    def recorder(name):
        names = re.findall(r"(\w+): ", getattr(ext, name).__doc__.split(") ->")[0])
        return lambda *args: calls.setdefault(name, []).append(dict(zip(names, args, strict=True)))

    fake = types.SimpleNamespace(**{k: getattr(ext, k) for k in dir(ext) if k.isupper() or "workspace" in k},
                                 multi_lora_forward=recorder("multi_lora_forward"),
                                 multi_lora_backward=recorder("multi_lora_backward"))
    for module in (launchers, multi_lora_op):
        monkeypatch.setattr(module, "cuda_extension", lambda: fake)
    monkeypatch.setattr(multi_lora_op, "resolve_backend", lambda device, op, backend: "cuda")
    monkeypatch.setattr(launchers, "_launch_context", lambda t: (0, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())

    L = 3
    batch = peftkern.LoRABatch(torch.tensor([(t % 4) - 1 for t in range(rows)]), L)
    x = torch.randn(rows, K, requires_grad=True)
    lora_a, lora_b = torch.randn(L, 8, K, requires_grad=True), torch.randn(L, 5, 8, requires_grad=True)
    y = peftkern.multi_lora_linear(x, torch.randn(5, K), None, lora_a, lora_b, batch, [1.0] * L)
    y.sum().backward()
    table = batch.segments(ext.MULTI_LORA_SEGMENT_ROWS)
    addresses = (table.perm.data_ptr(), table.bounds.data_ptr(), table.tiles.data_ptr(),
                 ext.multi_lora_segment_tiles(rows, L))
    for name in ("multi_lora_forward", "multi_lora_backward"):
        (call,) = calls[name]
        assert (call["perm"], call["bounds"], call["tiles"], call["n_tiles"]) == addresses, name
    assert list(batch._segments) == [ext.MULTI_LORA_SEGMENT_ROWS]  # one table, built once
    with torch.no_grad():  # inference: a decode forward reads no table
        peftkern.multi_lora_linear(x, torch.randn(5, K), None, lora_a, lora_b, peftkern.LoRABatch(
            torch.zeros(rows, dtype=torch.int64), L), [1.0] * L)
    expected = (0, 0, 0, 0) if rows <= ext.MULTI_LORA_DECODE_MAX_ROWS else None
    last = calls["multi_lora_forward"][-1]
    if expected is not None:
        assert (last["perm"], last["bounds"], last["tiles"], last["n_tiles"]) == expected


def test_opcheck_torch_backend():
    x, lora_a, lora_b, ids, ranks, scalings = _problem(5, 3, 8, [4, 6], [0, 2, -1, 1, 2], [8, 3, 5])
    torch.library.opcheck(torch.ops.peftkern.lora_shrink.default, (x, lora_a, ids, ranks, None, None, 0, "torch"))
    s = reference.lora_shrink(x, lora_a, ids, ranks)
    args = (torch.randn(5, 12, dtype=torch.float64), s, lora_b, ids, torch.tensor(scalings, dtype=torch.float64),
            ranks, 1, None, None, 0, "torch")
    torch.library.opcheck(torch.ops.peftkern.lora_expand_add.default, args)


def test_torch_compile_fullgraph_with_a_batch():
    """A prebuilt LoRABatch and check_ids=False leave no host sync: shrink + expand-add compile as one graph."""
    x, lora_a, lora_b, ids, ranks, scalings = _problem(4, 2, 4, [3, 5], [0, 1, -1, 1], [4, 2])
    x, lora_a, lora_b = x.float(), [a.float() for a in lora_a], [b.float() for b in lora_b]
    batch, scalings = peftkern.LoRABatch(ids, 2), torch.tensor(scalings)

    def step(x, y):
        s = peftkern.lora_shrink(x, lora_a, batch, ranks, backend="torch", check_ids=False)
        return peftkern.lora_expand_add(y, s, lora_b, batch, scalings, 1, ranks, backend="torch", check_ids=False)

    compiled = torch.compile(step, fullgraph=True)(x, torch.zeros(4, 10))
    assert torch.equal(compiled, step(x, torch.zeros(4, 10)))


def test_random_problems_match_reference():
    """Property test: random sizes, slot counts, ranks, ids, slices and offsets on every backend and path."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(st.data())
    def run(data):
        M = data.draw(st.integers(1, 20), label="M")
        L = data.draw(st.integers(1, 5), label="L")
        R = data.draw(st.sampled_from([1, 4, 8, 16, 24]), label="R")
        widths = data.draw(st.lists(st.integers(1, 20), min_size=1, max_size=5), label="widths")
        ranks = data.draw(st.lists(st.integers(0, R), min_size=L, max_size=L), label="ranks")
        ids = data.draw(st.lists(st.integers(-1, L - 1), min_size=M, max_size=M), label="ids")
        offset = data.draw(st.integers(0, 5), label="offset")
        backend, path = data.draw(st.sampled_from(IMPLS), label="impl")
        s, y, _, expected_s, expected_y = _run(_problem(M, L, R, widths, ids, ranks), backend, path,
                                               torch.float32, offset=offset, pad=data.draw(st.integers(0, 3)))
        assert_close(s, expected_s, "s")
        assert_close(y, expected_y, "y")

    run()


# ---- multi_lora_linear, MultiLoRALinear and AdapterPool with a prebuilt batch --------------------------------


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_multi_lora_linear_with_a_batch_builds_the_segments_once(backend, path, monkeypatch):
    """Two layers, forward and backward, one LoRABatch: the results of plain ids, and (Triton) the segment
    table built once for all of it instead of in every layer's forward and backward."""
    from peftkern.triton_kernels import _segments
    from peftkern.triton_kernels import multi_lora as triton_multi_lora

    builds = []
    original = _segments.build_segments
    for module in (_segments, triton_multi_lora):  # LoRABatch's builder, and the launchers' own
        monkeypatch.setattr(module, "build_segments", lambda *a: builds.append(1) or original(*a))
    dev = _device(backend)
    torch.manual_seed(0)
    layers = [peftkern.MultiLoRALinear(torch.nn.Linear(K, K, device=dev), 3, 8, backend=backend) for _ in range(2)]
    for layer in layers:
        for slot, rank in ((0, 8), (2, 3)):
            layer.set_adapter(slot, torch.randn(rank, K), torch.randn(K, rank), 0.5 + slot)
    ids = torch.tensor([[2, 0, -1], [0, 2, 2]], device=dev)
    x = torch.randn(2, 3, K, device=dev)

    def run(adapter_ids):
        xs = x.clone().requires_grad_()
        y = xs
        for layer in layers:
            y = peftkern.multi_lora_linear(y, layer.weight, layer.bias, layer.lora_A, layer.lora_B, adapter_ids,
                                           layer.scalings, layer.ranks, backend=backend, path=path)
        y.square().sum().backward()
        grads = [xs.grad] + [p.grad.clone() for layer in layers for p in (layer.lora_A, layer.lora_B)]
        for layer in layers:
            layer.zero_grad()
        return y.detach(), grads

    y_ids, grads_ids = run(ids)
    calls_with_ids = len(builds)
    builds.clear()
    y_batch, grads_batch = run(peftkern.LoRABatch(ids, 3))
    assert torch.equal(y_batch, y_ids)
    for got, want in zip(grads_batch, grads_ids):
        assert torch.equal(got, want)
    if backend == "triton":
        assert calls_with_ids == (2 if path == "decode" else 4)  # per layer: backward (and prefill forward)
        assert len(builds) == 1


def test_multi_lora_linear_batch_mismatch_raises():
    batch = peftkern.LoRABatch(torch.tensor([0, 1]), 2)
    w, a, b = torch.randn(4, K), torch.randn(3, 8, K), torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="adapter_ids: built for num_adapters=2"):
        peftkern.multi_lora_linear(torch.randn(2, K), w, None, a, b, batch, [1.0] * 3)
    with pytest.raises(ValueError, match="adapter_ids: holds ids for 2 rows, but the input has 3 rows"):
        peftkern.multi_lora_linear(torch.randn(3, K), w, None, a[:2], b[:2], batch, [1.0] * 2)


def test_pool_batch_builds_the_metadata_once_for_all_layers(monkeypatch):
    """``with pool.batch(...)``: every layer of the model uses one LoRABatch per input shape; names, slot-id
    tensors and a caller's LoRABatch give the same output."""
    from peftkern.ops import lora_batch

    model = torch.nn.Sequential(torch.nn.Linear(K, K), torch.nn.ReLU(), torch.nn.Linear(K, K))
    pool = peftkern.AdapterPool(model, ["0", "2"], num_slots=3, r_max=4)
    for name in ("a", "b"):
        state = {f"base_model.model.{m}.lora_{w}.weight": torch.randn(*(4, K) if w == "A" else (K, 4))
                 for m in ("0", "2") for w in ("A", "B")}
        pool.load(name, state, {"r": 4, "lora_alpha": 8})
    x = torch.randn(3, 5, K)
    built = []
    original_init = lora_batch.LoRABatch.__init__
    monkeypatch.setattr(lora_batch.LoRABatch, "__init__",
                        lambda self, *a, **kw: built.append(1) or original_init(self, *a, **kw))
    with torch.no_grad(), pool.batch(["b", None, "a"]) as ids:
        by_names = model(x)
    assert ids.tolist() == [1, -1, 0]
    assert len(built) == 2  # the ids [B] once, then one batch for x's [B, T] rows, shared by both layers
    with torch.no_grad(), pool.batch(torch.tensor([1, -1, 0])):
        by_slots = model(x)
    batch = peftkern.LoRABatch(torch.tensor([1, -1, 0])[:, None].expand(3, 5), 3)
    with torch.no_grad(), pool.batch(batch):
        by_batch = model(x)
    assert torch.equal(by_names, by_slots) and torch.equal(by_names, by_batch)
    with pytest.raises(ValueError, match="names: a LoRABatch for this pool needs num_adapters=3"):
        pool.batch(peftkern.LoRABatch(torch.tensor([0]), 2)).__enter__()


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_cuda_backend_matches_reference(scenario, dtype, path, no_tf32):
    """Backend 'cuda' (csrc/include/peftkern/lora_serving.cuh) on a GPU: strided views, slices, offsets."""
    M, L, R, widths, ids, ranks = SCENARIOS[scenario]
    s, y, _, expected_s, expected_y = _run(_problem(M, L, R, widths, ids, ranks, seed=5), "cuda", path, dtype,
                                           offset=2, strided=True)
    assert_close(s, expected_s, "s", dtype=dtype)
    assert_close(y, expected_y, "y", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("path,M", [("decode", 8), ("prefill", 96)])
def test_cuda_graph_capture_and_replay_with_updated_batch(backend, path, M):
    """Shrink + expand-add captured once around a caller's base GEMM; each replay after batch.update(new ids)
    matches the reference for the new ids."""
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    L, R, K_, widths = 5, 16, 256, [128, 64, 64]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K_, device=device, dtype=torch.bfloat16, generator=g)
    weight = torch.randn(sum(widths), K_, device=device, dtype=torch.bfloat16, generator=g) / 16
    lora_a = [torch.randn(L, R, K_, device=device, dtype=torch.bfloat16, generator=g) / 16 for _ in widths]
    lora_b = [torch.randn(L, n, R, device=device, dtype=torch.bfloat16, generator=g) / 4 for n in widths]
    scalings = torch.tensor([0.5, 1.0, 2.0, 0.25, 1.5], device=device)
    ranks = torch.tensor([16, 4, 8, 0, 12], device=device, dtype=torch.int32)
    batch = peftkern.LoRABatch(torch.zeros(M, device=device, dtype=torch.int64), L)

    def step():
        y = x @ weight.T
        s = peftkern.lora_shrink(x, lora_a, batch, ranks, backend=backend, path=path)
        return peftkern.lora_expand_add(y, s, lora_b, batch, scalings, 0, ranks, backend=backend, path=path)

    graph, out = capture_in_cuda_graph(step)
    for trial in range(3):
        new_ids = torch.randint(-1, L, (M,), device=device, generator=g)
        batch.update(new_ids if trial % 2 else new_ids.cpu())  # from the device or (checked) from the host
        graph.replay()
        torch.cuda.synchronize()
        ids64 = new_ids.cpu()
        expected = (x.double() @ weight.double().T).cpu()
        s = reference.lora_shrink(x.double().cpu(), [a.double().cpu() for a in lora_a], ids64, ranks.cpu())
        reference.lora_expand_add(expected, s, [b.double().cpu() for b in lora_b], ids64, scalings.cpu(), 0,
                                  ranks.cpu())
        assert_close(out, expected, f"replay {trial}", dtype=torch.bfloat16)


@pytest.mark.gpu
def test_no_host_sync_by_default_on_cuda():
    """CUDA tensors, default arguments: no op of a serving step syncs the host (torch's sync debug mode
    raises on any synchronizing call), the plain-ids multi_lora_linear and prompt ops included."""
    device = "cuda"
    L, R, K_, N_ = 3, 8, 64, 48
    x = torch.randn(80, K_, device=device, dtype=torch.bfloat16)
    weight = torch.randn(N_, K_, device=device, dtype=torch.bfloat16)
    lora_a = torch.randn(L, R, K_, device=device, dtype=torch.bfloat16)
    lora_b = torch.randn(L, N_, R, device=device, dtype=torch.bfloat16)
    scalings = torch.ones(L, device=device)
    ranks = torch.tensor([8, 4, 0], device=device, dtype=torch.int32)
    embed = torch.randn(50, 16, device=device)
    prompts, prefix = torch.randn(2, 3, 16, device=device), torch.randn(2, 3, 2 * 2 * 2 * 4, device=device)
    input_ids, prompt_ids = torch.randint(0, 50, (2, 5), device=device), torch.tensor([0, 1], device=device)

    def step():
        for rows in (8, 80):  # decode and prefill
            ids = torch.randint(-1, L, (rows,), device=device)
            batch = peftkern.LoRABatch(ids, L)
            s = peftkern.lora_shrink(x[:rows], lora_a, batch, ranks)
            peftkern.lora_expand_add(torch.zeros(rows, N_, device=device, dtype=torch.bfloat16), s, lora_b, batch,
                                     scalings, 0, ranks)
            batch.update(torch.randint(-1, L, (rows,), device=device))
            for adapter_ids in (batch, ids):
                peftkern.multi_lora_linear(x[:rows], weight, None, lora_a, lora_b, adapter_ids, scalings, ranks)
        peftkern.prompt_concat(input_ids, embed, prompts, prompt_ids)
        peftkern.prefix_kv(prefix, prompt_ids, 2, 2)

    step()  # autotuning (which times configs, so syncs) happens on the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_header_on_the_emulator(tmp_path):
    """csrc/include/peftkern/lora_serving.cuh (launch_lora_shrink, launch_lora_expand_add) on the CPU emulator
    under AddressSanitizer against float64 loops: slices of different widths from an offset, mixed ranks and
    a rank-0 slot, bad ids, decode and prefill shrinks, strided x / y, B stored rank-major, a layer of a
    stacked weight, every dtype pairing; untouched rows and columns keep their exact values."""
    import _emulator

    binary = _emulator.build(tmp_path, "lora_serving_emulated")
    expected = "22 cases, 0 failures" if _emulator.FULL else "19 cases, 0 failures"
    assert _emulator.run(binary).strip().endswith(expected)


def test_vendoring_example_compiles_and_runs_where_it_can(tmp_path):
    """csrc/examples/lora_serving_example.cu (a QKV step: segment table once, shrink and expand-add per layer
    with stacked per-layer weights) builds with nvcc and the header alone; on a GPU it checks itself."""
    import subprocess
    from pathlib import Path

    import _emulator

    if _emulator.NVCC is None:
        pytest.skip("no nvcc here")
    root = Path(__file__).resolve().parent.parent
    binary = tmp_path / "lora_serving_example"
    build = subprocess.run(
        [_emulator.NVCC, "-std=c++17", "-O1", f"-I{root / 'csrc' / 'include'}", "-gencode=arch=compute_80,code=sm_80",
         str(root / "csrc" / "examples" / "lora_serving_example.cu"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        assert run.returncode == 0 and run.stdout.strip().endswith("0 out of tolerance"), run.stdout + run.stderr
    else:
        assert run.returncode == 2 and "no CUDA device here" in run.stdout, run.stdout + run.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 200])
def test_multi_lora_linear_with_a_batch_launches_at_most_three_kernels(rows):
    """Forward of one layer with a prebuilt LoRABatch (inference, Triton, after warm-up): the shrink and the
    fused GEMM, nothing else (no segment table, no id check, no copies)."""
    from torch.profiler import ProfilerActivity, profile

    device = "cuda"
    x = torch.randn(rows, 256, device=device, dtype=torch.bfloat16)
    weight = torch.randn(512, 256, device=device, dtype=torch.bfloat16)
    lora_a = torch.randn(4, 16, 256, device=device, dtype=torch.bfloat16)
    lora_b = torch.randn(4, 512, 16, device=device, dtype=torch.bfloat16)
    scalings = torch.ones(4, device=device)
    ranks = torch.tensor([16, 8, 4, 0], device=device, dtype=torch.int32)
    batch = peftkern.LoRABatch(torch.randint(-1, 4, (rows,), device=device), 4)
    call = lambda: peftkern.multi_lora_linear(x, weight, None, lora_a, lora_b, batch, scalings, ranks,
                                              backend="triton")
    with torch.no_grad():
        call()  # autotune and build the batch's table (prefill) outside the count
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= 3, [e.name for e in kernels]


# ---- warmup before CUDA-graph capture -------------------------------------------------------------------


def _variant(count: int) -> tuple[int, bool, bool]:
    """What a row count changes in what Triton compiles and tunes: its power-of-two bucket and the
    integer specializations (== 1, multiple of 16)."""
    return max(1, 1 << (count - 1).bit_length()), count == 1, count % 16 == 0


@pytest.mark.parametrize("max_tokens", [1, 2, 17, 64, 100, 8192])
def test_warmup_row_counts_reach_every_variant(max_tokens):
    counts = peftkern.warmup_row_counts(max_tokens)
    assert counts == sorted(set(counts)) and 1 <= counts[0] and counts[-1] == max_tokens
    assert {_variant(c) for c in counts} == {_variant(c) for c in range(1, max_tokens + 1)}
    assert len(counts) <= 3 * max_tokens.bit_length() + 1  # a few per bucket, not every count


def test_warmup_runs_every_count_without_grad():
    seen = []
    counts = peftkern.warmup(lambda m: seen.append((m, torch.is_grad_enabled())), 40)
    assert seen == [(m, False) for m in counts] and counts == peftkern.warmup_row_counts(40)
    with pytest.raises(ValueError, match="max_tokens"):
        peftkern.warmup(lambda m: None, 0)


@pytest.mark.gpu
def test_after_warmup_no_batch_size_compiles_or_tunes():
    """After warmup(max_tokens), a multi-LoRA layer at any row count up to max_tokens compiles and tunes
    nothing new (Triton's per-kernel caches do not grow): safe to capture in a CUDA graph."""
    from peftkern.triton_kernels import multi_lora as kernels

    layer = peftkern.MultiLoRALinear(torch.nn.Linear(256, 256, device="cuda", dtype=torch.bfloat16),
                                     num_slots=4, r_max=16).eval()
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.ranks.fill_(16)
        layer.scalings.fill_(2.0)

    def step(m):
        ids = torch.randint(-1, 4, (m,), device="cuda")
        layer(torch.randn(m, 256, device="cuda", dtype=torch.bfloat16), adapter_ids=ids)

    def cache_sizes():
        tuned = [k for k in vars(kernels).values() if hasattr(k, "cache") and hasattr(k, "configs")]
        return [len(k.cache) for k in tuned] + [sum(len(c) for c in k.fn.cache.values()) for k in tuned]

    peftkern.warmup(step, 200)
    before = cache_sizes()
    for m in (5, 33, 64, 65, 130, 200):
        step(m)
    assert cache_sizes() == before
