"""The paper's balancing terms against values computed by hand."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tf_moe import balance


def test_cv_squared_by_hand():
    # mean 2, population variance ((1-2)^2 + 0 + (3-2)^2) / 3 = 2/3.
    assert balance.cv_squared([1.0, 2.0, 3.0]).numpy() == pytest.approx(
        (2.0 / 3.0) / 4.0, rel=1e-6)
    assert balance.cv_squared([5.0, 5.0, 5.0, 5.0]).numpy() == 0.0


@pytest.mark.parametrize("values", [[0.0, 0.0, 0.0], [7.0]])
def test_cv_squared_is_zero_for_degenerate_vectors(values):
    # All-zero importance is what an empty or fully masked batch gives.
    assert balance.cv_squared(tf.constant(values, tf.float32)).numpy() == 0.0


def test_importance_sums_gates_per_expert():
    expert_ids = tf.constant([[2, 0], [1, 2]])
    gate_weights = tf.constant([[0.75, 0.25], [0.6, 0.4]])
    importance = balance.importance(expert_ids, gate_weights, 4).numpy()
    np.testing.assert_allclose(importance, [0.25, 0.6, 1.15, 0.0], rtol=1e-6)


def test_smooth_load_by_hand():
    # One token, E = 3, k = 2, no noise drawn: H = clean = [1, 0, 2].
    clean = tf.constant([[1.0, 0.0, 2.0]])
    stddev = tf.constant([[0.5, 1.0, 2.0]])
    top_values = tf.constant([[2.0, 1.0, 0.0]])
    load = balance.smooth_load(clean, clean, stddev, top_values, k=2).numpy()
    # Experts 0 and 2 are in the top 2: the bar is the 3rd value, 0.
    # Expert 1 is out: the bar is the 2nd value, 1.
    expected = [stats.norm.cdf((1.0 - 0.0) / 0.5),
                stats.norm.cdf((0.0 - 1.0) / 1.0),
                stats.norm.cdf((2.0 - 0.0) / 2.0)]
    np.testing.assert_allclose(load, expected, rtol=1e-5)


def test_smooth_load_is_token_count_when_every_expert_is_chosen():
    clean = tf.constant([[1.0, -1.0], [0.0, 3.0], [2.0, 2.0]])
    load = balance.smooth_load(clean, clean, tf.ones_like(clean), clean, k=2,
                               token_weights=tf.constant([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(load.numpy(), [2.0, 2.0])


def test_smooth_load_matches_monte_carlo_probability():
    """P(x, i) is the chance that i stays in the top k when its noise is redrawn."""
    rng = np.random.default_rng(7)
    num_experts, k = 6, 2
    clean = rng.normal(size=num_experts).astype(np.float32)
    stddev = rng.uniform(0.3, 1.5, size=num_experts).astype(np.float32)
    noisy = clean + rng.normal(size=num_experts).astype(np.float32) * stddev
    top_values = np.sort(noisy)[::-1][:k + 1].copy()
    estimate = balance.smooth_load(
        clean[None], noisy[None], stddev[None], top_values[None], k).numpy()

    draws = 40_000
    for expert in range(num_experts):
        redrawn = np.tile(noisy, (draws, 1))
        redrawn[:, expert] = clean[expert] + rng.normal(size=draws) * stddev[expert]
        kth_largest = np.sort(redrawn, axis=1)[:, -k]
        frequency = np.mean(redrawn[:, expert] >= kth_largest)
        # Binomial standard error <= 0.5 / sqrt(40000) = 0.0025; 0.01 is four
        # of them, so a correct estimator fails this about once in 15,000 runs
        # (and the seed is fixed), while an off-by-one in kth_excluding moves
        # the probability by far more than 0.01 for these logits.
        assert estimate[expert] == pytest.approx(frequency, abs=0.01), expert


def test_balancing_loss_without_load_is_importance_only():
    importance_loss, load_loss = balance.balancing_loss(
        tf.constant([1.0, 2.0, 3.0]), None, 0.5, 0.3)
    assert importance_loss.numpy() == pytest.approx(0.5 * (2.0 / 3.0) / 4.0)
    assert load_loss.numpy() == 0.0


def test_normal_cdf():
    x = np.linspace(-8, 8, 33).astype(np.float32)
    np.testing.assert_allclose(balance.normal_cdf(x).numpy(), stats.norm.cdf(x),
                               rtol=1e-5, atol=1e-30)
    assert balance.normal_cdf(tf.constant(0.0)).numpy() == 0.5
    assert math.isfinite(balance.normal_cdf(tf.constant(-40.0)).numpy())


def _selection_probability_by_autodiff(clean, noisy, stddev, top_values, k):
    """The paper's P(x, i) written plainly, differentiated by TensorFlow."""
    threshold = tf.where(noisy > top_values[:, k:k + 1], top_values[:, k:k + 1],
                         top_values[:, k - 1:k])
    return balance.normal_cdf((clean - threshold) / stddev)


@pytest.mark.parametrize("num_experts,k", [(6, 2), (32, 4), (3, 1)])
def test_selection_probability_gradient_matches_autodiff(num_experts, k):
    rng = np.random.default_rng(num_experts)
    tokens = 5
    clean = tf.constant(rng.normal(size=(tokens, num_experts)), tf.float32)
    stddev = tf.constant(rng.uniform(0.2, 2.0, (tokens, num_experts)),
                         tf.float32)
    noise = tf.constant(rng.normal(size=(tokens, num_experts)), tf.float32)
    weights = tf.constant(rng.normal(size=(tokens, num_experts)), tf.float32)

    def loss(probability_fn):
        with tf.GradientTape() as tape:
            tape.watch([clean, stddev])
            noisy = clean + noise * stddev
            top_values = tf.math.top_k(noisy, k=k + 1).values
            value = tf.reduce_sum(weights * probability_fn(
                clean, noisy, stddev, top_values, k))
        return value, tape.gradient(value, [clean, stddev])

    value, gradients = loss(balance.selection_probability)
    expected_value, expected_gradients = loss(
        _selection_probability_by_autodiff)
    assert value.numpy() == pytest.approx(expected_value.numpy(), rel=1e-5)
    for gradient, expected in zip(gradients, expected_gradients):
        # The thresholds' gradients flow back into clean and stddev through
        # top_k, so both the per-entry and the per-row terms are checked.
        np.testing.assert_allclose(gradient.numpy(), expected.numpy(),
                                   rtol=1e-4, atol=1e-6)
