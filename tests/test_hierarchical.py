"""HierarchicalMoE: fast path against the dense reference, Importance_H and
Load_H by hand, empty groups, batchwise gating, bad arguments, and a layer of
65,536 experts."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import norm

import tf_moe
from moe_reference import dense_hierarchical_moe


def _layer(num_groups=4, experts_per_group=3, hidden_size=6, **kwargs):
    # Random gate kernels make routing depend on the token at inference.
    kwargs.setdefault("gate_initializer",
                      keras.initializers.RandomNormal(stddev=1.0, seed=11))
    kwargs.setdefault("bias_initializer",
                      keras.initializers.RandomNormal(stddev=0.1, seed=12))
    return tf_moe.HierarchicalMoE(num_groups, experts_per_group, hidden_size,
                                  **kwargs)


CASES = [
    # (groups, experts per group, k_primary, k_secondary, shape, masked, noisy)
    (4, 3, 2, 2, (12, 5), False, True),
    (4, 3, 2, 2, (3, 7, 5), True, True),
    (8, 4, 1, 3, (2, 9, 5), False, False),
    (3, 5, 3, 1, (4, 6, 5), True, True),
    (1, 6, 1, 2, (10, 5), False, True),
    (6, 1, 2, 1, (10, 5), True, False),
]


@pytest.mark.parametrize("overflow_expert_cost", [None, 0])
@pytest.mark.parametrize(
    "groups, per_group, k1, k2, shape, masked, noisy", CASES)
def test_matches_dense_reference(groups, per_group, k1, k2, shape, masked,
                                 noisy, overflow_expert_cost, monkeypatch):
    if overflow_expert_cost is not None:
        # Free overflow experts: the plans split into two buffer groups.
        monkeypatch.setattr(tf_moe.plan, "OVERFLOW_EXPERT_COST",
                            overflow_expert_cost)
    rng = np.random.default_rng(groups * 10 + per_group)
    inputs = tf.constant(rng.normal(size=shape).astype(np.float32))
    mask = rng.random(shape[:-1]) < 0.7 if masked else None
    mask_tensor = None if mask is None else tf.constant(mask)
    layer = _layer(groups, per_group, k_primary=k1, k_secondary=k2,
                   output_size=3, noisy_gating=noisy)
    layer.build(inputs.shape)
    cotangent = tf.constant(
        rng.normal(size=shape[:-1] + (3,)).astype(np.float32))

    def objective(fn):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs, importance, load = fn()
            value = tf.reduce_sum(outputs * cotangent)
            # The losses' gradients are checked too.
            value += tf.reduce_sum(importance * np.arange(groups * per_group))
            if load is not None:
                value += tf.reduce_sum(load * np.cos(
                    np.arange(groups * per_group)))
        sources = [inputs] + layer.trainable_variables
        grads = tape.gradient(value, sources)
        return (outputs, importance, load), [
            np.zeros(s.shape) if g is None else tf.convert_to_tensor(g)
            for s, g in zip(sources, grads)]

    def fast():
        tokens = tf.reshape(inputs, [-1, shape[-1]])
        token_mask = None if mask is None else tf.reshape(mask_tensor, [-1])
        gate, _ = layer._route(tokens, token_mask, training=False)
        return (layer(inputs, mask=mask_tensor), gate.importance, gate.load)

    (fast_out, fast_imp, fast_load), fast_grads = objective(fast)
    (slow_out, slow_imp, slow_load), slow_grads = objective(
        lambda: dense_hierarchical_moe(layer, inputs, mask))
    np.testing.assert_allclose(fast_out.numpy(), slow_out.numpy(), atol=1e-5,
                               rtol=1e-5)
    np.testing.assert_allclose(fast_imp.numpy(), slow_imp.numpy(), atol=1e-5,
                               rtol=1e-5)
    assert (fast_load is None) == (not noisy)
    if noisy:
        np.testing.assert_allclose(fast_load.numpy(), slow_load.numpy(),
                                   atol=1e-5, rtol=1e-5)
    for name, fast_grad, slow_grad in zip(
            ["inputs"] + [v.path for v in layer.trainable_variables],
            fast_grads, slow_grads):
        np.testing.assert_allclose(np.asarray(fast_grad),
                                   np.asarray(slow_grad), atol=1e-5,
                                   rtol=1e-5, err_msg=name)
    if mask is not None:
        assert np.all(fast_out.numpy()[~mask] == 0.0)
    assert np.abs(np.asarray(fast_grads[0])).max() > 1e-3
    counts = layer.expert_token_counts.numpy()
    real_tokens = np.prod(shape[:-1]) if mask is None else mask.sum()
    assert counts.sum() == real_tokens * k1 * k2


def test_importance_and_load_by_hand():
    """Three groups of two experts, k_primary=2, k_secondary=1, d=2.

    Group 2's logit is far below the others for every token, so no token
    reaches it: its Load_H is Load_primary[2] * k2 / B.
    """
    tokens = np.array([[1.0, 0.5], [-0.5, 1.0], [1.2, 0.4]], np.float32)
    w_primary = np.array([[1.0, -0.5, -20.0], [0.2, 0.7, -20.0]], np.float32)
    w_primary_noise = np.array([[0.3, -0.2, 0.1], [0.5, 0.1, -0.4]],
                               np.float32)
    w_secondary = np.array([[[0.5, -0.5], [1.0, 0.2]],
                            [[-0.3, 0.8], [0.4, -0.6]],
                            [[0.1, 0.2], [0.3, 0.4]]], np.float32)
    w_secondary_noise = np.array([[[0.2, 0.1], [-0.3, 0.4]],
                                  [[0.0, -0.5], [0.6, 0.2]],
                                  [[0.1, 0.1], [0.1, 0.1]]], np.float32)
    layer = tf_moe.HierarchicalMoE(3, 2, 4, k_primary=2, k_secondary=1,
                                   importance_weight=0.3, load_weight=0.2)
    layer.build((None, 2))
    layer.primary_gate.gate_kernel.assign(w_primary)
    layer.primary_gate.noise_kernel.assign(w_primary_noise)
    layer.secondary_gate.gate_kernel.assign(w_secondary)
    layer.secondary_gate.noise_kernel.assign(w_secondary_noise)

    def softplus(x):
        return np.log1p(np.exp(x))

    # Primary: both of the two strong groups, weights a softmax over them.
    logits = tokens @ w_primary
    stddev = softplus(tokens @ w_primary_noise) + 1e-2
    importance = np.zeros((3, 2))
    group_load = np.zeros((3, 2))
    group_tokens = np.zeros(3)
    primary_load = np.zeros(3)
    for x, row, scale in zip(tokens, logits, stddev):
        top = np.argsort(-row)[:2]
        weights = np.exp(row[top]) / np.exp(row[top]).sum()
        ordered = np.sort(row)[::-1]
        for i in range(3):
            # kth_excluding(k=2, i): the 3rd largest if i is in the top 2,
            # else the 2nd largest.
            kth = ordered[2] if i in top else ordered[1]
            primary_load[i] += norm.cdf((row[i] - kth) / scale[i])
        for group, weight in zip(top, weights):
            secondary = x @ w_secondary[group]
            scale2 = softplus(x @ w_secondary_noise[group]) + 1e-2
            chosen = np.argmax(secondary)
            importance[group, chosen] += weight  # k2 = 1: G_i(x) is one-hot
            group_tokens[group] += 1
            for j in range(2):
                # k = 1 of 2: kth_excluding is the other expert's logit.
                group_load[group, j] += norm.cdf(
                    (secondary[j] - secondary[1 - j]) / scale2[j])
    assert group_tokens[2] == 0
    load = np.zeros((3, 2))
    for i in range(3):
        load[i] = (primary_load[i] * group_load[i] / group_tokens[i]
                   if group_tokens[i] else primary_load[i] * 1 / 2)

    gate, _ = layer._route(tf.constant(tokens), None, training=False)
    np.testing.assert_allclose(gate.importance.numpy(), importance.ravel(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gate.load.numpy(), load.ravel(), rtol=1e-5,
                               atol=1e-6)
    layer(tf.constant(tokens))

    def cv2(v):
        return v.var() / v.mean() ** 2

    (loss,) = layer.losses
    assert loss.numpy() == pytest.approx(
        0.3 * cv2(importance.ravel()) + 0.2 * cv2(load.ravel()), rel=1e-5)


def test_empty_group_gives_finite_loss_and_gradients():
    layer = _layer(4, 3)
    layer.build((None, 5))
    kernel = layer.primary_gate.gate_kernel.numpy()
    kernel[:, 3] = -50.0  # group 3 never chosen
    layer.primary_gate.gate_kernel.assign(kernel)
    inputs = tf.abs(tf.random.normal((16, 5)))
    with tf.GradientTape() as tape:
        layer(inputs, training=True)
        loss = layer.losses[0]
    grads = tape.gradient(loss, layer.trainable_variables)
    assert layer.expert_token_counts.numpy()[9:].sum() == 0
    assert np.isfinite(loss.numpy()) and loss.numpy() > 0
    for grad in grads:
        if grad is not None:
            assert np.all(np.isfinite(tf.convert_to_tensor(grad).numpy()))


def test_batchwise_training_balances_groups_and_experts_exactly():
    layer = _layer(4, 3, gating="batchwise")
    inputs = tf.random.normal((5, 8, 5))
    mask = np.random.default_rng(3).random((5, 8)) < 0.8
    layer(inputs, training=True, mask=tf.constant(mask))
    real = int(mask.sum())
    per_group = int(np.ceil(2 * real / 4))          # m1, k_primary = 2
    per_expert = int(np.ceil(2 * per_group / 3))    # m2, k_secondary = 2
    np.testing.assert_array_equal(layer.expert_token_counts.numpy(),
                                  np.full(12, per_expert))
    # At inference the thresholds route: no batch statistics, any batch.
    single = layer(inputs[:1, :1], training=False)
    assert single.shape == (1, 1, 5)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(num_groups=0, experts_per_group=2, hidden_size=4), "num_groups"),
    (dict(num_groups=2, experts_per_group=0, hidden_size=4),
     "experts_per_group"),
    (dict(num_groups=2, experts_per_group=2, hidden_size=4, k_primary=3),
     "k_primary"),
    (dict(num_groups=2, experts_per_group=2, hidden_size=4, k_secondary=3),
     "k_secondary"),
    (dict(num_groups=2, experts_per_group=2, hidden_size=4, k_primary=0),
     "k_primary"),
    (dict(num_groups=2, experts_per_group=2, hidden_size=0), "hidden_size"),
    (dict(num_groups=2, experts_per_group=2, hidden_size=4,
          gating="expert_choice"), "gating"),
    (dict(num_groups=2, experts_per_group=2, hidden_size=4,
          capacity_factor=0), "capacity_factor"),
])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tf_moe.HierarchicalMoE(**kwargs)


def test_65536_experts_build_train_and_export(tmp_path):
    """256 groups x 256 experts, d = h = 16: 65,536 experts, 2.2M weights.

    Per token it runs 4 experts and 256 + 2 * 256 gate logits; the step
    never touches a [tokens, 65536] tensor.
    """
    moe = tf_moe.HierarchicalMoE(256, 256, 16, seed=0)
    model = keras.Sequential([keras.Input((None, 16)), moe,
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mse"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16, 16)).astype(np.float32)
    y = np.sin(x.sum(-1, keepdims=True)).astype(np.float32)
    logs = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    assert moe.num_experts == 65536
    assert moe.experts.kernel_in.shape == (65536, 16, 16)
    assert all(np.isfinite(logs["loss"]))
    # The loss is mostly the balancing terms: 2,048 assignments cannot
    # balance 65,536 experts. The fit itself improves.
    assert logs["mse"][-1] < logs["mse"][0]
    assert moe.expert_token_counts.numpy().sum() == 32 * 16 * 4
    export_dir = str(tmp_path / "export")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    np.testing.assert_allclose(served.serve(tf.constant(x[:2])).numpy(),
                               model.predict(x[:2], verbose=0), atol=1e-5)


def test_dropped_fraction_counts_tokens_dropped_by_full_groups():
    # Both groups chosen by every token (k_primary = groups = 2), group
    # capacity ceil(0.5 * 2 * 10 / 2) = 5 of the 10 tokens each: 10 of 20
    # assignments are lost before the experts, whose capacity (3) may drop
    # more.
    layer = _layer(2, 2, k_primary=2, k_secondary=1, capacity_factor=0.5)
    layer(tf.random.normal((10, 5)))
    counts = layer.expert_token_counts.numpy()
    assert counts.sum() == 10
    expert_capacity = tf_moe.plan.fixed_capacity(10, 4, 2, 0.5)
    expected = (10 + np.maximum(counts - expert_capacity, 0).sum()) / 20
    dropped = layer._metric_trackers["dropped_fraction"].result().numpy()
    assert dropped == pytest.approx(expected)
    assert dropped >= 0.5
