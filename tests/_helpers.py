"""Tolerances (DESIGN.md) and comparison helpers shared by the tests."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype of the tensor under test; the reference runs in float64.
TOLERANCES_CPU = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float64: (1e-10, 1e-10),
}
TOLERANCES_GPU = {**TOLERANCES_CPU, torch.float32: (1e-4, 1e-4)}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    table = TOLERANCES_GPU if torch.device(device).type == "cuda" else TOLERANCES_CPU
    return table[dtype]


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    name: str,
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
) -> None:
    """|actual - expected| <= atol + rtol * |expected| per element, with the tolerance of ``dtype``
    (default: actual's dtype) times ``scale`` (for sums over long reductions); shows the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = tolerance(dtype or actual.dtype, actual.device)
    atol, rtol = atol * scale, rtol * scale
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    assert not nan_mismatch.any(), f"{name}: NaN pattern differs at {nan_mismatch.nonzero()[:5].tolist()}"
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite & ~torch.isnan(e)], e[~finite & ~torch.isnan(e)]), f"{name}: infinities differ"
    if a.numel() == 0 or not finite.any():
        return
    excess = ((a - e).abs() - (atol + rtol * e.abs()))[finite]
    worst = int(excess.argmax())
    if excess[worst] > 0:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e[finite].shape))
        fa, fe = a[finite], e[finite]
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {excess.numel()} elements out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); worst at finite-element {index}: got {fa[worst].item():.6g}, "
            f"expected {fe[worst].item():.6g}, |diff| {abs(fa[worst] - fe[worst]).item():.3g}"
        )


def cast(tensor: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    """A leaf copy of ``tensor`` in ``dtype``."""
    return tensor.detach().to(dtype).requires_grad_(requires_grad)
