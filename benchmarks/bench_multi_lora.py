"""Batched multi-LoRA: one linear layer serving (and training) a batch whose rows use different adapters,
against the baselines a user would run (issue 5).

A pool of L = ``adapters`` LoRA adapters on one frozen linear W [hidden, hidden] (no bias, as in Llama):
lora_a [L, r_max, hidden], lora_b [L, hidden, r_max], zero past each slot's rank, scaling alpha / r = 2.
The batch is a set of requests, each on its own adapter: a decode step (at most ``DECODE_TOKENS`` tokens)
has one token per request, the requests spread round-robin over the adapters; a prefill batch has
min(tokens, adapters) requests of equal length, each on a distinct adapter. Request order is shuffled, so
the ids are unsorted. Providers (all on the same x [tokens, hidden], W and pool):
  base              F.linear(x, W) alone, the floor
  peft_mixed_batch  peft itself: get_peft_model of a one-linear model plus add_adapter for every slot (each
                    its own rank), called with ``adapter_names=`` (one name per request), in eval mode (peft
                    refuses adapter_names in training, so it has no full-mode rows)
  torch_gather_bmm  each row gathers its adapter's A and B ([tokens, r_max, hidden] and [tokens, hidden,
                    r_max]) and two bmm's add the update to F.linear(x, W)
  loop_per_adapter  F.linear(x, W), then one Python iteration per adapter present in the batch: its rows
                    selected (one host sync for the whole batch), two GEMMs at its own rank, index_add
  triton            peftkern.multi_lora_linear(..., backend="triton", check_ids=False), path chosen by the op
  cuda              the same with backend="cuda" when that backend runs the op
Ours run with ``check_ids=False``, the serving setting: the id check is a host sync, and no baseline
checks ids either.

Sweep: tokens {1, 16, 64, 256, 8192} x adapters {1, 8, 64, 512} x rank {8, 16, 64, mixed}, hidden 4096,
bf16 activations, weights and adapters; "mixed" gives the slots ranks 8, 16, 64 in turn (r_max 64, shapes
``rank`` = 64, params ``ranks`` = "mixed"). Modes: forward (serving, nothing requires grad) for every
case; full (forward + backward, x and every adapter trainable: several adapters training in one batch) for
batches of at least ``TRAIN_TOKENS`` tokens. Prefill cases also run forward with requests of ragged
lengths (params ``lengths`` = "ragged", :func:`ragged_ids`; peft's batch of [requests, length] cannot hold
them): each adapter's rows then end mid-tile, which equal, aligned requests hide. Every provider's output
is checked against peftkern.reference.multi_lora_linear (fp32) before it is timed.

Decode is memory-bound: forward rows of decode batches carry ``bytes_moved`` = the bytes of W plus those
of every distinct adapter in the batch at its own rank (A and B), and ``add_bandwidth_ratios`` turns them
into ``ratios["vs_floor"]`` against the device-to-device copy bandwidth measured in the same run (base
rows: W alone). Summary keys (``summarize``): decode 64 tokens over 8 adapters of rank 16 vs base; 64
tokens over 64 distinct adapters of rank 16 vs its floor and vs peft; prefill 8192 tokens over 8 adapters of
rank 16 vs base; training (full) at that prefill shape, loop_per_adapter / ours.

    python3 benchmarks/bench_multi_lora.py                  # the full sweep (GPU)
    python3 benchmarks/bench_multi_lora.py --headline       # the summary keys' cases only
    python3 benchmarks/bench_multi_lora.py --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import itertools

import harness
import torch
import torch.nn as nn
import torch.nn.functional as F

OP = "multi_lora"
TOKENS = (1, 16, 64, 256, 8192)
ADAPTERS = (1, 8, 64, 512)
RANKS: tuple[int | str, ...] = (8, 16, 64, "mixed")
MIXED_RANKS = (8, 16, 64)
HIDDEN = 4096
# Up to this many tokens a batch is a decode step (one token per request), as the decode targets
# (64 tokens) and the op's own decode path (triton_kernels.multi_lora.DECODE_MAX_ROWS) have it.
DECODE_TOKENS = 64
TRAIN_TOKENS = 256  # full mode (training) from this batch size on
ALPHA_OVER_RANK = 2.0  # lora_alpha = 2 * r: every slot's scaling is 2; the value does not change the timing
# (atol, rtol) of the output check against the fp32 reference (as bench_lora's): bf16 outputs of O(1)
# values; a missing or mis-scaled update (std 0.3) is far outside it.
CHECK_TOLERANCE = (5e-2, 2e-2)

# (tokens, adapters, rank) of each summary key's case; the smoke run has its own tiny ones.
HEADLINE = {"decode": (64, 8, 16), "decode64": (64, 64, 16), "prefill": (8192, 8, 16),
            "prefill_ragged": (8192, 64, 16)}
SMOKE_HIDDEN = 16  # one 16-wide tile under the interpreter: the smoke run stays short
SMOKE_DECODE_TOKENS = 4
SMOKE = {"decode": (4, 2, 4), "decode64": (4, 4, 4), "prefill": (80, 2, 4),  # prefill: > DECODE_MAX_ROWS
         "prefill_ragged": (80, 4, 4)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--headline", action="store_true", help="only the summary keys' cases")
    parser.add_argument("--tokens", default=None, help="comma-separated subset of the token counts")
    parser.add_argument("--adapters", default=None, help="comma-separated subset of the adapter counts")
    parser.add_argument("--rank", default=None, help="comma-separated subset of the ranks (8, 16, 64, mixed)")


def _rank(value: str) -> int | str:
    return value if value == "mixed" else int(value)


def cases(bench: harness.Bench) -> list[tuple[int, int | str, int]]:
    """(adapters, rank, tokens) in run order: every token count of one pool together, so that the pool (and
    peft's model of it) is built once."""
    if bench.smoke:
        picked = list(SMOKE.values())
    elif getattr(bench.options, "headline", False):
        picked = list(HEADLINE.values())
    else:
        opts = bench.options
        tokens = harness.pick(getattr(opts, "tokens", None), TOKENS, int)
        adapters = harness.pick(getattr(opts, "adapters", None), ADAPTERS, int)
        ranks = harness.pick(getattr(opts, "rank", None), RANKS, _rank)
        picked = [(t, a, r) for a, r, t in itertools.product(adapters, ranks, tokens)]
    ordered = sorted(dict.fromkeys(picked), key=lambda c: (c[1], str(c[2]), c[0]))
    return [(a, r, t) for t, a, r in ordered]


def slot_ranks(adapters: int, rank: int | str) -> list[int]:
    """Each slot's rank: ``rank`` everywhere, or for "mixed" MIXED_RANKS in turn."""
    if rank != "mixed":
        return [int(rank)] * adapters
    return [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(adapters)]


def case_keys(hidden: int, adapters: int, ranks: list[int], rank: int | str, tokens: int) -> tuple[dict, dict]:
    """A case's (shapes, params): ``rank`` is r_max, params ``ranks`` says "uniform" or "mixed"."""
    shapes = {"tokens": tokens, "hidden": hidden, "adapters": adapters, "rank": max(ranks)}
    params = {"ranks": "mixed" if rank == "mixed" else "uniform"}
    return shapes, params


class _Pool:
    """W [hidden, hidden] and L adapter slots (zero past each slot's rank), with fp32 copies for the check."""

    def __init__(self, device: torch.device, hidden: int, ranks_per_slot: list[int], dtype: torch.dtype) -> None:
        adapters, r_max = len(ranks_per_slot), max(ranks_per_slot)
        self.slot_ranks = ranks_per_slot
        self.weight = torch.randn(hidden, hidden, device=device, dtype=dtype) / hidden**0.5
        self.lora_a = torch.randn(adapters, r_max, hidden, device=device, dtype=dtype) / hidden**0.5
        self.lora_b = torch.randn(adapters, hidden, r_max, device=device, dtype=dtype)
        ranks = torch.tensor(ranks_per_slot, device=device)
        # Each update's std is about 0.3 whatever its rank, as in bench_lora; padding ranks hold zeros.
        self.lora_b *= (0.3 / ALPHA_OVER_RANK / ranks.to(dtype) ** 0.5)[:, None, None]
        keep = torch.arange(r_max, device=device)[None, :] < ranks[:, None]  # [L, r_max]
        self.lora_a *= keep[:, :, None].to(dtype)
        self.lora_b *= keep[:, None, :].to(dtype)
        self.scalings = torch.full((adapters,), ALPHA_OVER_RANK, device=device, dtype=torch.float32)
        self.ranks = ranks.to(torch.int32)
        self.fp32 = [t.float() for t in (self.weight, self.lora_a, self.lora_b)]

    def adapter_bytes(self, adapter: int) -> int:
        hidden = self.weight.shape[1]
        return 2 * self.slot_ranks[adapter] * hidden * self.weight.element_size()


def batch_ids(tokens: int, adapters: int, decode_tokens: int = DECODE_TOKENS) -> tuple[torch.Tensor, int, int]:
    """(adapter_ids [tokens] int64 on the CPU, requests, tokens per request); see the module docstring."""
    requests = tokens if tokens <= decode_tokens else min(tokens, adapters)
    length = tokens // requests
    slots = torch.randperm(adapters)[torch.arange(requests) % adapters]  # a random choice of slots
    per_request = slots[torch.randperm(requests)]  # unsorted
    return per_request.repeat_interleave(length), requests, length


def ragged_ids(tokens: int, adapters: int) -> tuple[torch.Tensor, list[int]]:
    """A prefill batch of min(tokens, adapters) requests of ragged lengths (each about 0.5x to 1.5x the mean,
    seeded), each on a distinct adapter, in shuffled order: (adapter_ids [tokens] int64 on the CPU, lengths)."""
    requests = min(tokens, adapters)
    g = torch.Generator().manual_seed(tokens * 1009 + adapters)
    weights = 0.5 + torch.rand(requests, generator=g, dtype=torch.float64)
    lengths = (weights / weights.sum() * tokens).floor().clamp_min(1).long()
    lengths[-1] += tokens - int(lengths.sum())
    slots = torch.randperm(adapters, generator=g)[:requests]
    return slots.repeat_interleave(lengths), lengths.tolist()


def _peft_model(pool: _Pool):
    """peft's model of the pool: a one-linear module, one LoRA adapter per slot, in bf16 and eval mode."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise harness.ProviderUnavailable(f"peft is not importable: {error}") from error

    class OneLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            hidden = pool.weight.shape[1]
            self.proj = nn.Linear(hidden, hidden, bias=False, device=pool.weight.device, dtype=pool.weight.dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    base = OneLinear()
    with torch.no_grad():
        base.proj.weight.copy_(pool.weight)
    config = lambda rank: LoraConfig(r=rank, lora_alpha=ALPHA_OVER_RANK * rank, lora_dropout=0.0,
                                     target_modules=["proj"])
    model = get_peft_model(base, config(pool.slot_ranks[0]), adapter_name="a0")
    for slot, rank in enumerate(pool.slot_ranks[1:], start=1):
        model.add_adapter(f"a{slot}", config(rank))
    model.to(dtype=pool.weight.dtype)  # peft keeps 16-bit models' adapters in fp32 by default; bf16 here
    layer = model.base_model.model.proj
    with torch.no_grad():
        for slot, rank in enumerate(pool.slot_ranks):
            layer.lora_A[f"a{slot}"].weight.copy_(pool.lora_a[slot, :rank])
            layer.lora_B[f"a{slot}"].weight.copy_(pool.lora_b[slot, :, :rank])
    return model.eval()


def _gather_bmm(x, weight, lora_a, lora_b, ids, scalings):
    """Per row: its adapter's A and B gathered, two batched matvecs (rows with id -1 get no update)."""
    valid = ids >= 0
    safe = torch.where(valid, ids, 0)
    shrunk = torch.bmm(lora_a[safe], x.unsqueeze(-1))  # [T, r_max, 1]
    update = torch.bmm(lora_b[safe], shrunk).squeeze(-1)  # [T, N]
    scale = torch.where(valid, scalings[safe], 0.0).to(update.dtype)
    return F.linear(x, weight) + update * scale[:, None]


def _loop_per_adapter(x, weight, lora_a, lora_b, ids, slot_ranks, scalings):
    """One iteration per adapter present: its rows, two GEMMs at its own rank, index_add into the output."""
    out = F.linear(x, weight)
    order = torch.argsort(ids, stable=True)
    present, counts = torch.unique_consecutive(ids[order], return_counts=True)
    start = 0
    for adapter, count in zip(present.tolist(), counts.tolist()):  # the loop's one host sync
        rows = order[start:start + count]
        start += count
        if adapter < 0:
            continue
        rank = slot_ranks[adapter]
        update = F.linear(F.linear(x.index_select(0, rows), lora_a[adapter, :rank]), lora_b[adapter, :, :rank])
        out = out.index_add(0, rows, update * scalings[adapter])
    return out



def run(bench: harness.Bench) -> None:
    torch.manual_seed(0)
    device, dtype = bench.device, torch.bfloat16
    hidden = SMOKE_HIDDEN if bench.smoke else HIDDEN
    decode_tokens = SMOKE_DECODE_TOKENS if bench.smoke else DECODE_TOKENS
    timed_base: set[int] = set()
    pool_key, pool, peft_model = None, None, None
    for adapters, rank, tokens in cases(bench):
        if pool_key != (adapters, rank):
            pool_key, pool, peft_model = (adapters, rank), None, None  # free the last pool first
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pool = _Pool(device, hidden, slot_ranks(adapters, rank), dtype)
            peft_model = _build_once(bench, pool)
        if tokens not in timed_base:
            timed_base.add(tokens)
            _run_base(bench, pool, tokens, hidden, decode_tokens)
        _run_case(bench, pool, peft_model, adapters, rank, tokens, hidden, decode_tokens)
    bench.add_ratios("base")
    bench.add_ratios("peft_mixed_batch")
    bench.add_ratios("loop_per_adapter", modes=("full",))  # issue 5's training baseline
    bench.add_bandwidth_ratios()


def _build_once(bench: harness.Bench, pool: _Pool):
    """peft's model of the pool, or the exception that stopped it (reported per case by time_provider)."""
    if not bench.wants("peft_mixed_batch"):
        return None
    try:
        return _peft_model(pool)
    except Exception as error:  # a skip or an error, recorded when the provider is timed
        return error


def _run_base(bench: harness.Bench, pool: _Pool, tokens: int, hidden: int, decode_tokens: int) -> None:
    dtype, shapes = torch.bfloat16, {"tokens": tokens, "hidden": hidden}
    x = torch.randn(tokens, hidden, device=bench.device, dtype=dtype)
    weight = pool.weight
    floor = {"forward": weight.numel() * weight.element_size()} if tokens <= decode_tokens else None
    bench.time_modes("base", lambda: F.linear(x, weight), shapes, dtype, modes=("forward",), bytes_moved=floor)
    if tokens >= _train_tokens(bench):
        x_train = x.detach().requires_grad_(True)
        bench.time_modes("base", lambda: F.linear(x_train, weight), shapes, dtype, grads=[x_train],
                         modes=("full",))


def _train_tokens(bench: harness.Bench) -> int:
    return SMOKE["prefill"][0] if bench.smoke else TRAIN_TOKENS


def _run_case(bench, pool: _Pool, peft_model, adapters: int, rank, tokens: int, hidden: int,
              decode_tokens: int) -> None:
    import peftkern
    from peftkern import reference
    from peftkern.backends import cuda_backend_available, cuda_backend_status, triton_interpreting

    device, dtype = bench.device, torch.bfloat16
    shapes, params = case_keys(hidden, adapters, pool.slot_ranks, rank, tokens)
    params = {**params, "lengths": "equal"}
    ids_cpu, requests, length = batch_ids(tokens, adapters, decode_tokens)
    ids = ids_cpu.to(device)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    fp32_weight, fp32_a, fp32_b = pool.fp32
    expected = reference.multi_lora_linear(x.float(), fp32_weight, None, fp32_a, fp32_b, ids, pool.scalings,
                                           pool.ranks)
    moved = None
    if tokens <= decode_tokens:
        distinct = sorted(set(ids_cpu.tolist()))
        weight_bytes = pool.weight.numel() * pool.weight.element_size()
        moved = {"forward": weight_bytes + sum(pool.adapter_bytes(a) for a in distinct)}
    scalings_list = pool.scalings.tolist()

    def providers(x, lora_a, lora_b, trainable: bool, ids=ids, ragged: bool = False):
        """(name, build) per provider on these tensors; ``trainable``: x, lora_a, lora_b get gradients;
        ``ragged``: ``ids`` hold requests of unequal lengths (peft's batch of [requests, length] cannot)."""
        grads = [x, lora_a, lora_b] if trainable else []

        def gather():
            return (lambda: _gather_bmm(x, pool.weight, lora_a, lora_b, ids, pool.scalings)), grads

        def loop():
            forward = lambda: _loop_per_adapter(
                x, pool.weight, lora_a, lora_b, ids, pool.slot_ranks, scalings_list
            )
            return forward, grads

        def peft():
            if isinstance(peft_model, harness.ProviderUnavailable):
                raise peft_model
            if isinstance(peft_model, Exception):
                raise RuntimeError(f"building peft's model failed: {peft_model}") from peft_model
            names = [f"a{int(i)}" for i in ids_cpu[::length]]  # one per request
            batched = x.view(requests, length, hidden)
            return (lambda: peft_model(batched, adapter_names=names).reshape(tokens, hidden)), grads

        def ours(backend: str):
            def build():
                if backend == "triton" and device.type != "cuda" and not triton_interpreting():
                    raise harness.ProviderUnavailable("triton needs a GPU or TRITON_INTERPRET=1")
                if backend == "cuda" and not cuda_backend_available():
                    raise harness.ProviderUnavailable(cuda_backend_status())
                forward = lambda: peftkern.multi_lora_linear(
                    x, pool.weight, None, lora_a, lora_b, ids, pool.scalings, pool.ranks,
                    check_ids=False, backend=backend,
                )
                if backend == "cuda":
                    harness.require_cuda_kernel(forward)
                return forward, grads

            return build

        listed = [("torch_gather_bmm", gather), ("loop_per_adapter", loop)]
        if not trainable and not ragged:  # peft refuses adapter_names in training mode
            listed.insert(0, ("peft_mixed_batch", peft))
        return listed + [("triton", ours("triton")), ("cuda", ours("cuda"))]

    for provider, build in providers(x, pool.lora_a, pool.lora_b, trainable=False):
        bench.time_provider(provider, build, shapes, dtype, params, modes=("forward",), bytes_moved=moved,
                            expected=expected, tolerance=CHECK_TOLERANCE)
    if tokens > decode_tokens:  # prefill of ragged requests: every adapter's rows end mid-tile
        ids_ragged = ragged_ids(tokens, adapters)[0].to(device)
        expected_ragged = reference.multi_lora_linear(x.float(), fp32_weight, None, fp32_a, fp32_b, ids_ragged,
                                                      pool.scalings, pool.ranks)
        for provider, build in providers(x, pool.lora_a, pool.lora_b, False, ids_ragged, ragged=True):
            bench.time_provider(provider, build, shapes, dtype, {**params, "lengths": "ragged"},
                                modes=("forward",), expected=expected_ragged, tolerance=CHECK_TOLERANCE)
    if tokens >= _train_tokens(bench):
        leaves = [t.detach().requires_grad_(True) for t in (x, pool.lora_a, pool.lora_b)]
        for provider, build in providers(*leaves, trainable=True):
            bench.time_provider(provider, build, shapes, dtype, params, modes=("full",), expected=expected,
                                tolerance=CHECK_TOLERANCE)


def ours(rows: list[dict]) -> str:
    """The backend peftkern picks for multi_lora_linear on CUDA tensors, where it was measured."""
    from peftkern.backends import DEFAULT_CUDA_BACKEND, DEFAULT_CUDA_BACKEND_PER_OP

    default = DEFAULT_CUDA_BACKEND_PER_OP.get("multi_lora_linear", DEFAULT_CUDA_BACKEND)
    measured = {row["provider"] for row in rows}
    return default if default in measured else "triton"


def summarize(rows: list[dict], smoke: bool) -> dict[str, float]:
    """issue 8's multi-LoRA keys (and issue 5's training target), from this run's rows:

    multi_lora_decode_vs_base          ours / base, forward, 64 tokens over 8 adapters of rank 16
    multi_lora_decode64_vs_floor       ours / (W + 64 distinct rank-16 adapters' bytes over copy bandwidth)
    multi_lora_decode_speedup_vs_peft  peft_mixed_batch / ours, forward, the same 64-adapter batch
    multi_lora_prefill_vs_base         ours / base, forward, 8192 tokens over 8 adapters of rank 16
    multi_lora_prefill_ragged_vs_base  the same over 64 adapters, requests of ragged lengths
    multi_lora_train_speedup_vs_loop   loop_per_adapter / ours, full, the same prefill batch
    (the smoke run's tiny cases stand in for these shapes)."""
    keys = SMOKE if smoke else HEADLINE
    hidden = SMOKE_HIDDEN if smoke else HIDDEN
    rows = harness.find_rows(rows, op=OP, dtype="bfloat16")
    mine = ours(rows)

    def sel(provider: str, key: str, mode: str = "forward", lengths: str = "equal") -> dict:
        tokens, adapters, rank = keys[key]
        if provider == "base":
            return {"provider": provider, "mode": mode, "shapes": {"tokens": tokens, "hidden": hidden}}
        shapes = {"tokens": tokens, "hidden": hidden, "adapters": adapters, "rank": rank}
        params = {"ranks": "uniform", "lengths": lengths}
        return {"provider": provider, "mode": mode, "shapes": shapes, "params": params}

    decode64 = harness.find_row(rows, **sel(mine, "decode64"))
    return harness.drop_missing({
        "multi_lora_decode_vs_base": harness.ratio_of(rows, sel(mine, "decode"), sel("base", "decode")),
        "multi_lora_decode64_vs_floor": None if decode64 is None else decode64["ratios"].get("vs_floor"),
        "multi_lora_decode_speedup_vs_peft": harness.ratio_of(
            rows, sel("peft_mixed_batch", "decode64"), sel(mine, "decode64")
        ),
        "multi_lora_prefill_vs_base": harness.ratio_of(rows, sel(mine, "prefill"), sel("base", "prefill")),
        "multi_lora_prefill_ragged_vs_base": harness.ratio_of(
            rows, sel(mine, "prefill_ragged", lengths="ragged"), sel("base", "prefill_ragged")
        ),
        "multi_lora_train_speedup_vs_loop": harness.ratio_of(
            rows, sel("loop_per_adapter", "prefill", "full"), sel(mine, "prefill", "full")
        ),
    })


if __name__ == "__main__":
    harness.main(OP, run, summarize, add_arguments)
