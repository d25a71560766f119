"""The experts: E feed-forward networks, run as batched or per-expert
products."""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from tf_moe import distribution
from tf_moe import expert_weights
from tf_moe import kernels
from tf_moe import plan as plan_lib
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

    `storage` is how each `[E, ...]` weight is held
    (`tf_moe.expert_weights`): "stacked", one variable, or "per_expert", E
    variables (one device only), which the packed layout runs without
    stacking their gradients. Either way the attributes `kernel_in`,
    `kernel_out`, `bias_in` and `bias_out` read and assign as `[E, ...]`
    weights, and Keras saving (`.keras`, `.weights.h5`) writes them
    stacked, so that a file saved in one storage loads in the other; a
    `tf.train.Checkpoint` restores into the storage it was written from.

    The buffers come in one of two layouts (`tf_moe.plan`), whichever
    `layout` measured faster: padded, run as batched matmuls over E, or
    packed, run as one matmul pair per expert on its own rows.

    Call arguments:
        main: `[E, C, d]`: row c of expert e is one token for expert e; or
            `[shards, E, C, d]`, one such buffer per token shard. Packed
            (with `expert_rows`): `[(1,) N, d]`, the rows of expert 0, then
            of expert 1, ...
        overflow: optional `[E2, C2, d]`, more rows for some experts.
        overflow_experts: `[E2]` int32, the expert of each overflow block.
        training: enables dropout on the hidden activations.
        rows_hint: the rows per expert to choose the products' kernels for
            when `main`'s C is known only at run time (`tf_moe.kernels`).
        expert_rows: `[E]` int32, the rows of each expert in a packed
            `main` (no overflow then); None for padded buffers.

    Returns:
        The structure of the input: `[(shards,) E, C, d_out]` (padded) or
        `[(1,) N, d_out]` (packed) for `main` alone; with `overflow`, the
        pair of it and `[E2, C2, d_out]`.
    """

    def __init__(self, num_experts, hidden_size, output_size,
                 activation="relu", dropout=0.0,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", seed=None, expert_type="ffn",
                 sharded=True, storage="stacked", **kwargs):
        super().__init__(**kwargs)
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"`expert_type` must be one of {EXPERT_TYPES}, "
                             f"got {expert_type!r}.")
        expert_weights.check_storage(storage, "storage")
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
        self.storage = storage
        self.use_bias = expert_type == "ffn"
        self.dropout = keras.layers.Dropout(dropout, seed=seed)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.strategy = distribution.strategy_at_build()
        if self.storage == "per_expert" and self.strategy.static_shapes:
            raise ValueError(
                f"Layer {self.name!r}: storage \"per_expert\" (MoE's "
                "`expert_storage`) holds each expert in a variable of its "
                "own, which a mesh cannot split over its expert axis; build "
                "under a mesh placement with \"stacked\".")
        kernel_initializer = per_expert_initializer(
            self.kernel_initializer, self.num_experts)
        # A glu expert's W_gate and W_up, side by side.
        in_width = self.hidden_size * (2 if self.expert_type == "glu" else 1)
        scope = (self.strategy.expert_variables() if self.sharded
                 else contextlib.nullcontext())
        with scope:
            self.kernel_in = self._expert_weight(
                "kernel_in", (model_dim, in_width), kernel_initializer)
            self.kernel_out = self._expert_weight(
                "kernel_out", (self.hidden_size, self.output_size),
                kernel_initializer)
            self.bias_in = self.bias_out = None
            if self.use_bias:
                self.bias_in = self._expert_weight(
                    "bias_in", (self.hidden_size,), self.bias_initializer)
                self.bias_out = self._expert_weight(
                    "bias_out", (self.output_size,), self.bias_initializer)

    def _expert_weight(self, name, shape, initializer):
        """An `[E, *shape]` weight in this layer's storage."""
        shape = (self.num_experts,) + tuple(shape)
        if self.storage == "stacked":
            return self.add_weight(name=name, shape=shape,
                                   initializer=initializer)
        # Drawn whole, as the stacked variable would be, so that a seed
        # gives the same experts in either storage.
        value = initializer(shape, dtype=self.variable_dtype)
        return expert_weights.PerExpertWeight(
            self.add_weight(name=f"{name}_{e}", shape=shape[1:],
                            initializer=lambda _, dtype, part=value[e]:
                            tf.cast(part, dtype))
            for e in range(self.num_experts))

    def _held_weights(self):
        """`(kernel_in, bias_in, kernel_out, bias_out)` as held: variables
        or `PerExpertWeight`s, the biases None for glu experts."""
        return (self.kernel_in, self.bias_in, self.kernel_out, self.bias_out)

    def _weights_in_build_order(self):
        """The `[E, ...]` weights in the order `build` makes them, which
        is the order Keras files keep them in."""
        return [w for w in (self.kernel_in, self.kernel_out, self.bias_in,
                            self.bias_out) if w is not None]

    def save_own_variables(self, store):
        # Stacked in either storage, so that a file saved in one loads in
        # the other.
        if self.storage == "stacked":
            return super().save_own_variables(store)
        for i, weight in enumerate(self._weights_in_build_order()):
            store[f"{i}"] = weight.numpy()

    def load_own_variables(self, store):
        if self.storage == "stacked":
            return super().load_own_variables(store)
        weights = self._weights_in_build_order()
        if len(store.keys()) != len(weights):
            raise ValueError(
                f"Layer {self.name!r} expects {len(weights)} stacked weights "
                f"in the file, found {len(store.keys())}.")
        for i, weight in enumerate(weights):
            weight.assign(store[f"{i}"])

    def hidden_activation(self, pre_activation):
        """`[..., h]` hidden units from the first matmul's `[..., h]` (ffn)
        or `[..., 2h]` (glu: gate then up)."""
        if self.expert_type == "glu":
            gate, up = tf.split(pre_activation, 2, axis=-1)
            return self.activation(gate) * up
        return self.activation(pre_activation)

    def call(self, main, overflow=None, overflow_experts=None,
             training=None, rows_hint=None, expert_rows=None):
        if expert_rows is not None:
            slices = tuple(
                None if w is None else expert_weights.per_expert_slices(w)
                for w in self._held_weights())
            if main.shape.rank == 2:
                return self._packed(main, expert_rows, slices, training)
            return tf.expand_dims(self._packed(
                tf.squeeze(main, 0), expert_rows, slices, training), 0)
        unsharded = main.shape.rank == 3
        if unsharded:
            main = main[None]
        main_out, overflow_out = self._padded(
            main, overflow, overflow_experts, self._weights(), training,
            rows_hint)
        if unsharded:
            main_out = main_out[0]
        return main_out if overflow is None else (main_out, overflow_out)

    def _weights(self):
        """`(kernel_in, bias_in, kernel_out, bias_out)` as `[E, ...]`
        tensors (stacked in "per_expert" storage), the biases None for glu
        experts."""
        return tuple(None if w is None else tf.convert_to_tensor(w)
                     for w in self._held_weights())

    def _activate(self, hidden, training):
        hidden = self.hidden_activation(hidden)
        if self.dropout_rate > 0:
            hidden = self.dropout(hidden, training=training)
        return hidden

    def _padded(self, main, overflow, overflow_experts, weights, training,
                rows_hint):
        """`[S, E, C, d]` and optional `[E2, C2, d]` buffers, as batched
        matmuls: `([S, E, C, d_out], [E2, C2, d_out] or None)`."""
        kernel_in, bias_in, kernel_out, bias_out = weights

        def layer(inputs, kernel, bias):
            main_out, overflow_out = buffer_matmul(
                *inputs, kernel, overflow_experts,
                allow_xla=self.strategy.compiles_experts,
                rows_hint=rows_hint)
            if bias is None:
                return main_out, overflow_out
            main_out += bias[None, :, None, :]
            if overflow_out is not None:
                overflow_out += tf.gather(bias, overflow_experts)[:, None, :]
            return main_out, overflow_out

        hidden = [None if h is None else self._activate(h, training)
                  for h in layer((main, overflow), kernel_in, bias_in)]
        return layer(hidden, kernel_out, bias_out)

    def _packed(self, rows, expert_rows, slices, training):
        """`[N, d]` rows sorted by expert, `expert_rows[e]` of expert e, as
        one matmul pair per expert (which TensorFlow's graph optimizer
        fuses with the bias and activation): `[N, d_out]`. `slices`: the
        weights of `_weights()`, each as E per-expert tensors (or None)."""
        num_experts = len(slices[0])
        per_expert = [[None] * num_experts if w is None else w
                      for w in slices]
        outputs = []
        for part, w_in, b_in, w_out, b_out in zip(
                tf.split(rows, expert_rows, num=num_experts), *per_expert):
            hidden = tf.matmul(part, w_in)
            if b_in is not None:
                hidden += b_in
            output = tf.matmul(self._activate(hidden, training), w_out)
            if b_out is not None:
                output += b_out
            outputs.append(output)
        return tf.concat(outputs, axis=0)

    def layout(self, rows, dtype, capacity=None):
        """"padded" or "packed": the layout these experts run faster in
        (`tf_moe.kernels.choose_layout`), at `rows` per expert (None:
        `tf_moe.kernels.DEFAULT_ROWS`) in the compute dtype `dtype`, the
        padded buffers at `capacity` rows each where a fixed capacity sets
        them (a padded buffer computes every row of its capacity, a packed
        one only the rows kept). Dropless, the padded layout is timed with
        the padding and overflow group that its plan makes for a balanced
        routing of `rows` per expert (`plan.typical_dropless_buffers`):
        at E=256 and 128 rows, about 1.13 rows per slot."""
        model_dim = self.kernel_in.shape[1]
        rows = int(rows or kernels.DEFAULT_ROWS)
        padded_rows = None
        if capacity is not None:
            # A packed buffer keeps at most `capacity` rows of an expert; a
            # padded one computes all `capacity` of them.
            padded_rows = int(capacity)
            rows = min(rows, padded_rows)
        shape = kernels.LayoutShape(
            kernels.device_type(), tf.as_dtype(dtype).name, self.num_experts,
            rows, model_dim, self.kernel_in.shape[2], self.output_size,
            self.expert_type, padded_rows, self.storage)

        def make_candidates(experts):
            rng = np.random.default_rng(0)

            def random(*shape):
                return tf.cast(rng.standard_normal(shape, np.float32), dtype)

            weights = tuple(
                None if w is None else random(experts, *w.shape[1:])
                for w in self._held_weights())
            present = [w for w in weights if w is not None]

            def with_absent_biases(trained):  # glu experts have none
                trained = iter(trained)
                return tuple(None if w is None else next(trained)
                             for w in weights)

            # The weights as the step takes their gradients: in this
            # storage, `[E, ...]` tensors or E tensors each.
            if self.storage == "stacked":
                trainable = tuple(present)

                def stacked(trained):
                    return with_absent_biases(trained)

                def slices(trained):
                    return with_absent_biases(tf.unstack(w) for w in trained)
            else:
                trainable = tuple(part for w in present
                                  for part in tf.unstack(w))

                def slices(trained):
                    return with_absent_biases(
                        trained[i:i + experts]
                        for i in range(0, len(trained), experts))

                def stacked(trained):
                    return tuple(None if w is None else tf.stack(w)
                                 for w in slices(trained))

            rows_per_expert = shape.rows
            packed = random(experts * rows_per_expert, model_dim)
            expert_rows = tf.fill([experts], rows_per_expert)
            if shape.padded_rows is not None:  # A fixed capacity.
                padded_rows, overflow_experts, overflow_rows = (
                    shape.padded_rows, 0, 0)
            else:  # Dropless: the padding and overflow of a real plan.
                padded_rows, overflow_experts, overflow_rows = (
                    plan_lib.typical_dropless_buffers(
                        rows_per_expert * self.num_experts,
                        self.num_experts))
                overflow_experts = round(
                    overflow_experts * experts / self.num_experts)
            padded = (random(1, experts, padded_rows, model_dim),)
            if overflow_experts and overflow_rows:
                padded += (random(overflow_experts, overflow_rows,
                                  model_dim),)

            def run_padded(main, *rest):
                overflow = rest[0] if len(rest) > len(trainable) else None
                weights = stacked(rest[-len(trainable):])
                if shape.padded_rows is None:  # Dropless: C known at run
                    # time only, as in the step, whose products are chosen
                    # at the balanced rows.
                    main = tf.compat.v1.placeholder_with_default(
                        main, [1, experts, None, model_dim])
                outputs = self._padded(
                    main, overflow,
                    None if overflow is None else tf.range(overflow_experts),
                    weights, False, rows_per_expert)
                return tf.add_n([tf.reduce_sum(out) for out in outputs
                                 if out is not None])

            return {
                "padded": (run_padded, padded + trainable),
                "packed": (lambda x, *w: self._packed(
                    x, expert_rows, slices(w), False),
                    (packed,) + trainable),
            }

        return kernels.choose_layout(shape, make_candidates)

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
