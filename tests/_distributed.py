"""Workers for the DDP / FSDP2 tests: spawned processes on the gloo backend (CPU), importable by the child
processes (``torch.multiprocessing.spawn`` pickles the function by reference)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _models import randomize_adapters, tiny_llama, token_batch
from safetensors.torch import save_file

import peftkern
from peftkern.model import lora_layers

WORLD = 2
BATCH = 4


def build_model() -> torch.nn.Module:
    """The same model in every process: a small Llama with random adapters (dropout 0: the ranks' seeds
    differ from a single process's, so only p = 0 can match exactly)."""
    model = peftkern.inject_lora(tiny_llama(), ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    randomize_adapters(model)
    return model.train()


def adapter_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, layer in lora_layers(model):
        for part, parameter in (("A", layer.lora_A), ("B", layer.lora_B)):
            grad = parameter.grad
            if hasattr(grad, "full_tensor"):  # FSDP2 leaves sharded DTensor gradients
                grad = grad.full_tensor()
            grads[f"{name}.lora_{part}"] = grad.detach().clone().contiguous()
    return grads


def worker(rank: int, modes: tuple[str, ...], init_file: str, out_dir: str) -> None:
    """Run one forward/backward of each mode in ``modes`` on this rank's half of the batch; rank 0 writes
    the full adapter gradients to ``out_dir/<mode>.safetensors``, every rank saves the adapter."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for mode in modes:
            model = build_model()
            local = token_batch(batch=BATCH).chunk(WORLD)[rank]
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                wrapped = DistributedDataParallel(model)
            elif mode == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                for layer in model.model.layers:
                    fully_shard(layer)
                wrapped = fully_shard(model)
            else:
                raise ValueError(f"modes: expected 'ddp' or 'fsdp2', got {mode!r}")
            loss = wrapped(input_ids=local, labels=local).loss
            loss.backward()
            grads = adapter_gradients(model)
            # Every rank takes part: under FSDP2 the gather in save_adapter (full_tensor) is a collective.
            peftkern.save_adapter(wrapped, os.path.join(out_dir, f"{mode}-adapter{rank}"))
            if rank == 0:
                save_file(grads, os.path.join(out_dir, f"{mode}.safetensors"))
    finally:
        dist.destroy_process_group()
