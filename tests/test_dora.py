"""DoRA: the reference against peft's DoRA layer, our op on every backend against the reference, and the
layers (``use_dora=True``, ``from_peft`` of peft DoRA models, peft-format files, merging) against peft."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from _helpers import assert_close, make_lora_inputs, tolerance
from _models import tiny_llama, token_batch

import peftkern
import peftkern.ops.lora as ops_lora
from peftkern import reference
from peftkern.backends import triton_interpreting
from peftkern.model import lora_layers
from peftkern.ops.dora import dora_linear, weight_norm_sq

peft = pytest.importorskip("peft")


class _FixedDropout(nn.Module):
    """Inverted dropout with a given keep-mask, so peft's layer and the reference drop the same elements."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.reshape(x.shape).to(x.dtype) / (1.0 - self.p)


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear


def _peft_dora_layer(K, N, r, alpha, dropout, bias=True, seed=0, dtype=torch.float64):
    """peft's DoRA ``lora.Linear`` over a random [N, K] base with non-zero A, B and a magnitude moved off its
    initial norms."""
    torch.manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias).to(dtype)
    config = peft.LoraConfig(target_modules=["proj"], r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
    model = peft.get_peft_model(_Holder(linear), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, 0.3)
        layer.lora_B["default"].weight.normal_(0, 0.3)
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.mul_(1.0 + 0.5 * torch.rand_like(magnitude))
    return layer


def _dora_params(layer):
    return (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("shape", [(5, 17, 33, 4), (9, 8, 3, 1)], ids=lambda s: "x".join(map(str, s)))
def test_reference_norm_is_the_dense_norm(shape):
    """The low-rank identity gives peft's dense ``||W + s B A||`` per row (float64)."""
    _, K, N, r = shape
    weight, lora_a, lora_b = torch.randn(N, K, dtype=torch.float64), torch.randn(r, K, dtype=torch.float64), \
        torch.randn(N, r, dtype=torch.float64)
    dense = torch.linalg.norm(weight + 0.7 * lora_b @ lora_a, dim=1)
    assert_close(reference.dora_weight_norm(weight, lora_a, lora_b, 0.7), dense, "norm")
    assert_close(reference.dora_weight_norm(weight, lora_a, lora_b, 0.7, (weight * weight).sum(1)), dense, "norm")


@pytest.mark.parametrize("mode", ["train-dropout", "train-no-dropout", "eval-dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_reference_matches_peft_dora_layer(mode, bias):
    K, N, r = 12, 10, 3
    p = 0.0 if mode == "train-no-dropout" else 0.4
    layer = _peft_dora_layer(K, N, r, alpha=6, dropout=p, bias=bias)
    layer.train(mode.startswith("train"))
    x = torch.randn(2, 4, K, dtype=torch.float64)  # leading dims: [2, 4] -> M = 8 rows
    keep = torch.rand(8, K) >= p
    if p > 0:
        layer.lora_dropout["default"] = _FixedDropout(keep, p)
    x_peft = x.clone().requires_grad_(True)
    y_peft = layer(x_peft)
    grad = torch.randn_like(y_peft)
    y_peft.backward(grad)

    lora_a, lora_b, magnitude = _dora_params(layer)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b, magnitude)]
    base = layer.get_base_layer()
    y_ref = reference.dora_linear(leaves[0], base.weight.detach(), None if base.bias is None else base.bias.detach(),
                                  *leaves[1:], layer.scaling["default"], p, layer.training, keep_mask=keep)
    y_ref.backward(grad)
    assert_close(y_ref, y_peft, "y")
    for name, ours, theirs in zip(("dx", "dA", "dB", "dm"), leaves, (x_peft, lora_a, lora_b, magnitude)):
        assert_close(ours.grad, theirs.grad, name)
    assert magnitude.grad.abs().max() > 0 and lora_b.grad.abs().max() > 0


# ---- the op against the reference ----------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cuda" or triton_interpreting() else ["torch"]


def _op_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True):
    x, weight, b, lora_a, lora_b = make_lora_inputs(M, K, N, r, dtype, adapter_dtype, bias, DEVICE)
    magnitude = (torch.linalg.norm(weight.double(), dim=1) * (0.5 + torch.rand(N, dtype=torch.float64,
                 device=DEVICE))).to(lora_a.dtype).requires_grad_(True)
    return x, weight, b, lora_a, lora_b, magnitude


def _compare(inputs, scaling, dropout_p, training, backend, seed=99, grad_scale=1.0):
    x, weight, bias, lora_a, lora_b, magnitude = inputs
    y = dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, training, seed=seed,
                    backend=backend)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, lora_a, lora_b, magnitude)]
    bias64 = None if bias is None else bias.detach().double()
    y64 = reference.dora_linear(leaves[0], weight.detach().double(), bias64, *leaves[1:], scaling, dropout_p,
                                training, seed=seed)
    y64.backward(grad.double())
    dtype = x.dtype
    assert y.dtype == dtype
    assert_close(y, y64, "y", dtype)
    assert_close(x.grad, leaves[0].grad, "dx", dtype)
    for name, ours, theirs in zip(("dA", "dB"), (lora_a, lora_b), leaves[1:3]):
        assert ours.grad.dtype == ours.dtype
        assert_close(ours.grad, theirs.grad, name, dtype, scale=grad_scale)
    # dm[n] = sum_t dY[t, n] (Z[t, n] - b[n]) / m[n] cancels: on top of the usual tolerance, one rounding of
    # x's dtype (Z is rounded to it) times the sum of the terms' magnitudes (a column can sum to 0.5 from
    # terms adding up to 30).
    assert magnitude.grad.dtype == magnitude.dtype
    out = y64.detach() - (0.0 if bias64 is None else bias64)
    terms = (grad.double().abs() * out.abs()).reshape(-1, out.shape[-1]).sum(0) / leaves[3].detach().abs()
    atol, rtol = tolerance(dtype, magnitude.device)
    expected = leaves[3].grad
    allowed = grad_scale * (atol + rtol * expected.abs()) + torch.finfo(dtype).eps * terms
    excess = (magnitude.grad.double() - expected).abs() - allowed
    assert excess.numel() == 0 or excess.max() <= 0, f"dm: out of tolerance by {excess.max().item():.3g}"


SHAPES = [(1, 17, 33, 4), (33, 40, 17, 8), (0, 16, 9, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_op_matches_reference(backend, dtype, shape, dropout_p):
    _compare(_op_inputs(*shape, dtype), 0.7, dropout_p, True, backend, grad_scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_eval_ignores_dropout_and_fp32_adapters(backend):
    _compare(_op_inputs(9, 24, 20, 4, torch.float32), 2.0, 0.5, False, backend)
    inputs = _op_inputs(9, 24, 20, 4, torch.bfloat16, adapter_dtype=torch.float32)
    _compare(inputs, 2.0, 0.2, True, backend, grad_scale=2.0)
    assert inputs[5].grad.dtype == torch.float32 and inputs[0].grad.dtype == torch.bfloat16


def test_op_leading_dims_non_contiguous_and_cached_norm():
    x, weight, bias, lora_a, lora_b, magnitude = _op_inputs(12, 16, 10, 4, torch.float64)
    x3 = x.detach().reshape(3, 4, 16).transpose(0, 1)  # [4, 3, 16], non-contiguous
    y = dora_linear(x3, weight, bias, lora_a, lora_b, magnitude, 0.5, weight_norm_sq=weight_norm_sq(weight))
    expected = reference.dora_linear(x3, weight, bias, lora_a, lora_b, magnitude, 0.5)
    assert y.shape == (4, 3, 10)
    assert_close(y, expected, "y")


def test_op_bad_inputs_raise_before_running():
    x, weight, bias, lora_a, lora_b, magnitude = _op_inputs(4, 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match=r"magnitude: expected shape \(6,\)"):
        dora_linear(x, weight, bias, lora_a, lora_b, magnitude[:5])
    with pytest.raises(TypeError, match="magnitude: expected the dtype of lora_a"):
        dora_linear(x, weight, bias, lora_a, lora_b, magnitude.double())
    with pytest.raises(TypeError, match="weight_norm_sq: expected torch.float32"):
        dora_linear(x, weight, bias, lora_a, lora_b, magnitude, weight_norm_sq=torch.ones(6, dtype=torch.float64))


def test_op_opcheck_and_gradcheck():
    x, weight, bias, lora_a, lora_b, magnitude = _op_inputs(5, 8, 6, 2, torch.float64)
    norm_sq = weight_norm_sq(weight)
    for seed in (None, torch.tensor([7])):
        args = (x, weight, bias, lora_a, lora_b, magnitude, norm_sq, 0.5, 0.25 if seed is not None else 0.0,
                seed, "torch")
        torch.library.opcheck(torch.ops.peftkern.dora_linear.default, args)
    # The norm is detached (its numerical derivative in A and B is not the op's gradient): check x and m.
    a, b = lora_a.detach(), lora_b.detach()
    for p in (0.0, 0.25):
        assert torch.autograd.gradcheck(
            lambda x, m, p=p: dora_linear(x, weight, bias, a, b, m, 0.5, p, seed=5, backend="torch"),
            (x, magnitude),
        )


# ---- layers: from_peft, inject_lora(use_dora=True), files, merging -----------------------------------------

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _move_off_initial(model: nn.Module, seed: int = 4) -> None:
    """Non-zero A and B, and magnitudes scaled off their initial norms (a fresh DoRA layer is its base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(0.5 + torch.rand(parameter.shape, generator=generator))


class _SeededDropout(nn.Dropout):
    """Dropout drawing peftkern's counter-based mask from the next seed of a shared list: peft's layer then drops
    what our op drops (our op draws its seeds from the same list through a patched ``new_dropout_seed``)."""

    def __init__(self, p: float, seeds: list[int]) -> None:
        super().__init__(p)
        self.seeds = seeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        x2 = x.reshape(-1, x.shape[-1])
        keep = reference.dropout_mask(self.seeds.pop(0), tuple(x2.shape), self.p)
        return (x2 * keep.to(x.dtype) / (1.0 - self.p)).reshape(x.shape)


def _dora_pair(dropout: float, backend: str | None):
    """(ours: from_peft of a copy, theirs: peft) over a tiny Llama with DoRA on every projection."""
    config = peft.LoraConfig(target_modules=ALL_PROJECTIONS, r=4, lora_alpha=8, lora_dropout=dropout,
                             use_dora=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), config)
    _move_off_initial(theirs)
    ours = peftkern.from_peft(copy.deepcopy(theirs), backend=backend)
    return ours, theirs


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train-dropout", "train", "eval"])
def test_from_peft_dora_llama_matches_peft(monkeypatch, backend, mode):
    dropout = 0.0 if mode == "train" else 0.2
    ours, theirs = _dora_pair(dropout, backend)
    assert len(peftkern.fused_layers(ours)) == 2 * len(ALL_PROJECTIONS)
    # The same Parameter objects as before the conversion: optimizers keep working.
    magnitude_ids = {id(p) for name, p in ours.named_parameters() if "lora_magnitude_vector" in name}
    assert len(magnitude_ids) == 2 * len(ALL_PROJECTIONS)
    seeds = list(range(1000, 1100))
    if mode == "train-dropout":
        ours_seeds = list(seeds)
        monkeypatch.setattr(ops_lora, "new_dropout_seed",
                            lambda device: torch.tensor([ours_seeds.pop(0)], dtype=torch.int64, device=device))
        for module in theirs.modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                module.lora_dropout["default"] = _SeededDropout(dropout, seeds)
    ours.train(mode != "eval")
    theirs.train(mode != "eval")
    ids = token_batch()
    out, ref = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    # A whole model's logits: every layer's rounding adds up (at the per-op fp32 tolerance the torch backend
    # already reaches 0.9 of it with dropout), so twice the op tolerance, as the gradients get 10x.
    assert_close(out.logits, ref.logits, "logits", scale=2)
    out.loss.backward()
    ref.loss.backward()
    ours_params, theirs_params = _trainable(ours), _trainable(theirs)
    assert sorted(ours_params) == sorted(theirs_params)
    assert sum("lora_magnitude_vector" in name for name in ours_params) == 2 * len(ALL_PROJECTIONS)
    for name, parameter in theirs_params.items():
        assert_close(ours_params[name].grad, parameter.grad, f"{name}.grad", scale=10)
    assert {id(p) for name, p in ours.named_parameters() if "lora_magnitude_vector" in name} == magnitude_ids
    if mode == "train-dropout":
        layers = 2 * len(ALL_PROJECTIONS)
        assert len(seeds) == len(ours_seeds) == 100 - layers  # both drew one mask per layer


def test_from_peft_dora_merge_and_unload_keeps_logits():
    ours, theirs = _dora_pair(0.0, None)
    ids = token_batch()
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids).logits
        assert_close(ours.eval()(input_ids=ids).logits, expected, "logits")
        ours.merge_adapter()
        assert peftkern.fused_layers(ours) == []
        assert_close(ours(input_ids=ids).logits, expected, "merged logits", scale=10)
        ours.unmerge_adapter()
        assert len(peftkern.fused_layers(ours)) == 2 * len(ALL_PROJECTIONS)
        assert_close(ours(input_ids=ids).logits, expected, "unmerged logits", scale=10)
        merged = ours.merge_and_unload()
        assert_close(merged(input_ids=ids).logits, expected, "merge_and_unload logits", scale=10)


def _injected(dropout: float = 0.0, backend: str | None = None) -> tuple[nn.Module, nn.Module]:
    base = tiny_llama()
    ours = peftkern.inject_lora(copy.deepcopy(base), ALL_PROJECTIONS, r=4, alpha=8, dropout=dropout, use_dora=True,
                                backend=backend)
    _move_off_initial(ours)
    return base, ours


def test_inject_lora_dora_starts_as_base_and_trains_magnitudes():
    base = tiny_llama()
    ours = peftkern.inject_lora(copy.deepcopy(base), ["q_proj", "down_proj"], r=2, alpha=4, use_dora=True)
    ids = token_batch()
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, "fresh DoRA logits")
    names = sorted(name for name, p in ours.named_parameters() if p.requires_grad)
    assert len(names) == 3 * 4 and sum("lora_magnitude_vector" in n for n in names) == 4
    layer = dict(lora_layers(ours))["model.layers.0.self_attn.q_proj"]
    assert "dora=True" in repr(layer)
    assert_close(layer.lora_magnitude_vector, torch.linalg.norm(layer.weight, dim=1), "initial magnitude")


def test_inject_lora_dora_saved_loads_in_peft_and_back(tmp_path):
    base, ours = _injected()
    peftkern.save_adapter(ours, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(key.endswith(".lora_magnitude_vector") for key in keys) == 2 * len(ALL_PROJECTIONS)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.peft_config["default"].use_dora is True
    ids = token_batch()
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
        assert (expected - base(input_ids=ids).logits).abs().max() > 0.1  # an adapter that does something
        assert_close(loaded(input_ids=ids).logits, expected, "peft's logits of our DoRA adapter")
        # and back: peft's files of a DoRA adapter load into a plain model as DoRA layers
        loaded.save_pretrained(tmp_path / "peft")
        plain = peftkern.load_adapter(copy.deepcopy(base), tmp_path / "peft")
        assert all(layer.use_dora for _, layer in lora_layers(plain))
        assert_close(plain(input_ids=ids).logits, expected, "logits of peft's files loaded by us")


def test_inject_lora_dora_merge_unmerge_and_unload_keep_logits():
    _, ours = _injected()
    ids = token_batch()
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
        peftkern.merge(ours)
        assert_close(ours(input_ids=ids).logits, expected, "merged logits", scale=10)
        peftkern.unmerge(ours)
        assert_close(ours(input_ids=ids).logits, expected, "unmerged logits", scale=10)
        plain = peftkern.merge_and_unload(ours)
        assert not list(lora_layers(plain))
        assert_close(plain(input_ids=ids).logits, expected, "merge_and_unload logits", scale=10)


def test_layer_weight_norm_cache_follows_the_weight():
    linear = nn.Linear(12, 9).double()
    layer = peftkern.LoRALinear.from_linear(linear, r=3, alpha=6, use_dora=True)
    _move_off_initial(layer)
    x = torch.randn(5, 12, dtype=torch.float64)

    def expected():
        return reference.dora_linear(x, linear.weight, linear.bias, layer.lora_A, layer.lora_B,
                                     layer.lora_magnitude_vector, layer.scaling)

    assert_close(layer(x), expected(), "y")
    cached = layer._weight_norm_sq.get(linear.weight)
    assert layer._weight_norm_sq.get(linear.weight) is cached  # no recomputation while W is unchanged
    with torch.no_grad():
        linear.weight.mul_(2.0)  # in place: the version counter moves
    assert_close(layer(x), expected(), "y after an in-place change")
    linear.weight.data = torch.randn(9, 12, dtype=torch.float64)  # another tensor behind the Parameter
    assert_close(layer(x), expected(), "y after .data =")
    layer.load_state_dict({**layer.state_dict(), "base_layer.weight": torch.randn(9, 12, dtype=torch.float64)})
    assert_close(layer(x), expected(), "y after load_state_dict")


def test_dora_over_4bit_and_in_pools_is_refused():
    pool = peftkern.AdapterPool(nn.Sequential(nn.Linear(8, 6)), target_modules=["0"], num_slots=2, r_max=4)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        pool.load("a", {"base_model.model.0.lora_A.weight": torch.randn(2, 8),
                        "base_model.model.0.lora_B.weight": torch.randn(6, 2)}, {"use_dora": True})


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_dora_layer_under_torch_compile_fullgraph(training):
    """No graph break (the weight-norm cache steps aside while traced); the same outputs and gradients."""
    torch.manual_seed(0)
    layer = peftkern.LoRALinear.from_linear(nn.Linear(16, 12), r=4, alpha=8, dropout=0.2, use_dora=True)
    _move_off_initial(layer)
    layer.train(training)
    x = torch.randn(3, 5, 16, requires_grad=True)
    leaves = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    results = []
    for run in (torch.compile(layer, backend="aot_eager", fullgraph=True), layer):
        torch.manual_seed(1)  # the same dropout seed for both
        y = run(x)
        y.sum().backward()
        results.append((y.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    (y_compiled, grads_compiled), (y_eager, grads_eager) = results
    assert_close(y_compiled, y_eager, "y")
    for name, ours, theirs in zip(("dx", "dA", "dB", "dm"), grads_compiled, grads_eager):
        assert_close(ours, theirs, name)


def test_from_peft_dora_bf16_base_with_fp32_adapters():
    """peft's default beside a 16-bit model: fp32 adapters and magnitudes (peft casts x to their dtype). bf16
    rounding through the model moves logits by more than the element tolerance, for peft as for us: both are
    judged against the same model in fp32, and ours must be as close to it as peft's."""
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8, use_dora=True,
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16), config)
    _move_off_initial(theirs)
    q_proj = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_magnitude_vector["default"].weight.dtype == torch.float32
    ours = peftkern.from_peft(copy.deepcopy(theirs))
    assert len(peftkern.fused_layers(ours)) == 6
    exact = peft.get_peft_model(tiny_llama(), config)
    exact.load_state_dict({name: value.float() for name, value in theirs.state_dict().items()})
    ids = token_batch()
    runs = {}
    for name, model in (("ours", ours), ("peft", theirs), ("fp32", exact)):
        out = model.train()(input_ids=ids, labels=ids)
        out.loss.backward()
        runs[name] = out.logits.float(), {n: p.grad.float() for n, p in _trainable(model).items()}
    assert ours(input_ids=ids).logits.dtype == torch.bfloat16

    def error(name, key=None):
        got, want = (runs[name][0], runs["fp32"][0]) if key is None else (runs[name][1][key], runs["fp32"][1][key])
        return float((got - want).norm() / want.norm())

    assert error("ours") <= 1.5 * error("peft") + 1e-3, (error("ours"), error("peft"))
    for key in runs["fp32"][1]:
        assert runs["ours"][1][key].dtype == torch.float32
        assert error("ours", key) <= 1.5 * error("peft", key) + 1e-3, (key, error("ours", key), error("peft", key))
