"""The noisy gate's fused math (tf_moe.fused_gate) against its plain ops,
and the layers on it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_moe
from tf_moe import fused_gate
from tf_moe import kernels
from tf_moe.top_k_gating import NoisyTopKGate

EPSILON = 1e-2


def _operands(rows, num_experts, seed=0):
    rng = np.random.default_rng(seed)
    logits = tf.constant(rng.normal(size=(rows, 2 * num_experts)),
                         tf.float32)
    noise = tf.constant(rng.normal(size=(rows, num_experts)), tf.float32)
    row_weights = tf.constant(
        (rng.uniform(size=(rows, 1)) < 0.8).astype(np.float32))
    return logits, noise, row_weights


def _cotangents(rows, num_experts, k):
    rng = np.random.default_rng(1)
    return (tf.constant(rng.normal(size=(rows, k + 1)), tf.float32),
            tf.constant(rng.normal(size=(rows, num_experts)), tf.float32))


def _values_and_gradient(math, logits, noise, row_weights, k,
                         cotangents=None):
    """`(top_values, top_ids, probability, d loss / d logits)` for a loss
    with random weights (`cotangents`) on the top values and on P."""
    top_cotangent, probability_cotangent = cotangents or _cotangents(
        *noise.shape, k)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        top_values, top_ids, probability = math(logits, noise, row_weights,
                                                k, EPSILON)
        loss = (tf.reduce_sum(top_values * top_cotangent)
                + tf.reduce_sum(probability * probability_cotangent))
    return top_values, top_ids, probability, tape.gradient(loss, logits)


def _assert_same(fused, plain):
    top_values, top_ids, probability, gradient = fused
    np.testing.assert_array_equal(top_ids, plain[1])
    np.testing.assert_allclose(top_values, plain[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probability, plain[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gradient, plain[3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows,num_experts,k", [(37, 9, 2), (64, 4, 1),
                                                (16, 32, 4)])
def test_fused_math_matches_the_plain_ops(rows, num_experts, k):
    operands = _operands(rows, num_experts)
    plain = _values_and_gradient(NoisyTopKGate._noisy_top_k, *operands, k)
    # Masked rows: zero P and no gradient through P.
    assert np.all(plain[2].numpy()[operands[2].numpy()[:, 0] == 0] == 0)
    _assert_same(_values_and_gradient(fused_gate.noisy_top_k, *operands, k),
                 plain)


def test_rows_known_at_run_time_only_run_the_plain_ops(kernel_mode):
    kernel_mode("xla")
    gate = NoisyTopKGate(9, 2)
    gate.build((None, 4))

    @tf.function(input_signature=[tf.TensorSpec([None, 4])])
    def route(tokens):
        return gate(tokens, training=True).load

    assert route(tf.random.normal([37, 4])).shape == (9,)
    with pytest.raises(ValueError, match="static number of rows"):
        tf.function(fused_gate.noisy_top_k).get_concrete_function(
            tf.TensorSpec([None, 18]), tf.TensorSpec([None, 9]),
            tf.TensorSpec([None, 1]), 2, EPSILON)


def test_fused_math_refuses_k_of_every_expert():
    with pytest.raises(ValueError, match="`k` must be in"):
        fused_gate.noisy_top_k(*_operands(4, 3), 3, EPSILON)


def _train_call(layer_fn, kernel_mode, mode):
    kernel_mode(mode)
    keras.utils.set_random_seed(0)  # The same weights in every mode.
    layer = layer_fn()
    inputs = tf.constant(np.random.default_rng(2).normal(size=(48, 6)),
                         tf.float32)
    with tf.GradientTape() as tape:
        outputs = layer(inputs, training=True)
        loss = tf.reduce_sum(tf.square(outputs)) + tf.add_n(layer.losses)
    gradients = tape.gradient(loss, layer.trainable_variables)
    return outputs, layer.losses[0], gradients


@pytest.mark.parametrize("layer_fn", [
    lambda: tf_moe.MoE(8, 5, k=2, seed=3, gate_initializer="glorot_uniform"),
    lambda: tf_moe.HierarchicalMoE(4, 3, 5, seed=3,
                                   gate_initializer="glorot_uniform"),
], ids=["flat", "hierarchical"])
def test_layers_train_the_same_on_the_fused_gate(kernel_mode, monkeypatch,
                                                layer_fn):
    calls = []
    fused_math = fused_gate.noisy_top_k

    def counted(*args):
        calls.append(args[0].shape)
        return fused_math(*args)

    monkeypatch.setattr(fused_gate, "noisy_top_k", counted)
    plain = _train_call(layer_fn, kernel_mode, "tensorflow")
    assert not calls
    fused = _train_call(layer_fn, kernel_mode, "xla")
    assert calls  # every level of gates

    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-4, atol=1e-6)
    for got, want in zip(fused[2], plain[2]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_auto_mode_times_the_gate_once_per_shape(kernel_mode):
    kernel_mode("auto")
    gate = NoisyTopKGate(6, 2)
    gate.build((None, 4))
    tokens = tf.random.normal([20, 4])
    for _ in range(2):
        gate(tokens, training=True)
    timed = [m for m in kernels.measurements()
             if m["product"] == "noisy_gate"]
    assert len(timed) == 1
    assert (timed[0]["rows"], timed[0]["experts"], timed[0]["k"]) == (20, 6, 2)
    assert set(timed[0]["seconds"]) == {"tensorflow", "xla"}
    assert timed[0]["chosen"] in ("tensorflow", "xla")
    # Not in training: no noise, nothing to choose.
    gate(tf.random.normal([30, 4]), training=False)
    assert len([m for m in kernels.measurements()
                if m["product"] == "noisy_gate"]) == 1


@pytest.mark.parametrize("mode,allow_xla,expected", [
    ("tensorflow", True, "tensorflow"), ("per_expert", True, "tensorflow"),
    ("xla", True, "xla"), ("xla", False, "tensorflow"),
    ("auto", False, "tensorflow")])
def test_forced_modes_choose_without_timing(kernel_mode, mode, allow_xla,
                                            expected):
    kernel_mode(mode)

    def make_candidates(rows):
        raise AssertionError("timed in a forced mode")

    shape = kernels.GateShape("noisy_gate", "CPU", 8, 4, 1)
    assert kernels.choose_gate(shape, make_candidates,
                               allow_xla=allow_xla) == expected
