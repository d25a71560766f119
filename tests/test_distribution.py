"""The execution strategies on their own, and the gate interface."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import tf_moe
from tf_moe import distribution
from tf_moe import sharding


def _mesh_strategy(spec="batch:2,expert:4"):
    mesh = sharding.make_mesh(spec)
    axes = list(mesh.dim_names)
    placement = sharding.MeshPlacement(mesh, batch_axis=axes[0],
                                       expert_axis=axes[-1])
    return distribution.Mesh(placement), placement


def test_strategy_is_chosen_at_build():
    assert isinstance(distribution.strategy_at_build(), distribution.Replicas)
    _, placement = _mesh_strategy()
    with placement.scope():
        strategy = distribution.strategy_at_build()
        layer = tf_moe.MoE(8, 4, k=2)
        layer.build((None, 3))
    assert isinstance(strategy, distribution.Mesh)
    assert isinstance(layer.strategy, distribution.Mesh)
    assert isinstance(layer.experts.strategy, distribution.Mesh)
    assert isinstance(layer.gate.strategy, distribution.Mesh)


def test_one_device():
    strategy = distribution.OneDevice()
    x = tf.reshape(tf.range(12.0), [6, 2])
    shards = strategy.shard_tokens(x)
    assert shards.shape == (1, 6, 2)
    np.testing.assert_array_equal(strategy.merge_shards(shards), x)
    assert strategy.shard_tokens(None) is None
    values = [tf.ones([3])]
    assert strategy.sum_over_replicas(values) is values
    assert strategy.capacity_factor(None) is None
    assert strategy.capacity_factor(1.5) == 1.5
    assert int(strategy.fit_capacity(None, tf.constant(7))) == 7
    assert int(strategy.fit_capacity(5, tf.constant(7))) == 5
    assert strategy.batchwise_bounds(10, 4, 2) == (None, None)
    assert strategy.compiles_experts and not strategy.static_shapes


def test_replicas_sum_statistics_over_replicas():
    strategy = tf.distribute.MirroredStrategy(
        [f"/CPU:{i}" for i in range(4)],
        cross_device_ops=tf.distribute.ReductionToOneDevice())
    replicas = distribution.Replicas()

    @tf.function
    def run():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return replicas.sum_over_replicas(
                [tf.cast(replica, tf.float32) * tf.ones([2])])[0]
        return strategy.run(replica_fn)

    for value in strategy.experimental_local_results(run()):
        np.testing.assert_array_equal(value, [6.0, 6.0])  # 0 + 1 + 2 + 3
    # Off any replica context: the identity.
    values = [tf.ones([2])]
    assert replicas.sum_over_replicas(values) is values


def test_mesh_strategy_shards_tokens_and_moves_buffers():
    strategy, placement = _mesh_strategy()
    assert strategy.num_token_shards == 2 and strategy.static_shapes
    assert not strategy.compiles_experts
    assert strategy.capacity_factor(None) == placement.capacity_factor
    assert strategy.capacity_factor(1.5) == 1.5
    assert strategy.fit_capacity(5, tf.constant(7)) == 5
    # ceil(2 * 10 / 4) rows per expert, and at most min(E, 2k) slots.
    assert strategy.batchwise_bounds(10, 4, 2) == (5, 4)
    with placement.scope():
        x = placement.shard_batch(np.arange(16.0).reshape(8, 2))
        shards = strategy.shard_tokens(x)
        assert shards.shape == (2, 4, 2)
        assert dtensor.fetch_layout(shards).sharding_specs[0] == "batch"
        np.testing.assert_array_equal(
            sharding.to_numpy(strategy.merge_shards(shards)),
            np.arange(16.0).reshape(8, 2))
        buffers = strategy.to_experts(placement.to_mesh(tf.zeros([2, 8, 3, 2])))
        assert list(dtensor.fetch_layout(buffers).sharding_specs) == [
            "batch", "expert", dtensor.UNSHARDED, dtensor.UNSHARDED]
        back = strategy.from_experts(buffers)
        assert dtensor.fetch_layout(back).sharding_specs[1] == (
            dtensor.UNSHARDED)
        with pytest.raises(ValueError, match="number of tokens of 7"):
            strategy.shard_tokens(placement.to_mesh(tf.zeros([7, 2])))


def test_mesh_noise_equals_one_device_noise():
    strategy, placement = _mesh_strategy()
    with placement.scope():
        noise = strategy.normal([6, 5], "float32",
                                keras.random.SeedGenerator(3))
        assert all(spec == dtensor.UNSHARDED
                   for spec in dtensor.fetch_layout(noise).sharding_specs)
        noise = sharding.to_numpy(noise)
    want = distribution.OneDevice().normal([6, 5], "float32",
                                           keras.random.SeedGenerator(3))
    np.testing.assert_array_equal(noise, want.numpy())


def test_one_device_mesh_compiles_experts():
    mesh = sharding.make_mesh("devices:1", devices=["CPU:0"])
    placement = sharding.MeshPlacement(mesh, batch_axis="devices",
                                       expert_axis="devices")
    assert distribution.Mesh(placement).compiles_experts


@pytest.mark.parametrize("gate", [
    tf_moe.NoisyTopKGate(6, 2, kernel_initializer="random_normal"),
    tf_moe.NoisyTopKGate(6, 2, noisy_gating=False,
                         kernel_initializer="random_normal"),
    tf_moe.BatchwiseGate(6, 2, kernel_initializer="random_normal"),
])
def test_gate_interface(gate):
    """`call` is `route` on the logits of `kernel`, for every gate; invalid
    rows get no weight and count in no statistic."""
    tokens = tf.random.normal((10, 4), seed=1)
    valid = tf.constant([True] * 7 + [False] * 3)
    output = gate(tokens, token_mask=valid)
    assert gate.kernel.shape[:-1] == (4,)
    routing = gate.route(tf.matmul(tokens, gate.kernel), valid)
    np.testing.assert_array_equal(output.expert_ids, routing.expert_ids)
    np.testing.assert_allclose(output.gate_weights, routing.gate_weights)
    np.testing.assert_array_equal(output.gate_weights.numpy()[7:], 0.0)
    np.testing.assert_allclose(
        output.importance,
        tf_moe.importance(routing.expert_ids, routing.gate_weights, 6))
    if routing.selection_probability is not None:
        np.testing.assert_array_equal(
            routing.selection_probability.numpy()[7:], 0.0)
        np.testing.assert_allclose(
            output.load, tf.reduce_sum(routing.selection_probability, 0))
    else:
        assert output.load is None
