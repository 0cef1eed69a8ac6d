"""Soft prompts on disk in peft's format: peft loads ours, we load peft's, several tasks per directory."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from _helpers import assert_close

import peftkern
from peftkern.io import load_soft_prompt, save_soft_prompt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _peft_logits(model, input_ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=input_ids).logits


def _ours(kind, base, num_tasks, projection_hidden=None):
    if kind == "prompt":
        return peftkern.PromptTuningForCausalLM(
            copy.deepcopy(base), num_tasks=num_tasks, num_virtual_tokens=3
        )
    return peftkern.PrefixTuningForCausalLM(
        copy.deepcopy(base), num_tasks=num_tasks, num_virtual_tokens=3, projection_hidden=projection_hidden
    )


@pytest.mark.parametrize("kind, projection_hidden", [("prompt", None), ("prefix", None), ("prefix", 24)])
def test_peft_loads_ours(tmp_path, kind, projection_hidden):
    base = _tiny_llama()
    ours = _ours(kind, base, 3, projection_hidden)
    save_soft_prompt(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "task_1", "task_2"
    ]
    input_ids = torch.randint(0, 61, (2, 5))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    theirs.load_adapter(str(tmp_path / "task_2"), adapter_name="task_2")
    for task in (0, 2):
        theirs.set_adapter("default" if task == 0 else "task_2")
        expected = ours(input_ids, task_ids=task).logits
        assert_close(_peft_logits(theirs, input_ids), expected, f"peft logits, task {task}", torch.float32)


@pytest.mark.parametrize("kind, projection_hidden", [("prompt", None), ("prefix", None), ("prefix", 24)])
def test_we_load_peft(tmp_path, kind, projection_hidden):
    base = _tiny_llama(1)
    if kind == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    else:
        config = peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection_hidden is not None,
            encoder_hidden_size=projection_hidden or 32,
        )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(str(tmp_path))
    input_ids = torch.randint(0, 61, (2, 5))
    expected = _peft_logits(theirs, input_ids)
    ours = _ours(kind, base, 1)  # a saved prefix table loads into an encoder without the MLP
    load_soft_prompt(ours, tmp_path)
    assert_close(ours(input_ids).logits, expected, "our logits from peft's file", torch.float32)
    several = _ours(kind, base, 3)
    load_soft_prompt(several, tmp_path, task=1)  # one peft adapter into task 1 of three
    assert_close(several(input_ids, task_ids=1).logits, expected, "task 1 from peft's file", torch.float32)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_round_trip_every_task(tmp_path, kind):
    base = _tiny_llama(2)
    ours = _ours(kind, base, 3)
    save_soft_prompt(ours, tmp_path)
    loaded = _ours(kind, base, 3)
    load_soft_prompt(loaded, tmp_path)
    mine = ours.prompt.weight if kind == "prompt" else ours.prefix.embedding
    theirs = loaded.prompt.weight if kind == "prompt" else loaded.prefix.embedding
    assert torch.equal(mine, theirs)


def test_bad_files_raise(tmp_path):
    base = _tiny_llama(3)
    prompt = _ours("prompt", base, 2)
    save_soft_prompt(prompt, tmp_path / "prompt")
    with pytest.raises(ValueError, match="expected peft_type 'PREFIX_TUNING'"):
        load_soft_prompt(_ours("prefix", base, 2), tmp_path / "prompt")
    with pytest.raises(ValueError, match="expected 3 task"):
        load_soft_prompt(_ours("prompt", base, 3), tmp_path / "prompt")
    with pytest.raises(ValueError, match="task: expected a task index"):
        load_soft_prompt(prompt, tmp_path / "prompt", task=2)
    with pytest.raises(ValueError, match="projection_hidden"):
        load_soft_prompt(_ours("prefix", base, 2, projection_hidden=8), tmp_path / "prompt")
    longer = peftkern.PromptTuningForCausalLM(copy.deepcopy(base), num_tasks=2, num_virtual_tokens=4)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        load_soft_prompt(longer, tmp_path / "prompt")
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 64 and config["inference_mode"]
    (tmp_path / "prompt" / "task_1" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_soft_prompt(prompt, tmp_path / "prompt")
    from safetensors.torch import save_file

    weights = str(tmp_path / "prompt" / "adapter_model.safetensors")
    save_file({"prompt_embeddings": torch.zeros(3, 32)}, weights)
    with pytest.raises(ValueError, match="expected shape \\(3, 64\\)"):
        load_soft_prompt(prompt, tmp_path / "prompt", task=0)
    save_file({"other": torch.zeros(3, 64)}, weights)
    with pytest.raises(ValueError, match="missing key 'prompt_embeddings'"):
        load_soft_prompt(prompt, tmp_path / "prompt", task=0)
    with pytest.raises(TypeError, match="model: expected"):
        save_soft_prompt(base, tmp_path / "x")
    with pytest.raises(ValueError, match="task"):
        save_soft_prompt(prompt, tmp_path / "x", task=5)
