"""The CUDA C++ bottleneck adapter (csrc/include/peftkern/bottleneck.cuh): on the CPU emulator against float64
host loops, the bindings' argument checks, and (on a GPU) ``bottleneck_adapter`` on backend "cuda" against
the float64 reference and the Triton backend, outputs and every gradient."""

from __future__ import annotations

import _emulator
import pytest
import torch
from _helpers import DTYPES, assert_close, assert_graph_replay_follows, cuda_ext, needs_extension
from test_bottleneck import NAMES, make_inputs, mixed_ids, run_and_compare

import peftkern
from peftkern import reference
from peftkern.ops.bottleneck import bottleneck_adapter

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "tanh"]


# ---- CPU: the emulator, the codes, the bindings' checks -----------------------------------------------------


def test_kernels_on_the_cpu_emulator_match_float64_and_stay_in_bounds(tmp_path):
    """The header's forward and backward launchers on the CPU emulation of the CUDA model (one thread per
    CUDA thread, buffers sized exactly to their strides, workspaces NaN-poisoned, AddressSanitizer): every
    activation, dims 17/33/70/72 and bottlenecks 1/5/16/33 around the 64 x 64 x 32 tiles, M = 0, no ids /
    one adapter / mixed int32 and int64 ids with -1 and ids outside [0, L), explicit and default residual,
    contiguous / column-major / odd-row-stride x, contiguous and transposed weight stacks, fp32, fp16 and
    bf16 with their own or fp32 weights. No-adapter rows must equal the residual bit for bit."""
    binary = _emulator.build(tmp_path, "bottleneck_emulated")
    assert _emulator.emulated_headers(tmp_path)["bottleneck.cuh"] >= 2
    # PEFTKERN_EMULATE_FULL=1: every shape x activation x dtype pairing (175 cases) instead of CI's 34.
    expected = "175 cases, 0 failures" if _emulator.FULL else "34 cases, 0 failures"
    assert _emulator.run(binary).strip().endswith(expected)


def test_activation_codes_are_the_triton_ones():
    pytest.importorskip("triton")
    from peftkern.ops._cuda_bottleneck import ACTIVATION_CODES
    from peftkern.triton_kernels.bottleneck import ACTIVATION_CODES as TRITON_CODES

    assert ACTIVATION_CODES == TRITON_CODES
    assert set(ACTIVATION_CODES) == set(reference.ACTIVATIONS)


@needs_extension
def test_extension_names_the_activation_codes():
    from peftkern.ops._cuda_bottleneck import ACTIVATION_CODES

    names = cuda_ext().BOTTLENECK_ACTIVATIONS
    assert {name: code for code, name in enumerate(names)} == {
        name: code for name, code in ACTIVATION_CODES.items() if name != "swish"
    }


def _forward_args(ext, **override):
    args = dict(
        dtype=ext.FLOAT16, adapter_dtype=ext.FLOAT16, x=16, x_strides=(8, 1), down_weight=16,
        down_weight_strides=(32, 8, 1), down_bias=0, down_bias_strides=(0, 0), up_weight=16,
        up_weight_strides=(32, 4, 1), up_bias=0, up_bias_strides=(0, 0), residual=0, residual_strides=(0, 0),
        adapter_ids=16, adapter_ids_bits=64, h=16, act=16, y=16, y_strides=(8, 1), M=3, D=8, NB=4, L=2,
        activation=1, scaling=1.0, device=0, stream=0,
    )
    return {**args, **override}


def _backward_args(ext, **override):
    args = dict(
        dtype=ext.FLOAT32, adapter_dtype=ext.FLOAT32, grad_y=16, grad_y_strides=(8, 1), x=16, x_strides=(8, 1),
        down_weight=16, down_weight_strides=(32, 8, 1), up_weight=16, up_weight_strides=(32, 4, 1), h=16,
        adapter_ids=16, adapter_ids_bits=32, order=16, segments=16, grad_x=16, grad_x_strides=(8, 1),
        add_grad_y=True, grad_down_weight=16, grad_down_bias=0, grad_up_weight=16, grad_up_bias=0, dh=16,
        workspace=16, workspace_floats=10**6, M=3, D=8, NB=4, L=2, activation=0, scaling=0.5, device=0, stream=0,
    )
    return {**args, **override}


@needs_extension
@pytest.mark.parametrize("override, pattern", [
    ({"dtype": 7}, r"dtype: expected a code in"),
    ({"adapter_dtype": 1}, r"adapter_dtype: expected the activation dtype \(float16\)"),
    ({"M": -1}, r"M: expected rows >= 0, got -1"),
    ({"D": 0}, r"D: expected a model dimension >= 1"),
    ({"NB": 0}, r"NB: expected a bottleneck size >= 1"),
    ({"L": 0}, r"L: expected at least one adapter"),
    ({"activation": 5}, r"activation: expected a code in \{0: relu"),
    ({"scaling": float("inf")}, r"scaling: expected a finite number"),
    ({"adapter_ids_bits": 16}, r"adapter_ids_bits: expected 32 \(int32 ids\) or 64"),
    ({"x": 0}, r"x: expected a device address, got 0 for a \[3, 8\] matrix"),
    ({"y": 0}, r"y: expected a device address"),
    ({"down_weight": 0}, r"down_weight: expected a device address, got 0 for 64 elements"),
    ({"up_weight": 0}, r"up_weight: expected a device address"),
    ({"h": 0}, r"h: expected a device address"),
    ({"act": 0}, r"act: expected a device address"),
    ({"device": -1}, r"device: expected a CUDA device index >= 0"),
], ids=lambda v: str(v)[:30])
def test_forward_binding_checks_arguments_before_any_launch(override, pattern):
    ext = cuda_ext()
    with pytest.raises(ValueError, match=pattern):
        ext.bottleneck_forward(**_forward_args(ext, **override))


@needs_extension
def test_forward_binding_with_no_rows_touches_no_device():
    ext = cuda_ext()
    assert ext.bottleneck_forward(**_forward_args(ext, M=0, x=0, y=0, h=0, act=0, adapter_ids=0)) is None


@needs_extension
@pytest.mark.parametrize("override, pattern", [
    ({"adapter_dtype": 0}, r"adapter_dtype: expected the activation dtype \(float32\)"),
    ({"grad_y": 0}, r"grad_y: expected a device address"),
    ({"dh": 0}, r"dh: expected a device address"),
    ({"grad_up_weight": 0}, r"grad_up_weight: expected an address \(the two weight gradients"),
    ({"order": 0}, r"order: expected a device address"),
    ({"segments": 0}, r"segments: expected a device address, got 0 for 3 elements"),
    ({"workspace_floats": 1}, r"workspace: expected at least \d+ floats"),
    ({"grad_down_weight": 0, "grad_up_weight": 0, "grad_up_bias": 16}, r"grad_down_bias, grad_up_bias: bias"),
    ({"activation": -1}, r"activation: expected a code in"),
    ({"device": -1}, r"device: expected a CUDA device index >= 0"),
], ids=lambda v: str(v)[:30])
def test_backward_binding_checks_arguments_before_any_launch(override, pattern):
    ext = cuda_ext()
    with pytest.raises(ValueError, match=pattern):
        ext.bottleneck_backward(**_backward_args(ext, **override))


@needs_extension
def test_backward_workspace_size():
    ext = cuda_ext()
    M, D, NB, L = 300, 70, 33, 3
    floats = ext.bottleneck_backward_workspace_floats(M, D, NB, L)
    # One partial [L, D, Bn] + [L, D] and [L, Bn, D] + [L, Bn] per row chunk, at most 8 chunks.
    per_chunk = L * (2 * D * NB + D + NB)
    assert floats % per_chunk == 0 and 1 <= floats // per_chunk <= 8
    with pytest.raises(ValueError, match="L: expected at least one adapter"):
        ext.bottleneck_backward_workspace_floats(M, D, NB, 0)
    # No rows and no adapter gradients: nothing to launch, no device touched.
    args = _backward_args(ext, M=0, grad_y=0, x=0, h=0, dh=0, grad_x=0, grad_down_weight=0, grad_up_weight=0)
    assert ext.bottleneck_backward(**args) is None


@needs_extension
def test_launchers_with_no_rows_allocate_and_launch_nothing():
    """M = 0 returns before the extension is called (so it runs even without a device): empty outputs and
    zero adapter gradients in the weights' dtype, as the Triton launchers."""
    from peftkern.ops._cuda_bottleneck import bottleneck_backward, bottleneck_forward

    inputs = make_inputs((0,), 16, 4, num_adapters=2)
    x, down, down_bias, up, up_bias = (inputs[n].float() for n in NAMES[:5])
    ids = torch.zeros(0, dtype=torch.int64)
    y, h = bottleneck_forward(x, down, down_bias, up, up_bias, None, ids, "gelu", 0.5)
    assert y.shape == (0, 16) and h.shape == (0, 4) and h.dtype == torch.float32
    dx, dwd, dbd, dwu, dbu = bottleneck_backward(y, x, down, up, h, ids, "gelu", 0.5, True, True, True, True, False)
    assert dx.shape == (0, 16) and dbu is None
    for grad, like in ((dwd, down), (dbd, down_bias), (dwu, up)):
        assert grad.dtype == like.dtype and torch.equal(grad, torch.zeros_like(like))


# ---- GPU: against the float64 reference and the Triton backend ---------------------------------------------


def _cuda(inputs):
    return {name: (value.cuda() if value is not None else None) for name, value in inputs.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mixed_adapters_match_reference(dtype, activation):
    """3-D x, three adapters, every row its own, -1 rows passing through bit for bit."""
    lead = (2, 45)  # 90 rows: two row tiles, several adapters in each
    ids = mixed_ids(lead, 3).cuda()
    inputs = _cuda(make_inputs(lead, 33, 17, num_adapters=3))
    out = run_and_compare(inputs, dtype, "cuda", activation, adapter_ids=ids)
    passthrough = ids == -1
    assert passthrough.any() and torch.equal(out[passthrough], inputs["x"].to(dtype)[passthrough])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, dim, bottleneck", [(1, 17, 1), (17, 33, 5), (33, 17, 16), (130, 70, 33),
                                                   (65, 72, 16)])
def test_single_adapter_odd_sizes(dtype, rows, dim, bottleneck):
    run_and_compare(_cuda(make_inputs((rows,), dim, bottleneck)), dtype, "cuda", "gelu", scaling=1.3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fp32_adapters_separate_residual_no_bias_int32_ids(dtype, activation):
    lead = (3, 7)
    inputs = _cuda(make_inputs(lead, 20, 9, num_adapters=2, biases=False, residual=True))
    ids = mixed_ids(lead, 2).to(torch.int32).cuda()
    run_and_compare(inputs, dtype, "cuda", activation, scaling=-0.5, adapter_ids=ids, weight_dtype=torch.float32)


@pytest.mark.gpu
def test_passthrough_rows_are_the_residual_bit_for_bit():
    lead = (50,)
    inputs = _cuda(make_inputs(lead, 24, 8, num_adapters=2, residual=True))
    ids = mixed_ids(lead, 2).cuda()
    x, down, down_bias, up, up_bias, residual = (inputs[n].to(torch.bfloat16) for n in NAMES)
    out = bottleneck_adapter(x, down, down_bias, up, up_bias, "relu", 0.7, residual, ids, backend="cuda")
    assert torch.equal(out[ids == -1], residual[ids == -1])


@pytest.mark.gpu
@pytest.mark.parametrize("stacked", [False, True])
def test_empty_batch(stacked):
    inputs = _cuda(make_inputs((0, 3), 16, 4, num_adapters=2 if stacked else None))
    ids = torch.zeros((0, 3), dtype=torch.int64, device="cuda") if stacked else None
    run_and_compare(inputs, torch.float32, "cuda", "relu", adapter_ids=ids)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype, no_tf32):
    """x a transposed view, residual a strided slice, weights transposed views: any strides."""
    x = torch.randn(24, 10, dtype=torch.float64).T
    residual = torch.randn(10, 48, dtype=torch.float64)[:, ::2]
    down = (torch.randn(2, 24, 5, dtype=torch.float64) * 0.3).transpose(1, 2)
    up = (torch.randn(2, 5, 24, dtype=torch.float64) * 0.3).transpose(1, 2)
    down_bias, up_bias = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0])
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (x, down, down_bias, up, up_bias, residual)]
    views = [leaves[0].T.contiguous().T, leaves[1].transpose(1, 2).contiguous().transpose(1, 2), leaves[2],
             leaves[3].transpose(1, 2).contiguous().transpose(1, 2), leaves[4], leaves[5]]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    out = bottleneck_adapter(*views[:5], "gelu_tanh", 0.9, views[5], ids.cuda(), backend="cuda")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    expected = reference.bottleneck_adapter(*ref_leaves[:5], "gelu_tanh", 0.9, ref_leaves[5], ids.cuda())
    assert_close(out, expected, "y", dtype)
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad.to(dtype).double())
    for name, ours, ref in zip(NAMES, leaves, ref_leaves):
        assert_close(ours.grad, ref.grad, f"grad {name}", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_triton(dtype, activation, no_tf32):
    """Output and every gradient against the Triton backend on a realistic mixed batch."""
    pytest.importorskip("triton")
    lead = (3, 101)
    masters = _cuda(make_inputs(lead, 256, 48, 4, scale=0.1))
    ids = mixed_ids(lead, 4).cuda()
    results = {}
    for backend in ("cuda", "triton"):
        leaves = [masters[n].to(dtype).requires_grad_() for n in NAMES[:5]]
        out = bottleneck_adapter(*leaves, activation, 0.8, None, ids, backend=backend)
        out.backward(torch.ones_like(out))
        results[backend] = [out, *(leaf.grad for leaf in leaves)]
    for name, ours, theirs in zip(["y", *NAMES[:5]], results["cuda"], results["triton"]):
        assert_close(ours, theirs.to(ours.dtype), f"{name} cuda vs triton", dtype, scale=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_large_mixed_batch_matches_reference(dtype, activation):
    lead = (3, 301)
    ids = mixed_ids(lead, 4).cuda()
    run_and_compare(_cuda(make_inputs(lead, 768, 48, 4, scale=0.05)), dtype, "cuda", activation,
                    adapter_ids=ids, grad_scale=4.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_deterministic(dtype):
    lead = (500,)
    inputs = _cuda(make_inputs(lead, 96, 24, num_adapters=3))
    ids = mixed_ids(lead, 3).cuda()
    grads = []
    for _ in range(2):
        leaves = [inputs[n].to(dtype).requires_grad_() for n in NAMES[:5]]
        out = bottleneck_adapter(*leaves, activation="silu", adapter_ids=ids, backend="cuda")
        out.backward(torch.ones_like(out))
        grads.append([out, *(leaf.grad for leaf in leaves)])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.gpu
def test_kernels_stay_in_bounds_for_any_ids():
    """The launchers, called past the op's checks, treat ids outside [0, L) as 'no adapter'."""
    from peftkern.ops._cuda_bottleneck import bottleneck_backward, bottleneck_forward

    inputs = make_inputs((6,), 16, 4, num_adapters=2)
    for ids in (torch.tensor([0, 7, -5, 1, 2**40, -1]), torch.tensor([0, 7, -5, 1, 2**30, -1], dtype=torch.int32)):
        x, down, down_bias, up, up_bias = (inputs[n].float().cuda() for n in NAMES[:5])
        y, h = bottleneck_forward(x, down, down_bias, up, up_bias, None, ids.cuda(), "relu", 1.0)
        cleaned = torch.where((ids >= 0) & (ids < 2), ids, -1).to(torch.int64)
        expected = reference.bottleneck_adapter(*(inputs[n] for n in NAMES[:5]), adapter_ids=cleaned)
        assert_close(y, expected.cuda(), "y", torch.float32)
        flags = (True, True, True, True, True)
        grads = bottleneck_backward(torch.ones_like(y), x, down, up, h, ids.cuda(), "relu", 1.0, *flags)
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(grads[0][1].cpu(), torch.ones(16))  # a no-adapter row's dX is dY alone


@pytest.mark.gpu
def test_opcheck_cuda_backend():
    args = (torch.randn(5, 16), torch.randn(2, 4, 16), torch.randn(2, 4), torch.randn(2, 16, 4),
            torch.randn(2, 16), None, torch.tensor([0, 1, -1, 1, 0]), "gelu", 0.5, "cuda")
    args = tuple(a.cuda().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else (a.cuda() if isinstance(a, torch.Tensor) else a) for a in args)
    torch.library.opcheck(torch.ops.peftkern.bottleneck_adapter.default, args)


@pytest.mark.gpu
def test_forward_captures_in_a_cuda_graph():
    """No host sync, no allocation in the extension: the forward replays from a CUDA graph."""
    inputs = _cuda(make_inputs((40,), 64, 16, num_adapters=2))
    x, down, down_bias, up, up_bias = (inputs[n].to(torch.bfloat16) for n in NAMES[:5])
    ids = mixed_ids((40,), 2).cuda()

    def run():
        return bottleneck_adapter(x, down, down_bias, up, up_bias, "gelu", 0.5, None, ids, backend="cuda")

    assert_graph_replay_follows(run, x)


@pytest.mark.gpu
def test_adapter_layer_on_the_cuda_backend(no_tf32):
    """The layer path end to end on backend "cuda"."""
    layer = peftkern.BottleneckAdapter(40, reduction_factor=4, activation="gelu", init="bert").cuda()
    x = torch.randn(2, 5, 40, device="cuda", requires_grad=True)
    results = []
    for backend in ("cuda", "torch"):
        layer.zero_grad()
        x.grad = None
        with peftkern.use_backend(backend):
            out = layer(x)
        out.square().sum().backward()
        results.append([out, x.grad, *(p.grad for p in layer.parameters())])
    for ours, theirs in zip(*results):
        assert_close(ours, theirs, "cuda vs torch", torch.float32)


def test_op_dispatches_backend_cuda_to_the_cuda_launchers(monkeypatch):
    """Without a GPU: the custom op hands backend "cuda" to peftkern.ops._cuda_bottleneck with the Triton
    launchers' arguments, forward and backward (the launchers are stood in for by the torch backend)."""
    from peftkern.ops import _cuda_bottleneck
    from peftkern.ops import bottleneck as op

    calls = []

    def forward(*args):
        calls.append(("forward", len(args)))
        return op._torch_forward(*args)

    def backward(*args):
        calls.append(("backward", len(args)))
        return op._torch_backward(*args)

    monkeypatch.setattr(_cuda_bottleneck, "bottleneck_forward", forward)
    monkeypatch.setattr(_cuda_bottleneck, "bottleneck_backward", backward)
    inputs = make_inputs((7,), 12, 4, num_adapters=2)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1])
    leaves = [inputs[n].float().requires_grad_() for n in NAMES[:5]]
    y, h = torch.ops.peftkern.bottleneck_adapter(*leaves, None, ids, "gelu", 0.5, "cuda")
    y.sum().backward()
    assert calls == [("forward", 9), ("backward", 13)]
    expected = reference.bottleneck_adapter(*(inputs[n] for n in NAMES[:5]), "gelu", 0.5, None, ids)
    assert_close(y, expected, "y")
    assert all(leaf.grad is not None for leaf in leaves)
