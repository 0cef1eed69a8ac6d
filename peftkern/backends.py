"""Backend choice: ``"torch"`` | ``"triton"`` | ``"cuda"``.

Precedence: an explicit ``backend=`` argument > the innermost ``use_backend()`` context > the environment
variable ``PEFTKERN_BACKEND`` > the default for the tensor's device (CUDA tensors: the fastest measured
backend; CPU tensors: ``"torch"``). The choice is made in Python before an op is called, so
``torch.compile`` sees it as a constant.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("torch", "triton", "cuda")
# Measured default per op on CUDA tensors (benchmarks/results/). Ops not listed use DEFAULT_CUDA_BACKEND.
DEFAULT_CUDA_BACKEND = "triton"
DEFAULT_CUDA_BACKEND_PER_OP: dict[str, str] = {
    # The CUDA C++ bottleneck kernels have not been timed on a GPU yet: Triton until a benchmark says otherwise.
    "bottleneck_adapter": "triton",
    # The fused 4-bit Triton kernels (decode in the GEMM main loop) are not timed on a GPU yet against the torch
    # backend (dequantize once per call + cuBLAS): torch until benchmarks/bench_lora.py's 4-bit rows say otherwise.
    "lora_linear_4bit": "torch",
}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftkern_backend", default=None)


def _validate(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside this block on backend ``name`` (thread- and task-local)."""
    token = _override.set(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def triton_interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _load_cuda_extension() -> tuple[object | None, str]:
    """(the module peftkern._C or None, why not). Imported once; a failure is reported, never raised."""
    if importlib.util.find_spec("peftkern._C") is None:
        return None, (
            "the CUDA C++ extension peftkern._C is not built (no nvcc at install time, or "
            "PEFTKERN_NO_CUDA=1; reinstall with nvcc on PATH to build it)"
        )
    try:
        module = importlib.import_module("peftkern._C")
    except Exception as error:  # an unloadable binary must not break `import peftkern`
        return None, f"the CUDA C++ extension peftkern._C failed to load: {type(error).__name__}: {error}"
    return module, ""


def cuda_extension():
    """The loaded ``peftkern._C`` module; raises RuntimeError saying why when it cannot be used."""
    module, why = _load_cuda_extension()
    if module is None:
        raise RuntimeError(f"backend 'cuda' cannot run: {why}")
    return module


def cuda_backend_status() -> str:
    """Why the CUDA C++ backend can or cannot run here, in one line: "available: ..." / "unavailable: ..."."""
    module, why = _load_cuda_extension()
    if module is None:
        return f"unavailable: {why}"
    built = f"peftkern._C built for sm {module.cuda_archs} with CUDA runtime {module.cudart_version}"
    if not torch.cuda.is_available():
        torch_cuda = torch.version.cuda or "none (a CPU build of torch)"
        return f"unavailable: no CUDA device visible to torch (torch's CUDA: {torch_cuda}); {built}"
    return f"available: {built}, {torch.cuda.device_count()} device(s)"


def cuda_backend_available() -> bool:
    """Whether ``backend="cuda"`` can run here (extension loaded and a CUDA device visible)."""
    return cuda_backend_status().startswith("available")


@torch.compiler.assume_constant_result
def _current_override() -> str | None:
    # torch.compile cannot trace a ContextVar lookup (a graph break): it calls this at trace time and bakes
    # the answer in as a constant, as the module docstring promises.
    return _override.get()


def resolve_backend(device: torch.device, op: str, backend: str | None = None) -> str:
    """The backend an op runs on for tensors on ``device``; raises if it cannot run there."""
    if backend is not None:
        name = _validate(backend, "backend")
    elif _current_override() is not None:
        name = _current_override()
    elif os.environ.get("PEFTKERN_BACKEND"):
        name = _validate(os.environ["PEFTKERN_BACKEND"], "environment variable PEFTKERN_BACKEND")
    elif device.type == "cuda":
        name = DEFAULT_CUDA_BACKEND_PER_OP.get(op, DEFAULT_CUDA_BACKEND)
        if name == "cuda" and not cuda_backend_available():
            name = "triton"
        if name == "triton" and not _triton_installed():
            name = "torch"
    else:
        name = "torch"

    if name == "triton":
        if not _triton_installed():
            raise RuntimeError(f"{op}: backend 'triton' was chosen but triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                f"imported, to run the interpreter on CPU), got tensors on {device}"
            )
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_backend_available():
            raise RuntimeError(f"{op}: backend 'cuda' cannot run: {cuda_backend_status()}")
    return name


def describe_backend(device: torch.device, op: str, backend: str | None = None) -> str:
    """The backend ``resolve_backend`` picks, or "unavailable (why)": for the layers' ``extra_repr``."""
    try:
        return resolve_backend(device, op, backend)
    except (ValueError, RuntimeError) as error:
        return f"unavailable ({error})"
