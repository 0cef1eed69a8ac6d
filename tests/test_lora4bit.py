"""QLoRA: ``reference.dequantize_4bit`` bit-exact against bitsandbytes, ``lora_linear_4bit`` against the float64
reference, ``LoRALinear4bit``, and a tiny Llama quantized by transformers' ``BitsAndBytesConfig`` with peft LoRA on
every linear layer run by ``from_peft`` (logits, adapter gradients, training, peft reloading the saved adapter)."""

from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
import torch.nn as nn
from _helpers import DTYPES, assert_close, cast, cpu_simd
from _models import count_fused_calls, tiny_llama, token_batch

import peftkern
from peftkern import reference
from peftkern.backends import triton_interpreting
from peftkern.ops.lora4bit import Weight4bit, lora_linear_4bit

bnb = pytest.importorskip("bitsandbytes")
F4 = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SHAPES = [(64, 64), (96, 80), (33, 17), (7, 128), (5, 3), (300, 200)]


def _quantize(weight: torch.Tensor, quant_type="nf4", blocksize=64, nested=False):
    """bitsandbytes' storage of ``weight`` as (packed, QuantState)."""
    return F4.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _weight4bit(packed, state) -> Weight4bit:
    class Params:  # what Weight4bit.from_bnb reads of a Params4bit
        data, quant_state = packed, state

    return Weight4bit.from_bnb(Params)


def _reference_dense(weight: Weight4bit, dtype: torch.dtype) -> torch.Tensor:
    return reference.dequantize_4bit(
        weight.packed, weight.absmax, weight.quant_type, weight.blocksize, weight.shape, weight.dtype,
        nested_absmax=weight.nested_absmax, nested_code=weight.nested_code,
        nested_blocksize=weight.nested_blocksize, offset=weight.offset,
    ).to(dtype)


def _bnb_dequantize(packed, state) -> torch.Tensor:
    """bitsandbytes' own dequantization: its public function where its C++ CPU kernel runs, else the torch
    ("default") kernel its CPU backend falls back to (odd rows, blocksize >= 2048), called without the
    torch.compile wrapper it carries (recompiling per shape would take most of this file's time). Its AVX-512
    CPU kernel (0.50.2) reads absmax per row, not per flat block, when a row is a multiple of 16 but not of the
    blocksize (its CUDA and torch kernels, and quantize_4bit, use flat blocks): there too the torch kernel is
    the ground truth."""
    in_features = state.shape[-1]
    row_bug = in_features % 16 == 0 and in_features % state.blocksize != 0
    if in_features % 2 == 0 and state.blocksize < 2048 and not row_bug:
        return F4.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = F4.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = _get_4bit_code(state.quant_type, packed.device)
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd
    data = packed.reshape(-1).view(torch.uint8)
    return compute(data, absmax, code, state.blocksize, state.shape, state.dtype)


# ---- the reference: bit-exact with bitsandbytes -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_is_bit_exact_with_bitsandbytes(quant_type, nested, dtype):
    generator = torch.Generator().manual_seed(5)
    for blocksize, shape in itertools.product(BLOCKSIZES, SHAPES):
        weight = (torch.randn(shape, generator=generator) * 3).to(dtype)
        packed, state = _quantize(weight, quant_type, blocksize, nested)
        ours = _reference_dense(_weight4bit(packed, state), dtype)
        theirs = _bnb_dequantize(packed, state)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs), f"blocksize {blocksize}, shape {shape}"


def test_dequantize_4bit_reads_other_storage_dtypes():
    """quant_storage (bf16 / uint8 ... storage) is the same bytes, read as such."""
    weight = torch.randn(64, 96)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(_reference_dense(_weight4bit(packed, state), torch.float32), _bnb_dequantize(packed, state))


# ---- the op against the float64 reference --------------------------------------------------------------------


def _op_inputs(dtype, adapter_dtype, quant_type="nf4", nested=True, M=10, K=80, N=48, rank=4, weight_dtype=None):
    generator = torch.Generator().manual_seed(2)
    weight = _weight4bit(*_quantize((torch.randn(N, K, generator=generator) / K**0.5).to(weight_dtype or dtype),
                                    quant_type, 64, nested))
    x = cast(torch.randn(2, M // 2, K, generator=generator), dtype, True)
    bias = cast(torch.randn(N, generator=generator), dtype)
    lora_a = cast(torch.randn(rank, K, generator=generator) / K**0.5, adapter_dtype, True)
    lora_b = cast(torch.randn(N, rank, generator=generator) / rank**0.5, adapter_dtype, True)
    return x, weight, bias, lora_a, lora_b


def _check_against_reference(x, weight, bias, lora_a, lora_b, dtype, dropout_p, backend):
    """lora_linear_4bit (scaling 0.7, seed 11) on ``backend``: y and every gradient against the float64
    reference over the dequantized weight, with the same dropout mask."""
    y = lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.7, dropout_p, seed=11, backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, a64, b64 = (cast(t, torch.float64, True) for t in (x, lora_a, lora_b))
    keep = reference.dropout_mask(11, (x.numel() // x.shape[-1], x.shape[-1]), dropout_p)
    expected = reference.lora_linear(x64, _reference_dense(weight, dtype).double(), bias.double(), a64, b64, 0.7,
                                     dropout_p, keep_mask=keep)
    expected.backward(grad.double())
    assert_close(y, expected, "y", dtype=dtype)
    assert_close(x.grad, x64.grad, "dx", dtype=dtype)
    assert_close(lora_a.grad, a64.grad, "dA", dtype=dtype, scale=4)
    assert_close(lora_b.grad, b64.grad, "dB", dtype=dtype, scale=4)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("adapter_dtype", ["same", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_op_matches_the_reference(quant_type, dtype, adapter_dtype, dropout_p):
    adapter = dtype if adapter_dtype == "same" else torch.float32
    x, weight, bias, lora_a, lora_b = _op_inputs(dtype, adapter, quant_type)
    _check_against_reference(x, weight, bias, lora_a, lora_b, dtype, dropout_p, backend=None)


def test_dropout_stream_and_gradients_are_lora_linear_s():
    """Over the same dense weight, lora_linear_4bit is lora_linear: the same masks, the same bits."""
    x, weight, bias, lora_a, lora_b = _op_inputs(torch.float32, torch.float32, "fp4", nested=False)
    twins = [cast(t, t.dtype, t.requires_grad) for t in (x, lora_a, lora_b)]
    y = lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.5, 0.4, seed=123)
    y2 = peftkern.lora_linear(twins[0], _reference_dense(weight, torch.float32), bias, twins[1], twins[2], 0.5, 0.4,
                              seed=123)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    for ours, theirs in zip((x, lora_a, lora_b), twins):
        assert torch.equal(ours.grad, theirs.grad)


def test_compute_dtype_runs_the_base_as_bitsandbytes_does():
    """fp32 x with a bf16 compute dtype: the base GEMM in bf16 (x cast to it, the product cast back), the
    low-rank part from x itself, as peft's layer over Linear4bit computes."""
    x, weight, _, lora_a, lora_b = _op_inputs(torch.float32, torch.float32)
    y = lora_linear_4bit(x, weight, None, lora_a, lora_b, 0.5, compute_dtype=torch.bfloat16)
    base = (x.to(torch.bfloat16) @ _reference_dense(weight, torch.bfloat16).T).float()
    assert_close(y, base + 0.5 * (x @ lora_a.T) @ lora_b.T, "y")


def test_dense_weight_is_never_saved_for_backward():
    x, weight, bias, lora_a, lora_b = _op_inputs(torch.float32, torch.float32, N=48, K=80)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.5, 0.1).sum().backward()
    assert saved and not any(t.is_floating_point() and t.shape == (48, 80) for t in saved)


def test_torch_compile_fullgraph():
    x, weight, bias, lora_a, lora_b = _op_inputs(torch.float32, torch.float32)
    compiled = torch.compile(lambda x: lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.5), backend="aot_eager",
                             fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, lora_a, lora_b)]
    for t in (x, lora_a, lora_b):
        t.grad = None
    eager = lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.5)
    eager.sum().backward()
    assert torch.equal(y, eager)
    for grad, t in zip(grads, (x, lora_a, lora_b)):
        assert torch.equal(grad, t.grad)


def test_bad_inputs_are_named():
    x, weight, bias, lora_a, lora_b = _op_inputs(torch.float32, torch.float32)
    with pytest.raises(TypeError, match="weight: expected a peftkern Weight4bit"):
        lora_linear_4bit(x, torch.zeros(48, 80), bias, lora_a, lora_b)
    with pytest.raises(ValueError, match="weight.blocksize"):
        lora_linear_4bit(x, weight._replace(blocksize=48), bias, lora_a, lora_b)
    with pytest.raises(ValueError, match="weight.quant_type"):
        lora_linear_4bit(x, weight._replace(quant_type="int4"), bias, lora_a, lora_b)
    with pytest.raises(ValueError, match="weight.packed: expected 1920 bytes"):
        lora_linear_4bit(x, weight._replace(packed=weight.packed[:-1]), bias, lora_a, lora_b)
    with pytest.raises(ValueError, match="weight.absmax: expected 60 values"):
        lora_linear_4bit(x, weight._replace(absmax=weight.absmax[:-1]), bias, lora_a, lora_b)
    with pytest.raises(ValueError, match="x: expected last dimension 80"):
        lora_linear_4bit(x[..., :-1], weight, bias, lora_a, lora_b)
    with pytest.raises(TypeError, match="bias: expected the compute dtype"):
        lora_linear_4bit(x, weight, bias.double(), lora_a, lora_b)
    with pytest.raises(ValueError, match="lora_b: expected shape"):
        lora_linear_4bit(x, weight, bias, lora_a, lora_b[:-1])
    with pytest.raises(ValueError, match="backend 'cuda'"):
        lora_linear_4bit(x, weight, bias, lora_a, lora_b, backend="cuda")
    if triton_interpreting():
        with pytest.raises(TypeError, match="x has dtype torch.float64, which backend 'triton' does not support"):
            lora_linear_4bit(x.double(), weight, None, lora_a.double(), lora_b.double(), backend="triton")


# ---- LoRALinear4bit ------------------------------------------------------------------------------------------


def _linear4bit(quant_type="nf4", nested=True, compute_dtype=torch.float32, K=64, N=96) -> nn.Module:
    torch.manual_seed(4)
    dense = nn.Linear(K, N)
    layer = bnb.nn.Linear4bit(K, N, compute_dtype=compute_dtype, compress_statistics=nested, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def test_lora_linear_4bit_layer_keeps_the_4bit_storage_and_matches_the_reference():
    base = _linear4bit()
    layer = peftkern.LoRALinear4bit.from_linear(base, r=4, alpha=8, init="gaussian")
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.base_layer is base and base.weight.dtype == torch.uint8
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    dense = _reference_dense(Weight4bit.from_bnb(base.weight), torch.float32)
    expected = x @ dense.T + base.bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert_close(y, expected, "y")
    y.sum().backward()
    assert layer.lora_A.grad is not None and base.weight.grad is None
    floats = [t for t in itertools.chain(layer.parameters(), layer.buffers()) if t.is_floating_point()]
    assert not any(t.shape == (96, 64) for t in floats)  # no dense weight anywhere
    with pytest.raises(ValueError, match="merging an adapter into a 4-bit weight"):
        layer.merge()
    with pytest.raises(ValueError, match="merging an adapter into a 4-bit weight"):
        peftkern.merge_and_unload(nn.Sequential(layer))
    with pytest.raises(TypeError, match="expected bitsandbytes.nn.Linear4bit"):
        peftkern.LoRALinear4bit(nn.Linear(4, 4), r=2, alpha=2)


def test_inject_lora_wraps_linear4bit_layers():
    model = nn.Sequential(_linear4bit(), nn.ReLU(), _linear4bit(K=96, N=64))
    peftkern.inject_lora(model, "all-linear", r=2, alpha=4)
    assert [type(m) for m in model if not isinstance(m, nn.ReLU)] == [peftkern.LoRALinear4bit] * 2
    assert peftkern.trainable_parameters(model).trainable == 2 * (2 * 64 + 96 * 2)
    model(torch.randn(2, 64)).sum().backward()


def test_cpu_inference_layout_is_refused_clearly():
    """Linear4bit repacks its weight for its CPU kernel on the first eval-mode forward without grad."""
    base = _linear4bit(compute_dtype=torch.bfloat16)
    layer = peftkern.LoRALinear4bit.from_linear(base, r=2, alpha=2)
    with torch.no_grad():
        base.eval()(torch.randn(2, 64))
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack here (no AVX512-BF16 CPU)")
    with pytest.raises(ValueError, match="CPU inference layout"):
        layer(torch.randn(2, 64))


# ---- a tiny Llama quantized by transformers, peft LoRA on every linear layer ---------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(intermediate_size=128).save_pretrained(path)  # sizes multiples of 64 (the blocksize)
    return path


def _qlora(path, quant_type, double_quant, compute_dtype, seed=3):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=compute_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8,
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.train()  # train mode: bitsandbytes' CPU eval path would repack the weights (tested apart)


LINEAR_LAYERS = 2 * 7  # q, k, v, o, gate, up, down in two decoder layers


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _assert_no_dense_weight(model):
    for name in peftkern.fused_layers(model):
        layer = model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        assert base.weight.dtype == torch.uint8, name
        dense = [t for t in itertools.chain(layer.parameters(), layer.buffers())
                 if t.is_floating_point() and t.shape == (base.out_features, base.in_features)]
        assert not dense, name


LLAMA_CASES = [(quant_type, double_quant, compute_dtype, "torch") for quant_type, double_quant, compute_dtype
               in itertools.product(["nf4", "fp4"], [False, True], [torch.float32, torch.bfloat16])]
# The Triton kernels under the interpreter (slow): both quant types, double quant on and off, both compute dtypes.
LLAMA_CASES += [("nf4", True, torch.float32, "triton"), ("fp4", False, torch.bfloat16, "triton")]


@pytest.mark.parametrize(("quant_type", "double_quant", "compute_dtype", "backend"), LLAMA_CASES,
                         ids=lambda value: str(value).replace("torch.", ""))
def test_from_peft_on_a_transformers_4bit_llama_matches_peft(llama_dir, monkeypatch, quant_type, double_quant,
                                                             compute_dtype, backend):
    if backend == "triton" and not triton_interpreting():
        pytest.skip("CPU tensors reach Triton only through its interpreter")
    theirs = _qlora(llama_dir, quant_type, double_quant, compute_dtype)
    ours = peftkern.from_peft(_qlora(llama_dir, quant_type, double_quant, compute_dtype), backend=backend)
    assert len(peftkern.fused_layers(ours)) == LINEAR_LAYERS
    _assert_no_dense_weight(ours)
    calls = count_fused_calls(monkeypatch, "linear_4bit_forward")
    ids = token_batch()
    ours_out, theirs_out = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    assert calls[0] == LINEAR_LAYERS
    # bf16 GEMMs inside, or the kernels' own: fp32 sums in another order than torch's.
    scale = 1 if compute_dtype == torch.float32 and backend == "torch" else 4
    # The kernels' bf16 base GEMMs sum in another order than torch's, so a bf16 rounding of a base output (which
    # bitsandbytes' F.linear makes) can land one bf16 step away: compared at bf16's tolerance there.
    tol_dtype = torch.bfloat16 if backend == "triton" and compute_dtype == torch.bfloat16 else torch.float32
    assert_close(ours_out.logits, theirs_out.logits, "logits", dtype=tol_dtype, scale=scale)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    ours_grads, theirs_grads = _grads(ours), _grads(theirs)
    assert sorted(ours_grads) == sorted(theirs_grads) and len(ours_grads) == 2 * LINEAR_LAYERS
    for name, grad in theirs_grads.items():
        assert_close(ours_grads[name], grad, name, scale=10 * scale, dtype=tol_dtype)


def test_qlora_trains_saves_and_peft_reloads(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    theirs = _qlora(llama_dir, "nf4", True, torch.float32)
    ours = peftkern.from_peft(copy.deepcopy(theirs))
    ids = token_batch(batch=4, seq=9, seed=7)
    for model in (ours, theirs):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
    trained = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        if parameter.requires_grad:
            assert_close(parameter, trained[name], name, scale=10)
    _assert_no_dense_weight(ours)
    ours.save_pretrained(tmp_path)
    base = _qlora(llama_dir, "nf4", True, torch.float32).base_model.unload()  # the same quantized base, no LoRA
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path).train()
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, ours(input_ids=ids).logits, "logits of peft's reload", scale=4)
    assert not torch.equal(ours.get_submodule("base_model.model.model.layers.0.mlp.up_proj").lora_B.default.weight,
                           base.get_submodule("model.layers.0.mlp.up_proj").lora_B.default.weight * 0)


def test_layer_repacked_by_bitsandbytes_runs_peft_s_forward(llama_dir):
    """After an eval-mode forward under no_grad, bitsandbytes has repacked every 4-bit weight for its CPU kernel:
    from_peft leaves those layers to peft (saying why) and the model still gives peft's logits."""
    theirs = _qlora(llama_dir, "nf4", False, torch.bfloat16).eval()
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    if not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack here (no AVX512-BF16 CPU)")
    from peftkern import peft_compat

    peftkern.from_peft(theirs)
    assert peftkern.fused_layers(theirs) == []
    assert "packing_format_for_cpu" in peft_compat.fusion_blocker(layer)
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, expected)


# ---- registration: opcheck, gradcheck --------------------------------------------------------------------------


def _op_args(x, weight, bias, lora_a, lora_b, seed, base_dtype):
    return (x.reshape(-1, x.shape[-1]), weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code,
            weight.offset, bias, lora_a, lora_b, 0.5, 0.2, seed, weight.quant_type, weight.blocksize,
            weight.nested_blocksize, weight.shape[0], weight.dtype, base_dtype, "torch")


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_opcheck(nested):
    x, weight, bias, lora_a, lora_b = _op_inputs(torch.float32, torch.float32, nested=nested, M=4, K=64, N=24)
    seed = torch.tensor([3], dtype=torch.int64)
    torch.library.opcheck(torch.ops.peftkern.lora_linear_4bit.default,
                          _op_args(x, weight, bias, lora_a, lora_b, seed, torch.float32))


def test_gradcheck_float64():
    x, weight, bias, lora_a, lora_b = _op_inputs(torch.float64, torch.float64, "fp4", M=2, K=32, N=6,
                                                 weight_dtype=torch.float32)
    bias.requires_grad_(True)

    def fn(x, bias, lora_a, lora_b):
        return lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.8, 0.25, seed=11)

    assert torch.autograd.gradcheck(fn, (x, bias, lora_a, lora_b))


def test_save_and_load_adapter_of_an_injected_4bit_model(tmp_path):
    model = nn.Sequential(_linear4bit(), nn.ReLU(), _linear4bit(K=96, N=64))
    peftkern.inject_lora(model, "all-linear", r=2, alpha=4, init="gaussian")
    with torch.no_grad():
        for layer in model[::2]:
            layer.lora_B.normal_()
    x = torch.randn(3, 64)
    expected = model(x)
    peftkern.save_adapter(model, tmp_path, base_model_name_or_path="tiny", task_type=None)
    fresh = nn.Sequential(_linear4bit(), nn.ReLU(), _linear4bit(K=96, N=64))
    loaded = peftkern.load_adapter(fresh, tmp_path)
    assert type(loaded[0]) is peftkern.LoRALinear4bit
    assert torch.equal(loaded(x), expected)


# Odd sizes, rows shorter than a block (5 x 3, 33 x 17), vector tails, and more than one scale batch of blocks.
DEQUANT_SHAPES = [(48, 80), (33, 17), (5, 3), (1, 1), (7, 130), (300, 200)]


@pytest.mark.parametrize("simd", ["avx512f", "avx2", "scalar"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_torch_backend_dequantizes_bit_exactly_as_the_reference(quant_type, simd):
    """The torch backend's dequantize (peftkern._cpu's kernel on the CPU) in every instruction set: every blocksize,
    double quant on and off, every weight dtype, each written straight to fp32, fp16 or bf16."""
    from peftkern.ops.lora4bit import _dequantize

    generator = torch.Generator().manual_seed(9)
    with cpu_simd(simd):
        for blocksize, shape, nested, dtype in itertools.product(BLOCKSIZES, DEQUANT_SHAPES, (False, True), DTYPES):
            weight = _weight4bit(*_quantize(torch.randn(shape, generator=generator).to(dtype), quant_type,
                                            blocksize, nested))
            for base_dtype in DTYPES:
                meta = (quant_type, blocksize, weight.nested_blocksize, shape[0], dtype, base_dtype)
                fast = _dequantize(shape[1], weight.packed, weight.absmax, weight.nested_absmax, weight.nested_code,
                                   weight.offset, meta)
                expected = _reference_dense(weight, base_dtype)
                assert fast.dtype == base_dtype and fast.shape == shape
                assert torch.equal(fast, expected), (blocksize, shape, nested, dtype, base_dtype)


@pytest.mark.parametrize("simd", ["avx512f", "avx2", "scalar"])
def test_cpu_dequantize_rounds_as_torch_over_the_whole_range(simd):
    """peftkern._cpu.dequantize_4bit on random bytes and absmax spread over 2**-40 .. 2**40: products that are
    float16 subnormals, round to float16 infinity, or round up a bf16 exponent, each rounded as torch rounds them
    (two threads, so the split of the blocks is covered too)."""
    generator = torch.Generator().manual_seed(4)
    numel, blocksize = (1 << 21) + 37, 32
    blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=generator)
    absmax = torch.exp2(torch.rand(blocks, generator=generator) * 80 - 40)
    with cpu_simd(simd) as module:
        for quant_type, (dtype, kind) in itertools.product(
                ("nf4", "fp4"), ((torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 2))):
            code = reference.four_bit_code(quant_type)
            out = torch.empty(numel, dtype=dtype)
            module.dequantize_4bit(packed.data_ptr(), numel, code.data_ptr(), blocksize, absmax.data_ptr(), 0, 0, 256,
                                   0.0, out.data_ptr(), kind, 2)
            expected = reference.dequantize_4bit(packed, absmax, quant_type, blocksize, (numel,), dtype)
            assert torch.equal(out, expected), (quant_type, dtype)
            if dtype == torch.float16:  # the cases named above are there
                assert bool(out.isinf().any()) and bool(((out != 0) & (out.abs() < 2**-14)).any())


def test_cpu_dequantize_kernel_is_what_the_torch_backend_runs(monkeypatch):
    """On the CPU the torch backend's forward and backward each call peftkern._cpu once; without the extension, or
    with one built before its dequantize kernel existed, the torch ops give the same output and gradients."""
    from peftkern.ops import lora4bit as ops_lora4bit

    module = importlib.import_module("peftkern._cpu")
    calls = []

    class Spy:
        def dequantize_4bit(self, *args):
            calls.append(args)
            return module.dequantize_4bit(*args)

    x, weight, bias, lora_a, lora_b = _op_inputs(torch.bfloat16, torch.float32, "nf4", nested=True)
    results = []
    for kernels in (Spy(), None, object()):
        monkeypatch.setattr(ops_lora4bit, "_cpu_kernels", lambda kernels=kernels: kernels)
        inputs = [cast(t, t.dtype, True) for t in (x, lora_a, lora_b)]
        y = lora_linear_4bit(inputs[0], weight, bias, inputs[1], inputs[2], 0.7, 0.25, seed=3, backend="torch")
        y.backward(torch.ones_like(y))
        results.append([y, *(t.grad for t in inputs)])
    assert len(calls) == 2
    for ours, *fallbacks in zip(*results):
        assert all(torch.equal(ours, fallback) for fallback in fallbacks)


def test_cpu_dequantize_kernel_refuses_bad_arguments():
    module = importlib.import_module("peftkern._cpu")
    out, packed, absmax = torch.empty(8), torch.zeros(4, dtype=torch.uint8), torch.ones(1)
    code = reference.four_bit_code("nf4")
    args = dict(packed_address=packed.data_ptr(), numel=8, code_address=code.data_ptr(), blocksize=8,
                absmax_address=absmax.data_ptr(), nested_code_address=0, nested_absmax_address=0, nested_blocksize=256,
                offset=0.0, out_address=out.data_ptr(), out_kind=0, num_threads=1)
    module.dequantize_4bit(**args)
    assert torch.equal(out, reference.dequantize_4bit(packed, absmax, "nf4", 8, (8,), torch.float32))
    for change, message in (({"blocksize": 7}, "blocksize must be even"), ({"out_kind": 3}, "out_kind must be"),
                            ({"numel": -1}, "numel must be >= 0"), ({"out_address": 0}, "null address"),
                            ({"nested_code_address": code.data_ptr()}, "needs nested_absmax")):
        with pytest.raises(ValueError, match=message):
            module.dequantize_4bit(**(args | change))


def test_autocast_and_mixed_merge_refusal():
    layer = peftkern.LoRALinear4bit.from_linear(_linear4bit(compute_dtype=torch.float32), r=2, alpha=2,
                                                init="gaussian")
    x = torch.randn(3, 64)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert_close(y, layer(x), "autocast output", dtype=torch.bfloat16, scale=2)
    # A model with a plain LoRALinear before the 4-bit one: refused before anything is merged.
    model = nn.Sequential(peftkern.LoRALinear.from_linear(nn.Linear(64, 64), r=2, alpha=2), layer)
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)
    before = model[0].base_layer.weight.clone()
    with pytest.raises(ValueError, match="4-bit weight"):
        peftkern.merge(model)
    assert torch.equal(model[0].base_layer.weight, before) and not model[0].merged


def test_peft_merge_and_unload_of_a_converted_4bit_model_is_peft_s(llama_dir):
    theirs = _qlora(llama_dir, "nf4", False, torch.float32)
    ours = peftkern.from_peft(copy.deepcopy(theirs))
    ids = token_batch()
    merged_ours, merged_theirs = peftkern.merge_and_unload(ours), theirs.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(merged_ours.train()(input_ids=ids).logits, merged_theirs.train()(input_ids=ids).logits)


def test_cuda_backend_leaves_4bit_layers_to_peft(llama_dir, monkeypatch):
    """No CUDA C++ kernel for 4-bit yet: a converted layer asked for one runs peft's forward, saying why; asked
    for triton, it runs the Triton kernels (through the interpreter on CPU), else peft's forward."""
    theirs = _qlora(llama_dir, "nf4", True, torch.float32)
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    ours = peftkern.from_peft(copy.deepcopy(theirs), backend="cuda")
    assert peftkern.fused_layers(ours) == []
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    from peftkern import peft_compat

    assert peft_compat.fusion_blocker(layer) == "no cuda kernel for 4-bit layers yet"
    ours = peftkern.from_peft(ours)  # back to the default backend
    assert len(peftkern.fused_layers(ours)) == LINEAR_LAYERS
    calls = count_fused_calls(monkeypatch, "linear_4bit_forward")
    with torch.no_grad(), peftkern.use_backend("cuda"):
        assert torch.equal(ours(input_ids=ids).logits, expected)
    assert calls[0] == 0
    with torch.no_grad():
        ours(input_ids=ids)
    assert calls[0] == LINEAR_LAYERS
    with torch.no_grad(), peftkern.use_backend("triton"):
        assert_close(ours(input_ids=ids).logits, expected, "logits", scale=4)
    assert calls[0] == (2 if triton_interpreting() else 1) * LINEAR_LAYERS


# ---- the Triton kernels (the interpreter on CPU) ------------------------------------------------------------

needs_triton = pytest.mark.skipif(not triton_interpreting() and not torch.cuda.is_available(),
                                  reason="CPU tensors reach Triton only through its interpreter")


@needs_triton
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_kernels_decode_bitsandbytes_weights_bit_exactly(monkeypatch, quant_type, nested):
    """x = I gives y = W.T and dY = I gives dX = W (zero adapters, fp32 sums of one product): the tiles the kernels
    decode in their main loops equal the reference's dense weight bit for bit, for every storage layout they
    handle (K even or odd, blocks within or across rows, one scale per tile row or per element: the last case
    with 64-wide tiles over blocks of 32), and a double-quantized absmax over more than one nested block (the
    kernels decode it per tile)."""
    import triton

    from peftkern.triton_kernels import lora4bit

    generator = torch.Generator().manual_seed(7)
    cases = [(64, (24, 128), torch.float32), (32, (17, 33), torch.float16), (128, (24, 80), torch.bfloat16),
             (4096, (9, 50), torch.float32), (32, (12, 64), torch.bfloat16), (32, (12, 64), "wide"),
             (32, (40, 224), torch.float32)]  # 280 blocks: two nested blocks of 256
    for blocksize, (N, K), dtype in cases:
        if dtype == "wide":
            wide = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP": 4}, num_warps=1)]
            for kernel in (lora4bit._lora4bit_fwd_kernel, lora4bit._lora4bit_bwd_dx_kernel,
                           lora4bit._lora4bit_fwd_kernel_fp32, lora4bit._lora4bit_bwd_dx_kernel_fp32):
                monkeypatch.setattr(kernel, "configs", wide)
            dtype = torch.float16
        weight = _weight4bit(*_quantize(torch.randn(N, K, generator=generator).to(dtype), quant_type, blocksize,
                                        nested))
        dense = _reference_dense(weight, dtype)
        lora_a, lora_b = torch.zeros(2, K, dtype=dtype), torch.zeros(N, 2, dtype=dtype)
        eye = torch.eye(K, dtype=dtype, requires_grad=True)
        y = lora_linear_4bit(eye, weight, None, lora_a, lora_b, backend="triton")
        assert torch.equal(y, dense.T), (blocksize, N, K, dtype)
        x = torch.zeros(N, K, dtype=dtype, requires_grad=True)
        lora_linear_4bit(x, weight, None, lora_a, lora_b, backend="triton").backward(torch.eye(N, dtype=dtype))
        assert torch.equal(x.grad, dense), (blocksize, N, K, dtype)


TRITON_OP_CASES = [  # (dtype, adapter dtype, dropout, quant type, double quant, blocksize)
    (torch.float32, "same", 0.0, "nf4", True, 64),
    (torch.float32, "same", 0.25, "fp4", False, 128),
    (torch.float16, "same", 0.25, "nf4", False, 64),
    (torch.float16, "fp32", 0.0, "fp4", True, 64),
    (torch.bfloat16, "same", 0.0, "fp4", True, 128),
    (torch.bfloat16, "fp32", 0.25, "nf4", True, 64),
]


@needs_triton
@pytest.mark.parametrize(("dtype", "adapter_dtype", "dropout_p", "quant_type", "nested", "blocksize"),
                         TRITON_OP_CASES, ids=lambda value: str(value).replace("torch.", ""))
def test_triton_op_matches_the_reference(dtype, adapter_dtype, dropout_p, quant_type, nested, blocksize):
    adapter = dtype if adapter_dtype == "same" else torch.float32
    x, weight, bias, lora_a, lora_b = _op_inputs(dtype, adapter, quant_type, nested, M=12, K=128, N=40)
    if blocksize != 64:
        weight = _weight4bit(*_quantize(_reference_dense(weight, dtype), quant_type, blocksize, nested))
    _check_against_reference(x, weight, bias, lora_a, lora_b, dtype, dropout_p, backend="triton")


@needs_triton
def test_triton_odd_sizes_strides_and_empty_batches_match_the_torch_backend():
    """Odd K (rows not starting on a byte), blocks across rows, one row, M = 0, a transposed x, leading dims,
    dropout: the same outputs and gradients as the torch backend (the same masks)."""
    generator = torch.Generator().manual_seed(3)
    for M, K, N, blocksize, transposed in [(7, 33, 17, 32, False), (1, 17, 5, 64, False), (0, 64, 16, 64, False),
                                           (9, 48, 24, 64, True)]:
        weight = _weight4bit(*_quantize(torch.randn(N, K, generator=generator), "nf4", blocksize, True))
        base_x = torch.randn(K, M, generator=generator).T if transposed else torch.randn(M, K, generator=generator)
        lora_a = torch.randn(3, K, generator=generator)
        lora_b = torch.randn(N, 3, generator=generator)
        bias = torch.randn(N, generator=generator)
        results = []
        for backend in ("torch", "triton"):
            x, a, b = (t.detach().clone().requires_grad_() for t in (base_x, lora_a, lora_b))
            x_view = x.T.unsqueeze(0).transpose(1, 2) if transposed else x.reshape(1, M, K)  # leading dims
            y = lora_linear_4bit(x_view, weight, bias, a, b, 0.5, 0.3, seed=4, backend=backend)
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
            results.append((y, x.grad, a.grad, b.grad))
        for name, ours, theirs in zip(("y", "dx", "dA", "dB"), results[1], results[0]):
            assert_close(ours, theirs, f"{name} (M={M}, K={K}, N={N})", scale=2)


@needs_triton
@pytest.mark.parametrize(("x_dtype", "compute_dtype"),
                         [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                          (torch.float16, torch.float32)], ids=str)
def test_triton_compute_dtype_runs_the_base_as_bitsandbytes_does(x_dtype, compute_dtype):
    """x in one dtype, the base GEMM in another (x cast to it, the product rounded to it, then to x's dtype)."""
    x, weight, _, lora_a, lora_b = _op_inputs(x_dtype, torch.float32, K=64, N=24)
    bias = torch.randn(24).to(compute_dtype)
    y = lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.5, compute_dtype=compute_dtype, backend="triton")
    y.backward(torch.ones_like(y))
    dx, da = x.grad, lora_a.grad
    x.grad = lora_a.grad = lora_b.grad = None
    expected = lora_linear_4bit(x, weight, bias, lora_a, lora_b, 0.5, compute_dtype=compute_dtype, backend="torch")
    expected.backward(torch.ones_like(expected))
    low = torch.bfloat16 if torch.bfloat16 in (x_dtype, compute_dtype) else torch.float16
    assert_close(y, expected, "y", dtype=low)
    assert_close(dx, x.grad, "dx", dtype=low)
    assert_close(da, lora_a.grad, "dA", dtype=low)


@needs_triton
def test_triton_opcheck():
    x, weight, bias, lora_a, lora_b = _op_inputs(torch.float32, torch.float32, nested=True, M=4, K=64, N=24)
    args = list(_op_args(x, weight, bias, lora_a, lora_b, torch.tensor([3], dtype=torch.int64), torch.float32))
    args[-1] = "triton"
    torch.library.opcheck(torch.ops.peftkern.lora_linear_4bit.default, tuple(args))
