"""The translation trainer: beam search, model, data, training, export."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs.nmt import base
from configs.nmt import paper
from tests import lm_fixtures
from trainers import corpora
from trainers.common import text
from trainers.common.distribution import Distribution
from trainers.nmt import beam_search as beam_search_lib
from trainers.nmt import data as data_lib
from trainers.nmt import model as model_lib
from trainers.nmt.train import TranslationRun

EOS, BOS = 3, 2


# Beam search ------------------------------------------------------------------


def _toy_step(tables):
    """A decoder whose log-probabilities depend on the sentence, the position
    and the previous piece: `tables [batch, max_len, vocab, vocab]`."""
    tables = tf.constant(tables, tf.float32)

    def step(ids, state):
        position, sentence = state
        rows = tf.stack([sentence, position, ids], 1)
        log_probs = tf.nn.log_softmax(tf.gather_nd(tables, rows))
        return log_probs, [position + 1, sentence]
    return step


def _search(tables, beam, max_length, alpha):
    batch = tables.shape[0]
    state = [tf.zeros([batch * beam], tf.int32),
             tf.repeat(tf.range(batch), beam)]
    return beam_search_lib.beam_search(
        _toy_step(tables), state, tf.constant(batch), beam,
        tf.constant(max_length), alpha, BOS, EOS)


def _brute_force(table, max_length, alpha):
    """Every output (ending in EOS, or cut at max_length) with its score,
    best first."""
    log_p = table - np.log(np.exp(table).sum(-1, keepdims=True))
    vocab = table.shape[-1]
    scored = []
    for length in range(1, max_length + 1):
        for ids in itertools.product(range(vocab), repeat=length):
            if EOS in ids[:-1] or (ids[-1] != EOS and length < max_length):
                continue
            previous = (BOS,) + ids[:-1]
            total = sum(log_p[t, previous[t], ids[t]] for t in range(length))
            scored.append((total / ((5 + length) / 6) ** alpha, ids))
    return sorted(scored, key=lambda entry: -entry[0])


def test_length_penalty_is_gnmts():
    np.testing.assert_allclose(
        float(beam_search_lib.length_penalty(5, 0.6)), (10 / 6) ** 0.6,
        rtol=1e-6)
    assert float(beam_search_lib.length_penalty(7, 0.0)) == 1.0


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_wide_beam_finds_the_exhaustive_search_ranking(alpha):
    rng = np.random.default_rng(0)
    max_length, vocab = 4, 5
    tables = rng.normal(0, 2, (3, max_length, vocab, vocab))
    # Beam 64 holds every live hypothesis (4 ** 3), so the search is exact.
    ids, scores = _search(tables, 64, max_length, alpha)
    for sentence in range(3):
        expected = _brute_force(tables[sentence], max_length, alpha)[:10]
        np.testing.assert_allclose(scores[sentence, :10],
                                   [score for score, _ in expected],
                                   rtol=1e-4)
        best = expected[0][1]
        got = ids[sentence, 0].numpy()
        assert tuple(got[:len(best)]) == best
        assert not got[len(best):].any()


def test_greedy_search_takes_the_most_probable_piece_until_the_end():
    rng = np.random.default_rng(1)
    max_length, vocab = 6, 7
    tables = rng.normal(0, 2, (4, max_length, vocab, vocab))
    state = [tf.zeros([4], tf.int32), tf.range(4)]
    ids, _ = beam_search_lib.greedy_search(
        _toy_step(tables), state, tf.constant(4), tf.constant(max_length),
        BOS, EOS)
    for sentence in range(4):
        previous, greedy = BOS, []
        for position in range(max_length):
            previous = int(np.argmax(tables[sentence, position, previous]))
            greedy.append(previous)
            if previous == EOS:
                break
        got = list(ids[sentence, 0].numpy()[:len(greedy)])
        assert got == greedy
        assert not ids[sentence, 0].numpy()[len(greedy):].any()


def test_narrow_beam_never_beats_the_exhaustive_best():
    rng = np.random.default_rng(2)
    tables = rng.normal(0, 2, (5, 4, 5, 5))
    _, scores = _search(tables, 2, 4, 0.6)
    for sentence in range(5):
        best = _brute_force(tables[sentence], 4, 0.6)[0][0]
        assert float(scores[sentence, 0]) <= best + 1e-5
        assert float(scores[sentence, 0]) >= float(scores[sentence, 1])


# Model -------------------------------------------------------------------------


def _model_config(model=None, **fields):
    """A tiny model block (`model`, changed in place, or a new one)."""
    if model is None:
        model = base.base_config().model
    model.d_model, model.expert_hidden, model.dropout = 16, 24, 0.0
    model.num_experts, model.k = 4, 2
    model.ffn_hidden = 48
    model.num_groups, model.experts_per_group = 2, 2
    for field, value in fields.items():
        model[field] = value
    return model


@pytest.mark.parametrize("fields", [
    dict(moe="moe", gating="batchwise"),
    dict(moe="moe", gating="noisy_top_k"),
    dict(moe="hmoe", gating="noisy_top_k"),
    dict(moe="ffn")])
def test_step_by_step_decoding_equals_teacher_forcing(fields):
    model = model_lib.Seq2Seq(_model_config(**fields), vocab_size=30, seed=3)
    rng = np.random.default_rng(0)
    source = rng.integers(4, 30, (3, 7)).astype(np.int32)
    source[0, 5:] = 0  # Padding.
    inputs = rng.integers(4, 30, (3, 6)).astype(np.int32)
    inputs[:, 0] = BOS
    memory, source_mask = model.encode(source, training=False)
    expected = model.decode(inputs, memory, source_mask, training=False)
    keys = model.attention.keys(memory)
    state = model.initial_state(3)
    for position in range(6):
        logits, state = model.decode_step(inputs[:, position], state, memory,
                                          keys, source_mask)
        np.testing.assert_allclose(logits, expected[:, position], atol=2e-5)


@pytest.mark.parametrize("moe", ["moe", "hmoe", "ffn"])
def test_expert_dropout_reaches_the_layer_between_the_lstms(moe):
    """`expert_dropout` drops the hidden units of the experts or of the
    baseline's feed-forward layer (the config's `dropout`, around every
    layer, is 0 here): the training output differs from inference's, and
    at 0 it does not."""
    outputs = {}
    for rate in (0.0, 0.5):
        keras.utils.set_random_seed(0)  # The same weights at both rates.
        model = model_lib.Seq2Seq(
            _model_config(moe=moe, gating="noisy_top_k", noisy_gating=False,
                          expert_dropout=rate), vocab_size=30, seed=3)
        x = tf.random.normal((2, 5, 16), seed=1)
        outputs[rate] = [model.encoder_mixture(x, training=t).numpy()
                         for t in (True, False)]
    np.testing.assert_allclose(*outputs[0.0], atol=1e-6)
    assert not np.allclose(*outputs[0.5], atol=1e-3)
    np.testing.assert_allclose(outputs[0.5][1], outputs[0.0][1], atol=1e-6)


def test_padding_does_not_change_the_encoding():
    model = model_lib.Seq2Seq(_model_config(), vocab_size=30, seed=3)
    source = np.array([[5, 6, 7, 8, 3]], np.int32)
    padded = np.pad(source, [[0, 0], [0, 4]])
    memory, _ = model.encode(source, training=False)
    memory_padded, mask = model.encode(padded, training=False)
    np.testing.assert_allclose(memory_padded[:, :5], memory, atol=1e-5)
    assert mask.numpy().tolist() == [[True] * 5 + [False] * 4]


def test_ops_per_timestep_by_hand():
    model = _model_config(moe="moe", num_experts=8, k=2)
    d, h = 16, 24
    lstm = lambda i, u: 4 * u * (i + u)  # noqa: E731
    encoder = 2 * lstm(d, d // 2) + 2 * lstm(d, d) + d * 8 + 2 * (d * h + h * d)
    decoder = (lstm(d, d) + d * d + 2 * d * 8 + 2 * (2 * d * h + h * d)
               + lstm(2 * d, d))
    assert model_lib.ops_per_timestep(model) == encoder + decoder


def test_paper_configs_are_matched_on_ops_per_timestep():
    for variant in ("paper", "cpu"):
        ops = {name: model_lib.ops_per_timestep(
            paper.get_config(f"{name},{variant}").model)
            for name in paper.MODELS}
        baseline = ops[paper.BASELINE]
        for name, value in ops.items():
            # Only the gates differ: at most 10% above the baseline.
            assert baseline <= value <= 1.1 * baseline, (variant, name, ops)
    experts = paper.get_config("moe-2048-h").model
    assert experts.num_groups * experts.experts_per_group == 2048
    # Experts of about 2M parameters, as the paper's.
    assert 2 * 512 * experts.expert_hidden == 2_097_152


# Data --------------------------------------------------------------------------


def _write_pairs(directory, counts=(300, 30, 30)):
    """The first verse pairs as aligned text files; returns `{(split, side):
    path}`."""
    pairs = corpora.parallel_verses("web", "sparv")
    paths, start = {}, 0
    for split, count in zip(data_lib.SPLITS, counts):
        chosen = pairs[start:start + count]
        start += count
        for side, column in (("source", 1), ("target", 2)):
            path = os.path.join(directory, f"{split}.{side}")
            with open(path, "w") as f:
                f.write("\n".join(p[column] for p in chosen) + "\n")
            paths[split, side] = path
    return paths


def small_config(paths, **model):
    config = base.base_config()
    config.data.source = "text"
    config.data.pairs = ("en-es",)
    for (split, side), path in paths.items():
        config.data[f"{split}_{side}_path"] = path
    config.data.vocab_size = 700
    config.data.max_len = 120
    config.data.tokens_per_batch = 800
    config.data.shuffle_buffer = 1000
    _model_config(config.model, **model)
    config.train.steps = 6
    config.train.warmup_steps = 2
    config.train.constant_steps = 0
    config.train.learning_rate = 1e-2
    config.train.log_every = 2
    config.train.checkpoint_every = 3
    config.decode.batch_size = 16
    config.decode.bleu_sentences = 20
    return config


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    return _write_pairs(str(tmp_path_factory.mktemp("pairs")))


def test_misaligned_files_are_refused(pair_files, tmp_path):
    config = small_config(pair_files)
    short = tmp_path / "short.target"
    lines = open(pair_files["valid", "target"]).read().splitlines()
    short.write_text("\n".join(lines[:-1]) + "\n")
    config.data.valid_target_path = str(short)
    with pytest.raises(ValueError, match="valid_source_path and "
                       "valid_target_path are not aligned.*30 lines.*29"):
        data_lib.check_data_config(config.data)


@pytest.mark.parametrize("pairs, message", [
    (("en-xx",), "unknown language code 'xx'"),
    (("en",), "not a 'source-target' pair"),
    (("en-en",), "not a 'source-target' pair"),
    (("en-es", "en-es"), "repeats a pair")])
def test_bad_language_pairs_are_refused(pairs, message):
    config = base.base_config()
    config.data.pairs = pairs
    with pytest.raises(ValueError, match=message):
        data_lib.parse_pairs(config.data)
    config.data.source = "wmt14"
    config.data.pairs = ("fr-de",)
    with pytest.raises(ValueError, match="one side must be en"):
        data_lib.parse_pairs(config.data)


def test_empty_and_long_pairs_are_counted_not_lost(pair_files, tmp_path):
    config = small_config(pair_files)
    source = tmp_path / "valid.source"
    target = tmp_path / "valid.target"
    source.write_text("in the beginning\n\nlong " + "word " * 80 + "\nyes\n")
    target.write_text("en el principio\nnada\nlargo\n\n")
    config.data.valid_source_path = str(source)
    config.data.valid_target_path = str(target)
    tokenizer = text.Tokenizer(
        data_lib.text_model(config.data, str(tmp_path / "work")))
    kept, counts = data_lib.eval_pairs(config.data, tokenizer, "valid")
    assert counts == {"pairs": 4, "empty": 2, "too_long": 1}
    assert [p["target"] for p in kept.as_numpy_iterator()] == [
        b"en el principio"]


def test_examples_carry_the_target_language_token(tmp_path):
    config = base.base_config()
    config.data.pairs = ("en-es", "es-en")
    config.data.vocab_size = 500
    config.data.vocab_sentences = 2000
    config.data.tokens_per_batch = 2000
    config.data.shuffle_buffer = 10
    tokenizer = text.Tokenizer(data_lib.text_model(config.data,
                                                   str(tmp_path)))
    assert [tokenizer.piece_id("<2en>"), tokenizer.piece_id("<2es>")] == [
        4, 5]
    assert tokenizer.num_reserved == 6
    batch = next(iter(data_lib.train_batches(config.data, tokenizer, 4, 0)))
    tags = batch["source"][:, 0].numpy()
    # The directions take turns: both targets in one batch.
    assert set(tags) == {4, 5}
    assert (batch["inputs"][:, 0] == text.BOS_ID).numpy().all()
    lengths = tf.reduce_sum(tf.cast(batch["targets"] > 0, tf.int32), 1)
    last = tf.gather(batch["targets"], lengths - 1, batch_dims=1)
    assert (last.numpy() == text.EOS_ID).all()
    np.testing.assert_array_equal(batch["inputs"][:, 1:][batch["inputs"][
        :, 1:] > 0], batch["targets"][batch["targets"] > text.EOS_ID])


def test_wmt14_source_reads_the_tfds_builder(tmp_path):
    import tensorflow_datasets as tfds
    config = base.base_config()
    config.data.source = "wmt14"
    config.data.pairs = ("en-de",)
    with tfds.testing.mock_data(num_examples=6):
        pairs = list(data_lib.sentence_pairs(config.data, "valid")
                     .as_numpy_iterator())
    assert len(pairs) == 6
    assert all(isinstance(p["source"], bytes) for p in pairs)


# Training, evaluation and export ---------------------------------------------


def test_training_lowers_perplexity_and_reports_bleu(pair_files, tmp_path,
                                                     capsys):
    config = small_config(pair_files)
    config.train.steps = 30
    config.train.log_every = 10
    config.train.checkpoint_every = 30
    run = TranslationRun(config, str(tmp_path), Distribution("none"))
    before = run.evaluate("valid")
    after = run.train()
    out = capsys.readouterr().out
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)
    assert 0.0 <= after["bleu"] <= 100.0
    assert after["bleu_sentences"] == 20
    assert "step 30/30 | loss" in out and "BLEU" in out
    assert os.path.exists(tmp_path / "train_losses.jsonl")
    translation = run.translate(["In the beginning God created the heavens "
                                 "and the earth."])
    assert isinstance(translation[0], str)


def test_learning_curve_measures_a_sample_of_the_training_pairs(
        pair_files, tmp_path):
    config = small_config(pair_files)
    config.train.steps = 4
    config.train.eval_every = 2
    config.train.eval_train_pairs = 5
    config.decode.bleu_sentences = 2
    run = TranslationRun(config, str(tmp_path / "work"), Distribution("none"))
    run.train()
    curve = run.learning_curve
    assert [point["step"] for point in curve] == [2, 4]
    # Each point's sample is the first 5 training pairs in inference mode,
    # measured as valid is: the same 5 pairs as the valid split give the
    # same perplexity.
    for side in ("source", "target"):
        with open(pair_files["train", side]) as f:
            first = [next(f) for _ in range(5)]
        path = tmp_path / f"first.{side}"
        path.write_text("".join(first))
        run.config.data[f"valid_{side}_path"] = str(path)
    sample = run.evaluate("valid")
    assert sample["tokens"] > 5
    assert curve[1]["train_sample_perplexity"] == pytest.approx(
        sample["perplexity"], rel=1e-5)
    assert curve[0]["train_sample_perplexity"] != pytest.approx(
        sample["perplexity"], rel=1e-5)  # Measured at step 2.


def test_eval_train_pairs_must_not_be_negative(pair_files, tmp_path):
    config = small_config(pair_files)
    config.train.eval_train_pairs = -1
    with pytest.raises(ValueError, match="config.train.eval_train_pairs "
                                         "must be >= 0, got -1"):
        TranslationRun(config, str(tmp_path), Distribution("none"))


def test_export_translates_raw_text_without_tf_moe(pair_files, tmp_path):
    config = small_config(pair_files)
    run = TranslationRun(config, str(tmp_path / "work"), Distribution("none"))
    run.train()
    sources = ["In the beginning God created the heavens and the earth.",
               "And God said, Let there be light."]
    expected = run.translate(sources)
    from trainers.nmt import export as export_lib
    export_dir = str(tmp_path / "export")
    export_lib.export(run.translator(), export_dir)
    script = textwrap.dedent(f"""
        import json, sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tf_moe", "trainers"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Blocker())
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  Registers the tokenizer's ops.
        served = tf.saved_model.load({export_dir!r})
        out = served.signatures["translate"](
            sources=tf.constant({sources!r}))
        to = served.signatures["translate_to"](
            sources=tf.constant({sources!r}),
            target_languages=tf.constant(["es", "es"]))
        print(json.dumps([[t.decode() for t in out["output_0"].numpy()],
                          [t.decode() for t in to["output_0"].numpy()]]))
        try:
            served.translate_to(tf.constant(["a"]), tf.constant(["xx"]))
        except tf.errors.InvalidArgumentError as error:
            print("REFUSED", "unknown language code" in str(error))
    """)
    result = subprocess.run([sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    served, served_to = json.loads(lines[-2])
    assert served == expected and served_to == expected
    assert lines[-1] == "REFUSED True"


def test_bad_inputs_fail_before_training(pair_files, tmp_path):
    config = small_config(pair_files)
    config.data.train_source_path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train_source_path"):
        TranslationRun(config, str(tmp_path / "a"), Distribution("none"))
    config = small_config(pair_files, moe="dense")
    with pytest.raises(ValueError, match="config.model.moe must be one of"):
        TranslationRun(config, str(tmp_path / "b"), Distribution("none"))
    config = small_config(pair_files)
    config.model.expert_dropout = 1.0
    with pytest.raises(ValueError, match="config.model.expert_dropout"):
        TranslationRun(config, str(tmp_path / "b"), Distribution("none"))
    config = small_config(pair_files)
    config.model.expert_storage = "split"
    with pytest.raises(ValueError, match="config.model.expert_storage"):
        TranslationRun(config, str(tmp_path / "b"), Distribution("none"))
    config = small_config(pair_files)
    TranslationRun(config, str(tmp_path / "c"), Distribution("none"))
    config.model.num_experts = 8
    with pytest.raises(ValueError, match="holds a different model"):
        TranslationRun(config, str(tmp_path / "c"), Distribution("none"))
    with pytest.raises(ValueError, match="num_experts=4 is not divisible "
                       "by the size 3 of mesh axis 'expert'"):
        TranslationRun(small_config(pair_files), str(tmp_path / "d"),
                       Distribution("dtensor", "batch:1,expert:3",
                                    num_devices=3))


def _short_pairs(directory):
    """The verse pairs cut to their first three words a side: sentences
    of at most 7 pieces, so that a mesh step unrolls 8 timesteps."""
    paths = _write_pairs(directory)
    for path in paths.values():
        with open(path) as f:
            lines = [" ".join(line.split()[:3]) for line in f]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def test_dtensor_mesh_gives_the_same_losses_and_translates(tmp_path):
    """The MoE GNMT on a 2x2 mesh (LSTMs unrolled, experts sharded): the
    losses of one device over two updates (top-k gating without noise:
    batchwise gating balances each batch shard, noise follows the split),
    then the same valid perplexity and BLEU, decoded off the mesh."""
    paths = _short_pairs(str(tmp_path))
    results, losses = {}, {}
    for kind, mesh, devices in (("none", "", 0),
                                ("dtensor", "batch:2,expert:2", 4)):
        config = small_config(paths, gating="noisy_top_k", noisy_gating=False)
        config.data.max_len = 7
        config.train.steps = 2
        workdir = str(tmp_path / kind)
        run = TranslationRun(config, workdir, Distribution(kind, mesh,
                                                           num_devices=devices))
        results[kind] = run.train()
        with open(os.path.join(workdir, "train_losses.jsonl")) as f:
            losses[kind] = [json.loads(line)["loss"] for line in f]
    np.testing.assert_allclose(losses["dtensor"], losses["none"], rtol=1e-5)
    assert results["dtensor"]["tokens"] == results["none"]["tokens"] > 0
    np.testing.assert_allclose(results["dtensor"]["perplexity"],
                               results["none"]["perplexity"], rtol=1e-4)
    assert results["dtensor"]["bleu"] == pytest.approx(
        results["none"]["bleu"], abs=1e-6)


def test_binary_translates_stdin(pair_files, tmp_path):
    config = small_config(pair_files)
    config.train.steps = 2
    workdir = str(tmp_path / "work")
    flags = lm_fixtures.config_flags(config, base, ("data", "model", "train",
                                                    "decode"))
    common = [sys.executable, "-m", "trainers.nmt",
              f"--config={lm_fixtures.REPO}/configs/nmt/base.py",
              f"--workdir={workdir}"] + flags
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    trained = subprocess.run(common, cwd=lm_fixtures.REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "exported SavedModel" in trained.stdout
    translated = subprocess.run(
        common + ["--mode=translate"], input="In the beginning.\nAmen.\n",
        cwd=lm_fixtures.REPO, env=env, capture_output=True, text=True,
        timeout=600)
    assert translated.returncode == 0, translated.stderr[-3000:]
    assert len(translated.stdout.splitlines()) == 2
    # A config field that does not exist: tests/test_console.py.
