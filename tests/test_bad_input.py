"""Bad input, for every op and layer: a ValueError/TypeError naming the argument, raised before any kernel
runs, inputs unchanged; NaN and inf in activations propagate as the reference does.

"Another device" is the meta device on CPU (a tensor with no values: any read of it fails loudly).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from test_bottleneck import BAD as BOTTLENECK_BAD
from test_bottleneck import _good as bottleneck_args

import peftkern
from peftkern import reference
from peftkern.backends import cuda_backend_available, triton_interpreting

BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or triton_interpreting() else [])
# The CUDA C++ backend has lora_linear kernels only; its checks run before any launch, so CPU inputs show them.
LORA_BACKENDS = BACKENDS + (["cuda"] if cuda_backend_available() else [])
META = "meta"


def _snapshot(values: dict) -> dict:
    """Clones of the tensors among ``values`` (meta tensors hold nothing to compare)."""
    return {k: v.clone() for k, v in values.items() if isinstance(v, torch.Tensor) and v.device.type != META}


def _assert_unchanged(values: dict, before: dict) -> None:
    for name, value in before.items():
        assert torch.equal(values[name], value), f"{name} was modified"


def _raises(fn, args: dict, error, pattern) -> None:
    """``fn(**args)`` raises ``error`` matching ``pattern`` and leaves every tensor argument unchanged."""
    before = _snapshot(args)
    with pytest.raises(error, match=pattern):
        fn(**args)
    _assert_unchanged(args, before)


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
    ({"x": torch.randn(4, 8, device=META)}, ValueError, r"weight: expected a tensor on meta \(the device of x\)"),
    ({"weight": torch.randn(6, 8, device=META)}, ValueError, r"weight: expected a tensor on cpu"),
    ({"bias": torch.randn(6, device=META)}, ValueError, r"bias: expected a tensor on cpu"),
    ({"lora_a": torch.randn(2, 8, device=META)}, ValueError, r"lora_a: expected a tensor on cpu"),
    ({"lora_b": torch.randn(6, 2, device=META)}, ValueError, r"lora_b: expected a tensor on cpu"),
    ({"scaling": None}, TypeError, r"scaling: expected a real number"),
]


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("overrides, error, pattern", LORA_CASES, ids=lambda v: str(v)[:40])
def test_lora_linear_bad_input(backend, overrides, error, pattern):
    _raises(peftkern.lora_linear, {**lora_args(**overrides), "backend": backend}, error, pattern)


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


# ---- multi_lora_linear ------------------------------------------------------------------------------------


def multi_args(**overrides):
    args = {
        "x": torch.randn(4, 8),
        "weight": torch.randn(6, 8),
        "bias": torch.randn(6),
        "lora_a": torch.randn(3, 4, 8),
        "lora_b": torch.randn(3, 6, 4),
        "adapter_ids": torch.tensor([0, -1, 2, 1]),
        "scalings": [0.5, 1.0, 2.0],
        "ranks": [4, 2, 3],
    }
    args.update(overrides)
    return args


MULTI_CASES = [
    ({"x": torch.randn(4, 7)}, ValueError, r"x: expected last dimension 8"),
    ({"x": torch.randint(0, 3, (4, 8))}, TypeError, r"x: expected dtype in"),
    ({"x": [[1.0] * 8] * 4}, TypeError, r"x: expected a torch.Tensor, got list"),
    ({"x": torch.randn(4, 8, device=META)}, ValueError, r"weight: expected a tensor on meta \(the device of x\)"),
    ({"weight": torch.randn(6, 8, 1)}, ValueError, r"weight: expected 2 dimensions"),
    ({"weight": torch.randn(6, 8, dtype=torch.float16)}, TypeError, r"weight: expected the dtype of x"),
    ({"weight": torch.randn(6, 8, device=META)}, ValueError, r"weight: expected a tensor on cpu"),
    ({"bias": torch.randn(5)}, ValueError, r"bias: expected shape \(6,\)"),
    ({"bias": torch.randn(6).double()}, TypeError, r"bias: expected the dtype of x"),
    ({"bias": torch.randn(6, device=META)}, ValueError, r"bias: expected a tensor on cpu"),
    ({"lora_a": torch.randn(4, 8)}, ValueError, r"lora_a: expected 3 dimensions"),
    ({"lora_a": torch.randn(3, 4, 9)}, ValueError, r"lora_a: expected shape \(\*, \*, 8\)"),
    # An empty adapter list (L = 0) and adapters of rank 0.
    ({"lora_a": torch.randn(0, 4, 8), "lora_b": torch.randn(0, 6, 4), "scalings": [], "ranks": [],
      "adapter_ids": torch.full((4,), -1)}, ValueError, r"lora_a: expected L >= 1 adapter slots"),
    ({"lora_a": torch.randn(3, 0, 8), "lora_b": torch.randn(3, 6, 0)}, ValueError, r"r_max >= 1"),
    ({"lora_a": torch.randn(3, 4, 8).half(), "lora_b": torch.randn(3, 6, 4).half()}, TypeError,
     r"lora_a: expected the dtype of x"),
    ({"lora_a": torch.randn(3, 4, 8, device=META)}, ValueError, r"lora_a: expected a tensor on cpu"),
    ({"lora_b": torch.randn(3, 6, 5)}, ValueError, r"lora_b: expected shape \(3, 6, 4\)"),
    ({"lora_b": torch.randn(2, 6, 4)}, ValueError, r"lora_b: expected shape \(3, 6, 4\)"),
    ({"lora_b": torch.randn(3, 6, 4).double()}, TypeError, r"lora_b: expected the dtype of lora_a"),
    ({"lora_b": torch.randn(3, 6, 4, device=META)}, ValueError, r"lora_b: expected a tensor on cpu"),
    ({"adapter_ids": torch.tensor([0.0, 1.0, 0.0, 0.0])}, TypeError, r"adapter_ids: expected dtype in"),
    ({"adapter_ids": [0, 1, 0, 0]}, TypeError, r"adapter_ids: expected a torch.Tensor"),
    ({"adapter_ids": torch.tensor([0, 1, 0])}, ValueError, r"adapter_ids: expected shape \(4,\)"),
    ({"adapter_ids": torch.tensor([0, 3, 0, 0])}, ValueError, r"adapter_ids: expected values in \[-1, 3\)"),
    ({"adapter_ids": torch.tensor([0, -2, 0, 0])}, ValueError, r"adapter_ids: .*got -2 at index \(1,\)"),
    ({"adapter_ids": torch.tensor([0, 2**40, 0, 0])}, ValueError, r"adapter_ids: expected values in"),
    ({"adapter_ids": torch.tensor([0, 1, 0, 0], device=META)}, ValueError, r"adapter_ids: expected a tensor on"),
    ({"scalings": [0.5, math.nan, 2.0]}, ValueError, r"scalings\[1\]: expected a finite number, got nan"),
    ({"scalings": [0.5, 1.0, -math.inf]}, ValueError, r"scalings\[2\]: expected a finite number, got -inf"),
    ({"scalings": torch.tensor([0.5, math.inf, 2.0])}, ValueError, r"scalings: expected finite values"),
    ({"scalings": [0.5, 1.0]}, ValueError, r"scalings: expected 3 values"),
    ({"scalings": torch.ones(2)}, ValueError, r"scalings: expected shape \(3,\)"),
    ({"scalings": torch.ones(3, dtype=torch.int64)}, TypeError, r"scalings: expected dtype in"),
    ({"scalings": torch.ones(3, device=META)}, ValueError, r"scalings: expected a tensor on cpu"),
    ({"scalings": "1.0"}, TypeError, r"scalings: expected a float tensor \[L\] or a sequence"),
    ({"scalings": None}, TypeError, r"scalings: expected a float tensor \[L\] or a sequence"),
    ({"scalings": [True, 1.0, 1.0]}, TypeError, r"scalings\[0\]: expected a real number"),
    # A rank larger than r_max (4), a negative rank.
    ({"ranks": [5, 2, 3]}, ValueError, r"ranks\[0\]: expected a value in \[0, r_max=4\], got 5"),
    ({"ranks": torch.tensor([4, 9, 3])}, ValueError, r"ranks: expected values in \[0, r_max=4\]"),
    ({"ranks": [4, -1, 3]}, ValueError, r"ranks\[1\]: expected a value in \[0, r_max=4\]"),
    ({"ranks": [4, 2]}, ValueError, r"ranks: expected 3 values"),
    ({"ranks": [4, 2.5, 3]}, TypeError, r"ranks\[1\]: expected an int"),
    ({"ranks": torch.tensor([4.0, 2.0, 3.0])}, TypeError, r"ranks: expected dtype in"),
    ({"ranks": torch.tensor([4, 2, 3], device=META)}, ValueError, r"ranks: expected a tensor on cpu"),
    ({"check_ids": "yes"}, TypeError, r"check_ids: expected a bool"),
    ({"path": "fast"}, ValueError, r"path: expected one of"),
    ({"backend": "jax"}, ValueError, r"backend: expected one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, error, pattern", MULTI_CASES, ids=lambda v: str(v)[:40])
def test_multi_lora_linear_bad_input(backend, overrides, error, pattern):
    _raises(peftkern.multi_lora_linear, {"backend": backend, **multi_args(**overrides)}, error, pattern)


# ---- prompt_concat, prefix_kv -----------------------------------------------------------------------------


def prompt_args(**overrides):
    args = {
        "input_ids": torch.tensor([[0, 6, 3], [1, 1, 2]]),
        "embed_weight": torch.randn(7, 8),
        "prompts": torch.randn(3, 2, 8),
        "prompt_ids": torch.tensor([0, 2]),
        "attention_mask": torch.ones(2, 3, dtype=torch.int64),
        "labels": torch.zeros(2, 3, dtype=torch.int64),
    }
    args.update(overrides)
    return args


PROMPT_CASES = [
    ({"input_ids": torch.tensor([0, 6, 3])}, ValueError, r"input_ids: expected 2 dimensions"),
    ({"input_ids": torch.tensor([[0, 7, 3], [1, 1, 2]])}, ValueError, r"input_ids: expected ids in \[0, 7\)"),
    ({"input_ids": torch.tensor([[0, -1, 3], [1, 1, 2]])}, ValueError, r"input_ids: expected ids in \[0, 7\)"),
    ({"input_ids": torch.ones(2, 3)}, TypeError, r"input_ids: expected dtype in"),
    ({"input_ids": [[0, 1, 2]] * 2}, TypeError, r"input_ids: expected a torch.Tensor"),
    ({"input_ids": torch.zeros(2, 3, dtype=torch.int64, device=META)}, ValueError,
     r"input_ids: expected a tensor on cpu \(the device of embed_weight\)"),
    ({"embed_weight": torch.randn(7, 8, 1)}, ValueError, r"embed_weight: expected 2 dimensions"),
    ({"embed_weight": torch.randn(7, 8).long()}, TypeError, r"embed_weight: expected dtype in"),
    ({"embed_weight": torch.randn(7, 8, device=META)}, ValueError, r"input_ids: expected a tensor on meta"),
    ({"prompts": torch.randn(3, 2, 9)}, ValueError, r"prompts: expected shape \(\*, \*, 8\)"),
    ({"prompts": torch.randn(0, 2, 8)}, ValueError, r"prompts: expected at least one task"),  # no prompts
    ({"prompts": torch.randn(3, 0, 8)}, ValueError, r"prompts: expected at least one task and one virtual"),
    ({"prompts": torch.randn(3, 2, 8).half()}, TypeError, r"prompts: expected the dtype of embed_weight"),
    ({"prompts": torch.randn(3, 2, 8, device=META)}, ValueError, r"prompts: expected a tensor on cpu"),
    ({"prompt_ids": torch.tensor([0, 3])}, ValueError, r"prompt_ids: expected ids in \[0, 3\)"),
    ({"prompt_ids": torch.tensor([-1, 0])}, ValueError, r"prompt_ids: expected ids in \[0, 3\).*got -1"),
    ({"prompt_ids": 3}, ValueError, r"prompt_ids: expected ids in \[0, 3\)"),
    ({"prompt_ids": -1}, ValueError, r"prompt_ids: expected ids in \[0, 3\)"),
    ({"prompt_ids": torch.tensor([0, 1, 2])}, ValueError, r"prompt_ids: expected shape \(2,\)"),
    ({"prompt_ids": torch.tensor([[0, 1]])}, ValueError, r"prompt_ids: expected 1 dimensions"),
    ({"prompt_ids": torch.tensor([0.0, 1.0])}, TypeError, r"prompt_ids: expected dtype in"),
    ({"prompt_ids": torch.tensor([0, 1], device=META)}, ValueError, r"prompt_ids: expected a tensor on cpu"),
    ({"attention_mask": torch.ones(2, 4)}, ValueError, r"attention_mask: expected shape \(2, 3\)"),
    ({"attention_mask": torch.ones(2, 3, dtype=torch.int16)}, TypeError, r"attention_mask: expected dtype in"),
    ({"attention_mask": torch.ones(2, 3, device=META)}, ValueError, r"attention_mask: expected a tensor on"),
    ({"labels": torch.zeros(2, 4, dtype=torch.int64)}, ValueError, r"labels: expected shape \(2, 3\)"),
    ({"labels": torch.zeros(2, 3)}, TypeError, r"labels: expected dtype in"),
    ({"labels": torch.zeros(2, 3, dtype=torch.int64, device=META)}, ValueError, r"labels: expected a tensor on"),
    ({"backend": "jax"}, ValueError, r"backend: expected one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, error, pattern", PROMPT_CASES, ids=lambda v: str(v)[:40])
def test_prompt_concat_bad_input(backend, overrides, error, pattern):
    _raises(peftkern.prompt_concat, {"backend": backend, **prompt_args(**overrides)}, error, pattern)


def prefix_args(**overrides):
    args = {"prefix": torch.randn(2, 3, 16), "prompt_ids": torch.tensor([0, 1, 1]), "num_layers": 2,
            "num_kv_heads": 2}
    args.update(overrides)
    return args


PREFIX_CASES = [
    ({"prefix": torch.randn(2, 16)}, ValueError, r"prefix: expected 3 dimensions"),
    ({"prefix": torch.randn(2, 3, 12)}, ValueError, r"prefix: expected a last dim that is a positive multiple"),
    ({"prefix": torch.randn(0, 3, 16)}, ValueError, r"prefix: expected at least one task"),  # no prefixes
    ({"prefix": torch.randn(2, 0, 16)}, ValueError, r"prefix: expected at least one task and one virtual"),
    ({"prefix": torch.randn(2, 3, 16).long()}, TypeError, r"prefix: expected dtype in"),
    ({"prefix": torch.randn(2, 3, 16, device=META)}, ValueError,
     r"prompt_ids: expected a tensor on meta \(the device of prefix\)"),
    ({"prompt_ids": torch.tensor([0, 2, 1])}, ValueError, r"prompt_ids: expected ids in \[0, 2\)"),
    ({"prompt_ids": torch.tensor([0, -1, 1])}, ValueError, r"prompt_ids: expected ids in \[0, 2\).*got -1"),
    ({"prompt_ids": torch.tensor([[0, 1]])}, ValueError, r"prompt_ids: expected 1 dimensions"),
    ({"prompt_ids": torch.tensor([0.0, 1.0])}, TypeError, r"prompt_ids: expected dtype in"),
    ({"prompt_ids": torch.tensor([0, 1], device=META)}, ValueError, r"prompt_ids: expected a tensor on cpu"),
    ({"prompt_ids": 2, "batch_size": 3}, ValueError, r"prompt_ids: expected ids in \[0, 2\)"),
    ({"prompt_ids": 1}, ValueError, r"batch_size: expected the number of rows"),
    ({"prompt_ids": 1, "batch_size": -1}, ValueError, r"batch_size: expected an int >= 0, got -1"),
    ({"prompt_ids": 1, "batch_size": 2.0}, ValueError, r"batch_size: expected an int >= 0, got 2.0"),
    ({"num_layers": 0}, ValueError, r"num_layers: expected a positive int"),
    ({"num_layers": True}, ValueError, r"num_layers: expected a positive int"),
    ({"num_kv_heads": "2"}, ValueError, r"num_kv_heads: expected a positive int"),
    ({"backend": "jax"}, ValueError, r"backend: expected one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, error, pattern", PREFIX_CASES, ids=lambda v: str(v)[:40])
def test_prefix_kv_bad_input(backend, overrides, error, pattern):
    _raises(peftkern.prefix_kv, {"backend": backend, **prefix_args(**overrides)}, error, pattern)


def test_ops_on_meta_tensors_give_shapes_without_reading_values():
    """A model built on the meta device: the id checks have nothing to read and step aside."""
    out = peftkern.prompt_concat(*(t.to(META) for t in prompt_args().values()))
    assert out.inputs_embeds.shape == (2, 5, 8) and out.inputs_embeds.device.type == META
    kv = peftkern.prefix_kv(torch.randn(2, 3, 16, device=META), torch.tensor([0, 1, 1], device=META), 2, 2)
    assert kv.shape == (2, 2, 3, 2, 3, 2)
    y = peftkern.multi_lora_linear(**{k: v.to(META) if isinstance(v, torch.Tensor) else v
                                      for k, v in multi_args(ranks=None).items()})
    assert y.shape == (4, 6) and y.device.type == META


# ---- bottleneck_adapter -----------------------------------------------------------------------------------

BOTTLENECK_CASES = BOTTLENECK_BAD + [  # test_bottleneck's table (torch only there), plus:
    ({"x": torch.randn(4, 8, device=META)}, ValueError, r"down_weight: expected a tensor on meta \(the device of x"),
    ({"down_weight": torch.randn(2, 3, 8, device=META)}, ValueError, r"down_weight: expected a tensor on cpu"),
    ({"down_bias": torch.randn(2, 3, device=META)}, ValueError, r"down_bias: expected a tensor on cpu"),
    ({"up_weight": torch.randn(2, 8, 3, device=META)}, ValueError, r"up_weight: expected a tensor on cpu"),
    ({"up_bias": torch.randn(2, 8, device=META)}, ValueError, r"up_bias: expected a tensor on cpu"),
    ({"residual": torch.randn(4, 8, device=META)}, ValueError, r"residual: expected a tensor on cpu"),
    ({"adapter_ids": torch.tensor([0, 1, 0, 0], device=META)}, ValueError, r"adapter_ids: expected a tensor on"),
    ({"adapter_ids": torch.tensor([0, 2**40, 0, 0])}, ValueError, r"adapter_ids: expected ids in \[-1, 2\)"),
    # An empty adapter list.
    ({"down_weight": torch.randn(0, 3, 8), "down_bias": None, "up_weight": torch.randn(0, 8, 3), "up_bias": None,
      "adapter_ids": torch.full((4,), -1)}, ValueError, r"down_weight: expected at least one adapter"),
    ({"scaling": math.inf}, ValueError, r"scaling: expected a finite number, got inf"),
    ({"scaling": None}, TypeError, r"scaling: expected a real number"),
    ({"backend": "jax"}, ValueError, r"backend: expected one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides, error, pattern", BOTTLENECK_CASES, ids=lambda v: str(v)[:40])
def test_bottleneck_adapter_bad_input(backend, overrides, error, pattern):
    args = {"backend": backend, **bottleneck_args(), **overrides}
    if "[" in pattern and "\\[" not in pattern:  # test_bottleneck's table holds plain text
        pattern = pattern.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    _raises(peftkern.bottleneck_adapter, args, error, pattern)


# ---- NaN and inf in activations propagate as in the reference, outputs and gradients ----------------------


def _same_nonfinite(name: str, got: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    if expected is None:  # the reference never used this input
        expected = torch.zeros_like(got)
    got, expected = got.detach().cpu(), expected.detach().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{name}: NaN pattern differs"
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), f"{name}: inf pattern differs"
    finite = torch.isfinite(expected)
    assert torch.allclose(got[finite].double(), expected[finite].double(), atol=1e-4, rtol=1e-4), name


def _poisoned(*shape: int) -> torch.Tensor:
    """Random values with a NaN, a +inf and a -inf in different rows (row 0 stays finite)."""
    values = torch.randn(*shape)
    flat = values.view(-1, shape[-1])
    flat[1, 2 % shape[-1]] = math.nan
    flat[2, 0] = math.inf
    flat[-1, 1 % shape[-1]] = -math.inf
    return values


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_in_lora_linear_gradients(backend):
    args = lora_args(dropout_p=0.0, x=_poisoned(5, 8))
    leaves = {k: args[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b")}
    refs = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    grad = torch.randn(5, 6)
    peftkern.lora_linear(**{**args, **leaves}, backend=backend).backward(grad)
    double = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    reference.lora_linear(**{**double, **refs}).backward(grad.double())
    for name in leaves:
        _same_nonfinite(f"d{name}", leaves[name].grad, refs[name].grad)


@pytest.mark.parametrize("backend,path", [("torch", None)] + [("triton", p) for p in ("decode", "prefill")
                                                             if "triton" in BACKENDS])
def test_nan_and_inf_propagate_in_multi_lora_linear(backend, path):
    """A bad row poisons its own output and its own adapter's gradient, nothing else; and whatever the
    padding past an adapter's rank holds (here NaN and inf) is never computed, as in the reference."""
    args = multi_args(x=_poisoned(6, 8), adapter_ids=torch.tensor([0, 1, -1, 2, 0, 2]), ranks=[4, 2, 0])
    args["lora_a"][1, 2:] = math.nan
    args["lora_a"][2] = math.inf
    args["lora_b"][1, :, 2:] = math.nan
    names = ("x", "lora_a", "lora_b")
    leaves = {k: args[k].clone().requires_grad_() for k in names}
    refs = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    grad = torch.randn(6, 6)
    y = peftkern.multi_lora_linear(**{**args, **leaves}, backend=backend, path=path)
    y.backward(grad)
    double = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in args.items()}
    expected = reference.multi_lora_linear(**{**double, **refs})
    expected.backward(grad.double())
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[4]).all()  # rows 0 and 4: finite x, adapter 0
    _same_nonfinite("y", y, expected)
    for name in names:
        _same_nonfinite(f"d{name}", leaves[name].grad, refs[name].grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("separate_residual", [False, True])
def test_nan_and_inf_propagate_in_bottleneck_adapter(backend, activation, separate_residual):
    """-1 rows (here with NaN and inf in x) pass the residual through; no bad row reaches another row's
    output or another adapter's gradient."""
    args = bottleneck_args()
    args.update(x=_poisoned(5, 8), adapter_ids=torch.tensor([0, -1, 1, 0, -1]), activation=activation,
                scaling=0.5, residual=torch.randn(5, 8) if separate_residual else None)
    names = ("x", "down_weight", "down_bias", "up_weight", "up_bias")
    leaves = {k: args[k].clone().requires_grad_() for k in names}
    refs = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    grad = torch.randn(5, 8)
    y = peftkern.bottleneck_adapter(**{**args, **leaves}, backend=backend)
    y.backward(grad)
    double = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in args.items()}
    expected = reference.bottleneck_adapter(**{**double, **refs})
    expected.backward(grad.double())
    if separate_residual:
        assert torch.isfinite(y[[1, 4]]).all()  # -1 rows: the (finite) residual, whatever x holds
    _same_nonfinite("y", y, expected)
    for name in names:
        _same_nonfinite(f"d{name}", leaves[name].grad, refs[name].grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_in_prompt_concat_and_prefix_kv(backend):
    embed = _poisoned(7, 8)
    prompts = _poisoned(3, 2, 8)
    args = prompt_args(embed_weight=embed, prompts=prompts, input_ids=torch.tensor([[1, 2, 6], [0, 3, 2]]))
    out = peftkern.prompt_concat(**args, backend=backend)
    _same_nonfinite("inputs_embeds", out.inputs_embeds, reference.prompt_concat(**args).inputs_embeds)
    prefix = _poisoned(2, 3, 16)
    ids = torch.tensor([1, 0, 1])
    _same_nonfinite("prefix_kv", peftkern.prefix_kv(prefix, ids, 2, 2, backend=backend),
                    reference.prefix_kv(prefix, ids, 2, 2))


# ---- layers: constructors, adapter writes and forwards; a failed call leaves the layer unchanged ------------


def _state(module: nn.Module) -> dict:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


def _multi_layer():
    layer = peftkern.MultiLoRALinear(nn.Linear(8, 6), num_slots=2, r_max=4)
    layer.set_adapter(0, torch.randn(3, 8), torch.randn(6, 3), 0.5)
    return layer


MULTI_LAYER_CASES = [
    (lambda layer: peftkern.MultiLoRALinear(nn.Conv1d(8, 6, 1), 2, 4), TypeError, r"base_layer: expected"),
    (lambda layer: peftkern.MultiLoRALinear(nn.Linear(8, 6), 0, 4), ValueError, r"num_slots: expected a positive"),
    (lambda layer: peftkern.MultiLoRALinear(nn.Linear(8, 6), 2, True), ValueError, r"r_max: expected a positive"),
    (lambda layer: peftkern.MultiLoRALinear(nn.Linear(8, 6), 2, 4, dtype=torch.int64), TypeError,
     r"dtype: expected a floating"),
    (lambda layer: layer.set_adapter(-1, torch.randn(2, 8), torch.randn(6, 2), 1.0), ValueError,
     r"slot: expected an int in \[0, 2\)"),
    (lambda layer: layer.set_adapter(2, torch.randn(2, 8), torch.randn(6, 2), 1.0), ValueError, r"slot:"),
    (lambda layer: layer.set_adapter(0, torch.randn(5, 8), torch.randn(6, 5), 1.0), ValueError,
     r"lora_a: rank 5 is outside \[1, r_max=4\]"),
    (lambda layer: layer.set_adapter(0, torch.randn(0, 8), torch.randn(6, 0), 1.0), ValueError,
     r"lora_a: rank 0 is outside"),
    (lambda layer: layer.set_adapter(0, torch.randn(2, 9), torch.randn(6, 2), 1.0), ValueError,
     r"lora_a: expected shape \[r, 8\]"),
    (lambda layer: layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 3), 1.0), ValueError,
     r"lora_b: expected shape \[6, 2\]"),
    (lambda layer: layer.set_adapter(0, torch.ones(2, 8, dtype=torch.int64), torch.randn(6, 2), 1.0), ValueError,
     r"lora_a: expected a 2-D float tensor"),
    (lambda layer: layer.set_adapter(0, torch.randn(2, 8, device=META), torch.randn(6, 2), 1.0), ValueError,
     r"lora_a: expected a tensor with values"),
    (lambda layer: layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), math.nan), ValueError,
     r"scaling: expected a finite number"),
    (lambda layer: layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), -math.inf), ValueError,
     r"scaling: expected a finite number"),
    (lambda layer: layer.set_adapter(0, torch.randn(2, 8), torch.randn(6, 2), None), TypeError,
     r"scaling: expected a real number"),
    (lambda layer: layer.clear_adapter(5), ValueError, r"slot: expected an int in \[0, 2\)"),
    (lambda layer: layer(torch.randn(3, 7), torch.tensor([0, 0, 0])), ValueError, r"x: expected last dimension 8"),
    (lambda layer: layer([[0.0] * 8], torch.tensor([0])), TypeError, r"x: expected a torch.Tensor"),
    (lambda layer: layer(torch.randn(3, 8)), ValueError, r"adapter_ids: none given"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0, 2, 0])), ValueError,
     r"adapter_ids: expected values in \[-1, 2\)"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0.0, 1.0, 0.0])), TypeError, r"adapter_ids: expected"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0, 1])), ValueError, r"adapter_ids: expected shape"),
]


@pytest.mark.parametrize("call, error, pattern", MULTI_LAYER_CASES, ids=lambda v: str(v)[-40:])
def test_multi_lora_layer_bad_input(call, error, pattern):
    layer = _multi_layer()
    before = _state(layer)
    with pytest.raises(error, match=pattern):
        call(layer)
    _assert_same_state(layer, before)


def _lora_layer(**kwargs):
    return peftkern.LoRALinear(nn.Linear(8, 6), **{"r": 2, "alpha": 4, **kwargs})


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"r": 0}, ValueError, r"r: expected a positive int"),
    ({"alpha": math.nan}, ValueError, r"alpha: expected a finite number"),
    ({"alpha": None}, TypeError, r"alpha: expected a real number"),
    ({"dropout": 1.0}, ValueError, r"dropout: expected a probability in \[0, 1\)"),
    ({"dropout": "0.1"}, TypeError, r"dropout: expected a real number"),
    ({"dtype": torch.int64}, TypeError, r"dtype: expected a floating"),
    ({"init": "xavier"}, ValueError, r"init: expected one of"),
], ids=lambda v: str(v)[:30])
def test_lora_layer_bad_arguments_leave_the_base_alone(kwargs, error, pattern):
    base = nn.Linear(8, 6)
    with pytest.raises(error, match=pattern):
        peftkern.LoRALinear(base, **{"r": 2, "alpha": 4, **kwargs})
    assert base.weight.requires_grad  # not frozen by a failed wrap
    with pytest.raises(ValueError, match="x: expected last dimension 8"):
        _lora_layer()(torch.randn(2, 7))


# ---- AdapterPool ------------------------------------------------------------------------------------------

LORA_A_KEY = "base_model.model.q_proj.lora_A.weight"
LORA_B_KEY = "base_model.model.q_proj.lora_B.weight"


def _pool():
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 6), "k_proj": nn.Linear(8, 6)})
    pool = peftkern.AdapterPool(model, ["q_proj"], num_slots=2, r_max=4)
    pool.load("a", {LORA_A_KEY: torch.randn(2, 8), LORA_B_KEY: torch.randn(6, 2)}, {"r": 2, "lora_alpha": 4})
    return model, pool


def _adapter(**changes):
    tensors = {LORA_A_KEY: torch.randn(3, 8), LORA_B_KEY: torch.randn(6, 3)}
    tensors.update(changes)
    return {key: value for key, value in tensors.items() if value is not None}


POOL_CASES = [
    (lambda pool: pool.load("", _adapter()), ValueError, r"name: expected a non-empty string"),
    (lambda pool: pool.load(5, _adapter()), ValueError, r"name: expected a non-empty string"),
    (lambda pool: pool.load("b", 5), TypeError, r"source: expected a directory path or a state dict"),
    (lambda pool: pool.load("b", _adapter(), config=[1]), TypeError, r"config: expected a mapping"),
    (lambda pool: pool.load("b", "/no/such/adapter/dir"), FileNotFoundError, r"expected a directory"),
    (lambda pool: pool.load("b", {}), ValueError, r"no LoRA weights found"),  # an empty adapter
    # A rank larger than r_max = 4.
    (lambda pool: pool.load("b", _adapter(**{LORA_A_KEY: torch.randn(5, 8), LORA_B_KEY: torch.randn(6, 5)})),
     ValueError, r"rank 5 is outside \[1, r_max=4\]"),
    (lambda pool: pool.load("b", _adapter(**{LORA_A_KEY: torch.randn(3, 9)})), ValueError,
     r"module 'q_proj': lora_a: expected shape"),
    (lambda pool: pool.load("b", _adapter(**{LORA_B_KEY: torch.randn(6, 2)})), ValueError, r"lora_b: expected"),
    (lambda pool: pool.load("b", _adapter(**{LORA_B_KEY: None})), ValueError, r"not both A and B"),
    (lambda pool: pool.load("b", _adapter(**{LORA_A_KEY: torch.ones(3, 8, dtype=torch.int64)})), ValueError,
     r"expected a float tensor"),
    (lambda pool: pool.load("b", _adapter(**{LORA_A_KEY: torch.full((3, 8), math.nan)})), ValueError,
     r"holds NaN or infinite values"),
    (lambda pool: pool.load("b", _adapter(**{LORA_B_KEY: torch.full((6, 3), math.inf)})), ValueError,
     r"holds NaN or infinite values"),
    (lambda pool: pool.load("b", _adapter(**{LORA_A_KEY: torch.randn(3, 8, device=META)})), ValueError,
     r"lora_a: expected a tensor with values"),
    (lambda pool: pool.load("b", _adapter(), {"lora_alpha": math.nan}), ValueError,
     r"scaling: expected a finite number"),
    (lambda pool: pool.load("b", _adapter(), {"lora_alpha": math.inf, "use_rslora": True}), ValueError,
     r"scaling: expected a finite number"),
    (lambda pool: pool.load("b", _adapter(), {"lora_alpha": "16"}), ValueError, r"lora_alpha: expected a number"),
    (lambda pool: pool.load("b", _adapter(), {"r": 8}), ValueError, r"the config gives rank 8"),
    (lambda pool: pool.load("b", _adapter(), {"rank_pattern": 3}), ValueError, r"'rank_pattern': expected a map"),
    (lambda pool: pool.load("b", _adapter(), {"peft_type": "PREFIX_TUNING"}), ValueError, r"is not LoRA"),
    (lambda pool: pool.load("b", _adapter(), {"use_dora": True}), ValueError, r"use_dora=True is not supported"),
    (lambda pool: pool.load("b", {"base_model.model.k_proj.lora_A.weight": torch.randn(3, 8),
                                  "base_model.model.k_proj.lora_B.weight": torch.randn(6, 3)}), ValueError,
     r"which this pool does not adapt"),
    (lambda pool: pool.load("b", _adapter(**{"base_model.model.q_proj.lora_magnitude_vector": torch.ones(6)})),
     ValueError, r"is not a LoRA A/B weight but a DoRA magnitude"),
    (lambda pool: (pool.load("b", _adapter()), pool.load("c", _adapter())), ValueError, r"the pool is full"),
    (lambda pool: pool.evict("nope"), ValueError, r"adapter 'nope': not loaded"),
    (lambda pool: pool.evict(None), ValueError, r"adapter None: not loaded"),
    (lambda pool: pool.ids("a"), TypeError, r"names: expected a sequence"),
    (lambda pool: pool.ids(None), TypeError, r"names: expected a sequence"),
    (lambda pool: pool.ids(["a", "nope"]), ValueError, r"adapter 'nope': not loaded"),
    (lambda pool: pool.ids([0]), ValueError, r"adapter 0: not loaded"),
    (lambda pool: pool.batch("a").__enter__(), TypeError, r"names: expected a sequence"),
]


@pytest.mark.parametrize("call, error, pattern", POOL_CASES, ids=lambda v: str(v)[-40:])
def test_adapter_pool_bad_input_leaves_the_pool_unchanged(call, error, pattern):
    model, pool = _pool()
    names = pool.names
    state = _state(model)
    with pytest.raises(error, match=pattern):
        call(pool)
    if "full" not in pattern:  # a full pool did load "b" before refusing "c"
        assert pool.names == names
        _assert_same_state(model, state)
    with torch.no_grad(), pool.batch(["a", None]):  # and it still serves
        assert torch.isfinite(model["q_proj"](torch.randn(2, 8))).all()


@pytest.mark.parametrize("call, error, pattern", [
    (lambda model: peftkern.AdapterPool("model", ["q_proj"], 2, 4), TypeError, r"model: expected a torch.nn.M"),
    (lambda model: peftkern.AdapterPool(model, 5, 2, 4), TypeError, r"target_modules: expected"),
    (lambda model: peftkern.AdapterPool(model, [], 2, 4), ValueError, r"target_modules: \[\] matched no"),
    (lambda model: peftkern.AdapterPool(model, ["q_proj"], 0, 4), ValueError, r"num_slots: expected a positive"),
    (lambda model: peftkern.AdapterPool(model, ["q_proj"], 2, -1), ValueError, r"r_max: expected a positive"),
    (lambda model: peftkern.AdapterPool(model, ["q_proj"], 2, 4, dtype=torch.int32), TypeError, r"dtype:"),
], ids=lambda v: str(v)[-30:])
def test_adapter_pool_bad_construction_leaves_the_model_alone(call, error, pattern):
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 6)})
    with pytest.raises(error, match=pattern):
        call(model)
    assert type(model["q_proj"]) is nn.Linear and model["q_proj"].weight.requires_grad


# ---- PromptTuningEmbedding, PrefixEncoder -----------------------------------------------------------------


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: peftkern.PromptTuningEmbedding(0, 3, 8), ValueError, r"num_tasks: expected a positive int"),
    (lambda: peftkern.PromptTuningEmbedding(2, 3, 8, init="glove"), ValueError, r"init: expected one of"),
    (lambda: peftkern.PromptTuningEmbedding(2, 3, 8, init="vocab"), ValueError, r"word_embeddings:"),
    (lambda: peftkern.PromptTuningEmbedding(2, 3, 8, init="text", word_embeddings=torch.randn(7, 8),
                                            init_token_ids=[1, 9]), ValueError, r"init_token_ids: expected ids"),
    (lambda: peftkern.PrefixEncoder(2, 3, 0, 2, 4), ValueError, r"num_layers: expected a positive int"),
    (lambda: peftkern.PrefixEncoder(2, 3, 2, 2, 4, projection_hidden=0), ValueError, r"projection_hidden:"),
], ids=lambda v: str(v)[-30:])
def test_soft_prompt_layers_bad_construction(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


EMBED = torch.randn(7, 8)
INPUT_IDS = torch.tensor([[0, 6, 3], [1, 1, 2]])


@pytest.mark.parametrize("call, error, pattern", [
    (lambda layer, encoder: layer(INPUT_IDS, EMBED, torch.tensor([0, 2])), ValueError,
     r"prompt_ids: expected ids in \[0, 2\)"),
    (lambda layer, encoder: layer(INPUT_IDS, EMBED, -1), ValueError, r"prompt_ids: expected ids in \[0, 2\)"),
    (lambda layer, encoder: layer(INPUT_IDS, EMBED, torch.tensor([0.0, 1.0])), TypeError, r"prompt_ids:"),
    (lambda layer, encoder: layer(INPUT_IDS, torch.randn(7, 9)), ValueError, r"prompts: expected shape"),
    (lambda layer, encoder: layer(INPUT_IDS, EMBED.to(META)), ValueError, r"expected a tensor on meta"),
    (lambda layer, encoder: layer(INPUT_IDS[0], EMBED), ValueError, r"input_ids: expected 2 dimensions"),
    (lambda layer, encoder: layer(INPUT_IDS + 7, EMBED), ValueError, r"input_ids: expected ids in \[0, 7\)"),
    (lambda layer, encoder: encoder(torch.tensor([0, 2])), ValueError, r"prompt_ids: expected ids in \[0, 2\)"),
    (lambda layer, encoder: encoder(torch.tensor([-1])), ValueError, r"prompt_ids: expected ids in \[0, 2\)"),
    (lambda layer, encoder: encoder(1), ValueError, r"batch_size: expected the number of rows"),
    (lambda layer, encoder: encoder(1, batch_size=-2), ValueError, r"batch_size: expected an int >= 0"),
    (lambda layer, encoder: encoder(torch.tensor([0]), dtype=torch.int64), TypeError, r"dtype: expected a float"),
    (lambda layer, encoder: encoder(torch.tensor([0], device=META)), ValueError, r"prompt_ids: expected a tensor"),
], ids=lambda v: str(v)[-30:])
def test_soft_prompt_layers_bad_forward(call, error, pattern):
    layer = peftkern.PromptTuningEmbedding(2, 3, 8)
    encoder = peftkern.PrefixEncoder(2, 3, 2, 2, 4, projection_hidden=5)
    before = _state(layer), _state(encoder)
    with pytest.raises(error, match=pattern):
        call(layer, encoder)
    _assert_same_state(layer, before[0])
    _assert_same_state(encoder, before[1])


# ---- BottleneckAdapter, inject_bottleneck_adapters -------------------------------------------------------------------


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("call, error, pattern", [
    (lambda layer: layer(torch.randn(3, 7)), ValueError, r"x: expected last dimension 8"),
    (lambda layer: layer([[0.0] * 8]), TypeError, r"x: expected a torch.Tensor"),
    (lambda layer: layer(torch.randn(3, 8).long()), TypeError, r"x: expected dtype in"),
    (lambda layer: layer(torch.randn(3, 8)), ValueError, r"adapter_ids: this BottleneckAdapter holds 2"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0, 2, -1])), ValueError,
     r"adapter_ids: expected ids in \[-1, 2\)"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0, -3, -1])), ValueError, r"adapter_ids: .*got -3"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0.0, 1.0, 0.0])), TypeError, r"adapter_ids: expected"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0, 1])), ValueError, r"adapter_ids: expected shape"),
    (lambda layer: layer(torch.randn(3, 8), [0, 1, 0]), TypeError, r"adapter_ids: expected a torch.Tensor"),
    (lambda layer: layer(torch.randn(3, 8), torch.tensor([0, 1, 0], device=META)), ValueError,
     r"adapter_ids: expected a tensor on cpu"),
], ids=lambda v: str(v)[-30:])
def test_bottleneck_layer_bad_forward(call, error, pattern, layer_norm):
    layer = peftkern.BottleneckAdapter(8, 4, num_adapters=2, layer_norm=layer_norm)
    before = _state(layer)
    with pytest.raises(error, match=pattern):
        call(layer)
    _assert_same_state(layer, before)


class _DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8)


class _TinyDecoder(nn.Module):
    """What inject_bottleneck_adapters looks for: decoder layers with `self_attn` and `mlp`, and config.hidden_size."""

    def __init__(self, hidden_size=8) -> None:
        super().__init__()
        self.config = type("Config", (), {"hidden_size": hidden_size})()
        self.layers = nn.ModuleList([_DecoderLayer(), _DecoderLayer()])


@pytest.mark.parametrize("model, config, kwargs, error, pattern", [
    (_TinyDecoder(), {}, {"dtype": torch.int64}, TypeError, r"dtype: expected a floating"),
    (_TinyDecoder(), {"placement": "parallel"}, {}, ValueError, r"placement: expected one of"),
    (_TinyDecoder(), {"scaling": math.nan}, {}, ValueError, r"scaling: expected a finite number"),
    (_TinyDecoder(), {"scaling": math.inf}, {}, ValueError, r"scaling: expected a finite number"),
    (_TinyDecoder(), {"num_adapters": 0}, {}, ValueError, r"num_adapters: expected a positive int"),
    (_TinyDecoder(), {"activation": "elu"}, {}, ValueError, r"activation: expected one of"),
    (_TinyDecoder(), [("placement", "houlsby")], {}, TypeError, r"config: expected an BottleneckConfig or a dict"),
    (_TinyDecoder(hidden_size=None), {}, {}, ValueError, r"model: expected model.config.hidden_size"),
    (nn.Sequential(nn.Linear(8, 8)), {}, {}, ValueError, r"model: found no Llama-style decoder layers"),
], ids=lambda v: str(v)[-30:])
def test_inject_adapters_bad_input_leaves_the_model_alone(model, config, kwargs, error, pattern):
    model = copy.deepcopy(model)
    before = _state(model)
    with pytest.raises(error, match=pattern):
        peftkern.inject_bottleneck_adapters(model, config, **kwargs)
    _assert_same_state(model, before)
    assert all(p.requires_grad for p in model.parameters())  # not frozen either
    assert not any(isinstance(m, peftkern.BottleneckAdapter) for m in model.modules())
