"""tf_moe.recurrent: Keras's recurrent layers, unrolled on a DTensor mesh."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_moe import recurrent
from tf_moe import sharding
from trainers.lm.model import ProjectedLSTMCell

# Three sequences, the later ones padded (mask False at the end).
MASK = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5, [1] * 6 + [0]],
                bool)


def _layers(kind):
    """`(Keras's layer, tf_moe.recurrent's)`, the same weights."""
    def make(lstm, rnn, bidirectional):
        if kind == "lstm":
            return lstm(6, return_sequences=True)
        if kind == "bidirectional":
            return bidirectional(lstm(3, return_sequences=True))
        return rnn(ProjectedLSTMCell(8, 6), return_sequences=True)
    keras_layer = make(keras.layers.LSTM, keras.layers.RNN,
                       keras.layers.Bidirectional)
    ours = make(recurrent.LSTM, recurrent.RNN, recurrent.Bidirectional)
    for layer in (keras_layer, ours):
        layer.build((None, 7, 5))
    ours.set_weights(keras_layer.get_weights())
    return keras_layer, ours


def _outputs_and_gradients(layer, x, mask):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, mask=mask)
        loss = tf.reduce_sum(0.5 * y ** 2 + y)
    return [y] + tape.gradient(loss, [x] + layer.trainable_variables)


@pytest.mark.parametrize("kind", ["lstm", "bidirectional", "projected"])
def test_unrolled_loop_equals_keras_loop(kind, rng):
    """The mesh path (forced here on one device) masks as Keras does:
    outputs, input and weight gradients equal."""
    keras_layer, ours = _layers(kind)
    for layer in ours._flatten_layers():
        if isinstance(layer, recurrent.MeshRecurrent):
            layer._placement = object()  # Any placement: the mesh path.
    x = tf.constant(rng.normal(size=(4, 7, 5)), tf.float32)
    expected = tf.function(_outputs_and_gradients)(keras_layer, x, MASK)
    got = tf.function(_outputs_and_gradients)(ours, x, MASK)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, atol=2e-6)
    # Padding really is skipped: a masked position repeats the previous
    # output forwards and is zero in the backward half.
    if kind == "lstm":
        np.testing.assert_array_equal(got[0][1, 4:], np.repeat(
            got[0][1, 3:4], 3, axis=0))
    if kind == "bidirectional":
        np.testing.assert_array_equal(got[0][1, 4:, 3:], 0.0)


@pytest.mark.parametrize("kind", ["lstm", "bidirectional"])
def test_on_a_mesh_equals_one_device(kind, rng):
    placement = sharding.MeshPlacement(sharding.make_mesh("batch:2,expert:4"))
    keras_layer, _ = _layers(kind)
    x = rng.normal(size=(4, 7, 5)).astype(np.float32)
    expected = tf.function(_outputs_and_gradients)(
        keras_layer, tf.constant(x), MASK)
    with placement.scope():
        mesh_layer = (recurrent.LSTM(6, return_sequences=True)
                      if kind == "lstm" else recurrent.Bidirectional(
                          recurrent.LSTM(3, return_sequences=True)))
        mesh_layer.build((None, 7, 5))
    sharding.set_weights(mesh_layer, keras_layer.get_weights())
    with placement.scope():
        got = tf.function(_outputs_and_gradients)(
            mesh_layer, placement.shard_batch(x), placement.shard_batch(MASK))
    for a, b in zip(expected, got):
        np.testing.assert_allclose(sharding.to_numpy(b), a, atol=5e-6)


def test_mesh_needs_static_timesteps():
    placement = sharding.MeshPlacement(sharding.make_mesh("batch:2,expert:4"))
    with placement.scope():
        layer = recurrent.LSTM(4, return_sequences=True)
        layer.build((None, None, 3))
    dynamic = tf.function(lambda x: layer(x), input_signature=[
        tf.TensorSpec([None, None, 3])])
    with placement.scope(), pytest.raises(ValueError,
                                          match="timesteps must be static"):
        dynamic.get_concrete_function()


def test_layers_serialize_as_their_keras_configs():
    layer = recurrent.Bidirectional(recurrent.LSTM(4, return_sequences=True))
    layer.build((None, 5, 3))
    copy = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(copy, recurrent.Bidirectional)
    assert isinstance(copy.forward_layer, recurrent.LSTM)
    assert copy.backward_layer.go_backwards
