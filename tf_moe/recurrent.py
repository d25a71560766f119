"""Keras's recurrent layers, able to run on a DTensor mesh.

The paper's models put MoE layers between LSTMs. Keras's LSTM loops over
time with `tf.while_loop` and TensorArrays, and the gradient of a
`while_loop` keeps the loop's intermediates in TensorLists; DTensor (TF
2.21) can lay out neither. (A `while_loop` over plain `[time, batch, ...]`
buffers with a hand-written backward loop does run, but DTensor names the
loops' outlined functions `while_cond`, `while_body`, ... in every program
it compiles, and a second batch shape then fails with "Cannot add function
'while_cond' because a different function with the same name already
exists".)

Built under a `MeshPlacement` scope, the layers here therefore unroll their
time loop (plain ops that DTensor lays out with the batch split over the
batch axis), which needs a static number of timesteps: the trainers pad a mesh batch's sequences to a power of two.
Compiling takes longer (the graph grows with the length), once per batch
shape. Off the mesh the layers are Keras's own, unchanged; the weights,
configs and checkpoints are Keras's either way.
"""

import keras
import tensorflow as tf

from tf_moe import distribution


class MeshRecurrent:
    """Mixin for a Keras RNN layer: built under a `MeshPlacement` scope, it
    unrolls its time loop; otherwise it is the Keras layer unchanged."""

    def build(self, sequences_shape, initial_state_shape=None):
        # Unrolled where programs have no while loops (a DTensor mesh).
        self._unrolled = distribution.strategy_at_build().static_shapes
        super().build(sequences_shape, initial_state_shape)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if not getattr(self, "_unrolled", False):
            return super().inner_loop(sequences, initial_state, mask,
                                      training=training)
        return self._unrolled_loop(sequences, initial_state, mask, training)

    def _unrolled_loop(self, sequences, initial_state, mask, training):
        """Keras's RNN loop with the same masking (a masked step keeps the
        states and repeats the previous output, or outputs zeros with
        `zero_output_for_mask`), unrolled over the static timesteps.
        (Keras's own `unroll=True` path zeroes a `go_backwards` layer's
        masked outputs with the mask unreversed.)

        Returns `(last output [batch, n], outputs [batch, time, n], final
        states)`, outputs in processing order (reversed if go_backwards).
        """
        if sequences.shape[1] is None:
            raise ValueError(
                f"{self.name}: on a mesh the number of timesteps must be "
                "static (pad the batch's sequences to a fixed length).")
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        steps = tf.unstack(tf.transpose(sequences, [1, 0, 2]))
        masks = ([None] * len(steps) if mask is None else
                 tf.unstack(tf.transpose(tf.cast(mask, tf.bool), [1, 0])))
        if self.go_backwards:
            steps.reverse()
            masks.reverse()
        cell_kwargs = ({"training": training}
                       if self.cell._call_has_training_arg else {})
        states = (list(initial_state)
                  if isinstance(initial_state, (list, tuple))
                  else [initial_state])
        outputs = []
        for x, step_mask in zip(steps, masks):
            output, new_states = self.cell(x, states, **cell_kwargs)
            if not isinstance(new_states, (list, tuple)):
                new_states = [new_states]
            if step_mask is not None:
                keep = tf.expand_dims(step_mask, -1)
                fallback = (outputs[-1] if outputs and
                            not self.zero_output_for_mask
                            else tf.zeros_like(output))
                output = tf.where(keep, output, fallback)
                new_states = [tf.where(keep, new, old)
                              for new, old in zip(new_states, states)]
            states = list(new_states)
            outputs.append(output)
        return outputs[-1], tf.stack(outputs, axis=1), states


def reverse_time(x, axis=1):
    """`x` reversed along `axis`, as a gather: DTensor has no layout rule
    for ReverseV2."""
    length = tf.shape(x)[axis]
    return tf.gather(x, tf.range(length - 1, -1, -1), axis=axis)


@keras.saving.register_keras_serializable(package="tf_moe")
class LSTM(MeshRecurrent, keras.layers.LSTM):
    """`keras.layers.LSTM` that also runs on a DTensor mesh."""


@keras.saving.register_keras_serializable(package="tf_moe")
class RNN(MeshRecurrent, keras.layers.RNN):
    """`keras.layers.RNN` (any cell) that also runs on a DTensor mesh."""


@keras.saving.register_keras_serializable(package="tf_moe")
class Bidirectional(keras.layers.Bidirectional):
    """`keras.layers.Bidirectional` that also runs on a DTensor mesh (with
    a `MeshRecurrent` layer, returning sequences, concatenated)."""

    def call(self, sequences, initial_state=None, mask=None, training=None):
        if not getattr(self.forward_layer, "_unrolled", False):
            return super().call(sequences, initial_state=initial_state,
                                mask=mask, training=training)
        if (initial_state is not None or self.return_state
                or not self.return_sequences or self.merge_mode != "concat"):
            raise ValueError(
                f"{self.name}: on a mesh, Bidirectional supports "
                "return_sequences=True and merge_mode='concat' without "
                "initial or returned states.")
        forward = self.forward_layer(sequences, mask=mask, training=training)
        backward = self.backward_layer(sequences, mask=mask,
                                       training=training)
        # Keras's flip of the backward layer's (reversed) outputs.
        return tf.concat([forward, reverse_time(backward)], -1)
