"""Mesh overhead: an MoE training step on 1, 2, 4 and 8 logical CPU devices.

`--layer=hmoe` times `HierarchicalMoE` instead (`--groups` groups of
experts/groups experts, k per level).

Same model, same global batch; the single-device (no mesh) step is timed in
the same run. "step" is `MeshTrainer.train_step` (the batch sharded from
numpy, gradients, the optimizer update, the loss back to the host); "grad"
is the compiled forward + backward alone, on inputs already in place. Every mesh here uses one axis for both batch and experts (the
paper's layout: each device a data-parallel shard holding E/n experts), so
the relayout of the buffers is an all-to-all. The logical devices share
this machine's cores, so this measures what sharding costs, not a speed-up.
Per-device bytes are those of device 0's shards (parameters, and the Adam
slots).

`--kernels` sets the experts' kernel mode (`tf_moe.kernels.set_mode`) for
every row: "auto" lets the no-mesh layer choose the packed layout, which a
mesh (static buffer shapes) cannot run; "tensorflow" runs the padded
layout on TensorFlow's kernels everywhere, so the rows differ only by the
mesh. The JSON records what "auto" chose (`kernel_measurements`).

    python bench/bench_mesh.py [--output=bench/results/mesh.json]
    python bench/bench_mesh.py --layer=hmoe \
        --output=bench/results/mesh_hierarchical.json
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tf_moe import sharding  # noqa: E402

sharding.configure_logical_cpus(8)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

import tf_moe  # noqa: E402


def _model(args):
    keras.utils.set_random_seed(0)
    if args.layer == "moe":
        mixture = tf_moe.MoE(args.experts, args.hidden, k=args.k,
                             capacity_factor=2.0)
    else:
        mixture = tf_moe.HierarchicalMoE(
            args.groups, args.experts // args.groups, args.hidden,
            k_primary=args.k, k_secondary=args.k, capacity_factor=2.0)
    return keras.Sequential([
        keras.Input((args.model_dim,)), mixture, keras.layers.Dense(1)])


def _device_bytes(variables):
    total = 0
    for variable in variables:
        value = variable.value
        if isinstance(value, dtensor.DVariable):
            value = dtensor.unpack(value.read_value())[0]
        total += int(np.prod(value.shape)) * value.dtype.size
    return total


def _time(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _single_device(args, x, y):
    model = _model(args)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    x, y = tf.constant(x), tf.constant(y)

    @tf.function
    def loss_and_gradients(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            loss += tf.add_n(model.losses)
        return loss, tape.gradient(loss, model.trainable_variables)

    @tf.function
    def step(x, y):
        loss, gradients = loss_and_gradients(x, y)
        optimizer.apply(gradients, model.trainable_variables)
        return loss

    seconds = _time(lambda: float(step(x, y)), args.warmup, args.steps)
    gradient_seconds = _time(lambda: float(loss_and_gradients(x, y)[0]),
                             args.warmup, args.steps)
    return dict(devices="1 (no mesh)", step_seconds=seconds,
                gradient_seconds=gradient_seconds,
                parameter_bytes=_device_bytes(model.weights),
                optimizer_bytes=_device_bytes(optimizer.variables))


def _mesh(args, x, y, num_devices):
    mesh = sharding.make_mesh(
        f"devices:{num_devices}",
        devices=[f"CPU:{i}" for i in range(num_devices)])
    placement = sharding.MeshPlacement(mesh, batch_axis="devices",
                                       expert_axis="devices")
    with placement.scope():
        model = _model(args)
        optimizer = keras.optimizers.Adam(1e-3)
    trainer = sharding.MeshTrainer(model, optimizer, "mse", placement)
    seconds = _time(lambda: trainer.train_step(x, y), args.warmup, args.steps)
    with placement.scope():
        x, y = placement.shard_batch(x), placement.shard_batch(y)
        gradient_seconds = _time(
            lambda: float(sharding.to_numpy(trainer._gradients(x, y)[0])),
            args.warmup, args.steps)
    return dict(devices=str(num_devices), step_seconds=seconds,
                gradient_seconds=gradient_seconds,
                parameter_bytes=_device_bytes(model.weights),
                optimizer_bytes=_device_bytes(optimizer.variables))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=("moe", "hmoe"), default="moe")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8,
                        help="hmoe: groups (experts must divide by it)")
    parser.add_argument("--model_dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kernels", default="auto",
                        choices=tf_moe.kernels.MODES,
                        help="the experts' kernel mode for every row")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    tf_moe.kernels.set_mode(args.kernels)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.model_dim)).astype("float32")
    y = rng.normal(size=(args.batch, 1)).astype("float32")
    rows = [_single_device(args, x, y)]
    for n in (int(d) for d in args.devices.split(",")):
        rows.append(_mesh(args, x, y, n))
    base = rows[0]["step_seconds"]
    gradient_base = rows[0]["gradient_seconds"]
    layer = ("MoE" if args.layer == "moe" else
             f"HierarchicalMoE {args.groups} groups,")
    print(f"{layer} E={args.experts}, d={args.model_dim}, h={args.hidden}, "
          f"k={args.k}{' per level' if args.layer == 'hmoe' else ''}, "
          f"global batch {args.batch} tokens, {args.kernels} kernels")
    print(f"{'devices':>12} {'step s':>8} {'x 1 dev':>8} "
          f"{'grad s':>8} {'x 1 dev':>8} "
          f"{'param MB/dev':>13} {'Adam MB/dev':>12}")
    for row in rows:
        row["ratio_to_single_device"] = row["step_seconds"] / base
        row["gradient_ratio_to_single_device"] = (row["gradient_seconds"]
                                                  / gradient_base)
        print(f"{row['devices']:>12} {row['step_seconds']:8.3f} "
              f"{row['ratio_to_single_device']:8.2f} "
              f"{row['gradient_seconds']:8.3f} "
              f"{row['gradient_ratio_to_single_device']:8.2f} "
              f"{row['parameter_bytes'] / 2**20:13.2f} "
              f"{row['optimizer_bytes'] / 2**20:12.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(config=vars(args), rows=rows,
                           kernel_measurements=tf_moe.kernels.measurements()),
                      f, indent=2)


if __name__ == "__main__":
    main()
