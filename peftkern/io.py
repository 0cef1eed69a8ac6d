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
