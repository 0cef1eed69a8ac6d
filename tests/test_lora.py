"""peftkern.lora_linear on every backend available here against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, assert_close, make_lora_inputs

import peftkern
from peftkern import reference
from peftkern.backends import cuda_backend_available, triton_interpreting

BACKENDS = ["torch", "triton"]
if torch.cuda.is_available():
    DEVICE = "cuda"
    if cuda_backend_available():
        BACKENDS.append("cuda")
else:
    DEVICE = "cpu"
    if not triton_interpreting():
        BACKENDS = ["torch"]

# (M, K, N, r): odd sizes, not multiples of any block, rank 1 to 16.
SHAPES = [(1, 17, 33, 4), (17, 33, 17, 8), (33, 65, 65, 16), (65, 16, 1, 1)]


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, device=DEVICE):
    return make_lora_inputs(M, K, N, r, dtype, adapter_dtype, bias, device)


def run_and_compare(x, weight, bias, lora_a, lora_b, scaling, dropout_p, backend, seed=1234, grad_scale=1.0):
    """Forward and backward on ``backend`` and in float64 through the reference; compare all of it."""
    y = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed=seed, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)

    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, weight, lora_a, lora_b)]
    x64, w64, a64, b64 = leaves
    bias64 = None if bias is None else bias.detach().double().requires_grad_(bias.requires_grad)
    y64 = reference.lora_linear(x64, w64, bias64, a64, b64, scaling, dropout_p, seed=seed)
    y64.backward(grad.double())

    dtype = x.dtype
    assert y.dtype == x.dtype
    assert_close(y, y64, "y", dtype)
    assert_close(x.grad, x64.grad, "dx", dtype)
    # Adapter grads reduce over all M rows: judge them by the activations' precision.
    assert_close(lora_a.grad, a64.grad, "dA", dtype, scale=grad_scale)
    assert_close(lora_b.grad, b64.grad, "dB", dtype, scale=grad_scale)
    if weight.requires_grad:
        assert_close(weight.grad, w64.grad, "dW", dtype, scale=grad_scale)
    if bias is not None and bias.requires_grad:
        assert_close(bias.grad, bias64.grad, "dbias", dtype, scale=grad_scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_reference(backend, dtype, shape, dropout_p):
    run_and_compare(*make_inputs(*shape, dtype), scaling=0.7, dropout_p=dropout_p, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_with_16bit_activations(backend, dtype):
    inputs = make_inputs(33, 40, 24, 8, dtype, adapter_dtype=torch.float32)
    run_and_compare(*inputs, scaling=2.0, dropout_p=0.1, backend=backend)
    assert inputs[3].grad.dtype == torch.float32 and inputs[0].grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("rank", [4, 40], ids=["dy_read_once", "dy_kernel"])
def test_adapter_grads_with_and_without_dx_agree_and_repeat(backend, dropout_p, rank):
    """dA and dB when x needs no gradient (Triton: the dy kernel reads dY) and when it does (Triton: the dX
    kernel reads dY once for dX, dS and dB's partials; above rank 32 in fp32, the dy kernel again and dX
    from its dS) both match the reference, as does dX, and a second run gives the same bits (every partial
    summed in a fixed order, no atomics)."""
    x, weight, bias, lora_a, lora_b = make_inputs(70, 33, 40, rank, torch.float32)
    grad = torch.randn(70, 40)
    grads = {}
    for need_dx in (False, True, True):
        xin = x.detach().requires_grad_(need_dx)
        a, b = (t.detach().requires_grad_() for t in (lora_a, lora_b))
        peftkern.lora_linear(xin, weight, bias, a, b, 0.7, dropout_p, seed=7, backend=backend).backward(grad)
        if need_dx in grads:
            assert torch.equal(a.grad, grads[need_dx][0]) and torch.equal(b.grad, grads[need_dx][1])
            assert torch.equal(xin.grad, grads[need_dx][2])
        grads[need_dx] = (a.grad, b.grad, xin.grad)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, lora_a, lora_b))
    reference.lora_linear(x64, weight.double(), bias.double(), a64, b64, 0.7, dropout_p, seed=7).backward(
        grad.double())
    for need_dx, (grad_a, grad_b, grad_x) in grads.items():
        assert_close(grad_a, a64.grad, f"dA (dX {need_dx})", torch.float32)
        assert_close(grad_b, b64.grad, f"dB (dX {need_dx})", torch.float32)
        if need_dx:
            assert_close(grad_x, x64.grad, "dX", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_keep_fp32_accuracy_on_tensor_cores(dtype):
    """With TF32 off (conftest), the fp32 adapter products run in TF32 pieces (two or three tensor-core
    products) and the adapter gradients keep fp32's tolerance; one TF32 product would miss it ~100-fold
    (benchmarks/fp32_accuracy.py)."""
    x, weight, _, lora_a, lora_b = make_inputs(64, 256, 128, 16, dtype, adapter_dtype=torch.float32, bias=False)
    y = peftkern.lora_linear(x, weight, None, lora_a, lora_b, 2.0, backend="triton")
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    reference.lora_linear(leaves[0], weight.double(), None, leaves[1], leaves[2], 2.0).backward(grad.double())
    assert_close(lora_a.grad, leaves[1].grad, "dA", torch.float32)
    assert_close(lora_b.grad, leaves[2].grad, "dB", torch.float32)


def _split_kernel():
    """A kernel storing ``_common._tf32_split`` of a tile (built on first use: Triton resolves the helper among
    this module's globals)."""
    import triton
    import triton.language as tl

    from peftkern.triton_kernels import _common

    globals()["_tf32_split"] = _common._tf32_split

    @triton.jit
    def split_kernel(V, HEAD, TAIL, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        head, tail = _tf32_split(tl.load(V + offsets))  # noqa: F821 (set just above)
        tl.store(HEAD + offsets, head)
        tl.store(TAIL + offsets, tail)

    return split_kernel


@pytest.mark.skipif(DEVICE != "cuda" and not triton_interpreting(), reason="needs Triton (a GPU or the interpreter)")
def test_tf32_split_is_exact_and_on_the_tf32_grid():
    """``_common._tf32_split``: both parts on TF32's grid (13 low bits zero, so the tensor cores' conversion
    is exact), the head v truncated, the tail under 2**-10 |v|, head + tail within 2**-21 |v| of v (one TF32
    rounding would be 2**-11)."""
    torch.manual_seed(0)
    v = torch.cat([torch.randn(200) * 10.0 ** torch.randint(-30, 30, (200,)), torch.tensor([0.0, -0.0, 1.0, -3.5])])
    v = torch.nn.functional.pad(v, (0, 256 - v.numel())).to(DEVICE)
    head, tail = torch.empty_like(v), torch.empty_like(v)
    _split_kernel()[(1,)](v, head, tail, BLOCK=256)
    assert torch.equal(head, (v.view(torch.int32) & ~0x1FFF).view(torch.float32))
    assert ((head.double() + tail.double() - v.double()).abs() <= v.double().abs() * 2.0**-21).all()
    for part in (head, tail):
        assert not (part.view(torch.int32) & 0x1FFF).any()
    assert (tail.abs() <= v.abs() * 2.0**-10).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_bias_get_gradients_only_when_asked(backend):
    x, weight, bias, lora_a, lora_b = make_inputs(9, 20, 12, 4, torch.float32)
    y = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 1.0, backend=backend)
    y.sum().backward()
    assert weight.grad is None and bias.grad is None
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    x.grad = lora_a.grad = lora_b.grad = None
    run_and_compare(x, weight, bias, lora_a, lora_b, 0.5, 0.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, weight, bias, lora_a, lora_b = make_inputs(0, 16, 8, 4, torch.float32)
    y = peftkern.lora_linear(x.reshape(2, 0, 16), weight, bias, lora_a, lora_b, 1.0, 0.2, backend=backend)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(lora_a.grad, torch.zeros_like(lora_a))
    assert torch.equal(lora_b.grad, torch.zeros_like(lora_b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_non_contiguous_x_and_transposed_weight(backend):
    big = torch.randn(3, 10, 2 * 24, device=DEVICE)
    x = big[:, :, ::2].detach().requires_grad_(True)  # [3, 10, 24], stride 2 in the last dim
    assert not x.is_contiguous()
    weight = torch.randn(24, 18, device=DEVICE).T  # [18, 24] transposed view
    assert not weight.is_contiguous()
    lora_a = torch.randn(5, 24, device=DEVICE).requires_grad_(True)
    lora_b = torch.randn(18, 5, device=DEVICE).requires_grad_(True)
    run_and_compare(x, weight, None, lora_a, lora_b, 0.25, 0.2, backend)



def _x_layout(layout, M, K, dtype):
    """x [M, K] in one of the layouts the TMA eligibility rule tells apart, as a leaf that requires grad."""
    make = lambda *shape: torch.randn(*shape, dtype=dtype, device=DEVICE)
    if layout == "contiguous":
        x = make(M, K)
    elif layout == "padded rows, 16-byte stride":  # not contiguous, but TMA takes it
        x = make(M, K + 16 // make(0).element_size())[:, :K]
    elif layout == "padded rows, odd stride":
        x = make(M, K + 1)[:, :K]
    elif layout == "transposed":
        x = make(K, M).T
    else:  # "misaligned base": one element past a 16-byte boundary
        x = make(M * K + 1)[1:].view(M, K)
    return x.detach().requires_grad_(True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (the interpreter on CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout, K, tma", [
    ("contiguous", 48, True), ("padded rows, 16-byte stride", 48, True), ("contiguous", 33, False),
    ("padded rows, odd stride", 48, False), ("transposed", 48, False), ("misaligned base", 48, False),
])
def test_base_gemm_reads_by_tma_only_where_tma_can(monkeypatch, dtype, layout, K, tma):
    """The fused forward's and the dX kernel's base GEMM load by TMA (tensor descriptors) exactly when every
    operand is TMA-ready (16-byte aligned base and row stride, last stride 1) and the target has TMA (sm_90,
    or the interpreter, which runs the descriptor loads on CPU); else the pointer path. Both are right."""
    from peftkern.triton_kernels import _common, lora

    decisions = []

    def spy(*tensors):
        decisions.append(real(*tensors))
        return decisions[-1]

    real = lora._use_tma
    monkeypatch.setattr(lora, "_use_tma", spy)
    M, N = 33, 40
    x = _x_layout(layout, M, K, dtype)
    assert _common.tma_ready(x) == tma
    _, weight, bias, lora_a, lora_b = make_inputs(M, K, N, 8, dtype)
    run_and_compare(x, weight, bias, lora_a, lora_b, 0.5, 0.2, "triton")
    target = _common.tma_target()
    # The forward reads x and W; dX reads dY (contiguous [33, 40]: TMA-ready) and W, and K is its column count.
    assert decisions == [tma and target, K % 8 == 0 and target]

def test_reference_leading_dims_equal_flattened():
    x, weight, bias, lora_a, lora_b = make_inputs(12, 8, 6, 2, torch.float64, device="cpu")
    flat = reference.lora_linear(x, weight, bias, lora_a, lora_b, 1.5, 0.3, seed=7)
    shaped = reference.lora_linear(x.reshape(3, 4, 8), weight, bias, lora_a, lora_b, 1.5, 0.3, seed=7)
    assert torch.equal(flat.reshape(3, 4, 6), shaped)


# ---- dropout ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_seeded_and_backends_share_the_mask(backend):
    x, weight, bias, lora_a, lora_b = make_inputs(16, 32, 8, 4, torch.float32)
    args = (x, weight, bias, lora_a, lora_b, 1.0, 0.5)
    first = peftkern.lora_linear(*args, seed=99, backend=backend)
    again = peftkern.lora_linear(*args, seed=99, backend=backend)
    other = peftkern.lora_linear(*args, seed=100, backend=backend)
    torch_backend = peftkern.lora_linear(*args, seed=99, backend="torch")
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert_close(first, torch_backend, "same seed across backends", torch.float32)


def test_dropout_keep_fraction_and_eval_mode():
    mask = reference.dropout_mask(2024, (256, 256), 0.3)
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    x, weight, bias, lora_a, lora_b = make_inputs(8, 16, 8, 4, torch.float32)
    evaluated = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.9, training=False)
    no_dropout = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.0)
    assert torch.equal(evaluated, no_dropout)


def test_unseeded_dropout_follows_torch_manual_seed():
    x, weight, bias, lora_a, lora_b = make_inputs(8, 16, 8, 4, torch.float32)
    torch.manual_seed(5)
    first = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.5)
    torch.manual_seed(5)
    second = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.5)
    assert torch.equal(first, second)


def test_philox_stream_matches_triton_rand_and_randint4x():
    triton = pytest.importorskip("triton")
    if DEVICE == "cpu" and not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    import triton.language as tl

    @triton.jit
    def draw(OUT, WORDS, SEED, base, BLOCK: tl.constexpr):
        offsets = base + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(OUT + tl.arange(0, BLOCK), tl.rand(tl.load(SEED), offsets))
        w0, w1, w2, w3 = tl.randint4x(tl.load(SEED), offsets)
        at = WORDS + tl.arange(0, BLOCK) * 4
        tl.store(at, w0.to(tl.int64))
        tl.store(at + 1, w1.to(tl.int64))
        tl.store(at + 2, w2.to(tl.int64))
        tl.store(at + 3, w3.to(tl.int64))

    for seed, base in [(0, 0), (12345, 2**31 - 40), (2**40 + 7, 2**33 + 3), (2**62 - 1, 5)]:
        out = torch.empty(64, device=DEVICE)
        words = torch.empty(64, 4, device=DEVICE, dtype=torch.int64)
        draw[(1,)](out, words, torch.tensor([seed], device=DEVICE), base, BLOCK=64)
        offsets = torch.arange(64, dtype=torch.int64, device=DEVICE) + base
        assert torch.equal(out, reference.philox_uniform(seed, offsets)), (seed, base)
        assert torch.equal(words, reference.philox_words(seed, offsets)), (seed, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_activations_are_x_and_the_rank_r_intermediate_only(backend):
    M, K, N, r = 32, 48, 40, 4
    x, weight, bias, lora_a, lora_b = make_inputs(M, K, N, r, torch.float32)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.3, backend=backend)
    parameters = {id(t) for t in (weight, lora_a, lora_b)}
    activation_elements = sum(t.numel() for t in saved if id(t) not in parameters)
    # x, the [M, r] intermediate and the one-element seed: no mask, no dropped copy of x.
    assert activation_elements <= M * K + M * r + 1, [tuple(t.shape) for t in saved]


# ---- registration: opcheck, gradcheck, torch.compile ------------------------------------------------------


def test_opcheck_torch_backend():
    x, weight, bias, lora_a, lora_b = make_inputs(5, 12, 7, 3, torch.float32, device="cpu")
    seed = torch.tensor([3], dtype=torch.int64)
    torch.library.opcheck(
        torch.ops.peftkern.lora_linear.default, (x, weight, bias, lora_a, lora_b, 0.5, 0.2, seed, "torch")
    )


@pytest.mark.skipif(not triton_interpreting() and DEVICE == "cpu", reason="needs the Triton interpreter")
def test_opcheck_triton_backend():
    x, weight, bias, lora_a, lora_b = make_inputs(5, 12, 7, 3, torch.float32)
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(
        torch.ops.peftkern.lora_linear.default,
        (x, weight, bias, lora_a, lora_b, 0.5, 0.2, seed, "triton"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_gradcheck_float64():
    x, weight, bias, lora_a, lora_b = make_inputs(4, 6, 5, 2, torch.float64, device="cpu")
    weight.requires_grad_(True)
    bias.requires_grad_(True)

    def fn(x, weight, bias, lora_a, lora_b):
        return peftkern.lora_linear(x, weight, bias, lora_a, lora_b, 0.8, 0.25, seed=11, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, weight, bias, lora_a, lora_b))


def test_torch_compile_fullgraph_matches_eager():
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(16, 12), r=4, alpha=8, dropout=0.1, backend="torch")
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.manual_seed(1)
    eager_out = layer(x)
    eager_out.sum().backward()
    eager_grads = [x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    torch.manual_seed(1)
    compiled_out = compiled(x)
    compiled_out.sum().backward()
    assert torch.allclose(compiled_out, eager_out, atol=1e-6)
    for got, expected in zip([x.grad, layer.lora_A.grad, layer.lora_B.grad], eager_grads):
        assert torch.allclose(got, expected, atol=1e-6)


def test_torch_compile_inductor_fullgraph():
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(16, 12), r=4, alpha=8, backend="torch")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.allclose(compiled(x), layer(x), atol=1e-5)


# ---- backend selection ------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    from peftkern.backends import resolve_backend

    cpu = torch.device("cpu")
    monkeypatch.delenv("PEFTKERN_BACKEND", raising=False)
    assert resolve_backend(cpu, "lora_linear") == "torch"
    monkeypatch.setenv("PEFTKERN_BACKEND", "torch")
    assert resolve_backend(cpu, "lora_linear") == "torch"
    if "triton" in BACKENDS:
        with peftkern.use_backend("triton"):
            assert resolve_backend(cpu, "lora_linear") == "triton"
            assert resolve_backend(cpu, "lora_linear", "torch") == "torch"
    monkeypatch.setenv("PEFTKERN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="PEFTKERN_BACKEND.*'tpu'"):
        resolve_backend(cpu, "lora_linear")
    with pytest.raises(ValueError, match="use_backend"):
        with peftkern.use_backend("numpy"):
            pass
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        resolve_backend(cpu, "lora_linear", "cuda")


# ---- peft parity --------------------------------------------------------------------------------------------


def test_reference_equals_peft_lora_linear():
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(20, 14)).double()
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, use_rslora=True, target_modules=["0"])
    peft_model = peft.get_peft_model(model, config)
    layer = peft_model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    expected = peft_model(x)
    base = layer.base_layer
    got = reference.lora_linear(
        x, base.weight, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
        layer.scaling["default"], 0.0,
    )
    assert layer.scaling["default"] == pytest.approx(12 / 4**0.5)
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_offsets_past_2_31_elements(backend):
    """x with more than 2**31 elements: int64 offsets give the right rows at the far end."""
    K, N, r = 4096, 32, 8
    M = 2**31 // K + 64
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    lora_a = torch.randn(r, K, device="cuda") / K**0.5
    lora_b = torch.randn(N, r, device="cuda")
    y = peftkern.lora_linear(x, weight, None, lora_a, lora_b, 1.0, 0.1, seed=5, backend=backend)
    tail = slice(M - 96, M)
    mask = reference.dropout_mask(5, (96, K), 0.1, device="cuda", first_row=M - 96)
    expected = reference.lora_linear(
        x[tail].double(), weight.double(), None, lora_a.double(), lora_b.double(), 1.0, 0.1, keep_mask=mask
    )
    assert_close(y[tail], expected, "y tail", torch.bfloat16)
