"""``BottleneckAdapter``, ``inject_bottleneck_adapters`` on a small random Llama (nothing downloaded), and the
``save_bottleneck_adapters``/``load_bottleneck_adapters`` file format."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close
from safetensors.torch import load_file, save_file

import peftkern
from peftkern import reference
from peftkern.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, bottleneck_adapter_modules

transformers = pytest.importorskip("transformers")

VOCAB = 64


def small_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tokens(batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def randomize_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in bottleneck_adapter_modules(model):
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


# ---- the layer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seqs, seq_len, num_adapters", [(2, 5, 2), (4, 8, 2), (3, 4, 1)],
                         ids=["gathered", "folded", "one adapter"])
def test_layer_with_layer_norm_matches_reference(backend, seqs, seq_len, num_adapters):
    # 10 rows beside 2 adapters x 6 bottleneck: each row's LN affine gathered; 32 rows: folded into the down
    # projection; one adapter: always folded. Outputs and every parameter's gradient against float64.
    layer = peftkern.BottleneckAdapter(24, reduction_factor=4, activation="gelu", scaling=0.5,
                                       num_adapters=num_adapters, layer_norm=True, backend=backend)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_()
    x = torch.randn(seqs, seq_len, 24)
    ids = torch.tensor([1, -1, 0, 1][:seqs]) if num_adapters == 2 else None  # one id per sequence
    out = layer(x, ids)
    grad = torch.randn_like(out)
    out.backward(grad)
    row_ids = ids[:, None].expand(seqs, seq_len) if ids is not None else None
    params64 = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x64 = x.double()
    normed = F.layer_norm(x64, (24,), eps=layer.eps)
    safe = row_ids.clamp(min=0) if ids is not None else 0
    normed = normed * params64["ln_weight"][safe] + params64["ln_bias"][safe]
    weights = [params64[n] if ids is not None else params64[n][0]
               for n in ("down_weight", "down_bias", "up_weight", "up_bias")]
    expected = reference.bottleneck_adapter(normed, *weights, "gelu", 0.5, residual=x64, adapter_ids=row_ids)
    expected.backward(grad.double())
    assert_close(out, expected, "y", scale=2.0)
    for name, param in layer.named_parameters():
        assert_close(param.grad, params64[name].grad, f"d{name}", scale=4.0)
    if ids is not None:
        assert torch.equal(out[1], x[1])  # id -1: the sequence passes through


def test_layer_needs_ids_with_several_adapters():
    layer = peftkern.BottleneckAdapter(16, num_adapters=3)
    with pytest.raises(ValueError, match="adapter_ids: this BottleneckAdapter holds 3 adapters"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match="adapter_ids: expected shape"):
        layer(torch.randn(2, 4, 16), torch.tensor([0, 1, 2]))
    with peftkern.use_bottleneck_adapter_ids(torch.tensor([0, 2])):
        assert layer(torch.randn(2, 4, 16)).shape == (2, 4, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"reduction_factor": 0}, "reduction_factor"), ({"activation": "elu"}, "activation"),
     ({"init": "normal"}, "init"), ({"num_adapters": 0}, "num_adapters"),
     ({"scaling": float("inf")}, "scaling")],
)
def test_layer_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peftkern.BottleneckAdapter(16, **kwargs)


def test_zeros_init_is_identity_and_bert_init_is_not():
    x = torch.randn(3, 32)
    assert torch.equal(peftkern.BottleneckAdapter(32, init="zeros")(x), x)
    assert not torch.equal(peftkern.BottleneckAdapter(32, init="bert")(x), x)


# ---- injection --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement, count", [("pfeiffer", 2), ("houlsby", 4)])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_zeros_init_logits_equal_base(placement, count, layer_norm):
    model = small_llama()
    ids = tokens()
    base = model(ids).logits
    peftkern.inject_bottleneck_adapters(model, {"placement": placement, "init": "zeros", "layer_norm": layer_norm,
                                     "num_adapters": 2})
    names = [name for name, _ in bottleneck_adapter_modules(model)]
    assert len(names) == count
    assert all(name.endswith(("mlp.bottleneck_adapter", "self_attn.bottleneck_adapter")) for name in names)
    if placement == "pfeiffer":
        assert all(".mlp." in name for name in names)
    with peftkern.use_bottleneck_adapter_ids(torch.tensor([0, 1, -1])):
        assert torch.equal(model(ids).logits, base)


def test_zeros_init_logits_equal_base_triton():
    model = small_llama()
    ids = tokens(2, 6)
    base = model(ids).logits
    peftkern.inject_bottleneck_adapters(model, {"placement": "houlsby", "init": "zeros"}, backend="triton")
    assert torch.equal(model(ids).logits, base)


def test_triton_backend_matches_torch_backend_in_the_model():
    """The injected model on both backends: the same logits and adapter gradients (fp32)."""
    results = []
    for backend in ("torch", "triton"):
        model = small_llama()
        peftkern.inject_bottleneck_adapters(model, {"placement": "houlsby", "num_adapters": 2, "activation": "silu"},
                                 backend=backend)
        randomize_adapters(model)
        with peftkern.use_bottleneck_adapter_ids(torch.tensor([1, 0])):
            logits = model(tokens(2, 6)).logits
        logits.square().mean().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        results.append((logits, grads))
    (logits_t, grads_t), (logits_k, grads_k) = results
    assert_close(logits_k, logits_t, "logits", scale=10.0)
    assert grads_t.keys() == grads_k.keys() and len(grads_t) == 16
    for name in grads_t:
        assert_close(grads_k[name], grads_t[name], name, scale=10.0)


def test_multi_adapter_rows_are_independent():
    """Each sequence's logits depend only on its own adapter; id -1 gives the base model's logits."""
    model = small_llama()
    ids = tokens()
    base = model(ids).logits
    peftkern.inject_bottleneck_adapters(model, {"placement": "houlsby", "num_adapters": 2, "layer_norm": True})
    randomize_adapters(model)
    adapter_ids = torch.tensor([0, 1, -1])
    with peftkern.use_bottleneck_adapter_ids(adapter_ids):
        mixed = model(ids).logits
    for row in range(3):
        with peftkern.use_bottleneck_adapter_ids(adapter_ids[row:row + 1]):
            alone = model(ids[row:row + 1]).logits
        assert_close(mixed[row], alone[0], f"row {row}")
    assert_close(mixed[2], base[2], "row with id -1")
    assert not torch.allclose(mixed[0], mixed[1])


def test_injected_llama_trains():
    """Frozen base, two adapters trained in one mixed batch, each towards its own target token: the loss
    falls and each adapter's sequences end up predicting their adapter's token."""
    model = small_llama()
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peftkern.inject_bottleneck_adapters(model, {"placement": "houlsby", "reduction_factor": 4, "num_adapters": 2})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * 2 * (2 * 64 * 16 + 16 + 64)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    inputs = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    adapter_ids = torch.tensor([0, 1, 0, 1])
    labels = torch.where(adapter_ids == 0, 5, 9)[:, None].expand(4, 12)
    losses = []
    with peftkern.use_bottleneck_adapter_ids(adapter_ids):
        for _ in range(15):
            logits = model(inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.equal(logits.argmax(-1), labels)
    for name, tensor in model.state_dict().items():
        if name in base_state:
            assert torch.equal(tensor, base_state[name]), f"{name}: the frozen base changed"


def test_inject_errors_leave_the_model_alone():
    with pytest.raises(ValueError, match="found no Llama-style decoder layers"):
        peftkern.inject_bottleneck_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), {})
    model = small_llama()
    with pytest.raises(ValueError, match="placement"):
        peftkern.inject_bottleneck_adapters(model, {"placement": "parallel"})
    with pytest.raises(ValueError, match="unknown field 'rank'"):
        peftkern.inject_bottleneck_adapters(model, {"rank": 4})
    assert all(p.requires_grad for p in model.parameters())
    peftkern.inject_bottleneck_adapters(model, {})
    with pytest.raises(ValueError, match="already holds bottleneck adapters"):
        peftkern.inject_bottleneck_adapters(model, {})
    peftkern.remove_bottleneck_adapters(model)
    assert not list(bottleneck_adapter_modules(model))
    ids = tokens()
    assert torch.equal(model(ids).logits, small_llama()(ids).logits)


# ---- files ------------------------------------------------------------------------------------------------


def saved_model(tmp_path, **config):
    model = small_llama()
    peftkern.inject_bottleneck_adapters(
        model, {"placement": "houlsby", "num_adapters": 2, "layer_norm": True, **config}
    )
    randomize_adapters(model)
    peftkern.save_bottleneck_adapters(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_save_load_round_trip(tmp_path):
    model, path = saved_model(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]
    header = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    assert header["config"]["placement"] == "houlsby" and header["hidden_size"] == 64
    ids = tokens()
    with peftkern.use_bottleneck_adapter_ids(torch.tensor([1, 0, -1])):
        expected = model(ids).logits
        # into a bare model: adapters injected from the file's config
        fresh = peftkern.load_bottleneck_adapters(small_llama(), path)
        assert torch.equal(fresh(ids).logits, expected)
        # into a model that already has (other) adapters of the same config
        other = small_llama()
        peftkern.inject_bottleneck_adapters(other, {"placement": "houlsby", "num_adapters": 2, "layer_norm": True})
        peftkern.load_bottleneck_adapters(other, path)
        assert torch.equal(other(ids).logits, expected)
    # saving again replaces the files in place, leaving no temporary files behind
    peftkern.save_bottleneck_adapters(fresh, path)
    assert sorted(p.name for p in path.iterdir()) == [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]


def _rewrite_json(path, change):
    header = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    change(header)
    (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(header))


def _rewrite_tensors(path, change):
    tensors = load_file(str(path / ADAPTER_WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(path / ADAPTER_WEIGHTS_NAME))


def _truncate(file):
    file.write_bytes(file.read_bytes()[:100])


KEY = "model.layers.1.mlp.bottleneck_adapter.up_weight"
CORRUPTIONS = {
    "no config": (lambda p: (p / ADAPTER_CONFIG_NAME).unlink(), FileNotFoundError, "bottleneck_config.json"),
    "no weights": (lambda p: (p / ADAPTER_WEIGHTS_NAME).unlink(), FileNotFoundError, "missing"),
    "bad json": (lambda p: (p / ADAPTER_CONFIG_NAME).write_text("{oops"), ValueError, "not valid JSON"),
    "json list": (lambda p: (p / ADAPTER_CONFIG_NAME).write_text("[]"), ValueError, "expected a JSON object"),
    "format": (lambda p: _rewrite_json(p, lambda h: h.update(format="peft")), ValueError, "key 'format'"),
    "version": (lambda p: _rewrite_json(p, lambda h: h.update(format_version=9)), ValueError,
                "format_version"),
    "config field": (lambda p: _rewrite_json(p, lambda h: h["config"].update(rank=4)), ValueError,
                     "key 'config': config: unknown field 'rank'"),
    "config value": (lambda p: _rewrite_json(p, lambda h: h["config"].update(activation="elu")), ValueError,
                     "key 'config': activation"),
    "hidden size": (lambda p: _rewrite_json(p, lambda h: h.update(hidden_size=32)), ValueError,
                    "key 'hidden_size'"),
    "truncated": (lambda p: _truncate(p / ADAPTER_WEIGHTS_NAME), ValueError, "not a valid safetensors file"),
    "garbage": (lambda p: (p / ADAPTER_WEIGHTS_NAME).write_bytes(b"\x00" * 64), ValueError,
                "not a valid safetensors file"),
    "missing key": (lambda p: _rewrite_tensors(p, lambda t: t.pop(KEY)), ValueError,
                    f"missing tensor '{KEY}'"),
    "extra key": (lambda p: _rewrite_tensors(p, lambda t: t.update(extra=torch.zeros(1))), ValueError,
                  "unexpected tensor 'extra'"),
    "shape": (lambda p: _rewrite_tensors(p, lambda t: t.update({KEY: torch.zeros(2, 64, 5)})), ValueError,
              f"tensor '{KEY}': expected shape \\(2, 64, 4\\)"),
    "dtype": (lambda p: _rewrite_tensors(p, lambda t: t.update({KEY: t[KEY].to(torch.int32)})), ValueError,
              f"tensor '{KEY}': expected a floating dtype"),
    "nan": (lambda p: _rewrite_tensors(p, lambda t: t[KEY].fill_(float("nan"))), ValueError, "NaN"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
@pytest.mark.parametrize("has_adapters", [False, True])
def test_corrupt_files_raise_and_leave_the_model_unchanged(tmp_path, case, has_adapters):
    _, path = saved_model(tmp_path)
    corrupt, error, message = CORRUPTIONS[case]
    corrupt(path)
    model = small_llama(seed=5)
    if has_adapters:
        peftkern.inject_bottleneck_adapters(model, {"placement": "houlsby", "num_adapters": 2, "layer_norm": True})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        peftkern.load_bottleneck_adapters(model, path)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert len(list(bottleneck_adapter_modules(model))) == (4 if has_adapters else 0)
    if not has_adapters:
        assert all(p.requires_grad for p in model.parameters())  # not even frozen


def test_load_rejects_a_different_config(tmp_path):
    _, path = saved_model(tmp_path)
    model = small_llama()
    peftkern.inject_bottleneck_adapters(model, {"placement": "houlsby", "num_adapters": 3, "layer_norm": True})
    message = "key 'config.num_adapters': the file has 2, the model's adapters have 3"
    with pytest.raises(ValueError, match=message):
        peftkern.load_bottleneck_adapters(model, path)


def test_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    model, path = saved_model(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("peftkern.adapters.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        peftkern.save_bottleneck_adapters(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_save_without_adapters_raises(tmp_path):
    with pytest.raises(ValueError, match="holds no bottleneck adapters"):
        peftkern.save_bottleneck_adapters(small_llama(), tmp_path / "none")


@pytest.mark.parametrize(
    "module, old, new",
    [
        ("peftkern", "AdapterConfig", "BottleneckConfig"),
        ("peftkern", "inject_adapters", "inject_bottleneck_adapters"),
        ("peftkern", "remove_adapters", "remove_bottleneck_adapters"),
        ("peftkern", "use_adapter_ids", "use_bottleneck_adapter_ids"),
        ("peftkern.adapters", "adapter_modules", "bottleneck_adapter_modules"),
        ("peftkern.nn", "use_adapter_ids", "use_bottleneck_adapter_ids"),
        ("peftkern.nn.bottleneck", "current_adapter_ids", "current_bottleneck_adapter_ids"),
    ],
)
def test_old_bottleneck_names_warn_and_still_work(module, old, new):
    """The bottleneck API says "bottleneck" now ("adapter" alone is a LoRA adapter: load_adapter, AdapterPool);
    the old names stay for a while as aliases that warn."""
    namespace = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} is deprecated: it is {module}\.{new} now"):
        assert getattr(namespace, old) is getattr(namespace, new)
    assert old not in getattr(namespace, "__all__", [])
    with pytest.raises(AttributeError, match="has no attribute 'inject_adapter'"):
        namespace.inject_adapter  # noqa: B018
