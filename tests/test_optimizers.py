"""The routed experts' own learning rate: which weights, and Adam's step."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe import optimizers

LEARNING_RATE = 0.01


def _model(layer):
    """tokens [6, 8] -> Dense -> `layer` -> Dense: a model with weights
    inside and outside the MoE layer."""
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, name="before")(inputs)
    outputs = keras.layers.Dense(4, name="after")(layer(hidden))
    return keras.Model(inputs, outputs)


def _names(weights):
    return sorted(weight.path for weight in weights)


@pytest.mark.parametrize("make_layer,experts", [
    (lambda: tf_moe.MoE(4, 16, k=2, num_shared_experts=1, name="moe"),
     "moe/experts"),
    (lambda: tf_moe.HierarchicalMoE(2, 3, 16, name="hmoe"), "hmoe/experts"),
])
def test_routed_expert_weights_are_the_routed_experts_alone(make_layer,
                                                            experts):
    model = _model(make_layer())
    found = optimizers.routed_expert_weights(model)
    assert _names(found) == sorted(
        f"{experts}/{name}"
        for name in ("kernel_in", "kernel_out", "bias_in", "bias_out"))
    # The gate, the shared experts and the dense layers keep the full rate.
    others = [w for w in model.trainable_weights
              if w.path not in _names(found)]
    assert any("gate" in w.path or "shared" in w.path for w in others)
    # A layer on its own, and several models at once.
    layer = make_layer()
    layer.build((None, 8))
    assert len(optimizers.routed_expert_weights(layer)) == 4
    assert len(optimizers.routed_expert_weights(model, layer)) == 8
    assert optimizers.routed_expert_weights(_model(
        keras.layers.Dense(8))) == []


def _one_step(optimizer, model, gradient=0.5):
    """Applies a constant gradient once; returns each weight's change."""
    before = {w.path: w.numpy() for w in model.trainable_weights}
    optimizer.apply([tf.fill(w.shape, gradient)
                     for w in model.trainable_weights],
                    model.trainable_weights)
    return {w.path: w.numpy() - before[w.path]
            for w in model.trainable_weights}


@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_adams_first_step_is_scaled_for_the_experts_alone(scale):
    model = _model(tf_moe.MoE(4, 16, k=2, name="moe"))
    experts = optimizers.routed_expert_weights(model)
    optimizer = optimizers.ExpertAdam(
        LEARNING_RATE,
        weight_scales=optimizers.expert_weight_scales(scale, model))
    changes = _one_step(optimizer, model)
    # Adam's first step, by hand: m = (1 - b1) g, v = (1 - b2) g^2, and the
    # bias corrections make it -lr * g / (|g| + eps') = -lr (g = 0.5).
    step = LEARNING_RATE * 0.5 / (0.5 + 1e-7 * math.sqrt(1 - 0.999))
    for path, change in changes.items():
        expected = step * (scale if path in _names(experts) else 1.0)
        # (float32 weights near 1 round each change to about 1e-7.)
        np.testing.assert_allclose(change, -expected, atol=1e-6)


def test_scale_one_is_plain_adam_step_after_step(rng):
    weights = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(2)]
    gradients = [[rng.normal(size=(3, 2)).astype(np.float32)
                  for _ in range(2)] for _ in range(4)]
    results = []
    for make in (lambda v: keras.optimizers.Adam(LEARNING_RATE),
                 lambda v: optimizers.ExpertAdam(
                     LEARNING_RATE, weight_scales=[(v[0], 1.0)])):
        variables = [keras.Variable(w) for w in weights]
        optimizer = make(variables)
        for step in gradients:
            optimizer.apply([tf.constant(g) for g in step], variables)
        results.append([v.numpy() for v in variables])
    for plain, expert in zip(*results):
        np.testing.assert_array_equal(plain, expert)


def test_scaled_experts_under_replicas():
    """Under tf.distribute each replica updates its own copy; the experts
    are still recognised (by their distributed container)."""
    strategy = tf.distribute.MirroredStrategy(
        ["/CPU:0", "/CPU:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        model = _model(tf_moe.MoE(4, 16, k=2, name="moe"))
        experts = optimizers.routed_expert_weights(model)
        optimizer = optimizers.ExpertAdam(
            LEARNING_RATE,
            weight_scales=optimizers.expert_weight_scales(0.5, model))
        optimizer.build(model.trainable_weights)
    before = {w.path: w.numpy() for w in model.trainable_weights}

    @tf.function
    def step():
        def replica_step():
            optimizer.apply([tf.fill(w.shape, 0.5)
                             for w in model.trainable_weights],
                            model.trainable_weights)
        strategy.run(replica_step)

    step()
    for w in model.trainable_weights:
        change = np.abs(w.numpy() - before[w.path]).max()
        scale = 0.5 if w.path in _names(experts) else 1.0
        np.testing.assert_allclose(change, LEARNING_RATE * scale, atol=1e-6)


def test_model_fit_steps_the_experts_at_their_rate(rng):
    """Through `model.compile` / `fit`: Adam's first step moves each weight
    by about the rate (|g| / (|g| + eps) for every nonzero gradient), so
    the largest change of an expert weight is the scaled rate."""
    model = _model(tf_moe.MoE(4, 16, k=4, name="moe"))
    experts = optimizers.routed_expert_weights(model)
    model.compile(optimizer=optimizers.ExpertAdam(
        LEARNING_RATE,
        weight_scales=optimizers.expert_weight_scales(0.25, model)),
        loss="mse")
    before = {w.path: w.numpy() for w in model.trainable_weights}
    x = rng.normal(size=(32, 8)).astype(np.float32)
    model.fit(x, rng.normal(size=(32, 4)), batch_size=32, epochs=1,
              verbose=0)
    for w in model.trainable_weights:
        largest = np.abs(w.numpy() - before[w.path]).max()
        scale = 0.25 if w.path in _names(experts) else 1.0
        np.testing.assert_allclose(largest, LEARNING_RATE * scale, rtol=0.02)


def test_saved_compiled_model_trains_on_with_its_scales(tmp_path, rng):
    model = _model(tf_moe.MoE(4, 16, k=2, name="moe"))
    model.compile(optimizer=optimizers.ExpertAdam(
        LEARNING_RATE,
        weight_scales=optimizers.expert_weight_scales(0.25, model)),
        loss="mse")
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = rng.normal(size=(32, 4)).astype(np.float32)
    model.fit(x, y, batch_size=32, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    loaded.optimizer.build(loaded.trainable_variables)
    for weight in loaded.trainable_variables:
        expected = 0.25 if weight.path.startswith("moe/experts/") else 1.0
        assert loaded.optimizer.learning_rate_scale(weight) == expected
    # A path that names no weight is an error when the optimizer is built.
    optimizer = optimizers.ExpertAdam(weight_scales=[("moe/gone", 0.5)])
    with pytest.raises(ValueError, match="moe/gone"):
        optimizer.build(model.trainable_variables)


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"),
                                   "0.5", "sqrt", True, None])
def test_bad_scale_is_refused(scale):
    model = _model(tf_moe.MoE(4, 16, k=2))
    with pytest.raises(ValueError, match="`expert_learning_rate_scale`"):
        optimizers.expert_weight_scales(scale, model)
    if not isinstance(scale, str):
        with pytest.raises(ValueError, match="`weight_scales`: the factor "
                           "of .*kernel_in"):
            optimizers.ExpertAdam(weight_scales=[
                (model.trainable_weights[0], 1.0),
                (optimizers.routed_expert_weights(model)[0], scale)])


def test_square_root_rule_takes_each_layers_k_over_e():
    flat = tf_moe.MoE(64, 16, k=4, name="flat")
    tree = tf_moe.HierarchicalMoE(4, 8, 16, k_primary=2, k_secondary=2,
                                  name="tree")
    inputs = keras.Input((8,))
    model = keras.Model(inputs, tree(flat(inputs)))
    scales = {weight.path: factor for weight, factor in
              optimizers.expert_weight_scales("square_root", model)}
    assert len(scales) == 8
    for path, factor in scales.items():
        # 4 of 64 experts: 1/4; 2 x 2 of 4 x 8: sqrt(4 / 32).
        expected = 0.25 if path.startswith("flat/") else math.sqrt(4 / 32)
        assert factor == pytest.approx(expected), path
    optimizer = optimizers.ExpertAdam(weight_scales=(
        optimizers.expert_weight_scales("square_root", model)))
    assert optimizer.learning_rate_scale(flat.experts.kernel_in) == 0.25
    assert optimizer.learning_rate_scale(flat.gate.trainable_weights[0]) \
        == 1.0


def test_square_root_scale():
    assert optimizers.square_root_scale(4, 256) == pytest.approx(0.125)
    assert optimizers.square_root_scale(2, 2) == 1.0
    for k, e, name in ((0, 4, "num_selected"), (2, 0, "num_experts"),
                       (2.0, 4, "num_selected"), (True, 4, "num_selected")):
        with pytest.raises(ValueError, match=f"`{name}`"):
            optimizers.square_root_scale(k, e)
    with pytest.raises(ValueError, match="at most"):
        optimizers.square_root_scale(8, 4)
