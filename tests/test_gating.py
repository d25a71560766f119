"""NoisyTopKGate against hand-computed values."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tf_moe import NoisyTopKGate


def _gate_with_kernels(gate_kernel, noise_kernel=None, k=2, **kwargs):
    gate_kernel = np.asarray(gate_kernel, np.float32)
    gate = NoisyTopKGate(gate_kernel.shape[1], k,
                         noisy_gating=noise_kernel is not None, **kwargs)
    gate.build((None, gate_kernel.shape[0]))
    gate.gate_kernel.assign(gate_kernel)
    if noise_kernel is not None:
        gate.noise_kernel.assign(np.asarray(noise_kernel, np.float32))
    return gate


def test_top_k_softmax_by_hand():
    # Two tokens, d = 2, E = 3, identity-like kernel: logits = x W_g.
    gate = _gate_with_kernels([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    tokens = tf.constant([[1.0, 0.0], [0.0, 2.0]])
    # Token 0 logits [1, 0, 2] -> experts 2, 0 with softmax([2, 1]).
    # Token 1 logits [0, 2, -2] -> experts 1, 0 with softmax([2, 0]).
    out = gate(tokens)
    np.testing.assert_array_equal(out.expert_ids.numpy(), [[2, 0], [1, 0]])
    e = math.e
    expected = [[e / (e + 1), 1 / (e + 1)], [e**2 / (e**2 + 1), 1 / (e**2 + 1)]]
    np.testing.assert_allclose(out.gate_weights.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(
        out.importance.numpy(),
        [1 / (e + 1) + 1 / (e**2 + 1), e**2 / (e**2 + 1), e / (e + 1)],
        rtol=1e-6)
    assert out.load is None


def test_load_by_hand_with_noise_kernel():
    gate = _gate_with_kernels([[1.0, 0.0, 2.0]], noise_kernel=[[0.0, 1.0, -1.0]],
                              noise_epsilon=0.01)
    out = gate(tf.constant([[1.0]]), training=False)
    # Clean logits [1, 0, 2]; noise scale softplus([0, 1, -1]) + 0.01.
    scale = np.log1p(np.exp([0.0, 1.0, -1.0])) + 0.01
    expected = [stats.norm.cdf((1 - 0) / scale[0]),   # in top 2: bar = 3rd = 0
                stats.norm.cdf((0 - 1) / scale[1]),   # out: bar = 2nd = 1
                stats.norm.cdf((2 - 0) / scale[2])]
    np.testing.assert_allclose(out.load.numpy(), expected, rtol=1e-5)


def test_inference_is_deterministic_and_training_is_noisy():
    gate = _gate_with_kernels(np.random.default_rng(0).normal(size=(4, 8)),
                              noise_kernel=np.zeros((4, 8)), k=2, seed=3)
    tokens = tf.random.normal((64, 4), seed=1)
    first, second = gate(tokens), gate(tokens)
    np.testing.assert_array_equal(first.expert_ids, second.expert_ids)
    np.testing.assert_array_equal(first.gate_weights, second.gate_weights)
    noisy_a = gate(tokens, training=True)
    noisy_b = gate(tokens, training=True)
    assert not np.array_equal(noisy_a.gate_weights, noisy_b.gate_weights)


def test_mask_zeroes_gates_and_balancing_statistics():
    gate = _gate_with_kernels(np.random.default_rng(1).normal(size=(3, 5)),
                              noise_kernel=np.zeros((3, 5)), k=2)
    tokens = tf.random.normal((6, 3), seed=2)
    mask = tf.constant([True, False, True, True, False, True])
    masked = gate(tokens, token_mask=mask)
    kept = gate(tf.boolean_mask(tokens, mask))
    np.testing.assert_array_equal(masked.gate_weights.numpy()[[1, 4]], 0.0)
    np.testing.assert_allclose(masked.importance, kept.importance, rtol=1e-6)
    np.testing.assert_allclose(masked.load, kept.load, rtol=1e-6)


def test_zero_initialised_gate_routes_uniformly():
    num_experts, k, num_tokens = 16, 2, 4096
    gate = NoisyTopKGate(num_experts, k, seed=5)
    tokens = tf.random.normal((num_tokens, 8), seed=3)
    out = gate(tokens, training=True)
    counts = np.bincount(out.expert_ids.numpy().ravel(), minlength=num_experts)
    # Uniform routing: a chi-square test of the counts against k*T/E each.
    # A gate with any preference (say one expert 20% over) fails it by far.
    p_value = stats.chisquare(counts).pvalue
    assert p_value > 1e-3, counts
    # At inference the zero gate has no preference either: all logits tie.
    np.testing.assert_allclose(gate(tokens).gate_weights.numpy(), 1.0 / k)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(num_experts=0, k=1), "num_experts"),
    (dict(num_experts=4, k=0), "`k`"),
    (dict(num_experts=4, k=5), "`k`"),
    (dict(num_experts=4, k=2, noise_epsilon=-1.0), "noise_epsilon"),
])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NoisyTopKGate(**kwargs)


def test_config_round_trip():
    gate = NoisyTopKGate(7, 3, noisy_gating=False, noise_epsilon=0.05, seed=4)
    clone = NoisyTopKGate.from_config(gate.get_config())
    assert (clone.num_experts, clone.k, clone.noisy_gating,
            clone.noise_epsilon, clone.seed) == (7, 3, False, 0.05, 4)
    assert isinstance(clone.kernel_initializer, keras.initializers.Zeros)
