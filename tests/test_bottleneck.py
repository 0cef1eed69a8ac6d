"""``peftkern.bottleneck_adapter`` on every backend against ``reference.bottleneck_adapter`` in float64:
outputs and every gradient, all activations, fp32/fp16/bf16, odd sizes, mixed adapter ids with -1, M = 0,
leading batch dims, non-contiguous inputs; bad input; the custom op's registration."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, assert_close, cast

import peftkern
from peftkern import reference
from peftkern.ops.bottleneck import bottleneck_adapter

BACKENDS = ["torch", "triton"]
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "tanh"]
NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "residual")


def make_inputs(lead, dim, bottleneck, num_adapters=None, biases=True, residual=False, scale=0.3):
    """float64 masters: x [*lead, dim] and weights (stacked [L, ...] when num_adapters is not None)."""
    adapters = () if num_adapters is None else (num_adapters,)
    inputs = {
        "x": torch.randn(*lead, dim, dtype=torch.float64),
        "down_weight": torch.randn(*adapters, bottleneck, dim, dtype=torch.float64) * scale,
        "down_bias": torch.randn(*adapters, bottleneck, dtype=torch.float64) * scale if biases else None,
        "up_weight": torch.randn(*adapters, dim, bottleneck, dtype=torch.float64) * scale,
        "up_bias": torch.randn(*adapters, dim, dtype=torch.float64) * scale if biases else None,
        "residual": torch.randn(*lead, dim, dtype=torch.float64) if residual else None,
    }
    return inputs


def run_and_compare(inputs, dtype, backend, activation="relu", scaling=0.7, adapter_ids=None,
                    weight_dtype=None, grad_scale=1.0):
    """Run the op on ``backend`` in ``dtype`` and the reference in float64 on the same (rounded) values;
    compare the output and the gradients of every input that exists."""
    weight_dtype = weight_dtype or dtype
    ours, ref = {}, {}
    for name, value in inputs.items():
        if value is None:
            ours[name] = ref[name] = None
            continue
        target = dtype if name in ("x", "residual") else weight_dtype
        ours[name] = cast(value, target, requires_grad=True)
        ref[name] = cast(ours[name], torch.float64, requires_grad=True)
    kwargs = dict(activation=activation, scaling=scaling, adapter_ids=adapter_ids)
    out = bottleneck_adapter(
        *(ours[n] for n in NAMES[:5]), residual=ours["residual"], backend=backend, **kwargs
    )
    expected = reference.bottleneck_adapter(*(ref[n] for n in NAMES[:5]), residual=ref["residual"], **kwargs)
    assert out.dtype == dtype and out.shape == inputs["x"].shape
    assert_close(out, expected, "y")
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad.to(dtype).to(torch.float64))
    for name in NAMES:
        if ours[name] is not None:
            assert ours[name].grad is not None, f"{name}: no gradient"
            assert_close(ours[name].grad, ref[name].grad, f"grad {name}", scale=grad_scale)
    return out


def mixed_ids(lead, num_adapters, generator_seed=0):
    """Ids in [-1, L) with every adapter and -1 present (rows = prod(lead) >= L + 1)."""
    rows = 1
    for size in lead:
        rows *= size
    ids = torch.arange(rows) % (num_adapters + 1) - 1
    ids = ids[torch.randperm(rows, generator=torch.Generator().manual_seed(generator_seed))]
    return ids.reshape(lead)


# ---- outputs and gradients vs the reference ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mixed_adapters_all_activations(backend, dtype, activation):
    """3-D x, three adapters, every row's own adapter, -1 rows passing through."""
    lead = (2, 9)
    inputs = make_inputs(lead, 33, 17, num_adapters=3)
    ids = mixed_ids(lead, 3)
    out = run_and_compare(inputs, dtype, backend, activation, adapter_ids=ids)
    # -1 rows come out as the residual (x), bit for bit.
    passthrough = ids == -1
    assert torch.equal(out[passthrough], inputs["x"].to(dtype)[passthrough])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, dim, bottleneck", [(1, 17, 1), (17, 33, 17), (33, 1, 33)])
def test_single_adapter_odd_sizes(backend, dtype, rows, dim, bottleneck):
    run_and_compare(make_inputs((rows,), dim, bottleneck), dtype, backend, "gelu", scaling=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapters_separate_residual_no_bias(backend, dtype):
    """fp32 adapter weights beside 16-bit activations; residual given apart from x; no biases; int32 ids."""
    lead = (3, 7)
    inputs = make_inputs(lead, 20, 9, num_adapters=2, biases=False, residual=True)
    ids = mixed_ids(lead, 2).to(torch.int32)
    run_and_compare(inputs, dtype, backend, "silu", scaling=-0.5, adapter_ids=ids, weight_dtype=torch.float32)


def _id_pattern(pattern, rows, num_adapters):
    """[rows] ids laid out so that tiles of 16 rows (the interpreter's BLOCK_M) meet every case."""
    position = torch.arange(rows)
    if pattern == "interleaved":  # every tile holds every adapter and -1
        return position % (num_adapters + 1) - 1
    if pattern == "runs":  # runs of 5 in descending order: tiles straddle two or three adapters
        return num_adapters - 1 - (position // 5) % (num_adapters + 1)
    if pattern == "one":
        return torch.full((rows,), num_adapters - 1)
    if pattern == "none":
        return torch.full((rows,), -1)
    # "skip": adapters 0 and L - 1 only (empty groups between them), shuffled
    ids = torch.where(position % 3 == 0, 0, num_adapters - 1)
    return ids[torch.randperm(rows, generator=torch.Generator().manual_seed(rows))]


@pytest.mark.parametrize("pattern, rows", [
    ("interleaved", 33), ("interleaved", 1), ("runs", 33), ("runs", 17), ("one", 17), ("none", 17),
    ("skip", 33),
])
def test_triton_rows_grouped_by_adapter_any_order(pattern, rows):
    """The row kernels tile the rows in adapter order, one adapter per tile: every mix of ids (interleaved,
    runs crossing tiles, one adapter, none, adapters absent between present ones), forward and every
    gradient against the reference; rows without an adapter are their residual bit for bit."""
    num_adapters = 4
    inputs = make_inputs((rows,), 24, 17, num_adapters=num_adapters)
    ids = _id_pattern(pattern, rows, num_adapters)
    out = run_and_compare(inputs, torch.float32, "triton", "gelu", adapter_ids=ids)
    passthrough = ids == -1
    assert torch.equal(out[passthrough], inputs["x"].float()[passthrough])


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_ids_for_3d_x(backend):
    lead = (2, 5)
    inputs = make_inputs(lead, 16, 8, num_adapters=2)
    run_and_compare(inputs, torch.float32, backend, "tanh", adapter_ids=mixed_ids(lead, 2).reshape(-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stacked", [False, True])
def test_empty_batch(backend, stacked):
    """M = 0: an empty output and zero weight gradients."""
    inputs = make_inputs((0, 3), 16, 4, num_adapters=2 if stacked else None)
    ids = torch.zeros((0, 3), dtype=torch.int64) if stacked else None
    run_and_compare(inputs, torch.float32, backend, "relu", adapter_ids=ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """x a transposed view, residual a strided slice, weights transposed views: any strides."""
    x = torch.randn(24, 10, dtype=torch.float64).T  # [10, 24], strides (1, 10)
    residual = torch.randn(10, 48, dtype=torch.float64)[:, ::2]
    down = torch.randn(2, 24, 5, dtype=torch.float64).transpose(1, 2) * 0.3  # [2, 5, 24]
    up = torch.randn(2, 5, 24, dtype=torch.float64).transpose(1, 2) * 0.3  # [2, 24, 5]
    assert not (x.is_contiguous() or residual.is_contiguous() or down.is_contiguous() or up.is_contiguous())
    inputs = {"x": x, "down_weight": down, "down_bias": torch.randn(2, 5, dtype=torch.float64),
              "up_weight": up, "up_bias": torch.randn(2, 24, dtype=torch.float64), "residual": residual}
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0])
    # the op's own non-contiguous views (cast() makes contiguous copies, so call the op directly here)
    out = bottleneck_adapter(x.float(), down.float(), inputs["down_bias"].float(), up.float(),
                             inputs["up_bias"].float(), "gelu_tanh", 0.9, residual.float(), ids,
                             backend=backend)
    expected = reference.bottleneck_adapter(x, down, inputs["down_bias"], up, inputs["up_bias"], "gelu_tanh",
                                            0.9, residual, ids)
    assert_close(out, expected, "y", dtype=torch.float32)
    run_and_compare(inputs, torch.float32, backend, "gelu_tanh", scaling=0.9, adapter_ids=ids)


def test_float64_torch_backend_gradcheck():
    inputs = make_inputs((5,), 6, 3, num_adapters=2)
    ids = torch.tensor([1, -1, 0, 1, 0])
    leaves = [inputs[n].requires_grad_() for n in NAMES[:5]]

    def fn(*tensors):
        return bottleneck_adapter(*tensors, activation="gelu", scaling=0.8, adapter_ids=ids, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_adapter_still_gives_dx(backend):
    """Only x requires grad (a frozen adapter in front of trainable layers): dX alone, correct."""
    inputs = make_inputs((7,), 12, 4)
    x = inputs["x"].float().requires_grad_()
    weights = [inputs[n].float() for n in NAMES[1:5]]
    bottleneck_adapter(x, *weights, activation="tanh", backend=backend).sum().backward()
    x_ref = inputs["x"].clone().requires_grad_()
    reference.bottleneck_adapter(x_ref, *(inputs[n] for n in NAMES[1:5]), activation="tanh").sum().backward()
    assert_close(x.grad, x_ref.grad, "grad x")


def test_autocast_runs_in_the_autocast_dtype_with_fp32_adapters():
    inputs = make_inputs((6,), 16, 4)
    x = inputs["x"].float()
    weights = [inputs[n].float() for n in NAMES[1:5]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bottleneck_adapter(x, *weights, activation="relu", backend="torch")
    assert out.dtype == torch.bfloat16
    expected = reference.bottleneck_adapter(x.bfloat16().double(), *(inputs[n] for n in NAMES[1:5]))
    assert_close(out, expected, "y")


def test_triton_backward_is_deterministic():
    lead = (40,)
    inputs = make_inputs(lead, 20, 6, num_adapters=3)
    ids = mixed_ids(lead, 3)
    grads = []
    for _ in range(2):
        leaves = [inputs[n].float().requires_grad_() for n in NAMES[:5]]
        out = bottleneck_adapter(*leaves, activation="silu", adapter_ids=ids, backend="triton")
        out.backward(torch.ones_like(out))
        grads.append([leaf.grad for leaf in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_kernels_stay_in_bounds_for_any_ids():
    """The Triton kernels, called past the op's checks, treat ids outside [0, L) as 'no adapter'."""
    from peftkern.triton_kernels.bottleneck import bottleneck_backward, bottleneck_forward

    inputs = make_inputs((6,), 16, 4, num_adapters=2)
    ids = torch.tensor([0, 7, -5, 1, 2**40, -1])
    x, down, down_bias, up, up_bias = (inputs[n].float() for n in NAMES[:5])
    y, h = bottleneck_forward(x, down, down_bias, up, up_bias, None, ids, "relu", 1.0)
    cleaned = torch.where((ids >= 0) & (ids < 2), ids, -1)
    expected = reference.bottleneck_adapter(*(inputs[n] for n in NAMES[:5]), adapter_ids=cleaned)
    assert_close(y, expected, "y")
    flags = (True, True, True, True, True)
    grads = bottleneck_backward(torch.ones_like(y), x, down, up, h, ids, "relu", 1.0, *flags)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][1], torch.ones(16))  # a no-adapter row's dX is dY alone


# ---- bad input --------------------------------------------------------------------------------------------


def _good():
    return dict(
        x=torch.randn(4, 8),
        down_weight=torch.randn(2, 3, 8),
        down_bias=torch.randn(2, 3),
        up_weight=torch.randn(2, 8, 3),
        up_bias=torch.randn(2, 8),
        activation="relu",
        scaling=1.0,
        residual=None,
        adapter_ids=torch.tensor([0, 1, -1, 0]),
    )


BAD = [
    ({"x": [1.0, 2.0]}, TypeError, "x: expected a torch.Tensor"),
    ({"x": torch.randn(4, 8).long()}, TypeError, "x: expected dtype"),
    ({"x": torch.randn(4, 0)}, ValueError, "x: expected a last dimension"),
    ({"x": torch.randn(4, 9)}, ValueError, "down_weight: expected shape"),
    ({"down_weight": torch.randn(3, 8)}, ValueError, "down_weight: expected 3 dimensions"),
    ({"down_weight": torch.randn(2, 0, 8), "up_weight": torch.randn(2, 8, 0), "down_bias": None},
     ValueError, "bottleneck size"),
    ({"up_weight": torch.randn(2, 8, 4)}, ValueError, "up_weight: expected shape"),
    ({"up_weight": torch.randn(3, 8, 3)}, ValueError, "up_weight: expected shape"),
    ({"down_bias": torch.randn(2, 4)}, ValueError, "down_bias: expected shape"),
    ({"up_bias": torch.randn(8)}, ValueError, "up_bias: expected 2 dimensions"),
    ({"residual": torch.randn(4, 7)}, ValueError, "residual: expected shape"),
    ({"residual": torch.randn(4, 8).double()}, TypeError, "residual: expected the dtype of x"),
    ({"adapter_ids": torch.tensor([0.0, 1.0, 0.0, 0.0])}, TypeError, "adapter_ids: expected dtype"),
    ({"adapter_ids": torch.tensor([0, 1, 0])}, ValueError, "adapter_ids: expected shape"),
    ({"adapter_ids": torch.tensor([0, 2, 0, 0])}, ValueError, "adapter_ids: expected ids in [-1, 2)"),
    ({"adapter_ids": torch.tensor([0, -2, 0, 0])}, ValueError, "got -2"),
    ({"up_weight": torch.randn(2, 8, 3).double()}, TypeError, "up_weight: expected the dtype of down_weight"),
    ({"x": torch.randn(4, 8).half(), "down_weight": torch.randn(2, 3, 8).bfloat16()}, TypeError,
     "down_weight: expected the dtype of x"),
    ({"activation": "gelu_fast"}, ValueError, "activation: expected one of"),
    ({"activation": None}, TypeError, "activation: expected a str"),
    ({"scaling": float("nan")}, ValueError, "scaling: expected a finite number"),
    ({"scaling": "2"}, TypeError, "scaling: expected a real number"),
]


@pytest.mark.parametrize("change, error, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input(change, error, message):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        bottleneck_adapter(**kwargs, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_out_of_range_ids_mean_no_adapter(backend):
    """validate_ids=False (the default for GPU ids, to avoid a host sync): ids outside [0, L) pass through."""
    kwargs = _good()
    kwargs["adapter_ids"] = torch.tensor([0, 5, -3, 1])
    out = bottleneck_adapter(**kwargs, backend=backend, validate_ids=False)
    kwargs["adapter_ids"] = torch.tensor([0, -1, -1, 1])
    assert_close(out, reference.bottleneck_adapter(**kwargs), "y", dtype=torch.float32)
    assert torch.equal(out[1:3], kwargs["x"][1:3])


def test_single_adapter_rejects_stacked_weights_without_ids():
    kwargs = {**_good(), "adapter_ids": None}
    with pytest.raises(ValueError, match="down_weight: expected 2 dimensions"):
        bottleneck_adapter(**kwargs)


def test_kernel_backends_reject_float64_and_cpu_cuda():
    kwargs = {**_good(), "adapter_ids": None, "down_weight": torch.randn(3, 8), "down_bias": None,
              "up_weight": torch.randn(8, 3), "up_bias": None}
    with pytest.raises(TypeError, match="backend 'triton' does not support"):
        bottleneck_adapter(**{**kwargs, "x": kwargs["x"].double()}, backend="triton")
    # The CUDA C++ backend needs CUDA tensors: CPU ones are refused before anything runs.
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        bottleneck_adapter(**kwargs, backend="cuda")


# ---- registration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = (torch.randn(5, 16), torch.randn(2, 4, 16), torch.randn(2, 4), torch.randn(2, 16, 4),
            torch.randn(2, 16), None, torch.tensor([0, 1, -1, 1, 0]), "gelu", 0.5, backend)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(torch.ops.peftkern.bottleneck_adapter.default, args)


def test_torch_compile_fullgraph():
    inputs = make_inputs((2, 3), 8, 4, num_adapters=2)
    ids = mixed_ids((2, 3), 2)
    leaves = [inputs[n].float().requires_grad_() for n in NAMES[:5]]

    def fn(*tensors):
        return peftkern.bottleneck_adapter(*tensors, "silu", 0.5, None, ids, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    out.sum().backward()
    expected = reference.bottleneck_adapter(*(inputs[n] for n in NAMES[:5]), "silu", 0.5, None, ids)
    assert_close(out, expected, "y")
    assert leaves[1].grad is not None


# ---- GPU --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_gpu_triton_matches_reference(dtype, activation):
    lead = (3, 301)
    masters = make_inputs(lead, 768, 48, 4, scale=0.05)
    inputs = {name: (value.cuda() if value is not None else None) for name, value in masters.items()}
    ids = mixed_ids(lead, 4).cuda()
    run_and_compare(inputs, dtype, "triton", activation, adapter_ids=ids, grad_scale=4.0)
