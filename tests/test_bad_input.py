"""Bad input: a ValueError/TypeError naming the argument, raised before any kernel runs, inputs unchanged."""

from __future__ import annotations

import math

import pytest
import torch

import peftkern
from peftkern.backends import triton_interpreting

BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or triton_interpreting() else [])


def lora_args(**overrides):
    args = {
        "x": torch.randn(4, 8),
        "weight": torch.randn(6, 8),
        "bias": torch.randn(6),
        "lora_a": torch.randn(2, 8),
        "lora_b": torch.randn(6, 2),
        "scaling": 1.0,
        "dropout_p": 0.1,
    }
    args.update(overrides)
    return args


LORA_CASES = [
    # (overrides, error type, message pattern)
    ({"x": torch.randn(4, 7)}, ValueError, r"x: expected last dimension 8"),
    ({"weight": torch.randn(6, 8, 1)}, ValueError, r"weight: expected 2 dimensions"),
    ({"lora_a": torch.randn(2, 9)}, ValueError, r"lora_a: expected shape \(\*, 8\)"),
    ({"lora_a": torch.randn(0, 8), "lora_b": torch.randn(6, 0)}, ValueError, r"lora_a: expected rank r >= 1"),
    ({"lora_b": torch.randn(6, 3)}, ValueError, r"lora_b: expected shape \(6, 2\)"),
    ({"lora_b": torch.randn(5, 2)}, ValueError, r"lora_b: expected shape \(6, 2\)"),
    ({"bias": torch.randn(5)}, ValueError, r"bias: expected shape \(6,\)"),
    ({"x": torch.randint(0, 3, (4, 8))}, TypeError, r"x: expected dtype in"),
    ({"weight": torch.randn(6, 8, dtype=torch.float16)}, TypeError, r"weight: expected the dtype of x"),
    ({"lora_b": torch.randn(6, 2, dtype=torch.float64)}, TypeError, r"lora_b: expected the dtype of lora_a"),
    ({"bias": torch.randn(6, dtype=torch.float64)}, TypeError, r"bias: expected the dtype of x"),
    ({"x": [[1.0] * 8]}, TypeError, r"x: expected a torch.Tensor, got list"),
    ({"scaling": math.nan}, ValueError, r"scaling: expected a finite number, got nan"),
    ({"scaling": math.inf}, ValueError, r"scaling: expected a finite number, got inf"),
    ({"scaling": "2"}, TypeError, r"scaling: expected a real number"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p: expected a probability in \[0, 1\), got 1.0"),
    ({"dropout_p": -0.1}, ValueError, r"dropout_p: expected a probability in \[0, 1\)"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, error, pattern", LORA_CASES, ids=lambda v: str(v)[:40])
def test_lora_linear_bad_input(backend, overrides, error, pattern):
    args = lora_args(**overrides)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=pattern):
        peftkern.lora_linear(**args, backend=backend)
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} was modified"


def test_lora_linear_bad_seed_and_backend():
    with pytest.raises(TypeError, match="seed: expected dtype in"):
        peftkern.lora_linear(**lora_args(), seed=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="seed: expected a single int64 value"):
        peftkern.lora_linear(**lora_args(), seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="backend: expected one of"):
        peftkern.lora_linear(**lora_args(), backend="jax")
    with pytest.raises((ValueError, RuntimeError), match="backend 'cuda'"):
        peftkern.lora_linear(**lora_args(), backend="cuda")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton interpreter or a GPU")
def test_triton_rejects_float64_with_a_clear_error():
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in lora_args().items()}
    with pytest.raises(TypeError, match="backend 'triton' does not support"):
        peftkern.lora_linear(**args, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_in_activations_propagate_like_the_reference(backend):
    from peftkern import reference

    args = lora_args(dropout_p=0.5)
    args["x"][1, 3] = math.nan
    args["x"][2, 0] = math.inf
    got = peftkern.lora_linear(**args, seed=4, backend=backend)
    expected = reference.lora_linear(**args, seed=4)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
