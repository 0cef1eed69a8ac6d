"""Bottleneck adapters in a Hugging Face Llama-style model: injection, and our own file format.

Placements (Houlsby et al. 2019; Pfeiffer et al. 2020), inside every decoder layer (a module with
``self_attn`` and ``mlp`` children):
  "pfeiffer"  one adapter on the MLP's output
  "houlsby"   one on the attention's output and one on the MLP's output
Each adapter acts on the sublayer's output before the decoder layer adds its residual stream: the
sublayer's output o becomes ``o + s * up(act(down(LN(o))))``. The adapter is registered as the child
``bottleneck_adapter`` of the sublayer and applied by a forward hook, so the base model's own parameter
names (and so its checkpoints) are unchanged.

Files: a directory holding ``bottleneck_config.json`` (format tag, version, the adapter config) and
``bottleneck_adapters.safetensors`` (the adapters' tensors under their names in the model's state dict).
Writes are atomic (a temporary file in the same directory, then ``os.replace``). Loading validates every
key, shape and dtype before it touches the model: on any error the model is unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import reference
from ._deprecation import deprecated_aliases
from .io import read_adapter_files, write_atomically
from .nn.bottleneck import BottleneckAdapter

__all__ = [
    "BottleneckConfig",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "inject_bottleneck_adapters",
    "bottleneck_adapter_modules",
    "remove_bottleneck_adapters",
    "save_bottleneck_adapters",
    "load_bottleneck_adapters",
]

ADAPTER_CONFIG_NAME = "bottleneck_config.json"
ADAPTER_WEIGHTS_NAME = "bottleneck_adapters.safetensors"
FORMAT = "peftkern.bottleneck_adapters"
FORMAT_VERSION = 1
ADAPTER_CHILD = "bottleneck_adapter"
PLACEMENTS = {"pfeiffer": ("mlp",), "houlsby": ("self_attn", "mlp")}
_CONFIG_ATTR = "peftkern_adapter_config"
_HOOKS_ATTR = "_peftkern_adapter_hooks"


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """What :func:`inject_bottleneck_adapters` builds: the placement and every ``BottleneckAdapter`` argument."""

    placement: str = "pfeiffer"
    reduction_factor: int = 16
    activation: str = "relu"
    scaling: float = 1.0
    init: str = "bert"
    num_adapters: int = 1
    layer_norm: bool = False

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {tuple(PLACEMENTS)}, got {self.placement!r}")
        for name in ("reduction_factor", "num_adapters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.activation not in reference.ACTIVATIONS:
            raise ValueError(f"activation: expected one of {reference.ACTIVATIONS}, got {self.activation!r}")
        if self.init not in ("bert", "zeros"):
            raise ValueError(f"init: expected one of ('bert', 'zeros'), got {self.init!r}")
        scaling = self.scaling
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"scaling: expected a finite number, got {scaling!r}")
        if not isinstance(self.layer_norm, bool):
            raise ValueError(f"layer_norm: expected a bool, got {self.layer_norm!r}")

    @classmethod
    def from_dict(cls, values: dict) -> BottleneckConfig:
        """Build from a dict; an unknown field raises ``ValueError`` naming it."""
        if not isinstance(values, dict):
            raise TypeError(f"config: expected an BottleneckConfig or a dict, got {type(values).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown field {unknown[0]!r} (known: {sorted(known)})")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_config(config: BottleneckConfig | dict) -> BottleneckConfig:
    return config if isinstance(config, BottleneckConfig) else BottleneckConfig.from_dict(config)


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "self_attn", None), nn.Module)
        and isinstance(getattr(module, "mlp", None), nn.Module)
    ]
    if not layers:
        raise ValueError(
            f"model: found no Llama-style decoder layers (modules with `self_attn` and `mlp` children) in "
            f"{type(model).__name__}"
        )
    return layers


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"model: expected model.config.hidden_size (a positive int), got {size!r}")
    return size


def _sites(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, nn.Module]]:
    """The sublayers that get an adapter, as (qualified name, module), in model order."""
    return [
        (f"{layer_name}.{site}" if layer_name else site, getattr(layer, site))
        for layer_name, layer in _decoder_layers(model)
        for site in PLACEMENTS[config.placement]
    ]


def _apply_adapter(module: nn.Module, args, output):
    adapter = module._modules[ADAPTER_CHILD]
    if isinstance(output, tuple):  # attention returns (output, weights)
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _sublayer_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype, param.device
    return torch.get_default_dtype(), torch.device("cpu")


def bottleneck_adapter_modules(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapter]]:
    """(name in the model, adapter) for every injected bottleneck adapter."""
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter) and name.rsplit(".", 1)[-1] == ADAPTER_CHILD:
            yield name, module


def inject_bottleneck_adapters(
    model: nn.Module,
    config: BottleneckConfig | dict,
    *,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    freeze_base: bool = True,
) -> nn.Module:
    """Add bottleneck adapters to every decoder layer of ``model`` (in place; returns it).

    ``config``: an :class:`BottleneckConfig` or a dict of its fields. Adapters are created on the device of
    their sublayer, in ``dtype`` (default: float32 beside a 16-bit model, else the model's dtype). With
    ``freeze_base`` every parameter of the base model stops requiring grad; the adapters' do. Multi-adapter
    batches (``num_adapters`` > 1): run the model inside ``peftkern.use_bottleneck_adapter_ids(ids)`` with ids [B].
    """
    config = _as_config(config)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    if any(True for _ in bottleneck_adapter_modules(model)):
        raise ValueError("model: already holds bottleneck adapters (call remove_bottleneck_adapters(model) first)")
    sites = _sites(model, config)
    dim = _hidden_size(model)
    if freeze_base:
        model.requires_grad_(False)
    hooks = []
    for _, module in sites:
        base_dtype, device = _sublayer_dtype_device(module)
        # As for LoRA: fp32 adapters beside a 16-bit model, else the model's dtype.
        low_precision = base_dtype in (torch.float16, torch.bfloat16)
        adapter_dtype = dtype or (torch.float32 if low_precision else base_dtype)
        adapter = BottleneckAdapter(
            dim, config.reduction_factor, config.activation, config.scaling, config.init, config.num_adapters,
            config.layer_norm, dtype=adapter_dtype, device=device, backend=backend,
        )
        module.add_module(ADAPTER_CHILD, adapter)
        hooks.append(module.register_forward_hook(_apply_adapter))
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _HOOKS_ATTR, hooks)
    return model


def remove_bottleneck_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`inject_bottleneck_adapters`: remove the hooks and the adapter modules (in place; returns model)."""
    for hook in getattr(model, _HOOKS_ATTR, []):
        hook.remove()
    for name, _ in list(bottleneck_adapter_modules(model)):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        del parent._modules[ADAPTER_CHILD]
    for attr in (_CONFIG_ATTR, _HOOKS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# ---- files ------------------------------------------------------------------------------------------------


def save_bottleneck_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's bottleneck adapters to the directory ``path`` (created if missing)."""
    config = getattr(model, _CONFIG_ATTR, None)
    modules = list(bottleneck_adapter_modules(model))
    if config is None or not modules:
        raise ValueError("model: holds no bottleneck adapters (inject_bottleneck_adapters(model, config) first)")
    tensors = {}
    for name, module in modules:
        for param_name, tensor in module.state_dict().items():
            tensors[f"{name}.{param_name}"] = tensor.detach().to("cpu").contiguous()
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hidden_size": _hidden_size(model),
        "config": config.to_dict(),
    }
    # Tensors first, config last: a config on disk always describes a complete weights file.
    text = json.dumps(header, indent=2, sort_keys=True) + "\n"
    write_atomically({
        directory / ADAPTER_WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}),
        directory / ADAPTER_CONFIG_NAME: lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
    })


def _read(path: str | os.PathLike) -> tuple[dict, BottleneckConfig, dict[str, torch.Tensor]]:
    header, tensors = read_adapter_files(path, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
    config_path = Path(path) / ADAPTER_CONFIG_NAME
    if header.get("format") != FORMAT:
        raise ValueError(f"{config_path}: key 'format': expected {FORMAT!r}, got {header.get('format')!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: key 'format_version': expected {FORMAT_VERSION}, "
            f"got {header.get('format_version')!r}"
        )
    try:
        config = BottleneckConfig.from_dict(header.get("config"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: key 'config': {error}") from error
    return header, config, tensors


def _expected_shapes(model: nn.Module, config: BottleneckConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor the file must hold for this model (with or without adapters yet)."""
    existing = dict(bottleneck_adapter_modules(model))
    if existing:
        return {
            f"{name}.{param_name}": tensor.shape
            for name, module in existing.items()
            for param_name, tensor in module.state_dict().items()
        }
    template = BottleneckAdapter(
        _hidden_size(model), config.reduction_factor, config.activation, config.scaling, "zeros",
        config.num_adapters, config.layer_norm, device="meta",
    )
    shapes = {param_name: tensor.shape for param_name, tensor in template.state_dict().items()}
    return {
        f"{site}.{ADAPTER_CHILD}.{param_name}": shape
        for site, _ in _sites(model, config)
        for param_name, shape in shapes.items()
    }


def load_bottleneck_adapters(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Load adapters saved by :func:`save_bottleneck_adapters` into ``model`` (in place; returns it).

    A model without adapters gets them injected from the file's config (``dtype``/``backend`` as in
    :func:`inject_bottleneck_adapters`); a model with adapters must have the same config. Every key, shape and dtype
    is checked first: ``FileNotFoundError``/``ValueError`` name the file and the key, and leave the model
    unchanged.
    """
    header, config, tensors = _read(path)
    weights_path = Path(path) / ADAPTER_WEIGHTS_NAME
    current = getattr(model, _CONFIG_ATTR, None)
    if current is not None and current != config:
        fields = [f.name for f in dataclasses.fields(BottleneckConfig)]
        field = next(name for name in fields if getattr(current, name) != getattr(config, name))
        raise ValueError(
            f"{Path(path) / ADAPTER_CONFIG_NAME}: key 'config.{field}': the file has "
            f"{getattr(config, field)!r}, the model's adapters have {getattr(current, field)!r}"
        )
    dim = _hidden_size(model)
    if header.get("hidden_size") != dim:
        raise ValueError(
            f"{Path(path) / ADAPTER_CONFIG_NAME}: key 'hidden_size': the file has "
            f"{header.get('hidden_size')!r}, the model has {dim}"
        )
    expected = _expected_shapes(model, config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ValueError(f"{weights_path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, shape in expected.items():
        tensor = tensors[name]
        if not tensor.is_floating_point():
            raise ValueError(
                f"{weights_path}: tensor {name!r}: expected a floating dtype, got {tensor.dtype}"
            )
        if tensor.shape != shape:
            raise ValueError(
                f"{weights_path}: tensor {name!r}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: tensor {name!r}: holds NaN or infinite values")

    # Everything checked: now change the model.
    if current is None:
        inject_bottleneck_adapters(model, config, dtype=dtype, backend=backend)
    modules = dict(bottleneck_adapter_modules(model))
    with torch.no_grad():
        for name, tensor in tensors.items():
            module_name, param_name = name.rsplit(".", 1)
            target = getattr(modules[module_name], param_name)
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return model


# The names before bottleneck adapters said "bottleneck" (``adapter`` alone is a LoRA adapter elsewhere).
RENAMED = {
    "AdapterConfig": "BottleneckConfig",
    "inject_adapters": "inject_bottleneck_adapters",
    "remove_adapters": "remove_bottleneck_adapters",
    "adapter_modules": "bottleneck_adapter_modules",
}
__getattr__ = deprecated_aliases(globals(), RENAMED)
