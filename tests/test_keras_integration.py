"""MoE inside Keras models: fit, metrics, callbacks, saving and export."""

import keras
import numpy as np
import pytest

import tf_moe
import layer_kinds
import serving


def _data(num=128, steps=6, width=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, steps, width)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(width, width))).astype(np.float32)
    return x, y


def _sequential(kind=layer_kinds.moe, **moe_kwargs):
    return keras.Sequential([
        keras.Input((6, 8)),
        kind(**moe_kwargs),
        keras.layers.Dense(8),
    ])


def _layer_of(model):
    return next(layer for layer in model._flatten_layers()
                if isinstance(layer, tf_moe.mixture.MixtureOfExperts))


def _functional():
    inputs = keras.Input((6, 8))
    hidden = keras.layers.Dense(8)(inputs)
    outputs = tf_moe.MoE(8, 16, k=2, seed=1)(hidden) + hidden
    return keras.Model(inputs, outputs)


class SubclassedMoEModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.moe = tf_moe.MoE(8, 16, k=2, seed=1)
        self.head = keras.layers.Dense(8)

    def call(self, inputs, training=None):
        return self.head(self.moe(inputs, training=training))


@pytest.mark.parametrize("build", [
    _functional, SubclassedMoEModel] + [
        lambda kind=kind: _sequential(kind) for kind in layer_kinds.ALL])
def test_fit_logs_balancing_metrics_and_reduces_loss(build):
    x, y = _data()
    model = build()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0,
                        validation_data=(x[:32], y[:32]))
    logs = history.history
    moe = _layer_of(model)
    for metric in moe._metric_trackers:
        assert f"{moe.name}_{metric}" in logs, sorted(logs)
        assert f"val_{moe.name}_{metric}" in logs
        assert all(np.isfinite(logs[f"{moe.name}_{metric}"]))
    assert logs["loss"][-1] < logs["loss"][0]
    # The balancing losses are part of the objective fit minimises.
    router_losses = [name for name in moe._metric_trackers
                     if name.endswith("_loss")]
    assert sum(logs[f"{moe.name}_{name}"][0] for name in router_losses) > 0


def test_two_moe_layers_log_separately():
    model = keras.Sequential([keras.Input((6, 8)), tf_moe.MoE(4, 8, k=1),
                              tf_moe.MoE(4, 8, k=1)])
    model.compile("adam", "mse")
    x, y = _data(num=16)
    logs = model.fit(x, y, epochs=1, verbose=0).history
    names = [layer.name for layer in model.layers]
    assert len(set(names)) == 2
    for name in names:
        assert f"{name}_load_cv" in logs


def test_callback_reads_expert_token_counts():
    x, y = _data(num=64)
    model = _sequential()
    moe = model.layers[0]
    seen = []

    class CountRecorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(moe.expert_token_counts.numpy().copy())

    model.compile("adam", "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[CountRecorder()])
    assert len(seen) == 4
    for counts in seen:
        assert counts.shape == (8,)
        assert counts.sum() == 16 * 6 * 2  # every token, k = 2, dropless


@pytest.mark.parametrize("kind", layer_kinds.STATIC_SHAPES)
def test_fit_with_jit_compile_and_capacity(kind):
    x, y = _data()
    model = _sequential(kind, capacity_factor=1.5)
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    logs = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    assert logs["loss"][-1] < logs["loss"][0]
    assert 0.0 <= logs[f"{model.layers[0].name}_dropped_fraction"][-1] < 0.5


@pytest.mark.parametrize("kind", layer_kinds.ALL)
def test_fit_under_mixed_bfloat16(kind):
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, y = _data()
    model = _sequential(kind)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    logs = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    assert np.all(np.isfinite(logs["loss"]))
    assert logs["loss"][-1] < logs["loss"][0]


def test_get_config_round_trip():
    layer = tf_moe.MoE(6, 12, k=3, output_size=5, noisy_gating=False,
                       importance_weight=0.2, load_weight=0.05,
                       capacity_factor=1.25, activation="gelu",
                       expert_dropout=0.1, seed=3, name="my_moe")
    clone = tf_moe.MoE.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    layer = tf_moe.HierarchicalMoE(
        3, 5, 12, k_primary=2, k_secondary=3, output_size=4,
        gating="batchwise", importance_weight=0.01, capacity_factor=2.0,
        seed=4, name="my_hmoe")
    clone = tf_moe.HierarchicalMoE.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("kind", layer_kinds.ALL)
def test_keras_file_round_trip(kind, tmp_path):
    x, y = _data(num=32)
    model = _sequential(kind, capacity_factor=2.0)
    model.compile("adam", "mse")
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored.layers[0]) is type(model.layers[0])
    np.testing.assert_allclose(restored.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)


def _both_hierarchical():
    # One export (one fresh process) for both hierarchical gatings.
    return keras.Sequential([layer_kinds.hierarchical(),
                             layer_kinds.hierarchical_batchwise()])


def _newer_routers():
    # One export for the routers since 2017.
    return keras.Sequential([layer_kinds.moe_top_k(),
                             layer_kinds.hierarchical_top_k(),
                             layer_kinds.moe_expert_choice()])


@pytest.mark.parametrize("kind", [layer_kinds.moe, _both_hierarchical,
                                  _newer_routers])
def test_export_serves_in_a_fresh_process_without_tf_moe(kind, tmp_path):
    x, y = _data(num=32)
    inputs = keras.Input((None, 8))
    hidden = kind()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y[..., :3], epochs=2, verbose=0)
    export_dir = str(tmp_path / "export")
    model.export(export_dir, verbose=False)
    probe = x[:5, :4]
    stdout = serving.serve_in_fresh_process(
        export_dir, probe, model.predict(probe, verbose=0), tmp_path)
    assert "served (5, 4, 3)" in stdout


def _clustered_task(seed=0, num=2048, width=8):
    """Two tight clusters: the gate can send all of each to a few experts."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2, width)) * 3
    cluster = rng.integers(0, 2, num)
    x = (centers[cluster] + rng.normal(size=(num, width))).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(width, width))).astype(np.float32)
    return x, y


@pytest.mark.parametrize("weight, low, high", [(0.0, 0.4, 10.0),
                                              (0.1, 0.0, 0.2)])
def test_balancing_losses_keep_load_balanced(weight, low, high):
    """A miniature of the paper's Table 6: without the losses the gate sends
    most tokens to a few experts (rich get richer); with them it does not."""
    keras.utils.set_random_seed(0)
    x, y = _clustered_task()
    moe = tf_moe.MoE(8, 16, k=2, importance_weight=weight, load_weight=weight,
                     seed=1)
    model = keras.Sequential([keras.Input((8,)), moe])
    model.compile(keras.optimizers.Adam(0.02), "mse")
    logs = model.fit(x, y, batch_size=256, epochs=8, verbose=0).history
    load_cv = logs[f"{moe.name}_load_cv"][-1]
    assert low <= load_cv <= high, load_cv
