"""MoE on a DTensor mesh and under tf.distribute, against one device.

tests/conftest.py splits the CPU into 8 logical devices.
"""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import serving
import tf_moe
from tf_moe import sharding
from tf_moe import plan as plan_lib

NUM_EXPERTS = 8
WIDTH = 6


# The routers since 2017 on both layers ("moe_..." flat, "hmoe_..."
# hierarchical): softmax top-k with Switch balancing and the z-loss, glu
# and shared experts; bias balancing with router jitter.
ROUTER_KINDS = {
    "moe_top_k": dict(gating="top_k", expert_type="glu",
                      num_shared_experts=1, router_z_loss_weight=0.01),
    "moe_bias": dict(gating="top_k", balancing="bias", bias_update_rate=0.01,
                     router_jitter=0.1),
    "hmoe_top_k": dict(gating="top_k", expert_type="glu",
                       num_shared_experts=1, router_z_loss_weight=0.01),
}


def _mixture(kind, **kwargs):
    """8 experts, or 4 groups of 4 for "hmoe". capacity_factor 4 = E /
    (experts per token) (and groups / k_primary = 2 for the groups): a
    batch shard can never overflow a buffer, so the mesh keeps every token
    the dropless single-device layer keeps. (k >= 2 at every level: a
    top-1 softmax gives its gate no gradient, and Adam would scale float
    noise up to full steps.)"""
    kwargs.setdefault("capacity_factor", 4.0)
    kwargs = dict(ROUTER_KINDS.get(kind, {}), **kwargs)
    if kind.startswith("moe"):
        return tf_moe.MoE(NUM_EXPERTS, 16, **dict(dict(k=2), **kwargs))
    return tf_moe.HierarchicalMoE(4, 4, 16, k_primary=2, k_secondary=2,
                                  **kwargs)


def _model(kind="moe", **moe_kwargs):
    keras.utils.set_random_seed(7)
    return keras.Sequential([
        keras.Input((WIDTH,)),
        keras.layers.Dense(8),
        _mixture(kind, **moe_kwargs),
        keras.layers.Dense(1),
    ])


def _batch(num=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(num, WIDTH)).astype("float32"),
            rng.normal(size=(num, 1)).astype("float32"))


def _single_device_gradients(model, x, y):
    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            loss += tf.add_n(model.losses)
        return tape.gradient(loss, model.trainable_variables)

    return gradients()


def _single_device_steps(model, optimizer, x, y, steps):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            loss += tf.add_n(model.losses)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    return [float(step()) for _ in range(steps)]


def _mesh_model(spec, **kwargs):
    mesh = sharding.make_mesh(spec)
    axes = list(mesh.dim_names)
    placement = sharding.MeshPlacement(mesh, batch_axis=axes[0],
                                       expert_axis=axes[-1])
    with placement.scope():
        model = _model(**kwargs)
        optimizer = keras.optimizers.Adam(0.01)
    trainer = sharding.MeshTrainer(model, optimizer, "mse", placement)
    return model, optimizer, trainer, placement


# Every mesh form once for the flat layer (expert-only, 2-D, batch-only,
# one axis for both), the 2-D and one-axis forms for the hierarchical one.
@pytest.mark.parametrize("kind, spec", [
    ("moe", "batch:1,expert:8"), ("moe", "batch:2,expert:4"),
    ("moe", "batch:8,expert:1"), ("moe", "devices:8"),
    ("hmoe", "batch:2,expert:4"), ("hmoe", "devices:8"),
    ("moe_top_k", "batch:2,expert:4"), ("moe_bias", "batch:2,expert:4"),
    ("hmoe_top_k", "batch:2,expert:4")])
def test_mesh_step_equals_single_device(kind, spec):
    x, y = _batch()
    single = _model(kind)
    single_optimizer = keras.optimizers.Adam(0.01)
    model, _, trainer, placement = _mesh_model(spec, kind=kind)
    # Same weights, same routing (the noise is drawn whole on every device).
    sharding.set_weights(model, single.get_weights())

    # Gradients first (on both: each draws the gate noise once), then steps.
    with placement.scope():
        _, mesh_gradients = trainer._gradients(placement.shard_batch(x),
                                               placement.shard_batch(y))
    for got, want in zip(mesh_gradients,
                         _single_device_gradients(single, x, y)):
        np.testing.assert_allclose(sharding.to_numpy(got), want.numpy(),
                                   atol=1e-5)
    losses = [trainer.train_step(x, y) for _ in range(3)]
    np.testing.assert_allclose(
        losses, _single_device_steps(single, single_optimizer, x, y, 3),
        rtol=1e-5)
    for got, want in zip(model.weights, single.weights):
        np.testing.assert_allclose(sharding.to_numpy(got), want.numpy(),
                                   atol=1e-5, err_msg=want.path)


def _per_shard_objective(model, x, y, shards):
    """One device's equivalent of a mesh step with batchwise gating: every
    batch shard balances its own tokens, so the layer runs shard by shard;
    the MSE and the (per-token mean) threshold loss average over shards."""
    total = 0.0
    for xs, ys in zip(np.split(x, shards), np.split(y, shards)):
        total += (tf.reduce_mean(tf.square(model(xs, training=True) - ys))
                  + tf.add_n(model.losses))
    return total / shards


@pytest.mark.parametrize("kind, spec", [
    ("moe", "batch:2,expert:4"), ("moe", "devices:8"), ("hmoe", "devices:8")])
def test_batchwise_mesh_step_equals_one_device_shard_by_shard(kind, spec):
    # A random gate breaks no ties, so tie-breaking order does not matter;
    # k = E/2 (and 2 of 4 at each level) keeps every expert a token's
    # batchwise mask gives it on the mesh too (at most 2k, all E here).
    # The importance term is a global-batch CV^2 on the mesh: left out.
    kwargs = dict(gating="batchwise", importance_weight=0.0,
                  gate_initializer=keras.initializers.RandomNormal(
                      stddev=1.0, seed=3))
    if kind == "moe":
        kwargs["k"] = NUM_EXPERTS // 2
    x, y = _batch(num=32)
    single = _model(kind, **kwargs)
    model, _, trainer, placement = _mesh_model(spec, kind=kind, **kwargs)
    sharding.set_weights(model, single.get_weights())
    shards = placement.num_batch_shards

    @tf.function
    def single_gradients():
        with tf.GradientTape() as tape:
            loss = _per_shard_objective(single, x, y, shards)
        return loss, tape.gradient(loss, single.trainable_variables)

    with placement.scope():
        mesh_loss, mesh_gradients = trainer._gradients(
            placement.shard_batch(x), placement.shard_batch(y))
    want_loss, want_gradients = single_gradients()
    np.testing.assert_allclose(float(sharding.to_numpy(mesh_loss)),
                               float(want_loss), rtol=1e-5)
    for variable, got, want in zip(single.trainable_variables,
                                   mesh_gradients, want_gradients):
        np.testing.assert_allclose(sharding.to_numpy(got),
                                   tf.convert_to_tensor(want).numpy(),
                                   atol=1e-5, err_msg=variable.path)
    # Strictly balanced: every expert took the same tokens from every shard.
    counts = sharding.to_numpy(model.layers[1].expert_token_counts)
    assert np.all(counts == counts[0]) and counts[0] > 0, counts
    # At inference the thresholds route each token alone: any batch split.
    np.testing.assert_allclose(trainer.predict(x),
                               single(x, training=False).numpy(), atol=1e-5)


def test_expert_weights_and_optimizer_slots_are_sharded():
    model, optimizer, trainer, placement = _mesh_model("batch:2,expert:4")
    trainer.train_step(*_batch())
    experts = model.layers[1].experts
    expert_weights = [experts.kernel_in, experts.bias_in, experts.kernel_out,
                      experts.bias_out]
    slots = [s for s in optimizer.variables
             if "experts" in s.path and ("momentum" in s.path
                                         or "velocity" in s.path)]
    assert len(slots) == 2 * len(expert_weights)
    for variable in expert_weights + slots:
        layout = dtensor.fetch_layout(variable.value)
        assert layout.sharding_specs[0] == "expert", variable.path
        shards = dtensor.unpack(variable.value.read_value())
        assert len(shards) == 8
        for shard in shards:  # every device holds E/4 = 2 experts
            assert shard.shape == (NUM_EXPERTS // 4,) + variable.shape[1:]
    gate = model.layers[1].gate.gate_kernel
    assert all(spec == dtensor.UNSHARDED
               for spec in dtensor.fetch_layout(gate.value).sharding_specs)


def test_sharded_plan_equals_one_plan_per_shard(rng):
    for _ in range(10):
        shards, tokens, k, experts = (int(rng.integers(1, 4)),
                                      int(rng.integers(1, 30)),
                                      int(rng.integers(1, 4)), 6)
        ids = np.stack([[rng.choice(experts, k, replace=False)
                         for _ in range(tokens)] for _ in range(shards)])
        mask = rng.random((shards, tokens)) > 0.2
        capacity = int(rng.integers(1, 6))
        plan = plan_lib.make_dispatch_plan(ids, experts, capacity,
                                           token_mask=mask)
        dropped = 0
        for s in range(shards):
            flat = plan_lib.make_dispatch_plan(
                ids[s], experts, capacity=capacity, token_mask=mask[s])
            np.testing.assert_array_equal(plan.slot_buffer_row[s],
                                          flat.slot_buffer_row)
            np.testing.assert_array_equal(plan.buffer_slot[s],
                                          flat.buffer_slot)
            dropped += int(flat.num_dropped)
        assert int(plan.num_dropped) == dropped


def test_mesh_errors_name_the_problem():
    mesh = sharding.make_mesh("batch:2,expert:4")
    with pytest.raises(ValueError, match="`expert_axis` 'experts' is not"):
        sharding.MeshPlacement(mesh, expert_axis="experts")
    with pytest.raises(ValueError, match="has 6 devices but this job has 8"):
        sharding.make_mesh("batch:2,expert:3")
    with pytest.raises(ValueError, match="axis:size"):
        sharding.make_mesh("batch=2")
    placement = sharding.MeshPlacement(mesh)
    with placement.scope():
        with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
            tf_moe.MoE(6, 4, k=2).build((None, 3))
        with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
            tf_moe.HierarchicalMoE(2, 3, 4).build((None, 3))
    with pytest.raises(ValueError, match="batch of 5 is not divisible by the "
                                         "size 2 of mesh axis 'batch'"):
        placement.shard_batch(np.zeros((5, 3)))


def _reshard_mesh(spec, devices):
    mesh = sharding.make_mesh(spec, devices=[f"CPU:{i}" for i in devices])
    return sharding.MeshPlacement(mesh)


def test_checkpoint_reshards_across_meshes_and_to_one_device(tmp_path):
    x, y = _batch()
    model, optimizer, trainer, _ = _mesh_model("batch:2,expert:4")
    for _ in range(2):
        trainer.train_step(x, y)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).write(
        str(tmp_path / "mesh8"))
    expected = [sharding.to_numpy(v) for v in model.weights
                + optimizer.variables]

    def restored_values(placement):
        scope = placement.scope() if placement else contextlib.nullcontext()
        with scope:
            copy = _model()
            copy_optimizer = keras.optimizers.Adam(0.01)
        if placement:
            sharding.MeshTrainer(copy, copy_optimizer, "mse", placement)
        else:
            copy_optimizer.build(copy.trainable_variables)
        tf.train.Checkpoint(model=copy, optimizer=copy_optimizer).read(
            path).assert_consumed()
        return copy, [sharding.to_numpy(v)
                      for v in copy.weights + copy_optimizer.variables]

    for placement in (_reshard_mesh("batch:2,expert:2", range(4)),
                      _reshard_mesh("batch:1,expert:2", range(2)), None):
        _, values = restored_values(placement)
        for got, want in zip(values, expected):
            np.testing.assert_allclose(got, want, atol=0)

    # A single-device checkpoint onto a mesh.
    single = _model()
    single_optimizer = keras.optimizers.Adam(0.01)
    _single_device_steps(single, single_optimizer, x, y, 1)
    path = tf.train.Checkpoint(model=single, optimizer=single_optimizer).write(
        str(tmp_path / "single"))
    expected = [v.numpy() for v in single.weights + single_optimizer.variables]
    _, values = restored_values(_reshard_mesh("batch:2,expert:2", range(4)))
    for got, want in zip(values, expected):
        np.testing.assert_allclose(got, want, atol=0)


def test_mesh_model_exports_and_serves_on_one_device(tmp_path):
    x, y = _batch()
    model, _, trainer, _ = _mesh_model("devices:8")
    trainer.train_step(x, y)
    single = sharding.to_single_device(model)
    assert all(not isinstance(v.value, dtensor.DVariable)
               for v in single.weights)
    export_dir = str(tmp_path / "export")
    single.export(export_dir, verbose=False)
    stdout = serving.serve_in_fresh_process(
        export_dir, x[:4], single.predict(x[:4], verbose=0), tmp_path)
    assert "served (4, 1)" in stdout


def _mirrored():
    # Reductions through one device rather than collective ops: collective
    # group keys are process-wide, and the DTensor meshes of the tests
    # above have taken some with other group sizes.
    return tf.distribute.MirroredStrategy(
        [f"/CPU:{i}" for i in range(4)],
        cross_device_ops=tf.distribute.ReductionToOneDevice())


# The hierarchical layer's all-reduced balancing terms are checked on their
# own below (test_mirrored_balancing_losses_equal_single_device[hmoe]).
@pytest.mark.parametrize("kind", ["moe", "moe_top_k", "hmoe_top_k"])
def test_mirrored_fit_equals_single_device_fit(kind):
    # Without noise the routing is deterministic, so replicas (4 tokens
    # each) and one device (16) route alike; the importance loss needs the
    # all-reduced Importance to match.
    x, y = _batch(num=64)

    def fitted(strategy):
        with strategy.scope():
            model = _model(kind, capacity_factor=None, noisy_gating=False,
                           importance_weight=1.0)
            model.compile(keras.optimizers.Adam(0.01), "mse")
        history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                            verbose=0)
        return model, history.history

    single, single_logs = fitted(tf.distribute.get_strategy())
    mirrored, mirrored_logs = fitted(_mirrored())
    np.testing.assert_allclose(mirrored_logs["loss"], single_logs["loss"],
                               rtol=1e-5)
    for got, want in zip(mirrored.weights, single.weights):
        np.testing.assert_allclose(np.asarray(got.numpy()), want.numpy(),
                                   atol=1e-5, err_msg=want.path)


@pytest.mark.parametrize("kind", ["moe", "hmoe", "moe_top_k", "hmoe_top_k"])
def test_mirrored_balancing_losses_equal_single_device(kind):
    # Importance and Load (the hierarchical layer's |X_i| and Load_i too)
    # are all-reduced before their CV^2: each replica's add_loss term
    # equals the single-device loss on the global batch.
    x, _ = _batch(num=16)
    model = _model(kind, capacity_factor=None)
    model(x)
    want = float(tf.add_n(model.losses))
    strategy = _mirrored()
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(16))

    @tf.function
    def replica_losses(batch):
        def run(tokens):
            model(tokens)
            return tf.add_n(model.losses)
        return strategy.run(run, args=(batch,))

    losses = strategy.experimental_local_results(
        replica_losses(next(iter(dataset))))
    assert len(losses) == 4
    for loss in losses:
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert want > 1e-4  # the check is not vacuous


def test_batchwise_layers_fit_under_collective_mirrored(tmp_path):
    # Collective all-reduce (MirroredStrategy's default on CPUs) in a fresh
    # process: group keys are process-wide, and this file's meshes hold
    # some. Batchwise gating balances each replica's own (masked) tokens.
    script = textwrap.dedent("""
        import numpy as np
        import tensorflow as tf
        from tf_moe import sharding
        sharding.configure_logical_cpus(4)
        import keras
        import tf_moe
        strategy = tf.distribute.MirroredStrategy(
            [f"/CPU:{i}" for i in range(4)])
        assert "Collective" in type(strategy.extended._cross_device_ops).__name__
        rng = np.random.default_rng(0)
        lengths = rng.integers(0, 11, size=(64, 1))
        x = np.where(np.arange(10) < lengths, rng.integers(1, 50, (64, 10)), 0)
        y = rng.normal(size=(64, 10, 1)).astype("float32")
        for layer in (tf_moe.MoE(8, 16, k=2, gating="batchwise"),
                      tf_moe.HierarchicalMoE(4, 2, 16, k_primary=2,
                                             k_secondary=1,
                                             gating="batchwise")):
            with strategy.scope():
                model = keras.Sequential([
                    keras.Input((10,), dtype="int32"),
                    keras.layers.Embedding(50, 8, mask_zero=True), layer,
                    keras.layers.Dense(1)])
                model.compile(keras.optimizers.Adam(0.01), "mse")
            losses = model.fit(x, y, batch_size=16, epochs=2,
                               verbose=0).history["loss"]
            assert np.all(np.isfinite(losses)), losses
            print(layer.name, "fit", losses)
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            cwd=str(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" fit [") == 2, result.stdout


def _free_ports(count):
    import socket
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_clients_end_with_the_weights_of_one_process(tmp_path):
    # Two processes on 127.0.0.1 stand for two hosts, 4 devices each.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "trainers.mesh_demo",
               "--mesh=batch:2,expert:4", "--steps=3"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    one = subprocess.run(
        command + ["--local_devices=8", f"--output={tmp_path / 'one.npz'}"],
        env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    jobs = ",".join(f"localhost:{port}" for port in _free_ports(2))
    clients = [subprocess.Popen(
        command + ["--local_devices=4", f"--output={tmp_path / 'two.npz'}"],
        env=dict(env, DTENSOR_CLIENT_ID=str(client), DTENSOR_NUM_CLIENTS="2",
                 DTENSOR_JOB_NAME="worker", DTENSOR_JOBS=jobs),
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for client in range(2)]
    outputs = [client.communicate(timeout=300) for client in clients]
    for client, (stdout, stderr) in zip(clients, outputs):
        assert client.returncode == 0, stderr[-3000:]
        assert "step 2 loss" in stdout
    one_losses = [line.split()[-1] for line in one.stdout.splitlines()
                  if " loss " in line]
    two_losses = [line.split()[-1] for line in outputs[1][0].splitlines()
                  if " loss " in line]
    np.testing.assert_allclose(np.array(two_losses, float),
                               np.array(one_losses, float), rtol=1e-5)
    single, multi = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(single.files) == sorted(multi.files)
    for name in single.files:
        np.testing.assert_allclose(multi[name], single[name], atol=1e-5,
                                   err_msg=name)


_WORKER_SCRIPT = """
import json, os
import numpy as np
import tensorflow as tf
import keras
import tf_moe
strategy = tf.distribute.MultiWorkerMirroredStrategy()
data = np.load("batch.npz")
x, y = data["x"], data["y"]
with strategy.scope():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((x.shape[1],)), keras.layers.Dense(8),
        tf_moe.MoE(8, 16, k=2, noisy_gating=False, importance_weight=1.0),
        keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(0.01)
batches = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices((x, y)).batch(16))

@tf.function
def train_step(batch):
    def replica_step(inputs, targets):
        with tf.GradientTape() as tape:
            squares = tf.square(model(inputs, training=True) - targets)
            # This replica's share: its examples over the global batch,
            # and the (all-reduced, replica-equal) balancing loss over the
            # replicas; the optimizer sums the replicas' gradients.
            loss = (tf.reduce_sum(squares) / 16
                    + tf.add_n(model.losses) / strategy.num_replicas_in_sync)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
    strategy.run(replica_step, args=batch)

for batch in batches:
    train_step(batch)
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
np.savez(f"worker{task}.npz", *[w.numpy() for w in model.weights])
"""


def test_multi_worker_training_equals_single_device(tmp_path):
    # Two processes on 127.0.0.1 stand for two hosts of a
    # MultiWorkerMirroredStrategy; the layers' all-reduces of Importance
    # then cross processes. A custom loop: Keras 3.15's fit fails under
    # this strategy before any layer runs (its symbolic build reduces a
    # PerReplica batch). Same model and global batches as the mirrored
    # test.
    x, y = _batch(num=64)
    np.savez(tmp_path / "batch.npz", x=x, y=y)
    # The workers build this model (the script stands alone).
    single = _model(capacity_factor=None, noisy_gating=False,
                    importance_weight=1.0)
    single.compile(keras.optimizers.Adam(0.01), "mse")
    single.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers},
                  "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config),
                   TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=repo + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        processes.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER_SCRIPT], env=env,
            cwd=str(tmp_path), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    for index in range(2):
        weights = np.load(tmp_path / f"worker{index}.npz")
        for i, want in enumerate(single.weights):
            np.testing.assert_allclose(weights[f"arr_{i}"], want.numpy(),
                                       atol=1e-5, err_msg=want.path)
