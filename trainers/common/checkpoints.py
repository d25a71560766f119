"""Checkpoints that survive a kill at any point, and a workdir's identity.

`tf.train.CheckpointManager` writes a checkpoint's files first and its index
last, so a kill mid-save leaves the previous checkpoint as the latest. A
checkpoint can still be damaged afterwards (a truncated copy, a full disk):
`Checkpoints.restore` then warns and falls back to the one before it.

The data iterator's state is a host tensor; on a DTensor mesh it cannot be
saved by the same function as the mesh's variables, so it always goes to
a checkpoint of its own (`DIR/data/ckpt-N`), written before the model's
(`DIR/ckpt-N`): a model checkpoint whose data checkpoint is missing or
damaged is skipped like a damaged one.
"""

import json
import os

from absl import logging
import tensorflow as tf


class Checkpoints:
    """Saves and restores `objects` (model, optimizer, step, ...) and the
    data iterator under `directory`, keeping the last `max_to_keep`.

    Args:
        directory: where checkpoints go.
        step: an int64 `tf.Variable`, the training step (saved too).
        data: the data iterator (a host object, saved apart).
        max_to_keep: how many to keep (at least 2, so there is a fallback).
        **objects: trackables to save, by name.
    """

    def __init__(self, directory, step, data, max_to_keep=3, **objects):
        self.step = step
        keep = max(2, max_to_keep)
        self.checkpoint = tf.train.Checkpoint(step=step, **objects)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=keep)
        self.data_manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(data=data), os.path.join(directory, "data"),
            max_to_keep=keep)

    def save(self):
        number = int(self.step.numpy())
        self.data_manager.save(checkpoint_number=number)
        return self.manager.save(checkpoint_number=number)

    def _data_path(self, path):
        """The data checkpoint saved with model checkpoint `path`."""
        name = os.path.basename(path)
        for data_path in self.data_manager.checkpoints:
            if os.path.basename(data_path) == name:
                return data_path
        raise FileNotFoundError(f"no data checkpoint {name} beside it")

    def restore(self):
        """Restores the newest readable checkpoint; returns its path, or None
        when there is none (a fresh run)."""
        for path in reversed(self.manager.checkpoints):
            try:
                self.data_manager.checkpoint.restore(
                    self._data_path(path)).assert_existing_objects_matched()
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as error:  # noqa: BLE001  Any damage at all.
                logging.warning("checkpoint %s is unreadable (%s); falling "
                                "back to the one before it", path,
                                str(error).splitlines()[0])
                print(f"warning: checkpoint {path} is unreadable; falling "
                      "back to the previous one", flush=True)
                continue
            return path
        if self.manager.checkpoints:
            raise RuntimeError(f"no readable checkpoint in "
                               f"{self.manager.directory}")
        return None


def check_workdir(workdir, identity, what="model"):
    """Records `identity` (a JSON-able dict, e.g. the model config) in
    `workdir/<what>.json` on the first run; later runs must match it.

    Raises:
        ValueError: the workdir holds a different model's checkpoints.
    """
    path = os.path.join(workdir, f"{what}.json")
    tf.io.gfile.makedirs(workdir)
    identity = json.loads(json.dumps(identity, sort_keys=True))
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            recorded = json.load(f)
        if recorded != identity:
            differing = sorted(
                key for key in set(recorded) | set(identity)
                if recorded.get(key) != identity.get(key))
            raise ValueError(
                f"workdir {workdir!r} holds a different {what}'s checkpoints "
                f"(fields that differ: {differing}); use another --workdir "
                f"or the config it was trained with.")
        return
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(identity, f, indent=2, sort_keys=True)


def random_states(*models):
    """The states of every Keras seed generator in `models` (dropout, gate
    noise), in a fixed order.

    Keras does not put them in a model's checkpoint; saved beside it, a
    resumed run draws the same dropout masks and noise as an uninterrupted
    one.
    """
    return [generator.state
            for model in models
            for layer in model._flatten_layers(include_self=True)
            for generator in layer._seed_generators]
