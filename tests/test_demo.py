"""The demo (``python -m peftkern.demo``), shortened: it trains, learns, saves, and peft reloads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftkern import demo


def test_quick_demo_learns_saves_and_reloads_with_peft(tmp_path, capsys):
    pytest.importorskip("peft")
    summary = demo.main(["--quick", "--steps", "25", "--output", str(tmp_path / "adapter"), "--no-progress"])
    assert summary["backend"] == "torch" and summary["device"] == "cpu"
    assert summary["layers"] == 2 * 7  # all-linear on two decoder layers
    assert 0 < summary["trainable"] < summary["total"]
    # It visibly learns: from about ln(vocab) + (the random model's overconfidence) to well below ln(vocab).
    assert summary["loss_before"] > 4.0 and summary["loss_after"] < 0.75 * summary["loss_before"]
    assert summary["peft_max_diff"] is not None and summary["peft_max_diff"] <= 1e-4
    assert summary["reload_max_diff"] <= 1e-4 and summary["logits_match"]
    assert summary["tokens_per_s"] > 0
    pool = summary["adapter_pool"]  # two adapters and the base in one mixed batch, each row checked
    assert pool["adapters"] == 2 and pool["rows"] == 9 and pool["max_diff"] <= 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == demo.DemoConfig().rank
    table = capsys.readouterr().out
    rows = ("device / backend", "parameters trained", "loss before -> after", "tokens/s", "logits match",
            "adapter pool: mixed batch")
    for row in rows:
        assert row in table
    assert "| logits match                   | yes" in table


def test_demo_module_entry_point(tmp_path):
    """``python -m peftkern.demo`` runs as a script (what ``make demo`` calls)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "peftkern.demo", "--quick", "--steps", "3", "--no-progress",
         "--output", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logits match" in result.stdout and (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_demo_rejects_bad_steps():
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])


@pytest.mark.gpu
def test_quick_demo_on_gpu(tmp_path):
    pytest.importorskip("peft")
    summary = demo.main(["--quick", "--device", "cuda", "--output", str(tmp_path / "a"), "--no-progress"])
    assert summary["backend"] == "triton" and summary["logits_match"]
    assert summary["loss_after"] < 0.75 * summary["loss_before"]
