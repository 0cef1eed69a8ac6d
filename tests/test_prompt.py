"""prompt_concat (prompt tuning's fused input): every backend against reference.py in float64, outputs and
gradients, odd sizes, mixed tasks, bad input."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, assert_close, cast, greedy_decode_loop

import peftkern
from peftkern import reference

BACKENDS = ["torch", "triton"]
# (B, T, V, D, P, n): B = 1, n = 1, T = 0, odd D, more tasks than rows, rows sharing a task.
SHAPES = [
    (1, 1, 7, 17, 1, 1),
    (3, 5, 11, 33, 4, 3),
    (2, 0, 5, 17, 3, 2),
    (5, 17, 13, 1, 2, 4),
    (4, 33, 37, 17, 6, 1),
    (0, 3, 5, 17, 2, 2),
]


def _inputs(batch, length, vocab, dim, tasks, num_virtual):
    input_ids = torch.randint(0, vocab, (batch, length))
    embed = torch.randn(vocab, dim, dtype=torch.float64)
    prompts = torch.randn(tasks, num_virtual, dim, dtype=torch.float64)
    prompt_ids = torch.randint(0, tasks, (batch,))
    mask = torch.randint(0, 2, (batch, length))
    labels = torch.randint(0, vocab, (batch, length))
    return input_ids, embed, prompts, prompt_ids, mask, labels


def _reference_grads(input_ids, embed, prompts, prompt_ids, grad):
    embed64 = cast(embed, torch.float64, True)
    prompts64 = cast(prompts, torch.float64, True)
    out = reference.prompt_concat(input_ids, embed64, prompts64, prompt_ids)
    out.inputs_embeds.backward(grad.to(torch.float64))
    return out.inputs_embeds, prompts64.grad, embed64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prompt_concat_matches_reference(backend, dtype, shape):
    input_ids, embed, prompts, prompt_ids, mask, labels = _inputs(*shape)
    embed_t = cast(embed, dtype, True)
    prompts_t = cast(prompts, dtype, True)
    out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, backend=backend)
    batch, length = input_ids.shape
    total = prompts.shape[1] + length
    assert out.inputs_embeds.shape == (batch, total, embed.shape[1]) and out.inputs_embeds.dtype == dtype
    ref = reference.prompt_concat(input_ids, embed.to(dtype), prompts.to(dtype), prompt_ids, mask, labels)
    # A copy and a gather: bit-exact, masks and labels too.
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds)
    assert torch.equal(out.attention_mask, ref.attention_mask) and out.attention_mask.dtype == mask.dtype
    assert torch.equal(out.labels, ref.labels)
    assert (out.labels[:, : prompts.shape[1]] == -100).all()

    grad = torch.randn(batch, total, embed.shape[1]).to(dtype)
    out.inputs_embeds.backward(grad)
    _, grad_prompts, grad_embed = _reference_grads(
        input_ids, embed.to(dtype), prompts.to(dtype), prompt_ids, grad
    )
    assert_close(prompts_t.grad, grad_prompts, "dprompts", dtype)
    assert_close(embed_t.grad, grad_embed, "dembed_weight", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_embedding_gets_no_grad_and_unused_tasks_get_zeros(backend):
    input_ids, embed, prompts, _, _, _ = _inputs(4, 6, 9, 17, 5, 3)
    prompt_ids = torch.tensor([3, 0, 3, 3])  # tasks 1, 2, 4 unused; task 3 sums three rows
    embed_t = embed.float()  # frozen
    prompts_t = cast(prompts, torch.float32, True)
    out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, backend=backend)
    assert out.labels is None
    assert out.attention_mask.dtype == torch.int64 and (out.attention_mask == 1).all()
    grad = torch.randn_like(out.inputs_embeds)
    out.inputs_embeds.backward(grad)
    assert embed_t.grad is None
    assert (prompts_t.grad[[1, 2, 4]] == 0).all()
    expected = grad[[0, 2, 3], :3].double().sum(0)
    assert_close(prompts_t.grad[3], expected, "dprompts[3]", torch.float32)
    assert_close(prompts_t.grad[0], grad[1, :3].double(), "dprompts[0]", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_prompts_beside_16bit_model(backend, dtype):
    input_ids, embed, prompts, prompt_ids, _, _ = _inputs(3, 7, 11, 17, 2, 2)
    embed_t = embed.to(dtype)
    prompts_t = cast(prompts, torch.float32, True)
    out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, backend=backend)
    assert out.inputs_embeds.dtype == dtype
    ref = reference.prompt_concat(input_ids, embed_t, prompts_t.detach(), prompt_ids)
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds)
    grad = torch.randn_like(out.inputs_embeds)
    out.inputs_embeds.backward(grad)
    assert prompts_t.grad.dtype == torch.float32
    _, grad_prompts, _ = _reference_grads(input_ids, embed_t, prompts_t.detach(), prompt_ids, grad)
    assert_close(prompts_t.grad, grad_prompts, "dprompts", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_mask_dtypes(backend):
    vocab, dim = 13, 33
    input_ids = torch.randint(0, vocab, (7, 3)).T  # [3, 7], strided
    embed_big = torch.randn(vocab, 2 * dim)
    embed_leaf = embed_big.detach().clone().requires_grad_()
    embed = embed_leaf[:, ::2]
    prompts_leaf = torch.randn(2, 4, 3, dim).requires_grad_()
    prompts = prompts_leaf[:, :, 1]  # [2, 4, dim], strided
    prompt_ids = torch.tensor([1, 0, 1, 0, 1, 1])[::2]  # [3], stride 2
    mask = torch.randint(0, 2, (7, 3)).bool().T
    labels = torch.randint(0, vocab, (7, 3), dtype=torch.int32).T
    out = peftkern.prompt_concat(input_ids, embed, prompts, prompt_ids, mask, labels, backend=backend)
    ref = reference.prompt_concat(input_ids, embed.detach(), prompts.detach(), prompt_ids, mask, labels)
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds)
    assert out.attention_mask.dtype == torch.bool and torch.equal(out.attention_mask, ref.attention_mask)
    assert out.labels.dtype == torch.int32 and torch.equal(out.labels, ref.labels)
    grad = torch.randn(3, 11, 2 * dim)[:, :, ::2]  # strided upstream gradient
    out.inputs_embeds.backward(grad)
    _, grad_prompts, grad_embed = _reference_grads(
        input_ids, embed.detach(), prompts.detach(), prompt_ids, grad
    )
    assert_close(prompts_leaf.grad[:, :, 1], grad_prompts, "dprompts", torch.float32)
    assert_close(embed_leaf.grad[:, ::2], grad_embed, "dembed_weight", torch.float32)
    assert (embed_leaf.grad[:, 1::2] == 0).all() and (prompts_leaf.grad[:, :, [0, 2]] == 0).all()

    float_mask = torch.rand(3, 7)
    out = peftkern.prompt_concat(input_ids, embed, prompts, prompt_ids, float_mask, backend=backend)
    assert torch.equal(out.attention_mask, reference.prompt_concat(
        input_ids, embed.detach(), prompts.detach(), prompt_ids, float_mask).attention_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_int_prompt_id_and_expanded_gradient(backend):
    input_ids = torch.randint(0, 5, (3, 4))
    embed = torch.randn(5, 17)
    prompts = torch.randn(3, 2, 17, requires_grad=True)
    out = peftkern.prompt_concat(input_ids, embed, prompts, 2, backend=backend)
    assert torch.equal(out.inputs_embeds[:, :2], prompts.detach()[2].expand(3, 2, 17))
    out.inputs_embeds.sum().backward()  # expanded (stride 0) gradient
    assert torch.equal(prompts.grad[2], torch.full((2, 17), 3.0)) and (prompts.grad[:2] == 0).all()


def test_triton_backward_is_deterministic():
    input_ids = torch.randint(0, 4, (16, 9))  # few ids: many rows per token, several rows per task
    prompt_ids = torch.randint(0, 2, (16,))
    embed = torch.randn(4, 33, requires_grad=True)
    prompts = torch.randn(2, 3, 33, requires_grad=True)
    grad = torch.randn(16, 12, 33)
    results = []
    for _ in range(2):
        embed.grad = prompts.grad = None
        out = peftkern.prompt_concat(input_ids, embed, prompts, prompt_ids, backend="triton")
        out.inputs_embeds.backward(grad)
        results.append((embed.grad.clone(), prompts.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_embed_grad_of_a_token_seen_many_times(dtype):
    """A padding id filling most positions spans many chunks of the sorted order (the interpreter's chunk is
    8 positions): its gradient sums chunk partials plus leftover rows; equal to the reference, and bit-equal
    across runs. Other ids are short (no full chunk) or straddle chunk boundaries."""
    from peftkern.triton_kernels.prompt import _embed_chunk

    batch, length, vocab, dim = 5, 23, 9, 33
    input_ids = torch.randint(1, vocab, (batch, length))
    input_ids[torch.rand(batch, length) < 0.8] = 0  # ~90 of 115 positions: over 10 chunks
    input_ids[0, :3] = 7  # a short segment
    chunk, _ = _embed_chunk(input_ids.numel())
    assert (input_ids == 0).sum() > 4 * chunk
    embed = torch.randn(vocab, dim).to(dtype).requires_grad_()
    prompts = torch.randn(2, 3, dim).to(dtype)
    prompt_ids = torch.tensor([0, 1, 1, 0, 1])
    grad = torch.randn(batch, 3 + length, dim).to(dtype)
    results = []
    for _ in range(2):
        embed.grad = None
        out = peftkern.prompt_concat(input_ids, embed, prompts, prompt_ids, backend="triton")
        out.inputs_embeds.backward(grad)
        results.append(embed.grad.clone())
    _, _, grad_embed = _reference_grads(input_ids, embed.detach(), prompts, prompt_ids, grad)
    assert_close(results[0], grad_embed, "dembed_weight", dtype)
    assert torch.equal(results[0], results[1])


def test_kernel_never_reads_out_of_bounds_ids():
    """The op rejects bad ids; the kernel, called directly with them, reads nothing and writes zeros."""
    from peftkern.triton_kernels.prompt import prompt_concat_forward

    embed = torch.randn(5, 17)
    prompts = torch.randn(2, 3, 17)
    input_ids = torch.tensor([[0, 5, -1, 4], [2**40, 1, 3, -(2**40)]])
    prompt_ids = torch.tensor([2, -7])
    out, mask, _ = prompt_concat_forward(input_ids, embed, prompts, prompt_ids, None, None)
    assert (out[:, :3] == 0).all()
    assert (out[0, [4, 5]] == 0).all() and (out[1, [3, 6]] == 0).all()
    assert torch.equal(out[0, 3], embed[0]) and torch.equal(out[0, 6], embed[4])
    assert torch.equal(out[1, 4], embed[1]) and torch.equal(out[1, 5], embed[3])
    assert (mask == 1).all()
    # The same through the public op with the host-side check switched off (no sync, e.g. in a CUDA graph).
    public = peftkern.prompt_concat(input_ids, embed, prompts, prompt_ids, backend="triton", check_ids=False)
    assert torch.equal(public.inputs_embeds, out)


def test_prompt_concat_opcheck_gradcheck_and_compile():
    input_ids = torch.randint(0, 6, (3, 4))
    embed = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    prompts = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    prompt_ids = torch.tensor([1, 0, 1])
    mask = torch.ones(3, 4, dtype=torch.int64)
    labels = torch.randint(0, 6, (3, 4))
    op = torch.ops.peftkern.prompt_concat.default
    torch.library.opcheck(op, (input_ids, embed, prompts, prompt_ids, mask, labels, "torch"))
    torch.library.opcheck(op, (input_ids, embed, prompts, prompt_ids, None, None, "torch"))
    fn = lambda e, p: peftkern.prompt_concat(input_ids, e, p, prompt_ids, backend="torch").inputs_embeds
    assert torch.autograd.gradcheck(fn, (embed, prompts))

    compiled = torch.compile(
        lambda e, p: peftkern.prompt_concat(input_ids, e, p, prompt_ids, mask, labels, backend="torch"),
        fullgraph=True,
    )
    out = compiled(embed, prompts)
    ref = reference.prompt_concat(input_ids, embed, prompts, prompt_ids, mask, labels)
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds) and torch.equal(out.labels, ref.labels)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(prompt_ids=torch.tensor([0, 3])), ValueError, "prompt_ids: expected ids in \\[0, 3\\)"),
        (dict(prompt_ids=torch.tensor([-1, 0])), ValueError, "prompt_ids"),
        (dict(input_ids=torch.tensor([[0, 1, 7], [0, 0, 0]])), ValueError, "input_ids: expected ids in"),
        (dict(prompts=torch.randn(3, 2, 9)), ValueError, "prompts: expected shape"),
        (dict(prompts=torch.randn(3, 0, 8)), ValueError, "prompts"),
        (dict(prompt_ids=torch.tensor([0, 1, 2])), ValueError, "prompt_ids: expected shape"),
        (dict(attention_mask=torch.ones(2, 4)), ValueError, "attention_mask: expected shape"),
        (dict(labels=torch.ones(2, 3)), TypeError, "labels: expected dtype"),
        (dict(input_ids=torch.ones(2, 3)), TypeError, "input_ids: expected dtype"),
        (dict(prompt_ids=torch.tensor([0.0, 1.0])), TypeError, "prompt_ids: expected dtype"),
        (dict(prompts=torch.randn(3, 2, 8, dtype=torch.float16)), TypeError, "prompts: expected the dtype"),
        (dict(embed_weight=torch.randn(7, 8).long()), TypeError, "embed_weight: expected dtype"),
        (dict(input_ids=torch.zeros(2, 3, 1, dtype=torch.int64)), ValueError, "input_ids: expected 2 dim"),
        (dict(backend="cuda"), ValueError, "needs CUDA tensors"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
def test_prompt_concat_bad_input(change, error, match):
    args = dict(
        input_ids=torch.zeros(2, 3, dtype=torch.int64),
        embed_weight=torch.randn(7, 8),
        prompts=torch.randn(3, 2, 8),
        prompt_ids=torch.tensor([0, 2]),
        attention_mask=None,
        labels=None,
        backend="triton",
    )
    args.update(change)
    with pytest.raises(error, match=match):
        peftkern.prompt_concat(**args)


def test_float64_needs_torch_backend():
    with pytest.raises(TypeError, match="backend 'triton' does not support"):
        peftkern.prompt_concat(torch.zeros(1, 2, dtype=torch.int64), torch.randn(3, 4, dtype=torch.float64),
                               torch.randn(1, 1, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.int64),
                               backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_concat_triton_on_gpu(dtype):
    input_ids, embed, prompts, prompt_ids, mask, labels = _inputs(8, 300, 1000, 4096 + 8, 3, 17)
    embed_t = cast(embed.cuda(), dtype, True)
    prompts_t = cast(prompts.cuda(), dtype, True)
    ids, pids = input_ids.cuda(), prompt_ids.cuda()
    out = peftkern.prompt_concat(ids, embed_t, prompts_t, pids, mask.cuda(), labels.cuda(), backend="triton")
    ref = reference.prompt_concat(ids, embed_t.detach(), prompts_t.detach(), pids, mask.cuda(), labels.cuda())
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds) and torch.equal(out.labels, ref.labels)
    grad = torch.randn_like(out.inputs_embeds)
    out.inputs_embeds.backward(grad)
    _, grad_prompts, grad_embed = _reference_grads(ids, embed_t.detach(), prompts_t.detach(), pids, grad)
    assert_close(prompts_t.grad, grad_prompts, "dprompts", dtype)
    assert_close(embed_t.grad, grad_embed, "dembed_weight", dtype)


# ---- prompt tuning on a Hugging Face causal LM, against peft -----------------------------------------------


def _tiny_llama(seed: int = 0, initializer_range: float = 0.02):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=initializer_range,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _peft_prompt_model(base, num_virtual):
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual)
    return peft.get_peft_model(base, config).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_tuning_matches_peft(backend):
    import copy
    import warnings

    base = _tiny_llama()
    ours = peftkern.PromptTuningForCausalLM(
        copy.deepcopy(base), num_tasks=3, num_virtual_tokens=4, backend=backend
    )
    theirs = _peft_prompt_model(base, 4)
    their_prompt = theirs.prompt_encoder["default"].embedding.weight
    input_ids = torch.randint(0, 61, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[2, :2] = 0  # left padding
    labels = input_ids.clone()
    labels[2, :2] = -100
    task_ids = torch.tensor([2, 0, 1])
    losses = []
    for row, task in enumerate(task_ids.tolist()):
        with torch.no_grad():
            their_prompt.copy_(ours.prompt.weight[task])
        their_prompt.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = theirs(input_ids=input_ids[row:row + 1], attention_mask=mask[row:row + 1],
                         labels=labels[row:row + 1])
        out.loss.backward()
        losses.append((out.logits.detach(), their_prompt.grad.clone()))

    for row in range(3):  # one row at a time: peft's loss averages over its own batch
        ours.prompt.weight.grad = None
        out = ours(input_ids[row:row + 1], mask[row:row + 1], labels[row:row + 1], task_ids[row:row + 1])
        assert_close(out.logits, losses[row][0], f"logits[{row}]", torch.float32)
        out.loss.backward()
        task = task_ids[row].item()
        assert_close(ours.prompt.weight.grad[task], losses[row][1], f"dprompt[{row}]", torch.float32)
        assert (ours.prompt.weight.grad[[t for t in range(3) if t != task]] == 0).all()
    mixed = ours(input_ids, mask, task_ids=task_ids)  # a batch mixing three tasks
    for row in range(3):
        assert_close(mixed.logits[row], losses[row][0][0], f"mixed logits[{row}]", torch.float32)
    # The base stays frozen; only the prompts train.
    assert [name for name, p in ours.named_parameters() if p.requires_grad] == ["prompt.weight"]


def test_prompt_tuning_generate_matches_peft():
    import copy
    import warnings

    base = _tiny_llama(1)
    ours = peftkern.PromptTuningForCausalLM(copy.deepcopy(base), num_tasks=2, num_virtual_tokens=3)
    theirs = _peft_prompt_model(base, 3)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prompt.weight[1])
    input_ids = torch.randint(0, 61, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The truth is greedy decoding through peft's forward; peft's own generate is only a second opinion
        # (it disagrees with its forward on transformers 5.24 + peft 0.21.2).
        expected = greedy_decode_loop(theirs, input_ids, mask, 6)
        their_generate = theirs.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=6,
                                         do_sample=False)
        got = ours.generate(input_ids, mask, task_ids=1, max_new_tokens=6, do_sample=False)
    assert got.shape == (2, 11) and torch.equal(got, expected)
    if not torch.equal(their_generate, expected):
        warnings.warn("peft's generate disagrees with greedy decoding through peft's forward", stacklevel=1)


def test_prompt_tuning_position_ids_and_inits():
    base = _tiny_llama(2)
    model = peftkern.PromptTuningForCausalLM(base, num_tasks=1, num_virtual_tokens=2)
    input_ids = torch.randint(0, 61, (2, 4))
    default = model(input_ids).logits
    explicit = model(input_ids, position_ids=torch.arange(4).expand(2, 4)).logits
    assert_close(explicit, default, "logits with explicit position ids", torch.float32)
    with pytest.raises(ValueError, match="task_ids"):
        peftkern.PromptTuningForCausalLM(_tiny_llama(), num_tasks=2, num_virtual_tokens=2)(input_ids)

    table = base.get_input_embeddings().weight
    text = peftkern.PromptTuningEmbedding(2, 5, 64, "text", word_embeddings=table, init_token_ids=[3, 7])
    assert torch.equal(text.weight[1], table.detach()[[3, 7, 3, 7, 3]])
    vocab = peftkern.PromptTuningEmbedding(3, 4, 64, "vocab", word_embeddings=base.get_input_embeddings())
    rows = vocab.weight.detach().reshape(-1, 64)
    assert all((table.detach() == row).all(-1).any() for row in rows)
    with pytest.raises(ValueError, match="word_embeddings"):
        peftkern.PromptTuningEmbedding(1, 2, 64, "vocab")
    with pytest.raises(ValueError, match="init_token_ids"):
        peftkern.PromptTuningEmbedding(1, 2, 64, "text", word_embeddings=table, init_token_ids=[61])
    with pytest.raises(ValueError, match="init"):
        peftkern.PromptTuningEmbedding(1, 2, 64, "zeros")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        peftkern.PromptTuningEmbedding(1, 0, 64)


def test_lora_and_prompt_tuning_train_together():
    """LoRA on q_proj/v_proj and a soft prompt per task, one optimiser: both get gradients, the loss falls."""
    # Weights large enough that a frozen lm_head can express a confident answer (0.02 caps logits near 1).
    base = _tiny_llama(4, initializer_range=0.2)
    model = peftkern.PromptTuningForCausalLM(base, num_tasks=2, num_virtual_tokens=4, backend="triton")
    # LoRA injected after wrapping, so the wrapper's freeze of the base leaves it trainable.
    for layer in base.model.layers:
        layer.self_attn.q_proj = peftkern.LoRALinear.from_linear(layer.self_attn.q_proj, r=4, alpha=8)
        layer.self_attn.v_proj = peftkern.LoRALinear.from_linear(layer.self_attn.v_proj, r=4, alpha=8)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"prompt.weight"} | {
        f"model.model.layers.{i}.self_attn.{proj}.lora_{ab}"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in "AB"
    }
    input_ids = torch.randint(0, 61, (4, 8))
    task_ids = torch.tensor([0, 1, 0, 1])
    labels = torch.where(task_ids[:, None] == 0, 5, 9).expand(4, 8)  # each task answers its own token
    optimiser = torch.optim.Adam(trainable.values(), lr=5e-2)
    model.train()
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = model(input_ids, labels=labels, task_ids=task_ids).loss
        loss.backward()
        for name, p in trainable.items():
            if name.endswith("lora_A") and not losses:
                continue  # B starts at zero, so A's first gradient is zero by design
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_prompt_tuning_generate_is_left_padding_invariant():
    """A left-padded row generates what it generates unpadded: generate takes positions from the extended
    mask (as transformers does for a plain model). peft's prompt-tuning generate does not (it drops position
    ids), so for padded rows this is where the two differ; unpadded rows equal peft (test above)."""
    base = _tiny_llama(5, initializer_range=0.2)
    model = peftkern.PromptTuningForCausalLM(base, num_tasks=2, num_virtual_tokens=3)
    input_ids = torch.randint(0, 61, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    task_ids = torch.tensor([0, 1])
    padded = model.generate(input_ids, mask, task_ids=task_ids, max_new_tokens=5, do_sample=False)
    alone = model.generate(input_ids[1:, 2:], task_ids=task_ids[1:], max_new_tokens=5, do_sample=False)
    assert torch.equal(padded[1, 6:], alone[0, 4:])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_prompt_concat_offsets_past_int32_on_gpu(backend):
    """An embedding table of more than 2**31 elements: rows near its end are read and written back exactly."""
    vocab, dim = 2**20 + 3, 2048
    embed = torch.zeros(vocab, dim, dtype=torch.bfloat16, device="cuda")
    embed[-3:] = torch.randn(3, dim, device="cuda").to(torch.bfloat16)
    embed.requires_grad_()
    prompts = torch.randn(1, 2, dim, device="cuda", requires_grad=True)
    input_ids = torch.tensor([[vocab - 1, vocab - 3, vocab - 1]], device="cuda")
    out = peftkern.prompt_concat(input_ids, embed, prompts, 0, backend=backend)
    assert torch.equal(out.inputs_embeds[0, 2], embed.detach()[vocab - 1])
    assert torch.equal(out.inputs_embeds[0, 3], embed.detach()[vocab - 3])
    grad = torch.randn_like(out.inputs_embeds)
    out.inputs_embeds.backward(grad)
    expected = grad[0, 2].double() + grad[0, 4].double()
    assert_close(embed.grad[vocab - 1], expected, "dembed[-1]", torch.bfloat16)
    assert (embed.grad[: vocab - 3] == 0).all()
