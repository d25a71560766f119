"""The routers and experts since 2017: softmax top-k, expert choice, Switch
and bias balancing, the router z-loss, jitter, glu and shared experts and
upcycling, each against a dense reference or values computed by hand."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from moe_reference import every_expert, shared_experts
from tf_moe import balance
from tf_moe.gating import RouterStatistics


def _random_gate(seed=11):
    # A random gate kernel makes routing depend on the token.
    return keras.initializers.RandomNormal(stddev=1.0, seed=seed)


def _moe(num_experts=8, k=2, **kwargs):
    kwargs.setdefault("gate_initializer", _random_gate())
    kwargs.setdefault("bias_initializer",
                      keras.initializers.RandomNormal(stddev=0.1, seed=12))
    return tf_moe.MoE(num_experts, 6, k=k, output_size=3, seed=1, **kwargs)


def _top_k_gates(logits, k, normalize):
    """`[T, E]` dense softmax top-k gates (every expert a column)."""
    probabilities = tf.nn.softmax(logits, axis=-1)
    top = tf.math.top_k(tf.stop_gradient(logits), k=k).indices
    keep = tf.reduce_sum(tf.one_hot(top, logits.shape[-1]), axis=1)
    gates = probabilities * keep
    if normalize:
        gates /= tf.reduce_sum(gates, axis=-1, keepdims=True)
    return gates


def _expert_choice_gates(logits, k, capacity_factor, token_mask):
    """`[T, E]` dense expert-choice gates: a walk over the experts, each
    taking its C best unmasked tokens."""
    probabilities = tf.nn.softmax(logits, axis=-1)
    scores = probabilities.numpy()
    num_valid = int(token_mask.sum())
    num_experts = logits.shape[-1]
    capacity = min(num_valid, math.ceil(capacity_factor * k * num_valid
                                        / num_experts))
    keep = np.zeros_like(scores)
    for expert in range(num_experts):
        order = [t for t in np.argsort(-scores[:, expert]) if token_mask[t]]
        keep[order[:capacity], expert] = 1.0
    return probabilities * keep, capacity


def _dense_reference(layer, tokens, token_mask):
    """`[T, d_out]` of a built flat layer: every expert on every token,
    weighted by gates computed densely from the layer's gate kernel."""
    logits = tf.matmul(tokens, layer.gate.gate_kernel)
    if layer.gating == "top_k":
        gates = _top_k_gates(logits, layer.k, layer.normalize_gates)
    else:
        gates, _ = _expert_choice_gates(logits, layer.k,
                                        layer.gate.factor, token_mask)
    gates *= token_mask[:, None].astype(np.float32)
    outputs = tf.einsum("te,teo->to", gates,
                        every_expert(layer.experts, tokens))
    return outputs + shared_experts(layer, tokens, token_mask)


ROUTERS = [
    dict(gating="top_k"),
    dict(gating="top_k", normalize_gates=False),
    dict(gating="top_k", k=1),  # Switch
    dict(gating="top_k", expert_type="glu"),
    dict(gating="top_k", num_shared_experts=2, shared_hidden_size=5),
    dict(gating="top_k", expert_type="glu", num_shared_experts=1,
         activation="gelu"),
    dict(gating="expert_choice"),
    dict(gating="expert_choice", capacity_factor=1.5, k=1),
    dict(gating="expert_choice", expert_type="glu", num_shared_experts=1),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kwargs", ROUTERS)
def test_matches_dense_reference_outputs_and_gradients(kwargs, masked):
    rng = np.random.default_rng(3)
    tokens = tf.constant(rng.normal(size=(24, 5)).astype(np.float32))
    token_mask = (rng.random(24) < 0.7 if masked else np.ones(24, bool))
    layer = _moe(**kwargs)
    layer.build(tokens.shape)
    cotangent = tf.constant(rng.normal(size=(24, 3)).astype(np.float32))

    def objective(fn):
        with tf.GradientTape() as tape:
            tape.watch(tokens)
            value = tf.reduce_sum(fn() * cotangent)
        sources = [tokens] + layer.trainable_variables
        return value, tape.gradient(value, sources)

    value, grads = objective(lambda: layer(
        tokens, mask=tf.constant(token_mask)))
    expected, expected_grads = objective(
        lambda: _dense_reference(layer, tokens, token_mask))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad, source in zip(
            grads, expected_grads, [tokens] + layer.trainable_variables):
        grad = np.zeros(source.shape) if grad is None else tf.convert_to_tensor(grad)
        expected_grad = (np.zeros(source.shape) if expected_grad is None
                         else tf.convert_to_tensor(expected_grad))
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5,
                                   err_msg=getattr(source, "path", "tokens"))


def _dense_hierarchical_top_k(layer, tokens, token_mask):
    """`[T, d_out]` of a built top-k HierarchicalMoE, densely: both levels
    of softmax top-k gates on every token, every expert on every token."""
    primary = _top_k_gates(tf.matmul(tokens, layer.primary_gate.gate_kernel),
                           layer.k_primary, layer.normalize_gates)
    logits = tf.einsum("td,gdb->tgb", tokens, layer.secondary_gate.gate_kernel)
    secondary = tf.reshape(_top_k_gates(
        tf.reshape(logits, [-1, layer.experts_per_group]), layer.k_secondary,
        layer.normalize_gates), logits.shape)
    gates = tf.reshape(primary[:, :, None] * secondary,
                       [tokens.shape[0], -1])
    gates *= token_mask[:, None].astype(np.float32)
    outputs = tf.einsum("te,teo->to", gates,
                        every_expert(layer.experts, tokens))
    return outputs + shared_experts(layer, tokens, token_mask)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(normalize_gates=False, expert_type="glu", num_shared_experts=1),
    dict(balancing="bias", router_z_loss_weight=0.1),
])
def test_hierarchical_top_k_matches_dense_reference(kwargs):
    rng = np.random.default_rng(5)
    tokens = tf.constant(rng.normal(size=(20, 5)).astype(np.float32))
    token_mask = rng.random(20) < 0.8
    layer = tf_moe.HierarchicalMoE(
        3, 4, 6, k_primary=2, k_secondary=2, gating="top_k", output_size=3,
        gate_initializer=_random_gate(), seed=1,
        bias_initializer=keras.initializers.RandomNormal(stddev=0.1), **kwargs)
    layer.build(tokens.shape)
    cotangent = tf.constant(rng.normal(size=(20, 3)).astype(np.float32))
    sources = [tokens] + layer.trainable_variables

    def objective(fn):
        with tf.GradientTape() as tape:
            tape.watch(tokens)
            value = tf.reduce_sum(fn() * cotangent)
        return value, tape.gradient(value, sources)

    value, grads = objective(lambda: layer(tokens,
                                           mask=tf.constant(token_mask)))
    expected, expected_grads = objective(
        lambda: _dense_hierarchical_top_k(layer, tokens, token_mask))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad, source in zip(grads, expected_grads, sources):
        np.testing.assert_allclose(
            np.zeros(source.shape) if grad is None else grad,
            np.zeros(source.shape) if expected_grad is None else expected_grad,
            rtol=1e-4, atol=1e-5, err_msg=getattr(source, "path", "tokens"))


def _by_hand_layer(gating, **kwargs):
    """A layer whose logits are its tokens (identity gate kernel)."""
    layer = tf_moe.MoE(4, 3, k=2, gating=gating,
                       gate_initializer="identity", **kwargs)
    layer.build((None, 4))
    return layer


LOGITS = np.array([[2.0, 1.0, 0.0, -1.0],
                   [0.0, 3.0, 1.0, 0.0],
                   [1.0, 0.0, 0.0, 2.0]], np.float32)


def test_top_k_gates_by_hand():
    for normalize in (True, False):
        layer = _by_hand_layer("top_k", normalize_gates=normalize)
        output = layer.gate(tf.constant(LOGITS))
        exp = np.exp(LOGITS)
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        expected_ids = [[0, 1], [1, 2], [3, 0]]
        np.testing.assert_array_equal(output.expert_ids, expected_ids)
        kept = np.take_along_axis(probabilities, np.array(expected_ids), 1)
        if normalize:
            kept /= kept.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(output.gate_weights, kept, rtol=1e-6)


def test_switch_loss_by_hand():
    # top-2 of LOGITS: experts 0,1 | 1,2 | 3,0 -> f = [2, 2, 1, 1] / 6.
    layer = _by_hand_layer("top_k", balancing="switch", aux_loss_weight=0.5)
    layer(tf.constant(LOGITS))
    exp = np.exp(LOGITS)
    mean_probability = (exp / exp.sum(axis=1, keepdims=True)).mean(axis=0)
    fraction = np.array([2, 2, 1, 1]) / 6
    expected = 0.5 * 4 * np.sum(fraction * mean_probability)
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(layer.routing_metrics()["switch_loss"],
                               expected, rtol=1e-6)


def test_switch_loss_is_one_when_uniform_and_averages_groups():
    uniform = RouterStatistics(
        assignments=tf.constant([[3.0, 3.0, 3.0], [1.0, 1.0, 1.0],
                                 [0.0, 0.0, 0.0]]),
        rows=tf.constant([3.0, 1.0, 0.0]),
        probability_sum=tf.constant([[1.0, 1.0, 1.0],
                                     [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]]))
    # Groups 0 and 1 are uniform (1 each); group 2 has no rows and counts
    # in no mean.
    np.testing.assert_allclose(balance.switch_loss(uniform), 1.0, rtol=1e-6)
    skewed = RouterStatistics(
        assignments=tf.constant([[2.0, 0.0]]), rows=tf.constant([2.0]),
        probability_sum=tf.constant([[1.6, 0.4]]))
    np.testing.assert_allclose(balance.switch_loss(skewed), 2 * 1.0 * 0.8)


def test_router_z_loss_by_hand():
    for gating in ("noisy_top_k", "top_k", "batchwise", "expert_choice"):
        layer = _by_hand_layer(gating, router_z_loss_weight=0.1,
                               importance_weight=0.0, load_weight=0.0)
        mask = tf.constant([True, False, True])
        layer(tf.constant(LOGITS), mask=mask)
        lse = np.log(np.exp(LOGITS).sum(axis=1))
        expected = 0.1 * np.mean(lse[[0, 2]] ** 2)
        metrics = layer.routing_metrics()
        np.testing.assert_allclose(metrics["z_loss"], expected, rtol=1e-6,
                                   err_msg=gating)


def test_hierarchical_z_and_switch_losses_sum_the_two_levels():
    layer = tf_moe.HierarchicalMoE(
        2, 2, 3, k_primary=1, k_secondary=1, gating="top_k",
        router_z_loss_weight=1.0, aux_loss_weight=1.0,
        gate_initializer=_random_gate(), seed=1)
    tokens = tf.constant(np.random.default_rng(0).normal(
        size=(16, 4)).astype(np.float32))
    layer(tokens)
    primary = tf.matmul(tokens, layer.primary_gate.gate_kernel)
    primary_ids = np.argmax(primary, axis=1)
    secondary = tf.einsum("td,gdb->tgb", tokens,
                          layer.secondary_gate.gate_kernel).numpy()
    rows = secondary[np.arange(16), primary_ids]  # Each token's group.
    lse = lambda x: np.log(np.exp(x).sum(axis=-1))  # noqa: E731
    expected_z = np.mean(lse(primary.numpy()) ** 2) + np.mean(lse(rows) ** 2)
    metrics = layer.routing_metrics()
    np.testing.assert_allclose(metrics["z_loss"], expected_z, rtol=1e-5)

    def switch(logits, ids):
        p = tf.nn.softmax(logits).numpy()
        f = np.bincount(ids, minlength=logits.shape[-1]) / len(ids)
        return logits.shape[-1] * np.sum(f * p.mean(axis=0))

    group_terms = [switch(rows[primary_ids == g],
                          np.argmax(rows[primary_ids == g], axis=1))
                   for g in range(2) if np.any(primary_ids == g)]
    expected_switch = (switch(primary.numpy(), primary_ids)
                       + np.mean(group_terms))
    np.testing.assert_allclose(metrics["switch_loss"], expected_switch,
                               rtol=1e-5)


@pytest.mark.parametrize("capacity_factor, k, masked",
                         [(None, 2, False), (None, 2, True), (1.5, 1, True),
                          (0.5, 3, False)])
def test_expert_choice_gives_every_expert_exactly_c_tokens(
        capacity_factor, k, masked):
    rng = np.random.default_rng(0)
    tokens = tf.constant(rng.normal(size=(40, 5)).astype(np.float32))
    token_mask = rng.random(40) < 0.6 if masked else np.ones(40, bool)
    for training in (False, True):
        layer = _moe(8, k=k, gating="expert_choice",
                     capacity_factor=capacity_factor)
        layer(tokens, mask=tf.constant(token_mask), training=training)
        num_valid = int(token_mask.sum())
        expected = math.ceil((capacity_factor or 1) * k * num_valid / 8)
        np.testing.assert_array_equal(layer.expert_token_counts,
                                      [expected] * 8)
        assert layer.routing_metrics()["dropped_fraction"] == 0


def _skewed_task(seed=0):
    """Tokens whose router logits favour experts 0 and 1 strongly."""
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(512, 8)).astype(np.float32)
    kernel = rng.normal(size=(8, 8)).astype(np.float32) * 0.3
    bias_towards = np.zeros(8, np.float32)
    bias_towards[:2] = 3.0
    tokens = np.concatenate([tokens, np.ones((512, 1), np.float32)], axis=1)
    kernel = np.concatenate([kernel, bias_towards[None]], axis=0)
    return tf.constant(tokens), kernel


def test_bias_balancing_evens_the_load_without_any_loss():
    tokens, kernel = _skewed_task()
    layer = tf_moe.MoE(8, 4, k=2, gating="top_k", balancing="bias",
                       bias_update_rate=0.02, seed=1)
    layer.build(tokens.shape)
    layer.gate.gate_kernel.assign(kernel)
    layer(tokens, training=False)
    start_cv = layer.routing_metrics(reset=True)["load_cv"]
    for _ in range(150):
        output = layer(tokens, training=True)
    assert not layer.losses or float(tf.add_n(layer.losses)) == 0.0
    layer.routing_metrics(reset=True)
    layer(tokens, training=False)
    end_cv = layer.routing_metrics()["load_cv"]
    assert start_cv > 1.0, start_cv
    assert end_cv < 0.15, (start_cv, end_cv)
    del output
    # The bias chose the experts; the gate values come from the logits
    # alone: the softmax of each token's kept logits.
    gate_output = layer.gate(tokens)
    logits = tf.matmul(tokens, kernel)
    kept = tf.gather(logits, gate_output.expert_ids, batch_dims=1)
    np.testing.assert_allclose(gate_output.gate_weights,
                               tf.nn.softmax(kept), rtol=1e-5, atol=1e-6)
    bias = layer.gate.expert_bias.numpy()
    assert bias[:2].max() < bias[2:].min()  # Overloaded experts pushed down.
    biased = tf.math.top_k(logits + bias, k=2).indices
    np.testing.assert_array_equal(gate_output.expert_ids, biased)


def test_bias_balancing_moves_each_group_of_a_hierarchical_layer():
    layer = tf_moe.HierarchicalMoE(2, 4, 3, k_primary=1, k_secondary=1,
                                   gating="top_k", balancing="bias",
                                   bias_update_rate=0.5, seed=1)
    tokens = tf.constant(np.random.default_rng(0).normal(
        size=(32, 4)).astype(np.float32))
    layer(tokens, training=True)
    # Zero gates: ties go to the lowest ids, so group 0 and expert 0 of it
    # took every token; only they move down.
    np.testing.assert_allclose(layer.primary_gate.expert_bias, [-0.5, 0.5])
    secondary = layer.secondary_gate.expert_bias.numpy()
    np.testing.assert_allclose(secondary[0], [-0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(secondary[1], [0.0, 0.0, 0.0, 0.0])


def test_router_jitter_scales_the_router_input_in_training_only():
    layer = _moe(gating="top_k", router_jitter=0.1)
    tokens = tf.constant(np.random.default_rng(0).normal(
        size=(64, 5)).astype(np.float32))
    layer.build(tokens.shape)
    jittered = layer._jitter(tokens, training=True).numpy()
    ratio = jittered / tokens.numpy()
    assert 0.9 <= ratio.min() and ratio.max() <= 1.1
    assert ratio.std() > 0.03  # Spread over the interval, not constant.
    np.testing.assert_array_equal(layer._jitter(tokens, training=False),
                                  tokens)
    # Inference is deterministic and unaffected.
    np.testing.assert_array_equal(layer(tokens), layer(tokens))


UPCYCLE_LAYERS = [
    lambda: tf_moe.MoE(8, 6, k=2, seed=1),
    lambda: tf_moe.MoE(8, 6, k=2, gating="top_k", expert_type="glu"),
    lambda: tf_moe.HierarchicalMoE(3, 2, 6, k_primary=2, k_secondary=1,
                                   gating="top_k", seed=1),
    lambda: tf_moe.MoE(8, 6, k=3, expert_type="glu", seed=1),
]


@pytest.mark.parametrize("make_layer", UPCYCLE_LAYERS)
def test_upcycled_layer_equals_the_dense_ffn(make_layer):
    rng = np.random.default_rng(0)
    tokens = tf.constant(rng.normal(size=(2, 10, 5)).astype(np.float32))
    layer = make_layer()
    if layer.expert_type == "glu":
        gate, up = keras.layers.Dense(6, use_bias=False), keras.layers.Dense(
            6, use_bias=False)
        down = keras.layers.Dense(5, use_bias=False)
        dense = down(keras.activations.silu(gate(tokens)) * up(tokens))
        weights = (gate.kernel, up.kernel, down.kernel)
    else:
        first = keras.layers.Dense(6, activation="relu",
                                   bias_initializer="random_normal")
        second = keras.layers.Dense(5, bias_initializer="random_normal")
        dense = second(first(tokens))
        weights = (first.kernel, first.bias, second.kernel, second.bias)
    layer.build(tokens.shape)
    assert tf_moe.upcycle(layer, *weights) is layer
    np.testing.assert_allclose(layer(tokens), dense, rtol=1e-5, atol=1e-5)


def test_upcycle_refuses_what_it_cannot_copy():
    layer = tf_moe.MoE(4, 6, k=2)
    with pytest.raises(ValueError, match="built"):
        tf_moe.upcycle(layer, np.zeros((5, 6)), np.zeros(6), np.zeros((6, 5)),
                       np.zeros(5))
    layer.build((None, 5))
    with pytest.raises(ValueError, match="takes 4 arrays"):
        tf_moe.upcycle(layer, np.zeros((5, 6)))
    with pytest.raises(ValueError, match="kernel_out"):
        tf_moe.upcycle(layer, np.zeros((5, 6)), np.zeros(6), np.zeros((5, 5)),
                       np.zeros(5))
    shared = tf_moe.MoE(4, 6, k=2, num_shared_experts=1)
    shared.build((None, 5))
    with pytest.raises(ValueError, match="shared experts"):
        tf_moe.upcycle(shared, np.zeros((5, 6)), np.zeros(6),
                       np.zeros((6, 5)), np.zeros(5))


@pytest.mark.parametrize("kwargs, argument", [
    (dict(gating="top_k", balancing="nope"), "balancing"),
    (dict(gating="batchwise", balancing="bias"), "balancing"),
    (dict(gating="noisy_top_k", balancing="bias"), "balancing"),
    (dict(gating="expert_choice", balancing="switch"), "balancing"),
    (dict(gating="top_k", bias_update_rate=-1.0), "bias_update_rate"),
    (dict(gating="top_k", aux_loss_weight=-0.1), "aux_loss_weight"),
    (dict(router_z_loss_weight=-1e-3), "router_z_loss_weight"),
    (dict(router_jitter=-0.1), "router_jitter"),
    (dict(router_jitter=1.0), "router_jitter"),
    (dict(expert_type="moe"), "expert_type"),
    (dict(expert_type="glu", activation="no_such_activation"), "activation"),
    (dict(expert_type="glu", activation=3), "activation"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(num_shared_experts=1, shared_hidden_size=0), "shared_hidden_size"),
])
def test_bad_router_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tf_moe.MoE(4, 8, k=2, **kwargs)


def test_expert_choice_is_refused_by_the_hierarchical_layer():
    with pytest.raises(ValueError, match="gating='expert_choice'"):
        tf_moe.HierarchicalMoE(2, 2, 4, gating="expert_choice")


def test_defaults_are_the_papers():
    layer = tf_moe.MoE(4, 8)
    assert (layer.gating, layer.balancing, layer.expert_type) == (
        "noisy_top_k", "paper", "ffn")
    assert layer.activation is keras.activations.relu
    assert tf_moe.MoE(4, 8, gating="top_k").balancing == "switch"
    assert tf_moe.MoE(4, 8, gating="expert_choice").balancing == "none"
    assert tf_moe.MoE(4, 8, expert_type="glu").activation is (
        keras.activations.silu)


GATINGS = ["noisy_top_k", "top_k", "batchwise", "expert_choice"]


@pytest.mark.parametrize("gating", GATINGS)
def test_every_gating_trains_the_quickstart_task_and_reports_balance(gating):
    from trainers import quickstart
    keras.utils.set_random_seed(0)
    train_x, train_y = quickstart.make_task(1024, 0, sample_seed=1)
    model, moe = quickstart.build_model(8, 2, 0, gating=gating,
                                        router_z_loss_weight=1e-3)
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    logs = model.fit(train_x, train_y, batch_size=128, epochs=4,
                     verbose=0).history
    assert logs["loss"][-1] < 0.8 * logs["loss"][0], logs["loss"]
    for metric in ("load_cv", "importance_cv", "z_loss"):
        assert np.all(np.isfinite(logs[f"moe_{metric}"])), metric
    # Balance that a user can read: no expert far above its share.
    assert logs["moe_load_max_over_mean"][-1] < 4.0
