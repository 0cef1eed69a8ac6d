"""AdapterPool on a small random Llama: mixed batches against peft, load/evict errors, concurrent loads."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from _helpers import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peftkern import AdapterPool, MultiLoRALinear, use_backend  # noqa: E402
from peftkern.io import read_peft_adapter  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj"]
ADAPTERS = {
    # Different ranks, a per-module rank and alpha, rsLoRA: every field the pool must honour.
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
              rank_pattern={"layers.1.self_attn.q_proj": 16}, alpha_pattern={"o_proj": 3}, use_rslora=True),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base model, {name: adapter dir}, a PeftModel holding both adapters) on the CPU in fp32."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, fields) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        # init_lora_weights=False: random B too, so every adapter changes the logits.
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **fields))
        dirs[name] = root / name
        model.save_pretrained(str(dirs[name]))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a"]), adapter_name="a").eval()
    reference.load_adapter(str(dirs["b"]), adapter_name="b")
    return base, dirs, reference


def _peft_logits(reference, input_ids, names):
    """Each row alone through peft with its own adapter (None: adapters disabled)."""
    rows = []
    with torch.no_grad():
        for row, name in enumerate(names):
            if name is None:
                with reference.disable_adapter():
                    rows.append(reference(input_ids[row:row + 1]).logits)
            else:
                reference.set_adapter(name)
                rows.append(reference(input_ids[row:row + 1]).logits)
    return torch.cat(rows)


def _pool(base, num_slots=3, r_max=16, targets=TARGETS, device="cpu"):
    model = copy.deepcopy(base).to(device)
    return model, AdapterPool(model, targets, num_slots=num_slots, r_max=r_max)


def _snapshot(pool):
    return {name: [t.detach().clone() for t in (layer.lora_A, layer.lora_B, layer.scalings, layer.ranks)]
            for name, layer in pool.layers.items()}


def _assert_same(before, after):
    for name in before:
        assert all(torch.equal(p, q) for p, q in zip(before[name], after[name])), name


INPUT_IDS = torch.arange(4 * 7).reshape(4, 7) * 13 % 101


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_matches_peft_per_row(llama, backend):
    base, dirs, reference = llama
    # Triton runs on a GPU when there is one (on CPU only through the interpreter, set by conftest).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    model, pool = _pool(base, device=device)
    assert pool.load("a", dirs["a"]) == 0 and pool.load("b", dirs["b"]) == 1
    assert sum(isinstance(m, MultiLoRALinear) for m in model.modules()) == 6
    names = ["a", None, "b", "a"]
    with use_backend(backend), torch.no_grad(), pool.batch(names) as ids:
        got = model(INPUT_IDS.to(device)).logits
    assert ids.tolist() == [0, -1, 1, 0]
    expected = _peft_logits(reference, INPUT_IDS, names)
    assert_close(got, expected.double(), "logits", dtype=torch.float32, scale=10)
    # The adapters really differ from the base and from each other.
    assert (expected[0] - expected[1]).abs().max() > 1e-2 and (expected[2] - expected[1]).abs().max() > 1e-2


def test_per_module_rank_and_alpha_are_honoured(llama):
    base, dirs, _ = llama
    _, pool = _pool(base)
    slot = pool.load("b", dirs["b"])
    q1 = pool.layers["model.layers.1.self_attn.q_proj"]
    q0 = pool.layers["model.layers.0.self_attn.q_proj"]
    o0 = pool.layers["model.layers.0.self_attn.o_proj"]
    assert int(q1.ranks[slot]) == 16 and int(q0.ranks[slot]) == 8
    assert float(q0.scalings[slot]) == pytest.approx(16 / 8**0.5)   # rsLoRA: alpha / sqrt(r)
    assert float(q1.scalings[slot]) == pytest.approx(16 / 16**0.5)
    assert float(o0.scalings[slot]) == pytest.approx(3 / 8**0.5)    # alpha_pattern
    slot_a = pool.load("a", dirs["a"])
    assert int(o0.ranks[slot_a]) == 0                                # "a" does not adapt o_proj


def test_state_dict_load_equals_directory_load(llama):
    base, dirs, _ = llama
    model, pool = _pool(base)
    config, tensors = read_peft_adapter(dirs["b"])
    pool.load("from_dir", dirs["b"])
    pool.load("from_dict", tensors, config=config)
    with torch.no_grad(), pool.batch(["from_dir", "from_dict"]):
        logits = model(INPUT_IDS[:1].repeat(2, 1)).logits
    assert torch.equal(logits[0], logits[1])


def test_bad_adapters_raise_and_leave_the_pool_unchanged(llama):
    base, dirs, _ = llama
    model, pool = _pool(base, num_slots=2, r_max=8)
    pool.load("a", dirs["a"])
    before = _snapshot(pool)
    with torch.no_grad(), pool.batch(["a"]):
        logits_before = model(INPUT_IDS[:1]).logits
    config, tensors = read_peft_adapter(dirs["a"])
    key_a = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))

    with pytest.raises(ValueError, match=r"rank 16 is outside \[1, r_max=8\]"):
        pool.load("b", dirs["b"])  # one module has rank 16 > r_max; the modules before it must not be written
    with pytest.raises(ValueError, match="lora_a: expected shape"):
        pool.load("bad_shape", {**tensors, key_a: torch.randn(4, 65)}, config=config)
    with pytest.raises(ValueError, match="gives rank 2"):
        pool.load("bad_rank", tensors, config={**config, "r": 2})
    with pytest.raises(ValueError, match="does not adapt"):
        pool.load("bad_module", {"base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
                                 "base_model.model.lm_head.lora_B.weight": torch.randn(101, 4)})
    with pytest.raises(ValueError, match="not a LoRA A/B weight"):
        norm_key = "base_model.model.model.norm.weight"
        pool.load("bad_key", {**tensors, norm_key: torch.randn(64)}, config=config)
    with pytest.raises(ValueError, match="not both A and B"):
        pool.load("half", {key_a: tensors[key_a]}, config=config)
    pool.load("a2", tensors, config=config)
    with pytest.raises(ValueError, match="the pool is full"):
        pool.load("a3", tensors, config=config)
    pool.evict("a2")
    assert pool.names == ["a"]
    _assert_same(before, _snapshot(pool))
    with torch.no_grad(), pool.batch(["a"]):
        assert torch.equal(model(INPUT_IDS[:1]).logits, logits_before)


def test_unknown_names_raise(llama):
    base, dirs, _ = llama
    model, pool = _pool(base)
    pool.load("a", dirs["a"])
    for action in (lambda: pool.ids(["a", "nope"]), lambda: pool.evict("nope"), lambda: pool.slot("nope")):
        with pytest.raises(ValueError, match="'nope': not loaded"):
            action()
    with pytest.raises(ValueError, match="'nope': not loaded"), pool.batch(["nope"]):
        pass
    with pytest.raises(ValueError, match="adapter_ids: none given"):
        model(INPUT_IDS[:1])  # outside pool.batch the layers have no ids
    with pytest.raises(ValueError, match="matched no torch.nn.Linear"):
        AdapterPool(copy.deepcopy(base), ["no_such_proj"], num_slots=1, r_max=4)


def test_evict_frees_the_slot_and_reload_replaces_in_place(llama):
    base, dirs, reference = llama
    model, pool = _pool(base, num_slots=2)
    pool.load("a", dirs["a"])
    pool.load("b", dirs["b"])
    pool.evict("a")
    assert pool.names == ["b"] and "a" not in pool
    assert all(int(layer.ranks[0]) == 0 for layer in pool.layers.values())
    assert pool.load("a_again", dirs["a"]) == 0
    assert pool.load("b", dirs["a"]) == 1  # same name: replaced in its own slot
    with torch.no_grad(), pool.batch(["b", "a_again"]):
        logits = model(INPUT_IDS[:2]).logits
    assert_close(logits, _peft_logits(reference, INPUT_IDS[:2], ["a", "a"]).double(), "logits",
                 dtype=torch.float32, scale=10)


def test_load_inside_own_batch_raises(llama):
    base, dirs, _ = llama
    _, pool = _pool(base)
    pool.load("a", dirs["a"])
    with pool.batch(["a"]), pytest.raises(RuntimeError, match="inside a `pool.batch"):
        pool.load("b", dirs["b"])


def test_loading_while_another_thread_runs_batches(llama):
    """Every batch sees adapter "a" entirely old or entirely new, never a mix of layers."""
    base, dirs, _ = llama
    model, pool = _pool(base)
    config, tensors = read_peft_adapter(dirs["a"])
    versions = [tensors, {key: value * 1.5 for key, value in tensors.items()}]
    expected = []
    for version in versions:
        pool.load("a", version, config=config)
        with torch.no_grad(), pool.batch(["a", None]):
            expected.append(model(INPUT_IDS[:2]).logits)
    assert (expected[0] - expected[1]).abs().max() > 1e-2

    stop = threading.Event()
    failures, batches, loads = [], [0], [0]

    def run_batches():
        while not stop.is_set():
            with torch.no_grad(), pool.batch(["a", None]):
                logits = model(INPUT_IDS[:2]).logits
            if not any(torch.allclose(logits, e, atol=1e-6, rtol=0) for e in expected):
                failures.append(logits)
            batches[0] += 1

    def load_versions():
        while not stop.is_set():
            pool.load("a", versions[loads[0] % 2], config=config)
            loads[0] += 1

    threads = [threading.Thread(target=run_batches), threading.Thread(target=load_versions)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while (batches[0] < 20 or loads[0] < 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a thread hung (lock never released?)"
    assert not failures, f"{len(failures)} of {batches[0]} batches saw a half-loaded adapter"
    assert batches[0] >= 20 and loads[0] >= 20, (batches[0], loads[0])


def test_evicting_while_another_thread_runs_batches(llama):
    """Evicting and reloading "b" while batches run: a batch asking for "b" is either refused (not loaded
    when it began) or sees all of "b"; batches on "a" and base rows never notice."""
    base, dirs, _ = llama
    model, pool = _pool(base)
    pool.load("a", dirs["a"])
    pool.load("b", dirs["b"])
    expected = {}
    for name in ("a", "b"):
        with torch.no_grad(), pool.batch([name, None]):
            expected[name] = model(INPUT_IDS[:2]).logits
    with torch.no_grad():
        assert (expected["a"][0] - expected["b"][0]).abs().max() > 1e-2

    stop = threading.Event()
    failures, counts = [], {"batches": 0, "refused": 0, "evictions": 0}

    def run_batches():
        while not stop.is_set():
            for name in ("a", "b"):
                try:
                    with torch.no_grad(), pool.batch([name, None]):
                        logits = model(INPUT_IDS[:2]).logits
                except ValueError as error:
                    if name == "a" or "not loaded" not in str(error):
                        failures.append(error)
                    counts["refused"] += 1
                    continue
                if not torch.allclose(logits, expected[name], atol=1e-6, rtol=0):
                    failures.append(f"batch on {name!r} saw a half-evicted or foreign adapter")
                counts["batches"] += 1

    def evict_and_reload():
        while not stop.is_set():
            pool.evict("b")
            time.sleep(0.001)  # let a batch start while "b" is out
            pool.load("b", dirs["b"])
            counts["evictions"] += 1

    threads = [threading.Thread(target=run_batches), threading.Thread(target=evict_and_reload)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while (counts["batches"] < 150 or counts["evictions"] < 150) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a thread hung (lock never released?)"
    assert not failures, failures[:3]
    assert counts["batches"] >= 150 and counts["evictions"] >= 150, counts
    assert pool.names == ["a", "b"]


def test_evict_waits_for_a_running_batch(llama):
    """An eviction from another thread blocks until the batch using the adapter has finished."""
    base, dirs, _ = llama
    model, pool = _pool(base)
    pool.load("a", dirs["a"])
    evicted = threading.Event()
    evictor = threading.Thread(target=lambda: (pool.evict("a"), evicted.set()))
    with torch.no_grad(), pool.batch(["a"]):
        evictor.start()
        assert not evicted.wait(timeout=0.3), "evicted while a batch was using the adapter"
        logits = model(INPUT_IDS[:1]).logits
        assert "a" in pool
    evictor.join(timeout=30)
    assert evicted.is_set() and "a" not in pool
    with torch.no_grad(), pool.batch([None]):
        assert not torch.allclose(model(INPUT_IDS[:1]).logits, logits)  # the adapter really left
