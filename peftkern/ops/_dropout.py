"""The torch backend's dropout keep-mask: ``reference.dropout_mask``'s values, computed fast.

The mask is regenerated from its seed in backward, never stored, so drawing it is on the hot path twice per
step. The reference draws Philox in int64 torch ops (about a hundred passes over [M, K]); here the CPU uses
``peftkern._cpu`` (vectorised C++, the same bits), CUDA tensors a Triton kernel (``tl.rand``, the same bits),
and anything else, or a build without ``peftkern._cpu``, the reference itself.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .. import reference

__all__ = ["cpu_kernels_available", "keep_mask"]


@functools.cache
def _cpu_kernels():
    try:
        return importlib.import_module("peftkern._cpu")
    except ImportError:
        return None


def cpu_kernels_available() -> bool:
    """Whether ``peftkern._cpu`` (the CPU dropout kernel) was built and loads."""
    return _cpu_kernels() is not None


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


# One thread: right after a matmul torch's OpenMP workers still spin on the other cores, and a second thread
# of ours competes with them (measured on 2 cores: 0.53 ms alone vs 3 ms with two threads for 512K elements).
_CPU_MASK_THREADS = 1

# The bits of 1 in each mask dtype the CPU kernel writes (the mask holds them where kept, 0 where dropped).
_ONE_BITS = {
    torch.bool: 1,
    torch.float16: 0x3C00,
    torch.bfloat16: 0x3F80,
    torch.float32: 0x3F800000,
    torch.float64: 0x3FF0000000000000,
}


def keep_mask(seed: torch.Tensor, shape: tuple[int, int], p: float, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Keep-mask [rows, cols] on ``seed``'s device, equal to ``reference.dropout_mask(seed, shape, p)``, as
    ``dtype`` (bool, or 0/1 in a floating dtype so that ``x * mask`` needs no conversion pass).

    ``seed``: a 1-element int64 tensor. On CPU its value is read (free there); on CUDA it stays on the device.
    """
    device = seed.device
    if device.type == "cpu" and dtype in _ONE_BITS and _cpu_kernels() is not None:
        keep = torch.empty(shape, dtype=dtype)
        _cpu_kernels().dropout_keep_mask(
            int(seed.reshape(())) & (2**64 - 1), 0, keep.numel(), float(p), keep.data_ptr(), keep.element_size(),
            _ONE_BITS[dtype], _CPU_MASK_THREADS,
        )
        return keep
    if device.type == "cuda" and _triton_available():
        from ..triton_kernels.dropout import dropout_keep_mask

        return dropout_keep_mask(seed.reshape(1), shape, p, dtype)
    return reference.dropout_mask(seed, shape, p, device=device).to(dtype)
