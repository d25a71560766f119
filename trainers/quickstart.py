"""The quickstart job: a Keras model with a MoE layer, fit, inspect, export.

    python -m trainers.quickstart [--workdir=/tmp/tf_moe_quickstart]

Generates a regression task whose input space has several regions with a
different target function in each (the kind of task experts split between),
fits `Dense -> MoE -> Dense` with `model.fit`, prints the balancing metrics
and the per-expert load, exports a SavedModel and serves it back with plain
TensorFlow.
"""

import os
import sys

from absl import app
from absl import flags
import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from trainers.common import console  # noqa: E402

# Before TensorFlow is imported: its C++ log level is read then.
console.quiet_tensorflow(sys.argv)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_moe  # noqa: E402

_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/tf_moe_quickstart", "Where the SavedModel is written.")
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", 16, "Experts in the layer.")
_K = flags.DEFINE_integer("k", 2, "Experts per token.")
_GATING = flags.DEFINE_enum(
    "gating", "noisy_top_k", list(tf_moe.GATES),
    "The router (see the README's Routers section).")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Training epochs.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

_WIDTH = 16
_REGIONS = 8


def make_task(num_examples, seed, sample_seed):
    """Sequences of points; each point's target depends on its region.

    Args:
        num_examples: sequences to draw.
        seed: picks the task (regions and their target maps).
        sample_seed: picks the points drawn from it.

    Returns:
        `(inputs [n, 8, 16], targets [n, 8, 16])` float32 arrays.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(_REGIONS, _WIDTH)) * 2.0
    maps = rng.normal(size=(_REGIONS, _WIDTH, _WIDTH)) / np.sqrt(_WIDTH)
    points = np.random.default_rng(sample_seed).normal(
        size=(num_examples, 8, _WIDTH))
    region = np.argmax(points @ centers.T, axis=-1)
    targets = np.tanh(np.einsum("nsd,nsde->nse", points, maps[region]))
    return points.astype(np.float32), targets.astype(np.float32)


def build_model(num_experts, k, seed, **moe_kwargs):
    """`Dense -> (x + MoE(x)) -> Dense`; `moe_kwargs` go to `tf_moe.MoE`."""
    inputs = keras.Input((None, _WIDTH), name="points")
    hidden = keras.layers.Dense(64, name="embed")(inputs)
    moe = tf_moe.MoE(num_experts, hidden_size=64, k=k, seed=seed, name="moe",
                     **moe_kwargs)
    hidden = hidden + moe(hidden)
    outputs = keras.layers.Dense(_WIDTH, name="head")(hidden)
    return keras.Model(inputs, outputs), moe


def main(argv):
    del argv
    keras.utils.set_random_seed(_SEED.value)
    train_x, train_y = make_task(16384, _SEED.value, sample_seed=1)
    test_x, test_y = make_task(1024, _SEED.value, sample_seed=2)

    model, moe = build_model(_NUM_EXPERTS.value, _K.value, _SEED.value,
                             gating=_GATING.value)
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    history = model.fit(train_x, train_y, batch_size=256,
                        epochs=_EPOCHS.value, validation_data=(test_x, test_y),
                        verbose=2)

    logs = {name: values[-1] for name, values in history.history.items()}
    print("\nfinal epoch:")
    for name in sorted(logs):
        print(f"  {name:28s} {logs[name]:.4f}")
    model.predict(test_x, verbose=0)
    counts = moe.expert_token_counts.numpy()
    print(f"tokens per expert, last test batch: {counts.tolist()}")

    export_dir = os.path.join(_WORKDIR.value, "saved_model")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    served_out = served.serve(tf.constant(test_x[:4])).numpy()
    keras_out = model.predict(test_x[:4], verbose=0)
    max_diff = float(np.max(np.abs(served_out - keras_out)))
    print(f"exported SavedModel to {export_dir}; served output equals Keras "
          f"output (max abs difference {max_diff:.2e})")
    if max_diff > 1e-4:
        raise SystemExit("served model disagrees with the Keras model")


if __name__ == "__main__":
    console.run(main)
