"""The torch backend's dropout keep-mask: ``reference.dropout_mask``'s values, computed fast.

The mask is regenerated from its seed in backward, never stored, so drawing it is on the hot path twice per
step. The reference draws Philox in int64 torch ops (about a hundred passes over [M, K / 4]); here the CPU
uses ``peftkern._cpu`` (vectorised C++, the same bits), CUDA tensors a Triton kernel (``tl.randint4x``, the
same bits), and anything else, or a build without ``peftkern._cpu``, the reference itself.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .. import reference
from ._checks import plain_eager

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


# Right after a matmul torch's OpenMP workers still spin on the other cores for a while, and threads of ours
# compete with them (2 cores, 512K elements: 0.53 ms on one thread, 3 ms on two). So a thread per 4M elements
# (about 4 ms of work each), up to torch's thread count.
_ELEMENTS_PER_THREAD = 1 << 22


def cpu_threads(numel: int) -> int:
    """Threads for a peftkern._cpu kernel over ``numel`` elements (the keep-mask, the 4-bit dequantize)."""
    return max(1, min(torch.get_num_threads(), numel // _ELEMENTS_PER_THREAD))


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
    # The C++ kernel writes through the mask's address, which nothing traced would see: traced or fake calls
    # (make_fx, FakeTensorMode, functorch) and meta tensors draw with the reference's torch ops.
    if not plain_eager(seed) or device.type == "meta":
        return reference.dropout_mask(seed, shape, p, device=device).to(dtype)
    if device.type == "cpu" and dtype in _ONE_BITS and _cpu_kernels() is not None:
        keep = torch.empty(shape, dtype=dtype)
        _cpu_kernels().dropout_keep_mask(
            int(seed.reshape(())) & (2**64 - 1), 0, shape[0], shape[1], float(p), keep.data_ptr(),
            keep.element_size(), _ONE_BITS[dtype], cpu_threads(shape[0] * shape[1]),
        )
        return keep
    if device.type == "cuda" and _triton_available():
        from ..triton_kernels.dropout import dropout_keep_mask

        return dropout_keep_mask(seed.reshape(1), shape, p, dtype)
    return reference.dropout_mask(seed, shape, p, device=device).to(dtype)
