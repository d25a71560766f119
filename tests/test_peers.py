"""bench/peers.py's GShard layer against a per-token reference."""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import peers  # noqa: E402


def _random_gate(layer, seed):
    rng = np.random.default_rng(seed)
    layer.gate.gate_kernel.assign(
        rng.standard_normal(layer.gate.gate_kernel.shape).astype(np.float32))


def test_gshard_peer_with_room_for_every_slot_matches_reference():
    layer = peers.GShardMoE(4, 6, k=2, capacity_factor=2.0, group_size=8,
                            seed=0)
    x = tf.random.stateless_normal([16, 5], seed=[1, 2])
    layer(x)
    _random_gate(layer, 3)
    for weight in (layer.bias_in, layer.bias_out):
        weight.assign(tf.random.stateless_normal(weight.shape, seed=[4, 5]))
    # Two groups of 8 tokens, capacity ceil(2 * 2 * 8 / 4) = 8 rows: an
    # expert can take every token of a group, so nothing is dropped.
    assert layer.capacity(8) == 8
    outputs = layer(x, training=False).numpy()

    gate = layer.gate(x, training=False)
    w_in, b_in, w_out, b_out = (v.numpy() for v in (
        layer.kernel_in, layer.bias_in, layer.kernel_out, layer.bias_out))
    expected = np.zeros_like(outputs)
    for t in range(16):
        for rank in range(2):
            e = int(gate.expert_ids[t, rank])
            hidden = np.maximum(x[t].numpy() @ w_in[e] + b_in[e], 0)
            expected[t] += float(gate.gate_weights[t, rank]) * (
                hidden @ w_out[e] + b_out[e])
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_gshard_peer_fills_buffers_first_choices_first_and_drops_the_rest():
    layer = peers.GShardMoE(3, 2, k=2)
    # Two groups of three tokens: the second group's places start at 0
    # again, whatever the first group filled.
    expert_ids = tf.constant([[[0, 1], [0, 1], [0, 2]],
                              [[0, 2], [1, 2], [1, 0]]])
    gate_weights = tf.constant([[[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]]] * 2)
    dispatch, combine = layer.dispatch_and_combine(
        expert_ids, gate_weights, capacity=2)
    np.testing.assert_array_equal(dispatch.numpy()[1, 0, 0], [1, 0])
    dispatch, combine = dispatch[0], combine[0]
    # First choices: tokens 0 and 1 fill expert 0's two places, token 2's
    # is dropped; second choices go to experts 1 (places 0, 1) and 2.
    expected = np.zeros([3, 3, 2], np.float32)
    expected[0, 0, 0] = expected[1, 0, 1] = 1
    expected[0, 1, 0] = expected[1, 1, 1] = expected[2, 2, 0] = 1
    np.testing.assert_array_equal(dispatch.numpy(), expected)
    np.testing.assert_allclose(combine.numpy()[2, 2, 0], 0.1)
    np.testing.assert_allclose(combine.numpy()[1, 0, 1], 0.7)
    assert combine.numpy()[2, 0].sum() == 0
