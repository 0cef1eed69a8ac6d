"""The dropout keep-mask outside the fused kernels: ``peftkern._cpu`` (the torch backend on CPU), the Triton
mask kernel (the torch backend on CUDA) and the fallback, each bit-exact with ``reference.dropout_mask``."""

from __future__ import annotations

import importlib

import pytest
import torch
from _helpers import cpu_simd

from peftkern import reference
from peftkern.ops import _dropout

MASK_DTYPES = [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(1, 1), (1, 31), (17, 33), (33, 1000), (4096, 37), (3, 4), (1, 300000)]  # blocks, row tails, threads
SEEDS = [0, 1, 123456789, 2**32 - 1, 2**32, 2**62 - 17, -5]


def _cpu_module():
    return importlib.import_module("peftkern._cpu")


def test_cpu_extension_is_built():
    # `make install` builds it; without it the torch backend still runs (the reference's torch ops) but its
    # dropout is ~30x slower, so a missing build must show up here rather than as a slow CI.
    assert _dropout.cpu_kernels_available(), "peftkern._cpu did not build or load (see pip's build warnings)"


@pytest.mark.parametrize("simd", ["avx512f", "avx2", "scalar"])
def test_cpu_mask_is_bit_exact_in_every_instruction_set(simd):
    with cpu_simd(simd):
        for seed in SEEDS:
            for shape in SHAPES:
                for p in (0.1, 0.5, 0.999):
                    expected = reference.dropout_mask(seed, shape, p)
                    for dtype in MASK_DTYPES:
                        got = _dropout.keep_mask(torch.tensor([seed]), shape, p, dtype)
                        assert got.dtype == dtype and got.shape == shape
                        assert torch.equal(got, expected.to(dtype)), (simd, seed, shape, p, dtype)


def test_cpu_mask_counters_past_2_to_32_and_p_zero():
    module = _cpu_module()
    # 10 counters a row: counters whose high word is not 0; 40960 counters, two threads' worth
    first_row, rows, cols = 2**33 // 10 + 7, 4096, 37
    got = torch.empty(rows, cols, dtype=torch.bool)
    module.dropout_keep_mask(77, first_row, rows, cols, 0.3, got.data_ptr(), 1, 1, 2)
    assert torch.equal(got, reference.dropout_mask(77, (rows, cols), 0.3, first_row=first_row))
    assert bool(_dropout.keep_mask(torch.tensor([3]), (5, 7), 0.0).all())


def test_mask_definition_four_decisions_per_philox_call():
    """reference.dropout_mask, written out: element (i, j) is word j % 4 of Philox at i * ceil(cols / 4) + j // 4
    (the first word is tl.rand's draw), so columns past a row's end never shift the next row."""
    seed, rows, cols = 1234, 3, 10
    mask = reference.dropout_mask(seed, (rows, cols), 0.5)
    for i in range(rows):
        for j in range(cols):
            counter = torch.tensor([i * 3 + j // 4])
            uniform = reference.uniform_from_words(reference.philox_words(seed, counter)[0, j % 4])
            assert bool(mask[i, j]) == bool(uniform >= 0.5), (i, j)
        assert torch.equal(reference.philox_uniform(seed, torch.tensor([i * 3])),
                           reference.uniform_from_words(reference.philox_words(seed, torch.tensor([i * 3]))[:, 0]))
    keep = reference.dropout_mask(seed, (512, 512), 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.01


def test_cpu_mask_rejects_bad_arguments():
    module = _cpu_module()
    out = torch.empty(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="p must be in"):
        module.dropout_keep_mask(1, 0, 1, 4, 1.0, out.data_ptr(), 1, 1, 1)
    with pytest.raises(ValueError, match="word_bytes"):
        module.dropout_keep_mask(1, 0, 1, 4, 0.5, out.data_ptr(), 3, 1, 1)
    with pytest.raises(ValueError, match="null output"):
        module.dropout_keep_mask(1, 0, 1, 4, 0.5, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="must be >= 0"):
        module.dropout_keep_mask(1, 0, -1, 4, 0.5, out.data_ptr(), 1, 1, 1)
    with pytest.raises(ValueError, match="not available"):
        module.use_simd("sse9")


def test_fallback_without_the_extension_gives_the_same_mask(monkeypatch):
    expected = _dropout.keep_mask(torch.tensor([99]), (17, 33), 0.25, torch.float32)
    monkeypatch.setattr(_dropout, "_cpu_kernels", lambda: None)
    assert torch.equal(_dropout.keep_mask(torch.tensor([99]), (17, 33), 0.25, torch.float32), expected)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16])
def test_triton_mask_kernel_matches_reference(dtype):
    # The torch backend's mask on CUDA tensors: on a GPU there, else through Triton's interpreter on CPU
    # tensors (conftest switches it on when no GPU is visible).
    from peftkern.triton_kernels.dropout import dropout_keep_mask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed, shape in [(5, (1, 1)), (2**40 + 3, (3, 1500)), (-5, (0, 4)), (9, (17, 33))]:
        got = dropout_keep_mask(torch.tensor([seed], device=device), shape, 0.3, dtype)
        assert got.device.type == device
        assert torch.equal(got.cpu(), reference.dropout_mask(seed, shape, 0.3).to(dtype)), (seed, shape)


def _helper_kernel():
    """A kernel storing ``_common.dropout_keep`` (any columns) and ``dropout_keep_tile`` (columns from a multiple
    of 4) over one tile; built on first use, the helpers set among this module's globals for Triton."""
    import triton
    import triton.language as tl

    from peftkern.triton_kernels import _common

    globals().update(dropout_keep=_common.dropout_keep, dropout_keep_tile=_common.dropout_keep_tile)

    @triton.jit
    def keep_kernel(SEED, GENERAL, TILE, row0, col0, n_cols, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        at = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        seed = tl.load(SEED)
        tl.store(GENERAL + at, dropout_keep(seed, rows, cols, n_cols, p).to(tl.int8))  # noqa: F821
        tl.store(TILE + at, dropout_keep_tile(seed, rows, col0, n_cols, p, BLOCK_N).to(tl.int8))  # noqa: F821

    return keep_kernel


@pytest.mark.parametrize("row0, col0, n_cols", [(0, 0, 64), (3, 4, 33), (2**31 // 9, 8, 37)])
def test_triton_keep_helpers_match_reference(row0, col0, n_cols):
    # The fused kernels' inline mask (and what the QLoRA kernels import): a tile of the [*, n_cols] mask,
    # columns past n_cols included (masked by the callers' stores).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    general = torch.empty(4, 32, dtype=torch.int8, device=device)
    tile = torch.empty_like(general)
    _helper_kernel()[(1,)](torch.tensor([21], device=device), general, tile, row0, col0, n_cols, 0.4,
                           BLOCK_M=4, BLOCK_N=32)
    # The spec written out for these rows and columns (columns past n_cols follow the same formula).
    groups = -(-n_cols // 4)
    cols = col0 + torch.arange(32)
    words = reference.philox_words(21, torch.arange(row0, row0 + 4)[:, None] * groups + cols[None, :] // 4)
    expected = reference.uniform_from_words(words.gather(-1, (cols % 4).expand(4, 32)[..., None])[..., 0]) >= 0.4
    inside = max(0, min(32, n_cols - col0))
    mask = reference.dropout_mask(21, (4, n_cols), 0.4, first_row=row0)
    assert torch.equal(expected[:, :inside], mask[:, col0:col0 + inside])
    assert torch.equal(general.cpu().bool(), expected)
    assert torch.equal(tile.cpu().bool(), expected)


def test_traced_calls_take_the_custom_op_and_record_a_faithful_graph():
    # make_fx records what a call does; the C++ kernel's writes would be invisible to it, so traced and fake
    # calls draw the mask with the reference's torch ops and go through the custom op.
    from torch.fx.experimental.proxy_tensor import make_fx

    import peftkern

    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    lora_a, lora_b = torch.randn(2, 8), torch.randn(6, 2)
    seed = torch.tensor([7])

    def call(x, weight, lora_a, lora_b, seed):
        return peftkern.lora_linear(x, weight, None, lora_a, lora_b, 0.5, 0.25, seed=seed, backend="torch")

    expected = call(x, weight, lora_a, lora_b, seed)
    for mode in ("real", "fake"):
        graph = make_fx(call, tracing_mode=mode)(x, weight, lora_a, lora_b, seed)
        assert "peftkern.lora_linear" in str(graph.code), mode
        assert torch.equal(graph(x, weight, lora_a, lora_b, seed), expected), mode


def test_eager_path_has_no_double_backward_and_vmap_takes_the_custom_op():
    import peftkern

    x = torch.randn(4, 8, requires_grad=True)
    weight, lora_b = torch.randn(6, 8), torch.randn(6, 2, requires_grad=True)
    lora_a = torch.randn(2, 8, requires_grad=True)
    y = peftkern.lora_linear(x, weight, None, lora_a, lora_b, 2.0, backend="torch")
    (grad_b,) = torch.autograd.grad(y.sum(), lora_b, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        torch.autograd.grad(grad_b.sum(), lora_a)
    batched = torch.func.vmap(lambda row: peftkern.lora_linear(row, weight, None, lora_a, lora_b, 2.0,
                                                               backend="torch"))(x.detach()[:, None])
    plain = peftkern.lora_linear(x.detach(), weight, None, lora_a, lora_b, 2.0, backend="torch")
    torch.testing.assert_close(batched[:, 0], plain)
