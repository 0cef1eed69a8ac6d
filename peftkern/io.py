"""Adapter files in the Hugging Face PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Safetensors only, never pickle. Every problem with a file raises ``ValueError`` (or ``FileNotFoundError``)
naming the file and, where it applies, the key.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import (
    _check_alpha,
    _check_patterns,
    _check_rank,
    _matches,
    _peft_tuner,
    apply_lora,
    lora_layers,
    mark_trainable,
    pattern_value,
    peft_model_of,
    plan_lora,
    unwrap_model,
)
from .nn.lora import LoRALinear

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "load_adapter",
    "read_peft_adapter",
    "save_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: ``(config, tensors)`` with tensors on the CPU, keys as stored.

    Raises ``FileNotFoundError`` for a missing directory or file (pointing out a pickle-only adapter, which
    we refuse to load), and ``ValueError`` for a config that is not a JSON object or a weights file that
    is not valid safetensors.
    """
    return read_adapter_files(path, CONFIG_NAME, WEIGHTS_NAME)


def read_adapter_files(
    path: str | os.PathLike, config_name: str, weights_name: str
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``path/config_name`` (a JSON object) and ``path/weights_name`` (safetensors, to the CPU), with
    the errors of :func:`read_peft_adapter`. Shared by every adapter format we read."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter path {str(directory)!r}: expected a directory, found none")
    config_path = directory / config_name
    weights_path = directory / weights_name
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing ({config_name} is required)")
    if not weights_path.is_file():
        pickles = [name for name in _PICKLE_NAMES if (directory / name).is_file()]
        hint = f"; found {pickles[0]} (pickle), which peftkern never loads" if pickles else ""
        raise FileNotFoundError(f"{weights_path}: missing ({weights_name} is required){hint}")
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


# ---- LoRA adapters: save_adapter / load_adapter ---------------------------------------------------------
# (other adapter kinds go in their own sections below this one)

# Keys peft writes around every module name, and the config keys by how we treat them.
PEFT_KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?:lora_(?P<part>[AB])\.weight|lora_magnitude_vector)")
MAGNITUDE_KEY = "lora_magnitude_vector"  # peft's key suffix for a DoRA layer's magnitude [out_features]
# Settings of the adapter's initialisation (or bookkeeping) only: they do not change what a saved adapter
# computes, so loading ignores them.
_IGNORED_CONFIG_KEYS = frozenset(
    {
        "auto_mapping",
        "base_model_name_or_path",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "inference_mode",
        "init_lora_weights",
        "layers_pattern",
        "loftq_config",
        "lora_ga_config",
        "megatron_core",
        "peft_version",
        "qalora_group_size",
        "revision",
        "task_type",
    }
)
_HANDLED_CONFIG_KEYS = frozenset(
    {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
     "use_rslora", "exclude_modules", "use_dora"}
)
# Features we do not implement: present with any other value, the adapter computes something else.
_REQUIRED_CONFIG_VALUES = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False}


@dataclass(frozen=True)
class LoRAConfig:
    """The part of a peft ``LoraConfig`` that a plain LoRA adapter's computation depends on."""

    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: str | tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    exclude_modules: str | tuple[str, ...] | None
    use_dora: bool = False


def _config_error(where: Path, key: str, message: str) -> ValueError:
    return ValueError(f"{where}: key {key!r}: {message}")


def parse_lora_config(config: dict, where: Path) -> LoRAConfig:
    """Validate a peft ``adapter_config.json`` (as a dict) for plain LoRA; raises ``ValueError`` naming
    the offending key for another PEFT method, biases, ``modules_to_save`` and any other feature
    peftkern does not implement."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _config_error(
            where, "peft_type", f"expected 'LORA' (peftkern loads LoRA adapters), got {peft_type!r}"
        )
    for key, expected in _REQUIRED_CONFIG_VALUES.items():
        if key in config and config[key] != expected:
            raise _config_error(where, key, f"{config[key]!r} is not supported (expected {expected!r})")
    for key, value in config.items():
        known = key in _IGNORED_CONFIG_KEYS or key in _HANDLED_CONFIG_KEYS or key in _REQUIRED_CONFIG_VALUES
        if not known and value not in (None, False, {}, [], ""):
            raise _config_error(
                where, key, f"{value!r} is not supported (peftkern implements plain LoRA on nn.Linear layers)"
            )
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _config_error(where, "r", f"expected a positive int, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _config_error(where, "lora_alpha", f"expected a finite number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise _config_error(where, "lora_dropout", f"expected a probability in [0, 1), got {dropout!r}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _config_error(where, "use_rslora", f"expected true or false, got {use_rslora!r}")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise _config_error(where, "use_dora", f"expected true or false, got {use_dora!r}")
    target_modules = config.get("target_modules")
    if not (isinstance(target_modules, str) or isinstance(target_modules, list)) or not target_modules:
        raise _config_error(
            where, "target_modules", f"expected a list of names or a regex, got {target_modules!r}"
        )
    exclude = config.get("exclude_modules")
    if exclude is not None and not isinstance(exclude, (str, list)):
        raise _config_error(where, "exclude_modules", f"expected a list of names or a regex, got {exclude!r}")
    patterns = {}
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        try:
            patterns[key] = _check_patterns(key, config.get(key) or {}, check)
        except (TypeError, ValueError) as error:
            raise _config_error(where, key, str(error)) from error
    return LoRAConfig(
        r=r,
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=target_modules if isinstance(target_modules, str) else tuple(target_modules),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        use_rslora=use_rslora,
        exclude_modules=exclude if exclude is None or isinstance(exclude, str) else tuple(exclude),
        use_dora=use_dora,
    )


def _most_common(values: list) -> object:
    counts = Counter(values)
    # Ties go to the smallest value, so the written config does not depend on module order.
    return min(counts, key=lambda value: (-counts[value], value))


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _target_modules_for(root: nn.Module, names: list[str]) -> list[str]:
    """The shortest peft ``target_modules`` that selects exactly ``names``: the names' last components if
    they pick no other linear layer, else the full names."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    lora_names = set(names)
    candidates = [
        name
        for name, module in root.named_modules()
        if name
        and isinstance(module, (nn.Linear, LoRALinear))
        and not any(name.startswith(prefix + ".") for prefix in lora_names)
    ]
    selected = {name for name in candidates if _matches(suffixes, name)}
    return suffixes if selected == lora_names else sorted(names)


def lora_config_dict(
    model: nn.Module, base_model_name_or_path: str | None = None, task_type: str | None = None
) -> dict:
    """The peft ``adapter_config.json`` content describing ``model``'s LoRA layers (see
    :func:`save_adapter`)."""
    root = unwrap_model(model)
    layers = dict(lora_layers(root))
    if not layers:
        raise ValueError(f"model: {type(root).__name__} has no LoRALinear layers to save")
    for attribute in ("use_rslora", "dropout", "use_dora"):
        values = {name: getattr(layer, attribute) for name, layer in layers.items()}
        if len(set(values.values())) > 1:
            raise ValueError(
                f"model: layers differ in {attribute} ({values}); a peft adapter_config.json holds one value"
            )
    first = next(iter(layers.values()))
    r = _most_common([layer.r for layer in layers.values()])
    alpha = _most_common([layer.alpha for layer in layers.values()])
    # Keys are regexes (peft matches them with re.match against the end of the name): escape the dots.
    rank_pattern = {re.escape(n): layer.r for n, layer in layers.items() if layer.r != r}
    alpha_pattern = {
        re.escape(n): _plain_number(layer.alpha) for n, layer in layers.items() if layer.alpha != alpha
    }
    for name, layer in layers.items():
        # Self-check: the patterns as peft reads them give every layer its own rank and alpha.
        rank_read = pattern_value(rank_pattern, name, r)
        if rank_read != layer.r or pattern_value(alpha_pattern, name, alpha) != layer.alpha:
            raise ValueError(f"model: layer {name!r}: its rank/alpha cannot be written as a peft pattern")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    if task_type is None and type(root).__name__.endswith("ForCausalLM"):
        task_type = "CAUSAL_LM"
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _plain_number(alpha),
        "lora_dropout": first.dropout,
        "target_modules": _target_modules_for(root, list(layers)),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _full_cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors: gather the whole tensor before writing it.
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu").contiguous().clone()


def _process_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` sets while it reads,
    which races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(files: dict[Path, Callable[[str], None]]) -> None:
    """Write every file to a temporary file in its own directory first, then rename them all into place:
    a crash while writing leaves the old files intact (and no partial file under the final name)."""
    staged: dict[Path, str] = {}
    try:
        for target, write in files.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(handle)
            staged[target] = temporary
            write(temporary)
            # mkstemp (and safetensors' own writer) make 0o600 files; the rename would keep that. Give the
            # file the mode open() would: 0o666 less the umask.
            os.chmod(temporary, 0o666 & ~_process_umask())
            with open(temporary, "rb") as stream:
                os.fsync(stream.fileno())
        # The weights go first: a reader never sees a new config next to weights it does not describe
        # for longer than the gap between two renames.
        for target, temporary in staged.items():
            os.replace(temporary, target)
    finally:
        for temporary in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


def _adapter_parameters(layer: LoRALinear) -> tuple[nn.Parameter, ...]:
    """The trainable Parameters of a LoRA layer: A, B, and the magnitude of a DoRA layer."""
    extra = (layer.lora_magnitude_vector,) if layer.use_dora else ()
    return (layer.lora_A, layer.lora_B, *extra)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write ``model``'s LoRA adapters to directory ``path`` in the peft format: ``adapter_config.json``
    and ``adapter_model.safetensors`` with peft's key names
    (``base_model.model.<module>.lora_A.weight`` [r, in], ``...lora_B.weight`` [out, r]), so that
    ``peft.PeftModel.from_pretrained(base_model, path)`` loads it. Writes are atomic (temp file + rename).

    ``model`` is a model with ``LoRALinear`` layers (from :func:`peftkern.inject_lora`, possibly wrapped by
    ``torch.compile`` / DDP). The most common rank and alpha become ``r`` / ``lora_alpha``; layers that differ
    go to ``rank_pattern`` / ``alpha_pattern``.

    For a ``peft`` ``PeftModel`` (converted by :func:`peftkern.from_peft` or not) this is peft's own
    ``save_pretrained(path)``: every adapter, ``modules_to_save`` and peft's config, exactly the files a Trainer
    checkpoint holds (``base_model_name_or_path`` / ``task_type`` then come from its config: passing them
    raises ``ValueError``).
    """
    if _peft_tuner(model, "save") is not None:
        if base_model_name_or_path is not None or task_type is not None:
            raise ValueError(
                "base_model_name_or_path / task_type: a peft model saves its own config; set them on its "
                "peft_config instead"
            )
        peft_model_of(model).save_pretrained(str(path))
        return
    config = lora_config_dict(model, base_model_name_or_path, task_type)
    adapter_ids = {id(p) for _, layer in lora_layers(model) for p in _adapter_parameters(layer)}
    parameters = unwrap_model(model).named_parameters()
    others = [name for name, p in parameters if p.requires_grad and id(p) not in adapter_ids]
    if others:
        # e.g. a head made trainable with mark_trainable(extra=...) or peft's modules_to_save: the peft
        # LoRA format has no place for them here, so say so instead of dropping them silently.
        warnings.warn(
            f"save_adapter: {len(others)} trainable parameter(s) outside the LoRA layers are not saved "
            f"(first: {others[0]!r}); save them separately",
            stacklevel=2,
        )
    tensors = {}
    for name, layer in lora_layers(model):
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = _full_cpu_tensor(layer.lora_A)
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = _full_cpu_tensor(layer.lora_B)
        if layer.use_dora:
            tensors[f"{PEFT_KEY_PREFIX}{name}.{MAGNITUDE_KEY}"] = _full_cpu_tensor(layer.lora_magnitude_vector)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_weights(target: str) -> None:
        save_file(tensors, target, metadata={"format": "pt"})

    def write_config(target: str) -> None:
        Path(target).write_text(text, encoding="utf-8")

    write_atomically({directory / WEIGHTS_NAME: write_weights, directory / CONFIG_NAME: write_config})


def load_adapter(
    model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False, backend: str | None = None
) -> nn.Module:
    """Load a peft LoRA adapter directory into ``model`` (in place); returns ``model``.

    Where ``model`` has no ``LoRALinear`` layers, they are injected as ``adapter_config.json`` describes
    (``target_modules``, ``r``, ``lora_alpha``, patterns, rsLoRA, dropout). Where it has them, their weights
    are replaced and their alpha, rsLoRA and dropout set from the config.

    As peft's ``PeftModel.from_pretrained``: for inference by default (``model.eval()``, every parameter
    frozen); with ``is_trainable=True`` the adapters train (the base frozen) and the model's mode is kept.

    Everything is validated before anything changes: a corrupt file, an unsupported config (another PEFT
    type, biases, modules_to_save, ...), a missing, unexpected or non-finite tensor, or a shape that
    does not fit raises ``ValueError`` naming the key, and the model is left as it was. A ``peft`` model is
    refused (``ValueError``): load into it with peft's own ``load_adapter``.
    """
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable: expected a bool, got {type(is_trainable).__name__}")
    if _peft_tuner(model, "load into") is not None:
        raise ValueError(
            "model: is a peft PeftModel; use its own load_adapter(path, adapter_name=...) (then "
            "peftkern.from_peft(model) runs new layers fused)"
        )
    directory = Path(path)
    config, tensors = read_peft_adapter(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    settings = parse_lora_config(config, config_path)
    root = unwrap_model(model)
    existing = dict(lora_layers(root))

    # name -> (rank, alpha, in_features, out_features), from the layers present or those to inject.
    if existing:
        expected = {}
        for name, layer in existing.items():
            if layer.use_dora != settings.use_dora:
                raise _config_error(config_path, "use_dora", f"is {settings.use_dora}, but the model's layer "
                                    f"{name!r} has use_dora={layer.use_dora}")
            rank = pattern_value(settings.rank_pattern, name, settings.r)
            if rank != layer.r:
                raise _config_error(
                    config_path, "r", f"gives layer {name!r} rank {rank}, but the model's layer has {layer.r}"
                )
            alpha = float(pattern_value(settings.alpha_pattern, name, settings.lora_alpha))
            expected[name] = (layer.r, alpha, layer.in_features, layer.out_features)
        sites = []
    else:
        try:
            sites = plan_lora(
                root,
                settings.target_modules,
                settings.r,
                settings.lora_alpha,
                settings.rank_pattern,
                settings.alpha_pattern,
                settings.exclude_modules,
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"{config_path}: cannot inject the layers it describes: {error}") from error
        expected = {site.name: (site.r, site.alpha, site.in_features, site.out_features) for site in sites}

    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{weights_path}: unexpected key {key!r} (expected '{PEFT_KEY_PREFIX}<module>.lora_A.weight' "
                f"or '.lora_B.weight', or '.{MAGNITUDE_KEY}' with use_dora)"
            )
        if match["part"] is None and not settings.use_dora:
            raise ValueError(f"{weights_path}: unexpected key {key!r}: a DoRA magnitude, but the config has "
                             "use_dora false")
        if match["module"] not in expected:
            raise ValueError(
                f"{weights_path}: unexpected key {key!r}: the model has no LoRA layer {match['module']!r}"
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"{weights_path}: tensor {key!r}: expected a floating-point dtype, got {tensor.dtype}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{weights_path}: tensor {key!r}: holds NaN or infinite values")
    for name, (rank, _, in_features, out_features) in expected.items():
        parts = [("lora_A.weight", (rank, in_features)), ("lora_B.weight", (out_features, rank))]
        parts += [(MAGNITUDE_KEY, (out_features,))] if settings.use_dora else []
        for part, shape in parts:
            key = f"{PEFT_KEY_PREFIX}{name}.{part}"
            if key not in tensors:
                raise ValueError(f"{weights_path}: missing tensor {key!r}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(
                    f"{weights_path}: tensor {key!r}: expected shape {shape} for layer {name!r}, "
                    f"got {tuple(tensors[key].shape)}"
                )

    if sites:
        apply_lora(root, sites, dropout=settings.lora_dropout, use_rslora=settings.use_rslora, init="zeros",
                   backend=backend, use_dora=settings.use_dora)
    if is_trainable:
        if sites:
            mark_trainable(root)
        for _, layer in lora_layers(root):
            layer.train(root.training)  # new layers take the model's mode
            for parameter in _adapter_parameters(layer):
                parameter.requires_grad_(True)
    else:
        model.eval()
        root.requires_grad_(False)
    with torch.no_grad():
        for name, layer in lora_layers(root):
            layer.lora_A.copy_(tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"])
            if layer.use_dora:
                layer.lora_magnitude_vector.copy_(tensors[f"{PEFT_KEY_PREFIX}{name}.{MAGNITUDE_KEY}"])
                layer._weight_norm_sq.clear()
            layer.alpha = expected[name][1]
            layer.use_rslora = settings.use_rslora
            layer.dropout = settings.lora_dropout
            if backend is not None:
                layer.backend = backend
    return model
# ---- soft prompts (prompt tuning, prefix tuning) ----------------------------------------------------------
#
# peft stores one soft prompt per adapter directory: ``prompt_embeddings`` [n, D] for prompt tuning, and for
# prefix tuning the final prefix table [n, num_layers * 2 * H_kv * head_dim] (after the MLP, if any; peft
# saves it with inference_mode on, so the MLP is never needed again). Several tasks go the way peft lays out
# several adapters: task 0 in ``path`` itself, task i >= 1 in ``path/task_<i>/``, each a complete adapter
# that ``peft.PeftModel.from_pretrained`` (or ``load_adapter``) reads.

PROMPT_KEY = "prompt_embeddings"
TASK_DIR = "task_{}"


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
        write_atomically({
            directory / WEIGHTS_NAME: lambda name, t=table: save_file({PROMPT_KEY: t}, name),
            directory / CONFIG_NAME: lambda name: Path(name).write_text(config_text, "utf-8"),
        })


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
    extra = sorted(set(tensors) - {PROMPT_KEY})
    if extra:
        raise ValueError(f"{weights_path}: unexpected key {extra[0]!r} (a soft prompt holds only {PROMPT_KEY!r})")
    table = tensors[PROMPT_KEY]
    if tuple(table.shape) != tuple(expected_shape):
        raise ValueError(
            f"{weights_path}: key {PROMPT_KEY!r} expected shape {tuple(expected_shape)}, "
            f"got {tuple(table.shape)}"
        )
    if not table.is_floating_point():
        raise ValueError(f"{weights_path}: key {PROMPT_KEY!r} expected a float tensor, got {table.dtype}")
    if not torch.isfinite(table).all():
        raise ValueError(f"{weights_path}: key {PROMPT_KEY!r} holds NaN or inf values")
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
