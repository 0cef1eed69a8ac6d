"""Property-based tests for every op: random shapes (0, 1, primes, past the block sizes), dtypes, strides
(non-contiguous, transposed, broadcast with stride 0), scalings, ranks, dropout and ids (-1, repeats)
against the float64 reference, outputs and every gradient.

`make test` runs the bounded "ci" profile; `make fuzz` runs the "long" one (HYPOTHESIS_PROFILE=long).
Under "ci" the slow cases (the interpreter, Python loops in the reference) run fewer examples each, so the
file stays within a few minutes on CPU; the long profile runs its full count for every op.
"""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bottleneck import make_inputs
from test_prompt import _inputs as prompt_inputs
from test_prompt import _reference_grads as prompt_reference_grads

import peftkern
from peftkern import reference
from peftkern.backends import cuda_backend_available, triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if DEVICE == "cuda" or triton_interpreting() else [])
# The CUDA C++ backend has lora_linear kernels only (the other ops raise on it).
LORA_BACKENDS = BACKENDS + (["cuda"] if DEVICE == "cuda" and cuda_backend_available() else [])
SIZES = st.sampled_from([0, 1, 2, 3, 5, 7, 13, 16, 17, 31, 33, 64, 65])
POSITIVE = st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 33, 40])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided", "broadcast_rows", "broadcast_cols"])
SCALINGS = st.floats(-4.0, 4.0, allow_nan=False)
CI = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci"


def ci_examples(count: int):
    """At most ``count`` examples under the "ci" profile; other profiles keep their own count."""
    return settings(max_examples=count) if CI else settings()


def _layout(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values under another memory layout ("broadcast_*": the first row / column repeated by a
    stride-0 view, so the values change too; callers compare against the reference on the result)."""
    if kind == "transposed" and tensor.dim() >= 2:
        return tensor.mT.contiguous().mT
    if kind == "strided":
        wide = torch.zeros(*tensor.shape[:-1], tensor.shape[-1] * 2, dtype=tensor.dtype, device=tensor.device)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    if kind == "broadcast_rows" and tensor.dim() >= 2 and tensor.shape[-2] > 0:
        return tensor[..., :1, :].expand(tensor.shape)
    if kind == "broadcast_cols" and tensor.shape[-1] > 0:
        return tensor[..., :1].expand(tensor.shape)
    return tensor


def _leaf64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf with tensor's values, for the reference's gradients."""
    return None if tensor is None else tensor.detach().double().requires_grad_(True)


def _grad64(leaf: torch.Tensor) -> torch.Tensor:
    """The reference's gradient of ``leaf``; zeros where the reference never used it (no rows)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@given(
    m=SIZES, k=POSITIVE, n=POSITIVE, rank=st.sampled_from([1, 2, 4, 8, 16, 24]), dtype=DTYPES,
    fp32_adapters=st.booleans(), has_bias=st.booleans(),
    dropout_p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    scaling=st.floats(-4.0, 4.0, allow_nan=False), seed=st.integers(0, 2**62),
    x_layout=LAYOUTS,
    w_layout=LAYOUTS,
    lead=st.sampled_from([(), (1,), (2,)]),
)
def test_lora_linear_fuzz(backend, m, k, n, rank, dtype, fp32_adapters, has_bias, dropout_p, scaling, seed,
                          x_layout, w_layout, lead):
    generator = torch.Generator().manual_seed(seed % 2**31)
    adapter_dtype = torch.float32 if fp32_adapters else dtype

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    x = _layout(rand(*lead, m, k), x_layout).requires_grad_(True)
    weight = _layout(rand(n, k) / k**0.5, w_layout)
    bias = rand(n) if has_bias else None
    lora_a = (rand(rank, k, dtype=adapter_dtype) / k**0.5).requires_grad_(True)
    lora_b = (rand(n, rank, dtype=adapter_dtype) / rank**0.5).requires_grad_(True)

    y = peftkern.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed=seed, backend=backend)
    grad = torch.randn(y.shape, generator=generator).to(DEVICE, dtype)
    y.backward(grad)

    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, lora_a, lora_b))
    y64 = reference.lora_linear(
        x64, weight.double(), None if bias is None else bias.double(), a64, b64, scaling, dropout_p, seed=seed
    )
    y64.backward(grad.double())
    # Large |scaling| and 1/(1-p) amplify the 16-bit rounding of the inputs to the low-rank path.
    amplification = max(1.0, abs(scaling)) / (1.0 - dropout_p)
    assert_close(y, y64, "y", dtype, scale=amplification)
    assert_close(x.grad, x64.grad, "dx", dtype, scale=amplification)
    assert_close(lora_a.grad, a64.grad, "dA", dtype, scale=amplification)
    assert_close(lora_b.grad, b64.grad, "dB", dtype, scale=amplification)


# ---- multi_lora_linear ------------------------------------------------------------------------------------

# (backend, path): the torch backend, and Triton's decode (per-row gather) and prefill (segment GEMM) paths.
MULTI_IMPLS = [("torch", None)] + [("triton", path) for path in ("decode", "prefill") if "triton" in BACKENDS]


@pytest.mark.parametrize("backend,path", MULTI_IMPLS, ids=[f"{b}-{p}" for b, p in MULTI_IMPLS])
@ci_examples(12)
@given(
    m=SIZES, k=POSITIVE, n=POSITIVE, num_adapters=st.integers(1, 5), r_max=st.sampled_from([1, 2, 4, 8, 16, 24]),
    dtype=DTYPES, fp32_adapters=st.booleans(), has_bias=st.booleans(), x_layout=LAYOUTS, w_layout=LAYOUTS,
    lead=st.sampled_from([(), (1,), (2,)]), ids_dtype=st.sampled_from([torch.int32, torch.int64]),
    ranks_as=st.sampled_from(["none", "list", "tensor"]), scalings_as=st.sampled_from(["list", "tensor"]),
    seed=st.integers(0, 2**31 - 1), data=st.data(),
)
def test_multi_lora_linear_fuzz(backend, path, m, k, n, num_adapters, r_max, dtype, fp32_adapters, has_bias,
                                x_layout, w_layout, lead, ids_dtype, ranks_as, scalings_as, seed, data):
    generator = torch.Generator().manual_seed(seed)
    adapter_dtype = torch.float32 if fp32_adapters else dtype
    rows = m * (lead[0] if lead else 1)
    # Ids with -1 (base only) and repeats; ranks anywhere in [0, r_max] (0: an empty slot).
    ids = data.draw(st.lists(st.integers(-1, num_adapters - 1), min_size=rows, max_size=rows), label="ids")
    ranks = data.draw(st.lists(st.integers(0, r_max), min_size=num_adapters, max_size=num_adapters),
                      label="ranks")
    scalings = data.draw(st.lists(SCALINGS, min_size=num_adapters, max_size=num_adapters), label="scalings")

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    x = _layout(rand(*lead, m, k), x_layout).requires_grad_(True)
    weight = _layout(rand(n, k) / k**0.5, w_layout)
    bias = rand(n) if has_bias else None
    lora_a = (rand(num_adapters, r_max, k, dtype=adapter_dtype) / k**0.5).requires_grad_(True)
    lora_b = (rand(num_adapters, n, r_max, dtype=adapter_dtype) / r_max**0.5).requires_grad_(True)
    adapter_ids = torch.tensor(ids, dtype=ids_dtype).reshape(*lead, m).to(DEVICE)
    ranks_arg = {"none": None, "list": ranks, "tensor": torch.tensor(ranks, device=DEVICE)}[ranks_as]
    scalings_arg = scalings if scalings_as == "list" else torch.tensor(scalings, device=DEVICE)
    before = [t.detach().clone() for t in (x, weight, lora_a, lora_b, adapter_ids)]

    y = peftkern.multi_lora_linear(x, weight, bias, lora_a, lora_b, adapter_ids, scalings_arg, ranks_arg,
                                   backend=backend, path=path)
    assert y.dtype == dtype
    grad = torch.randn(y.shape, generator=generator).to(DEVICE, dtype)
    y.backward(grad)
    assert all(torch.equal(t, b) for t, b in zip((x, weight, lora_a, lora_b, adapter_ids), before))

    x64, a64, b64 = (_leaf64(t) for t in (x, lora_a, lora_b))
    scalings64 = [float(torch.tensor(s, dtype=torch.float32)) for s in scalings]  # as the op rounds them
    y64 = reference.multi_lora_linear(
        x64, weight.double(), None if bias is None else bias.double(), a64, b64, adapter_ids.cpu(), scalings64,
        None if ranks_arg is None else torch.tensor(ranks),
    )
    y64.backward(grad.double())
    scale = max(1.0, max(abs(s) for s in scalings)) * (1.0 if dtype == torch.float32 else 2.0)
    assert_close(y, y64, "y", dtype, scale=scale)
    assert_close(x.grad, _grad64(x64), "dx", dtype, scale=scale)
    grad_dtype = adapter_dtype if dtype == torch.float32 else dtype
    assert_close(lora_a.grad, _grad64(a64), "dA", grad_dtype, scale=scale)
    assert_close(lora_b.grad, _grad64(b64), "dB", grad_dtype, scale=scale)


# ---- prompt_concat ----------------------------------------------------------------------------------------

MASK_DTYPES = st.sampled_from([torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@ci_examples(20)
@given(
    batch=st.sampled_from([0, 1, 2, 3, 5]), length=st.sampled_from([0, 1, 2, 3, 17, 33]),
    vocab=st.sampled_from([1, 2, 7, 13]), dim=st.sampled_from([1, 2, 3, 17, 33, 129]),
    tasks=st.integers(1, 4), num_virtual=st.sampled_from([1, 2, 3, 5, 17, 33]), dtype=DTYPES,
    fp32_prompts=st.booleans(), mask_dtype=st.none() | MASK_DTYPES,
    labels_dtype=st.none() | st.sampled_from([torch.int32, torch.int64]), single_id=st.booleans(),
    embed_grad=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "strided", "broadcast_rows"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_prompt_concat_fuzz(backend, batch, length, vocab, dim, tasks, num_virtual, dtype, fp32_prompts,
                            mask_dtype, labels_dtype, single_id, embed_grad, layout, seed):
    torch.manual_seed(seed)
    input_ids, embed, prompts, prompt_ids, mask, labels = prompt_inputs(batch, length, vocab, dim, tasks,
                                                                        num_virtual)
    input_ids = _layout(input_ids, layout).to(DEVICE)
    embed_t = _layout(embed.to(dtype), layout).to(DEVICE).requires_grad_(embed_grad)
    prompts_t = _layout(prompts.to(torch.float32 if fp32_prompts else dtype), layout).to(DEVICE)
    prompts_t.requires_grad_(True)
    task = int(prompt_ids[0]) if batch and single_id else None
    ids_arg = task if task is not None else prompt_ids.to(DEVICE)
    mask_t = None if mask_dtype is None else _layout(mask.to(mask_dtype), layout).to(DEVICE)
    labels_t = None if labels_dtype is None else _layout(labels.to(labels_dtype), layout).to(DEVICE)

    out = peftkern.prompt_concat(input_ids, embed_t, prompts_t, ids_arg, mask_t, labels_t, backend=backend)
    ids_ref = prompt_ids if task is None else torch.full((batch,), task)
    ref = reference.prompt_concat(input_ids.cpu(), embed_t.detach().cpu(), prompts_t.detach().cpu(), ids_ref,
                                  None if mask_t is None else mask_t.cpu(),
                                  None if labels_t is None else labels_t.cpu())
    # A copy and a gather: bit-exact, the extended mask and labels too.
    assert out.inputs_embeds.dtype == dtype and torch.equal(out.inputs_embeds.cpu(), ref.inputs_embeds)
    assert out.attention_mask.dtype == ref.attention_mask.dtype
    assert torch.equal(out.attention_mask.cpu(), ref.attention_mask)
    assert (out.labels is None) == (labels_t is None)
    if labels_t is not None:
        assert out.labels.dtype == labels_t.dtype and torch.equal(out.labels.cpu(), ref.labels)

    grad = torch.randn(out.inputs_embeds.shape).to(DEVICE, dtype)
    out.inputs_embeds.backward(grad)
    _, grad_prompts, grad_embed = prompt_reference_grads(
        input_ids.cpu(), embed_t.detach().cpu(), prompts_t.detach().cpu(), ids_ref, grad.cpu()
    )
    assert_close(prompts_t.grad, grad_prompts, "dprompts", dtype)
    if embed_grad:
        assert_close(embed_t.grad, grad_embed, "dembed_weight", dtype)
    else:
        assert embed_t.grad is None


# ---- prefix_kv --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@ci_examples(20)
@given(
    tasks=st.integers(1, 4), num_virtual=st.sampled_from([1, 2, 3, 17, 33]), num_layers=st.integers(1, 3),
    num_kv_heads=st.integers(1, 3), head_dim=st.sampled_from([1, 2, 3, 8, 17]),
    batch=st.sampled_from([0, 1, 2, 5, 7]), dtype=DTYPES, layout=LAYOUTS, single_id=st.booleans(),
    ids_dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**31 - 1), data=st.data(),
)
def test_prefix_kv_fuzz(backend, tasks, num_virtual, num_layers, num_kv_heads, head_dim, batch, dtype, layout,
                        single_id, ids_dtype, seed, data):
    generator = torch.Generator().manual_seed(seed)
    width = num_layers * 2 * num_kv_heads * head_dim
    prefix = _layout(torch.randn(tasks, num_virtual, width, generator=generator).to(DEVICE, dtype), layout)
    prefix.requires_grad_(True)
    if single_id:
        task = data.draw(st.integers(0, tasks - 1), label="task")
        out = peftkern.prefix_kv(prefix, task, num_layers, num_kv_heads, batch_size=batch, backend=backend)
        ids = torch.full((batch,), task)
    else:
        ids = torch.tensor(data.draw(st.lists(st.integers(0, tasks - 1), min_size=batch, max_size=batch),
                                     label="ids"), dtype=ids_dtype)
        out = peftkern.prefix_kv(prefix, ids.to(DEVICE), num_layers, num_kv_heads, backend=backend)
    expected = reference.prefix_kv(prefix.detach().cpu(), ids, num_layers, num_kv_heads)
    assert out.is_contiguous() and torch.equal(out.cpu(), expected)  # a gather: bit-exact
    grad = torch.randn(out.shape, generator=generator).to(DEVICE, dtype)
    out.backward(grad)
    prefix64 = _leaf64(prefix.cpu())
    reference.prefix_kv(prefix64, ids, num_layers, num_kv_heads).backward(grad.double().cpu())
    assert_close(prefix.grad, _grad64(prefix64), "dprefix", dtype)


# ---- bottleneck_adapter -----------------------------------------------------------------------------------

BOTTLENECK_NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "residual")


@pytest.mark.parametrize("backend", BACKENDS)
@ci_examples(15)
@given(
    m=SIZES, batch=st.sampled_from([None, 1, 2]), dim=st.sampled_from([1, 2, 3, 7, 17, 33]),
    bottleneck=st.sampled_from([1, 2, 3, 5, 17, 33]), num_adapters=st.none() | st.integers(1, 4),
    activation=st.sampled_from(reference.ACTIVATIONS), scaling=SCALINGS, has_residual=st.booleans(),
    biases=st.booleans(), dtype=DTYPES, fp32_weights=st.booleans(), x_layout=LAYOUTS,
    ids_dtype=st.sampled_from([torch.int32, torch.int64]), flat_ids=st.booleans(),
    seed=st.integers(0, 2**31 - 1), data=st.data(),
)
def test_bottleneck_adapter_fuzz(backend, m, batch, dim, bottleneck, num_adapters, activation, scaling,
                                 has_residual, biases, dtype, fp32_weights, x_layout, ids_dtype, flat_ids, seed,
                                 data):
    torch.manual_seed(seed)
    lead = (m,) if batch is None else (batch, m)
    masters = make_inputs(lead, dim, bottleneck, num_adapters, biases=biases, residual=has_residual)
    weight_dtype = torch.float32 if fp32_weights else dtype
    ours = {}
    for name, value in masters.items():
        if value is None:
            ours[name] = None
        elif name in ("x", "residual"):
            ours[name] = _layout(value.to(dtype), x_layout).to(DEVICE).requires_grad_(True)
        else:
            ours[name] = value.to(DEVICE, weight_dtype).requires_grad_(True)
    ids = None
    if num_adapters is not None:
        rows = m * (batch or 1)
        values = data.draw(st.lists(st.integers(-1, num_adapters - 1), min_size=rows, max_size=rows), label="ids")
        ids = torch.tensor(values, dtype=ids_dtype).reshape((rows,) if flat_ids else lead).to(DEVICE)

    out = peftkern.bottleneck_adapter(
        *(ours[n] for n in BOTTLENECK_NAMES[:5]), activation, scaling, ours["residual"], ids, backend=backend
    )
    ref = {name: None if value is None else _leaf64(value.cpu()) for name, value in ours.items()}
    expected = reference.bottleneck_adapter(
        *(ref[n] for n in BOTTLENECK_NAMES[:5]), activation, scaling, ref["residual"],
        None if ids is None else ids.cpu(),
    )
    assert out.dtype == dtype and out.shape == expected.shape
    grad = torch.randn(expected.shape).to(dtype)
    out.backward(grad.to(DEVICE))
    expected.backward(grad.double())
    scale = max(1.0, abs(scaling)) * (1.0 if dtype == torch.float32 else 2.0)
    assert_close(out, expected, "y", dtype, scale=scale)
    for name in BOTTLENECK_NAMES:
        if ours[name] is not None:
            tolerance_dtype = dtype if name in ("x", "residual") or dtype != torch.float32 else weight_dtype
            assert_close(ours[name].grad, _grad64(ref[name]), f"grad {name}", tolerance_dtype, scale=scale)
