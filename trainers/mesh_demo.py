"""Trains a small MoE model on a DTensor mesh, on one host or several.

One process with 8 logical CPUs:

    python -m trainers.mesh_demo --mesh=batch:2,expert:4 --local_devices=8

Two processes (hosts) with 4 each, the same program on every host; each
gets its client id and the list of every client's address:

    DTENSOR_CLIENT_ID=0 DTENSOR_NUM_CLIENTS=2 DTENSOR_JOB_NAME=worker \\
    DTENSOR_JOBS=host0:9991,host1:9991 \\
        python -m trainers.mesh_demo --mesh=batch:2,expert:4 --local_devices=4
    (and DTENSOR_CLIENT_ID=1 on host1)

Every client feeds the same global batches (here generated from a seed) and
keeps its devices' shards, so the weights end the same as on one host.
"""

import os
import sys

from absl import flags

from trainers.common import console

console.quiet_tensorflow(sys.argv)

_MESH = flags.DEFINE_string("mesh", "batch:2,expert:4",
                            "Mesh axes, axis:size pairs; the first axis is "
                            "the batch axis, the last the expert axis.")
_LOCAL_DEVICES = flags.DEFINE_integer(
    "local_devices", 8, "Logical CPU devices of this process.")
_STEPS = flags.DEFINE_integer("steps", 4, "Training steps.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Number of experts.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where client 0 writes the final weights (.npz).")


def main(argv):
    del argv
    import keras
    import numpy as np
    from tensorflow.experimental import dtensor

    import tf_moe
    from tf_moe import sharding

    if "DTENSOR_JOBS" in os.environ:
        sharding.initialize_multi_client(_LOCAL_DEVICES.value)
    else:
        sharding.configure_logical_cpus(_LOCAL_DEVICES.value)
    mesh = sharding.make_mesh(_MESH.value)
    axes = list(mesh.dim_names)
    placement = sharding.MeshPlacement(mesh, batch_axis=axes[0],
                                       expert_axis=axes[-1])
    width = 16
    with placement.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((width,)),
            keras.layers.Dense(width, activation="relu"),
            tf_moe.MoE(_EXPERTS.value, 32, k=2),
            keras.layers.Dense(1),
        ])
        optimizer = keras.optimizers.Adam(1e-2)
    trainer = sharding.MeshTrainer(model, optimizer, "mse", placement)

    rng = np.random.default_rng(0)
    client = dtensor.client_id()
    for step in range(_STEPS.value):
        x = rng.normal(size=(_BATCH.value, width)).astype("float32")
        y = np.sin(x.sum(axis=1, keepdims=True))
        loss = trainer.train_step(x, y)
        print(f"client {client} step {step} loss {loss:.6f}", flush=True)
    weights = {v.path: sharding.to_numpy(v) for v in model.weights}
    if _OUTPUT.value and client == 0:
        np.savez(_OUTPUT.value, **weights)


if __name__ == "__main__":
    console.run(main)
