"""Adapter files in the Hugging Face PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Safetensors only, never pickle. Every problem with a file raises ``ValueError`` (or ``FileNotFoundError``)
naming the file and, where it applies, the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "read_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: ``(config, tensors)`` with tensors on the CPU, keys as stored.

    Raises ``FileNotFoundError`` for a missing directory or file (pointing out a pickle-only adapter, which
    we refuse to load), and ``ValueError`` for a config that is not a JSON object or a weights file that
    is not valid safetensors.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter path {str(directory)!r}: expected a directory, found none")
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing ({CONFIG_NAME} is required)")
    if not weights_path.is_file():
        pickles = [name for name in _PICKLE_NAMES if (directory / name).is_file()]
        hint = f"; found {pickles[0]} (pickle), which peftkern never loads" if pickles else ""
        raise FileNotFoundError(f"{weights_path}: missing ({WEIGHTS_NAME} is required){hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path}: not a valid safetensors file ({error})") from error
    return config, tensors


# ---- soft prompts (prompt tuning, prefix tuning) ----------------------------------------------------------
#
# peft stores one soft prompt per adapter directory: ``prompt_embeddings`` [n, D] for prompt tuning, and for
# prefix tuning the final prefix table [n, num_layers * 2 * H_kv * head_dim] (after the MLP, if any; peft
# saves it with inference_mode on, so the MLP is never needed again). Several tasks go the way peft lays out
# several adapters: task 0 in ``path`` itself, task i >= 1 in ``path/task_<i>/``, each a complete adapter
# that ``peft.PeftModel.from_pretrained`` (or ``load_adapter``) reads.

PROMPT_KEY = "prompt_embeddings"
TASK_DIR = "task_{}"


def _atomic_write(target: Path, write) -> None:
    """Write ``target`` through a temporary file in its directory, then rename: never a half-written file."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(str(temporary))
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def _soft_prompt_kind(model) -> str:
    from .nn.prompt import PrefixTuningForCausalLM, PromptTuningForCausalLM

    if isinstance(model, PromptTuningForCausalLM):
        return "PROMPT_TUNING"
    if isinstance(model, PrefixTuningForCausalLM):
        return "PREFIX_TUNING"
    raise TypeError(
        "model: expected peftkern.PromptTuningForCausalLM or PrefixTuningForCausalLM, "
        f"got {type(model).__name__}"
    )


def _soft_prompt_config(model, kind: str) -> dict:
    """adapter_config.json as peft writes it for a causal LM (inference_mode on: the table is final)."""
    base = model.model.config
    text = base.get_text_config() if hasattr(base, "get_text_config") else base
    config = {
        "peft_type": kind,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "base_model_name_or_path": getattr(base, "_name_or_path", None) or None,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
        "num_transformer_submodules": 1,
        "num_layers": text.num_hidden_layers,
    }
    if kind == "PROMPT_TUNING":
        prompt = model.prompt
        config.update(
            num_virtual_tokens=prompt.num_virtual_tokens,
            token_dim=prompt.dim,
            num_attention_heads=text.num_attention_heads,
            prompt_tuning_init="RANDOM",
            prompt_tuning_init_text=None,
            tokenizer_name_or_path=None,
            tokenizer_kwargs=None,
        )
    else:
        prefix = model.prefix
        kv_dim = prefix.num_kv_heads * prefix.head_dim
        config.update(
            num_virtual_tokens=prefix.num_virtual_tokens,
            # peft's grouped-query convention: token_dim and heads count the key/value heads.
            token_dim=kv_dim,
            num_attention_heads=prefix.num_kv_heads,
            num_layers=prefix.num_layers,
            encoder_hidden_size=prefix.projection_hidden or kv_dim,
            prefix_projection=False,
            init_weights=None,
        )
    return config


def _task_tables(model, kind: str) -> torch.Tensor:
    """[P, n, W]: the per-task tables that go to disk."""
    with torch.no_grad():
        return (model.prompt.weight if kind == "PROMPT_TUNING" else model.prefix.table()).detach()


def save_soft_prompt(model, path: str | os.PathLike, task: int | None = None) -> None:
    """Save a prompt- or prefix-tuning model's soft prompts in peft's format.

    ``task=None``: every task (task 0 in ``path``, task i in ``path/task_<i>``); ``task=k``: task k alone in
    ``path``. Each directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` with the key
    ``prompt_embeddings`` ([n, D] for prompt tuning, [n, L * 2 * H_kv * head_dim] for prefix tuning).
    """
    from safetensors.torch import save_file

    kind = _soft_prompt_kind(model)
    tables = _task_tables(model, kind)
    bad_task = isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(tables)
    if task is not None and bad_task:
        raise ValueError(f"task: expected a task index in [0, {len(tables)}), got {task!r}")
    tasks = range(len(tables)) if task is None else [task]
    config_text = json.dumps(_soft_prompt_config(model, kind), indent=2, sort_keys=True) + "\n"
    root = Path(path)
    for position, index in enumerate(tasks):
        directory = root if position == 0 else root / TASK_DIR.format(index)
        directory.mkdir(parents=True, exist_ok=True)
        table = tables[index].to("cpu").contiguous()
        _atomic_write(directory / WEIGHTS_NAME, lambda name, t=table: save_file({PROMPT_KEY: t}, name))
        _atomic_write(directory / CONFIG_NAME, lambda name: Path(name).write_text(config_text, "utf-8"))


def _read_soft_prompt(directory: Path, kind: str, expected_shape: tuple[int, int], model) -> torch.Tensor:
    config, tensors = read_peft_adapter(directory)
    config_path = directory / CONFIG_NAME
    if config.get("peft_type") != kind:
        raise ValueError(f"{config_path}: expected peft_type {kind!r}, got {config.get('peft_type')!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{config_path}: expected a decoder-only adapter (num_transformer_submodules 1)")
    if config.get("num_virtual_tokens") != expected_shape[0]:
        raise ValueError(
            f"{config_path}: expected num_virtual_tokens {expected_shape[0]}, "
            f"got {config.get('num_virtual_tokens')}"
        )
    if kind == "PREFIX_TUNING":
        prefix = model.prefix
        for key, value in (("num_layers", prefix.num_layers), ("num_attention_heads", prefix.num_kv_heads)):
            if config.get(key) != value:
                raise ValueError(
                    f"{config_path}: expected {key} {value} (the model's), got {config.get(key)}"
                )
    weights_path = directory / WEIGHTS_NAME
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{weights_path}: missing key {PROMPT_KEY!r} (found {sorted(tensors)})")
    table = tensors[PROMPT_KEY]
    if tuple(table.shape) != tuple(expected_shape):
        raise ValueError(
            f"{weights_path}: key {PROMPT_KEY!r} expected shape {tuple(expected_shape)}, "
            f"got {tuple(table.shape)}"
        )
    if not table.is_floating_point():
        raise ValueError(f"{weights_path}: key {PROMPT_KEY!r} expected a float tensor, got {table.dtype}")
    return table


def load_soft_prompt(model, path: str | os.PathLike, task: int | None = None) -> None:
    """Load soft prompts saved by peft (or :func:`save_soft_prompt`) into a prompt- or prefix-tuning model.

    ``task=None``: ``path`` must hold exactly the model's number of tasks (task 0 in ``path``, task i in
    ``path/task_<i>``); ``task=k``: the adapter in ``path`` becomes task k. Prefix tables load only into a
    ``PrefixEncoder`` without the MLP (the saved table is its output, which cannot be inverted).
    Shapes, peft_type, virtual-token count and (prefix) layer/head counts are checked: ``ValueError``.
    """
    kind = _soft_prompt_kind(model)
    if kind == "PROMPT_TUNING":
        target = model.prompt.weight
    else:
        if model.prefix.transform is not None:
            raise ValueError(
                "model: its PrefixEncoder has an MLP (projection_hidden); a saved prefix table is the MLP's "
                "output and loads only into a PrefixEncoder built with projection_hidden=None"
            )
        target = model.prefix.embedding
    num_tasks = target.shape[0]
    root = Path(path)
    if task is None:
        directories = [root]
        while (root / TASK_DIR.format(len(directories))).is_dir():
            directories.append(root / TASK_DIR.format(len(directories)))
        if len(directories) != num_tasks:
            raise ValueError(
                f"adapter path {str(root)!r}: expected {num_tasks} task(s) (the model's), found "
                f"{len(directories)}; pass task=k to load one"
            )
        indices = list(range(num_tasks))
    else:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < num_tasks:
            raise ValueError(f"task: expected a task index in [0, {num_tasks}), got {task!r}")
        directories, indices = [root], [task]
    tables = [_read_soft_prompt(d, kind, tuple(target.shape[1:]), model) for d in directories]
    with torch.no_grad():
        for index, table in zip(indices, tables):
            target[index].copy_(table.to(device=target.device, dtype=target.dtype))


__all__ += ["save_soft_prompt", "load_soft_prompt"]
