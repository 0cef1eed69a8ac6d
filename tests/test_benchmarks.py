"""The benchmark suite's plumbing on CPU: ``run_all.py --smoke`` and ``plot.py`` end to end, the row
schema, summary.json holding only what was measured, and the harness's ratio helpers.

These tests check the harness, never performance: CPU smoke timings are not GPU results.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402 (benchmarks/ is a directory of scripts, not a package)
import run_all  # noqa: E402


def _cpu_env() -> dict:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "run_all.py"), "--smoke", "--out", str(out)],
        env=_cpu_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "cpu"


def _rows(directory: Path) -> list[dict]:
    rows = []
    for name in ("limits", "lora", "train", "adapter", "prompt", "multi_lora"):
        document = json.loads((directory / f"{name}.json").read_text())
        assert set(document) == {"op", "env", "skipped", "errors", "rows"}
        assert document["errors"] == []
        assert document["op"] == name
        rows += document["rows"]
    return rows


@pytest.mark.slow
def test_smoke_rows_follow_the_schema(smoke_run):
    rows = _rows(smoke_run)
    for row in rows:
        harness.validate_row(row)
        assert row["smoke"] is True and row["timer"] == harness.CPU_SMOKE_TIMER
        assert row["device_slug"] == "cpu" and row["cuda_version"] == torch.version.cuda
        assert row["peak_mem_bytes"] is None  # no memory mode on CPU
    lora = harness.find_rows(rows, op="lora")
    providers = {row["provider"] for row in lora}
    assert {"base", "base_two_gemms", "torch_unfused", "triton"} <= providers
    assert {row["mode"] for row in lora} == set(harness.MODES)
    for provider in ("torch_unfused", "triton"):
        for mode in harness.MODES:
            for dropout_p, adapters in itertools.product((0.0, 0.1), ("fp32", "bf16")):
                row = harness.find_row(lora, provider=provider, mode=mode,
                                       params={"dropout_p": dropout_p, "adapter_dtype": adapters})
                assert row is not None, (provider, mode, dropout_p, adapters)
                assert row["ratios"]["vs_base"] > 0
                assert ("vs_base_two_gemms" in row["ratios"]) == (mode == "full")
    # DoRA rows: peft's DoRA layer and ours on both backends, every mode and dropout, with their ratios.
    for provider in ("peft_dora", "dora_torch", "dora_triton"):
        for mode in harness.MODES:
            for dropout_p in (0.0, 0.1):
                row = harness.find_row(lora, provider=provider, mode=mode,
                                       params={"dropout_p": dropout_p, "adapter_dtype": "fp32"})
                assert row is not None, (provider, mode, dropout_p)
                assert (row["ratios"].get("vs_peft_dora", 0) > 0) == (provider != "peft_dora")
                assert ("vs_lora" in row["ratios"]) == (provider == "dora_triton")
    copy = harness.find_row(rows, op="limits", provider="d2d_copy")
    assert copy["bandwidth_gbps"] > 0 and copy["bytes_moved"] == 2 * copy["shapes"]["bytes"]


@pytest.mark.slow
def test_summary_holds_only_measured_keys(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert all(isinstance(value, float) for value in summary.values())
    assert set(summary) <= set(run_all.TARGETS)
    rows = _rows(smoke_run)
    import bench_adapter
    import bench_lora
    import bench_multi_lora
    import bench_prompt
    import bench_train

    recomputed = {}
    for module in (bench_lora, bench_train, bench_adapter, bench_prompt, bench_multi_lora):
        recomputed.update(module.summarize(rows, True))
    assert summary == pytest.approx(recomputed)
    # Measured from this run's rows: the LoRA and adapter timing ratios. Not measurable on CPU: peak memory.
    lora_keys = {"lora_fwd_vs_base", "lora_train_speedup_vs_peft", "lora_train_vs_base"}
    assert lora_keys | {f"{key}_bf16_adapters" for key in lora_keys} <= set(summary)
    assert {"dora_train_vs_lora", "dora_train_speedup_vs_peft"} <= set(summary)
    assert "dora_memory_ratio_vs_peft" not in summary
    assert {"adapter_train_speedup_vs_unfused", "adapter_train_vs_two_gemms"} <= set(summary)
    adapter = harness.find_rows(rows, op="adapter", mode="full")
    ours = harness.find_row(adapter, provider=bench_adapter.ours(rows))
    assert summary["adapter_train_speedup_vs_unfused"] == pytest.approx(
        harness.find_row(adapter, provider="torch_unfused")["median_ms"] / ours["median_ms"])
    assert summary["adapter_train_vs_two_gemms"] == pytest.approx(ours["ratios"]["vs_two_gemms"])
    assert "lora_memory_ratio_vs_peft" not in summary and "lora_memory_ratio_vs_peft_bf16_adapters" not in summary
    multi_lora_keys = {key for key in run_all.TARGETS if key.startswith("multi_lora")}
    assert multi_lora_keys <= set(summary)  # peft is installed: its mixed batch is measured too
    decode64 = harness.find_row(rows, op="multi_lora", provider=bench_multi_lora.ours(rows), mode="forward",
                                shapes={"tokens": 4, "adapters": 4, "rank": 4})
    assert summary["multi_lora_decode64_vs_floor"] == decode64["ratios"]["vs_floor"]
    assert summary["multi_lora_decode_speedup_vs_peft"] == pytest.approx(
        1 / decode64["ratios"]["vs_peft_mixed_batch"])
    prompt = harness.find_rows(rows, op="prompt", mode="forward")
    ours_prompt = harness.find_row(prompt, provider=bench_prompt.ours(rows))
    assert summary["prompt_concat_speedup"] == pytest.approx(1 / ours_prompt["ratios"]["vs_peft_style"])
    assert summary["prompt_concat_bandwidth_fraction"] == ours_prompt["ratios"]["bandwidth_fraction"]
    has_ours = harness.find_rows(rows, op="train", provider="peftkern") != []
    assert ("train_e2e_speedup_vs_peft" in summary) == has_ours
    manifest = json.loads((smoke_run / "run.json").read_text())
    assert manifest["errors"] == [] and manifest["env"]["smoke"] is True
    assert "CPU smoke run" in (smoke_run / "summary.md").read_text()


@pytest.mark.slow
def test_smoke_adapter_rows(smoke_run):
    """bench_adapter: the floor, the unfused baseline and Triton in forward and full, with their ratios;
    torch.compile (not in CPU smoke) and cuda (not built) recorded as skipped, not as errors."""
    import bench_adapter

    document = json.loads((smoke_run / "adapter.json").read_text())
    rows = document["rows"]
    assert {row["mode"] for row in rows} == {"forward", "full"}
    assert {row["provider"] for row in rows} == {"two_gemms", "torch_unfused", "triton"}
    for mode in ("forward", "full"):
        floor = harness.find_row(rows, provider="two_gemms", mode=mode)
        assert floor["params"] == {} and floor["ratios"] == {}
        assert floor["shapes"] == {**bench_adapter.SMOKE, "bottleneck": 4}
        for provider in ("torch_unfused", "triton"):
            row = harness.find_row(rows, provider=provider, mode=mode, params={"activation": "relu"})
            assert row["ratios"]["vs_two_gemms"] == pytest.approx(row["median_ms"] / floor["median_ms"])
        assert "vs_torch_unfused" in harness.find_row(rows, provider="triton", mode=mode)["ratios"]
    assert {entry["provider"] for entry in document["skipped"]} == {"torch_compile", "cuda"}


def test_adapter_check_catches_a_wrong_provider():
    """bench_adapter's output check passes the bf16 unfused computation and rejects one without the
    scaling or the up bias (the adapter term is far above its tolerance)."""
    import bench_adapter

    from peftkern import reference

    tensors = bench_adapter._inputs(torch.device("cpu"), 64, 256, 16, torch.bfloat16)
    x, down_weight, down_bias, up_weight, up_bias = (t.detach() for t in tensors)
    expected = reference.bottleneck_adapter(
        *(t.float() for t in (x, down_weight, down_bias, up_weight, up_bias)), scaling=bench_adapter.SCALING
    )
    hidden = torch.relu(torch.nn.functional.linear(x, down_weight, down_bias))
    for scaling, bias, right in ((bench_adapter.SCALING, up_bias, True), (1.0, up_bias, False),
                                 (bench_adapter.SCALING, None, False)):
        out = x + scaling * torch.nn.functional.linear(hidden, up_weight, bias)
        if right:
            harness.check_close("unfused", out, expected, *bench_adapter.CHECK_TOLERANCE)
        else:
            with pytest.raises(harness.ProviderWrong):
                harness.check_close("wrong", out, expected, *bench_adapter.CHECK_TOLERANCE)


@pytest.mark.slow
def test_smoke_prompt_rows(smoke_run):
    """bench_prompt: peft_style and Triton in forward and backward, each row with the bytes it must move
    and its ratios to this bench's own copy bandwidth; torch.compile and cuda recorded as skipped."""
    import bench_prompt

    document = json.loads((smoke_run / "prompt.json").read_text())
    rows = document["rows"]
    copy = harness.find_row(rows, provider="d2d_copy")
    assert copy["bandwidth_gbps"] > 0
    timed = [row for row in rows if row is not copy]
    assert {row["provider"] for row in timed} == {"peft_style", "triton"}
    assert {row["mode"] for row in timed} == {"forward", "backward"}
    for row in timed:
        assert row["shapes"] == bench_prompt.SMOKE
        distinct = (row["bytes_moved"] - bench_prompt.bytes_moved(row["shapes"], 2, 0)[row["mode"]]) // (
            row["shapes"]["virtual_tokens"] * row["shapes"]["hidden"] * 2)
        assert 1 <= distinct <= row["shapes"]["tasks"]
        assert row["bytes_moved"] == bench_prompt.bytes_moved(row["shapes"], 2, distinct)[row["mode"]]
        floor_ms = row["bytes_moved"] / (copy["bandwidth_gbps"] * 1e9) * 1e3
        assert row["ratios"]["vs_floor"] == pytest.approx(row["median_ms"] / floor_ms)
        assert row["ratios"]["bandwidth_fraction"] == pytest.approx(floor_ms / row["median_ms"])
        assert ("vs_peft_style" in row["ratios"]) == (row["provider"] == "triton")
    assert {entry["provider"] for entry in document["skipped"]} == {"torch_compile", "cuda"}


@pytest.mark.slow
def test_smoke_multi_lora_rows(smoke_run):
    """bench_multi_lora: every provider in forward on each smoke case; full mode (no peft: it refuses
    adapter_names in training) on the prefill case only; decode rows carry W plus the distinct adapters'
    bytes and their ratio to the bench's own copy."""
    import bench_multi_lora

    document = json.loads((smoke_run / "multi_lora.json").read_text())
    assert document["errors"] == [] and {e["provider"] for e in document["skipped"]} == {"cuda"}
    rows = document["rows"]
    prefill_tokens, decode_tokens = bench_multi_lora.SMOKE["prefill"][0], bench_multi_lora.SMOKE_DECODE_TOKENS
    providers = {"peft_mixed_batch", "torch_gather_bmm", "loop_per_adapter", "triton"}
    cases = {(r["shapes"]["tokens"], r["shapes"]["adapters"], r["shapes"]["rank"], r["params"]["ranks"])
             for r in rows if "adapters" in r["shapes"]}
    assert cases == {(4, 2, 4, "uniform"), (4, 4, 4, "uniform"), (prefill_tokens, 2, 4, "uniform"),
                     (prefill_tokens, 4, 4, "uniform")}
    hidden = bench_multi_lora.SMOKE_HIDDEN
    weight_bytes = hidden * hidden * 2
    for tokens, adapters, rank, ranks in cases:
        shapes = {"tokens": tokens, "adapters": adapters, "rank": rank}
        case_rows = harness.find_rows(rows, shapes=shapes, params={"ranks": ranks, "lengths": "equal"})
        assert {r["provider"] for r in case_rows if r["mode"] == "forward"} == providers
        full = {r["provider"] for r in case_rows if r["mode"] == "full"}
        assert full == (providers - {"peft_mixed_batch"} if tokens == prefill_tokens else set())
        # prefill also with ragged request lengths, forward only, without peft (equal lengths only)
        ragged = harness.find_rows(rows, shapes=shapes, params={"ranks": ranks, "lengths": "ragged"})
        assert {(r["provider"], r["mode"]) for r in ragged} == (
            {(p, "forward") for p in providers - {"peft_mixed_batch"}} if tokens == prefill_tokens else set())
        for row in case_rows + ragged:
            assert row["ratios"]["vs_base"] > 0
            if tokens <= decode_tokens and row["mode"] == "forward":
                # min(tokens, adapters) distinct adapters, A and B each [rank, hidden] in bf16
                adapter_bytes = 2 * hidden * 2 * min(tokens, adapters) * rank
                assert row["bytes_moved"] == weight_bytes + adapter_bytes and row["ratios"]["vs_floor"] > 0
            else:
                assert row["bytes_moved"] is None and "vs_floor" not in row["ratios"]
    base = harness.find_row(rows, provider="base", mode="forward", shapes={"tokens": 4})
    assert base["bytes_moved"] == weight_bytes


def test_multi_lora_batches_and_baselines():
    """bench_multi_lora's batches (requests, distinct adapters, unsorted ids) and its two torch baselines
    against the reference, with mixed ranks and a base-only row."""
    import bench_multi_lora

    from peftkern import reference

    ids, requests, length = bench_multi_lora.batch_ids(64, 8)
    assert (requests, length) == (64, 1) and len(set(ids.tolist())) == 8
    assert not bool((ids[1:] >= ids[:-1]).all())  # unsorted
    ids, requests, length = bench_multi_lora.batch_ids(8192, 8)
    assert (requests, length) == (8, 1024) and sorted(ids[::1024].tolist()) == list(range(8))
    assert bool((ids.view(8, 1024) == ids[::1024, None]).all())  # each request's rows are contiguous
    ids, requests, length = bench_multi_lora.batch_ids(256, 512)
    assert (requests, length) == (256, 1) and len(set(ids.tolist())) == 256

    ids, lengths = bench_multi_lora.ragged_ids(8192, 64)
    assert len(lengths) == 64 and sum(lengths) == 8192 and len(set(lengths)) > 32  # ragged
    assert min(lengths) >= 8192 // 64 // 3 and sorted(set(ids.tolist())) == list(range(64))
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert bool((ids[starts].repeat_interleave(torch.tensor(lengths)) == ids).all())  # contiguous requests

    assert bench_multi_lora.slot_ranks(5, "mixed") == [8, 16, 64, 8, 16]
    assert bench_multi_lora.case_keys(64, 5, [8, 16, 64, 8, 16], "mixed", 16) == (
        {"tokens": 16, "hidden": 64, "adapters": 5, "rank": 64}, {"ranks": "mixed"})
    pool = bench_multi_lora._Pool(torch.device("cpu"), 24, [2, 4, 8], torch.float32)
    assert not bool(pool.lora_a[0, 2:].any()) and not bool(pool.lora_b[1, :, 4:].any())  # zero padding
    x = torch.randn(7, 24)
    ids = torch.tensor([2, 0, -1, 1, 2, 2, 0])
    expected = reference.multi_lora_linear(x, pool.weight, None, pool.lora_a, pool.lora_b, ids, pool.scalings,
                                           pool.ranks)
    gathered = bench_multi_lora._gather_bmm(x, pool.weight, pool.lora_a, pool.lora_b, ids, pool.scalings)
    looped = bench_multi_lora._loop_per_adapter(x, pool.weight, pool.lora_a, pool.lora_b, ids, pool.slot_ranks,
                                                pool.scalings.tolist())
    torch.testing.assert_close(gathered, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(looped, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, torch.nn.functional.linear(x, pool.weight), atol=1e-2)


def test_prompt_bytes_and_checks():
    """bench_prompt's byte count by hand, its peft-style baseline equal to the reference, and its mask and
    label check rejecting a provider that drops the given padding."""
    import bench_prompt

    from peftkern import reference

    shapes = {"batch": 4, "tokens": 10, "virtual_tokens": 3, "hidden": 16, "vocab": 50, "tasks": 8}
    moved = bench_prompt.bytes_moved(shapes, 2, distinct_tasks=4)
    # forward: 40 token rows + 4 distinct prompts x 3 rows read, 4 x 13 rows written (16 bf16 each); 40 ids,
    # mask and label entries and 4 task ids read, 52 mask and label entries written (int64)
    assert moved["forward"] == (40 + 12 + 52) * 16 * 2 + (3 * 40 + 4 + 2 * 52) * 8
    assert moved["backward"] == (4 * 3 + 4 * 3) * 16 * 2 + 4 * 8
    inputs = bench_prompt._inputs(torch.device("cpu"), shapes, torch.bfloat16)
    expected = reference.prompt_concat(*inputs)
    got = bench_prompt._peft_style(*inputs)
    assert torch.equal(got[0], expected.inputs_embeds)
    bench_prompt._check_mask_and_labels("peft_style", got, expected)
    input_ids, embed_weight, prompts, prompt_ids, attention_mask, labels = inputs
    assert not bool(attention_mask.all())  # some padding, or the next check could not fail
    unpadded = bench_prompt._peft_style(input_ids, embed_weight, prompts, prompt_ids,
                                        torch.ones_like(attention_mask), labels)
    with pytest.raises(harness.ProviderWrong, match="attention_mask"):
        bench_prompt._check_mask_and_labels("wrong", unpadded, expected)


@pytest.mark.slow
def test_plot_writes_pngs(smoke_run, tmp_path):
    pytest.importorskip("matplotlib", reason="plot.py needs matplotlib (extras [test] / [bench])")
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "plot.py"), str(smoke_run), "--out", str(tmp_path)],
        env=_cpu_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted(tmp_path.glob("*.png"))
    assert tmp_path / "lora_speedup_vs_tokens_full.png" in pngs
    for name in ("adapter_speedup_vs_tokens_full", "prompt_speedup_vs_tokens_forward",
                 "multi_lora_speedup_vs_tokens_forward", "bandwidth_fraction"):
        assert tmp_path / f"{name}.png" in pngs, name
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in pngs)


def test_run_all_tolerates_missing_ops_and_reports_errors(tmp_path, monkeypatch):
    fake = tmp_path / "benches"
    fake.mkdir()
    (fake / "bench_not_merged.py").write_text("from peftkern import op_not_written_yet\nOP = 'x'\n")
    (fake / "bench_broken.py").write_text("OP = 'broken'\n\ndef run(bench):\n    raise RuntimeError('x')\n")
    (fake / "bench_ok.py").write_text(
        "import harness\nimport torch\nOP = 'ok'\n\n"
        "def run(bench):\n"
        "    x = torch.ones(4, requires_grad=True)\n"
        "    bench.time_modes('p', lambda: x * 2, {'n': 4}, torch.float32, grads=[x])\n\n"
        "def summarize(rows, smoke):\n    return {'ok_key': 1.5, 'unmeasured': None}\n"
    )
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    try:
        status = run_all.main(["--smoke", "--out", str(tmp_path / "out"), "--bench-dir", str(fake)])
    finally:
        torch.set_num_threads(threads)
        for name in ("bench_not_merged", "bench_broken", "bench_ok"):
            sys.modules.pop(name, None)
    assert status == 1  # the broken bench is an error; the others still wrote their results
    out = tmp_path / "out" / "cpu"
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["ran"] == ["bench_ok"]
    assert [e["module"] for e in manifest["errors"]] == ["bench_broken"]
    assert [e["op"] for e in manifest["skipped"]] == ["not_merged"]
    assert json.loads((out / "summary.json").read_text()) == {"ok_key": 1.5}
    assert len(json.loads((out / "ok.json").read_text())["rows"]) == 3


def test_plot_sweeps_adapters_and_bandwidth(tmp_path):
    """Rows shaped as a multi-adapter, memory-bound bench would write them (synthetic, in a temp dir)."""
    pytest.importorskip("matplotlib", reason="plot.py needs matplotlib (extras [test] / [bench])")
    import plot

    bench = harness.Bench("multi_lora", torch.device("cpu"), smoke=True)
    copy = bench.record(bench.row("d2d_copy", "forward", {"bytes": 1000}, "bfloat16", timing=(1e-3,) * 3,
                                  bytes_moved=2000))
    for adapters in (1, 8, 64):
        shapes = {"tokens": 64, "hidden": 32, "rank": 16, "adapters": adapters}
        bench.record(bench.row("peft", "forward", shapes, "bfloat16", timing=(1.0 * adapters,) * 3))
        bench.record(bench.row("triton", "forward", shapes, "bfloat16", timing=(0.5,) * 3, bytes_moved=500))
    bench.add_ratios("peft")
    bench.write(tmp_path)
    written = plot.plot_directory(tmp_path / "cpu", tmp_path / "png")
    names = {path.name for path in written}
    assert {"multi_lora_speedup_vs_adapters_forward.png", "bandwidth_fraction.png"} <= names
    assert copy["bandwidth_gbps"] == pytest.approx(2000 / 1e-6 / 1e9)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_train_compares_loss_curves(monkeypatch):
    """bench_train's peft-vs-peftkern plumbing (this checks the bench, not from_peft: an identity stand-in
    replaces from_peft where this checkout lacks it): both runs see the same weights, data and seed, so the
    loss curves agree within 1% per step."""
    import bench_train

    import peftkern

    if not hasattr(peftkern, "from_peft"):
        monkeypatch.setattr(peftkern, "from_peft", lambda model: model, raising=False)
    bench = harness.Bench("train", torch.device("cpu"), smoke=True, options=argparse.Namespace(steps=3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        bench_train.run(bench)
    finally:
        torch.set_num_threads(threads)
    assert bench.errors == []
    for dropout_p, adapters in bench_train.SMOKE_VARIANTS:  # both axes: dropout 0.1 / 0, fp32 / bf16 adapters
        params = {"dropout_p": dropout_p, "adapter_dtype": adapters}
        ours = harness.find_row(bench.rows, provider="peftkern", params=params)
        peft = harness.find_row(bench.rows, provider="peft", params=params)
        assert len(ours["metrics"]["losses"]) == len(peft["metrics"]["losses"]) == 3
        assert ours["metrics"]["loss_curves_agree"] is True
        assert ours["ratios"]["vs_peft"] == pytest.approx(ours["median_ms"] / peft["median_ms"])
    expected = {"train_e2e_speedup_vs_peft"}  # no memory on CPU
    if importlib.util.find_spec("bitsandbytes") is not None:  # the QLoRA variant: peft + bitsandbytes vs from_peft
        ours = harness.find_row(bench.rows, provider="peftkern_qlora")
        assert len(ours["metrics"]["losses"]) == 3 and ours["metrics"]["loss_curves_agree"] is True
        expected.add("qlora_e2e_speedup_vs_peft")
    assert set(bench_train.summarize(bench.rows, True)) == expected


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_train_cpu_compare_qlora_variant(monkeypatch, tmp_path):
    """``bench_train.py --device cpu --qlora`` on the smoke model: peft + bitsandbytes against from_peft, a file
    of its own with both rows, the ratios, and loss curves that agree at dropout 0."""
    pytest.importorskip("bitsandbytes")
    import bench_train

    monkeypatch.setattr(bench_train, "CPU", bench_train.SMOKE)
    path = bench_train.cpu_compare(1, 0, tmp_path, qlora=True)
    assert path.name == f"train_cpu_qlora_{torch.get_num_threads()}_threads.json"
    result = json.loads(path.read_text())
    assert result["config"]["qlora"] is True and result["config"]["dtype"] == "bfloat16"
    assert [(row["provider"], row["dropout_p"]) for row in result["rows"]] == [
        (name, p) for p in bench_train.CPU_DROPOUTS for name in ("peft", "peftkern")]
    assert result["ratios"]["loss_max_rel_diff_vs_peft_dropout_0"] < bench_train.LOSS_RTOL
    assert result["ratios"]["step_thread_cpu_time_vs_peft_dropout_0"] > 0


def _row(bench, provider, mode, shapes, params, median, peak=None):
    return bench.record(bench.row(provider, mode, shapes, "bfloat16", params, (median, median, median), peak))


def test_ratios_match_baselines_by_subset():
    bench = harness.Bench("lora", torch.device("cpu"), smoke=True)
    _row(bench, "base", "full", {"tokens": 8, "hidden": 4}, {}, 2.0)
    _row(bench, "base", "full", {"tokens": 16, "hidden": 4}, {}, 4.0)
    ours = _row(bench, "triton", "full", {"tokens": 8, "hidden": 4, "rank": 2}, {"dropout_p": 0.1}, 3.0)
    other = _row(bench, "triton", "forward", {"tokens": 8, "hidden": 4, "rank": 2}, {"dropout_p": 0.1}, 1.0)
    bench.add_ratios("base")
    assert ours["ratios"] == {"vs_base": 1.5}
    assert other["ratios"] == {}  # no forward baseline was measured: no ratio invented
    bench.add_ratios("base", name="vs_full_base", baseline_mode="full", modes=("forward",))
    assert other["ratios"] == {"vs_full_base": 0.5}
    rows = bench.rows
    assert harness.ratio_of(rows, {"provider": "triton", "mode": "full"}, {
        "provider": "base", "mode": "full", "shapes": {"tokens": 8}}) == 1.5
    assert harness.ratio_of(rows, {"provider": "cuda"}, {"provider": "base", "shapes": {"tokens": 8}}) is None
    assert harness.drop_missing({"a": None, "b": 2.0, "c": float("nan")}) == {"b": 2.0}
    with pytest.raises(ValueError, match="matches 2 rows"):
        harness.find_row(rows, provider="base")


def test_wrong_or_failing_providers_are_errors_not_times():
    bench = harness.Bench("t", torch.device("cpu"), smoke=True)
    x = torch.ones(4, requires_grad=True)
    expected = torch.full((4,), 2.0)
    assert len(bench.time_provider("right", lambda: ((lambda: x * 2), [x]), {"n": 4}, "float32",
                                   expected=expected)) == 3
    assert bench.time_provider("wrong", lambda: ((lambda: x * 3), [x]), {"n": 4}, "float32",
                               expected=expected) == []

    def broken():
        raise RuntimeError("out of memory")

    assert bench.time_provider("broken", broken, {"n": 4}, "float32") == []
    assert [e["provider"] for e in bench.errors] == ["wrong", "broken"]
    assert "ProviderWrong" in bench.errors[0]["error"] and "got 3" in bench.errors[0]["error"]
    assert {row["provider"] for row in bench.rows} == {"right"}


def test_bandwidth_ratios_use_the_runs_copy():
    bench = harness.Bench("t", torch.device("cpu"), smoke=True)
    copy = bench.copy_bandwidth(nbytes=1 << 16)
    assert harness.find_row(bench.rows, provider="d2d_copy")["bandwidth_gbps"] == copy
    floor = bench.floor_ms(1 << 20)
    row = bench.record(bench.row("p", "forward", {"n": 1}, "bfloat16", timing=(2 * floor,) * 3,
                                 bytes_moved=1 << 20))
    bench.add_bandwidth_ratios()
    assert row["ratios"] == pytest.approx({"vs_floor": 2.0, "bandwidth_fraction": 0.5})
    assert row["bandwidth_gbps"] == pytest.approx(copy / 2)


def test_write_replaces_or_merges(tmp_path):
    first = harness.Bench("t", torch.device("cpu"), smoke=True)
    for tokens in (1, 2):
        first.record(first.row("p", "full", {"tokens": tokens}, "float32", timing=(1.0,) * 3))
    first.write(tmp_path)
    second = harness.Bench("t", torch.device("cpu"), smoke=True)
    second.record(second.row("p", "full", {"tokens": 2}, "float32", timing=(2.0,) * 3))
    path = second.write(tmp_path, merge=True)
    rows = json.loads(path.read_text())["rows"]
    assert [(r["shapes"]["tokens"], r["median_ms"]) for r in rows] == [(1, 1.0), (2, 2.0)]
    second.write(tmp_path)
    assert len(json.loads(path.read_text())["rows"]) == 1


def test_validate_row_rejects_bad_rows():
    bench = harness.Bench("lora", torch.device("cpu"), smoke=True)
    good = bench.row("p", "full", {"n": 1}, torch.float32, timing=(1.0, 0.5, 2.0))
    harness.validate_row(good)
    with pytest.raises(ValueError, match="must be marked smoke"):
        harness.validate_row({**good, "smoke": False})
    with pytest.raises(ValueError, match="p20 <= median <= p80"):
        harness.validate_row({**good, "p20_ms": 3.0})
    with pytest.raises(ValueError, match="row keys"):
        harness.validate_row({k: v for k, v in good.items() if k != "timestamp"})


def test_full_runs_refuse_cpu():
    with pytest.raises(SystemExit, match="--smoke"):
        harness.check_device(torch.device("cpu"), smoke=False)
