"""The batched experts and their matmul."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_moe import experts as experts_lib
from tf_moe import kernels
from tf_moe import matmul as matmul_lib


@pytest.mark.parametrize("mode", ["tensorflow", "xla", "auto",
                                  "tensorflow_transposed", "per_expert"])
@pytest.mark.parametrize("rows", [3, 300])
def test_buffer_matmul_gradients_match_autodiff(rows, mode, kernel_mode,
                                                monkeypatch):
    if mode in kernels.MODES:
        kernel_mode(mode)
    else:  # Candidates that "auto" alone chooses, forced.
        monkeypatch.setattr(kernels, "choose", lambda *args, **kwargs: (
            kernels.Choice(*(mode if mode in kernels.CANDIDATES[product]
                             else "tensorflow"
                             for product in kernels.PRODUCTS))))
    rng = np.random.default_rng(rows)
    main = tf.constant(rng.normal(size=(1, 5, 4, 5)).astype(np.float32))
    overflow = tf.constant(rng.normal(size=(2, rows, 5)).astype(np.float32))
    w = tf.constant(rng.normal(size=(5, 5, 3)).astype(np.float32))
    overflow_experts = tf.constant([3, 1])
    cotangents = [tf.constant(rng.normal(size=shape).astype(np.float32))
                  for shape in [(1, 5, 4, 3), (2, rows, 3)]]

    def plain(main, overflow, w, overflow_experts):
        return (tf.matmul(main, w[None]),
                tf.matmul(overflow, tf.gather(w, overflow_experts)))

    results = []
    for matmul in (plain, matmul_lib.buffer_matmul):
        with tf.GradientTape() as tape:
            tape.watch([main, overflow, w])
            outputs = matmul(main, overflow, w, overflow_experts)
            value = sum(tf.reduce_sum(y * c) for y, c in zip(outputs, cotangents))
        grads = tape.gradient(value, [main, overflow, w])
        results.append([value] + [tf.convert_to_tensor(g) for g in grads])
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(),
                                   rtol=1e-5, atol=1e-4)


def test_experts_compute_each_expert_on_its_own_rows():
    layer = experts_lib.Experts(3, 6, 2, activation="relu",
                                bias_initializer="random_normal")
    buffers = tf.random.normal((3, 4, 5))
    overflow = tf.random.normal((1, 2, 5))

    def expert(e, rows):
        hidden = np.maximum(rows @ layer.kernel_in[e].numpy()
                            + layer.bias_in[e].numpy(), 0)
        return hidden @ layer.kernel_out[e].numpy() + layer.bias_out[e].numpy()

    outputs = layer(buffers).numpy()
    main, more = layer(buffers, overflow, tf.constant([2]))
    for e in range(3):
        expected = expert(e, buffers[e].numpy())
        np.testing.assert_allclose(outputs[e], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(main[e], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(more[0], expert(2, overflow[0].numpy()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["padded", "packed", "every_token"])
def test_dropout_drops_hidden_units_in_training_only(layout):
    """One linear hidden unit per expert: in training each row's output is
    the bias alone (its unit dropped) or the bias plus twice the
    inference output's product (kept, scaled by 1 / (1 - 0.5)); both
    occur, and inference is untouched."""
    # every_token sums the hidden units of all experts side by side: with
    # one expert, each row keeps or drops its one unit.
    num_experts = 1 if layout == "every_token" else 3
    layer = experts_lib.Experts(num_experts, 1, 2, activation="linear",
                                dropout=0.5, bias_initializer="random_normal",
                                seed=7)
    layer.build((num_experts, None, 5))
    bias = layer.bias_out.numpy()
    if layout == "padded":
        inputs = tf.random.normal((3, 40, 5), seed=1)
        run = lambda training: layer(inputs, training=training)  # noqa: E731
        bias = bias[:, None, :]
    elif layout == "packed":
        rows = tf.constant([40, 40, 40])
        inputs = tf.random.normal((120, 5), seed=1)
        run = lambda training: layer(  # noqa: E731
            inputs, expert_rows=rows, training=training)
        bias = np.repeat(bias, 40, axis=0)
    else:
        inputs = tf.random.normal((120, 5), seed=1)
        run = lambda training: layer.every_token(  # noqa: E731
            inputs, training=training)
    inference = run(False).numpy()
    np.testing.assert_array_equal(run(None).numpy(), inference)
    trained = run(True).numpy()
    dropped = np.isclose(trained, bias, atol=1e-6).all(-1)
    kept = np.isclose(trained, bias + 2 * (inference - bias),
                      atol=1e-5).all(-1)
    assert (dropped | kept).all()
    assert dropped.any() and kept.any()


@pytest.mark.parametrize("expert_type", ["ffn", "glu"])
def test_packed_rows_are_computed_by_their_own_expert(expert_type):
    """Packed rows `[N, d]`: expert e's `expert_rows[e]` rows in turn (an
    expert with none among them), each through its own weights."""
    layer = experts_lib.Experts(4, 6, 2, expert_type=expert_type,
                                bias_initializer="random_normal")
    expert_rows = [3, 0, 1, 4]
    rows = tf.random.normal((sum(expert_rows), 5))
    layer.build((4, None, 5))
    outputs = layer(rows, expert_rows=tf.constant(expert_rows)).numpy()
    sharded = layer(rows[None], expert_rows=tf.constant(expert_rows))
    np.testing.assert_array_equal(sharded.numpy()[0], outputs)
    # The padded layout is the reference: each expert's rows in [E, C, d].
    start = 0
    for e, n in enumerate(expert_rows):
        padded = np.zeros((4, 4, 5), np.float32)
        padded[e, :n] = rows[start:start + n].numpy()
        expected = layer(tf.constant(padded)).numpy()[e, :n]
        np.testing.assert_allclose(outputs[start:start + n], expected,
                                   rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("expert_type", ["ffn", "glu"])
def test_packed_gradients_match_the_padded_layout(expert_type):
    """The packed layout's gradients (one matmul pair per expert on its
    rows, the weights unstacked) match the padded layout's, for the rows and
    every weight, an expert without rows included, over repeated steps of
    one compiled graph."""
    layer = experts_lib.Experts(4, 6, 3, expert_type=expert_type,
                                bias_initializer="random_normal")
    expert_rows = [3, 0, 1, 4]
    layer.build((4, None, 5))
    index = np.concatenate([[e] * n for e, n in enumerate(expert_rows)])
    slot = np.concatenate([np.arange(n) for n in expert_rows])
    where = np.stack([index, slot], 1).astype(np.int32)

    def padded(rows):
        return tf.scatter_nd(where, rows, (4, 4, 5))

    @tf.function
    def gradients(rows, packed):
        with tf.GradientTape() as tape:
            tape.watch(rows)
            if packed:
                out = layer(rows, expert_rows=tf.constant(expert_rows))
            else:
                out = tf.gather_nd(layer(padded(rows)), where)
            loss = tf.reduce_sum(out * tf.range(1.0, 4.0))
        return tape.gradient(loss, [rows] + layer.trainable_weights)

    for step in range(3):
        rows = tf.random.normal((sum(expert_rows), 5), seed=step)
        want = gradients(rows, False)
        got = gradients(rows, True)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5,
                                       atol=1e-5)


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


def test_single_group_call_has_plain_gradients():
    """Called without an overflow group, the unused overflow output of the
    custom-gradient matmul must not break or change the gradients."""
    layer = experts_lib.Experts(3, 4, 2, bias_initializer="random_normal")
    x = tf.random.normal((3, 5, 6))

    def plain(x):
        hidden = tf.nn.relu(tf.matmul(x, layer.kernel_in)
                            + layer.bias_in[:, None, :])
        return tf.matmul(hidden, layer.kernel_out) + layer.bias_out[:, None, :]

    results = []
    for fn in (layer, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = tf.reduce_sum(tf.square(fn(x)))
        results.append(tape.gradient(value, [x] + layer.trainable_variables))
    for actual, expected in zip(*results):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(),
                                   rtol=1e-5, atol=1e-5)
