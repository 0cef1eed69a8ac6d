"""``python -m peftkern.demo`` (``make demo``): the training job end to end, in about a minute on a CPU.

1. builds a small Llama from a ``transformers`` config with random weights (nothing is downloaded);
2. injects peftkern's fused LoRA layers into every linear layer but the LM head;
3. trains only the adapters on a synthetic task the frozen model cannot do: continue a sequence in which
   every token is followed by a fixed (random) successor, so the loss falls from ~ln(vocab) towards 0;
4. saves the adapter in the ``peft`` format, reloads it with ``peft`` (and with peftkern) into a fresh
   copy of the base model and checks the logits match;
5. trains a second, smaller adapter on another permutation, loads both into an ``AdapterPool`` and serves
   one mixed batch (rows on adapter 1, adapter 2 and the bare base model) through the multi-LoRA layers,
   checking every row against that adapter alone;
6. prints a summary table (backend, parameters trained, loss before/after, tokens/s, serving check).
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import peftkern
from peftkern.backends import resolve_backend
from peftkern.model import lora_layers

__all__ = ["DemoConfig", "main", "run_demo", "serve_with_adapter_pool", "train_adapter"]

# What "all-linear" picks in a Llama block: the pool serves adapters on exactly these layers.
_DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DemoConfig:
    """What the demo builds and how long it trains. ``--quick`` shrinks it for tests and smoke runs."""

    steps: int = 100
    batch_size: int = 16
    seq_len: int = 32
    vocab_size: int = 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    rank: int = 16
    alpha: float = 32.0
    # A common peft setting; the mask is regenerated in backward from its seed, never stored.
    dropout: float = 0.05
    lr: float = 3e-3
    # Wider than transformers' 0.02: a frozen LM head initialised at 0.02 caps every logit near 2.5, so no
    # adapter could make a confident prediction and the loss would stall near 2.4.
    initializer_range: float = 0.1
    seed: int = 0
    backend: str | None = None
    device: str | None = None
    output: str | None = None
    extras: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        settings = dict(steps=40, batch_size=8, seq_len=16, hidden_size=64)
        settings.update(overrides)
        return cls(**settings)


def build_base_model(config: DemoConfig, device: torch.device) -> nn.Module:
    """A random-weight Llama from a config (``transformers`` is needed; nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=max(64, config.seq_len),
        initializer_range=config.initializer_range,
    )
    return LlamaForCausalLM(llama_config).to(device)


class SuccessorTask:
    """Sequences where each token is followed by ``successor[token]`` (a fixed random permutation), from
    a random first token: learnable only by changing what the model predicts for every token."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(seed + 1)
        self.successor = torch.randperm(vocab_size, generator=generator).to(device)
        self.vocab_size, self.seq_len, self.device = vocab_size, seq_len, device
        self.generator = torch.Generator().manual_seed(seed + 2)

    def batch(self, batch_size: int) -> torch.Tensor:
        """[batch_size, seq_len] token ids."""
        first = torch.randint(0, self.vocab_size, (batch_size,), generator=self.generator).to(self.device)
        tokens = [first]
        for _ in range(self.seq_len - 1):
            tokens.append(self.successor[tokens[-1]])
        return torch.stack(tokens, dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, input_ids: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    model.train(was_training)
    return loss


def train_adapter(
    model: nn.Module, task: SuccessorTask, config: DemoConfig, steps: int, description: str, show_progress: bool
) -> int:
    """Train ``model``'s trainable parameters on ``task`` for ``steps`` steps (AdamW, cosine decay, a tqdm
    bar with the loss); returns the number of tokens seen."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    )
    model.train()
    tokens = 0
    progress = tqdm(range(steps), desc=description, disable=not show_progress)
    for _ in progress:
        batch = task.batch(config.batch_size)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.numel()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return tokens


def serve_with_adapter_pool(
    base: nn.Module, adapter_dirs: Mapping[str, Path], input_ids: torch.Tensor, backend: str
) -> dict:
    """The serving step: load every adapter into one ``peftkern.AdapterPool`` and run a mixed batch (row b
    uses adapter ``b % (len(adapters) + 1)``, the last choice being the base model) in one pass per layer.
    Each row's logits are checked against that adapter alone (``load_adapter`` on a copy of the base)."""
    names = list(adapter_dirs)
    row_names = [(names + [None])[row % (len(names) + 1)] for row in range(input_ids.shape[0])]
    model = copy.deepcopy(base).eval()
    pool = peftkern.AdapterPool(model, _DEMO_TARGETS, num_slots=len(names), r_max=64, backend=backend)
    for name, path in adapter_dirs.items():
        pool.load(name, path)
    with torch.no_grad(), pool.batch(row_names):
        start = time.perf_counter()
        logits = model(input_ids=input_ids).logits
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    worst = 0.0
    for name in names + [None]:
        rows = [row for row, row_name in enumerate(row_names) if row_name == name]
        single = copy.deepcopy(base) if name is None else peftkern.load_adapter(
            copy.deepcopy(base), adapter_dirs[name], backend=backend
        )
        with torch.no_grad():
            expected = single.eval()(input_ids=input_ids[rows]).logits
        worst = max(worst, (logits[rows] - expected).abs().max().item())
    return {
        "adapters": len(names),
        "rows": len(row_names),
        "max_diff": worst,
        "tokens_per_s": input_ids.numel() / seconds if seconds > 0 else float("nan"),
    }


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_demo(config: DemoConfig, show_progress: bool = True) -> dict:
    """Run the demo; returns the summary (also printed by :func:`main`)."""
    device = torch.device(config.device) if config.device else _default_device()
    backend = resolve_backend(device, "lora_linear", config.backend)
    base = build_base_model(config, device)
    pristine = copy.deepcopy(base)  # the base as downloaded: what peft will load the adapter onto

    model = peftkern.inject_lora(
        base, "all-linear", r=config.rank, alpha=config.alpha, dropout=config.dropout, backend=backend
    )
    count = peftkern.trainable_parameters(model)
    task = SuccessorTask(config.vocab_size, config.seq_len, config.seed, device)
    held_out = task.batch(64)
    loss_before = evaluate(model, held_out)

    start = time.perf_counter()
    tokens = train_adapter(model, task, config, config.steps, f"training LoRA ({backend})", show_progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    loss_after = evaluate(model, held_out)

    output = Path(config.output) if config.output else Path(tempfile.mkdtemp(prefix="peftkern-demo-"))
    peftkern.save_adapter(model, output)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=held_out).logits
    reloaded = peftkern.load_adapter(copy.deepcopy(pristine), output, backend=backend).eval()
    with torch.no_grad():
        ours_diff = (reloaded(input_ids=held_out).logits - logits).abs().max().item()
    peft_diff = _check_with_peft(pristine, output, held_out, logits)
    tolerance = 1e-4 if device.type == "cpu" else 1e-2  # fp32 on CPU; TF32-capable GEMMs on a GPU
    # A second adapter, on another permutation, for the mixed-batch serving step.
    second = peftkern.inject_lora(
        copy.deepcopy(pristine), "all-linear", r=config.rank // 2, alpha=config.alpha, backend=backend
    )
    other_task = SuccessorTask(config.vocab_size, config.seq_len, config.seed + 10, device)
    train_adapter(second, other_task, config, max(1, config.steps // 2), "training a 2nd adapter", show_progress)
    peftkern.save_adapter(second, output.with_name(output.name + "-second"))
    pool = serve_with_adapter_pool(
        pristine, {"first": output, "second": output.with_name(output.name + "-second")}, held_out[:9], backend
    )
    return {
        "device": str(device),
        "backend": backend,
        "layers": len(list(lora_layers(model))),
        "trainable": count.trainable,
        "total": count.total,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "steps": config.steps,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "adapter": str(output),
        "reload_max_diff": ours_diff,
        "peft_max_diff": peft_diff,
        "logits_match": ours_diff <= tolerance and (peft_diff is None or peft_diff <= tolerance)
        and pool["max_diff"] <= tolerance,
        "adapter_pool": pool,
    }


def _check_with_peft(
    base: nn.Module, path: Path, input_ids: torch.Tensor, logits: torch.Tensor
) -> float | None:
    """Max |logits difference| between ``peft`` loading the saved adapter and our model, or None without
    peft installed."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    with torch.no_grad():
        return (theirs(input_ids=input_ids).logits - logits).abs().max().item()


def format_summary(summary: dict) -> str:
    peft_diff = summary["peft_max_diff"]
    pool = summary["adapter_pool"]
    rows = [
        ("device / backend", f"{summary['device']} / {summary['backend']}"),
        ("LoRA layers", str(summary["layers"])),
        ("parameters trained", f"{summary['trainable']:,} of {summary['total']:,} "
                               f"({100 * summary['trainable'] / summary['total']:.2f}%)"),
        ("loss before -> after", f"{summary['loss_before']:.3f} -> {summary['loss_after']:.3f} "
                                 f"({summary['steps']} steps)"),
        ("tokens/s (train)", f"{summary['tokens_per_s']:,.0f}"),
        ("adapter saved to", summary["adapter"]),
        ("peft reload, max |dlogits|", "peft not installed" if peft_diff is None else f"{peft_diff:.2e}"),
        ("peftkern reload, max |dlogits|", f"{summary['reload_max_diff']:.2e}"),
        ("logits match", "yes" if summary["logits_match"] else "NO"),
        ("adapter pool: mixed batch", f"{pool['rows']} rows over {pool['adapters']} adapters + base, one pass; "
                                      f"max |dlogits| vs each adapter alone {pool['max_diff']:.2e}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'':<{width}} | result", f"|{'-' * (width + 2)}|{'-' * 40}"]
    lines += [f"| {name:<{width}} | {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m peftkern.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (100; --quick: 40)")
    parser.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default 0.05)")
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (seconds)")
    parser.add_argument("--backend", choices=("torch", "triton", "cuda"), default=None,
                        help="peftkern backend (default: the device's default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--output", default=None, help="where to save the adapter (default: a temp dir)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: expected a positive number, got {args.steps}")
    given = {"steps": args.steps, "dropout": args.dropout, "backend": args.backend, "device": args.device,
             "output": args.output}
    overrides = {key: value for key, value in given.items() if value is not None}
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    summary = run_demo(config, show_progress=not args.no_progress)
    print(format_summary(summary))
    if not summary["logits_match"]:
        raise SystemExit("the reloaded adapter's logits do not match")
    return summary


if __name__ == "__main__":
    main()
