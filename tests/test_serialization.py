"""Every public Keras class of tf_moe is registered serializable: saved in a
`.keras` file, it loads without `custom_objects`."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe import recurrent


def _public_layer_classes():
    classes = set()
    for module in (tf_moe, recurrent):
        for value in vars(module).values():
            if (inspect.isclass(value)
                    and issubclass(value, keras.layers.Layer)
                    and value.__module__.startswith("tf_moe")):
                classes.add(value)
    return sorted(classes, key=lambda c: c.__name__)


def test_every_public_layer_class_is_registered():
    classes = _public_layer_classes()
    assert len(classes) >= 9, classes
    for cls in classes:
        name = keras.saving.get_registered_name(cls)
        assert name == f"tf_moe>{cls.__name__}", (cls, name)


@keras.saving.register_keras_serializable(package="tf_moe_tests")
class Holder(keras.Model):
    """A model around one layer (a gate's output is its gate weights)."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        if isinstance(inner, dict):
            # Resolved by its registered name, with no custom_objects.
            inner = keras.saving.deserialize_keras_object(inner)
        self.inner = inner

    def call(self, x):
        y = self.inner(x)
        return y.gate_weights if isinstance(y, tf_moe.GateOutput) else y

    def get_config(self):
        return dict(super().get_config(),
                    inner=keras.saving.serialize_keras_object(self.inner))


_RANDOM = keras.initializers.RandomNormal(seed=3)

CASES = [
    (lambda: tf_moe.MoE(4, 8, k=2, gate_initializer=_RANDOM), (2, 5, 6)),
    (lambda: tf_moe.HierarchicalMoE(2, 2, 8, k_primary=1, k_secondary=2,
                                    gate_initializer=_RANDOM), (2, 5, 6)),
    (lambda: tf_moe.NoisyTopKGate(6, 2, kernel_initializer=_RANDOM),
     (10, 6)),
    (lambda: tf_moe.BatchwiseGate(6, 2, kernel_initializer=_RANDOM),
     (10, 6)),
    (lambda: tf_moe.Experts(3, 8, 4), (3, 5, 6)),
    (lambda: recurrent.LSTM(4, return_sequences=True), (2, 5, 6)),
    (lambda: recurrent.RNN(keras.layers.SimpleRNNCell(4)), (2, 5, 6)),
    (lambda: recurrent.Bidirectional(
        recurrent.LSTM(3, return_sequences=True)), (2, 5, 6)),
]


@pytest.mark.parametrize("make, shape", CASES)
def test_keras_file_loads_without_custom_objects(make, shape, tmp_path):
    layer = make()
    model = Holder(layer)
    x = tf.constant(np.random.default_rng(0).normal(size=shape), tf.float32)
    expected = model(x).numpy()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.inner) is type(layer)
    np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-6)
