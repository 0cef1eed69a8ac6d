"""DoRA: the reference against peft's DoRA layer, our op on every backend against the reference, and the
layers (``use_dora=True``, ``from_peft`` of peft DoRA models, peft-format files, merging) against peft."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _helpers import assert_close

from peftkern import reference

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
