"""Input checks and dtype rules shared by the ops. Each check raises before any kernel launch, naming the
argument and showing what was expected and what came."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def intermediate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """dtype of the small saved intermediates ([M, r] or [M, bottleneck]): fp32, or float64 for float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def autocast_inputs(x: object, *others: object) -> tuple:
    """Under ``torch.autocast``, cast x and ``others`` (the base layer's tensors; None passes) to the autocast
    dtype, as ``F.linear`` would; adapter weights are not passed and keep their dtype (fp32 adapters)."""
    # The meta device has no autocast state (asking raises): tensors there pass unchanged.
    if not isinstance(x, torch.Tensor) or x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
        return (x, *others)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (x, *others))


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """``value`` is a tensor of one of ``dtypes`` with ``ndim`` (or at least ``min_ndim``) dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_names(dtypes)}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int | None], meaning: str = "") -> None:
    """``value.shape`` equals ``expected`` (None matches any size)."""
    actual = tuple(value.shape)
    ok = len(actual) == len(expected) and all(e is None or a == e for a, e in zip(actual, expected))
    if not ok:
        sizes = ["*" if e is None else str(e) for e in expected]
        shown = "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"
        suffix = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}: expected shape {shown}{suffix}, got {actual}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(
                f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), "
                f"got one on {value.device}"
            )


def check_finite_scalar(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    # A chained comparison rather than math.isfinite: torch.compile traces it for symbolic floats too.
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def check_probability(name: str, value: object) -> float:
    value = check_finite_scalar(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value}")
    return value


def check_backend_dtypes(op: str, backend: str, **tensors: torch.Tensor | None) -> None:
    """The kernel backends compute in fp16, bf16 and fp32; float64 is for the torch backend (and tests)."""
    if backend == "torch":
        return
    for name, value in tensors.items():
        if value is not None and value.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {value.dtype}, which backend {backend!r} does not support "
                f"(expected one of {_names(KERNEL_DTYPES)}); use backend 'torch' for it"
            )


def host_check_default(check_ids: bool | None, device: torch.device) -> bool:
    """``check_ids`` as given, or by default: True on the CPU (reading values there costs nothing), False on
    CUDA (a host check would sync the device, and fails inside CUDA-graph capture)."""
    if check_ids is None:
        return device.type == "cpu"
    if not isinstance(check_ids, bool):
        raise TypeError(f"check_ids: expected a bool or None, got {type(check_ids).__name__}")
    return check_ids


def plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether this call runs plain eager on real tensors: not traced by dynamo, no dispatch mode (make_fx,
    FakeTensorMode, FlopCounter, ...), no functorch transform (vmap, grad) and no tensor subclass. Ops take
    their custom op (and draw masks with torch ops) otherwise, so what is traced is what runs."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
