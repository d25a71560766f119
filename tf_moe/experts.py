"""The experts: E feed-forward networks held as batched weights."""

import contextlib

import keras
import tensorflow as tf

from tf_moe import distribution
from tf_moe.matmul import buffer_matmul

EXPERT_TYPES = ("ffn", "glu")


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


@keras.saving.register_keras_serializable(package="tf_moe")
class Experts(keras.layers.Layer):
    """E feed-forward experts, run as batched matmuls over E.

    `expert_type="ffn"` (the paper's): `expert_e(x) = activation(x W_in[e]
    + b_in[e]) W_out[e] + b_out[e]`, with `W_in: [E, d, h]`, `b_in: [E,
    h]`, `W_out: [E, h, d_out]`, `b_out: [E, d_out]`.

    `expert_type="glu"` (SwiGLU with the default silu; Shazeer 2020, as
    Mixtral, Qwen-MoE and DeepSeek): `expert_e(x) = (activation(x
    W_gate[e]) * (x W_up[e])) W_out[e]`, no biases. W_gate and W_up are
    held side by side as `W_in: [E, d, 2h]` (one matmul for both).

    Built under a mesh placement, every weight is split over the expert
    axis by its first dimension (unless `sharded=False`, for the shared
    experts every token goes through).

    Call arguments:
        main: `[E, C, d]`: row c of expert e is one token for expert e; or
            `[shards, E, C, d]`, one such buffer per token shard.
        overflow: optional `[E2, C2, d]`, more rows for some experts.
        overflow_experts: `[E2]` int32, the expert of each overflow block.
        training: enables dropout on the hidden activations.
        rows_hint: the rows per expert to choose the products' kernels for
            when `main`'s C is known only at run time (`tf_moe.kernels`).

    Returns:
        The structure of the input: `[(shards,) E, C, d_out]` for `main`
        alone; with `overflow`, the pair of it and `[E2, C2, d_out]`.
    """

    def __init__(self, num_experts, hidden_size, output_size,
                 activation="relu", dropout=0.0,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", seed=None, expert_type="ffn",
                 sharded=True, **kwargs):
        super().__init__(**kwargs)
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"`expert_type` must be one of {EXPERT_TYPES}, "
                             f"got {expert_type!r}.")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.activation = keras.activations.get(activation)
        self.dropout_rate = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.expert_type = expert_type
        self.sharded = bool(sharded)
        self.use_bias = expert_type == "ffn"
        self.dropout = keras.layers.Dropout(dropout, seed=seed)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.strategy = distribution.strategy_at_build()
        kernel_initializer = per_expert_initializer(
            self.kernel_initializer, self.num_experts)
        # A glu expert's W_gate and W_up, side by side.
        in_width = self.hidden_size * (2 if self.expert_type == "glu" else 1)
        scope = (self.strategy.expert_variables() if self.sharded
                 else contextlib.nullcontext())
        with scope:
            self.kernel_in = self.add_weight(
                name="kernel_in",
                shape=(self.num_experts, model_dim, in_width),
                initializer=kernel_initializer)
            self.kernel_out = self.add_weight(
                name="kernel_out",
                shape=(self.num_experts, self.hidden_size, self.output_size),
                initializer=kernel_initializer)
            self.bias_in = self.bias_out = None
            if self.use_bias:
                self.bias_in = self.add_weight(
                    name="bias_in", shape=(self.num_experts, self.hidden_size),
                    initializer=self.bias_initializer)
                self.bias_out = self.add_weight(
                    name="bias_out", shape=(self.num_experts, self.output_size),
                    initializer=self.bias_initializer)

    def hidden_activation(self, pre_activation):
        """`[..., h]` hidden units from the first matmul's `[..., h]` (ffn)
        or `[..., 2h]` (glu: gate then up)."""
        if self.expert_type == "glu":
            gate, up = tf.split(pre_activation, 2, axis=-1)
            return self.activation(gate) * up
        return self.activation(pre_activation)

    def call(self, main, overflow=None, overflow_experts=None,
             training=None, rows_hint=None):
        unsharded = main.shape.rank == 3
        if unsharded:
            main = main[None]

        def layer(inputs, kernel, bias):
            main_out, overflow_out = buffer_matmul(
                *inputs, tf.convert_to_tensor(kernel), overflow_experts,
                allow_xla=self.strategy.compiles_experts,
                rows_hint=rows_hint)
            if bias is None:
                return main_out, overflow_out
            main_out += bias[None, :, None, :]
            if overflow_out is not None:
                overflow_out += tf.gather(bias, overflow_experts)[:, None, :]
            return main_out, overflow_out

        def activate(inputs):
            hidden = [None if h is None else self.hidden_activation(h)
                      for h in inputs]
            if self.dropout_rate > 0:
                hidden = [None if h is None
                          else self.dropout(h, training=training)
                          for h in hidden]
            return hidden

        hidden = activate(layer((main, overflow), self.kernel_in,
                                self.bias_in))
        main_out, overflow_out = layer(hidden, self.kernel_out,
                                       self.bias_out)
        if unsharded:
            main_out = main_out[0]
        return main_out if overflow is None else (main_out, overflow_out)

    def every_token(self, tokens, training=None):
        """`[T, d] -> [T, d_out]`: every expert on every token, summed (the
        shared experts), as plain matmuls over the experts' hidden units
        side by side (which is that sum)."""
        def flat(kernel):  # [E, a, b] -> [a, E * b]
            kernel = tf.convert_to_tensor(kernel)
            return tf.reshape(tf.transpose(kernel, [1, 0, 2]),
                              [kernel.shape[1], -1])

        kernel_in = tf.convert_to_tensor(self.kernel_in)
        if self.expert_type == "glu":  # Gates of all experts, then ups.
            gate, up = tf.split(kernel_in, 2, axis=-1)
            kernel_in = tf.concat([flat(gate), flat(up)], axis=-1)
        else:
            kernel_in = flat(kernel_in)
        hidden = tf.matmul(tokens, kernel_in)
        if self.use_bias:
            hidden += tf.reshape(self.bias_in, [-1])
        hidden = self.hidden_activation(hidden)
        if self.dropout_rate > 0:
            hidden = self.dropout(hidden, training=training)
        kernel_out = tf.reshape(self.kernel_out, [-1, self.output_size])
        outputs = tf.matmul(hidden, kernel_out)
        if self.use_bias:
            outputs += tf.reduce_sum(self.bias_out, axis=0)
        return outputs

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
            expert_type=self.expert_type,
            sharded=self.sharded,
        )
        return config
