"""save_adapter / load_adapter (peftkern/io.py): the peft file format both ways, on a small random Llama."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from _helpers import assert_close
from _models import randomize_adapters, tiny_llama, token_batch
from safetensors.torch import load_file, save_file

import peftkern
import peftkern.io as pio
from peftkern.model import lora_layers

peft = pytest.importorskip("peft")

CASES = {
    "names": dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8),
    "rslora-dropout": dict(target_modules=["k_proj", "up_proj"], r=3, alpha=5, use_rslora=True, dropout=0.1),
    "all-linear": dict(target_modules="all-linear", r=2, alpha=4),
    "patterns": dict(
        target_modules=["q_proj", "o_proj", "down_proj"],
        r=4,
        alpha=8,
        rank_pattern={"o_proj": 2, r"model\.layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"down_proj": 3.5},
    ),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ours(base, case, seed=2):
    model = peftkern.inject_lora(copy.deepcopy(base), **case)
    randomize_adapters(model, seed=seed)
    return model.eval()


def _random_peft(base, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_peft_loads_what_we_save(tmp_path, case):
    base = tiny_llama()
    ours = _ours(base, CASES[case])
    peftkern.save_adapter(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [pio.CONFIG_NAME, pio.WEIGHTS_NAME]
    keys = set(load_file(tmp_path / pio.WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys or case != "names"
    assert len(keys) == 2 * len(list(lora_layers(ours)))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    # peft built the same layers (ranks, scalings) and read the same weights.
    theirs_layers = {
        name: module
        for name, module in theirs.base_model.model.named_modules()
        if type(module).__module__.startswith("peft.tuners.lora")
    }
    assert sorted(theirs_layers) == sorted(name for name, _ in lora_layers(ours))
    for name, layer in lora_layers(ours):
        assert theirs_layers[name].r["default"] == layer.r, name
        assert theirs_layers[name].scaling["default"] == pytest.approx(layer.scaling), name
        assert theirs_layers[name].lora_dropout["default"].__class__.__name__ == (
            "Dropout" if layer.dropout else "Identity"
        )
    ids = token_batch()
    # Two decoder layers of fp32 ops rounded in a different order (our torch backend folds the scaling into
    # addmm; peft scales, then adds): a few ulps more than one op's tolerance.
    assert_close(_logits(theirs, ids), _logits(ours, ids), "logits peft-loaded vs ours", scale=4)


def test_saved_config_reads_as_peft_config(tmp_path):
    base = tiny_llama()
    peftkern.save_adapter(_ours(base, CASES["patterns"]), tmp_path, base_model_name_or_path="tiny/llama")
    config = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj"]
    assert set(config["rank_pattern"].values()) == {2, 6} and set(config["alpha_pattern"].values()) == {3.5}
    assert config["base_model_name_or_path"] == "tiny/llama"
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.r == 4 and loaded.use_dora is False and loaded.bias == "none"


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        dict(target_modules=["gate_proj"], r=3, lora_alpha=6, use_rslora=True, lora_dropout=0.2),
        dict(target_modules=r".*self_attn\.(q|k)_proj", r=4, lora_alpha=8, rank_pattern={"k_proj": 2},
             alpha_pattern={r"layers\.0\.self_attn\.q_proj": 1.0}),
        dict(target_modules="all-linear", r=2, lora_alpha=2, exclude_modules=["down_proj"]),
    ],
    ids=["names", "rslora-dropout", "regex-patterns", "all-linear-exclude"],
)
def test_we_load_what_peft_saves(tmp_path, config):
    base = tiny_llama()
    theirs = _random_peft(base, **config)
    theirs.save_pretrained(tmp_path)
    ids = token_batch()
    expected = _logits(theirs, ids)
    # Into a plain model: the layers are injected from adapter_config.json.
    ours = peftkern.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert_close(_logits(ours, ids), expected, "logits, injected from config")
    assert {p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n} == {False}
    for _, layer in lora_layers(ours):
        assert layer.dropout == config.get("lora_dropout", 0.0)
        assert layer.use_rslora == config.get("use_rslora", False)
    # Into a model that already has those layers (other weights, other alpha): replaced.
    prepared = peftkern.inject_lora(
        copy.deepcopy(base), config["target_modules"], r=config["r"], alpha=1.0,
        rank_pattern=config.get("rank_pattern"), exclude_modules=config.get("exclude_modules"),
    )
    peftkern.load_adapter(prepared, tmp_path)
    assert_close(_logits(prepared.eval(), ids), expected, "logits, loaded into existing layers")


def test_round_trip_through_peft_and_back(tmp_path):
    base = tiny_llama()
    ours = _ours(base, CASES["patterns"])
    peftkern.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    again = peftkern.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    for (name, layer), (name2, layer2) in zip(lora_layers(ours), lora_layers(again)):
        assert name == name2 and layer.r == layer2.r and layer.scaling == pytest.approx(layer2.scaling)
        assert torch.equal(layer.lora_A, layer2.lora_A) and torch.equal(layer.lora_B, layer2.lora_B)


def test_save_from_converted_peft_model_and_compiled_model(tmp_path):
    base = tiny_llama()
    theirs = _random_peft(base, target_modules=["v_proj"], r=2, lora_alpha=4)
    ids = token_batch()
    expected = _logits(theirs, ids)
    converted = peftkern.from_peft(theirs)
    peftkern.save_adapter(converted, tmp_path / "a")
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in load_file(
        tmp_path / "a" / pio.WEIGHTS_NAME
    )
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert_close(_logits(reloaded, ids), expected, "logits")
    # torch.compile's wrapper is unwrapped: the same names, the same file.
    peftkern.save_adapter(torch.compile(converted), tmp_path / "b")
    keys_b = load_file(tmp_path / "b" / pio.WEIGHTS_NAME).keys()
    assert keys_b == load_file(tmp_path / "a" / pio.WEIGHTS_NAME).keys()


def test_save_overwrites_atomically_and_a_crash_keeps_the_old_adapter(tmp_path, monkeypatch):
    base = tiny_llama()
    first, second = _ours(base, CASES["names"], seed=2), _ours(base, CASES["names"], seed=9)
    peftkern.save_adapter(first, tmp_path)
    old = {name: (tmp_path / name).read_bytes() for name in (pio.CONFIG_NAME, pio.WEIGHTS_NAME)}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as stream:
            stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pio, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        peftkern.save_adapter(second, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(old)  # no temporary file left behind
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    monkeypatch.undo()

    # A crash at the rename step leaves the old files too.
    def failing_replace(source, target):
        raise OSError("rename failed")

    monkeypatch.setattr(pio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        peftkern.save_adapter(second, tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    assert sorted(os.listdir(tmp_path)) == sorted(old)

    peftkern.save_adapter(second, tmp_path)
    reloaded = peftkern.load_adapter(copy.deepcopy(base), tmp_path)
    ids = token_batch()
    assert_close(_logits(reloaded, ids), _logits(second, ids), "logits after overwrite")


# ---- bad files: a clear error naming the key, and the model untouched ------------------------------------


@pytest.fixture
def saved(tmp_path):
    base = tiny_llama()
    peftkern.save_adapter(_ours(base, CASES["names"]), tmp_path)
    return base, tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / pio.CONFIG_NAME).read_text())
    config.update(changes)
    (path / pio.CONFIG_NAME).write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = load_file(path / pio.WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / pio.WEIGHTS_NAME)


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
OTHER_KEY = KEY.replace("q_proj", "k_proj")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: _edit_config(p, peft_type="IA3"), r"key 'peft_type': expected 'LORA'"),
        (lambda p: _edit_config(p, use_dora=True),
         r"missing tensor '.*q_proj\.lora_magnitude_vector'|key 'use_dora': is True, but .* use_dora=False"),
        (lambda p: _edit_config(p, bias="all"), r"key 'bias': 'all' is not supported"),
        (lambda p: _edit_config(p, modules_to_save=["lm_head"]), r"key 'modules_to_save'"),
        (lambda p: _edit_config(p, layers_to_transform=[0]), r"key 'layers_to_transform'"),
        (lambda p: _edit_config(p, r=0), r"key 'r': expected a positive int"),
        (lambda p: _edit_config(p, lora_dropout=1.5), r"key 'lora_dropout'"),
        (lambda p: _edit_config(p, rank_pattern={"q_proj": "x"}), r"key 'rank_pattern'.*positive int"),
        (lambda p: _edit_config(p, target_modules=["nonexistent"]), r"cannot inject.*matched no"),
        (lambda p: (p / pio.CONFIG_NAME).write_text("{not json"), "not valid JSON"),
        (lambda p: (p / pio.WEIGHTS_NAME).write_bytes((p / pio.WEIGHTS_NAME).read_bytes()[:100]),
         "not a valid safetensors file"),
        (lambda p: _edit_tensors(p, lambda t: t.pop(KEY)), f"missing tensor '{KEY}'"),
        (lambda p: _edit_tensors(p, lambda t: t.update({"extra.weight": torch.zeros(2)})),
         "unexpected key 'extra.weight'"),
        (lambda p: _edit_tensors(p, lambda t: t.update({OTHER_KEY: torch.zeros(4, 64)})),
         "unexpected key .*k_proj.*no LoRA layer"),
        (lambda p: _edit_tensors(p, lambda t: t.update({KEY: torch.zeros(5, 64)})),
         rf"tensor '{KEY}': expected shape \(4, 64\).*got \(5, 64\)"),
        (lambda p: _edit_tensors(p, lambda t: t.update({KEY: torch.zeros(4, 64, dtype=torch.int32)})),
         "expected a floating-point dtype"),
        (lambda p: _edit_tensors(p, lambda t: t[KEY].__setitem__((1, 2), float("nan"))),
         rf"tensor '{KEY}': holds NaN or infinite values"),
        (lambda p: _edit_tensors(p, lambda t: t[OTHER_KEY.replace("k_proj", "v_proj")].fill_(float("-inf"))),
         "v_proj.lora_A.weight': holds NaN or infinite values"),
    ],
    ids=["peft_type", "dora", "bias", "modules_to_save", "layers_to_transform", "r", "dropout", "patterns",
         "no-target", "json", "truncated", "missing", "extra", "extra-module", "shape", "int-dtype", "nan", "inf"],
)
def test_bad_adapter_raises_and_leaves_model_unchanged(saved, corrupt, message):
    base, path = saved
    corrupt(path)
    plain = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        peftkern.load_adapter(plain, path)
    assert not list(lora_layers(plain))
    assert all(p.requires_grad for p in plain.parameters())
    # A model that already has the layers keeps its weights and settings.
    prepared = peftkern.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=3)
    before = {name: p.detach().clone() for name, p in prepared.named_parameters()}
    if "cannot inject" in message:
        return  # the layers exist, so the config's targets are not used: nothing to reject
    with pytest.raises(ValueError, match=message):
        peftkern.load_adapter(prepared, path)
    assert all(torch.equal(p, before[name]) for name, p in prepared.named_parameters())
    assert all(layer.alpha == 3 for _, layer in lora_layers(prepared))


def test_rank_mismatch_with_existing_layers(saved):
    base, path = saved
    prepared = peftkern.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match=r"key 'r': gives layer 'model.layers.0.self_attn.q_proj' rank 4"):
        peftkern.load_adapter(prepared, path)


def test_missing_files_and_pickles(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        peftkern.load_adapter(tiny_llama(), tmp_path / "nowhere")
    (tmp_path / pio.CONFIG_NAME).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle"):
        peftkern.load_adapter(tiny_llama(), tmp_path)


def test_save_rejects_models_it_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        peftkern.save_adapter(tiny_llama(), tmp_path)
    model = peftkern.inject_lora(tiny_llama(), ["q_proj"], r=2, alpha=2, dropout=0.1)
    peftkern.inject_lora(model, ["v_proj"], r=2, alpha=2, dropout=0.2)
    with pytest.raises(ValueError, match="layers differ in dropout"):
        peftkern.save_adapter(model, tmp_path)
    assert not os.listdir(tmp_path)


def test_full_names_when_suffixes_would_select_more(tmp_path):
    model = peftkern.inject_lora(tiny_llama(), [r"model.layers.0.self_attn.q_proj"], r=2, alpha=2)
    peftkern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    reloaded = peftkern.load_adapter(tiny_llama(), tmp_path)
    assert [name for name, _ in lora_layers(reloaded)] == ["model.layers.0.self_attn.q_proj"]


def test_save_warns_about_trainable_parameters_it_does_not_save(tmp_path):
    model = peftkern.inject_lora(tiny_llama(), ["q_proj"], r=2, alpha=2)
    peftkern.mark_trainable(model, extra=["lm_head"])
    with pytest.warns(UserWarning, match="1 trainable parameter.*'lm_head.weight'"):
        peftkern.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / pio.WEIGHTS_NAME)
    assert all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in keys)


def test_load_adapter_is_for_inference_unless_trainable(saved):
    """As peft's from_pretrained: eval and frozen by default (no dropout at inference); is_trainable=True
    trains the adapters and keeps the model's mode."""
    base, path = saved
    _edit_config(path, lora_dropout=0.3)
    model = copy.deepcopy(base).train()
    assert peftkern.load_adapter(model, path) is model
    assert not model.training and not any(module.training for module in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    ids = token_batch()
    assert torch.equal(_logits(model, ids), _logits(model, ids))  # dropout off

    trainable = peftkern.load_adapter(copy.deepcopy(base).train(), path, is_trainable=True)
    assert all(layer.training for _, layer in lora_layers(trainable))
    names = {name for name, p in trainable.named_parameters() if p.requires_grad}
    assert names == {f"{name}.lora_{part}" for name, _ in lora_layers(trainable) for part in "AB"}
    # Into existing layers: the same rule.
    prepared = peftkern.inject_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8)
    peftkern.load_adapter(prepared, path)
    assert not any(p.requires_grad for p in prepared.parameters()) and not prepared.training
    with pytest.raises(TypeError, match="is_trainable: expected a bool"):
        peftkern.load_adapter(prepared, path, is_trainable="yes")


def test_load_adapter_refuses_a_peft_model(saved):
    base, path = saved
    theirs = _random_peft(base, target_modules=["q_proj"], r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="is a peft PeftModel; use its own load_adapter"):
        peftkern.load_adapter(theirs, path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_honour_the_umask(tmp_path, umask):
    """As open() makes files: mode 0o666 less the umask, not the 0o600 of a mkstemp temporary (or of
    safetensors 0.8's own writer, which peft's adapter_model.safetensors gets)."""
    model = _ours(tiny_llama(), CASES["names"])
    previous = os.umask(umask)
    try:
        peftkern.save_adapter(model, tmp_path)
    finally:
        os.umask(previous)
    for name in (pio.CONFIG_NAME, pio.WEIGHTS_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
