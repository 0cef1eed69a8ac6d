"""Model surgery for LoRA: inject ``LoRALinear`` into a model, run a ``peft`` model's layers through our ops
(``from_peft``), merge and unmerge, freeze everything but the adapters, and count parameters. On a ``peft``
model, merging and unloading are peft's own methods (``from_peft`` keeps peft's modules).

Module names follow ``peft``: for a Hugging Face model they are the names of ``model.named_modules()``
(``model.layers.0.self_attn.q_proj``); for a ``peft`` ``PeftModel`` they are taken inside its wrapped base
model (``peft_model.base_model.model``), so the same names and the same matching rules apply to both.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch.nn as nn

from .backends import BACKENDS
from .nn.lora import LoRALinear
from .nn.lora4bit import LoRALinear4bit, is_linear_4bit

__all__ = [
    "ALL_LINEAR",
    "ParameterCount",
    "from_peft",
    "fused_layers",
    "inject_lora",
    "lora_layers",
    "mark_trainable",
    "merge",
    "merge_and_unload",
    "trainable_parameters",
    "unmerge",
    "unwrap_model",
]

logger = logging.getLogger("peftkern")

# peft's shorthand for "every linear layer except the output head".
ALL_LINEAR = "all-linear"


# ---- finding the model and its modules -------------------------------------------------------------------


def _is_peft_model(model: nn.Module) -> bool:
    # Duck-typed so that peft stays an optional dependency: PeftModel -> LoraModel (.base_model) -> .model.
    return type(model).__module__.startswith("peft.") and isinstance(
        getattr(getattr(model, "base_model", None), "model", None), nn.Module
    )


def _unwrap_wrappers(model: nn.Module) -> nn.Module:
    """``model`` without ``torch.compile`` / DDP wrappers (a peft model stays wrapped)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ == "DistributedDataParallel" and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose ``named_modules()`` names match ``peft``'s: unwraps ``torch.compile``
    (``_orig_mod``), DDP (``.module``) and a ``peft`` ``PeftModel`` (``.base_model.model``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = _unwrap_wrappers(model)
    while _is_peft_model(model):
        model = _unwrap_wrappers(model.base_model.model)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, layer)`` for every peftkern ``LoRALinear`` in ``model``, names as ``peft`` writes them (see
    :func:`unwrap_model`). The layers of a :func:`from_peft` model stay peft's (its ``lora_A`` / ``lora_B``
    ModuleDicts, one entry per named adapter) and are not listed: :func:`fused_layers` names those."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, module)


def _output_head_names(root: nn.Module) -> set[str]:
    # peft's "all-linear" leaves out the output embeddings of a transformers model (the LM head).
    get_output = getattr(root, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        return set()
    return {name for name, module in root.named_modules() if module is head}


def _inside_lora(name: str, lora_names: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in lora_names)


# ---- matching, as peft matches --------------------------------------------------------------------------


def _matches(spec: str | Iterable[str], name: str) -> bool:
    """peft's ``target_modules`` rule: a string is a regex that must match the whole name
    (``re.fullmatch``); a list matches a name equal to an entry or ending in ``"." + entry``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """peft's ``rank_pattern`` / ``alpha_pattern`` rule: the first key (a regex) that matches the end of
    ``name`` at a dot boundary, ``re.match(rf"(.*\\.)?({key})$", name)``, gives the value."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_target_modules(target_modules: object) -> str | tuple[str, ...]:
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules: expected a non-empty name, regex or 'all-linear', got ''")
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regex ({error})") from error
        return target_modules
    if isinstance(target_modules, Iterable):
        entries = tuple(target_modules)
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ValueError(
                f"target_modules: expected a non-empty list of module names or suffixes, got {entries!r}"
            )
        return entries
    raise TypeError(
        "target_modules: expected a module name list, a regex string or 'all-linear', "
        f"got {type(target_modules).__name__}"
    )


def _check_rank(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_alpha(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _check_patterns(name: str, patterns: object, check) -> dict[str, float]:
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise TypeError(f"{name}: expected a dict of regex -> value, got {type(patterns).__name__}")
    checked = {}
    for key, value in patterns.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: expected non-empty string keys, got {key!r}")
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(f"{name}: key {key!r} is not a valid regex ({error})") from error
        checked[key] = check(f"{name}[{key!r}]", value)
    return checked


@dataclass(frozen=True)
class LoRASite:
    """One linear layer chosen for an adapter: its module name, rank and alpha."""

    name: str
    in_features: int
    out_features: int
    r: int
    alpha: float


def plan_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> list[LoRASite]:
    """The linear layers :func:`inject_lora` would wrap, without touching the model (so callers can
    validate everything before changing anything). Raises ``ValueError`` when nothing matches, or when a
    matched module is not an ``nn.Linear`` or already carries a LoRA adapter."""
    spec = _check_target_modules(target_modules)
    r = _check_rank("r", r)
    alpha = _check_alpha("alpha", alpha)
    ranks = _check_patterns("rank_pattern", rank_pattern, _check_rank)
    alphas = _check_patterns("alpha_pattern", alpha_pattern, _check_alpha)
    exclude = None if exclude_modules is None else _check_target_modules(exclude_modules)
    root = unwrap_model(model)
    if peft_model_of(model) is not None or any(_is_peft_tuner_layer(module) for module in root.modules()):
        # Our layers would wrap peft's inner base_layer / lora_A modules: peft has its own way to add one.
        raise ValueError(
            "model: holds peft layers; add a LoRA adapter with peft's add_adapter (then peftkern.from_peft(model) "
            "runs it fused), or inject_lora into the plain model"
        )
    lora_names = [name for name, module in root.named_modules() if isinstance(module, LoRALinear)]
    heads = _output_head_names(root) if spec == ALL_LINEAR else set()

    sites = []
    for name, module in root.named_modules():
        if not name or _inside_lora(name, lora_names) or name in heads:
            continue
        if spec == ALL_LINEAR:
            chosen = type(module) is nn.Linear or is_linear_4bit(module)
        else:
            chosen = _matches(spec, name)
        if not chosen or (exclude is not None and _matches(exclude, name)):
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"target_modules: module {name!r} already has a LoRA adapter (peftkern holds one adapter per "
                "layer; merge_and_unload first to stack another)"
            )
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target_modules: module {name!r} matched but is a {type(module).__name__}; only "
                "torch.nn.Linear layers take a LoRA adapter"
            )
        sites.append(
            LoRASite(
                name,
                module.in_features,
                module.out_features,
                int(pattern_value(ranks, name, r)),
                float(pattern_value(alphas, name, alpha)),
            )
        )
    if not sites:
        raise ValueError(
            f"target_modules: {target_modules!r} matched no torch.nn.Linear module of "
            f"{type(root).__name__} (names look like {_example_names(root)})"
        )
    return sites


def _example_names(root: nn.Module) -> list[str]:
    return [name for name, module in root.named_modules() if isinstance(module, nn.Linear)][:3]


def apply_lora(
    model: nn.Module,
    sites: Iterable[LoRASite],
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "default",
    backend: str | None = None,
    use_dora: bool = False,
) -> None:
    """Replace each planned site's ``nn.Linear`` by a ``LoRALinear`` wrapping it (in place)."""
    root = unwrap_model(model)
    sites = list(sites)
    if use_dora:
        quantized = [site.name for site in sites if is_linear_4bit(root.get_submodule(site.name))]
        if quantized:
            raise ValueError(f"use_dora: DoRA over a bitsandbytes 4-bit base is not supported yet "
                             f"(module {quantized[0]!r}); use plain LoRA there")
    for site in sites:
        base = root.get_submodule(site.name)
        if is_linear_4bit(base):
            layer = LoRALinear4bit(base, site.r, site.alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                                   backend=backend)
        else:
            layer = LoRALinear(base, site.r, site.alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                               backend=backend, use_dora=use_dora)
        _set_submodule(root, site.name, layer)


# ---- the public surgery ---------------------------------------------------------------------------------


def inject_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    *,
    exclude_modules: str | Iterable[str] | None = None,
    init: str = "default",
    backend: str | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap matching ``nn.Linear`` layers of ``model`` in ``LoRALinear`` (in place) and freeze everything
    else; returns ``model``.

    ``target_modules`` as in ``peft``: a list of names or name suffixes (``["q_proj", "v_proj"]``), a
    regex string matched against the whole module name, or ``"all-linear"`` (every ``nn.Linear`` except
    the output head). ``rank_pattern`` / ``alpha_pattern`` map regexes to per-layer rank / alpha, matched
    as ``peft`` matches them. ``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    A new adapter starts as the base model (B = 0, A Kaiming-uniform, as ``peft``). ``use_dora=True``: DoRA
    layers (a trainable magnitude per output column, ``peftkern.dora_linear``), as peft's ``use_dora=True``.
    """
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    sites = plan_lora(model, target_modules, r, alpha, rank_pattern, alpha_pattern, exclude_modules)
    apply_lora(model, sites, dropout=dropout, use_rslora=use_rslora, init=init, backend=backend, use_dora=use_dora)
    mark_trainable(model)
    return model


def mark_trainable(model: nn.Module, extra: str | Iterable[str] = ()) -> nn.Module:
    """Freeze every parameter except the LoRA adapters' ``lora_A`` / ``lora_B`` and DoRA magnitudes (and the
    parameters of modules matching ``extra``, with ``target_modules``' rules, e.g. ``["lm_head"]``); returns
    ``model``."""
    if peft_model_of(model) is not None:
        raise ValueError(
            "model: is a peft PeftModel; peft marks its own adapters (and modules_to_save) trainable: use its "
            "set_adapter / requires_grad_ instead"
        )
    root = unwrap_model(model)
    if not isinstance(extra, str):
        extra = tuple(extra)
    extra_spec = _check_target_modules(extra) if extra else None
    for parameter in root.parameters():
        parameter.requires_grad_(False)
    for name, module in root.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
            if module.use_dora:
                module.lora_magnitude_vector.requires_grad_(True)
        elif extra_spec is not None and name and _matches(extra_spec, name):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return model


def peft_model_of(model: nn.Module) -> nn.Module | None:
    """The ``peft`` ``PeftModel`` that ``model`` is (under ``torch.compile`` / DDP wrappers), or None."""
    inner = _unwrap_wrappers(model)
    return inner if _is_peft_model(inner) else None


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    # Duck-typed (peft stays optional): peft's layers, and ours that subclass them, have a peft class in the MRO.
    return any(cls.__module__.startswith("peft.tuners") for cls in type(module).__mro__)


def _peft_tuner(model: nn.Module, action: str) -> nn.Module | None:
    """peft's tuner (``LoraModel``) behind ``model``, whose methods do ``action`` the peft way; None for a model
    without peft layers. Raises ``ValueError`` for peft layers outside a ``PeftModel`` (nothing to delegate to)."""
    peft_model = peft_model_of(model)
    if peft_model is not None:
        return peft_model.base_model
    if any(_is_peft_tuner_layer(module) for module in unwrap_model(model).modules()):
        raise ValueError(
            f"model: holds peft layers but is not a peft PeftModel; {action} the PeftModel itself (peft's own "
            "methods do it there)"
        )
    return None


def from_peft(peft_model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Run a ``peft`` model's LoRA linear layers through peftkern's fused ops, in place; returns ``peft_model``.

    peft's modules stay in place: each ``peft.tuners.lora.Linear`` only gets a forward that runs
    ``peftkern.lora_linear`` (and ``multi_lora_linear`` for ``adapter_names=`` batches) whenever the layer is
    in a state the op computes exactly, and peft's own forward otherwise (see :mod:`peftkern.peft_compat`).
    So the model stays a working ``PeftModel``: ``save_pretrained`` (Trainer checkpoints),
    ``disable_adapter()``, merging, ``add_adapter`` / ``set_adapter`` / ``delete_adapter``,
    ``modules_to_save`` and gradient checkpointing are peft's code and give peft's results; the Parameters
    are the same objects (optimizers keep working). Outputs and gradients are peft's (dropout draws differ:
    ours come from a counter-based stream). QLoRA layers (peft's ``lora.bnb.Linear4bit``) run
    ``peftkern.lora_linear_4bit`` over the base's 4-bit storage; DoRA layers (``use_dora=True``) run
    ``peftkern.dora_linear``. Layers peft runs that our ops do not cover (embeddings, convs, bitsandbytes 8-bit,
    DoRA over 4-bit, lora_bias, other tuners) keep peft's forward; one ``logging``
    line (logger ``"peftkern"``, INFO) says how many run fused and why the others do not, and :func:`fused_layers` lists
    them. Call it again after ``add_adapter`` targets new modules; converted layers stay converted.

    Raises ``ValueError`` only for a model without any peft layer, ``ImportError`` without peft.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    try:
        from . import peft_compat
    except ImportError as error:  # pragma: no cover - peft is installed with the [peft] extra
        raise ImportError("from_peft needs the peft package (pip install 'peftkern[peft]')") from error
    root = unwrap_model(peft_model)
    if peft_model_of(peft_model) is None and not any(_is_peft_tuner_layer(m) for m in root.modules()):
        raise ValueError(f"peft_model: no peft layers found in {type(peft_model).__name__}")
    fused, fallback = peft_compat.convert(root, backend)
    logger.info(peft_compat.describe(fused, fallback))
    return peft_model


def fused_layers(model: nn.Module) -> list[str]:
    """Names (as :func:`lora_layers` gives them) of the LoRA layers whose forward runs a peftkern op now:
    unmerged ``LoRALinear`` layers, and the layers of a :func:`from_peft` model whose state the fused op
    covers (one active adapter, not merged, adapters enabled, plain LoRA on an ``nn.Linear``)."""
    compat = sys.modules.get(f"{__package__}.peft_compat")  # never imports peft
    names = []
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoRALinear):
            ours = not module.merged
        else:
            ours = compat is not None and isinstance(module, compat.FUSED_CLASSES)
            ours = ours and compat.fusion_blocker(module) is None
        if ours:
            names.append(name)
    return names


def _peft_method(model: nn.Module, method: str):
    """peft's tuner method ``method`` (``merge_adapter``, ...) behind ``model``, or None for a model without
    peft layers; ``ValueError`` for a peft model whose tuner has no such method (prompt learning: nothing
    to merge)."""
    tuner = _peft_tuner(model, method.removesuffix("_adapter"))
    if tuner is None:
        return None
    bound = getattr(tuner, method, None)
    if bound is None:
        raise ValueError(f"model: peft's {type(tuner).__name__} has no {method} (nothing to merge)")
    return bound


def merge(model: nn.Module, *, safe_merge: bool = False) -> nn.Module:
    """Fold every adapter into its base weight, keeping the layers (``unmerge`` undoes it); returns
    ``model``. For a ``peft`` model, peft's ``merge_adapter(safe_merge=...)`` (its active adapters)."""
    peft_merge = _peft_method(model, "merge_adapter")
    if peft_merge is not None:
        peft_merge(safe_merge=safe_merge)
    for _, layer in _mergeable_layers(model):
        layer.merge()
    return model


def _mergeable_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """:func:`lora_layers`, after refusing (before any change) a model holding a ``LoRALinear4bit``."""
    layers = list(lora_layers(model))
    for _, layer in layers:
        if isinstance(layer, LoRALinear4bit):
            layer.merge()  # raises, saying why
    return layers


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: subtract every merged adapter from its base weight; returns ``model``. For a
    ``peft`` model, peft's ``unmerge_adapter()``."""
    peft_unmerge = _peft_method(model, "unmerge_adapter")
    if peft_unmerge is not None:
        peft_unmerge()
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, *, safe_merge: bool = False) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back; returns the plain
    model. For a ``peft`` model, peft's ``merge_and_unload(safe_merge=...)``, which returns its base model."""
    peft_merge_and_unload = _peft_method(model, "merge_and_unload")
    root = unwrap_model(model) if peft_merge_and_unload is None else peft_merge_and_unload(safe_merge=safe_merge)
    for name, layer in _mergeable_layers(root):
        layer.merge()
        _set_submodule(root, name, layer.base_layer)
    return model if peft_merge_and_unload is None else root


class ParameterCount(NamedTuple):
    """Parameter counts of a model (shared Parameters counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """How many parameters ``model`` trains and holds in all; ``str()`` of it reads like ``peft``'s
    ``print_trainable_parameters``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for parameter in model.parameters():  # parameters() already yields a shared Parameter once
        count = parameter.numel()
        total += count
        trainable += count if parameter.requires_grad else 0
    return ParameterCount(trainable, total)
