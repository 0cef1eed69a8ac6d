"""Autotuning never times a config that would spill registers: each GEMM kernel's configs are pruned by the
launch's register budget (``triton_kernels/_common.register_budget``) before timing.

The budgets were fitted to ptxas on sm_90a (tests/_triton_compile.py, the static report); these tests check
the wiring and that the pruning leaves every launch a config, and the fast 16-bit tiles where they fit. No
compiling: the config lists are the GPU ones (built with the interpreter switched off).
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture
def gpu_lists(monkeypatch):
    """The config lists as a GPU gets them: gemm_configs (plain and wide), the multi-LoRA decode and prefill
    lists, the LoRA dX list and the bottleneck row kernels'."""
    import importlib
    import pkgutil

    from peftkern import triton_kernels
    from peftkern.triton_kernels import _common, bottleneck, lora, multi_lora

    # Every kernel module imported first: one imported while the switch is off would build its kernels'
    # GPU config lists, and the interpreter would then time them.
    for module in pkgutil.iter_modules(triton_kernels.__path__):
        importlib.import_module(f"{triton_kernels.__name__}.{module.name}")
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(multi_lora, "interpreting", lambda: False)
    monkeypatch.setattr(lora, "interpreting", lambda: False)
    monkeypatch.setattr(bottleneck, "interpreting", lambda: False)
    return {"gemm": _common.gemm_configs(), "wide": _common.gemm_configs(wide=True),
            "decode": multi_lora._decode_configs(), "dense": multi_lora._dense_configs(), "dx": lora._dx_configs(),
            "bottleneck": bottleneck._configs()}


def _shape(config) -> tuple[int, int, int, int]:
    meta = config.kwargs
    return meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], config.num_warps


def _kernels():
    """(kernel, config list name, {switch: values}) for every GEMM kernel with a register budget."""
    from peftkern.triton_kernels import bottleneck, lora, multi_lora

    both, precisions = (False, True), ("tf32x3", "tf32")
    return [
        (lora._lora_fwd_kernel, "wide", {"BASE_FP32": both, "PRECISION": precisions}),
        (lora._lora_bwd_dx_kernel, "dx",
         {"BASE_FP32": both, "LORA_FP32": both, "HAS_DROPOUT": both, "PRECISION": precisions}),
        (multi_lora._multi_lora_fused_decode_kernel, "decode", {"BASE_FP32": both, "PRECISION": precisions}),
        (multi_lora._multi_lora_fused_segment_kernel, "dense",
         {"BASE_FP32": both, "EXPAND_FP32": both, "PRECISION": precisions}),
        *[(kernel, "bottleneck", {"DOT_FP32": both, "PRECISION": precisions})
          for kernel in (bottleneck._bottleneck_down_kernel, bottleneck._bottleneck_up_kernel,
                         bottleneck._bottleneck_bwd_dh_kernel, bottleneck._bottleneck_bwd_dx_kernel)],
    ]


def _pruned(kernel, configs, switches):
    return kernel.early_config_prune(configs, {}, **switches)


def test_every_launch_keeps_a_config_within_its_budget(gpu_lists):
    from peftkern.triton_kernels._common import TileBudget

    for kernel, name, values in _kernels():
        configs = gpu_lists[name]
        for combination in itertools.product(*values.values()):
            switches = dict(zip(values, combination))
            kept = _pruned(kernel, configs, switches)
            assert kept, (kernel.base_fn.__name__, switches)
            assert all(c in configs for c in kept)
            # Within the budget, not the fallback (the smallest tile of a list none of which fits).
            budget = kernel.early_config_prune.budget(switches)
            assert isinstance(budget, TileBudget)
            assert all(budget.fits(c) for c in kept), (kernel.base_fn.__name__, switches, budget)
            assert [c for c in configs if budget.fits(c)] == kept


def test_fast_16bit_tiles_survive(gpu_lists):
    from peftkern.triton_kernels import bottleneck, lora

    plain = {"BASE_FP32": False, "PRECISION": "tf32x3"}
    for kernel, switches, name in [(lora._lora_fwd_kernel, plain, "wide"),
                                   (lora._lora_bwd_dx_kernel, {**plain, "LORA_FP32": False, "HAS_DROPOUT": False},
                                    "dx")]:
        shapes = {_shape(c) for c in _pruned(kernel, gpu_lists[name], switches)}
        assert {(128, 256, 64, 8), (128, 128, 64, 8)} <= shapes, kernel.base_fn.__name__
    # Dropout's mask beside the tile: 128 x 256 spilled; 128 x 128 with 8 warps does not.
    dropout = {**plain, "LORA_FP32": False, "HAS_DROPOUT": True}
    shapes = {_shape(c) for c in _pruned(lora._lora_bwd_dx_kernel, gpu_lists["dx"], dropout)}
    assert (128, 128, 64, 8) in shapes and (128, 256, 64, 8) not in shapes
    shapes = {_shape(c) for c in _pruned(bottleneck._bottleneck_up_kernel, gpu_lists["bottleneck"],
                                         {"DOT_FP32": False, "PRECISION": "tf32x3"})}
    assert (128, 128, 64, 8) in shapes and (128, 128, 64, 4) not in shapes


def test_fp32_split_keeps_small_tiles_only(gpu_lists):
    from peftkern.triton_kernels import lora

    kept = _pruned(lora._lora_fwd_kernel, gpu_lists["wide"], {"BASE_FP32": True, "PRECISION": "tf32x3"})
    assert {_shape(c) for c in kept} == {(64, 64, 64, 4), (32, 64, 64, 4)}
    # Plain TF32 does not split: the 64-value accumulators stay.
    kept = _pruned(lora._lora_fwd_kernel, gpu_lists["wide"], {"BASE_FP32": True, "PRECISION": "tf32"})
    assert (128, 128, 64, 8) in {_shape(c) for c in kept}


def test_the_fallback_is_the_smallest_tile():
    import triton

    from peftkern.triton_kernels._common import TileBudget, fitting_configs

    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)
    assert fitting_configs([big, small], TileBudget(16)) == [small]
    assert fitting_configs([big, small], TileBudget(128)) == [big, small]
    assert fitting_configs([big, small], TileBudget(128, operands=64)) == [small]


def test_dx_row_tiles_bound_the_db_workspace(gpu_lists):
    """The dX kernel writes one fp32 partial of dB per row block, into a workspace sized for
    ``_dx_min_rows()`` rows: no config may have fewer (it would write past the workspace), and the
    forward's small-row tiles are the ones left out."""
    from peftkern.triton_kernels import lora

    rows = {c.kwargs["BLOCK_M"] for c in gpu_lists["dx"]}
    assert min(rows) == lora._dx_min_rows() == 64
    assert all(c.kwargs["BLOCK_M"] // c.num_warps <= 16 for c in gpu_lists["dx"])  # rank-r tiles per warp
    assert {c.kwargs["BLOCK_M"] for c in gpu_lists["wide"]} - rows == {16, 32}
