"""Training on a mesh: the compiled step, and `MeshTrainer` for a Keras
model with a Keras loss (Keras `fit` does not run on DTensor)."""

import functools

import keras
import tensorflow as tf

from tf_moe.distribution import convert
from tf_moe.distribution import optimizer as optimizer_lib

# `tf.function` without AutoGraph, as Keras compiles its own train steps:
# the code these steps run (the layers, the trainers' models, beam search)
# branches on tensors only through TensorFlow's control flow (tf.cond,
# tf.while_loop), so converting it, and every layer it calls, would only
# add tracing time.
compile_without_autograph = functools.partial(tf.function, autograph=False)


class MeshStep:
    """One training step on a mesh: `gradients(*args) -> (outputs,
    gradients)`, then `apply(gradients)`, each compiled (and traced per
    input shape: the mesh's buffers need static shapes).

    Gradients and update run as two compiled functions: fused in one,
    DTensor (TF 2.21) lost the optimizer's first update and then applied
    stale Adam moments whenever an MoE layer was in the model (measured
    against the single-device step); split, they match it.

    Args:
        placement: the `MeshPlacement`; the step runs in its scope.
        gradients: `(*args) -> (outputs, gradients)`.
        apply: `(gradients) -> None`, the optimizer update.
    """

    def __init__(self, placement, gradients, apply):
        self.placement = placement
        self.gradients = compile_without_autograph(gradients)
        self._apply = compile_without_autograph(apply)

    def __call__(self, *args):
        """Runs the step on DTensor arguments; returns `outputs`."""
        with self.placement.scope():
            outputs, gradients = self.gradients(*args)
            self._apply(gradients)
        return outputs


class MeshTrainer:
    """A compiled training step for a model built under a placement scope.

    Args:
        model: a Keras model whose variables were created under
            `placement.scope()`.
        optimizer: a Keras optimizer (its slots get their weights' layouts).
        loss: a Keras loss (name or object), applied as `loss(y, model(x))`;
            the model's `add_loss` terms (the balancing losses) are added.
        placement: the `MeshPlacement`.
    """

    def __init__(self, model, optimizer, loss, placement):
        self.model = model
        self.optimizer = optimizer_lib.shard_optimizer_slots(optimizer)
        self.loss = keras.losses.get(loss)
        self.placement = placement
        with placement.scope():
            self.optimizer.build(model.trainable_variables)
        self._step = MeshStep(placement, self._loss_and_gradients,
                              self._apply_gradients)
        self._predict = compile_without_autograph(
            lambda x: self.model(x, training=False))

    def _loss_and_gradients(self, x, y):
        with tf.GradientTape() as tape:
            predictions = self.model(x, training=True)
            # Loss functions give per-example values, Loss objects a mean.
            loss = tf.reduce_mean(self.loss(y, predictions))
            if self.model.losses:
                loss += tf.add_n(self.model.losses)
        return loss, tape.gradient(loss, self.model.trainable_variables)

    def _apply_gradients(self, gradients):
        self.optimizer.apply(gradients, self.model.trainable_variables)

    @property
    def _gradients(self):
        """The compiled `(x, y) -> (loss, gradients)`, without an update."""
        return self._step.gradients

    def train_step(self, x, y):
        """One step on a global batch (arrays); returns the loss (float)."""
        loss = self._step(self.placement.shard_batch(x),
                          self.placement.shard_batch(y))
        return float(convert.to_numpy(loss))

    def predict(self, x):
        """The model's inference output on a global batch, as numpy."""
        with self.placement.scope():
            return convert.to_numpy(
                self._predict(self.placement.shard_batch(x)))
