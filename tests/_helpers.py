"""Tolerances (DESIGN.md), comparison helpers, the CUDA C++ backend's test plumbing and peftkern._cpu's
instruction-set switch, shared by the tests."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
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


# ---- the CUDA C++ extension (tests/test_cuda_*.py) ---------------------------------------------------------

EXTENSION_PRESENT = importlib.util.find_spec("peftkern._C") is not None
needs_extension = pytest.mark.skipif(not EXTENSION_PRESENT, reason="peftkern._C is not built here")


def make_lora_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, device="cpu"):
    """(x [M, K], weight [N, K], bias [N] or None, lora_a [r, K], lora_b [N, r]) of unit-scale products:
    x, A and B require grad (in ``adapter_dtype``, default ``dtype``), the base does not."""
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(M, K, device=device)
    weight = torch.randn(N, K, device=device) / K**0.5
    b = torch.randn(N, device=device) if bias else None
    lora_a = torch.randn(r, K, device=device) / K**0.5
    lora_b = torch.randn(N, r, device=device) / r**0.5
    return (
        cast(x, dtype, True),
        cast(weight, dtype),
        None if b is None else cast(b, dtype),
        cast(lora_a, adapter_dtype, True),
        cast(lora_b, adapter_dtype, True),
    )


def cuda_ext() -> ModuleType:
    """The extension module peftkern._C (imported on first use, so that collection works without it)."""
    import peftkern._C

    return peftkern._C


def capture_in_cuda_graph(run: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``run`` up on a side stream (as graph capture requires), then capture one call of it; returns
    the graph and the captured call's output, which each ``graph.replay()`` overwrites."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def assert_graph_replay_follows(run: Callable[[], torch.Tensor], x: torch.Tensor) -> None:
    """Capture ``run`` in a CUDA graph, double its input ``x`` in place and replay: the replayed output must be
    a fresh eager call's on the new input, not the first call's (no host sync or stale copy in the launch)."""
    with torch.no_grad():
        eager = run()
        graph, out = capture_in_cuda_graph(run)
        x.copy_(x * 2)
        graph.replay()
        torch.cuda.synchronize()
        expected = run()
    assert torch.equal(out, expected) and not torch.equal(out, eager)


def greedy_decode_loop(forward: Callable[..., object], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding as a plain loop over full forwards (no KV cache): each step runs ``forward`` on the
    whole sequence so far and appends the argmax of the last position's logits. The ground truth for a
    ``generate`` test; peft's own prompt/prefix ``generate`` disagrees with it on some transformers/peft
    versions (transformers 5.24 with peft 0.21.2), so it is not used as the reference."""
    tokens, mask = input_ids, attention_mask
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = forward(input_ids=tokens, attention_mask=mask).logits
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return tokens


@contextlib.contextmanager
def cpu_simd(name: str) -> Iterator[ModuleType]:
    """Inside: peftkern._cpu (yielded) runs every kernel in ``name`` ("avx512f", "avx2", "scalar"); after, in the
    set it ran before. Skips the test where this CPU lacks ``name``; the scalar path runs on every machine."""
    module = importlib.import_module("peftkern._cpu")
    before = module.simd()
    try:
        module.use_simd(name)
    except ValueError as error:
        if name == "scalar":
            raise
        pytest.skip(f"this CPU cannot run {name}: {error}")
    try:
        yield module
    finally:
        module.use_simd(before)
