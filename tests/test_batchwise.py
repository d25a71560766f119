"""Strictly balanced gating (appendix F): the batchwise mask, the
renormalised gates, L_batchwise by hand, and thresholds that learn to stand
in for the batch at inference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe import balanced_gating


def test_batchwise_mask_by_hand():
    # One segment of 4 rows, 3 experts, k = 1: m = ceil(4 / 3) = 2 per expert.
    values = np.log(np.array([[0.7, 0.2, 0.1],
                              [0.1, 0.6, 0.3],
                              [0.5, 0.1, 0.4],
                              [0.2, 0.3, 0.5]], np.float32))
    mask = balanced_gating.batchwise_mask(values[None], tf.ones((1, 4), tf.bool), 1)
    expected = np.array([[1, 0, 0],
                         [0, 1, 0],
                         [1, 0, 1],
                         [0, 1, 1]], bool)
    np.testing.assert_array_equal(mask.numpy()[0], expected)


def test_batchwise_mask_skips_invalid_rows_and_counts_segments_apart():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 10, 4)).astype(np.float32)
    valid = rng.random((3, 10)) < 0.6
    mask = balanced_gating.batchwise_mask(values, tf.constant(valid), 2).numpy()
    assert not mask[~valid].any()
    for segment in range(3):
        m = int(np.ceil(2 * valid[segment].sum() / 4))
        np.testing.assert_array_equal(mask[segment].sum(axis=0), m)
        # Each expert's rows are its m largest valid values.
        for expert in range(4):
            kept = values[segment, mask[segment, :, expert], expert]
            rest = values[segment, valid[segment] & ~mask[segment, :, expert],
                          expert]
            if len(rest):
                assert kept.min() >= rest.max()


def test_ties_are_broken_at_random():
    """A zero gate ties everything: the first rows must not take it all."""
    values = tf.zeros((1, 64, 8))
    seed = keras.random.SeedGenerator(0)
    mask = balanced_gating.batchwise_mask(values, tf.ones((1, 64), tf.bool), 2,
                                 shuffle_seed=seed).numpy()[0]
    assert (mask.sum(axis=1) > 0).mean() > 0.7
    assert mask.sum(axis=1).max() < 8


def test_slots_from_mask_renormalises_over_kept_experts():
    probabilities = tf.constant([[0.5, 0.3, 0.2],
                                 [0.1, 0.1, 0.8],
                                 [0.3, 0.3, 0.4]])
    mask = tf.constant([[True, False, True],
                        [False, False, False],
                        [True, True, True]])
    ids, weights, slot_mask, dropped = balanced_gating.slots_from_mask(probabilities,
                                                              mask)
    assert ids.shape == (3, 3)
    assert int(dropped) == 0

    def dense(ids, weights, slot_mask):
        out = np.zeros((3, 3))
        for row in range(3):
            for slot in range(ids.shape[1]):
                if slot_mask[row, slot]:
                    out[row, ids[row, slot]] += weights[row, slot]
        return out

    np.testing.assert_allclose(dense(ids, weights, slot_mask),
                               [[0.5 / 0.7, 0, 0.2 / 0.7],
                                [0, 0, 0],
                                [0.3, 0.3, 0.4]], rtol=1e-6)
    assert np.all(weights.numpy()[~slot_mask.numpy()] == 0)
    # At most 2 slots (a mesh's static shape): the last row keeps its best
    # two (0.4 and the first 0.3) and drops one.
    ids, weights, slot_mask, dropped = balanced_gating.slots_from_mask(
        probabilities, mask, max_slots=2)
    assert ids.shape == (3, 2) and int(dropped) == 1
    np.testing.assert_allclose(dense(ids, weights, slot_mask),
                               [[0.5 / 0.7, 0, 0.2 / 0.7],
                                [0, 0, 0],
                                [0.3 / 0.7, 0, 0.4 / 0.7]], rtol=1e-6)


def test_threshold_loss_by_hand():
    log_p = tf.math.log(tf.constant([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]))
    thresholds = tf.math.log(tf.constant([0.4, 0.4, 0.2]))
    threshold_mask = log_p > thresholds  # [[1, 0, 0], [0, 1, 1]]
    # One disagreement: the batch keeps expert 1 for row 0 (0.3 < T = 0.4).
    batch_mask = tf.constant([[True, True, False], [False, True, True]])
    lp, t = log_p.numpy(), thresholds.numpy()
    expected = (-(lp[0, 1] - t[1])) / 2  # (0 - 1) * (X - T), mean over rows
    loss = balanced_gating.threshold_loss(log_p, thresholds, threshold_mask,
                                 batch_mask, tf.ones(2))
    assert loss.numpy() == pytest.approx(expected, rel=1e-6)
    assert expected > 0


def _clustered(num, seed, width=8, clusters=8):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(clusters, width)) * 2
    labels = rng.integers(0, clusters, num)
    x = centers[labels] + 0.5 * rng.normal(size=(num, width))
    y = np.sin(x @ np.random.default_rng(98).normal(size=(width, width)))
    return x.astype(np.float32), y.astype(np.float32)


def test_training_gives_every_expert_exactly_m_tokens():
    moe = tf_moe.MoE(8, 16, k=2, gating="batchwise", seed=0)
    x, _ = _clustered(100, seed=1)
    mask = np.random.default_rng(2).random(100) < 0.9
    moe(x, training=True, mask=tf.constant(mask))
    m = int(np.ceil(2 * mask.sum() / 8))
    np.testing.assert_array_equal(moe.expert_token_counts.numpy(),
                                  np.full(8, m))
    assert set(moe._metric_trackers) >= {"threshold_loss"}


def _dense_mask(gate_output, num_experts):
    ids = gate_output.expert_ids.numpy()
    used = gate_output.slot_mask.numpy()
    mask = np.zeros((ids.shape[0], num_experts), bool)
    for row in range(ids.shape[0]):
        mask[row, ids[row][used[row]]] = True
    return mask


def test_learned_thresholds_stand_in_for_the_batch():
    """After training, the inference mask keeps about k experts per token
    and mostly the ones the batchwise mask keeps on a held-out batch."""
    keras.utils.set_random_seed(0)
    num_experts, k = 8, 2
    moe = tf_moe.MoE(num_experts, 16, k=k, gating="batchwise", seed=0)
    model = keras.Sequential([keras.Input((8,)), moe])
    model.compile(keras.optimizers.Adam(0.02), "mse")
    x, y = _clustered(4096, seed=0)
    model.fit(x, y, batch_size=256, epochs=6, verbose=0)

    held_out, _ = _clustered(512, seed=7)
    batch = _dense_mask(moe.gate(held_out, training=True), num_experts)
    threshold = _dense_mask(moe.gate(held_out, training=False), num_experts)
    experts_per_token = threshold.sum(axis=1).mean()
    agreement = (batch & threshold).sum() / max((batch | threshold).sum(), 1)
    print(f"experts/token {experts_per_token:.2f}, agreement {agreement:.2f}")
    assert abs(experts_per_token - k) < 0.3 * k
    # Of the (token, expert) pairs either mask keeps, most both keep.
    assert agreement > 0.75
