"""prefix_kv (prefix tuning's per-row keys/values for all layers): every backend against reference.py in
float64, outputs and gradients, odd sizes, mixed tasks, bad input."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPES, assert_close, cast, greedy_decode_loop

import peftkern
from peftkern import reference

BACKENDS = ["torch", "triton"]
# (P, n, L, H_kv, head_dim, B)
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (3, 5, 2, 2, 17, 4),
    (4, 1, 3, 1, 8, 7),
    (2, 17, 1, 3, 5, 1),
    (2, 3, 2, 1, 4, 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_prefix_kv_matches_reference(backend, dtype, shape):
    tasks, num_virtual, layers, heads, head_dim, batch = shape
    prefix = torch.randn(tasks, num_virtual, layers * 2 * heads * head_dim, dtype=torch.float64)
    prompt_ids = torch.randint(0, tasks, (batch,))
    prefix_t = cast(prefix, dtype, True)
    out = peftkern.prefix_kv(prefix_t, prompt_ids, layers, heads, backend=backend)
    assert out.shape == (layers, 2, batch, heads, num_virtual, head_dim) and out.is_contiguous()
    assert torch.equal(out, reference.prefix_kv(prefix.to(dtype), prompt_ids, layers, heads))
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    prefix64 = cast(prefix.to(dtype), torch.float64, True)
    reference.prefix_kv(prefix64, prompt_ids, layers, heads).backward(grad.double())
    assert_close(prefix_t.grad, prefix64.grad, "dprefix", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_kv_layout_is_peft_layout_and_grads_sum_per_task(backend):
    """Column (layer, key/value, head, e) of a task's table is out[layer, key/value, row, head, :, e]."""
    tasks, num_virtual, layers, heads, head_dim = 3, 2, 2, 2, 3
    prefix = torch.randn(tasks, num_virtual, layers, 2, heads, head_dim, requires_grad=True)
    prompt_ids = torch.tensor([2, 2, 0, 2])
    out = peftkern.prefix_kv(prefix.flatten(2), prompt_ids, layers, heads, backend=backend)
    for row, task in enumerate(prompt_ids.tolist()):
        for layer in range(layers):
            for kv in range(2):
                expected = prefix.detach()[task, :, layer, kv].transpose(0, 1)  # [H, n, hd]
                assert torch.equal(out[layer, kv, row], expected)
    out.sum().backward()
    assert torch.equal(prefix.grad[2], torch.full_like(prefix.grad[2], 3.0))
    assert torch.equal(prefix.grad[0], torch.ones_like(prefix.grad[0])) and (prefix.grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_kv_strided_inputs(backend):
    base = torch.randn(2, 3, 2 * 2 * 2 * 5 * 2, requires_grad=True)
    prefix = base[:, :, ::2]  # [2, 3, 40], stride 2 in the last dim
    prompt_ids = torch.tensor([1, 0, 1, 1, 0, 0])[::2]
    out = peftkern.prefix_kv(prefix, prompt_ids, 2, 2, backend=backend)
    assert torch.equal(out, reference.prefix_kv(prefix.detach(), prompt_ids, 2, 2))
    grad = torch.randn(2, 2, 3, 2, 3, 10)[..., ::2]  # strided gradient
    out.backward(grad)
    prefix64 = prefix.detach().double().requires_grad_()
    reference.prefix_kv(prefix64, prompt_ids, 2, 2).backward(grad.double())
    assert_close(base.grad[:, :, ::2], prefix64.grad, "dprefix", torch.float32)
    assert (base.grad[:, :, 1::2] == 0).all()


def test_prefix_kv_kernel_never_reads_out_of_bounds_ids():
    prefix = torch.randn(2, 3, 16)
    prompt_ids = torch.tensor([1, 2, -1, 2**40])
    out = peftkern.prefix_kv(prefix, prompt_ids, 2, 2, backend="triton", check_ids=False)
    assert (out[:, :, 1:] == 0).all()
    assert torch.equal(out[:, :, :1], reference.prefix_kv(prefix, torch.tensor([1]), 2, 2))


def test_prefix_kv_single_int_id_opcheck_and_gradcheck():
    prefix = torch.randn(2, 3, 2 * 2 * 1 * 4, dtype=torch.float64, requires_grad=True)
    out = peftkern.prefix_kv(prefix, 1, 2, 1, batch_size=3, backend="torch")
    assert out.shape == (2, 2, 3, 1, 3, 4)
    prompt_ids = torch.tensor([1, 0, 1])
    torch.library.opcheck(torch.ops.peftkern.prefix_kv.default, (prefix, prompt_ids, 2, 1, "torch"))
    fn = lambda p: peftkern.prefix_kv(p, prompt_ids, 2, 1, backend="torch")
    assert torch.autograd.gradcheck(fn, (prefix,))
    compiled = torch.compile(fn, fullgraph=True)
    assert torch.equal(compiled(prefix), reference.prefix_kv(prefix, prompt_ids, 2, 1))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt_ids=torch.tensor([0, 2])), ValueError, "prompt_ids: expected ids in \\[0, 2\\)"),
        (dict(prompt_ids=torch.tensor([0.0])), TypeError, "prompt_ids: expected dtype"),
        (dict(num_layers=3), ValueError, "prefix: expected a last dim"),
        (dict(num_kv_heads=0), ValueError, "num_kv_heads: expected a positive int"),
        (dict(prefix=torch.randn(2, 3, 16).long()), TypeError, "prefix: expected dtype"),
        (dict(prefix=torch.randn(2, 16)), ValueError, "prefix: expected 3 dim"),
        (dict(prompt_ids=1), ValueError, "batch_size"),
        (dict(backend="cuda"), ValueError, "needs CUDA tensors"),
    ],
)
def test_prefix_kv_bad_input(kwargs, error, match):
    args = dict(prefix=torch.randn(2, 3, 16), prompt_ids=torch.tensor([0, 1]), num_layers=2, num_kv_heads=2,
                backend="triton")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        peftkern.prefix_kv(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_kv_triton_on_gpu(dtype):
    prefix = torch.randn(5, 33, 32 * 2 * 8 * 128, device="cuda").to(dtype).requires_grad_()
    prompt_ids = torch.randint(0, 5, (64,), device="cuda")
    out = peftkern.prefix_kv(prefix, prompt_ids, 32, 8, backend="triton")
    assert torch.equal(out, reference.prefix_kv(prefix.detach(), prompt_ids, 32, 8))
    grad = torch.randn_like(out)
    out.backward(grad)
    prefix64 = prefix.detach().double().requires_grad_()
    reference.prefix_kv(prefix64, prompt_ids, 32, 8).backward(grad.double())
    assert_close(prefix.grad, prefix64.grad, "dprefix", dtype)


# ---- prefix tuning on a Hugging Face causal LM, against peft -----------------------------------------------


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,  # GQA: 2 key/value heads for 4 query heads
    )
    return transformers.LlamaForCausalLM(config).eval()


def _peft_prefix_model(base, num_virtual, projection_hidden):
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual,
        prefix_projection=projection_hidden is not None,
        encoder_hidden_size=projection_hidden or 64,
    )
    return peft.get_peft_model(base, config).eval()


def _copy_into_peft(ours, theirs, task):
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(ours.prefix.embedding[task])
        if ours.prefix.transform is not None:
            for mine, their in zip(ours.prefix.transform, encoder.transform):
                for name, param in mine.named_parameters():
                    getattr(their, name).copy_(param)


@pytest.mark.parametrize("backend, projection_hidden", [("torch", None), ("triton", None), ("triton", 24)])
def test_prefix_tuning_matches_peft(backend, projection_hidden):
    import copy
    import warnings

    base = _tiny_llama()
    ours = peftkern.PrefixTuningForCausalLM(
        copy.deepcopy(base), num_tasks=3, num_virtual_tokens=4, projection_hidden=projection_hidden,
        backend=backend,
    )
    assert ours.prefix.num_kv_heads == 2 and ours.prefix.head_dim == 16
    theirs = _peft_prefix_model(base, 4, projection_hidden)
    their_params = [p for p in theirs.prompt_encoder["default"].parameters()]
    input_ids = torch.randint(0, 61, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, :3] = 0  # left padding
    labels = input_ids.clone()
    task_ids = torch.tensor([1, 2, 1])
    expected = []
    for row, task in enumerate(task_ids.tolist()):
        _copy_into_peft(ours, theirs, task)
        for p in their_params:
            p.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = theirs(input_ids=input_ids[row:row + 1], attention_mask=mask[row:row + 1],
                         labels=labels[row:row + 1])
        out.loss.backward()
        expected.append((out.logits.detach(), theirs.prompt_encoder["default"].embedding.weight.grad.clone()))
    for row, task in enumerate(task_ids.tolist()):
        ours.prefix.zero_grad(set_to_none=True)
        out = ours(input_ids[row:row + 1], mask[row:row + 1], labels[row:row + 1], task_ids[row:row + 1])
        assert_close(out.logits, expected[row][0], f"logits[{row}]", torch.float32)
        out.loss.backward()
        assert_close(ours.prefix.embedding.grad[task], expected[row][1], f"dprefix[{row}]", torch.float32)
        others = [t for t in range(3) if t != task]
        assert (ours.prefix.embedding.grad[others] == 0).all()
    mixed = ours(input_ids, mask, task_ids=task_ids)
    for row in range(3):
        assert_close(mixed.logits[row], expected[row][0][0], f"mixed logits[{row}]", torch.float32)
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("prefix.") for name in trainable)


@pytest.mark.parametrize("projection_hidden", [None, 24])
def test_prefix_tuning_generate_matches_peft(projection_hidden):
    import copy
    import warnings

    base = _tiny_llama(3)
    ours = peftkern.PrefixTuningForCausalLM(copy.deepcopy(base), num_tasks=2, num_virtual_tokens=3,
                                           projection_hidden=projection_hidden)
    theirs = _peft_prefix_model(base, 3, projection_hidden)
    _copy_into_peft(ours, theirs, 1)
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


def test_prefix_encoder_shapes_and_bad_input():
    encoder = peftkern.PrefixEncoder(3, 2, num_layers=4, num_kv_heads=2, head_dim=8, projection_hidden=16)
    assert encoder.table().shape == (3, 2, 4 * 2 * 2 * 8)
    out = encoder(torch.tensor([2, 0]), dtype=torch.float16)
    assert out.shape == (4, 2, 2, 2, 2, 8) and out.dtype == torch.float16
    assert torch.equal(out, reference.prefix_kv(encoder.table().detach().half(), torch.tensor([2, 0]), 4, 2))
    with pytest.raises(ValueError, match="num_kv_heads"):
        peftkern.PrefixEncoder(1, 2, 2, 0, 8)
    with pytest.raises(ValueError, match="projection_hidden"):
        peftkern.PrefixEncoder(1, 2, 2, 2, 8, projection_hidden=0)
    with pytest.raises(ValueError, match="prompt_ids: expected ids in"):
        encoder(torch.tensor([3]))


def test_prefix_tuning_generate_is_left_padding_invariant():
    import transformers

    torch.manual_seed(5)
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2,
    )
    model = peftkern.PrefixTuningForCausalLM(transformers.LlamaForCausalLM(config).eval(), 2, 3)
    input_ids = torch.randint(0, 61, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    task_ids = torch.tensor([0, 1])
    padded = model.generate(input_ids, mask, task_ids=task_ids, max_new_tokens=5, do_sample=False)
    alone = model.generate(input_ids[1:, 2:], task_ids=task_ids[1:], max_new_tokens=5, do_sample=False)
    assert torch.equal(padded[1, 6:], alone[0, 4:])
