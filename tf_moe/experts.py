"""The experts: E feed-forward networks held as batched weights."""

import keras
import tensorflow as tf


def per_expert_initializer(initializer, num_experts):
    """Makes a kernel initializer scale each expert's `[d, h]` slice alone.

    Keras computes the fans of a `[E, d, h]` kernel as if E were a
    convolution's receptive field (fan_in = E * d), which would shrink every
    expert's initial weights by sqrt(E). Variance-scaling initializers get
    their scale multiplied by E to undo that; others are returned unchanged.
    """
    initializer = keras.initializers.get(initializer)
    if isinstance(initializer, keras.initializers.VarianceScaling):
        return keras.initializers.VarianceScaling(
            scale=initializer.scale * num_experts, mode=initializer.mode,
            distribution=initializer.distribution, seed=initializer.seed)
    return initializer


# Below this many rows per expert, TensorFlow's CPU kernel for a batched
# matmul with a transposed right operand is slow: for [E, C, 1024] x
# [E, 512, 1024]^T on 2 cores, 3.1 s at C=32 and 0.82 s at C=128, against
# 0.78 s and 0.42 s for computing the transposed product W @ dy^T instead
# (0.40 s against 0.53 s at C=512, where the plain kernel wins).
_MIN_ROWS_FOR_TRANSPOSED_RHS = 256


@tf.custom_gradient
def batched_matmul(x, w):
    """`x @ w` for `x: [E, C, a]`, `w: [E, a, b]`, giving `[E, C, b]`.

    The gradients are the usual ones, computed in the faster of two
    equivalent orders for the input gradient (see above).
    """

    def grad(dy):
        dx = tf.cond(
            tf.shape(x)[1] >= _MIN_ROWS_FOR_TRANSPOSED_RHS,
            lambda: tf.matmul(dy, w, transpose_b=True),
            lambda: tf.transpose(
                tf.matmul(w, tf.transpose(dy, [0, 2, 1])), [0, 2, 1]))
        dw = tf.matmul(x, dy, transpose_a=True)
        return dx, dw

    return tf.matmul(x, w), grad


@keras.saving.register_keras_serializable(package="tf_moe")
class Experts(keras.layers.Layer):
    """E two-layer feed-forward experts, run as one batched matmul over E.

    `expert_e(x) = activation(x W_in[e] + b_in[e]) W_out[e] + b_out[e]`,
    with `W_in: [E, d, h]`, `b_in: [E, h]`, `W_out: [E, h, d_out]`,
    `b_out: [E, d_out]`.

    Call arguments:
        buffers: `[E, C, d]`, row c of expert e is one token for expert e.
        training: enables dropout on the hidden activations.

    Returns:
        `[E, C, d_out]`.
    """

    def __init__(self, num_experts, hidden_size, output_size,
                 activation="relu", dropout=0.0,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.activation = keras.activations.get(activation)
        self.dropout_rate = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.dropout = keras.layers.Dropout(dropout, seed=seed)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        kernel_initializer = per_expert_initializer(
            self.kernel_initializer, self.num_experts)
        self.kernel_in = self.add_weight(
            name="kernel_in",
            shape=(self.num_experts, model_dim, self.hidden_size),
            initializer=kernel_initializer)
        self.bias_in = self.add_weight(
            name="bias_in", shape=(self.num_experts, self.hidden_size),
            initializer=self.bias_initializer)
        self.kernel_out = self.add_weight(
            name="kernel_out",
            shape=(self.num_experts, self.hidden_size, self.output_size),
            initializer=kernel_initializer)
        self.bias_out = self.add_weight(
            name="bias_out", shape=(self.num_experts, self.output_size),
            initializer=self.bias_initializer)

    def call(self, buffers, training=None):
        hidden = (batched_matmul(buffers, tf.convert_to_tensor(self.kernel_in))
                  + self.bias_in[:, None, :])
        hidden = self.activation(hidden)
        if self.dropout_rate > 0:
            hidden = self.dropout(hidden, training=training)
        return (batched_matmul(hidden, tf.convert_to_tensor(self.kernel_out))
                + self.bias_out[:, None, :])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_size,)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            hidden_size=self.hidden_size,
            output_size=self.output_size,
            activation=keras.activations.serialize(self.activation),
            dropout=self.dropout_rate,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(
                self.bias_initializer),
            seed=self.seed,
        )
        return config
