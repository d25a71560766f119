"""The layer benchmark runs end to end at toy size (timings not checked)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_layer.py")
sys.path.insert(0, os.path.dirname(_BENCH))

from experts_alone import ExpertsAlone  # noqa: E402


_TOY_SHAPE = ("--experts=4", "--tokens=64", "--model_dim=8",
              "--hidden_size=4", "--k=2", "--warmup=1", "--malloc=system")


def _run_layer_bench(output, *flags):
    """Runs bench_layer.py at the toy shape with `flags`, writing `output`;
    returns its stdout."""
    result = subprocess.run(
        [sys.executable, _BENCH, *_TOY_SHAPE, *flags, f"--output={output}"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _run_bench(script, *flags):
    """Runs bench/`script` with `flags`; returns its stdout."""
    result = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(_BENCH), script),
         *flags], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_layer_benchmark_writes_table_and_json(tmp_path):
    output = tmp_path / "layer.json"
    stdout = _run_layer_bench(
        output, "--steps=1", "--gatings=noisy_top_k,expert_choice",
        "--kernels=auto,xla", "--peer_group_size=32")
    # The peers (the default --peers): each timed, or skipped with the
    # reason (TF Model Garden where it is not installed).
    assert ("| experts | experts alone (floor) | per-expert dispatcher | "
            "tf_moe noisy_top_k (auto kernels, dropless) |" in stdout)
    report = json.loads(output.read_text())
    assert [row["layer"] for row in report["peers"]] == [
        "gshard", "garden", "mixtral"]
    for row in report["peers"]:
        assert row.get("skipped") or row["step_seconds"] > 0
    assert report["peers"][0]["step_seconds"] > 0  # GShard needs nothing
    assert report["machine"]["cores"] >= 1
    # Every worker ran on a pooled CPU allocator (tf_moe.allocator).
    assert report["dense"]["cpu_allocator_pooled"] is True
    assert all(row["cpu_allocator_pooled"] for row in report["moe"])
    for gating in ("noisy_top_k", "expert_choice"):
        for mode in ("auto", "xla"):
            assert (f"| tf_moe.MoE {gating} k=2 ({mode} kernels, dropless) "
                    "| 4 |" in stdout)
    noisy, noisy_xla, expert_choice, _ = report["moe"]
    assert [(row["gating"], row["kernels"]) for row in report["moe"]] == [
        ("noisy_top_k", "auto"), ("noisy_top_k", "xla"),
        ("expert_choice", "auto"), ("expert_choice", "xla")]
    assert noisy["num_experts"] == 4 and noisy["step_seconds"] > 0
    # "auto" timed the experts' products and ran the fastest; "xla" none.
    assert noisy["kernel_measurements"] and not noisy_xla[
        "kernel_measurements"]
    for measured in noisy["kernel_measurements"]:
        assert measured["chosen"] in measured["seconds"]
    # One per-expert baseline per expert count, beside each of its rows.
    assert (noisy["partition_step_seconds"]
            == expert_choice["partition_step_seconds"] > 0)
    # E * (d*h + h + h*d + d) + gate (2 * d * E; d * E without noise).
    experts = 4 * (8 * 4 + 4 + 4 * 8 + 8)
    assert noisy["parameters"] == experts + 2 * 8 * 4
    assert expert_choice["parameters"] == experts + 8 * 4


def test_layer_benchmark_times_fixed_capacity_and_storages(tmp_path):
    output = tmp_path / "layer.json"
    stdout = _run_layer_bench(
        output, "--steps=1", "--kernels=tensorflow", "--no-partition_baseline",
        "--no-experts_alone", "--peers=none", "--capacity_factors=none,1",
        "--expert_storages=stacked,per_expert")
    assert ("| tf_moe.MoE noisy_top_k k=2 (tensorflow kernels, capacity "
            "factor 1) | 4 |" in stdout)
    assert ("| tf_moe.MoE noisy_top_k k=2 (tensorflow kernels, capacity "
            "factor 1, per_expert weights) | 4 |" in stdout)
    rows = json.loads(output.read_text())["moe"]
    assert [(row["capacity_factor"], row["expert_storage"]) for row in rows
            ] == [(None, "stacked"), (None, "per_expert"), (1.0, "stacked"),
                  (1.0, "per_expert")]
    assert len({row["parameters"] for row in rows}) == 1
    dropless, _, fixed, _ = rows
    assert dropless["capacity_factor"] is None
    assert "dropped_fraction" not in dropless
    assert dropless["rows_over_routed"] >= 1.0
    # Capacity ceil(1 * 2 * 64 / 4) = 32 rows per expert, 128 in all, for
    # the 128 routed slots; what the busier experts get past 32 is dropped.
    assert fixed["capacity_factor"] == 1.0
    assert fixed["rows_over_routed"] == 1.0
    assert 0.0 <= fixed["dropped_fraction"] < 0.5


@pytest.mark.parametrize("worker", ["dense", "partition:4",
                                    "moe:4:noisy_top_k:tensorflow",
                                    "moe:4:noisy_top_k:tensorflow::per_expert"])
def test_layer_benchmark_step_applies_adam_to_every_weight(worker,
                                                           kernel_mode):
    import bench_layer
    args = bench_layer._parse_args([*_TOY_SHAPE, "--optimizer=adam"])
    layer, step, inputs = bench_layer.make_step(args, worker)
    before = [v.numpy() for v in layer.trainable_variables]
    step(inputs)
    after = [v.numpy() for v in layer.trainable_variables]
    assert len(before) >= 4
    # Adam's first step moves every weight by about its rate.
    for a, b, v in zip(after, before, layer.trainable_variables):
        assert not np.array_equal(a, b), v.path
    # Without --optimizer the step leaves the weights as they are.
    layer, step, inputs = bench_layer.make_step(
        bench_layer._parse_args(list(_TOY_SHAPE)), worker)
    before = [v.numpy() for v in layer.trainable_variables]
    step(inputs)
    for a, b in zip(before, [v.numpy() for v in layer.trainable_variables]):
        np.testing.assert_array_equal(a, b)


def test_layer_benchmark_ratios_are_medians_of_same_round_ratios(tmp_path):
    output = tmp_path / "layer.json"
    _run_layer_bench(output, "--steps=3", "--kernels=tensorflow",
                     "--peers=none")
    report = json.loads(output.read_text())
    (moe,) = report["moe"]
    assert len(moe["step_seconds_all"]) == len(
        moe["dense_step_seconds_all"]) == 3
    ratios = [seconds / dense for seconds, dense in zip(
        moe["step_seconds_all"], moe["dense_step_seconds_all"])]
    assert moe["ratios_to_dense_all"] == ratios
    assert moe["ratio_to_dense"] == sorted(ratios)[1]
    assert moe["first_step_seconds"] > 0
    # One dense step per round of each configuration: tf_moe's three, the
    # per-expert dispatcher's three and the experts' alone three, from the
    # one dense process.
    assert len(report["dense"]["step_seconds_all"]) == 9
    assert moe["partition_ratio_to_dense"] > 0
    assert moe["experts_alone_ratio_to_dense"] > 0


@pytest.mark.parametrize("mode,layout", [("tensorflow", "padded"),
                                         ("per_expert", "packed")])
def test_experts_alone_runs_each_row_through_its_expert(kernel_mode, mode,
                                                        layout):
    kernel_mode(mode)
    rows = tf.random.normal([12, 5])
    layer = ExpertsAlone(3, 4)
    outputs = layer(rows).numpy()
    assert layer.packed == (layout == "packed")
    experts = layer.experts
    w_in, b_in, w_out, b_out = (np.asarray(w) for w in (
        experts.kernel_in, experts.bias_in, experts.kernel_out,
        experts.bias_out))
    for row in range(12):
        e = row // 4  # 4 rows per expert, in turn
        hidden = np.maximum(rows.numpy()[row] @ w_in[e] + b_in[e], 0)
        np.testing.assert_allclose(outputs[row], hidden @ w_out[e] + b_out[e],
                                   rtol=1e-5, atol=1e-5)


def test_experts_alone_refuses_rows_that_do_not_split_evenly():
    with pytest.raises(ValueError, match="`rows` must split evenly over 3"):
        ExpertsAlone(3, 4)(tf.zeros([10, 5]))


def test_hierarchical_benchmark_writes_table_and_json(tmp_path):
    output = tmp_path / "hierarchical.json"
    stdout = _run_bench("bench_hierarchical.py", "--sizes=2x2,4x2",
                        "--tokens=64", "--model_dim=8", "--hidden_size=4",
                        "--steps=1", "--warmup=1", "--malloc=system",
                        "--flat_gate_limit_gb=0.0000015",
                        "--stream_gigabytes=0.01", f"--output={output}")
    assert "| 4 | 2x2 |" in stdout
    report = json.loads(output.read_text())
    small, large = report["hierarchical"]
    assert small["num_experts"] == 4 and large["num_experts"] == 8
    assert "flat" in small  # 64 x 4 floats (1 KB): under the limit
    assert "flat_skipped_gate_gb" in large  # 64 x 8 floats (2 KB): over it
    # Experts E * (d*h + h + h*d + d), gates d * G * 2 + G * d * B * 2.
    assert large["parameters"] == 8 * (8 * 4 + 4 + 4 * 8 + 8) + 8 * 4 * 2 + 4 * 8 * 2 * 2
    # The weight-traffic floor: 16 bytes per parameter at the measured
    # bandwidth, so in proportion to the parameters.
    assert report["stream_bandwidth_bytes_per_second"] > 0
    assert large["weight_traffic_seconds"] == (
        large["parameters"] * 16 / report["stream_bandwidth_bytes_per_second"])


def test_mesh_benchmark_writes_table_and_json(tmp_path):
    output = tmp_path / "mesh.json"
    stdout = _run_bench("bench_mesh.py", "--experts=4", "--model_dim=8",
                        "--hidden=4", "--batch=16", "--devices=1,2",
                        "--steps=1", "--warmup=1", "--kernels=tensorflow",
                        f"--output={output}")
    assert "tensorflow kernels" in stdout
    report = json.loads(output.read_text())
    assert report["config"]["kernels"] == "tensorflow"
    assert report["kernel_measurements"] == []  # a forced mode times nothing
    no_mesh, one, two = report["rows"]
    assert [row["devices"] for row in report["rows"]] == [
        "1 (no mesh)", "1", "2"]
    assert no_mesh["ratio_to_single_device"] == 1.0
    for row in (one, two):
        assert row["step_seconds"] > 0 and row["gradient_seconds"] > 0
    # Two devices hold half the experts each: fewer bytes per device.
    assert two["parameter_bytes"] < one["parameter_bytes"]
    assert one["parameter_bytes"] == no_mesh["parameter_bytes"]


def test_matmul_benchmark_times_both_weight_forms_of_the_packed_step(
        tmp_path):
    output = tmp_path / "matmul.json"
    stdout = _run_bench("bench_matmul.py", "--experts=3", "--rows=4",
                        "--model_dim=8", "--hidden_size=16",
                        f"--output={output}")
    assert "| packed FFN step, E weights of [d, h] (gradients apart) |" in \
        stdout
    seconds = json.loads(output.read_text())["seconds"]
    assert len([name for name in seconds if name.startswith("packed")]) == 2
    assert all(value > 0 for value in seconds.values())


def test_packed_step_weight_forms_give_the_same_gradients():
    from bench_matmul import packed_ffn_steps
    steps, x = packed_ffn_steps(3, 4, 8, 16)
    stacked, separate = (float(step(x)) for step in steps.values())
    assert stacked != 0.0
    np.testing.assert_allclose(stacked, separate, rtol=1e-5)


def test_noise_benchmark_writes_table_and_json(tmp_path):
    output = tmp_path / "noise.json"
    stdout = _run_bench("bench_noise.py", "--sizes=1000,2001", "--rounds=2",
                        f"--output={output}")
    assert "| 2,001 |" in stdout
    rows = json.loads(output.read_text())["rows"]
    assert [row["samples"] for row in rows] == [1000, 2001]
    for row in rows:
        assert len(row["seconds"]) == 2 and row["ratio"] > 0
        assert all(len(times) == 2 for times in row["seconds_all"].values())


def test_stacking_benchmark_runs_both_layouts_under_both_allocators(tmp_path):
    output = tmp_path / "stacking.json"
    stdout = _run_bench("bench_stacking.py", "--experts=3", "--rows=4,5",
                        "--model_dim=8", "--hidden_size=16", "--rounds=2",
                        f"--output={output}")
    assert "| pooled | True | 5 |" in stdout
    allocators = json.loads(output.read_text())["allocators"]
    assert allocators["malloc"]["TF_CPU_ALLOCATOR_USE_BFC"] == "0"
    assert allocators["pooled"]["TF_CPU_ALLOCATOR_USE_BFC"] == "1"
    for result in allocators.values():
        assert [row["rows_per_expert"] for row in result["rows"]] == [4, 5]
        for row in result["rows"]:
            assert row["ratio"] > 0
            assert all(len(times) == 2
                       for times in row["seconds_all"].values())


def test_gate_benchmark_times_three_ways_that_agree(tmp_path):
    output = tmp_path / "gate.json"
    # The benchmark refuses to time ways that route or differentiate apart.
    stdout = _run_bench("bench_gate.py", "--shapes=64x8x2,33x16x3",
                        "--rounds=2", f"--output={output}")
    assert "| 33 | 16 | 3 |" in stdout
    rows = json.loads(output.read_text())["rows"]
    assert [(r["rows"], r["experts"], r["k"]) for r in rows] == [
        (64, 8, 2), (33, 16, 3)]
    for row in rows:
        assert set(row["seconds"]) == {"tensorflow", "xla elementwise",
                                       "xla all"}
        assert all(len(times) == 2 for times in row["seconds_all"].values())


def test_translation_benchmark_joins_rows_of_earlier_runs(tmp_path):
    def row(model, bleu):
        return dict(model=model, parameters=10, ops_per_timestep=20,
                    valid_bleu=bleu, bleu_sentences=5, valid_perplexity=9.0,
                    steps=2, train_seconds=1.0, tokens_per_second=100.0,
                    learning_curve=[dict(step=2, trained_tokens=64,
                                         valid_bleu=bleu,
                                         valid_perplexity=9.0)])

    earlier = []
    for model, bleu in (("moe-32", 2.5), ("gnmt", 1.5)):
        earlier.append(tmp_path / f"{model}.json")
        earlier[-1].write_text(json.dumps(dict(steps=2, rows=[row(model,
                                                                  bleu)])))
    output, curves = tmp_path / "joined.json", tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(_BENCH),
                                      "bench_nmt.py"), "--models=",
         f"--rows_from={earlier[0]},{earlier[1]}", f"--output={output}",
         f"--curves={curves}"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| moe-32 | 10 | 20 | 2.50 | 9.00 | 100 |" in result.stdout
    joined = json.loads(output.read_text())
    assert [r["model"] for r in joined["rows"]] == ["moe-32", "gnmt"]
    assert joined["rows_from"] == [str(path) for path in earlier]
    assert curves.stat().st_size > 0


def test_translation_benchmark_sets_the_rates_and_labels_the_rows(tmp_path):
    output = tmp_path / "nmt.json"
    curves = tmp_path / "curves.png"
    stdout = _run_bench("bench_nmt.py", "--models=moe-32", "--steps=1",
                        "--bleu_sentences=1", "--learning_rate=1e-3",
                        "--expert_learning_rate_scale=square_root",
                        "--model_override=dropout=0.4",
                        "--eval_train_pairs=3", f"--output={output}",
                        f"--curves={curves}")
    assert ("| moe-32 lr=0.001 expert_lr_scale=square_root dropout=0.4 |"
            in stdout)
    (row,) = json.loads(output.read_text())["rows"]
    assert row["learning_rate"] == 1e-3
    assert row["expert_learning_rate_scale"] == "square_root"
    assert row["model_overrides"] == {"dropout": 0.4}
    (point,) = row["learning_curve"]  # The closing evaluation.
    assert point["valid_over_train_sample"] == (
        point["valid_perplexity"] / point["train_sample_perplexity"])
    assert curves.stat().st_size > 0


def test_translation_benchmark_rejects_unknown_override(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(_BENCH),
                                      "bench_nmt.py"), "--models=gnmt",
         "--steps=1", "--model_override=experts_count=8"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert "gnmt's config.model has no field experts_count" in result.stderr


def test_learning_curves_keep_each_models_colour_in_every_panel(tmp_path):
    import curves
    points = [{"trained_tokens": 1e6, "bleu": 1.0, "ratio": 1.2},
              {"trained_tokens": 2e6, "bleu": 2.0, "ratio": 1.4}]
    older = [{"trained_tokens": 1e6, "bleu": 1.0}]  # No ratio: absent there.
    rows = [{"model": "gnmt", "learning_curve": points},
            {"model": "moe-512-h", "learning_curve": older},
            {"model": "moe-32", "learning_curve": points}]
    figure = curves.plot_learning_curves(
        rows, tmp_path / "curves.png",
        [("bleu", "BLEU", False), ("ratio", "ratio", False)], "title",
        lambda name: name.startswith("moe"))
    colours = [{line.get_label(): line.get_color() for line in axis.lines}
               for axis in figure.axes]
    assert set(colours[1]) == {"gnmt", "moe-32"}
    for model in ("gnmt", "moe-32"):
        assert colours[1][model] == colours[0][model]
    assert len(set(colours[0].values())) == 3
