"""Model surgery (peftkern/model.py) on a small random Llama, against ``peft`` on the same weights."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
from _helpers import assert_close
from _models import (
    count_fused_calls,
    loss_of,
    our_adapter_params,
    peft_adapter_params,
    tiny_llama,
    token_batch,
)

import peftkern
from peftkern.model import lora_layers

peft = pytest.importorskip("peft")


def _peft_model(base: nn.Module, seed: int = 3, **config) -> nn.Module:
    """peft's LoRA on a copy of ``base`` with random non-zero adapters."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (lora_a, lora_b) in sorted(peft_adapter_params(model).items()):
            lora_a.copy_(torch.randn(lora_a.shape, generator=generator) * 0.3)
            lora_b.copy_(torch.randn(lora_b.shape, generator=generator) * 0.3)
    return model


def _copy_adapters(source: dict, target: dict) -> None:
    assert sorted(source) == sorted(target)
    with torch.no_grad():
        for name, (lora_a, lora_b) in source.items():
            target[name][0].copy_(lora_a)
            target[name][1].copy_(lora_b)


def _assert_same_run(ours: nn.Module, theirs: nn.Module, ours_params: dict, theirs_params: dict) -> None:
    """Equal logits, loss and adapter gradients (fp32; dropout off or eval)."""
    ids = token_batch()
    logits, loss = loss_of(ours, ids)
    ref_logits, ref_loss = loss_of(theirs, ids)
    assert_close(logits, ref_logits, "logits")
    assert_close(loss, ref_loss, "loss")
    loss.backward()
    ref_loss.backward()
    for name, (lora_a, lora_b) in theirs_params.items():
        assert_close(ours_params[name][0].grad, lora_a.grad, f"{name}.lora_A.grad")
        assert_close(ours_params[name][1].grad, lora_b.grad, f"{name}.lora_B.grad")


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        dict(target_modules=r".*\.(k_proj|down_proj)", r=3, lora_alpha=5, use_rslora=True),
        dict(target_modules="all-linear", r=2, lora_alpha=4),
        dict(
            target_modules=["q_proj", "o_proj", "up_proj"],
            r=4,
            lora_alpha=8,
            rank_pattern={"o_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"up_proj": 3.0},
        ),
    ],
    ids=["names", "regex-rslora", "all-linear", "rank-alpha-pattern"],
)
def test_inject_matches_peft(config):
    base = tiny_llama()
    theirs = _peft_model(base, **config)
    ours = peftkern.inject_lora(
        copy.deepcopy(base),
        config["target_modules"],
        r=config["r"],
        alpha=config["lora_alpha"],
        use_rslora=config.get("use_rslora", False),
        rank_pattern=config.get("rank_pattern"),
        alpha_pattern=config.get("alpha_pattern"),
    )
    theirs_params, ours_params = peft_adapter_params(theirs), our_adapter_params(ours)
    # The same layers, with the same ranks and scalings.
    assert sorted(ours_params) == sorted(theirs_params)
    theirs_root = theirs.base_model.model
    for name, layer in lora_layers(ours):
        reference = theirs_root.get_submodule(name)
        assert layer.r == reference.r["default"], name
        assert math.isclose(layer.scaling, reference.scaling["default"]), name
    # Only the adapters train; the count is the sum of r * (in + out).
    expected = sum(layer.r * (layer.in_features + layer.out_features) for _, layer in lora_layers(ours))
    assert peftkern.trainable_parameters(ours).trainable == expected
    assert peftkern.trainable_parameters(theirs).trainable == expected
    _copy_adapters(theirs_params, ours_params)
    _assert_same_run(ours, theirs, ours_params, theirs_params)


def test_all_linear_skips_output_head():
    model = peftkern.inject_lora(tiny_llama(), "all-linear", r=2, alpha=2)
    names = {name for name, _ in lora_layers(model)}
    assert "lm_head" not in names and isinstance(model.lm_head, nn.Linear)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.0),
        dict(target_modules=["k_proj", "gate_proj"], r=3, lora_alpha=7, use_rslora=True),
        dict(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, rank_pattern={"down_proj": 2},
             alpha_pattern={"q_proj": 1.5}),
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_from_peft_keeps_outputs_and_gradients(config, monkeypatch):
    theirs = _peft_model(tiny_llama(), **config)
    ours = copy.deepcopy(theirs)
    ours_before = peft_adapter_params(ours)
    returned = peftkern.from_peft(ours)
    assert returned is ours
    ours_params = peft_adapter_params(ours)
    assert sorted(ours_params) == sorted(ours_before)
    for name, (lora_a, lora_b) in ours_before.items():
        # The same Parameter objects: an optimizer built before the swap keeps working.
        assert ours_params[name][0] is lora_a and ours_params[name][1] is lora_b
    # peft's modules stay (peft's isinstance checks hold); every LoRA layer runs our op once per forward.
    assert peftkern.fused_layers(ours) == list(ours_params)
    assert all(isinstance(ours.base_model.model.get_submodule(n), peft.tuners.lora.Linear) for n in ours_params)
    calls = count_fused_calls(monkeypatch, "lora_linear")
    _assert_same_run(ours, theirs, ours_params, peft_adapter_params(theirs))
    assert calls == [len(ours_params)]


def test_from_peft_keeps_dropout_and_training_mode(monkeypatch):
    theirs = _peft_model(tiny_llama(), target_modules=["q_proj"], r=4, lora_alpha=6, lora_dropout=0.25,
                         use_rslora=True)
    theirs.train()
    peftkern.from_peft(theirs)
    seen = []
    import peftkern.peft_compat as compat

    real = compat.lora_linear

    def spy(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, **kwargs):
        seen.append((scaling, dropout_p, training))
        return real(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, **kwargs)

    monkeypatch.setattr(compat, "lora_linear", spy)
    theirs(input_ids=token_batch())
    assert seen == [(6.0 / 2.0, 0.25, True)] * 2  # rsLoRA: alpha / sqrt(r)
    theirs.eval()
    seen.clear()
    theirs(input_ids=token_batch())
    assert seen == [(6.0 / 2.0, 0.25, False)] * 2


def test_from_peft_after_set_scale():
    theirs = _peft_model(tiny_llama(), target_modules=["v_proj"], r=4, lora_alpha=8)
    for _, module in theirs.base_model.model.named_modules():
        if hasattr(module, "set_scale"):
            module.set_scale("default", 0.5)
    ours = peftkern.from_peft(copy.deepcopy(theirs))
    assert len(peftkern.fused_layers(ours)) == 2
    _assert_same_run(ours, theirs, peft_adapter_params(ours), peft_adapter_params(theirs))


def test_from_peft_runs_dora_fused_and_says_so(caplog):
    """DoRA layers run dora_linear (tests/test_dora.py compares them with peft in depth)."""
    theirs = _peft_model(tiny_llama(), target_modules=["q_proj", "v_proj"], r=2, lora_alpha=2, use_dora=True)
    ours = copy.deepcopy(theirs)
    with caplog.at_level(logging.INFO, logger="peftkern"):
        peftkern.from_peft(ours)
    assert "4 of 4 peft tuner layers run fused" in caplog.text
    assert len(peftkern.fused_layers(ours)) == 4
    _assert_same_run(ours, theirs, peft_adapter_params(ours), peft_adapter_params(theirs))


def test_from_peft_needs_peft_layers():
    with pytest.raises(ValueError, match="no peft layers"):
        peftkern.from_peft(tiny_llama())


def test_merge_unmerge_and_merge_and_unload():
    model = peftkern.inject_lora(tiny_llama(), ["q_proj", "up_proj"], r=4, alpha=8)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.3)
    ids = token_batch()
    weights = {name: layer.weight.detach().clone() for name, layer in lora_layers(model)}
    with torch.no_grad():
        expected = model(ids).logits
        peftkern.merge(model)
        assert all(layer.merged for _, layer in lora_layers(model))
        assert_close(model(ids).logits, expected, "merged logits", scale=10)
        peftkern.unmerge(model)
        for name, layer in lora_layers(model):
            assert_close(layer.weight, weights[name], f"{name} weight after unmerge")
        assert_close(model(ids).logits, expected, "unmerged logits")
        plain = peftkern.merge_and_unload(model)
        assert plain is model and not list(lora_layers(plain))
        assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
        assert_close(plain(ids).logits, expected, "merge_and_unload logits", scale=10)


def test_merge_and_unload_of_converted_peft_model_returns_base():
    theirs = _peft_model(tiny_llama(), target_modules=["q_proj"], r=2, lora_alpha=4)
    ids = token_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        plain = peftkern.merge_and_unload(peftkern.from_peft(theirs), safe_merge=True)
        assert type(plain).__name__ == "LlamaForCausalLM"
        assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
        assert_close(plain(ids).logits, expected, "logits", scale=10)


def test_trainable_parameters_and_mark_trainable():
    model = peftkern.inject_lora(tiny_llama(), ["q_proj"], r=4, alpha=4)
    count = peftkern.trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    assert count.trainable == 2 * 4 * (64 + 64) and count.total == total
    assert str(count) == (
        f"trainable params: {count.trainable:,} || all params: {total:,} || trainable%: "
        f"{100 * count.trainable / total:.4f}"
    )
    peftkern.mark_trainable(model, extra=(name for name in ["lm_head"]))  # any iterable
    assert model.lm_head.weight.requires_grad
    assert peftkern.trainable_parameters(model).trainable == count.trainable + 128 * 64
    peftkern.mark_trainable(model)
    assert not model.lm_head.weight.requires_grad
    assert peftkern.trainable_parameters(model).trainable == count.trainable


def test_inject_freezes_and_keeps_base_parameters():
    model = tiny_llama()
    weight = model.model.layers[0].self_attn.q_proj.weight
    peftkern.inject_lora(model, ["q_proj"], r=2, alpha=2, dropout=0.1)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peftkern.LoRALinear) and layer.weight is weight
    assert layer.dropout == 0.1
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}" for i in range(2) for ab in "AB"
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=["nonexistent"]), "matched no torch.nn.Linear"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(target_modules=[]), "non-empty list"),
        (dict(target_modules=5), "target_modules: expected"),
        (dict(target_modules=["self_attn"]), "is a LlamaAttention"),
        (dict(target_modules=["q_proj"], r=0), "r: expected a positive int"),
        (dict(target_modules=["q_proj"], alpha=float("nan")), "alpha: expected a finite number"),
        (dict(target_modules=["q_proj"], dropout=1.0), "dropout: expected a probability"),
        (dict(target_modules=["q_proj"], rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]"),
        (dict(target_modules=["q_proj"], alpha_pattern=[1]), "alpha_pattern: expected a dict"),
        (dict(target_modules=["q_proj"], backend="tpu"), "backend: expected one of"),
    ],
)
def test_inject_rejects_bad_arguments_before_changing_the_model(kwargs, message):
    model = tiny_llama()
    arguments = dict(r=2, alpha=2)
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        peftkern.inject_lora(model, **arguments)
    assert not list(lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())


def test_inject_twice_on_the_same_layer_raises():
    model = peftkern.inject_lora(tiny_llama(), ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        peftkern.inject_lora(model, ["q_proj"], r=2, alpha=2)
    # A second call on other layers adds to the first.
    peftkern.inject_lora(model, ["v_proj"], r=2, alpha=2)
    assert len(list(lora_layers(model))) == 4


def test_exclude_modules():
    model = peftkern.inject_lora(tiny_llama(), "all-linear", r=2, alpha=2, exclude_modules=["mlp.down_proj"])
    names = {name for name, _ in lora_layers(model)}
    assert not any(name.endswith("down_proj") for name in names) and len(names) == 2 * 6


def test_from_peft_on_triton_backend_matches_peft():
    """The fused Triton kernels (the interpreter on CPU) inside a whole model give peft's numbers."""
    theirs = _peft_model(tiny_llama(), target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8)
    ours = peftkern.from_peft(copy.deepcopy(theirs), backend="triton")
    root = ours.base_model.model
    assert [root.get_submodule(name).peftkern_backend for name in peftkern.fused_layers(ours)] == ["triton"] * 4
    _assert_same_run(ours, theirs, peft_adapter_params(ours), peft_adapter_params(theirs))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_from_peft_on_gpu_bf16(backend):
    """On a GPU in bf16 with fp32 adapters (peft's default there), our layers track peft's."""
    base = tiny_llama().to("cuda", torch.bfloat16)
    theirs = _peft_model(base, target_modules="all-linear", r=8, lora_alpha=16)
    ours = peftkern.from_peft(copy.deepcopy(theirs), backend=backend)
    ids = token_batch().cuda()
    logits, loss = loss_of(ours, ids)
    ref_logits, ref_loss = loss_of(theirs, ids)
    relative = ((logits.float() - ref_logits.float()).norm() / ref_logits.float().norm()).item()
    assert relative < 2e-2, relative
    loss.backward()
    ref_loss.backward()
    ours_params, theirs_params = peft_adapter_params(ours), peft_adapter_params(theirs)
    for name, (lora_a, lora_b) in theirs_params.items():
        for mine, reference in ((ours_params[name][0], lora_a), (ours_params[name][1], lora_b)):
            assert mine.dtype == torch.float32
            error = ((mine.grad - reference.grad).norm() / reference.grad.norm()).item()
            assert error < 5e-2, (name, error)
