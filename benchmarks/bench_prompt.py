"""Prompt concatenation (prompt tuning's model input) against the baselines a user would run (issue 6).

Every provider builds, from input_ids [B, T] into a frozen embedding table [V, D], soft prompts [P, n, D]
(trainable) and per-row tasks prompt_ids [B], the three tensors the model gets: inputs_embeds [B, n+T, D]
(each row's prompt, then its token embeddings), the attention mask [B, n+T] (ones over the prompt) and the
labels [B, n+T] (-100 over the prompt). Providers:
  peft_style      what peft's PeftModelForCausalLM.forward does for prompt tuning (peft_model.py), with the
                  per-row task folded into the prompt-token ids: the word embedding, the prompt tokens
                  expanded over the batch (built on the host and copied over each call, as peft does) and
                  looked up in the prompt embedding, torch.cat of prompts and embeddings, and the mask and
                  label prefixes built on the host, copied over and concatenated
  torch_compile   torch.compile of peftkern.reference.prompt_concat (static shapes, compiled per case)
  triton          peftkern.prompt_concat(..., backend="triton", check_ids=False)
  cuda            peftkern.prompt_concat(..., backend="cuda", check_ids=False) when that backend runs it
Ours run with ``check_ids=False``, the serving setting: the id range check is a host sync, and no
baseline checks ids either.

Sweep: B {1, 8, 64, 256} x T {128, 1024, 4096} x n {8, 32, 128}, D 4096, V 32000, P 8 tasks (random
per-row task ids), bf16 embeddings and prompts, int64 ids, mask and labels; modes forward and backward
(the gradient of the prompts; the embedding table is frozen). Every provider's three outputs are checked
against the reference (an exact copy) before it is timed.

The op is memory-bound: each row carries ``bytes_moved`` (the bytes the op must read and write; see
:func:`bytes_moved`) and, with ``add_bandwidth_ratios``, ``ratios["vs_floor"]`` and
``ratios["bandwidth_fraction"]`` against the device-to-device copy bandwidth measured in the same run.
The summary keys are taken in forward mode at B 64, T 1024, n 32. ``--smoke``: one tiny case on CPU
(Triton through its interpreter; torch.compile left out unless ``--smoke-compile``).

    python3 benchmarks/bench_prompt.py                       # the full sweep (GPU)
    python3 benchmarks/bench_prompt.py --headline            # B 64, T 1024, n 32 only
    python3 benchmarks/bench_prompt.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import harness
import torch
import torch.nn.functional as F

OP = "prompt"
BATCH = (1, 8, 64, 256)
TOKENS = (128, 1024, 4096)
VIRTUAL = (8, 32, 128)
HIDDEN = 4096
VOCAB = 32000  # Llama's
TASKS = 8
MODES = ("forward", "backward")  # issue 6 asks for these; --modes can narrow them further
HEADLINE = {"batch": 64, "tokens": 1024, "virtual_tokens": 32}
SMOKE = {"batch": 3, "tokens": 8, "virtual_tokens": 4, "hidden": 32, "vocab": 64, "tasks": 2}
IGNORE_INDEX = -100
ID_BYTES = 8  # int64 input_ids, prompt_ids, attention mask and labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headline", action="store_true", help=f"only the headline shape {HEADLINE}")
    parser.add_argument("--batch", default=None, help="comma-separated subset of the batch sizes B")
    parser.add_argument("--tokens", default=None, help="comma-separated subset of the sequence lengths T")
    parser.add_argument("--virtual", default=None, help="comma-separated subset of the prompt lengths n")
    parser.add_argument("--smoke-compile", action="store_true", help="time torch.compile in --smoke too")


def cases(bench: harness.Bench) -> list[dict]:
    """Shapes dicts in run order: batch, tokens (T), virtual_tokens (n), hidden, vocab, tasks."""
    fixed = {"hidden": HIDDEN, "vocab": VOCAB, "tasks": TASKS}
    if bench.smoke:
        return [dict(SMOKE)]
    opts = bench.options
    if getattr(opts, "headline", False):
        return [{**HEADLINE, **fixed}]
    batch = harness.pick(getattr(opts, "batch", None), BATCH, int)
    tokens = harness.pick(getattr(opts, "tokens", None), TOKENS, int)
    virtual = harness.pick(getattr(opts, "virtual", None), VIRTUAL, int)
    return [
        {"batch": b, "tokens": t, "virtual_tokens": n, **fixed} for b, t, n in itertools.product(batch, tokens, virtual)
    ]


def bytes_moved(shapes: dict, element_bytes: int, distinct_tasks: int) -> dict[str, int]:
    """The bytes each mode must move at the least (the memory-bound floor's numerator).

    forward: read every token's embedding row, the prompt of each of the ``distinct_tasks`` tasks in the
    batch once, the ids, mask and labels; write inputs_embeds and the extended mask and labels. backward:
    read the prompt part of the upstream gradient and the task ids; write the gradient of the batch's
    prompts (the token part is not read: the table is frozen)."""
    batch, length, virtual = shapes["batch"], shapes["tokens"], shapes["virtual_tokens"]
    dim, tasks = shapes["hidden"], distinct_tasks
    total = virtual + length
    forward = (
        (batch * length + tasks * virtual) * dim * element_bytes  # embedding rows and prompts read
        + (batch * length * 3 + batch) * ID_BYTES  # input_ids, mask, labels, prompt_ids read
        + batch * total * dim * element_bytes  # inputs_embeds written
        + batch * total * 2 * ID_BYTES  # mask and labels written
    )
    backward = (batch * virtual * dim + tasks * virtual * dim) * element_bytes + batch * ID_BYTES
    return {"forward": forward, "backward": backward}


def _inputs(device: torch.device, shapes: dict, dtype: torch.dtype):
    """input_ids [B, T], a frozen table [V, D], prompts [P, n, D] (requires grad), prompt_ids [B] (random
    tasks), an attention mask [B, T] with some left padding, labels [B, T] (int64)."""
    batch, length, virtual = shapes["batch"], shapes["tokens"], shapes["virtual_tokens"]
    vocab, dim, tasks = shapes["vocab"], shapes["hidden"], shapes["tasks"]
    input_ids = torch.randint(0, vocab, (batch, length), device=device)
    embed_weight = torch.randn(vocab, dim, device=device, dtype=dtype)
    prompts = torch.randn(tasks, virtual, dim, device=device, dtype=dtype).requires_grad_(True)
    prompt_ids = torch.randint(0, tasks, (batch,), device=device)
    # Padding varies per row so that a provider that ignores the given mask fails the check.
    padding = torch.randint(0, max(1, length // 4), (batch, 1), device=device)
    attention_mask = (torch.arange(length, device=device)[None, :] >= padding).to(torch.int64)
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels


def _peft_style(input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels):
    """peft's prompt-tuning forward, written out (peft_model.py, PeftModelForCausalLM.forward/get_prompt)."""
    batch, virtual, device = input_ids.shape[0], prompts.shape[1], input_ids.device
    prefix_attention_mask = torch.ones(batch, virtual).to(device)
    attention_mask = torch.cat((prefix_attention_mask, attention_mask), dim=1)
    inputs_embeds = F.embedding(input_ids, embed_weight)
    prefix_labels = torch.full((batch, virtual), IGNORE_INDEX).to(device)
    labels = torch.cat((prefix_labels, labels), dim=1)
    # peft keeps arange(n) on the host and expands it over the batch; here each row's task picks its block
    # of the [P * n, D] prompt embedding (peft's own prompt encoder is one task's [n, D] table).
    prompt_tokens = torch.arange(virtual).unsqueeze(0).expand(batch, -1).to(device)
    prompt_tokens = prompt_tokens + prompt_ids[:, None] * virtual
    soft = F.embedding(prompt_tokens, prompts.reshape(-1, prompts.shape[-1])).to(inputs_embeds.dtype)
    inputs_embeds = torch.cat((soft, inputs_embeds), dim=1)
    return inputs_embeds, attention_mask, labels


def _check_mask_and_labels(provider: str, outputs, expected) -> None:
    """inputs_embeds is checked by the harness; the extended mask and labels here (values, any dtype)."""
    for name, got, want in (("attention_mask", outputs[1], expected[1]), ("labels", outputs[2], expected[2])):
        if tuple(got.shape) != tuple(want.shape) or not torch.equal(got.to(torch.int64), want.to(torch.int64)):
            raise harness.ProviderWrong(f"{OP}/{provider}: {name} differs from the reference's")



def run(bench: harness.Bench) -> None:
    torch.manual_seed(0)
    for shapes in cases(bench):
        _run_case(bench, shapes)
    bench.add_ratios("peft_style")
    bench.add_bandwidth_ratios()


def _run_case(bench: harness.Bench, shapes: dict) -> None:
    import peftkern
    from peftkern import reference
    from peftkern.backends import cuda_backend_available, cuda_backend_status, triton_interpreting

    device, dtype = bench.device, torch.bfloat16
    inputs = _inputs(device, shapes, dtype)
    prompts = inputs[2]
    distinct_tasks = int(torch.unique(inputs[3]).numel())  # setup, not timed: a host sync is fine here
    moved = bytes_moved(shapes, torch.finfo(dtype).bits // 8, distinct_tasks)
    with torch.no_grad():
        expected = reference.prompt_concat(*inputs)  # a gather: exact in bf16, checked with zero tolerance

    def checked(provider: str, full: Callable[[], tuple]):
        def build():
            if provider == "cuda":
                harness.require_cuda_kernel(full)
            with torch.no_grad():
                _check_mask_and_labels(provider, full(), expected)
            return (lambda: full()[0]), [prompts]

        return build

    def build_compile():
        if bench.smoke and device.type != "cuda" and not getattr(bench.options, "smoke_compile", False):
            raise harness.ProviderUnavailable(
                "left out of --smoke on CPU (inductor's CPU compile takes minutes); add --smoke-compile"
            )
        torch._dynamo.reset()  # one static-shape compile per case, never a silent eager fallback
        compiled = torch.compile(reference.prompt_concat, fullgraph=True)
        return checked("torch_compile", lambda: compiled(*inputs))()

    def build_ours(backend: str):
        def build():
            if backend == "triton" and device.type != "cuda" and not triton_interpreting():
                raise harness.ProviderUnavailable("triton needs a GPU or TRITON_INTERPRET=1")
            if backend == "cuda" and not cuda_backend_available():
                raise harness.ProviderUnavailable(cuda_backend_status())
            full = lambda: peftkern.prompt_concat(*inputs, backend=backend, check_ids=False)
            return checked(backend, full)()

        return build

    for provider, build in (
        ("peft_style", checked("peft_style", lambda: _peft_style(*inputs))),
        ("torch_compile", build_compile),
        ("triton", build_ours("triton")),
        ("cuda", build_ours("cuda")),
    ):
        bench.time_provider(
            provider, build, shapes, dtype, modes=MODES, bytes_moved=moved,
            expected=expected.inputs_embeds, tolerance=(0.0, 0.0),
        )


def ours(rows: list[dict]) -> str:
    """The backend peftkern picks for prompt_concat on CUDA tensors, where it was measured."""
    from peftkern.backends import DEFAULT_CUDA_BACKEND, DEFAULT_CUDA_BACKEND_PER_OP

    default = DEFAULT_CUDA_BACKEND_PER_OP.get("prompt_concat", DEFAULT_CUDA_BACKEND)
    measured = {row["provider"] for row in rows}
    return default if default in measured else "triton"


def summarize(rows: list[dict], smoke: bool) -> dict[str, float]:
    """issue 8's prompt keys in forward mode at the headline shape (the smoke case in --smoke):
    ``prompt_concat_speedup`` = peft_style time / ours (target >= 1.5) and
    ``prompt_concat_bandwidth_fraction`` = ours' bytes_moved per second / this run's D2D copy bandwidth
    (target >= 0.8)."""
    shapes = {k: SMOKE[k] for k in HEADLINE} if smoke else HEADLINE
    rows = harness.find_rows(rows, op=OP, dtype="bfloat16")
    sel = lambda provider: {"provider": provider, "mode": "forward", "shapes": shapes}
    mine = harness.find_row(rows, **sel(ours(rows)))
    return harness.drop_missing({
        "prompt_concat_speedup": harness.ratio_of(rows, sel("peft_style"), sel(ours(rows))),
        "prompt_concat_bandwidth_fraction": None if mine is None else mine["ratios"].get("bandwidth_fraction"),
    })


if __name__ == "__main__":
    harness.main(OP, run, summarize, add_arguments)
