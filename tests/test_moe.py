"""The MoE layer: fast path against the dense reference, losses, masks,
edge cases, bad input, training under Keras, mixed precision and XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import layer_kinds
import tf_moe
from moe_reference import dense_moe


def _layer(num_experts=8, hidden_size=6, k=2, **kwargs):
    # A random gate kernel makes routing depend on the token (the zero
    # initialisation of the paper would route every token alike at inference).
    kwargs.setdefault("gate_initializer",
                      keras.initializers.RandomNormal(stddev=1.0, seed=11))
    kwargs.setdefault("bias_initializer",
                      keras.initializers.RandomNormal(stddev=0.1, seed=12))
    return tf_moe.MoE(num_experts, hidden_size, k=k, **kwargs)


CASES = [
    # (E, k, input shape, masked, capacity_factor)
    (8, 2, (12, 5), False, None),
    (8, 2, (3, 7, 5), True, None),
    (16, 4, (2, 3, 4, 5), False, 1.0),
    (5, 5, (4, 6, 5), True, None),
    (16, 1, (3, 9, 5), True, 0.5),
    (1, 1, (10, 5), False, None),
    (32, 3, (2, 20, 5), False, 0.75),
]


# Dropless cases again with free overflow experts, so that the plans split
# into a main and an overflow group; every case again in the packed layout
# (kernel mode "per_expert": one matmul pair per expert, no padding).
CASES_WITH_COST = ([case + (None, "tensorflow") for case in CASES]
                   + [case + (0, "tensorflow") for case in CASES
                      if case[4] is None and case[0] > 1]
                   + [case + (None, "per_expert") for case in CASES])


@pytest.mark.parametrize(
    "num_experts, k, shape, masked, capacity_factor, overflow_expert_cost, "
    "mode", CASES_WITH_COST)
def test_matches_dense_reference_outputs_and_gradients(
        num_experts, k, shape, masked, capacity_factor, overflow_expert_cost,
        mode, monkeypatch, kernel_mode):
    kernel_mode(mode)
    if overflow_expert_cost is not None:
        monkeypatch.setattr(tf_moe.plan, "OVERFLOW_EXPERT_COST",
                            overflow_expert_cost)
    rng = np.random.default_rng(num_experts + k)
    inputs = tf.constant(rng.normal(size=shape).astype(np.float32))
    mask = rng.random(shape[:-1]) < 0.7 if masked else None
    layer = _layer(num_experts, k=k, output_size=3,
                   capacity_factor=capacity_factor)
    layer.build(inputs.shape)
    num_tokens = int(np.prod(shape[:-1]))
    capacity = (None if capacity_factor is None else
                tf_moe.plan.fixed_capacity(num_tokens, num_experts, k,
                                               capacity_factor))
    cotangent = tf.constant(rng.normal(size=shape[:-1] + (3,)).astype(np.float32))

    def objective(fn):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = fn()
            value = tf.reduce_sum(outputs * cotangent)
        sources = [inputs] + layer.trainable_variables
        grads = tape.gradient(value, sources)
        return outputs, [np.zeros(s.shape) if g is None else tf.convert_to_tensor(g)
                         for s, g in zip(sources, grads)]

    mask_tensor = None if mask is None else tf.constant(mask)
    if overflow_expert_cost == 0:
        tokens = tf.reshape(inputs, [-1, shape[-1]])
        token_mask = None if mask is None else tf.reshape(mask_tensor, [-1])
        plan = tf_moe.make_dispatch_plan(
            layer.gate(tokens, token_mask=token_mask).expert_ids, num_experts,
            token_mask=token_mask)
        assert plan.overflow_experts.shape[0] > 0
    fast, fast_grads = objective(lambda: layer(inputs, mask=mask_tensor))
    slow, slow_grads = objective(
        lambda: dense_moe(layer, inputs, mask, capacity))
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-5, rtol=1e-5)
    for variable, fast_grad, slow_grad in zip(
            ["inputs"] + [v.path for v in layer.trainable_variables],
            fast_grads, slow_grads):
        np.testing.assert_allclose(np.asarray(fast_grad), np.asarray(slow_grad),
                                   atol=1e-5, rtol=1e-5, err_msg=variable)
    if mask is not None:
        assert np.all(fast.numpy()[~mask] == 0.0)
    # The gradients are not trivially zero: the check above has teeth.
    assert np.abs(np.asarray(fast_grads[0])).max() > 1e-3


def test_losses_by_hand():
    layer = _layer(4, k=2, importance_weight=0.3, load_weight=0.2)
    tokens = tf.random.normal((9, 5), seed=4)
    layer(tokens)
    gate = layer.gate(tokens)
    importance, load = gate.importance.numpy(), gate.load.numpy()

    def cv2(v):
        return v.var() / v.mean() ** 2

    expected = 0.3 * cv2(importance) + 0.2 * cv2(load)
    (loss,) = layer.losses
    assert loss.numpy() == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_routing_metrics_by_hand():
    layer = _layer(4, k=2)
    batches = [tf.random.normal((9, 5), seed=seed) for seed in (4, 5)]
    expected = {"importance_cv": [], "load_cv": [], "load_max_over_mean": []}
    for tokens in batches:
        layer(tokens)
        gate = layer.gate(tokens)
        importance = gate.importance.numpy()
        load = np.bincount(gate.expert_ids.numpy().ravel(), minlength=4)
        expected["importance_cv"].append(importance.std() / importance.mean())
        expected["load_cv"].append(load.std() / load.mean())
        expected["load_max_over_mean"].append(load.max() / load.mean())
    metrics = layer.routing_metrics(reset=True)
    for name, values in expected.items():
        assert metrics[name] == pytest.approx(np.mean(values), rel=1e-5), name
    assert expected["load_max_over_mean"][0] > 1
    assert layer.routing_metrics()["load_cv"] == 0.0  # reset


def test_without_noise_only_importance_counts():
    layer = _layer(4, k=2, noisy_gating=False, importance_weight=0.3,
                   load_weight=5.0)
    tokens = tf.random.normal((9, 5), seed=4)
    layer(tokens, training=True)
    importance = layer.gate(tokens).importance.numpy()
    (loss,) = layer.losses
    assert loss.numpy() == pytest.approx(
        0.3 * importance.var() / importance.mean() ** 2, rel=1e-5)


@pytest.mark.parametrize("kind", layer_kinds.ALL)
def test_mask_excludes_positions_from_losses_and_metrics(kind):
    layer = kind(gate_initializer=keras.initializers.RandomNormal(seed=2))
    inputs = tf.random.normal((3, 8, 5), seed=5)
    mask = np.random.default_rng(1).random((3, 8)) < 0.5
    outputs = layer(inputs, mask=tf.constant(mask))
    masked_loss = layer.losses[0].numpy()
    counts = layer.expert_token_counts.numpy()
    valid = tf.boolean_mask(inputs, mask)
    valid_outputs = layer(valid)
    np.testing.assert_allclose(outputs.numpy()[mask], valid_outputs.numpy(),
                               atol=1e-6)
    assert masked_loss == pytest.approx(layer.losses[0].numpy(), rel=1e-5)
    np.testing.assert_array_equal(counts, layer.expert_token_counts.numpy())
    if layer.gating == "noisy_top_k":
        assert counts.sum() == mask.sum() * layer.experts_per_token


def test_keras_mask_propagates_through_a_model():
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(20, 8, mask_zero=True),
        _layer(4, k=2),
    ])
    tokens = np.array([[3, 4, 0, 0], [5, 0, 0, 0]])
    outputs = model(tokens).numpy()
    assert np.all(outputs[tokens == 0] == 0.0)
    assert np.all(np.abs(outputs[tokens != 0]).sum(-1) > 0)
    counts = model.layers[-1].expert_token_counts.numpy()
    assert counts.sum() == 3 * 2


@pytest.mark.parametrize("kind", layer_kinds.ALL)
@pytest.mark.parametrize("training", [False, True])
def test_empty_and_fully_masked_batches(kind, training):
    layer = kind(output_size=3)
    empty = layer(tf.zeros((0, 7, 5)), training=training)
    assert empty.shape == (0, 7, 3)
    assert layer.losses[0].numpy() == 0.0
    inputs = tf.random.normal((2, 7, 5))
    masked = layer(inputs, mask=tf.zeros((2, 7), tf.bool), training=training)
    assert masked.shape == (2, 7, 3)
    assert np.all(masked.numpy() == 0.0)
    assert layer.losses[0].numpy() == 0.0
    for metric in layer.metrics:
        assert np.isfinite(metric.result().numpy()), metric.name
    assert layer.expert_token_counts.numpy().sum() == 0


def test_capacity_counts_dropped_fraction():
    layer = _layer(8, k=2, capacity_factor=0.5)
    tokens = tf.random.normal((64, 5), seed=6)
    layer(tokens)
    counts = layer.expert_token_counts.numpy()
    capacity = tf_moe.plan.fixed_capacity(64, 8, 2, 0.5)
    expected = np.maximum(counts - capacity, 0).sum() / counts.sum()
    dropped = layer._metric_trackers["dropped_fraction"].result().numpy()
    assert dropped == pytest.approx(expected)
    assert dropped > 0.4  # half the capacity of a balanced batch


@pytest.mark.parametrize("kwargs, argument", [
    (dict(num_experts=0, hidden_size=4), "num_experts"),
    (dict(num_experts=4, hidden_size=0), "hidden_size"),
    (dict(num_experts=4, hidden_size=4, k=0), "`k`"),
    (dict(num_experts=4, hidden_size=4, k=5), "`k`"),
    (dict(num_experts=4, hidden_size=4, capacity_factor=0.0), "capacity_factor"),
    (dict(num_experts=4, hidden_size=4, capacity_factor=-1), "capacity_factor"),
    (dict(num_experts=4, hidden_size=4, importance_weight=-0.1),
     "importance_weight"),
    (dict(num_experts=4, hidden_size=4, load_weight=-1.0), "load_weight"),
    (dict(num_experts=4, hidden_size=4, output_size=0), "output_size"),
    (dict(num_experts=4, hidden_size=4, expert_dropout=1.0), "expert_dropout"),
    (dict(num_experts=2.5, hidden_size=4), "num_experts"),
])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tf_moe.MoE(**kwargs)


@pytest.mark.parametrize("kind", layer_kinds.ALL)
def test_bad_inputs(kind):
    with pytest.raises(ValueError, match="floating"):
        kind()(tf.ones((3, 5), tf.int32))
    with pytest.raises(ValueError, match="last dimension"):
        kind().build((None, None))
    with pytest.raises(ValueError, match="rank >= 2"):
        kind().build((5,))
    with pytest.raises(ValueError, match="last dimension"):
        keras.Sequential([keras.Input((7, None)), kind()])


@pytest.mark.parametrize("kind", layer_kinds.ALL)
def test_mixed_bfloat16_keeps_the_gate_in_float32(kind):
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = kind(gate_initializer=keras.initializers.RandomNormal(seed=2))
    inputs = tf.random.normal((4, 6, 5))
    outputs = layer(inputs, training=True)
    assert outputs.dtype == tf.bfloat16
    gates = [getattr(layer, name) for name in
             ("gate", "primary_gate", "secondary_gate") if hasattr(layer, name)]
    for gate in gates:
        assert gate.compute_dtype == "float32"
        assert gate.gate_kernel.dtype == "float32"
    assert layer.experts.kernel_in.dtype == "float32"
    assert layer.losses[0].dtype == tf.float32
    gate, _ = layer._route(tf.reshape(inputs, [-1, 5]), None, training=False)
    assert gate.gate_weights.dtype == tf.float32
    assert np.isfinite(layer.losses[0].numpy())

    keras.config.set_dtype_policy("float32")
    reference = kind(gate_initializer=keras.initializers.RandomNormal(seed=2))
    # bfloat16 keeps 8 bits of mantissa: outputs of order 1 agree to ~1e-2.
    reference.build(inputs.shape)
    reference.set_weights(layer.get_weights())
    inference = layer(inputs).numpy().astype(np.float32)
    np.testing.assert_allclose(inference, reference(inputs).numpy(),
                               atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kind", layer_kinds.STATIC_SHAPES)
def test_jit_compile_with_capacity_equals_eager(kind):
    layer = kind(capacity_factor=1.25,
                 gate_initializer=keras.initializers.RandomNormal(seed=2))
    inputs = tf.random.normal((4, 6, 5))
    eager = layer(inputs)
    compiled = tf.function(lambda x: layer(x), jit_compile=True)
    np.testing.assert_allclose(compiled(inputs).numpy(), eager.numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("kind", layer_kinds.ALL)
def test_tf_function_equals_eager(kind):
    layer = kind(gate_initializer=keras.initializers.RandomNormal(seed=2))
    inputs = tf.random.normal((4, 6, 5))
    traced = tf.function(lambda x: layer(x), input_signature=[
        tf.TensorSpec([None, None, 5], tf.float32)])
    np.testing.assert_allclose(traced(inputs).numpy(), layer(inputs).numpy(),
                               atol=1e-6)
