"""DoRA: the reference against peft's DoRA layer, our op on every backend against the reference, and the
layers (``use_dora=True``, ``from_peft`` of peft DoRA models, peft-format files, merging) against peft."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _helpers import assert_close, make_lora_inputs

from peftkern import reference
from peftkern.backends import triton_interpreting
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
    for name, ours, theirs in zip(("dA", "dB", "dm"), (lora_a, lora_b, magnitude), leaves[1:]):
        assert ours.grad.dtype == ours.dtype
        assert_close(ours.grad, theirs.grad, name, dtype, scale=grad_scale)


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
