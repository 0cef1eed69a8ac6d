"""The CUDA C++ launchers of the batched multi-LoRA linear: the same signatures and return conventions as
``peftkern.triton_kernels.multi_lora``'s, calling the header-only kernels of
``csrc/include/peftkern/multi_lora.cuh`` through ``peftkern._C`` with raw device addresses on torch's current
stream.

Outputs and the workspace (the device-built segment table, dS, partial sums) are allocated here with torch,
their sizes from the shapes alone; the extension only launches kernels. Nothing reads the ids on the host,
so a step captures in a CUDA graph.
"""

from __future__ import annotations

import torch

from ..backends import cuda_extension
from ._cuda import _adapter_code, _dtype_code, _launch_context, _linear_codes, _strides

__all__ = ["PATHS", "multi_lora_forward", "multi_lora_backward", "build_segments", "lora_shrink",
           "lora_expand_add"]

PATHS = ("auto", "decode", "prefill")  # codes 0, 1, 2 of peftkern::MultiLoraPath


def _path_code(path: str) -> int:
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    return PATHS.index(path)


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return int(t.stride(0)), int(t.stride(1)), int(t.stride(2))


def _ids(adapter_ids: torch.Tensor, M: int) -> tuple[torch.Tensor, bool]:
    """adapter_ids as a contiguous [M] int32 or int64 tensor, and whether it is int64."""
    ids = adapter_ids.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids: expected int32 or int64, got {ids.dtype}")
    if ids.numel() != M:
        raise ValueError(f"adapter_ids: expected {M} ids (one per row of x), got {ids.numel()}")
    return ids.contiguous(), ids.dtype == torch.int64


def _adapter_meta(scalings: torch.Tensor, ranks: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scalings as contiguous fp32 [L], ranks as contiguous int32 [L] (device casts: no host sync)."""
    if scalings.shape != (L,) or ranks.shape != (L,):
        raise ValueError(
            f"scalings, ranks: expected [{L}] each, got {tuple(scalings.shape)} and {tuple(ranks.shape)}"
        )
    return scalings.to(torch.float32).contiguous(), ranks.to(torch.int32).contiguous()


def _table(ext, segments) -> tuple[int, int, int, int]:
    """(perm, bounds, tiles, n_tiles) addresses of a prebuilt segment table (the kernels' 64-row tiles), or
    zeros for none."""
    if segments is None:
        return 0, 0, 0, 0
    if segments.block_m != ext.MULTI_LORA_SEGMENT_ROWS:
        raise ValueError(
            f"segments: expected a table of {ext.MULTI_LORA_SEGMENT_ROWS}-row tiles (the CUDA kernels'), got "
            f"{segments.block_m}-row tiles"
        )
    return segments.perm.data_ptr(), segments.bounds.data_ptr(), segments.tiles.data_ptr(), segments.tiles.shape[1]


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    # torch's caching allocator hands out 512-byte aligned blocks: the 256-byte alignment the kernels need.
    return torch.empty(nbytes, device=device, dtype=torch.uint8)


def multi_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    path: str = "auto",
    segments=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (Y [M, N] in x's dtype, S [M, R] fp32, unscaled, zero past each row's rank).

    x: [M, K] any strides; weight [N, K]; lora_a [L, R, K]; lora_b [L, N, R]; adapter_ids [M] int32/int64;
    scalings [L]; ranks [L]. ``path``: "auto" | "decode" | "prefill". Inputs already checked by the op.
    ``segments``: the ids' table with 64-row tiles (``triton_kernels._segments.Segments``, a LoRABatch's)
    when built once for every layer; None: the kernels build it in the workspace.
    """
    ext = cuda_extension()
    code = _path_code(path)
    M, K = x.shape
    N = weight.shape[0]
    L, R = lora_a.shape[:2]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, s
    dtype, adapter, bias = _linear_codes(ext, x, weight, bias, lora_a, lora_b)
    ids, ids_int64 = _ids(adapter_ids, M)
    scalings, ranks = _adapter_meta(scalings, ranks, L)
    workspace_bytes = ext.multi_lora_forward_workspace_bytes(M, N, K, L, code)
    workspace = _workspace(workspace_bytes, x.device)
    with torch.cuda.device(x.device):
        device, stream = _launch_context(x)
        ext.multi_lora_forward(
            dtype, adapter,
            x.data_ptr(), _strides(x),
            weight.data_ptr(), _strides(weight),
            bias.data_ptr() if bias is not None else 0, int(bias.stride(0)) if bias is not None else 0,
            lora_a.data_ptr(), _strides3(lora_a),
            lora_b.data_ptr(), _strides3(lora_b),
            ids.data_ptr(), ids_int64, scalings.data_ptr(), ranks.data_ptr(),
            s.data_ptr(), y.data_ptr(), _strides(y),
            workspace.data_ptr(), workspace_bytes,
            M, N, K, L, R, code, device, stream, *_table(ext, segments),
        )
    return y, s


def multi_lora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    s: torch.Tensor,
    need_dx: bool,
    path: str = "auto",
    segments=None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (dX [M, K] or None, dA [L, R, K], dB [L, N, R]) in the dtypes of x, A and B.

    grad_y: [M, N]; s: [M, R] fp32 from the forward. Each adapter's dA/dB sums only its own rows, in a fixed
    order (deterministic); slots no row uses get zeros, and so does everything past each adapter's rank.
    dW and db are left to the caller. ``segments``: as in :func:`multi_lora_forward`.
    """
    ext = cuda_extension()
    code = _path_code(path)
    M, K = x.shape
    N = weight.shape[0]
    L, R = lora_a.shape[:2]
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else None
    if M == 0:
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    dtype, adapter, _ = _linear_codes(ext, x, weight, None, lora_a, lora_b)
    grad_y = grad_y.to(x.dtype)
    if s.dtype != torch.float32 or tuple(s.shape) != (M, R):
        raise ValueError(
            f"s: expected a float32 [{M}, {R}] tensor from the forward, got {s.dtype} {tuple(s.shape)}"
        )
    s = s.contiguous()  # the kernels read s with row stride R
    ids, ids_int64 = _ids(adapter_ids, M)
    scalings, ranks = _adapter_meta(scalings, ranks, L)
    grad_a = torch.empty(lora_a.shape, device=x.device, dtype=lora_a.dtype)
    grad_b = torch.empty(lora_b.shape, device=x.device, dtype=lora_b.dtype)
    workspace_bytes = ext.multi_lora_backward_workspace_bytes(M, N, K, L, R, code)
    workspace = _workspace(workspace_bytes, x.device)
    with torch.cuda.device(x.device):
        device, stream = _launch_context(x)
        ext.multi_lora_backward(
            dtype, adapter,
            grad_y.data_ptr(), _strides(grad_y),
            x.data_ptr(), _strides(x),
            weight.data_ptr(), _strides(weight),
            lora_a.data_ptr(), _strides3(lora_a),
            lora_b.data_ptr(), _strides3(lora_b),
            ids.data_ptr(), ids_int64, scalings.data_ptr(), ranks.data_ptr(),
            s.data_ptr(),
            dx.data_ptr() if dx is not None else 0, _strides(dx) if dx is not None else (0, 0),
            grad_a.data_ptr(), grad_b.data_ptr(),
            workspace.data_ptr(), workspace_bytes,
            M, N, K, L, R, code, device, stream, *_table(ext, segments),
        )
    return dx, grad_a, grad_b


def build_segments(adapter_ids: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA kernels' segment table of ``adapter_ids`` [M]: (perm [M], bounds [2, L + 1], tiles [3, n_tiles]),
    int64, laid out as ``triton_kernels.multi_lora.build_segments``'s with 64-row tiles. For tests."""
    ext = cuda_extension()
    M, L = adapter_ids.numel(), num_adapters
    ids, ids_int64 = _ids(adapter_ids, M)
    device = adapter_ids.device
    perm = torch.empty(M, device=device, dtype=torch.int64)
    bounds = torch.empty((2, L + 1), device=device, dtype=torch.int64)
    tiles = torch.empty((3, ext.multi_lora_segment_tiles(M, L)), device=device, dtype=torch.int64)
    workspace_bytes = ext.multi_lora_segments_workspace_bytes(M, L)
    workspace = _workspace(workspace_bytes, device)
    with torch.cuda.device(device):
        device_index, stream = _launch_context(ids)
        ext.multi_lora_segments(ids.data_ptr(), ids_int64, M, L, workspace.data_ptr(), workspace_bytes,
                                perm.data_ptr(), bounds.data_ptr(), tiles.data_ptr(), device_index, stream)
    return perm, bounds, tiles


# ---- the serving pieces (csrc/include/peftkern/lora_serving.cuh) -------------------------------------------

MAX_SLICES = 8  # peftkern::kMaxLoraSlices: longer lists run in groups of this many


def _slice_groups(slices: list[torch.Tensor]) -> list[tuple[int, list[torch.Tensor]]]:
    return [(start, slices[start:start + MAX_SLICES]) for start in range(0, len(slices), MAX_SLICES)]


def lora_shrink(
    x: torch.Tensor,
    slices: list[torch.Tensor],
    adapter_ids: torch.Tensor,
    ranks: torch.Tensor,
    segments: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """s [n, M, R] fp32: s[j] = the shrink of slice j (A_j [L, R, K], any strides). ``segments``: (perm, tiles)
    of the ids' 64-row segment table (the prefill kernels), or None (the decode kernel). Inputs checked."""
    ext = cuda_extension()
    M, K = x.shape
    L, R = slices[0].shape[:2]
    s = torch.empty((len(slices), M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return s
    dtype, adapter = _dtype_code(ext, x.dtype, "x"), _adapter_code(ext, x, slices[0], slices[0])
    ids, ids_int64 = _ids(adapter_ids, M)
    ranks = ranks.to(torch.int32).contiguous()
    perm, tiles = segments if segments is not None else (None, None)
    n_tiles = tiles.shape[1] if tiles is not None else 0
    with torch.cuda.device(x.device):
        device, stream = _launch_context(x)
        for start, group in _slice_groups(slices):
            ext.lora_shrink(
                dtype, adapter, x.data_ptr(), _strides(x), [(t.data_ptr(), _strides3(t)) for t in group],
                ids.data_ptr(), ids_int64, perm.data_ptr() if perm is not None else 0,
                tiles.data_ptr() if tiles is not None else 0, n_tiles, ranks.data_ptr(), s[start].data_ptr(),
                M, K, L, R, device, stream,
            )
    return s


def lora_expand_add(
    y: torch.Tensor,
    s: torch.Tensor,
    slices: list[torch.Tensor],
    adapter_ids: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    offset: int,
) -> None:
    """y[:, o_j : o_j + N_j] += the expand of slice j (B_j [L, N_j, R]) from s[j], in place; s [n, M, R]
    (made fp32 contiguous here). Inputs checked."""
    ext = cuda_extension()
    M = y.shape[0]
    L, _, R = slices[0].shape
    if M == 0:
        return
    dtype, adapter = _dtype_code(ext, y.dtype, "y"), _adapter_code(ext, y, slices[0], slices[0])
    ids, ids_int64 = _ids(adapter_ids, M)
    s = s.to(torch.float32).contiguous()
    scalings, ranks = _adapter_meta(scalings, ranks, L)
    with torch.cuda.device(y.device):
        device, stream = _launch_context(y)
        column = offset
        for start, group in _slice_groups(slices):
            ext.lora_expand_add(
                dtype, adapter, y.data_ptr(), _strides(y), s[start].data_ptr(),
                [(t.data_ptr(), _strides3(t)) for t in group], [t.shape[1] for t in group], ids.data_ptr(),
                ids_int64, ranks.data_ptr(), scalings.data_ptr(), column, M, L, R, device, stream,
            )
            column += sum(t.shape[1] for t in group)
