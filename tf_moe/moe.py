"""The sparsely-gated Mixture-of-Experts layer (paper sections 2, 2.1, 4)."""

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe import dispatch as dispatch_lib
from tf_moe.experts import Experts
from tf_moe.gating import NoisyTopKGate


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")


def _check_non_negative(name, value):
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")


@keras.saving.register_keras_serializable(package="tf_moe")
class MoE(keras.layers.Layer):
    """Sparsely-gated Mixture-of-Experts: `y = sum_i G(x)_i E_i(x)`.

    Every position of the input is a token; all tokens of the batch are
    routed together (the paper's "convolutional" application). Each token
    runs only on its k experts: tokens are gathered into per-expert buffers,
    the experts run as one batched matmul, and outputs are combined weighted
    by the gate. Compute per token does not grow with `num_experts`.

    Losses (through `add_loss`, so `model.fit` adds them to the objective):
    `importance_weight * CV(Importance)^2 + load_weight * CV(Load)^2`, with
    Load the paper's smooth estimator. With `noisy_gating=False` there is no
    load estimator: only the importance term applies and `load_weight` is
    unused.

    Metrics (in `model.fit` logs, prefixed with the layer name):
    `importance_loss`, `load_loss`, `load_cv` (CV of the tokens each expert
    received) and `dropped_fraction` (slots past the capacity). The token
    count of each expert in the last call is in `expert_token_counts`.

    Args:
        num_experts: E, the number of experts.
        hidden_size: hidden width of every expert.
        k: experts per token.
        output_size: output width (default: the input width).
        noisy_gating: add the paper's trainable noise to the gate in
            training (and estimate the load); False gives plain top-k.
        importance_weight: weight of the importance loss.
        load_weight: weight of the load loss.
        capacity_factor: None for dropless dispatch (every routed token is
            computed); a float > 0 fixes each expert's buffer at
            `ceil(capacity_factor * k * tokens / E)` slots, `tokens` counting
            every position of the batch; slots past it are dropped (zero
            contribution) and counted. Needed for `jit_compile=True`.
        activation: the experts' hidden activation.
        expert_dropout: dropout rate on the experts' hidden activations.
        noise_epsilon: added to the noise scale (see `NoisyTopKGate`).
        kernel_initializer, bias_initializer: for the experts; a
            variance-scaling initializer scales each expert on its own.
        gate_initializer: for W_g and W_noise (the paper: zeros).
        seed: seed of the gate noise and of the dropout.

    Call arguments:
        inputs: `[..., d]` floating tensor, rank >= 2.
        training: noise and dropout on when true.
        mask: optional `[...]` bool Keras mask: masked positions are not
            routed, output zeros, and count in no loss and no metric.

    Returns:
        `[..., output_size]`.
    """

    def __init__(self, num_experts, hidden_size, k=4, output_size=None,
                 noisy_gating=True, importance_weight=0.1, load_weight=0.1,
                 capacity_factor=None, activation="relu", expert_dropout=0.0,
                 noise_epsilon=1e-2, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", gate_initializer="zeros",
                 seed=None, **kwargs):
        if "name" not in kwargs:
            # "moe", "moe_1", ... as Keras names its own layers (the class
            # name would give "mo_e"); metric names carry the layer name.
            uid = keras.backend.get_uid("tf_moe.moe")
            kwargs["name"] = "moe" if uid == 1 else f"moe_{uid - 1}"
        super().__init__(**kwargs)
        _check_positive_int("num_experts", num_experts)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("k", k)
        if k > num_experts:
            raise ValueError(
                f"`k` must be <= num_experts ({num_experts}), got {k}.")
        if output_size is not None:
            _check_positive_int("output_size", output_size)
        _check_non_negative("importance_weight", importance_weight)
        _check_non_negative("load_weight", load_weight)
        if capacity_factor is not None and (
                not isinstance(capacity_factor, (int, float))
                or capacity_factor <= 0):
            raise ValueError("`capacity_factor` must be None (dropless) or a "
                             f"number > 0, got {capacity_factor!r}.")
        if not 0 <= expert_dropout < 1:
            raise ValueError(
                f"`expert_dropout` must be in [0, 1), got {expert_dropout!r}.")

        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.k = k
        self.output_size = output_size
        self.noisy_gating = bool(noisy_gating)
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.capacity_factor = (None if capacity_factor is None
                                else float(capacity_factor))
        self.activation = keras.activations.get(activation)
        self.expert_dropout = float(expert_dropout)
        self.noise_epsilon = float(noise_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.gate_initializer = keras.initializers.get(gate_initializer)
        self.seed = seed
        self.supports_masking = True

        # Gate arithmetic, noise, softmax and losses stay in the variable
        # dtype (float32) under mixed precision.
        self.gate = NoisyTopKGate(
            num_experts, k, noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon, kernel_initializer=gate_initializer,
            seed=seed, dtype=self.dtype_policy.variable_dtype, name="gate")
        self._metric_trackers = {
            metric: keras.metrics.Mean(name=f"{self.name}_{metric}")
            for metric in ("importance_loss", "load_loss", "load_cv",
                           "dropped_fraction")
        }

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"`inputs` must have rank >= 2 ([..., d]), got shape "
                f"{tuple(input_shape)}.")
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                "`inputs` must have a known last dimension (the model "
                f"width d), got shape {tuple(input_shape)}.")
        self.model_dim = model_dim
        self.gate.build((None, model_dim))
        self.experts = Experts(
            self.num_experts, self.hidden_size,
            self.output_size or model_dim, activation=self.activation,
            dropout=self.expert_dropout,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer, seed=self.seed,
            dtype=self.dtype_policy, name="experts")
        self.experts.build((self.num_experts, None, model_dim))
        self.expert_token_counts = self.add_weight(
            name="expert_token_counts", shape=(self.num_experts,),
            dtype="int32", initializer="zeros", trainable=False)

    def call(self, inputs, training=None, mask=None):
        if not inputs.dtype.is_floating:
            raise ValueError(
                f"`inputs` must be a floating tensor, got dtype "
                f"{inputs.dtype.name}.")
        output_size = self.output_size or self.model_dim
        tokens = tf.reshape(inputs, [-1, self.model_dim])
        token_mask = None if mask is None else tf.reshape(mask, [-1])

        gate_output = self.gate(tokens, token_mask=token_mask,
                                training=training)
        plan = dispatch_lib.make_dispatch_plan(
            gate_output.expert_ids, self.num_experts,
            capacity=self._capacity(tokens), token_mask=token_mask)
        main, overflow = dispatch_lib.dispatch(tokens, plan)
        expert_outputs = self.experts(main, overflow, plan.overflow_experts,
                                      training=training)
        outputs = dispatch_lib.combine(expert_outputs, plan,
                                       gate_output.gate_weights)

        importance_loss, load_loss = balance.balancing_loss(
            gate_output.importance, gate_output.load,
            self.importance_weight, self.load_weight)
        self.add_loss(importance_loss + load_loss)
        self._record_routing(plan, importance_loss, load_loss)

        output_shape = tf.concat(
            [tf.shape(inputs)[:-1], [output_size]], axis=0)
        return tf.reshape(outputs, output_shape)

    def _capacity(self, tokens):
        if self.capacity_factor is None:
            return None
        num_tokens = tokens.shape[0]
        if num_tokens is None:
            num_tokens = tf.shape(tokens)[0]
        return dispatch_lib.fixed_capacity(
            num_tokens, self.num_experts, self.k, self.capacity_factor)

    def _record_routing(self, plan, importance_loss, load_loss):
        counts = tf.cast(plan.expert_counts, tf.float32)
        routed_slots = tf.reduce_sum(counts)
        dropped_fraction = tf.math.divide_no_nan(
            tf.cast(plan.num_dropped, tf.float32), routed_slots)
        values = {
            "importance_loss": importance_loss,
            "load_loss": load_loss,
            "load_cv": tf.sqrt(balance.cv_squared(counts)),
            "dropped_fraction": dropped_fraction,
        }
        for metric, value in values.items():
            self._metric_trackers[metric].update_state(value)
        self.expert_token_counts.assign(plan.expert_counts)

    def compute_output_shape(self, input_shape):
        output_size = self.output_size or input_shape[-1]
        return tuple(input_shape[:-1]) + (output_size,)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            hidden_size=self.hidden_size,
            k=self.k,
            output_size=self.output_size,
            noisy_gating=self.noisy_gating,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            capacity_factor=self.capacity_factor,
            activation=keras.activations.serialize(self.activation),
            expert_dropout=self.expert_dropout,
            noise_epsilon=self.noise_epsilon,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(
                self.bias_initializer),
            gate_initializer=keras.initializers.serialize(
                self.gate_initializer),
            seed=self.seed,
        )
        return config
