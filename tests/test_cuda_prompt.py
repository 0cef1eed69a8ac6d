"""The CUDA C++ soft-prompt kernels (csrc/include/peftkern/prompt.cuh): on the CPU emulator (every launcher,
path and layout, under AddressSanitizer), the bindings' argument checks, and (on a GPU) prompt_concat and
prefix_kv on backend "cuda" against the float64 reference and the Triton backend, outputs and gradients."""

from __future__ import annotations

import _emulator
import pytest
import torch
from _helpers import DTYPES, assert_close, capture_in_cuda_graph, cast, cuda_ext, needs_extension

import peftkern
from peftkern import reference

# ---- CPU: the emulator, the bindings ----------------------------------------------------------------------


def test_prompt_kernels_on_the_cpu_emulator_match_float64_and_stay_in_bounds(tmp_path):
    """prompt.cuh's launchers on the CPU emulation of the CUDA model (tests/cuda_emulator/prompt_emulated.cpp):
    prompt_concat forward (embeddings, mask in every width, labels), dprompts (with and without batch splits),
    dembed, prefix_kv forward and backward; odd widths, B = 0 / 1, n = 1, T = 0, out-of-range ids, the
    16-byte and element paths (each case checks the path its layout allows), every dtype pairing, buffers
    sized exactly to their strides under AddressSanitizer. Copies must be bit-exact."""
    binary = _emulator.build(tmp_path, "prompt_emulated")
    assert _emulator.emulated_headers(tmp_path)["prompt.cuh"] >= 6
    # PEFTKERN_EMULATE_FULL=1: every case for every dtype pairing (68 cases) instead of CI's 38.
    expected = "68 cases, 0 failures" if _emulator.FULL else "38 cases, 0 failures"
    assert _emulator.run(binary).strip().endswith(expected)


def _forward_args(ext, **override):
    args = dict(
        dtype=ext.FLOAT16, prompts_dtype=ext.FLOAT16, input_ids=16, input_ids_strides=(5, 1), input_ids_bytes=8,
        prompt_ids=16, prompt_ids_stride=1, prompt_ids_bytes=8, embed=16, embed_strides=(8, 1), prompts=16,
        prompts_strides=(16, 8, 1), out=16, out_strides=(56, 8, 1), mask=0, mask_strides=(0, 0), mask_bytes=8,
        mask_one=1, mask_out=16, labels=0, labels_strides=(0, 0), labels_bytes=8, label_fill=2**64 - 100,
        labels_out=0, B=3, T=5, n=2, D=8, V=11, P=4, device=0, stream=0,
    )
    args.update(override)
    return args


@needs_extension
@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"dtype": 9}, r"dtype: expected a code in"),
        ({"prompts_dtype": 1}, r"prompts_dtype: expected the table's dtype \(float16\) or float32"),
        ({"B": -1}, r"B: expected a size >= 0"),
        ({"n": 0}, r"n: expected a size >= 1"),
        ({"P": 0}, r"P: expected a size >= 1"),
        ({"input_ids_bytes": 2}, r"input_ids: expected int32 or int64 ids"),
        ({"prompt_ids_bytes": 1}, r"prompt_ids: expected int32 or int64 ids"),
        ({"input_ids": 0}, r"input_ids: expected a device address, got 0 for 15 elements"),
        ({"prompt_ids": 0}, r"prompt_ids: expected a device address"),
        ({"embed": 0}, r"embed: expected a device address"),
        ({"prompts": 0}, r"prompts: expected a device address"),
        ({"out": 0}, r"out: expected a device address"),
        ({"mask_out": 0}, r"mask_out: expected a device address"),
        ({"mask_bytes": 3}, r"mask_bytes: expected an element size of 1, 2, 4 or 8 bytes"),
        ({"labels": 16, "labels_bytes": 2}, r"labels_bytes: expected int32 or int64 labels"),
        ({"labels": 16}, r"labels_out: expected a device address"),
        ({"labels_out": 16}, r"labels: expected a device address"),
        ({"device": -1}, r"device: expected a CUDA device index >= 0"),
    ],
)
def test_prompt_concat_binding_checks_arguments_before_any_launch(override, pattern):
    ext = cuda_ext()
    with pytest.raises(ValueError, match=pattern):
        ext.prompt_concat_forward(**_forward_args(ext, **override))


@needs_extension
def test_prompt_bindings_empty_work_touches_no_device():
    """No rows (or no table) is a no-op that returns before any CUDA call: it works without a GPU."""
    ext = cuda_ext()
    assert ext.prompt_concat_forward(**_forward_args(ext, B=0, input_ids=0, prompt_ids=0, out=0, mask_out=0)) is None
    assert ext.prompt_task_sum(ext.FLOAT32, ext.FLOAT32, 0, (0, 0, 0, 0, 1), 16, 1, 8, 0, 0, 0,
                               5, 3, 2, 0, 1, 1, 0, 0) is None
    assert ext.prompt_embed_grad(ext.BFLOAT16, 0, (0, 0, 1), 16, 16, 0, 2, 3, 1, 0, 7, 0, 0) is None
    assert ext.prefix_kv_forward(ext.FLOAT32, 16, (8, 8, 1), 0, 1, 8, 0, (0, 0, 0, 0, 1), 0, 2, 1, 8, 2, 2,
                                 0, 0) is None


@needs_extension
def test_prompt_backward_bindings_check_arguments_before_any_launch():
    ext = cuda_ext()
    # The task sum: out dtype, column split, workspace size.
    task = dict(dtype=ext.BFLOAT16, out_dtype=ext.FLOAT32, grad=16, grad_strides=(64, 8, 0, 0, 1), prompt_ids=16,
                prompt_ids_stride=1, prompt_ids_bytes=8, out=16, workspace=0, workspace_floats=0, B=2, P=3, n=2,
                C=8, inner1=1, inner0=8, device=0, stream=0)
    cases = [
        ({"out_dtype": ext.FLOAT16}, r"out_dtype: expected the table's dtype \(bfloat16\) or float32"),
        ({"inner0": 3}, r"C: expected a multiple of inner1 \* inner0 = 3, got 8"),
        ({"inner1": 0}, r"inner1: expected a size >= 1"),
        ({"grad": 0}, r"grad: expected a device address"),
        ({"out": 0}, r"out: expected a device address"),
        ({"prompt_ids_bytes": 3}, r"prompt_ids: expected int32 or int64 ids"),
        ({"C": -8}, r"C: expected a size >= 0"),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ext.prompt_task_sum(**{**task, **override})
    # One prompt and a large batch: the batch splits, and the workspace must hold the fp32 partials.
    needed = ext.prompt_task_sum_workspace_floats(4096, 1, 2, 64)
    assert needed > 0 and needed % (2 * 64) == 0
    assert ext.prompt_task_sum_workspace_floats(3, 50, 40, 4096) == 0  # enough (task, token) rows: no split
    with pytest.raises(ValueError, match=rf"workspace: expected at least {needed} floats"):
        ext.prompt_task_sum(**{**task, "B": 4096, "P": 1, "C": 64, "inner0": 64, "workspace_floats": needed - 1})
    with pytest.raises(ValueError, match=r"workspace: expected a device address"):
        ext.prompt_task_sum(**{**task, "B": 4096, "P": 1, "C": 64, "inner0": 64, "workspace_floats": needed})

    embed = dict(dtype=ext.FLOAT32, grad=16, grad_strides=(40, 8, 1), order=16, starts=16, out=16, B=2, T=3, n=2,
                 D=8, V=7, device=0, stream=0)
    for override, pattern in [
        ({"dtype": 5}, r"dtype: expected a code in"),
        ({"order": 0}, r"order: expected a device address, got 0 for 6 elements"),
        ({"starts": 0}, r"starts: expected a device address, got 0 for 8 elements"),
        ({"out": 0}, r"out: expected a device address"),
        ({"V": -1}, r"V: expected a size >= 0"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            ext.prompt_embed_grad(**{**embed, **override})

    prefix = dict(dtype=ext.FLOAT16, prefix=16, prefix_strides=(48, 24, 1), prompt_ids=16, prompt_ids_stride=1,
                  prompt_ids_bytes=4, out=16, out_strides=(12, 4, 24, 4, 1), B=3, P=2, n=2, C=24, inner1=3,
                  inner0=4, device=0, stream=0)
    for override, pattern in [
        ({"inner1": 5}, r"C: expected a multiple of inner1 \* inner0 = 20, got 24"),
        ({"P": 0}, r"P: expected a size >= 1"),
        ({"prefix": 0}, r"prefix: expected a device address"),
        ({"out": 0}, r"out: expected a device address"),
        ({"prompt_ids_bytes": 16}, r"prompt_ids: expected int32 or int64 ids"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            ext.prefix_kv_forward(**{**prefix, **override})


# ---- GPU: both ops on backend "cuda" against the float64 reference and Triton ------------------------------

# (B, T, V, D, P, n): B = 1, n = 1, T = 0, odd D (element path), D a multiple of 8 (16-byte path), 4096-ish.
CONCAT_SHAPES = [
    (1, 1, 7, 17, 1, 1),
    (3, 5, 11, 33, 4, 3),
    (2, 0, 5, 17, 3, 2),
    (5, 17, 13, 1, 2, 4),
    (4, 33, 37, 64, 6, 1),
    (6, 9, 50, 4096 + 8, 3, 5),
    (2, 7, 19, 4097, 2, 3),
    (300, 4, 9, 24, 2, 2),  # many rows per task: the dprompts batch split
    (0, 3, 5, 17, 2, 2),
]


def _concat_inputs(batch, length, vocab, dim, tasks, num_virtual, device="cuda"):
    input_ids = torch.randint(0, vocab, (batch, length), device=device)
    embed = torch.randn(vocab, dim, dtype=torch.float64, device=device)
    prompts = torch.randn(tasks, num_virtual, dim, dtype=torch.float64, device=device)
    prompt_ids = torch.randint(0, tasks, (batch,), device=device)
    mask = torch.randint(0, 2, (batch, length), device=device)
    labels = torch.randint(0, vocab, (batch, length), device=device)
    return input_ids, embed, prompts, prompt_ids, mask, labels


def _concat_reference_grads(input_ids, embed, prompts, prompt_ids, grad):
    embed64 = cast(embed.cpu(), torch.float64, True)
    prompts64 = cast(prompts.cpu(), torch.float64, True)
    out = reference.prompt_concat(input_ids.cpu(), embed64, prompts64, prompt_ids.cpu())
    out.inputs_embeds.backward(grad.cpu().to(torch.float64))
    return prompts64.grad, embed64.grad


def _run_concat(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, backend):
    out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, backend=backend)
    grad = torch.randn(out.inputs_embeds.shape, device="cuda").to(embed_t.dtype)
    out.inputs_embeds.backward(grad)
    return out, grad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONCAT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prompt_concat_cuda_matches_reference_and_triton(dtype, shape):
    input_ids, embed, prompts, prompt_ids, mask, labels = _concat_inputs(*shape)
    embed_t, prompts_t = cast(embed, dtype, True), cast(prompts, dtype, True)
    out, grad = _run_concat(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, "cuda")
    ref = reference.prompt_concat(input_ids, embed.to(dtype), prompts.to(dtype), prompt_ids, mask, labels)
    # A copy and a gather: bit-exact, mask and labels too.
    assert out.inputs_embeds.dtype == dtype and torch.equal(out.inputs_embeds, ref.inputs_embeds)
    assert out.attention_mask.dtype == mask.dtype and torch.equal(out.attention_mask, ref.attention_mask)
    assert torch.equal(out.labels, ref.labels)
    grad_prompts, grad_embed = _concat_reference_grads(input_ids, embed.to(dtype), prompts.to(dtype), prompt_ids, grad)
    assert prompts_t.grad.dtype == dtype and embed_t.grad.dtype == dtype
    assert_close(prompts_t.grad, grad_prompts, "dprompts", dtype)
    assert_close(embed_t.grad, grad_embed, "dembed_weight", dtype)

    # Triton on the same inputs and gradient: the same outputs; sums in fp32 in the same row order.
    embed_tr, prompts_tr = cast(embed, dtype, True), cast(prompts, dtype, True)
    out_tr = peftkern.prompt_concat(input_ids, embed_tr, prompts_tr, prompt_ids, mask, labels, backend="triton")
    out_tr.inputs_embeds.backward(grad)
    assert torch.equal(out.inputs_embeds, out_tr.inputs_embeds)
    assert torch.equal(out.attention_mask, out_tr.attention_mask) and torch.equal(out.labels, out_tr.labels)
    assert_close(prompts_t.grad, prompts_tr.grad, "dprompts vs triton", dtype)
    assert_close(embed_t.grad, embed_tr.grad, "dembed vs triton", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mask_dtype",
    [None, torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
     torch.float64],
    ids=str,
)
@pytest.mark.parametrize("labels_dtype", [None, torch.int32, torch.int64], ids=str)
def test_prompt_concat_cuda_mask_and_label_dtypes(mask_dtype, labels_dtype):
    input_ids, embed, prompts, prompt_ids, mask, labels = _concat_inputs(3, 6, 9, 16, 2, 3)
    mask = None if mask_dtype is None else mask.to(mask_dtype)
    labels = None if labels_dtype is None else labels.to(labels_dtype)
    out = peftkern.prompt_concat(input_ids, embed.float(), prompts.float(), prompt_ids, mask, labels,
                                 backend="cuda")
    ref = reference.prompt_concat(input_ids, embed.float(), prompts.float(), prompt_ids, mask, labels)
    assert out.attention_mask.dtype == ref.attention_mask.dtype
    assert torch.equal(out.attention_mask, ref.attention_mask)
    if labels is None:
        assert out.labels is None
    else:
        assert out.labels.dtype == labels_dtype and torch.equal(out.labels, ref.labels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [17, 64])
def test_prompt_concat_cuda_fp32_prompts_with_a_16bit_table(dtype, dim):
    input_ids, embed, prompts, prompt_ids, mask, labels = _concat_inputs(5, 4, 11, dim, 3, 2)
    embed_t, prompts_t = cast(embed, dtype, True), cast(prompts, torch.float32, True)
    out, grad = _run_concat(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, "cuda")
    ref = reference.prompt_concat(input_ids, embed.to(dtype), prompts.float(), prompt_ids)
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds)  # fp32 prompts rounded to nearest, as .to() does
    grad_prompts, grad_embed = _concat_reference_grads(input_ids, embed.to(dtype), prompts.float(), prompt_ids, grad)
    assert prompts_t.grad.dtype == torch.float32
    assert_close(prompts_t.grad, grad_prompts, "dprompts", dtype)
    assert_close(embed_t.grad, grad_embed, "dembed_weight", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prompt_concat_cuda_strided_inputs_and_int32_ids(dtype):
    """Transposed table, misaligned prompts, int32 ids read through strides, a broadcast gradient."""
    batch, length, vocab, dim, tasks, num_virtual = 4, 6, 13, 24, 3, 2
    input_ids, embed, prompts, prompt_ids, mask, labels = _concat_inputs(batch, length, vocab, dim, tasks, num_virtual)
    embed_t = embed.to(dtype).T.contiguous().T.requires_grad_()  # strides (1, V): element path
    wide = torch.randn(tasks, num_virtual, dim + 1, device="cuda").to(dtype)
    prompts_t = wide[..., 1:].detach().requires_grad_()  # misaligned base and odd row stride
    ids32 = input_ids.int().T.contiguous().T  # int32, column-major
    out = peftkern.prompt_concat(ids32, embed_t, prompts_t, prompt_ids.int(), mask.T.contiguous().T, labels,
                                 backend="cuda")
    ref = reference.prompt_concat(input_ids, embed_t.detach(), prompts_t.detach(), prompt_ids, mask, labels)
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds) and torch.equal(out.attention_mask, ref.attention_mask)
    out.inputs_embeds.sum().backward()  # a stride-0 gradient
    grad = torch.ones_like(out.inputs_embeds)
    grad_prompts, grad_embed = _concat_reference_grads(
        input_ids, embed_t.detach(), prompts_t.detach(), prompt_ids, grad
    )
    assert_close(prompts_t.grad, grad_prompts, "dprompts", dtype)
    assert_close(embed_t.grad, grad_embed, "dembed_weight", dtype)


@pytest.mark.gpu
def test_prompt_concat_cuda_frozen_table_and_unused_tasks():
    input_ids, embed, prompts, _, _, _ = _concat_inputs(4, 6, 9, 17, 5, 3)
    prompt_ids = torch.tensor([3, 0, 3, 3], device="cuda")
    embed_t = embed.float()  # frozen: no dembed launch
    prompts_t = cast(prompts, torch.float32, True)
    out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, backend="cuda")
    assert out.labels is None and out.attention_mask.dtype == torch.int64 and (out.attention_mask == 1).all()
    grad = torch.randn_like(out.inputs_embeds)
    out.inputs_embeds.backward(grad)
    assert embed_t.grad is None
    n = prompts.shape[1]
    assert torch.equal(prompts_t.grad[[1, 2, 4]], torch.zeros(3, n, 17, device="cuda"))
    assert_close(prompts_t.grad[3], grad[[0, 2, 3], :n].double().sum(0), "dprompts[3]", torch.float32)


@pytest.mark.gpu
def test_prompt_concat_cuda_out_of_range_ids_unchecked_read_nothing():
    """check_ids=False (no host sync): bad ids give zero rows and add to no gradient, as on Triton."""
    input_ids, embed, prompts, _, _, _ = _concat_inputs(3, 4, 9, 16, 2, 2)
    input_ids[0, 1] = 9
    input_ids[2, 3] = -4
    prompt_ids = torch.tensor([0, 5, -1], device="cuda")
    embed_t, prompts_t = cast(embed, torch.float32, True), cast(prompts, torch.float32, True)
    out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, backend="cuda", check_ids=False)
    assert (out.inputs_embeds[1:, :2] == 0).all() and torch.equal(out.inputs_embeds[0, :2], prompts_t[0].detach())
    assert (out.inputs_embeds[0, 3] == 0).all() and (out.inputs_embeds[2, 5] == 0).all()
    out.inputs_embeds.backward(torch.ones_like(out.inputs_embeds))
    assert torch.equal(prompts_t.grad[0], torch.ones(2, 16, device="cuda")) and (prompts_t.grad[1] == 0).all()
    counts = torch.bincount(input_ids[(input_ids >= 0) & (input_ids < 9)], minlength=9).float()
    assert torch.equal(embed_t.grad, counts[:, None].expand(9, 16))


@pytest.mark.gpu
def test_prompt_concat_cuda_backward_is_deterministic():
    input_ids, embed, prompts, prompt_ids, _, _ = _concat_inputs(300, 64, 7, 72, 2, 4)  # ids repeat a lot
    grads = []
    for _ in range(3):
        embed_t, prompts_t = cast(embed, torch.bfloat16, True), cast(prompts, torch.float32, True)
        out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, backend="cuda")
        out.inputs_embeds.backward(torch.linspace(-3, 3, out.inputs_embeds.numel(), device="cuda")
                                   .reshape(out.inputs_embeds.shape).to(torch.bfloat16))
        grads.append((prompts_t.grad, embed_t.grad))
    for later in grads[1:]:
        assert torch.equal(later[0], grads[0][0]) and torch.equal(later[1], grads[0][1])


@pytest.mark.gpu
def test_prompt_concat_cuda_opcheck():
    input_ids, embed, prompts, prompt_ids, mask, labels = _concat_inputs(3, 5, 11, 17, 2, 2)
    embed_t, prompts_t = cast(embed, torch.float32, True), cast(prompts, torch.float32, True)
    torch.library.opcheck(
        torch.ops.peftkern.prompt_concat.default,
        (input_ids, embed_t, prompts_t, prompt_ids, mask, labels, "cuda"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.gpu
def test_torch_compile_treats_the_cuda_prompt_ops_as_opaque():
    input_ids, embed, prompts, prompt_ids, mask, labels = _concat_inputs(3, 5, 11, 24, 2, 2)
    embed_t, prompts_t = embed.float(), prompts.float()
    prefix = torch.randn(2, 3, 2 * 2 * 2 * 8, device="cuda")

    def f(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, prefix):
        out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, backend="cuda")
        return out.inputs_embeds, out.attention_mask, peftkern.prefix_kv(prefix, prompt_ids, 2, 2, backend="cuda")

    args = (input_ids, embed_t, prompts_t, prompt_ids, mask, labels, prefix)
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_prompt_concat_cuda_captures_in_a_cuda_graph():
    """No host sync in the launchers (check_ids=False): the forward replays from a CUDA graph."""
    input_ids, embed, prompts, prompt_ids, mask, labels = _concat_inputs(4, 9, 13, 40, 3, 2)
    embed_t, prompts_t = embed.to(torch.bfloat16), prompts.to(torch.bfloat16)

    def run():
        return peftkern.prompt_concat(input_ids, embed_t, prompts_t, prompt_ids, mask, labels, backend="cuda",
                                      check_ids=False).inputs_embeds

    with torch.no_grad():
        graph, out = capture_in_cuda_graph(run)
        input_ids.copy_(torch.randint(0, 13, input_ids.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run())


# (P, n, L, H_kv, head_dim, B): all ones, odd head_dim (element path), head_dim 8 / 128 (16-byte path), B = 0,
# one task with many rows (the batch split).
PREFIX_SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (3, 5, 2, 2, 17, 4),
    (4, 1, 3, 1, 8, 7),
    (2, 17, 1, 3, 5, 1),
    (2, 3, 2, 1, 4, 0),
    (5, 33, 4, 2, 128, 9),
    (1, 4, 2, 2, 16, 500),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PREFIX_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefix_kv_cuda_matches_reference_and_triton(dtype, shape):
    tasks, num_virtual, layers, heads, head_dim, batch = shape
    prefix = torch.randn(tasks, num_virtual, layers * 2 * heads * head_dim, device="cuda")
    prompt_ids = torch.randint(0, tasks, (batch,), device="cuda")
    prefix_t = cast(prefix, dtype, True)
    out = peftkern.prefix_kv(prefix_t, prompt_ids, layers, heads, backend="cuda")
    assert out.shape == (layers, 2, batch, heads, num_virtual, head_dim) and out.is_contiguous()
    assert torch.equal(out, reference.prefix_kv(prefix.to(dtype), prompt_ids, layers, heads))
    grad = torch.randn(out.shape, device="cuda").to(dtype)
    out.backward(grad)
    prefix64 = cast(prefix.to(dtype).cpu(), torch.float64, True)
    reference.prefix_kv(prefix64, prompt_ids.cpu(), layers, heads).backward(grad.cpu().double())
    assert prefix_t.grad.dtype == dtype
    assert_close(prefix_t.grad, prefix64.grad, "dprefix", dtype)

    prefix_tr = cast(prefix, dtype, True)
    out_tr = peftkern.prefix_kv(prefix_tr, prompt_ids, layers, heads, backend="triton")
    out_tr.backward(grad)
    assert torch.equal(out, out_tr)
    assert_close(prefix_t.grad, prefix_tr.grad, "dprefix vs triton", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefix_kv_cuda_strided_table_and_gradient(dtype):
    tasks, num_virtual, layers, heads, head_dim, batch = 3, 4, 2, 3, 8, 5
    width = layers * 2 * heads * head_dim
    wide = torch.randn(tasks, num_virtual, width + 3, device="cuda").to(dtype)
    prefix_t = wide[..., 3:].detach().requires_grad_()  # misaligned: element path
    prompt_ids = torch.randint(0, tasks, (batch,), device="cuda", dtype=torch.int32)
    out = peftkern.prefix_kv(prefix_t, prompt_ids, layers, heads, backend="cuda")
    assert torch.equal(out, reference.prefix_kv(prefix_t.detach(), prompt_ids.long(), layers, heads))
    # A gradient whose (batch, head) dims are swapped in memory (as a transposed attention output gives).
    grad = torch.randn(layers, 2, heads, batch, num_virtual, head_dim, device="cuda").to(dtype).transpose(2, 3)
    out.backward(grad)
    prefix64 = cast(prefix_t.detach().cpu(), torch.float64, True)
    reference.prefix_kv(prefix64, prompt_ids.long().cpu(), layers, heads).backward(grad.cpu().double())
    assert_close(prefix_t.grad, prefix64.grad, "dprefix", dtype)


@pytest.mark.gpu
def test_prefix_kv_cuda_bad_ids_unchecked_and_determinism():
    prefix = torch.randn(3, 2, 2 * 2 * 2 * 8, device="cuda", requires_grad=True)
    prompt_ids = torch.tensor([1, 3, -1, 1], device="cuda")
    out = peftkern.prefix_kv(prefix, prompt_ids, 2, 2, backend="cuda", check_ids=False)
    assert (out[:, :, 1:3] == 0).all()
    expected = reference.prefix_kv(prefix.detach(), torch.tensor([1], device="cuda"), 2, 2)
    assert torch.equal(out[:, :, 0], expected[:, :, 0])
    out.backward(torch.ones_like(out))
    assert torch.equal(prefix.grad[1], torch.full_like(prefix.grad[1], 2.0)) and (prefix.grad[[0, 2]] == 0).all()

    big = torch.randn(2, 8, 4 * 2 * 2 * 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 2, (700,), device="cuda")
    grads = []
    for _ in range(3):
        big.grad = None
        kv = peftkern.prefix_kv(big, ids, 4, 2, backend="cuda")
        kv.backward(torch.linspace(-2, 2, kv.numel(), device="cuda").reshape(kv.shape).to(torch.bfloat16))
        grads.append(big.grad.clone())
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


@pytest.mark.gpu
def test_prefix_kv_cuda_opcheck():
    prefix = torch.randn(3, 2, 2 * 2 * 2 * 5, device="cuda", requires_grad=True)
    prompt_ids = torch.tensor([2, 0, 2], device="cuda")
    torch.library.opcheck(
        torch.ops.peftkern.prefix_kv.default, (prefix, prompt_ids, 2, 2, "cuda"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
