"""Soft prompts: ``PromptTuningEmbedding`` and ``PrefixEncoder`` (parameters; the ops do the work), and the
wrappers that add prompt tuning or prefix tuning to a Hugging Face causal LM.

Both wrappers hold one soft prompt per task, so a batch may mix tasks (``task_ids`` [B]). They reproduce
``peft``'s ``PromptTuningConfig`` / ``PrefixTuningConfig`` models on the same weights: same inputs_embeds /
same cache, same attention mask, same positions (prompt tuning: the prompt takes positions 0..n-1 and the
tokens n..n+T-1; prefix tuning: the prefix is n cached positions, the tokens again n..n+T-1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..ops.prompt import prefix_kv, prompt_concat
from ..reference import PromptConcatOutput

__all__ = ["PromptTuningEmbedding", "PrefixEncoder", "PromptTuningForCausalLM", "PrefixTuningForCausalLM"]

_INITS = ("random", "vocab", "text")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    # As peft's autocast_adapter_dtype: fp32 soft prompts beside a 16-bit model, else the model's dtype.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class PromptTuningEmbedding(nn.Module):
    """One soft prompt of ``num_virtual_tokens`` embeddings per task: ``weight`` [num_tasks, n, dim].

    ``init``: ``"random"`` N(0, 1) (peft's RANDOM, the ``nn.Embedding`` default); ``"vocab"`` rows of
    ``word_embeddings`` at random token ids (peft's SAMPLE_VOCAB), drawn per task; ``"text"`` the
    embeddings of ``init_token_ids`` (a tokenized text), repeated or cut to n as peft does, for every task.
    """

    def __init__(
        self,
        num_tasks: int,
        num_virtual_tokens: int,
        dim: int,
        init: str = "random",
        *,
        word_embeddings: nn.Embedding | torch.Tensor | None = None,
        init_token_ids: Sequence[int] | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.num_tasks = _positive_int("num_tasks", num_tasks)
        self.num_virtual_tokens = _positive_int("num_virtual_tokens", num_virtual_tokens)
        self.dim = _positive_int("dim", dim)
        if init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
        self.backend = backend
        table = word_embeddings.weight if isinstance(word_embeddings, nn.Embedding) else word_embeddings
        if device is None and table is not None:
            device = table.device
        self.weight = nn.Parameter(
            torch.empty(num_tasks, num_virtual_tokens, dim, dtype=dtype or torch.float32, device=device)
        )
        self.reset_parameters(init, word_embeddings=table, init_token_ids=init_token_ids)

    @torch.no_grad()
    def reset_parameters(
        self,
        init: str = "random",
        *,
        word_embeddings: torch.Tensor | None = None,
        init_token_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        if init == "random":
            nn.init.normal_(self.weight)
            return
        if word_embeddings is None:
            raise ValueError(f"word_embeddings: init={init!r} needs the model's input embeddings, got None")
        if word_embeddings.dim() != 2 or word_embeddings.shape[1] != self.dim:
            raise ValueError(
                f"word_embeddings: expected shape (*, {self.dim}) ([vocab, dim]), "
                f"got {tuple(word_embeddings.shape)}"
            )
        vocab = word_embeddings.shape[0]
        shape = (self.num_tasks, self.num_virtual_tokens)
        if init == "vocab":
            token_ids = torch.randint(0, vocab, shape, device=word_embeddings.device)
        else:
            if init_token_ids is None or len(init_token_ids) == 0:
                raise ValueError("init_token_ids: init='text' needs the token ids of the init text, got none")
            ids = torch.as_tensor(init_token_ids, dtype=torch.int64).reshape(-1)
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"init_token_ids: expected ids in [0, {vocab}), got {ids.tolist()}")
            repeats = math.ceil(self.num_virtual_tokens / ids.numel())
            ids = ids.repeat(repeats)[: self.num_virtual_tokens]
            token_ids = ids.to(word_embeddings.device).expand(shape)
        self.weight.copy_(word_embeddings.detach()[token_ids].to(self.weight.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        embed_weight: torch.Tensor,
        task_ids: torch.Tensor | int = 0,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> PromptConcatOutput:
        """input_ids [B, T] -> (inputs_embeds [B, n+T, D], attention_mask [B, n+T], labels [B, n+T] or None):
        see :func:`peftkern.prompt_concat`."""
        return prompt_concat(
            input_ids, embed_weight, self.weight, task_ids, attention_mask, labels, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_virtual_tokens={self.num_virtual_tokens}, dim={self.dim}"


class PrefixEncoder(nn.Module):
    """Per-task prefix keys and values for every attention layer (prefix tuning).

    Without ``projection_hidden``: ``embedding`` [P, n, L * 2 * H_kv * head_dim], the prefix itself.
    With it (Li & Liang's reparameterisation, as peft's ``prefix_projection``): ``embedding`` [P, n, H_kv *
    head_dim] through ``transform`` = Linear(H_kv*hd, hidden) -> tanh -> Linear(hidden, L*2*H_kv*hd).
    The table is built once per task (P * n rows, not B * n), then ``peftkern.prefix_kv`` gathers each row's
    prefix for all layers in one launch. Column order (layer, key/value, head, head_dim) is peft's.
    """

    def __init__(
        self,
        num_tasks: int,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        projection_hidden: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.num_tasks = _positive_int("num_tasks", num_tasks)
        self.num_virtual_tokens = _positive_int("num_virtual_tokens", num_virtual_tokens)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.projection_hidden = None if projection_hidden is None else _positive_int(
            "projection_hidden", projection_hidden
        )
        self.backend = backend
        kv_dim = num_kv_heads * head_dim
        self.width = num_layers * 2 * kv_dim
        factory = {"dtype": dtype or torch.float32, "device": device}
        if self.projection_hidden is None:
            self.embedding = nn.Parameter(torch.empty(num_tasks, num_virtual_tokens, self.width, **factory))
            self.transform = None
        else:
            self.embedding = nn.Parameter(torch.empty(num_tasks, num_virtual_tokens, kv_dim, **factory))
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, self.projection_hidden, **factory),
                nn.Tanh(),
                nn.Linear(self.projection_hidden, self.width, **factory),
            )
        with torch.no_grad():
            nn.init.normal_(self.embedding)  # nn.Embedding's init, as peft

    def table(self) -> torch.Tensor:
        """The per-task prefix [P, n, L * 2 * H_kv * head_dim] (through the MLP when there is one)."""
        if self.transform is None:
            return self.embedding
        return self.transform(self.embedding)

    def forward(
        self,
        task_ids: torch.Tensor | int = 0,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Each row's prefix: [num_layers, 2, B, H_kv, n, head_dim] (``out[l, 0]`` keys, ``out[l, 1]``
        values of layer l), cast to ``dtype`` (the model's) before the gather: P tables, not B rows."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        table = self.table()
        if dtype is not None:
            table = table.to(dtype)
        return prefix_kv(
            table, task_ids, self.num_layers, self.num_kv_heads, batch_size=batch_size, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, num_virtual_tokens={self.num_virtual_tokens}, "
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"projection_hidden={self.projection_hidden}"
        )


# ---- Hugging Face causal LMs ------------------------------------------------------------------------------


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _task_ids(task_ids: torch.Tensor | int | None, num_tasks: int, batch: int, device) -> torch.Tensor:
    if task_ids is None:
        if num_tasks != 1:
            raise ValueError(f"task_ids: expected one task id per row ({num_tasks} tasks), got None")
        task_ids = 0
    if isinstance(task_ids, int) and not isinstance(task_ids, bool):
        return torch.full((batch,), task_ids, dtype=torch.int64, device=device)
    if isinstance(task_ids, torch.Tensor):
        return task_ids.to(device)
    raise TypeError(f"task_ids: expected an int or a [B] integer tensor, got {type(task_ids).__name__}")


def _shift_positions(
    position_ids: torch.Tensor | None, num_virtual: int, prepend: bool
) -> torch.Tensor | None:
    """Caller's position ids for the tokens, moved past the n virtual positions (and, for prompt tuning,
    preceded by the prompt's own 0..n-1)."""
    if position_ids is None:
        return None
    shifted = position_ids + num_virtual
    if not prepend:
        return shifted
    head = torch.arange(num_virtual, device=position_ids.device, dtype=position_ids.dtype)
    return torch.cat([head.expand(*position_ids.shape[:-1], num_virtual), shifted], dim=-1)


class _SoftPromptModel(nn.Module):
    def __init__(self, model: nn.Module, freeze_base: bool) -> None:
        super().__init__()
        if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
            raise TypeError(
                f"model: expected a Hugging Face causal LM (PreTrainedModel), got {type(model).__name__}"
            )
        self.model = model
        if freeze_base:
            model.requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    def _model_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype


class PromptTuningForCausalLM(_SoftPromptModel):
    """Prompt tuning on a Hugging Face causal LM: each row's soft prompt prepended to its embeddings.

    ``forward(input_ids, attention_mask, labels, task_ids)`` builds inputs_embeds, mask and labels with
    :func:`peftkern.prompt_concat` (one pass) and calls the model; its logits are [B, n+T, vocab] (the
    prompt's positions included, as peft). ``generate`` feeds the prompt at prefill only (the KV cache
    carries it after) and returns ``input_ids`` followed by the new tokens, as peft. In ``generate`` the
    positions come from the extended mask, as transformers does for a plain model, so a left-padded row
    generates what it does unpadded (peft drops position ids there: padded rows differ from peft's).
    The base model is frozen unless ``freeze_base=False``; LoRA layers injected after wrapping stay
    trainable.
    """

    def __init__(
        self,
        model: nn.Module,
        num_tasks: int = 1,
        num_virtual_tokens: int = 8,
        init: str = "random",
        *,
        init_token_ids: Sequence[int] | torch.Tensor | None = None,
        freeze_base: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(model, freeze_base)
        embeddings = model.get_input_embeddings()
        weight = embeddings.weight
        self.prompt = PromptTuningEmbedding(
            num_tasks, num_virtual_tokens, weight.shape[1], init, word_embeddings=weight,
            init_token_ids=init_token_ids, dtype=_adapter_dtype(weight.dtype), device=weight.device,
            backend=backend,
        )

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | int | None = None,
    ) -> PromptConcatOutput:
        """(inputs_embeds [B, n+T, D], attention_mask [B, n+T], labels [B, n+T] or None) for the model."""
        batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else 0
        ids = _task_ids(task_ids, self.prompt.num_tasks, batch, self.prompt.weight.device)
        return self.prompt(input_ids, self.model.get_input_embeddings().weight, ids, attention_mask, labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | int | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        embeds, mask, labels = self.prepare_inputs(input_ids, attention_mask, labels, task_ids)
        position_ids = _shift_positions(position_ids, self.num_virtual_tokens, prepend=True)
        return self.model(
            inputs_embeds=embeds, attention_mask=mask, labels=labels, position_ids=position_ids, **kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Greedy/sampled generation with each row's prompt; returns [B, T + new] token ids."""
        embeds, mask, _ = self.prepare_inputs(input_ids, attention_mask, None, task_ids)
        # From inputs_embeds alone, generate returns only the new tokens: the prompt lives in the cache.
        new_tokens = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)


class PrefixTuningForCausalLM(_SoftPromptModel):
    """Prefix tuning on a Hugging Face causal LM: each row's per-layer prefix keys/values handed to the
    model as a pre-filled ``transformers.DynamicCache`` of n positions (grouped-query attention: the prefix
    has the model's key/value head count), the attention mask extended by n ones, the tokens at positions
    n..n+T-1 (as peft). ``generate`` starts from the same cache. Base frozen unless ``freeze_base=False``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_tasks: int = 1,
        num_virtual_tokens: int = 8,
        projection_hidden: int | None = None,
        *,
        freeze_base: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(model, freeze_base)
        config = _text_config(model)
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        weight = model.get_input_embeddings().weight
        self.prefix = PrefixEncoder(
            num_tasks, num_virtual_tokens, config.num_hidden_layers, num_kv_heads, head_dim,
            projection_hidden, dtype=_adapter_dtype(weight.dtype), device=weight.device, backend=backend,
        )

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens

    def prefix_cache(self, task_ids: torch.Tensor | int | None, batch_size: int):
        """A ``DynamicCache`` holding each row's prefix: n positions in every layer."""
        from transformers import DynamicCache

        ids = _task_ids(task_ids, self.prefix.num_tasks, batch_size, self.prefix.embedding.device)
        kv = self.prefix(ids, dtype=self._model_dtype())
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.prefix.num_layers):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache

    def _extend_mask(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.int64, device=input_ids.device)
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | int | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shown = getattr(input_ids, "shape", type(input_ids).__name__)
            raise ValueError(f"input_ids: expected a [B, T] tensor, got {shown}")
        cache = self.prefix_cache(task_ids, input_ids.shape[0])
        return self.model(
            input_ids=input_ids,
            attention_mask=self._extend_mask(attention_mask, input_ids),
            labels=labels,
            past_key_values=cache,
            position_ids=_shift_positions(position_ids, self.num_virtual_tokens, prepend=False),
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Generation from the prefix cache; returns [B, T + new] token ids."""
        batch, num_virtual = input_ids.shape[0], self.num_virtual_tokens
        cache = self.prefix_cache(task_ids, batch)
        # generate takes a pre-filled cache to stand for the first cache-length tokens of input_ids:
        # n placeholder ids stand for the prefix (never embedded) and are cut from the result.
        placeholder = input_ids.new_zeros(batch, num_virtual)
        out = self.model.generate(
            input_ids=torch.cat([placeholder, input_ids], dim=1),
            attention_mask=self._extend_mask(attention_mask, input_ids),
            past_key_values=cache,
            **kwargs,
        )
        return out[:, num_virtual:]
