"""A small Llama from a ``transformers`` config with random weights (nothing downloaded), shared by the
model-integration tests, and helpers to compare it with ``peft``."""

from __future__ import annotations

import torch
import torch.nn as nn

from peftkern.model import lora_layers


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    # transformers' default init (std 0.02) makes every logit ~0: widen it so the comparisons mean something.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model.eval()


def token_batch(batch: int = 2, seq: int = 7, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """Give every adapter non-zero A and B (a fresh adapter has B = 0, which would hide scaling bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(lora_layers(model)):
            for parameter in (layer.lora_A, layer.lora_B):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def peft_adapter_params(peft_model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """``{module name (inside the base model): (A, B)}`` of a peft model with one adapter."""
    from peft.tuners.lora.layer import LoraLayer

    root = peft_model.base_model.model
    found = {}
    for name, module in root.named_modules():
        if isinstance(module, LoraLayer):
            (adapter,) = module.lora_A.keys()
            found[name] = (module.lora_A[adapter].weight, module.lora_B[adapter].weight)
    return found


def our_adapter_params(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    return {name: (layer.lora_A, layer.lora_B) for name, layer in lora_layers(model)}


def loss_of(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of a causal-LM forward with the inputs as labels."""
    output = model(input_ids=input_ids, labels=input_ids)
    return output.logits, output.loss


def count_fused_calls(monkeypatch, op: str) -> list[int]:
    """Counts the calls that converted peft layers (``peftkern.from_peft``) make to ``peftkern.<op>``
    (``lora_linear`` or ``multi_lora_linear``): a one-element list, incremented per call."""
    import peftkern.peft_compat as compat

    calls = [0]
    real = getattr(compat, op)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(compat, op, counted)
    return calls
