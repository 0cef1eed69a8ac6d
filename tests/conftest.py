"""Test set-up shared by every test module.

Triton runs on CPU only through its interpreter, which reads TRITON_INTERPRET when triton is imported:
set it here, before anything imports triton, when no GPU is visible (``make test`` sets it too).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with `make gpu-test` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full precision for the test (the float64 comparisons assume it), restored after."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# Property-based tests: a bounded profile for CI (the default) and a long one for `make fuzz`.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the fuzz tests import it themselves
    pass
else:
    _suppress = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=_suppress)
    settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=_suppress)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
