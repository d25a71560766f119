"""The experts' weights held stacked or per expert (`expert_storage`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe import expert_weights
from tf_moe import sharding


def _moe(storage, **kwargs):
    return tf_moe.MoE(4, 8, k=2, seed=3, expert_storage=storage,
                      bias_initializer=keras.initializers.RandomNormal(seed=7),
                      kernel_initializer=keras.initializers.GlorotUniform(5),
                      **kwargs)


def _stacked_gradients(layer, gradients):
    """The experts' gradients as `[E, ...]` arrays, in build order."""
    if layer.expert_storage == "stacked":
        return [np.asarray(g) for g in gradients]
    experts = layer.num_experts
    return [np.stack(gradients[i:i + experts])
            for i in range(0, len(gradients), experts)]


@pytest.mark.parametrize("expert_type", ["ffn", "glu"])
@pytest.mark.parametrize("layout_mode", ["tensorflow", "per_expert"])
def test_both_storages_compute_the_same_step(layout_mode, expert_type,
                                             kernel_mode):
    """Same seed, same experts; the same outputs and expert gradients in
    the padded layout ("tensorflow") and the packed one ("per_expert")."""
    kernel_mode(layout_mode)
    x = tf.random.normal((64, 6), seed=1)
    results = {}
    for storage in expert_weights.STORAGES:
        layer = _moe(storage, expert_type=expert_type)
        with tf.GradientTape() as tape:
            y = layer(x, training=False)
            loss = tf.reduce_sum(y * y)
        variables = layer.experts.trainable_weights
        results[storage] = (y.numpy(), _stacked_gradients(
            layer, tape.gradient(loss, variables)))
    per_expert_layer = layer
    weights = 4 if expert_type == "ffn" else 2  # Kernels and biases.
    assert len(per_expert_layer.experts.trainable_weights) == 4 * weights
    (y_a, g_a), (y_b, g_b) = results.values()
    np.testing.assert_allclose(y_b, y_a, rtol=1e-5, atol=1e-5)
    assert len(g_a) == len(g_b) == weights
    for a, b in zip(g_a, g_b):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_per_expert_weights_run_packed_past_the_stacked_bound(
        kernel_mode, monkeypatch):
    """Above `PER_EXPERT_MAX_EXPERTS` stacked experts run padded; held per
    expert they still run packed (no stacked gradient to copy), with the
    same outputs."""
    kernel_mode("per_expert")
    monkeypatch.setattr(tf_moe.kernels, "PER_EXPERT_MAX_EXPERTS", 3)
    x = tf.random.normal((64, 6), seed=1)
    outputs, layouts = {}, {}
    for storage in expert_weights.STORAGES:
        layer = _moe(storage)
        outputs[storage] = layer(x, training=False).numpy()
        layouts[storage] = layer.experts.layout(None, tf.float32)
    assert layouts == {"stacked": "padded", "per_expert": "packed"}
    np.testing.assert_allclose(outputs["per_expert"], outputs["stacked"],
                               rtol=1e-5, atol=1e-5)


def test_per_expert_weight_reads_and_assigns_as_stacked():
    layer = _moe("per_expert")
    layer.build((None, 6))
    kernel = layer.experts.kernel_in
    assert isinstance(kernel, expert_weights.PerExpertWeight)
    assert tuple(kernel.shape) == (4, 6, 8)
    value = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    kernel.assign(value)
    np.testing.assert_array_equal(kernel.numpy(), value)
    np.testing.assert_array_equal(tf.convert_to_tensor(kernel), value)
    np.testing.assert_array_equal(kernel[2], value[2])
    np.testing.assert_array_equal(layer.experts.kernel_in.experts[3].numpy(),
                                  value[3])
    with pytest.raises(ValueError, match=r"shape \(4, 6, 8\)"):
        kernel.assign(value[:3])


@pytest.mark.parametrize("saved, loaded", [("per_expert", "stacked"),
                                           ("stacked", "per_expert")])
def test_keras_files_load_across_storages(saved, loaded, tmp_path):
    x = tf.random.normal((16, 6), seed=2)
    source = keras.Sequential([keras.Input((6,)), _moe(saved)])
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    target = keras.Sequential([keras.Input((6,)), tf_moe.MoE(
        4, 8, k=2, seed=9, expert_storage=loaded)])
    target.load_weights(path)
    np.testing.assert_allclose(target(x), source(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(target.layers[0].experts.kernel_out),
        np.asarray(source.layers[0].experts.kernel_out))


def test_whole_model_file_keeps_the_storage(tmp_path):
    x = tf.random.normal((16, 6), seed=2)
    model = keras.Sequential([keras.Input((6,)), _moe("per_expert")])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[0].expert_storage == "per_expert"
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_checkpoint_restores_per_expert_weights(tmp_path):
    x = tf.random.normal((16, 6), seed=2)
    layer = _moe("per_expert")
    expected = layer(x)
    path = tf.train.Checkpoint(layer=layer).write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert "layer/experts/kernel_in/experts/3/.ATTRIBUTES/VARIABLE_VALUE" in (
        names)
    restored = tf_moe.MoE(4, 8, k=2, seed=9, expert_storage="per_expert")
    restored.build((None, 6))
    tf.train.Checkpoint(layer=restored).read(path).assert_consumed()
    np.testing.assert_allclose(restored(x), expected, rtol=1e-5, atol=1e-6)


def test_per_expert_layer_trains_under_fit():
    x = tf.random.normal((64, 6), seed=2)
    model = keras.Sequential([keras.Input((6,)), _moe("per_expert")])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    before = model.layers[0].experts.kernel_in.numpy()
    history = model.fit(x, tf.zeros((64, 6)), epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    after = model.layers[0].experts.kernel_in.numpy()
    assert np.all(np.any(after != before, axis=(1, 2)))  # Every expert.


def test_upcycle_assigns_per_expert_weights():
    layer = tf_moe.MoE(4, 8, k=2, expert_storage="per_expert")
    layer.build((None, 6))
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=shape).astype(np.float32)
               for shape in ((6, 8), (8,), (8, 6), (6,))]
    tf_moe.upcycle(layer, *weights)
    for expert in range(4):
        np.testing.assert_array_equal(
            layer.experts.kernel_in.experts[expert].numpy(), weights[0])


def test_storage_argument_is_checked():
    with pytest.raises(ValueError, match="`expert_storage` must be one of"):
        tf_moe.MoE(4, 8, expert_storage="sliced")
    with pytest.raises(ValueError, match="`storage` must be one of"):
        tf_moe.Experts(4, 8, 6, storage="sliced")


def test_per_expert_storage_is_refused_on_a_mesh():
    placement = sharding.MeshPlacement(sharding.make_mesh("batch:2,expert:4"))
    with placement.scope():
        layer = tf_moe.MoE(4, 8, k=2, capacity_factor=2.0,
                           expert_storage="per_expert")
        with pytest.raises(ValueError, match="per_expert.*mesh"):
            layer.build((None, 6))


def test_config_keeps_the_storage():
    layer = _moe("per_expert")
    clone = tf_moe.MoE.from_config(layer.get_config())
    assert clone.expert_storage == "per_expert"


@pytest.mark.parametrize("layout_mode", ["tensorflow", "per_expert"])
def test_hierarchical_layer_computes_the_same_in_both_storages(
        layout_mode, kernel_mode, monkeypatch):
    """Padded ("tensorflow") and packed ("per_expert"), with the stacked
    bound below the 6 experts: there stacked runs padded, per-expert
    packed."""
    kernel_mode(layout_mode)
    monkeypatch.setattr(tf_moe.kernels, "PER_EXPERT_MAX_EXPERTS", 3)
    x = tf.random.normal((64, 6), seed=1)
    outputs, layouts = [], []
    for storage in expert_weights.STORAGES:
        layer = tf_moe.HierarchicalMoE(
            2, 3, 8, seed=3, expert_storage=storage,
            kernel_initializer=keras.initializers.GlorotUniform(5))
        outputs.append(layer(x))
        layouts.append(layer.experts.layout(None, tf.float32))
    assert layouts == ["padded", "padded" if layout_mode == "tensorflow"
                       else "packed"]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_per_expert_storage_fits_under_mirrored_strategy_as_stacked():
    """Replicas hold every expert: the per-expert variables mirror like any
    other, and a fit matches the stacked layer's on one device."""
    x = tf.random.normal((64, 6), seed=1)
    y = tf.random.normal((64, 6), seed=2)

    def fitted(storage, strategy):
        with strategy.scope():
            model = keras.Sequential([keras.Input((6,)), _moe(
                storage, noisy_gating=False, importance_weight=1.0)])
            model.compile(keras.optimizers.Adam(0.01), "mse")
        history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                            verbose=0)
        return model, history.history["loss"]

    single, single_loss = fitted("stacked", tf.distribute.get_strategy())
    mirrored, mirrored_loss = fitted("per_expert", tf.distribute.MirroredStrategy(
        [f"/CPU:{i}" for i in range(4)],
        cross_device_ops=tf.distribute.ReductionToOneDevice()))
    np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(mirrored.layers[0].experts.kernel_in),
        np.asarray(single.layers[0].experts.kernel_in), atol=1e-5)
