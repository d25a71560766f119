"""The LM benchmark runs end to end for a few steps (quality not checked):
its rows record what they trained on and the routing of training and of
valid, and --curves_from redraws the curves from the JSON."""

import json
import os
import subprocess
import sys

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_lm.py")


def _run(*flags):
    result = subprocess.run([sys.executable, _BENCH, *flags],
                            capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_lm_benchmark_rows_curves_and_redraw(tmp_path):
    output, curves = tmp_path / "lm.json", tmp_path / "curves.png"
    stdout = _run("--models=moe-4", "--steps=4", "--eval_every=2",
                  "--learning_rates=2e-3", "--corpora=austen,web",
                  "--eval_train_sentences=20",
                  f"--output={output}", f"--curves={curves}")
    assert "| moe-4 lr=0.002 |" in stdout
    (row,) = json.loads(output.read_text())["rows"]
    assert row["corpora"] == ["austen", "web"]
    assert row["learning_rate"] == 2e-3 and row["steps"] == 4
    assert row["experts"] == 4
    assert [p["step"] for p in row["learning_curve"]] == [2, 4]
    tokens = [p["trained_tokens"] for p in row["learning_curve"]]
    assert 0 < tokens[0] < tokens[1]
    for point in row["learning_curve"]:  # --eval_train_sentences
        assert point["valid_over_train_sample"] == (
            point["valid_perplexity_per_word"]
            / point["train_sample_perplexity_per_word"])
    # Training's routing (the last report window, noise on) is recorded for
    # the same layers as valid's.
    assert row["train_routing"].keys() == row["routing"].keys()
    for metrics in row["train_routing"].values():
        assert metrics["load_cv"] >= 0
        assert metrics["load_max_over_mean"] >= 1
    assert curves.stat().st_size > 0

    redrawn = tmp_path / "redrawn.png"
    _run(f"--curves_from={output}", f"--curves={redrawn}")
    assert redrawn.stat().st_size > 0


def test_lm_benchmark_model_override(tmp_path):
    output = tmp_path / "lm.json"
    choices = tmp_path / "kernel_choices.json"
    stdout = _run("--models=moe-1-wide", "--steps=2",
                  "--model_override=ffn_hidden=(96,)",
                  "--expert_learning_rate_scales=0.5",
                  "--tokens_per_batch=1024", f"--kernel_choices={choices}",
                  f"--output={output}")
    assert ("| moe-1-wide expert_lr_scale=0.5 ffn_hidden=(96,) "
            "tokens_per_batch=1024 |") in stdout
    results = json.loads(output.read_text())
    (row,) = results["rows"]
    assert row["model_overrides"] == {"ffn_hidden": [96]}
    assert row["tokens_per_batch"] == 1024
    assert row["expert_learning_rate_scale"] == 0.5
    # The kernels chosen (none to time for a dense model) are recorded.
    assert json.loads(choices.read_text()) == results["kernel_choices"]
    # Two LSTMs of 64 (66,048 weights, as in the table's 132,160 with its
    # FFN of 512), then the overridden FFN 64 -> 96 -> 64 with its biases.
    assert row["parameters"] == 66_048 + 64 * 96 + 96 + 96 * 64 + 64


def test_lm_benchmark_rejects_unknown_override():
    result = subprocess.run(
        [sys.executable, _BENCH, "--models=moe-4", "--steps=2",
         "--model_override=experts_count=8"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert "config.model has no field experts_count" in result.stderr
