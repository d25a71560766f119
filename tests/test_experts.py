"""The batched experts and their matmul."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_moe import experts as experts_lib


@pytest.mark.parametrize("rows", [3, experts_lib._MIN_ROWS_FOR_TRANSPOSED_RHS + 5])
def test_batched_matmul_gradients_match_autodiff(rows):
    rng = np.random.default_rng(rows)
    x = tf.constant(rng.normal(size=(3, rows, 5)).astype(np.float32))
    w = tf.constant(rng.normal(size=(3, 5, 4)).astype(np.float32))
    cotangent = tf.constant(rng.normal(size=(3, rows, 4)).astype(np.float32))
    results = []
    for matmul in (tf.matmul, experts_lib.batched_matmul):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            value = tf.reduce_sum(matmul(x, w) * cotangent)
        results.append([value] + tape.gradient(value, [x, w]))
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(),
                                   rtol=1e-5, atol=1e-4)


def test_experts_compute_each_expert_on_its_own_rows():
    layer = experts_lib.Experts(3, 6, 2, activation="relu",
                                bias_initializer="random_normal")
    buffers = tf.random.normal((3, 4, 5))
    outputs = layer(buffers).numpy()
    for e in range(3):
        hidden = np.maximum(buffers[e].numpy() @ layer.kernel_in[e].numpy()
                            + layer.bias_in[e].numpy(), 0)
        expected = hidden @ layer.kernel_out[e].numpy() + layer.bias_out[e].numpy()
        np.testing.assert_allclose(outputs[e], expected, rtol=1e-5, atol=1e-5)


def test_each_expert_is_initialised_at_its_own_scale():
    """Glorot for one expert [d, h]: uniform with limit sqrt(6 / (d + h)),
    whatever the number of experts."""
    d, h = 64, 128
    for num_experts in (1, 64):
        layer = experts_lib.Experts(num_experts, h, d)
        layer.build((num_experts, None, d))
        kernel = layer.kernel_in.numpy()
        limit = np.sqrt(6.0 / (d + h))
        assert np.abs(kernel).max() <= limit
        # The variance of U(-limit, limit) is limit^2 / 3.
        assert kernel.var() == pytest.approx(limit**2 / 3, rel=0.05)


def test_non_variance_scaling_initializer_is_kept():
    init = keras.initializers.Constant(0.5)
    assert experts_lib.per_expert_initializer(init, 8) is init
