"""Adapter files that are damaged, forged or missing, for every format we read: peft LoRA files
(``load_adapter``), soft prompts (peft's prompt / prefix tuning files), bottleneck adapter files, PEFT LoRA
directories loaded into an ``AdapterPool``.

Each gives a clear ``ValueError``/``FileNotFoundError`` naming the file, and changes nothing in the model or
the pool. A pickle is never unpickled (a forged one would run code: here it would create a marker file).
Saves are atomic: a writer killed mid-write leaves the previous file loadable. The cases test_adapters.py,
test_prompt_io.py and test_pool.py already cover (bad JSON, wrong config fields, shapes, missing keys of the
bottleneck format, ...) and test_io.py (LoRA config keys, shapes, dtypes, missing and extra keys) are not
repeated here.
"""

from __future__ import annotations

import copy
import json
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _models import randomize_adapters, tiny_llama
from safetensors.torch import load_file, save_file
from test_adapters import saved_model, small_llama

import peftkern
from peftkern.adapters import ADAPTER_WEIGHTS_NAME
from peftkern.io import CONFIG_NAME, WEIGHTS_NAME, load_soft_prompt, save_soft_prompt


class _Forged:
    """Unpickling this creates ``path``: proof that a loader ran pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# Damage done to a weights file in place; each must be refused as "not a valid safetensors file".
def _read(file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as copies: no view may stay mapped onto a file that is about to be rewritten."""
    return {key: value.clone() for key, value in load_file(str(file)).items()}


def _truncate_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _truncate_data_tail(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-4])  # header intact, the last tensor's bytes short


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _corrupt_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[10:30] = b"\xff" * 20  # inside the JSON header
    file.write_bytes(bytes(data))


def _huge_header_length(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")  # a header length far past the file's end
    file.write_bytes(bytes(data))


def _torch_save(file: Path) -> None:
    torch.save(_read(file), file)  # torch's zip/pickle format under the safetensors name


def _forged_pickle(file: Path) -> None:
    file.write_bytes(pickle.dumps(_Forged(file.parent / "PWNED")))


def _pickle_only(file: Path) -> None:
    """What older peft versions wrote: adapter_model.bin (a pickle, here a forged one), no safetensors."""
    file.with_name("adapter_model.bin").write_bytes(pickle.dumps(_Forged(file.parent / "PWNED")))
    file.unlink()


BROKEN_WEIGHTS = {
    "truncated": _truncate_half,
    "short data": _truncate_data_tail,
    "empty": _empty,
    "corrupt header": _corrupt_header,
    "huge header length": _huge_header_length,
    "torch.save pickle": _torch_save,
    "forged pickle": _forged_pickle,
}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


# ---- peft LoRA files (load_adapter) ----------------------------------------------------------------------


def _saved_lora(tmp_path):
    """(a model with its own LoRA layers, the directory of another adapter for the same layers)."""
    source = peftkern.inject_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_adapters(source, seed=3)
    peftkern.save_adapter(source, tmp_path / "lora")
    model = peftkern.inject_lora(tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_adapters(model, seed=4)
    return model, tmp_path / "lora"


@pytest.mark.parametrize("damage", list(BROKEN_WEIGHTS))
def test_lora_file_damaged_or_pickled(tmp_path, damage):
    model, path = _saved_lora(tmp_path)
    BROKEN_WEIGHTS[damage](path / WEIGHTS_NAME)
    before = _state(model)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: not a valid safetensors file"):
        peftkern.load_adapter(model, path)
    _assert_same_state(model, before)
    assert not (path / "PWNED").exists()


def test_lora_forged_pickle_only_directory_is_never_unpickled(tmp_path):
    model, path = _saved_lora(tmp_path)
    _pickle_only(path / WEIGHTS_NAME)
    before = _state(model)
    with pytest.raises(FileNotFoundError, match=r"adapter_model.bin \(pickle\), which peftkern never loads"):
        peftkern.load_adapter(model, path)
    _assert_same_state(model, before)
    assert not (path / "PWNED").exists()


# ---- bottleneck adapter files -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", list(BROKEN_WEIGHTS))
def test_bottleneck_file_damaged_or_pickled(tmp_path, damage):
    _, path = saved_model(tmp_path)
    BROKEN_WEIGHTS[damage](path / ADAPTER_WEIGHTS_NAME)
    model = small_llama(seed=5)
    peftkern.inject_bottleneck_adapters(model, {"placement": "houlsby", "num_adapters": 2, "layer_norm": True})
    before = _state(model)
    with pytest.raises(ValueError, match=f"{ADAPTER_WEIGHTS_NAME}: not a valid safetensors file"):
        peftkern.load_bottleneck_adapters(model, path)
    _assert_same_state(model, before)
    assert not (path / "PWNED").exists()


def test_bottleneck_paths_that_do_not_exist(tmp_path):
    model = small_llama()
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        peftkern.load_bottleneck_adapters(model, tmp_path / "missing")
    (tmp_path / "a_file").write_text("{}")
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        peftkern.load_bottleneck_adapters(model, tmp_path / "a_file")
    assert not any(name.endswith("bottleneck_adapter") for name, _ in model.named_modules())


def test_bottleneck_file_with_infinite_values(tmp_path):
    _, path = saved_model(tmp_path)
    tensors = _read(path / ADAPTER_WEIGHTS_NAME)
    key = next(iter(tensors))
    tensors[key].view(-1)[0] = float("-inf")
    save_file(tensors, str(path / ADAPTER_WEIGHTS_NAME))
    model = small_llama()
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        peftkern.load_bottleneck_adapters(model, path)


# ---- soft prompt files (peft's format) --------------------------------------------------------------------


def _soft_prompt_model(kind: str, num_tasks: int = 2):
    base = small_llama()
    if kind == "prompt":
        return peftkern.PromptTuningForCausalLM(base, num_tasks=num_tasks, num_virtual_tokens=3)
    return peftkern.PrefixTuningForCausalLM(base, num_tasks=num_tasks, num_virtual_tokens=3)


def _saved_soft_prompt(tmp_path, kind: str):
    """(a fresh model of the same kind, the saved directory); task 1 lives in path/task_1."""
    source = _soft_prompt_model(kind)
    with torch.no_grad():  # differ from the fresh model's (same-seed) tables
        (source.prompt.weight if kind == "prompt" else source.prefix.embedding).add_(1.0)
    path = tmp_path / kind
    save_soft_prompt(source, path)
    return _soft_prompt_model(kind), path


def _rewrite(file: Path, change) -> None:
    tensors = _read(file)
    change(tensors)
    save_file(tensors, str(file))


SOFT_PROMPT_DAMAGE = {
    **{name: (damage, ValueError, "not a valid safetensors file") for name, damage in BROKEN_WEIGHTS.items()},
    "int dtype": (lambda f: _rewrite(f, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"].int())),
                  ValueError, "expected a float tensor, got torch.int32"),
    "bool dtype": (lambda f: _rewrite(f, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"] > 0)),
                   ValueError, "expected a float tensor"),
    "transposed shape": (lambda f: _rewrite(f, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"].T
                                                                  .contiguous())),
                         ValueError, "key 'prompt_embeddings' expected shape"),
    "3-D": (lambda f: _rewrite(f, lambda t: t.update(prompt_embeddings=t["prompt_embeddings"][None])),
            ValueError, "key 'prompt_embeddings' expected shape"),
    "missing key": (lambda f: _rewrite(f, lambda t: t.update(other=t.pop("prompt_embeddings"))), ValueError,
                    "missing key 'prompt_embeddings'"),
    "no tensors": (lambda f: save_file({}, str(f)), ValueError, "missing key 'prompt_embeddings'"),
    "extra key": (lambda f: _rewrite(f, lambda t: t.update(stray=t["prompt_embeddings"].clone())), ValueError,
                  "unexpected key 'stray'"),
    "nan values": (lambda f: _rewrite(f, lambda t: t["prompt_embeddings"].view(-1)[0].fill_(float("nan"))),
                   ValueError, "holds NaN or inf"),
    "bad json": (lambda f: (f.parent / CONFIG_NAME).write_text("{not json"), ValueError, "not valid JSON"),
    "json list": (lambda f: (f.parent / CONFIG_NAME).write_text("[1, 2]"), ValueError, "expected a JSON object"),
    "not utf-8": (lambda f: (f.parent / CONFIG_NAME).write_bytes(b"\xff\xfe{}"), ValueError, "not valid JSON"),
    "no config": (lambda f: (f.parent / CONFIG_NAME).unlink(), FileNotFoundError, "adapter_config.json: missing"),
    "pickle only": (_pickle_only, FileNotFoundError,
                    r"found adapter_model.bin \(pickle\), which peftkern never loads"),
}


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("damage", list(SOFT_PROMPT_DAMAGE))
def test_soft_prompt_file_damaged(tmp_path, kind, damage):
    """Task 1's file is damaged: loading every task fails and task 0 (valid) is not loaded either."""
    model, path = _saved_soft_prompt(tmp_path, kind)
    change, error, message = SOFT_PROMPT_DAMAGE[damage]
    change(path / "task_1" / WEIGHTS_NAME)
    before = _state(model)
    with pytest.raises(error, match=message):
        load_soft_prompt(model, path)
    _assert_same_state(model, before)
    assert not (path / "task_1" / "PWNED").exists()
    load_soft_prompt(model, path, task=0)  # the intact directory still loads
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_soft_prompt_paths_that_do_not_exist(tmp_path, kind):
    model = _soft_prompt_model(kind, num_tasks=1)
    before = _state(model)
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        load_soft_prompt(model, tmp_path / "missing")
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        load_soft_prompt(model, tmp_path / "a_file", task=0)
    _assert_same_state(model, before)


def test_soft_prompt_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    model, path = _saved_soft_prompt(tmp_path, "prompt")
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_soft_prompt(model, path)
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


# ---- PEFT LoRA directories into an AdapterPool -------------------------------------------------------------

A_KEY = "base_model.model.q_proj.lora_A.weight"
B_KEY = "base_model.model.q_proj.lora_B.weight"


def _peft_dir(path: Path, tensors=None, config=None) -> Path:
    """A PEFT LoRA directory written by hand (what peft's save_pretrained writes for one module)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else {A_KEY: torch.randn(2, 8), B_KEY: torch.randn(6, 2)}
    save_file(tensors, str(path / WEIGHTS_NAME))
    config = config if config is not None else {"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                "target_modules": ["q_proj"]}
    (path / CONFIG_NAME).write_text(json.dumps(config))
    return path


def _pool_with_one_adapter(tmp_path):
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 6), "k_proj": nn.Linear(8, 6)})
    pool = peftkern.AdapterPool(model, ["q_proj"], num_slots=2, r_max=4)
    pool.load("good", _peft_dir(tmp_path / "good"))
    return model, pool


POOL_DAMAGE = {
    **{name: (damage, ValueError, "not a valid safetensors file") for name, damage in BROKEN_WEIGHTS.items()},
    "int dtype": (lambda f: _rewrite(f, lambda t: t.update({A_KEY: t[A_KEY].to(torch.int32)})), ValueError,
                  f"key '{A_KEY}': expected a float tensor"),
    "wrong shape": (lambda f: _rewrite(f, lambda t: t.update({B_KEY: torch.randn(5, 2)})), ValueError,
                    r"lora_b: expected shape \[6, 2\]"),
    "transposed A": (lambda f: _rewrite(f, lambda t: t.update({A_KEY: t[A_KEY].T.contiguous()})), ValueError,
                     "lora_A has shape"),
    "extra key": (lambda f: _rewrite(f, lambda t: t.update({"base_model.model.q_proj.bias": torch.zeros(6)})),
                  ValueError, "is not a LoRA A/B weight"),
    "missing key": (lambda f: _rewrite(f, lambda t: t.pop(B_KEY)), ValueError, "not both A and B"),
    "nan": (lambda f: _rewrite(f, lambda t: t[B_KEY].view(-1)[3:5].fill_(float("nan"))), ValueError,
            "holds NaN or infinite values"),
    "no tensors": (lambda f: save_file({}, str(f)), ValueError, "no LoRA weights found"),
    "bad json": (lambda f: (f.parent / CONFIG_NAME).write_text("{"), ValueError, "not valid JSON"),
    "json string": (lambda f: (f.parent / CONFIG_NAME).write_text('"LORA"'), ValueError, "expected a JSON object"),
    "other method": (lambda f: (f.parent / CONFIG_NAME).write_text('{"peft_type": "IA3"}'), ValueError,
                     "peft_type 'IA3' is not LoRA"),
    "no config": (lambda f: (f.parent / CONFIG_NAME).unlink(), FileNotFoundError, "adapter_config.json: missing"),
    "pickle only": (_pickle_only, FileNotFoundError, r"adapter_model.bin \(pickle\)"),
}


@pytest.mark.parametrize("damage", list(POOL_DAMAGE))
def test_pool_load_of_a_damaged_peft_directory_leaves_the_pool_unchanged(tmp_path, damage):
    model, pool = _pool_with_one_adapter(tmp_path)
    path = _peft_dir(tmp_path / "bad")
    change, error, message = POOL_DAMAGE[damage]
    change(path / WEIGHTS_NAME)
    before = _state(model)
    x = torch.randn(3, 8)
    with torch.no_grad(), pool.batch(["good", None, "good"]):
        expected = model["q_proj"](x)
    for name in ("good", "new"):  # replacing a loaded adapter, or loading into a free slot
        with pytest.raises(error, match=message):
            pool.load(name, path)
        assert pool.names == ["good"]
        _assert_same_state(model, before)
    assert not (path / "PWNED").exists()
    with torch.no_grad(), pool.batch(["good", None, "good"]):
        assert torch.equal(model["q_proj"](x), expected)


def test_pool_load_of_paths_that_do_not_exist(tmp_path):
    model, pool = _pool_with_one_adapter(tmp_path)
    before = _state(model)
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        pool.load("x", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="expected a directory"):
        pool.load("x", tmp_path / "good" / WEIGHTS_NAME)  # a file, not a directory
    assert pool.names == ["good"]
    _assert_same_state(model, before)


# ---- atomic saves: a writer killed mid-write --------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    import torch
    from safetensors.torch import save

    from peftkern.io import write_atomically

    target = Path(sys.argv[1])
    for version in range(1, 10**6):
        data = save({{"prompt_embeddings": torch.full((256, 1024), float(version))}})

        def write(name):
            # A slow writer (1 MB in 16 flushed pieces): nearly all of its time is spent inside a write,
            # so the kill below lands mid-write, where a non-atomic save leaves a torn file.
            with open(name, "wb") as handle:
                for start in range(0, len(data), 1 << 16):
                    handle.write(data[start:start + (1 << 16)])
                    handle.flush()
                    time.sleep(0.002)

        write_atomically({{target: write}})
        if version == 1:
            print("saved", flush=True)
    """
)


def test_killed_writer_leaves_the_previous_file_loadable(tmp_path):
    """SIGKILL a process that keeps rewriting one file through the library's atomic writer (every adapter
    format saves through it): whenever it dies, the file on disk is one complete version (every value the
    same), never a torn mix."""
    target = tmp_path / "weights.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format())
    for delay in (0.05, 0.3):
        writer = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE)
        try:
            assert writer.stdout.readline().strip() == b"saved", "the writer never saved its first version"
            time.sleep(delay)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=60)
            writer.stdout.close()
        table = load_file(str(target))["prompt_embeddings"]
        assert table.shape == (256, 1024)
        assert torch.equal(table, torch.full_like(table, table[0, 0].item())), "a torn file"


def test_saved_soft_prompt_is_unchanged_by_a_failed_load(tmp_path):
    """A failed load reads files only: the files on disk are unchanged too."""
    model, path = _saved_soft_prompt(tmp_path, "prompt")
    (path / "task_1" / CONFIG_NAME).write_text("{")
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError):
        load_soft_prompt(copy.deepcopy(model), path)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
