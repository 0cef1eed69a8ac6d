"""End-to-end LoRA training: ``peft`` against ``peftkern.from_peft`` of the same model.

A Llama-shaped model built from a ``transformers`` config with random weights (hidden 2048, 16 layers,
sequence 2048, bf16; no downloads), LoRA rank 16 / alpha 32 on every linear layer (``all-linear``),
AdamW over the adapter parameters, in four variants: dropout {0.1, 0} x adapters {fp32 (peft's default beside
a bf16 model, ``autocast_adapter_dtype=True``), bf16} (``--dropout``, ``--adapters`` pick a subset; --smoke
runs dropout 0.1 with fp32 adapters and dropout 0 with bf16 ones). Both providers start from identical
weights (same seed, same device), see the same token batches, and take ``--steps`` steps (50). Rows (mode
``full``: forward, backward and optimizer step) give the median step time with its 20/80 quantiles,
tokens/s, the peak memory above the resident model (GPU), and the loss curve; the ``peftkern`` row also says whether its
loss stays within 1% of peft's at every step. The two use different dropout random streams (torch's and
peftkern's Philox), so the curves agree statistically, not bit for bit.

QLoRA variant (providers ``peft_qlora`` and ``peftkern_qlora``, unless ``--no-qlora``): the same model with every
decoder linear layer in bitsandbytes 4-bit (NF4, double-quantized absmax, bf16 compute dtype; lm_head kept, as
transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` keeps it), LoRA on the same layers; peft + bitsandbytes
against ``from_peft`` (backend triton on a GPU, the default elsewhere).

    python3 benchmarks/bench_train.py                  # GPU
    python3 benchmarks/bench_train.py --smoke --out /tmp/bench
    python3 benchmarks/bench_train.py --device cpu     # CPU: peft vs from_peft, interleaved (see cpu_compare)
    python3 benchmarks/bench_train.py --device cpu --qlora   # the same over a bitsandbytes 4-bit base
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import harness
import torch

OP = "train"
FULL = {
    "hidden": 2048, "intermediate": 5632, "layers": 16, "heads": 16, "vocab": 32000, "seq": 2048, "batch": 1,
}
SMOKE = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "vocab": 128, "seq": 32, "batch": 2}
RANK, ALPHA, DROPOUT_P, LR, SEED = 16, 32, 0.1, 2e-4, 0
# (dropout_p, adapter dtype): the headline first (the summary's), then the variants that show each fix.
VARIANTS = [(0.1, "fp32"), (0.0, "fp32"), (0.1, "bf16"), (0.0, "bf16")]
SMOKE_VARIANTS = [(0.1, "fp32"), (0.0, "bf16")]
LOSS_RTOL = 0.01  # issue 8: the two loss curves agree within 1% per step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 50; 4 in --smoke)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed first steps (default 5; 1)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--no-qlora", action="store_true", help="leave out the QLoRA (4-bit base) variant")
    parser.add_argument("--dropout", default=None, help="comma-separated subset of the dropout values (0.1,0)")
    parser.add_argument("--adapters", default=None, help="comma-separated subset of the adapter dtypes (fp32,bf16)")


def _from_peft():
    """peftkern.from_peft, imported lazily: it lives in peftkern/model.py, written separately."""
    import peftkern

    convert = getattr(peftkern, "from_peft", None)
    if convert is None:
        try:
            from peftkern.model import from_peft as convert
        except ImportError as error:
            raise harness.ProviderUnavailable(
                "peftkern.from_peft is not available in this checkout (peftkern/model.py missing or "
                f"incomplete: {error}); the peftkern provider needs it"
            ) from error
    return convert


def build_peft_model(config: dict, device: torch.device, dtype: torch.dtype, dropout_p: float = DROPOUT_P,
                     adapters: str = "fp32"):
    """A randomly initialised LlamaForCausalLM wrapped by peft's get_peft_model (LoRA on all linears), with
    fp32 adapters (peft's default) or adapters in the model's dtype (``adapters="bf16"``). Initialised on
    ``device`` under a fixed seed, so two calls give identical weights."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise harness.ProviderUnavailable(f"peft and transformers are needed: {error}") from error
    llama = LlamaConfig(
        hidden_size=config["hidden"],
        intermediate_size=config["intermediate"],
        num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"],
        num_key_value_heads=config["heads"],
        vocab_size=config["vocab"],
        max_position_embeddings=config["seq"],
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(llama).to(dtype)
        lora = LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=dropout_p, target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora, autocast_adapter_dtype=adapters == "fp32")


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_qlora_model(config: dict, device: torch.device, dtype: torch.dtype, dropout_p: float = DROPOUT_P):
    """:func:`build_peft_model`'s Llama with its decoder linear layers quantized by bitsandbytes (NF4, double
    quant, ``dtype`` compute) before peft wraps them: peft's QLoRA layers (``lora.bnb.Linear4bit``)."""
    try:
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise harness.ProviderUnavailable(f"bitsandbytes and peft are needed: {error}") from error
    model = build_peft_model(config, torch.device("cpu"), dtype, dropout_p).base_model.unload()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if name not in LINEAR_NAMES:
                    continue
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4")
                if linear.bias is not None:
                    quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
                setattr(parent, name, quantized)
    model = model.to(device)  # quantizes
    model.is_loaded_in_4bit = True  # what transformers sets, and what makes peft pick its bitsandbytes layers
    torch.manual_seed(SEED)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout_p, target_modules=list(LINEAR_NAMES),
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def train(model, batches: torch.Tensor, warmup_steps: int, device: torch.device) -> dict:
    """AdamW steps over ``batches`` [steps, batch, seq]; per-step times (s), losses, peak memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    model.train()
    torch.manual_seed(SEED + 1)  # the dropout stream starts from the same state for both providers
    losses, seconds = [], []
    harness.synchronize(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for input_ids in batches:
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        harness.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
    timed = seconds[warmup_steps:] or seconds
    return {"losses": losses, "seconds": timed, "peak_mem_bytes": peak}


def _quantiles_ms(seconds: list[float]) -> tuple[float, float, float]:
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    cuts = statistics.quantiles(ms, n=10, method="inclusive")  # deciles: cuts[1] = p20, cuts[7] = p80
    return statistics.median(ms), cuts[1], cuts[7]


def run(bench: harness.Bench) -> None:
    device, dtype = bench.device, torch.bfloat16
    config = dict(SMOKE if bench.smoke else FULL)
    opts = bench.options
    config["batch"] = getattr(opts, "batch", None) or config["batch"]
    steps = getattr(opts, "steps", None) or (4 if bench.smoke else 50)
    warmup = getattr(opts, "warmup_steps", None)
    warmup = min(warmup if warmup is not None else (1 if bench.smoke else 5), steps - 1)
    shapes = {k: config[k] for k in ("hidden", "layers", "seq", "batch", "vocab")} | {"rank": RANK}
    generator = torch.Generator().manual_seed(SEED)
    batches = torch.randint(0, config["vocab"], (steps, config["batch"], config["seq"]), generator=generator)
    batches = batches.to(device)
    dropouts = harness.pick(getattr(opts, "dropout", None), (0.1, 0.0), float)
    adapter_dtypes = harness.pick(getattr(opts, "adapters", None), ("fp32", "bf16"), str)
    for dropout_p, adapters in SMOKE_VARIANTS if bench.smoke else VARIANTS:
        if dropout_p in dropouts and adapters in adapter_dtypes:
            params = {"dropout_p": dropout_p, "adapter_dtype": adapters, "lr": LR, "steps": steps,
                      "warmup_steps": warmup}
            _run_variant(bench, config, batches, shapes, params, warmup, device, dtype)
    bench.add_ratios("peft", providers=("peftkern",))
    bench.add_ratios("peft_qlora", providers=("peftkern_qlora",))


def _run_variant(bench, config, batches, shapes, params, warmup, device, dtype) -> None:
    tokens_per_step = config["batch"] * config["seq"]
    results: dict[str, dict] = {}
    # The QLoRA pair in the headline variant only (dropout 0.1; its adapters are peft's default for 4-bit)
    headline = (params["dropout_p"], params["adapter_dtype"]) == VARIANTS[0]
    qlora = ("peft_qlora", "peftkern_qlora") if headline and not getattr(bench.options, "no_qlora", False) else ()
    for provider in ("peft", "peftkern", *qlora):
        if not bench.wants(provider):
            continue
        try:
            convert = _from_peft() if provider.startswith("peftkern") else None
            if provider in qlora:
                model = build_qlora_model(config, device, dtype, params["dropout_p"])
            else:
                model = build_peft_model(config, device, dtype, params["dropout_p"], params["adapter_dtype"])
        except harness.ProviderUnavailable as error:
            bench.skip(provider, str(error))
            continue
        if convert is not None and provider == "peftkern_qlora":
            # The fused 4-bit kernels on a GPU (lora_linear_4bit's default backend there is still torch).
            converted = convert(model, backend="triton" if device.type == "cuda" else None)
            model = converted if converted is not None else model
        elif convert is not None:
            converted = convert(model)
            model = converted if converted is not None else model  # in place or returned: either works
        result = train(model, batches, warmup, device)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results[provider] = result
        metrics = {
            "tokens_per_s": tokens_per_step * len(result["seconds"]) / sum(result["seconds"]),
            "losses": result["losses"],
        }
        twin = {"peftkern": "peft", "peftkern_qlora": "peft_qlora"}.get(provider)
        if twin in results:
            reference = results[twin]["losses"]
            rel = [abs(a - b) / abs(b) for a, b in zip(result["losses"], reference)]
            metrics["loss_max_rel_diff_vs_peft"] = max(rel)
            metrics["loss_curves_agree"] = max(rel) <= LOSS_RTOL
            if not metrics["loss_curves_agree"]:  # the times stand, but the run must not pass quietly
                step = rel.index(max(rel))
                bench.fail(provider, AssertionError(
                    f"loss at step {step} differs from peft's by {max(rel):.3%} (allowed {LOSS_RTOL:.0%}): "
                    f"{result['losses'][step]:.6g} vs {reference[step]:.6g}"
                ), shapes, params)
        bench.record(bench.row(
            provider, "full", shapes, dtype, params, _quantiles_ms(result["seconds"]),
            result["peak_mem_bytes"], metrics=metrics,
        ))


def summarize(rows: list[dict], smoke: bool) -> dict[str, float]:
    """issue 8's end-to-end keys from this run's rows: the headline variant (dropout 0.1, fp32 adapters)."""
    headline = {"dropout_p": VARIANTS[0][0], "adapter_dtype": VARIANTS[0][1]}
    rows = harness.find_rows(rows, op=OP, mode="full")
    ours, peft = {"provider": "peftkern", "params": headline}, {"provider": "peft", "params": headline}
    return harness.drop_missing({
        "train_e2e_speedup_vs_peft": harness.ratio_of(rows, ours, peft, field="metrics.tokens_per_s"),
        "train_e2e_memory_ratio_vs_peft": harness.ratio_of(rows, ours, peft, field="peak_mem_bytes"),
        "qlora_e2e_speedup_vs_peft": harness.ratio_of(rows, {"provider": "peftkern_qlora"},
                                                      {"provider": "peft_qlora"}, field="metrics.tokens_per_s"),
        "qlora_e2e_memory_ratio_vs_peft": harness.ratio_of(rows, {"provider": "peftkern_qlora"},
                                                           {"provider": "peft_qlora"}, field="peak_mem_bytes"),
    })


# ---- CPU: the torch backend against peft, the comparison a CPU user makes ---------------------------------

CPU = {"hidden": 512, "intermediate": 1376, "layers": 4, "heads": 8, "vocab": 8000, "seq": 256, "batch": 4}
CPU_DROPOUTS = (0.0, 0.1)


def cpu_slug() -> str:
    """``amd-epyc-2-cores``: the CPU model and its core count (never starting with ``cpu``, which git ignores
    for the smoke runs' scratch results)."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "unknown"
    return f"{slug}-{os.cpu_count()}-cores"


def _build_cpu_pair(config: dict, dropout_p: float, qlora: bool = False):
    cpu = torch.device("cpu")
    if qlora:
        theirs = build_qlora_model(config, cpu, torch.bfloat16, dropout_p)
        ours = _from_peft()(build_qlora_model(config, cpu, torch.bfloat16, dropout_p))
        return theirs, ours
    theirs = build_peft_model(config, cpu, torch.float32, dropout_p)
    ours = _from_peft()(build_peft_model(config, cpu, torch.float32, dropout_p))
    return theirs, ours


def cpu_compare(steps: int, warmup: int, out: Path, qlora: bool = False) -> Path:
    """peft and peft + ``from_peft`` on the same small fp32 Llama, one step of each in turn (so load on the
    machine falls on both alike), for each dropout in CPU_DROPOUTS; median wall and process-CPU times per
    step, their ratio, and the bytes autograd saves. Writes ``<out>/<cpu slug>/train_cpu_<N>_threads.json``.
    ``qlora``: the QLoRA variant instead (the same Llama in bf16, its decoder linear layers in bitsandbytes
    4-bit as :func:`build_qlora_model` makes them: peft + bitsandbytes against ``from_peft``'s torch backend);
    writes ``train_cpu_qlora_<N>_threads.json``.

    The CPU time is the calling thread's (``time.thread_time``): with one torch thread it is the step's whole
    CPU time and hardly moves with other load on the machine, which wall time does."""
    import peft
    import transformers

    config = dict(CPU)
    generator = torch.Generator().manual_seed(SEED)
    batches = torch.randint(0, config["vocab"], (warmup + steps, config["batch"], config["seq"]), generator=generator)
    rows, ratios = [], {}
    for dropout_p in CPU_DROPOUTS:
        models = dict(zip(("peft", "peftkern"), _build_cpu_pair(config, dropout_p, qlora)))
        saved = {}
        for name, model in models.items():  # one forward each: what autograd holds for its backward
            with harness.saved_bytes(model.parameters()) as total:
                model(input_ids=batches[0], labels=batches[0])
            saved[name] = total[0]
        optimizers = {
            name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
            for name, model in models.items()
        }
        wall = {name: [] for name in models}
        cpu = {name: [] for name in models}
        losses = {name: [] for name in models}
        for step, input_ids in enumerate(batches):
            for name, model in models.items():
                model.train()
                start, start_cpu = time.perf_counter(), time.thread_time()
                loss = model(input_ids=input_ids, labels=input_ids).loss
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                if step >= warmup:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.thread_time() - start_cpu)
                losses[name].append(float(loss.detach()))
        for name in models:
            rows.append({
                "provider": name, "dropout_p": dropout_p,
                "step_ms": _quantiles_ms(wall[name]), "step_thread_cpu_ms": _quantiles_ms(cpu[name]),
                "tokens_per_s": config["batch"] * config["seq"] * len(wall[name]) / sum(wall[name]),
                "saved_bytes": saved[name], "losses": losses[name],
            })
            print(f"[train cpu] p={dropout_p} {name:9s} step {rows[-1]['step_ms'][0]:8.1f} ms "
                  f"(thread cpu {rows[-1]['step_thread_cpu_ms'][0]:8.1f} ms)  saved {saved[name] / 2**20:7.1f} MiB")
        key = f"dropout_{dropout_p:g}"
        ratios[f"step_time_vs_peft_{key}"] = rows[-1]["step_ms"][0] / rows[-2]["step_ms"][0]
        ratios[f"step_thread_cpu_time_vs_peft_{key}"] = (
            rows[-1]["step_thread_cpu_ms"][0] / rows[-2]["step_thread_cpu_ms"][0]
        )
        ratios[f"saved_bytes_vs_peft_{key}"] = saved["peftkern"] / saved["peft"]
        if dropout_p == 0.0:  # the same math and no randomness: the curves must agree
            ratios["loss_max_rel_diff_vs_peft_dropout_0"] = max(
                abs(a - b) / abs(b) for a, b in zip(losses["peftkern"], losses["peft"])
            )
        del models, optimizers
        gc.collect()
    model_kind = ("bf16 Llama, its decoder linear layers in bitsandbytes NF4 (double quant), fp32 LoRA r16 on "
                  "them: peft + bitsandbytes" if qlora else "fp32 Llama with LoRA r16 on every linear layer: peft")
    result = {
        "what": f"one train step (forward, backward, AdamW) of a small {model_kind} against peftkern.from_peft, "
                "steps interleaved; wall and calling-thread CPU times, medians with 20/80 quantiles in ms",
        "device": cpu_slug(), "threads": torch.get_num_threads(), "steps": steps, "warmup_steps": warmup,
        "config": config | {"rank": RANK, "alpha": ALPHA, "dtype": "bfloat16" if qlora else "float32",
                            "qlora": qlora},
        "versions": {"torch": torch.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ratios": ratios, "rows": rows,
    }
    variant = "train_cpu_qlora" if qlora else "train_cpu"
    path = out / cpu_slug() / f"{variant}_{torch.get_num_threads()}_threads.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    for key, value in ratios.items():
        print(f"[train cpu] {key} = {value:.4g}")
    return path


def _cpu_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="peftkern benchmark: train step on CPU, peft vs from_peft")
    parser.add_argument("--device", choices=["cpu"], required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per provider and dropout (10)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    parser.add_argument("--qlora", action="store_true",
                        help="the QLoRA variant: bf16 model, bitsandbytes 4-bit decoder linears (peft + bitsandbytes)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"[train cpu] -> {cpu_compare(args.steps, args.warmup_steps, args.out, args.qlora)}")


if __name__ == "__main__":
    if "--device" in sys.argv[1:]:
        _cpu_main(sys.argv[1:])
    else:
        harness.main(OP, run, summarize, add_arguments)
