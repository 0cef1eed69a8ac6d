"""LoRALinear: initialisation as peft, scaling, merge/unmerge, trainable parameters, repr."""

from __future__ import annotations

import math

import pytest
import torch

import peftkern
from peftkern import reference


def test_from_linear_initialises_like_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    ours = peftkern.LoRALinear.from_linear(torch.nn.Linear(24, 10), r=6, alpha=12)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(24, 10))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=6, lora_alpha=12, target_modules=["0"]))
    layer = theirs.base_model.model[0]
    # Same distribution: Kaiming-uniform bound sqrt(6 / ((1 + a^2) * fan_in)) with a = sqrt(5), B zero.
    bound = 1.0 / math.sqrt(24)
    assert ours.lora_A.abs().max() <= bound and layer.lora_A["default"].weight.abs().max() <= bound
    assert ours.lora_A.std() > bound / 3
    assert torch.count_nonzero(ours.lora_B) == 0
    assert ours.scaling == layer.scaling["default"] == 2.0
    x = torch.randn(4, 24)
    assert torch.allclose(ours(x), ours.base_layer(x))  # B = 0: the layer starts as the base


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling(use_rslora):
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(8, 8), r=16, alpha=8, use_rslora=use_rslora)
    assert layer.scaling == (8 / 4 if use_rslora else 8 / 16)


@pytest.mark.parametrize("init", ["gaussian", "zeros"])
def test_other_inits(init):
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(32, 8), r=4, alpha=4, init=init)
    assert torch.count_nonzero(layer.lora_B) == 0
    if init == "zeros":
        assert torch.count_nonzero(layer.lora_A) == 0
    else:
        assert abs(layer.lora_A.std().item() - 1 / 4) < 0.08


def test_only_adapter_parameters_train_and_forward_matches_reference():
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(12, 9), r=3, alpha=6, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    x = torch.randn(2, 7, 12)
    expected = reference.lora_linear(
        x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(), layer.lora_B.double(),
        layer.scaling,
    )
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_and_unmerge(dtype):
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(16, 12).to(dtype), r=4, alpha=8)
    assert layer.lora_A.dtype == torch.float32  # fp32 adapters beside a 16-bit base, as peft
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    layer.eval()
    x = torch.randn(5, 16, dtype=dtype)
    original_weight = layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(layer(x).float(), unmerged.float(), atol=tol, rtol=tol)
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.weight.float(), original_weight.float(), atol=tol)
    assert torch.allclose(layer(x).float(), unmerged.float(), atol=tol, rtol=tol)


def test_dropout_only_in_training():
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(16, 16), r=4, alpha=4, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_extra_repr_and_bad_arguments():
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(16, 16), r=4, alpha=8, dropout=0.1)
    text = repr(layer)
    for part in ("r=4", "alpha=8", "dropout=0.1", "backend=torch"):
        assert part in text
    with pytest.raises(ValueError, match="r: expected a positive int"):
        peftkern.LoRALinear.from_linear(torch.nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        peftkern.LoRALinear.from_linear(torch.nn.Linear(4, 4), r=2, alpha=1, dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        peftkern.LoRALinear.from_linear(torch.nn.Linear(4, 4), r=2, alpha=1, init="kaiming")
    with pytest.raises(TypeError, match="base_layer"):
        peftkern.LoRALinear(torch.nn.Conv1d(4, 4, 1), r=2, alpha=1)


def test_autocast_bf16_with_fp32_adapters():
    layer = peftkern.LoRALinear.from_linear(torch.nn.Linear(16, 12), r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    expected = reference.lora_linear(
        x.detach().bfloat16().double(), layer.weight.bfloat16().double(), layer.bias.bfloat16().double(),
        layer.lora_A.double(), layer.lora_B.double(), layer.scaling,
    )
    assert torch.allclose(y.double(), expected, atol=2e-2, rtol=2e-2)
