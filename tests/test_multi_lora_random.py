"""multi_lora_linear property test: random batches on every backend and path against the reference.

Kept apart from test_multi_lora.py so each file stays within the interpreter's time budget.
"""

from __future__ import annotations

import pytest
import torch
from test_multi_lora import IMPL_IDS, IMPLS, _check, _problem


@pytest.mark.parametrize("backend,path", IMPLS, ids=IMPL_IDS)
def test_random_batches_match_reference(backend, path):
    """Property test: random sizes, slot counts, ranks and id patterns (fp32, outputs and all grads)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=10 if backend == "torch" else 3, deadline=None, derandomize=True)
    @hypothesis.given(st.data())
    def run(data):
        M = data.draw(st.integers(1, 24), label="M")
        L = data.draw(st.integers(1, 6), label="L")
        r_max = data.draw(st.sampled_from([1, 4, 8, 16, 24]), label="r_max")
        ranks = data.draw(st.lists(st.integers(0, r_max), min_size=L, max_size=L), label="ranks")
        ids = data.draw(st.lists(st.integers(-1, L - 1), min_size=M, max_size=M), label="ids")
        _check(_problem(M, L, r_max, ids, ranks), backend, path, torch.float32)

    run()
