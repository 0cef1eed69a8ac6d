"""Training features with our LoRA layers in a small random Llama: torch.compile (fullgraph), autocast with
fp32 adapters, gradient checkpointing with dropout, and DDP / FSDP2 on two CPU processes (gloo)."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.utils.checkpoint
from _helpers import assert_close
from _models import randomize_adapters, tiny_llama, token_batch

import peftkern
from peftkern.model import lora_layers


def _model(dropout: float = 0.0, targets=("q_proj", "v_proj", "up_proj", "down_proj")) -> torch.nn.Module:
    model = peftkern.inject_lora(tiny_llama(), list(targets), r=4, alpha=8, dropout=dropout)
    randomize_adapters(model)
    return model.train()


def _run(model, ids, seed: int = 11):
    """(logits, loss, {adapter name: grad}) of one forward/backward; dropout seeds from ``seed``."""
    torch.manual_seed(seed)
    for parameter in model.parameters():
        parameter.grad = None
    output = model(input_ids=ids, labels=ids)
    output.loss.backward()
    grads = {}
    for name, layer in lora_layers(model):
        grads[f"{name}.lora_A"] = layer.lora_A.grad.clone()
        grads[f"{name}.lora_B"] = layer.lora_B.grad.clone()
    return output.logits.detach(), output.loss.detach(), grads


def _assert_same(actual, expected, what: str, scale: float = 1.0) -> None:
    assert_close(actual[0], expected[0], f"{what}: logits", scale=scale)
    assert_close(actual[1], expected[1], f"{what}: loss", scale=scale)
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        assert_close(actual[2][name], expected[2][name], f"{what}: {name}.grad", scale=scale)


# ---- torch.compile -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compile_fullgraph_matches_eager(dropout):
    """fullgraph=True fails on any graph break; the custom op is opaque to the compiler (its fake
    implementation is what it traces). aot_eager traces forward and backward without inductor's codegen,
    which is slow on CPU; the inductor run is the slow test below."""
    torch._dynamo.reset()
    model = _model(dropout)
    ids = token_batch()
    eager = _run(model, ids)
    compiled = _run(torch.compile(model, fullgraph=True, backend="aot_eager"), ids)
    _assert_same(compiled, eager, f"compiled (dropout {dropout})")
    if dropout:
        # The dropout is live: another seed gives other gradients.
        other = _run(model, ids, seed=12)
        assert not torch.allclose(other[2]["model.layers.0.self_attn.q_proj.lora_A"],
                                  eager[2]["model.layers.0.self_attn.q_proj.lora_A"])


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    model = _model()
    ids = token_batch()
    eager = _run(model, ids)
    compiled = _run(torch.compile(model, fullgraph=True), ids)
    # Inductor fuses and reorders the fp32 sums of the base model (not our op): allow 10x fp32 tolerance.
    _assert_same(compiled, eager, "inductor", scale=10)


# ---- autocast ------------------------------------------------------------------------------------------


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_autocast_bf16_with_fp32_adapters():
    peft = pytest.importorskip("peft")
    model = _model()
    ids = token_batch()
    reference = _run(model, ids)  # fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _run(model, ids)
    # Adapters stay fp32 (weights and gradients); activations ran in bf16.
    for _, layer in lora_layers(model):
        assert layer.lora_A.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    assert ours[0].dtype == torch.bfloat16
    # peft on the same weights under the same autocast, as the yardstick for bf16 error.
    theirs_model = peft.get_peft_model(
        copy.deepcopy(tiny_llama()),
        peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=4, lora_alpha=8),
    ).train()
    with torch.no_grad():
        theirs_root = theirs_model.base_model.model
        for name, layer in lora_layers(model):
            peft_layer = theirs_root.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = theirs_model(input_ids=ids, labels=ids)
    output.loss.backward()
    theirs_logits = output.logits.detach()
    ours_error = _relative_error(ours[0], reference[0])
    theirs_error = _relative_error(theirs_logits, reference[0])
    assert ours_error < 2e-2, ours_error
    assert ours_error <= 1.5 * theirs_error + 1e-3, (ours_error, theirs_error)
    for name, grad in reference[2].items():
        module, _, part = name.rpartition(".")
        theirs_grad = getattr(theirs_root.get_submodule(module), part)["default"].weight.grad
        ours_grad_error = _relative_error(ours[2][name], grad)
        assert ours_grad_error < 0.1, (name, ours_grad_error)  # bf16 through two layers: peft is ~0.07
        assert ours_grad_error <= 1.25 * _relative_error(theirs_grad, grad) + 5e-3, name


def test_bf16_model_gets_fp32_adapters():
    """A bf16 base model (no autocast) gets fp32 adapters from inject_lora (peft's autocast_adapter_dtype)."""
    model = tiny_llama().to(torch.bfloat16)
    peftkern.inject_lora(model, ["q_proj"], r=4, alpha=8)
    for _, layer in lora_layers(model):
        assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    ids = token_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(layer.lora_B.grad.dtype == torch.float32 for _, layer in lora_layers(model))


# ---- gradient checkpointing ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_replays_the_dropout_mask(use_reentrant):
    """The recomputed forward draws the same dropout seeds (checkpoint restores the RNG state before
    recomputing, and the seed comes from torch.randint on the device's generator): gradients equal the
    plain run's exactly, with dropout on."""
    model = _model(dropout=0.3)
    ids = token_batch()
    plain = _run(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpoint needs an input that requires grad
    assert model.is_gradient_checkpointing
    checkpointed = _run(model, ids)
    _assert_same(checkpointed, plain, f"checkpointed (reentrant={use_reentrant})")
    model.gradient_checkpointing_disable()


def test_torch_checkpoint_on_one_layer_with_dropout():
    layer = peftkern.LoRALinear(torch.nn.Linear(33, 17), r=5, alpha=10, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 33, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(5)
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        grads = torch.autograd.grad(y.square().sum(), (x, layer.lora_A, layer.lora_B))
        results.append((y.detach(), *grads))
    for name, actual, expected in zip(("y", "x.grad", "A.grad", "B.grad"), results[1], results[0]):
        assert_close(actual, expected, name)


# ---- DDP and FSDP2 on two CPU processes ----------------------------------------------------------------


def test_ddp_and_fsdp2_give_the_single_process_gradients(tmp_path):
    """Two spawned processes on gloo, each with half the batch: DDP's all-reduce and FSDP2's
    reduce-scatter average to the single-process gradients of the whole batch. Under FSDP2 our layers
    compute with the unsharded parameters FSDP's pre-forward hooks gather (a layer that bypassed them
    would see [out/2, in] shards and fail), and save_adapter gathers the sharded adapters whole."""
    import torch.multiprocessing as mp
    from _distributed import BATCH, adapter_gradients, build_model, worker
    from safetensors.torch import load_file

    modes = ("ddp", "fsdp2")
    start = time.monotonic()
    arguments = (modes, str(tmp_path / "init"), str(tmp_path))
    context = mp.start_processes(worker, args=arguments, nprocs=2, join=False, start_method="spawn")
    try:
        while not context.join(timeout=5):
            assert time.monotonic() - start < 240, "distributed workers did not finish in 240 s"
    finally:
        for process in context.processes:  # only ours: the two workers this test spawned
            if process.is_alive():
                process.terminate()
    model = build_model()
    ids = token_batch(batch=BATCH)
    model(input_ids=ids, labels=ids).loss.backward()
    expected = adapter_gradients(model)
    single_file = tmp_path / "single"
    peftkern.save_adapter(model, single_file)
    single = load_file(single_file / "adapter_model.safetensors")
    for mode in modes:
        grads = load_file(tmp_path / f"{mode}.safetensors")
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            assert_close(grads[name], grad, f"{mode}: {name}.grad")
        for rank in range(2):
            saved = load_file(tmp_path / f"{mode}-adapter{rank}" / "adapter_model.safetensors")
            assert saved.keys() == single.keys()
            for key, tensor in single.items():
                assert torch.equal(saved[key], tensor), f"{mode} rank {rank}: {key}"
    assert os.path.exists(tmp_path / "fsdp2-adapter1" / "adapter_config.json")
