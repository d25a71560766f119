"""The language-model trainer: model, text, schedule, loop, resume, export."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs.lm import base
from tests import lm_fixtures
from trainers.common import text
from trainers.common.distribution import Distribution
from trainers.common.schedule import WarmupInverseSqrt
from trainers.lm import data as data_lib
from trainers.lm import export as export_lib
from trainers.lm import model as model_lib
from trainers.lm.train import LanguageModelRun
from tf_moe import kernels
from tf_moe import optimizers


@pytest.fixture(scope="module")
def text_splits(tmp_path_factory):
    return lm_fixtures.write_text_splits(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tokenizer(text_splits, tmp_path_factory):
    config = lm_fixtures.small_config(text_splits)
    return text.Tokenizer(data_lib.text_model(
        config.data, str(tmp_path_factory.mktemp("vocab"))))


def _losses(workdir):
    with open(os.path.join(workdir, "train_losses.jsonl")) as f:
        return {entry["step"]: entry["loss"]
                for entry in map(json.loads, f)}


# Schedule, text, model arithmetic -------------------------------------------


def test_schedule_warms_up_linearly_then_decays_as_inverse_sqrt():
    schedule = WarmupInverseSqrt(1.0, warmup_steps=4)
    rates = [float(schedule(step)) for step in range(16)]
    np.testing.assert_allclose(rates[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(rates[15], math.sqrt(4 / 16), rtol=1e-6)
    held = WarmupInverseSqrt(2.0, warmup_steps=2, constant_steps=3)
    np.testing.assert_allclose(
        [float(held(step)) for step in (0, 1, 4, 19)],
        [1.0, 2.0, 2.0, 2.0 * math.sqrt(5 / 20)], rtol=1e-6)


def test_paper_configs_have_the_papers_ops_per_timestep():
    config = base.base_config().model
    lstm = 4 * 512 * (512 + 512)  # 2M, as the paper says.
    expert = 512 * 1024 + 1024 * 512  # 1M.
    config.num_experts, config.k = 4, 4
    assert model_lib.ops_per_timestep(config) == 2 * lstm + 4 * expert + 512 * 4
    config.blocks = ("lstm", "hmoe", "lstm")
    config.num_groups, config.experts_per_group = 16, 16
    assert model_lib.ops_per_timestep(config) == (
        2 * lstm + 4 * expert + 512 * 16 + 2 * 512 * 16)
    config.blocks = ("projected_lstm",)
    assert model_lib.ops_per_timestep(config) == (
        4 * 2048 * (512 + 512) + 2048 * 512)


def test_parameters_exclude_embedding_and_softmax():
    config = base.base_config().model
    config.d_model, config.num_experts, config.k = 8, 4, 2
    config.expert_hidden = 16
    body, softmax = model_lib.build_language_model(config, vocab_size=50)
    lstm = 4 * 8 * (8 + 8) + 4 * 8
    moe = 4 * (8 * 16 + 16 + 16 * 8 + 8) + 2 * 8 * 4  # Experts, W_g, W_noise.
    assert model_lib.count_parameters(body) == 2 * lstm + moe
    assert softmax.kernel.shape == (8, 50)


@pytest.mark.parametrize("architecture, block", [
    ("lstm", "moe"), ("lstm", "hmoe"), ("lstm", "ffn"),
    ("transformer", "moe"), ("transformer", "ffn")])
def test_expert_dropout_reaches_every_feed_forward_block(architecture, block):
    """`expert_dropout` drops hidden units of the experts and of dense
    blocks (with `dropout`, around every block, at 0): training output
    differs from inference's, and at rate 0 it does not."""
    config = base.base_config().model
    config.architecture, config.dropout = architecture, 0.0
    config.d_model, config.num_experts, config.k = 8, 4, 2
    config.num_groups, config.experts_per_group = 2, 2
    config.expert_hidden, config.ffn_hidden = 16, (16,)
    config.num_heads, config.noisy_gating = 2, False
    config.blocks = (block,) if architecture == "transformer" else (
        "lstm", block)
    ids = np.arange(1, 7, dtype=np.int32).reshape(2, 3)
    for rate, differs in ((0.0, False), (0.5, True)):
        config.expert_dropout = rate
        body, _ = model_lib.build_language_model(config, vocab_size=50)
        trained, inferred = (body(ids, training=t).numpy()
                             for t in (True, False))
        assert (not np.allclose(trained, inferred, atol=1e-4)) == differs
    config.expert_dropout = 1.0
    with pytest.raises(ValueError, match="config.model.expert_dropout"):
        model_lib.build_language_model(config, vocab_size=50)


@pytest.mark.parametrize("blocks", [("lstm", "moe"), ("lstm", "hmoe")])
def test_expert_storage_reaches_every_mixture(blocks):
    config = base.base_config().model
    config.d_model, config.num_experts, config.k = 8, 4, 2
    config.num_groups, config.experts_per_group = 2, 2
    config.expert_hidden, config.blocks = 16, blocks
    config.expert_storage = "per_expert"
    body, _ = model_lib.build_language_model(config, vocab_size=50)
    mixture = body.get_layer(f"{blocks[1]}_1")
    assert mixture.expert_storage == "per_expert"
    # Held per expert: 4 experts of 4 weights each, none stacked.
    assert len(mixture.experts.trainable_weights) == 16
    assert body(np.ones((2, 3), np.int32)).shape == (2, 3, 8)
    config.expert_storage = "split"
    with pytest.raises(ValueError, match="config.model.expert_storage"):
        model_lib.build_language_model(config, vocab_size=50)


def test_projected_lstm_cell_matches_its_equations():
    cell = model_lib.ProjectedLSTMCell(units=6, projection=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    h = rng.normal(size=(2, 3)).astype(np.float32)
    c = rng.normal(size=(2, 6)).astype(np.float32)
    cell.build((None, 4))
    new_h, (_, new_c) = cell(x, [h, c])
    z = np.concatenate([x, h], 1) @ cell.kernel.numpy() + cell.bias.numpy()
    i, f, g, o = np.split(z, 4, axis=1)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    expected_c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    expected_h = (sigmoid(o) * np.tanh(expected_c)) @ \
        cell.projection_kernel.numpy()
    np.testing.assert_allclose(new_c, expected_c, atol=1e-5)
    np.testing.assert_allclose(new_h, expected_h, atol=1e-5)


# Data ------------------------------------------------------------------------


def test_batches_hold_shifted_sentences_and_their_words(text_splits,
                                                        tokenizer):
    config = lm_fixtures.small_config(text_splits)
    batches, too_long = data_lib.eval_batches(config.data, tokenizer, "valid")
    sentences = tokens = 0
    for batch in batches:
        inputs, targets = batch["inputs"].numpy(), batch["targets"].numpy()
        assert inputs.size <= config.data.tokens_per_batch + inputs.shape[1]
        pieces = targets[:, :-1] > text.EOS_ID  # Targets that are inputs.
        np.testing.assert_array_equal(inputs[:, 1:][pieces],
                                      targets[:, :-1][pieces])
        assert (inputs[:, 0] == text.BOS_ID).all()
        assert ((targets == text.EOS_ID).sum(1) == 1).all()
        sentences += len(inputs)
        tokens += int((targets != 0).sum())
    assert sentences + too_long == 40


def test_interleave_evenly_spreads_each_list_in_its_order():
    assert data_lib.interleave_evenly([[1, 2, 3, 4], ["a", "b"]]) == [
        1, "a", 2, 3, "b", 4]
    assert data_lib.interleave_evenly([[1, 2]]) == [1, 2]


def test_embedded_corpora_are_split_per_corpus_and_interleaved():
    config = base.base_config()
    config.data.corpora = ("web", "austen")
    valid = [s.numpy().decode() for s in data_lib.sentences(config.data,
                                                            "valid")]
    web = [t for _, t in data_lib.corpora.read_verses("web")]
    austen = [t for _, t in data_lib.corpora.read_verses("austen")]
    # Every 50th record of each corpus, evenly mixed: both halves of the
    # valid split hold each corpus in about its share.
    expected = set(web[::50]) | set(austen[::50])
    assert set(valid) == expected and len(valid) == len(web[::50]) + len(
        austen[::50])
    first_half = set(valid[:len(valid) // 2])
    share = len(first_half & set(austen[::50])) / len(first_half)
    assert abs(share - len(austen) / (len(web) + len(austen))) < 0.01
    train = data_lib.sentences(config.data, "train")
    assert int(train.reduce(0, lambda n, _: n + 1)) == (
        len(web) + len(austen) - len(valid) - len(web[25::50])
        - len(austen[25::50]))


@pytest.mark.parametrize("corpora", [(), ("web", "kjv"), ("web", "web")])
def test_bad_embedded_corpora_are_refused(corpora):
    config = base.base_config()
    config.data.corpora = corpora
    with pytest.raises(ValueError, match="config.data.corpora must name"):
        data_lib.check_data_config(config.data)


def test_lm1b_source_reads_the_tfds_builder():
    import tensorflow_datasets as tfds
    config = base.base_config()
    config.data.source = "lm1b"
    with tfds.testing.mock_data(num_examples=6):
        lines = [s.numpy() for s in data_lib.sentences(config.data, "train")]
    assert len(lines) == 6 and all(isinstance(s, bytes) for s in lines)


# Training, resume and checkpoints -------------------------------------------


def test_training_lowers_perplexity_and_reports_it(text_splits, tmp_path,
                                                   capsys):
    config = lm_fixtures.small_config(text_splits)
    config.train.steps = 30
    config.train.learning_rate = 1e-2
    config.model.dropout = 0.0
    config.train.eval_every = 15
    run = LanguageModelRun(config, str(tmp_path), Distribution())
    before = run.evaluate("valid")["perplexity_per_word"]
    final = run.train()
    after = final["perplexity_per_word"]
    assert after < 0.5 * before
    # The learning curve: train()'s evaluations, with the tokens trained.
    curve = run.learning_curve
    assert [point["step"] for point in curve] == [15, 30]
    assert 0 < curve[0]["trained_tokens"] < curve[1]["trained_tokens"]
    assert curve[1]["trained_tokens"] == run.trained_tokens
    assert curve[1]["perplexity_per_word"] == after
    assert "train_sample_perplexity_per_word" not in curve[1]  # Off by default.
    out = capsys.readouterr().out
    assert "step 30/30 | loss" in out and "tok/s | ETA" in out
    losses = _losses(str(tmp_path))
    assert sorted(losses) == list(range(1, 31))
    assert os.listdir(os.path.join(tmp_path, "train"))  # TensorBoard events.


def test_learning_curve_measures_a_sample_of_the_training_text(text_splits,
                                                               tmp_path):
    config = lm_fixtures.small_config(text_splits)
    config.train.steps = 4
    config.train.eval_every = 2
    config.train.eval_train_sentences = 3
    run = LanguageModelRun(config, str(tmp_path), Distribution())
    run.train()
    curve = run.learning_curve
    assert [point["step"] for point in curve] == [2, 4]
    # Each point's sample is the first 3 training sentences in inference
    # mode, as `evaluate` measures them, and only those.
    sample = run.evaluate("train", max_sentences=3)
    assert curve[1]["train_sample_perplexity_per_word"] == pytest.approx(
        sample["perplexity_per_word"], rel=1e-6)
    assert curve[0]["train_sample_perplexity_per_word"] != pytest.approx(
        sample["perplexity_per_word"], rel=1e-6)  # Measured at step 2.
    assert 0 < sample["words"] < run.evaluate(
        "train", max_sentences=6)["words"]


def test_eval_train_sentences_must_not_be_negative(text_splits, tmp_path):
    # (The config's type check rejects a non-int.)
    config = lm_fixtures.small_config(text_splits)
    config.train.eval_train_sentences = -1
    with pytest.raises(ValueError, match="config.train.eval_train_sentences "
                                         "must be >= 0, got -1"):
        LanguageModelRun(config, str(tmp_path), Distribution())


def test_killed_run_resumes_with_the_uninterrupted_losses(text_splits,
                                                          tmp_path):
    config = lm_fixtures.small_config(text_splits)
    config.train.steps = 10
    whole = tmp_path / "whole"
    result = lm_fixtures.run_trainer(whole, config, "--mode=train")
    assert result.returncode == 0, result.stdout + result.stderr

    killed = tmp_path / "killed"
    process = lm_fixtures.run_trainer(killed, config, "--mode=train",
                                      wait=False)
    log = killed / "train_losses.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # Past a checkpoint (step 6), mid-way.
        if log.exists() and len(log.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = lm_fixtures.run_trainer(killed, config, "--mode=train")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout
    expected, got = _losses(whole), _losses(killed)
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in range(1, 11)],
                               [expected[s] for s in range(1, 11)],
                               rtol=1e-5)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(text_splits,
                                                              tmp_path,
                                                              capsys):
    config = lm_fixtures.small_config(text_splits)
    config.train.steps = 4
    run = LanguageModelRun(config, str(tmp_path), Distribution())
    run.train()
    latest = run.checkpoints.manager.latest_checkpoint
    assert latest.endswith("-4")
    data_file = [name for name in os.listdir(tmp_path / "checkpoints")
                 if name.startswith("ckpt-4.data")][0]
    path = tmp_path / "checkpoints" / data_file
    path.write_bytes(path.read_bytes()[:100])  # Truncated.
    again = LanguageModelRun(config, str(tmp_path), Distribution())
    assert again.restored_from.endswith("-2")
    assert int(again.step.numpy()) == 2
    assert "unreadable" in capsys.readouterr().out


def test_a_run_given_the_kernel_choices_of_another_repeats_it(
        text_splits, tmp_path, kernel_mode, request):
    """The experts' kernels chosen by timing ("auto") are written to the
    workdir; a run with the same seed that finds them there times nothing
    and repeats the first run's losses to the last digit."""
    kernel_mode("auto")
    config = lm_fixtures.small_config(text_splits)
    config.train.steps = 4
    first = tmp_path / "first"
    LanguageModelRun(config, str(first), Distribution()).train()
    choices = first / "kernel_choices.json"
    chosen = json.loads(choices.read_text())
    assert "layout" in {entry["product"] for entry in chosen}

    kernels.clear_measurements()
    keras.backend.clear_session()

    request.getfixturevalue("no_kernel_timing")  # From here on.
    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(choices, second / "kernel_choices.json")
    LanguageModelRun(config, str(second), Distribution()).train()
    assert _losses(str(second)) == _losses(str(first))
    assert json.loads((second / "kernel_choices.json").read_text()) == chosen


# MirroredStrategy against one device: tests/test_lm_transformer.py (the
# trainer's replica step is the same for both architectures).


def test_dtensor_mesh_gives_the_same_losses_and_resumes(tmp_path):
    """The LSTM-MoE-LSTM on a 2x2 mesh (LSTMs unrolled, experts sharded):
    the losses of one device over three updates, the third after resuming
    from the mesh run's checkpoint at step 2 (sharded weights and Adam
    slots, data position); sentences of at most 15 pieces keep the
    unrolled programs short. Its single-device copy (for export) holds the
    one-device run's weights."""
    text_splits = lm_fixtures.write_text_splits(str(tmp_path), max_words=8)

    def config(steps):
        config = lm_fixtures.small_config(text_splits, dropout=0.0,
                                          noisy_gating=False)
        config.data.max_len = 15
        config.train.steps = steps
        return config

    def mesh():
        return Distribution("dtensor", "batch:2,expert:2", num_devices=4)

    one_device = LanguageModelRun(config(3), str(tmp_path / "none"),
                                  Distribution())
    expected = one_device.train()
    LanguageModelRun(config(2), str(tmp_path / "mesh"), mesh()).train()
    resumed = LanguageModelRun(config(3), str(tmp_path / "mesh"), mesh())
    assert resumed.restored_from.endswith("ckpt-2")
    got = resumed.train()
    losses = {kind: _losses(str(tmp_path / kind)) for kind in ("none", "mesh")}
    np.testing.assert_allclose([losses["mesh"][s] for s in (1, 2, 3)],
                               [losses["none"][s] for s in (1, 2, 3)],
                               rtol=1e-5)
    np.testing.assert_allclose(got["perplexity_per_word"],
                               expected["perplexity_per_word"], rtol=1e-4)
    body, _ = resumed.single_device_model()
    for a, b in zip(body.get_weights(), one_device.body.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


# Export ----------------------------------------------------------------------


@pytest.mark.parametrize("make_config", [
    lm_fixtures.small_config, lm_fixtures.small_transformer_config],
    ids=["lstm", "transformer"])
def test_export_scores_and_samples_raw_text_without_tf_moe(text_splits,
                                                           tmp_path,
                                                           make_config):
    config = make_config(text_splits)
    config.train.steps = 2
    run = LanguageModelRun(config, str(tmp_path), Distribution())
    run.train()
    export_dir = str(tmp_path / "export")
    export_lib.export(run.tokenizer, run.body, run.softmax, export_dir)

    # The export's per-word perplexity of the valid split equals the
    # trainer's own evaluation (two separate code paths).
    with open(text_splits["valid"]) as f:
        valid = [line.strip() for line in f if line.strip()]
    evaluation = run.evaluate("valid")
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["tf_moe"] = None  # any import of tf_moe now fails
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (the tokenizer's ops)
        served = tf.saved_model.load({export_dir!r})
        scores = served.score(tf.constant({valid!r}))
        samples = served.sample(tf.constant(["In the beginning", "And"]),
                                tf.constant(8), tf.constant(1.0),
                                tf.constant(3))
        print(json.dumps(dict(
            log_likelihood=scores["log_likelihood"].numpy().tolist(),
            words=scores["words"].numpy().tolist(),
            tokens=scores["tokens"].numpy().tolist(),
            samples=[s.decode() for s in samples.numpy()])))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    # The trainer leaves out sentences over max_len pieces (tokens counts
    # the beginning of sentence too).
    kept = [i for i, tokens in enumerate(served["tokens"])
            if tokens - 1 <= config.data.max_len]
    assert 0 < len(kept) < len(valid)
    nll = -sum(served["log_likelihood"][i] for i in kept)
    words = sum(served["words"][i] for i in kept)
    assert words == evaluation["words"]
    np.testing.assert_allclose(math.exp(nll / words),
                               evaluation["perplexity_per_word"], rtol=1e-4)
    assert len(served["samples"]) == 2
    assert all(isinstance(s, str) for s in served["samples"])


def test_expert_learning_rate_scale_reaches_the_routed_experts(text_splits,
                                                               tmp_path):
    config = lm_fixtures.small_config(text_splits)
    config.train.steps = 0
    for scale, expected in ((0.25, 0.25), ("square_root", math.sqrt(2 / 4))):
        config.train.expert_learning_rate_scale = scale
        run = LanguageModelRun(config, str(tmp_path / str(scale)),
                               Distribution())
        experts = optimizers.routed_expert_weights(*run.models)
        assert len(experts) == 4  # One MoE layer: two kernels, two biases.
        for weight in run.trainable_variables:
            assert run.optimizer.learning_rate_scale(weight) == pytest.approx(
                expected if any(weight is w for w in experts) else 1.0)
    config.train.expert_learning_rate_scale = 0.0
    with pytest.raises(ValueError, match="`expert_learning_rate_scale`"):
        LanguageModelRun(config, str(tmp_path / "bad"), Distribution())


# Bad input -------------------------------------------------------------------


def test_bad_inputs_fail_before_training_with_clear_errors(text_splits,
                                                           tmp_path):
    config = lm_fixtures.small_config(text_splits)
    config.data.train_path = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="config.data.train_path"):
        LanguageModelRun(config, str(tmp_path / "a"), Distribution())
    (tmp_path / "empty.txt").write_text("")
    config.data.train_path = str(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="config.data.train_path.*empty"):
        LanguageModelRun(config, str(tmp_path / "a"), Distribution())

    with pytest.raises(ValueError, match="num_experts=4 is not divisible "
                       "by the size 3 of mesh axis 'expert'"):
        LanguageModelRun(lm_fixtures.small_config(text_splits),
                         str(tmp_path / "b"),
                         Distribution("dtensor", "batch:1,expert:3",
                                      num_devices=3))
    with pytest.raises(ValueError, match="num_sampled must be 0 on a DTensor"):
        LanguageModelRun(lm_fixtures.small_config(text_splits, num_sampled=8),
                         str(tmp_path / "b2"),
                         Distribution("dtensor", "batch:2,expert:2",
                                      num_devices=4))
    with pytest.raises(ValueError, match="--mesh"):
        Distribution("dtensor")
    with pytest.raises(ValueError, match="blocks"):
        LanguageModelRun(lm_fixtures.small_config(
            text_splits, blocks=("lstm", "conv")), str(tmp_path / "c"),
            Distribution())

    config = lm_fixtures.small_config(text_splits)
    config.train.steps = 0
    LanguageModelRun(config, str(tmp_path / "d"), Distribution())
    config.model.d_model = 24
    with pytest.raises(ValueError, match="different model"):
        LanguageModelRun(config, str(tmp_path / "d"), Distribution())


def test_unknown_config_field_is_refused_by_the_binary(text_splits, tmp_path):
    config = lm_fixtures.small_config(text_splits)
    result = lm_fixtures.run_trainer(tmp_path, config,
                                     "--config.model.no_such_field=3")
    assert result.returncode != 0
    assert "no_such_field" in result.stdout + result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_table7_family_is_matched_on_ops_per_timestep():
    from configs.lm import table7
    for scale, target in (("paper", 8.4e6), ("cpu", 1.31e5)):
        ops = {name: model_lib.ops_per_timestep(
            table7.get_config(f"{name},{scale}").model)
            for name in table7.MODELS}
        for name, value in ops.items():
            # The heaviest: LSTM-2048-512 (9.4M at paper scale) and, at CPU
            # scale, MoE-4096-h, whose 16 secondary gates of 256 experts
            # cost 25% more than its experts there.
            assert 0.95 * target < value < 1.3 * target, (scale, name, value)
    paper = table7.get_config("moe-4096-h").model
    assert paper.num_groups * paper.experts_per_group == 4096
    with pytest.raises(ValueError, match="table7 model"):
        table7.get_config("moe-7")
