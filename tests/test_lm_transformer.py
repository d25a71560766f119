"""The Transformer-MoE language model: attention against its equations,
causality, the config family, training, distributions and export."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from configs.lm import transformer as transformer_configs
from tests import lm_fixtures
from trainers.common.distribution import Distribution
from trainers.lm import model as model_lib
from trainers.lm.train import LanguageModelRun
from trainers.lm.transformer import CausalSelfAttention


def _losses(workdir):
    with open(os.path.join(workdir, "train_losses.jsonl")) as f:
        return {entry["step"]: entry["loss"] for entry in map(json.loads, f)}


def _attention_reference(x, kernels, output_kernel, rotary):
    """Causal multi-head attention written out position by position;
    `kernels` are the query, key and value kernels `[d, heads, size]`."""
    batch, length, _ = x.shape
    _, heads, size = kernels[0].shape
    q, k, v = (np.einsum("btd,dhk->bthk", x, kernel) for kernel in kernels)
    if rotary:
        half = size // 2
        for vectors in (q, k):
            for t in range(length):
                for i in range(half):
                    angle = t * 10000.0 ** (-i / half)
                    a = vectors[:, t, :, i].copy()
                    b = vectors[:, t, :, i + half].copy()
                    vectors[:, t, :, i] = a * np.cos(angle) - b * np.sin(angle)
                    vectors[:, t, :, i + half] = (b * np.cos(angle)
                                                  + a * np.sin(angle))
    out = np.zeros((batch, length, heads, size))
    for query in range(length):
        scores = np.einsum("bhk,bthk->bht", q[:, query],
                           k[:, :query + 1]) / np.sqrt(size)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, query] = np.einsum("bht,bthk->bhk", weights,
                                  v[:, :query + 1])
    return np.einsum("bthk,hkd->btd", out, output_kernel)


@pytest.mark.parametrize("rotary", [True, False])
def test_attention_matches_its_equations(rotary):
    x = np.random.default_rng(0).normal(size=(2, 7, 12)).astype(np.float32)
    layer = CausalSelfAttention(num_heads=3, rotary=rotary)
    got = layer(x).numpy()
    kernels = [kernel.numpy() for kernel in (
        layer.query_kernel, layer.key_kernel, layer.value_kernel)]
    expected = _attention_reference(x.astype(np.float64), kernels,
                                    layer.output_kernel.numpy(), rotary)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rotary_attention_sees_relative_offsets_only():
    """The same vector at every position: the attention logits of query q
    and key t depend on q - t alone (a Toeplitz matrix)."""
    layer = CausalSelfAttention(num_heads=1)
    x = np.tile(np.random.default_rng(1).normal(size=(1, 1, 8)),
                (1, 6, 1)).astype(np.float32)
    layer.build(x.shape)
    q, k = (layer._rotate(
        tf.constant(np.einsum("btd,dhk->bthk", x, kernel.numpy())),
        tf.range(6, dtype=tf.float32))
        for kernel in (layer.query_kernel, layer.key_kernel))
    logits = tf.einsum("bqhk,bthk->qt", q, k).numpy()
    for offset in range(6):
        diagonal = np.diagonal(logits, -offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4,
                                   atol=1e-5)
    assert not np.allclose(np.diagonal(logits, 0)[0],
                           np.diagonal(logits, -3)[0])


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_language_model_is_causal_through_its_moe_layers(positions):
    """Changing the token at position 5 changes no output before it (the
    routing of one token never depends on another's at inference)."""
    config = lm_fixtures.small_transformer_config(
        {}, positions=positions, max_positions=12, blocks=("moe", "hmoe"),
        num_groups=2, experts_per_group=2, k_primary=1, k_secondary=2)
    body, _ = model_lib.build_language_model(config.model, vocab_size=50)
    ids = np.random.default_rng(2).integers(1, 50, size=(3, 9))
    changed = ids.copy()
    changed[:, 5] = (ids[:, 5] % 49) + 1
    before, after = body(ids).numpy(), body(changed).numpy()
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])
    if positions == "learned":
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="max_positions"):
            body(np.ones((1, 13), np.int32))


def test_family_is_matched_on_ops_per_timestep():
    for scale in ("", ",cpu"):
        for option in ("", ",every-other"):
            ops = {}
            for name in transformer_configs.MODELS:
                config = transformer_configs.get_config(name + scale + option)
                model = config.model
                ops[name] = model_lib.ops_per_timestep(model)
                assert model.architecture == "transformer"
                if option and name != "dense":
                    assert model.blocks[0::2] == ("ffn",) * 3 or \
                        model.blocks[0::2] == ("ffn",) * 2
                    assert "ffn" not in model.blocks[1::2]
            for name, value in ops.items():
                # The gates (d x experts) are the only extra ops.
                assert ops["dense"] <= value < 1.05 * ops["dense"], (
                    scale, option, name, value)
    cpu = transformer_configs.get_config("mixtral-8,cpu")
    assert (cpu.model.d_model, len(cpu.model.blocks)) == (64, 4)
    assert cpu.data.source == "embedded"
    with pytest.raises(ValueError, match="transformer model"):
        transformer_configs.get_config("gpt-9")
    with pytest.raises(ValueError, match="option"):
        transformer_configs.get_config("dense,gpu")


@pytest.mark.parametrize("field, value, message", [
    ("architecture", "rnn", "architecture"),
    ("positions", "absolute", "positions"),
    ("num_heads", 3, "num_heads"),
    ("blocks", ("ffn", "lstm"), "feed-forward sublayer"),
    ("expert_type", "conv", "expert_type"),
])
def test_bad_transformer_fields_are_refused(field, value, message):
    config = lm_fixtures.small_transformer_config({}, **{field: value})
    with pytest.raises(ValueError, match=message):
        model_lib.check_model_config(config.model)


def test_training_lowers_perplexity(tmp_path, capsys):
    text_splits = lm_fixtures.write_text_splits(str(tmp_path))
    config = lm_fixtures.small_transformer_config(text_splits, dropout=0.0)
    config.train.steps = 30
    config.train.learning_rate = 1e-2
    run = LanguageModelRun(config, str(tmp_path / "run"), Distribution())
    before = run.evaluate("valid")["perplexity_per_word"]
    result = run.train()
    assert result["perplexity_per_word"] < 0.5 * before
    assert set(result["routing"]) == {"moe_1"}
    assert "step 30/30 | loss" in capsys.readouterr().out


def test_distributions_give_the_same_losses(tmp_path):
    """One device, MirroredStrategy over 2 logical CPUs and a batch:2,
    expert:2 DTensor mesh: the same three updates (no dropout, no noise)."""
    text_splits = lm_fixtures.write_text_splits(str(tmp_path), max_words=8)
    losses = {}
    for kind, mesh, devices in (("none", "", 0), ("mirrored", "", 2),
                                ("dtensor", "batch:2,expert:2", 4)):
        config = lm_fixtures.small_transformer_config(text_splits,
                                                      dropout=0.0)
        config.data.max_len = 15
        config.train.steps = 3
        run = LanguageModelRun(config, str(tmp_path / kind),
                               Distribution(kind, mesh, num_devices=devices))
        run.train()
        losses[kind] = _losses(str(tmp_path / kind))
    # Replicas sum the gradients in another order, and a token whose two
    # best experts are nearly tied can then switch at the third step (a
    # dense model drifts by 1e-6 here; a wrong loss scale would be 1e-2).
    for kind in ("mirrored", "dtensor"):
        np.testing.assert_allclose(
            [losses[kind][s] for s in (1, 2, 3)],
            [losses["none"][s] for s in (1, 2, 3)], rtol=1e-4, err_msg=kind)
