"""A ``peftkern.from_peft`` model is still a working ``peft`` model: every peft call below runs on a converted
model and on an unconverted copy with the same weights, and must give the same result (Trainer checkpoints,
``disable_adapter``, merging, named adapters, ``modules_to_save``, mixed batches, gradient checkpointing,
Liger-Kernel). ``count_fused_calls`` makes sure the converted model really ran our ops where it could."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _helpers import assert_close
from _models import count_fused_calls, tiny_llama, token_batch
from safetensors.torch import load_file

import peftkern

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = 2 * len(TARGETS)  # LoRA layers of the tiny Llama under TARGETS


def _randomize(model: nn.Module, adapter: str, seed: int) -> None:
    """Non-zero A and B for ``adapter`` (a fresh adapter has B = 0, which would hide most bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if f".{adapter}." in name and ("lora_A" in name or "lora_B" in name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _pair(base: nn.Module | None = None, seed: int = 3, **config) -> tuple[nn.Module, nn.Module]:
    """(converted, peft's own) with the same random adapter: ``from_peft`` on a copy of a peft model."""
    config = {"target_modules": TARGETS, "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", **config}
    theirs = peft.get_peft_model(copy.deepcopy(base or tiny_llama()), peft.LoraConfig(**config))
    _randomize(theirs, "default", seed)
    ours = peftkern.from_peft(copy.deepcopy(theirs))
    return ours, theirs


def _logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ---- Trainer -----------------------------------------------------------------------------------------------


def _train(model: nn.Module, output_dir, gradient_checkpointing: bool) -> None:
    """Three SGD steps of transformers.Trainer on a fixed batch, checkpoint at the end."""
    ids = token_batch(batch=4, seq=12, seed=7)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=2, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", save_strategy="steps", save_steps=3, save_only_model=True, report_to=[],
        use_cpu=True, gradient_checkpointing=gradient_checkpointing, disable_tqdm=True, logging_strategy="no",
        seed=0, data_seed=0,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()


@pytest.fixture(scope="module")
def peft_trained(tmp_path_factory):
    """peft alone through the same Trainer run: the adapter weights ours must reach."""
    _, theirs = _pair()
    _train(theirs, tmp_path_factory.mktemp("peft-run"), gradient_checkpointing=False)
    return {name: p.detach().clone() for name, p in theirs.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_trainer_checkpoint_of_converted_model_loads_in_peft(tmp_path, monkeypatch, peft_trained,
                                                            gradient_checkpointing):
    base = tiny_llama()
    ours, _ = _pair(base)
    calls = count_fused_calls(monkeypatch, "lora_linear")
    _train(ours, tmp_path, gradient_checkpointing)
    # Checkpointing replays each layer's forward in backward: more calls into our op, not fewer.
    forwards = 3 * LAYERS
    assert calls[0] == (2 * forwards if gradient_checkpointing else forwards)
    # Training followed peft's (same data, same steps): the same adapter weights.
    trained = {name: p for name, p in ours.named_parameters() if "lora_" in name}
    assert sorted(trained) == sorted(peft_trained)
    for name, value in peft_trained.items():
        assert_close(trained[name], value, name, scale=10)
    # The checkpoint holds the trained adapter: peft loads it onto the base and gets our logits.
    checkpoint = tmp_path / "checkpoint-3"
    keys = load_file(checkpoint / "adapter_model.safetensors")
    assert len(keys) == 2 * LAYERS
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), checkpoint).eval()
    ids = token_batch()
    expected = _logits(ours.eval(), ids)
    assert_close(_logits(reloaded, ids), expected, "logits of the checkpoint loaded by peft")
    assert (expected - _logits(base, ids)).abs().max() > 0.1  # not an adapter that does nothing


def test_gradient_checkpointing_reentrant_with_input_require_grads():
    ours, theirs = _pair(lora_dropout=0.0)
    ids = token_batch()
    for model in (ours, theirs):
        model.train()
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model(input_ids=ids, labels=ids).loss.backward()
    theirs_grads, ours_grads = _lora_grads(theirs), _lora_grads(ours)
    assert sorted(ours_grads) == sorted(theirs_grads) and len(ours_grads) == 2 * LAYERS
    for name, grad in theirs_grads.items():
        assert_close(ours_grads[name], grad, name)


def test_torch_compile_fullgraph_of_a_converted_model(monkeypatch):
    """No graph break in the converted forward (its state checks are plain Python on module attributes)."""
    ours, theirs = _pair()
    ids = token_batch()
    calls = count_fused_calls(monkeypatch, "lora_linear")
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    assert calls[0] == LAYERS  # traced through our op
    expected = theirs(input_ids=ids, labels=ids).loss
    assert_close(loss, expected, "loss")
    loss.backward()
    expected.backward()
    theirs_grads, ours_grads = _lora_grads(theirs), _lora_grads(ours)
    assert len(ours_grads) == 2 * LAYERS
    for name, grad in theirs_grads.items():
        assert_close(ours_grads[name], grad, name)


# ---- disable_adapter, merging ------------------------------------------------------------------------------


def _sequence_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(F.log_softmax(logits[:, :-1], -1), 2, ids[:, 1:, None]).squeeze(-1).sum(-1)


def test_dpo_reference_pass_through_disable_adapter_is_the_base_model(monkeypatch):
    base = tiny_llama()
    ours, theirs = _pair(base)
    ids = token_batch()
    calls = count_fused_calls(monkeypatch, "lora_linear")
    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        policy = _sequence_logp(model(input_ids=ids).logits, ids)
        with model.disable_adapter(), torch.no_grad():
            reference_logits = model(input_ids=ids).logits
            if name == "ours":
                assert peftkern.fused_layers(ours) == [] and calls[0] == LAYERS  # the policy pass only
        assert_close(reference_logits, _logits(base, ids), f"{name}: reference pass vs the base model")
        losses[name] = -F.logsigmoid(0.1 * (policy - _sequence_logp(reference_logits, ids))).mean()
        losses[name].backward()
    assert len(peftkern.fused_layers(ours)) == LAYERS  # enabled again on leaving the block
    assert_close(losses["ours"], losses["theirs"], "DPO-style loss")
    theirs_grads, ours_grads = _lora_grads(theirs), _lora_grads(ours)
    assert len(ours_grads) == 2 * LAYERS
    for name, grad in theirs_grads.items():
        assert_close(ours_grads[name], grad, name)


def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "base_layer.weight" in name}


def test_merge_unmerge_and_merge_and_unload_match_peft():
    ours, theirs = _pair()
    ids = token_batch()
    before = _linear_weights(ours)
    expected = _logits(theirs, ids)
    ours.merge_adapter(safe_merge=True)
    theirs.merge_adapter(safe_merge=True)
    assert peftkern.fused_layers(ours) == []  # merged: the base layer alone, peft's forward
    merged = _linear_weights(theirs)
    for name, weight in _linear_weights(ours).items():
        assert torch.equal(weight, merged[name]), name
        assert not torch.equal(weight, before[name]), name
    assert_close(_logits(ours, ids), _logits(theirs, ids), "merged logits")
    ours.unmerge_adapter()
    assert len(peftkern.fused_layers(ours)) == LAYERS
    assert_close(_logits(ours, ids), expected, "unmerged logits")
    # peftkern's own functions on a peft model are peft's methods.
    peftkern.merge(ours, safe_merge=True)
    for name, weight in _linear_weights(ours).items():
        assert torch.equal(weight, merged[name]), name
    peftkern.unmerge(ours)
    for name, weight in _linear_weights(ours).items():
        assert_close(weight, before[name], name)
    theirs.unmerge_adapter()
    plain = peftkern.merge_and_unload(ours, safe_merge=True)
    theirs_plain = theirs.merge_and_unload(safe_merge=True)
    assert type(plain) is type(theirs_plain) and not any("lora" in name for name, _ in plain.named_modules())
    for (name, p), (_, q) in zip(plain.named_parameters(), theirs_plain.named_parameters()):
        assert torch.equal(p, q), name
    assert_close(_logits(plain, ids), expected, "merge_and_unload logits", scale=10)


def test_peftkern_helpers_on_a_converted_model():
    ours, theirs = _pair()
    assert peftkern.trainable_parameters(ours) == peftkern.trainable_parameters(theirs)
    assert peftkern.trainable_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    assert list(peftkern.model.lora_layers(ours)) == []  # peft's layers are peft's
    with pytest.raises(ValueError, match="is a peft PeftModel"):
        peftkern.mark_trainable(ours)
    before = [type(module) for module in ours.modules()]
    with pytest.raises(ValueError, match="holds peft layers; add a LoRA adapter with peft's add_adapter"):
        peftkern.inject_lora(ours, "all-linear", r=2, alpha=2)
    assert [type(module) for module in ours.modules()] == before  # refused before any change
    with pytest.raises(ValueError, match="not a peft PeftModel; merge the PeftModel itself"):
        peftkern.merge(ours.base_model.model)
    with pytest.raises(ValueError, match="base_model_name_or_path / task_type"):
        peftkern.save_adapter(ours, "unused", task_type="CAUSAL_LM")
    # A prompt-tuning peft model: nothing to fuse (not refused), nothing to merge (said so).
    prompt = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert peftkern.from_peft(prompt) is prompt and peftkern.fused_layers(prompt) == []
    with pytest.raises(ValueError, match="has no merge_adapter"):
        peftkern.merge(prompt)


# ---- named adapters, mixed batches, modules_to_save --------------------------------------------------------


def _add_second(model: nn.Module, **config) -> None:
    settings = {"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 3, "task_type": "CAUSAL_LM"}
    model.add_adapter("second", peft.LoraConfig(**{**settings, **config}))
    _randomize(model, "second", seed=11)


def test_add_set_delete_adapter(tmp_path, monkeypatch):
    ours, theirs = _pair()
    ids = token_batch()
    for model in (ours, theirs):
        _add_second(model)
    calls = count_fused_calls(monkeypatch, "lora_linear")
    assert_close(_logits(ours, ids), _logits(theirs, ids), "default still active")
    assert calls[0] == LAYERS
    for model in (ours, theirs):
        model.set_adapter("second")
    calls[0] = 0
    assert_close(_logits(ours, ids), _logits(theirs, ids), "second active")
    assert calls[0] == 4  # q_proj, v_proj; down_proj has no "second": the base alone there, as in peft
    # Two active adapters at once: peft's forward sums them.
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "second"])
    assert peftkern.fused_layers(ours) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]  # one active
    assert_close(_logits(ours, ids), _logits(theirs, ids), "two active adapters")
    # Every adapter is saved, as peft saves them.
    ours.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    reloaded.set_adapter("second")
    theirs.set_adapter("second")
    assert_close(_logits(reloaded, ids), _logits(theirs, ids), "second adapter reloaded by peft")
    for model in (ours, theirs):
        model.set_adapter("default")
        model.delete_adapter("second")
    assert len(peftkern.fused_layers(ours)) == LAYERS
    assert_close(_logits(ours, ids), _logits(theirs, ids), "after delete_adapter")


def test_adapter_on_new_modules_runs_fused_after_from_peft_again():
    ours, theirs = _pair()
    for model in (ours, theirs):
        _add_second(model, target_modules=["o_proj"])
        model.set_adapter("second")
    assert peftkern.fused_layers(ours) == []  # the new layers are peft's until converted
    peftkern.from_peft(ours)
    assert [n.rsplit(".", 1)[1] for n in peftkern.fused_layers(ours)] == ["o_proj"] * 2
    assert_close(_logits(ours, token_batch()), _logits(theirs, token_batch()), "logits")


def test_mixed_batch_adapter_names_runs_multi_lora_and_matches_peft(monkeypatch):
    ours, theirs = _pair()
    for model in (ours, theirs):
        _add_second(model)  # rank 2 beside the default's rank 4, on fewer layers
        model.eval()
    names = ["default", "__base__", "second", "default", "second"]
    ids = token_batch(batch=len(names))
    single = count_fused_calls(monkeypatch, "lora_linear")
    multi = count_fused_calls(monkeypatch, "multi_lora_linear")
    logits = _logits(ours, ids, adapter_names=names)
    assert multi[0] == LAYERS and single[0] == 0
    assert_close(logits, _logits(theirs, ids, adapter_names=names), "mixed batch", scale=10)  # as test_pool
    # Every row equals its adapter alone.
    for row, name in enumerate(names):
        if name == "__base__":
            with theirs.disable_adapter():
                expected = _logits(theirs, ids[row:row + 1])
        else:
            theirs.set_adapter(name)
            expected = _logits(theirs, ids[row:row + 1])
        assert_close(logits[row:row + 1], expected, f"row {row} ({name})", scale=10)
    # Merged adapters with adapter_names: peft's error, from peft's own check.
    ours.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        _logits(ours, ids, adapter_names=names)


def test_modules_to_save_is_saved_and_loaded(tmp_path):
    base = tiny_llama()
    ours, theirs = _pair(base, modules_to_save=["lm_head"])
    ids = token_batch()
    # One SGD step trains the adapters and the copy of lm_head.
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for parameter in ours.parameters():
            if parameter.requires_grad:
                parameter -= 1.0 * parameter.grad
    ours.eval()
    peftkern.save_adapter(ours, tmp_path / "peftkern")
    ours.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peftkern" / "adapter_model.safetensors")
    written_by_peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(written_by_peft) and any("lm_head" in key for key in saved)
    assert all(torch.equal(saved[key], written_by_peft[key]) for key in saved)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peftkern").eval()
    expected = _logits(ours, ids)
    assert_close(_logits(reloaded, ids), expected, "logits with the trained lm_head")
    assert not torch.equal(expected, _logits(theirs.eval(), ids))  # the head (and adapters) did change


# ---- what we do not fuse runs peft's forward ---------------------------------------------------------------


def test_unfused_layers_run_peft_and_are_reported(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="peftkern"):
        ours, theirs = _pair(target_modules=["embed_tokens", "q_proj"])
    assert "2 of 3 peft tuner layers run fused" in caplog.text
    assert "model.embed_tokens (Embedding)" in caplog.text
    assert peftkern.fused_layers(ours) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    calls = count_fused_calls(monkeypatch, "lora_linear")
    ids = token_batch()
    for model in (ours, theirs):
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls[0] == 2
    assert_close(_logits(ours, ids), _logits(theirs, ids), "logits")
    theirs_grads, ours_grads = _lora_grads(theirs), _lora_grads(ours)
    assert len(ours_grads) == 2 * 3
    for name, grad in theirs_grads.items():
        assert_close(ours_grads[name], grad, name)


def test_other_tuners_are_not_refused():
    base = tiny_llama()
    model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                     feedforward_modules=["down_proj"]))
    expected = _logits(model, token_batch())
    assert peftkern.from_peft(model) is model and peftkern.fused_layers(model) == []
    assert torch.equal(_logits(model, token_batch()), expected)


def test_dtypes_as_peft_casts_them(monkeypatch):
    """A bf16 base with fp32 adapters (peft's default) runs fused; fp32 x with bf16 adapters (peft casts x
    down) is not an input our op takes exactly, so peft's forward runs it."""
    base = tiny_llama().to(torch.bfloat16)
    ours, theirs = _pair(base)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    calls = count_fused_calls(monkeypatch, "lora_linear")
    ids = token_batch()
    assert_close(_logits(ours, ids), _logits(theirs, ids), "bf16 logits", dtype=torch.bfloat16, scale=4)
    assert calls[0] == LAYERS
    ours, theirs = _pair()
    for model in (ours, theirs):
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(torch.bfloat16)
    calls[0] = 0
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))
    assert calls[0] == 0


# ---- Liger-Kernel on the same model -----------------------------------------------------------------------


def test_liger_kernel_and_from_peft_on_one_model(monkeypatch):
    """Liger's RoPE and fused linear cross-entropy (its Triton kernels; the interpreter on CPU) with our
    LoRA layers. Liger 0.8.5's RMSNorm and SwiGLU kernels call ``.to()`` on float scalar arguments, which
    Triton's interpreter passes as Python floats, so those two stay off here."""
    liger = pytest.importorskip("liger_kernel.transformers")
    from transformers.models.llama import modeling_llama

    if not __import__("os").environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
        pytest.skip("Liger's Triton kernels need a GPU or TRITON_INTERPRET=1")
    # Liger patches transformers' module globally: put everything back after the test.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    ours, theirs = _pair(lora_dropout=0.0)
    ids = token_batch()
    theirs.train()
    expected = theirs(input_ids=ids, labels=ids).loss  # before Liger patches anything
    expected.backward()
    liger.apply_liger_kernel_to_llama(rope=True, fused_linear_cross_entropy=True, rms_norm=False, swiglu=False,
                                      model=ours.base_model.model)
    assert modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    assert ours.base_model.model.forward.__func__.__module__.startswith("liger_kernel")
    calls = count_fused_calls(monkeypatch, "lora_linear")
    ours.train()
    loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    assert calls[0] == LAYERS
    assert_close(loss, expected, "loss", scale=10)
    theirs_grads, ours_grads = _lora_grads(theirs), _lora_grads(ours)
    assert len(ours_grads) == 2 * LAYERS
    for name, grad in theirs_grads.items():
        assert_close(ours_grads[name], grad, name, scale=10)
