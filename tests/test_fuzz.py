"""Property-based tests: random shapes, dtypes, strides, scalings and dropout against the reference.

`make test` runs the bounded "ci" profile; `make fuzz` runs the "long" one (HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import peftkern
from peftkern import reference
from peftkern.backends import triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if DEVICE == "cuda" or triton_interpreting() else [])
SIZES = st.sampled_from([0, 1, 2, 3, 5, 7, 13, 16, 17, 31, 33, 64, 65])
POSITIVE = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 33, 40])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def _layout(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values under another memory layout."""
    if kind == "transposed":
        return tensor.mT.contiguous().mT
    if kind == "strided":
        wide = torch.zeros(*tensor.shape[:-1], tensor.shape[-1] * 2, dtype=tensor.dtype, device=tensor.device)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    return tensor


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    m=SIZES, k=POSITIVE, n=POSITIVE, rank=st.sampled_from([1, 2, 4, 8, 16, 24]), dtype=DTYPES,
    fp32_adapters=st.booleans(), has_bias=st.booleans(),
    dropout_p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    scaling=st.floats(-4.0, 4.0, allow_nan=False), seed=st.integers(0, 2**62),
    x_layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    w_layout=st.sampled_from(["contiguous", "transposed"]),
    lead=st.sampled_from([(), (1,), (2,)]),
)
def test_lora_linear_fuzz(backend, m, k, n, rank, dtype, fp32_adapters, has_bias, dropout_p, scaling, seed,
                          x_layout, w_layout, lead):
    generator = torch.Generator().manual_seed(seed % 2**31)
    adapter_dtype = torch.float32 if fp32_adapters else dtype

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    x = _layout(rand(*lead, m, k), x_layout).requires_grad_(True)
    weight = _layout(rand(n, k) / k**0.5, w_layout)
    bias = rand(n) if has_bias else None
    lora_a = (rand(rank, k, dtype=adapter_dtype) / k**0.5).requires_grad_(True)
    lora_b = (rand(n, rank, dtype=adapter_dtype) / rank**0.5).requires_grad_(True)

    y = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed=seed, backend=backend)
    grad = torch.randn(y.shape, generator=generator).to(DEVICE, dtype)
    y.backward(grad)

    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, lora_a, lora_b))
    y64 = reference.lora_linear(
        x64, weight.double(), None if bias is None else bias.double(), a64, b64, scaling, dropout_p, seed=seed
    )
    y64.backward(grad.double())
    # Large |scaling| and 1/(1-p) amplify the 16-bit rounding of the inputs to the low-rank path.
    amplification = max(1.0, abs(scaling)) / (1.0 - dropout_p)
    assert_close(y, y64, "y", dtype, scale=amplification)
    assert_close(x.grad, x64.grad, "dx", dtype, scale=amplification)
    assert_close(lora_a.grad, a64.grad, "dA", dtype, scale=amplification)
    assert_close(lora_b.grad, b64.grad, "dB", dtype, scale=amplification)
