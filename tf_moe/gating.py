"""Noisy top-k gating (paper section 2.1) with the smooth load estimate (4)."""

from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from tf_moe import balance


class GateOutput(NamedTuple):
    """What a gate decides for a batch of tokens.

    Attributes:
        expert_ids: `[tokens, k]` int32, the chosen experts, best first.
        gate_weights: `[tokens, k]` float32, softmax over the kept logits;
            rows sum to 1 for real tokens and are 0 for masked tokens.
        importance: `[E]` float32, sum of gate values per expert.
        load: `[E]` float32 smooth load estimate, or None for a gate
            without noise (no estimator exists then).
    """

    expert_ids: tf.Tensor
    gate_weights: tf.Tensor
    importance: tf.Tensor
    load: Optional[tf.Tensor]


@keras.saving.register_keras_serializable(package="tf_moe")
class NoisyTopKGate(keras.layers.Layer):
    """The paper's noisy top-k gate.

    `H(x) = x W_g + N(0, 1) * (softplus(x W_noise) + noise_epsilon)` in
    training (no noise at inference, so routing is deterministic),
    `G(x) = softmax(KeepTopK(H(x), k))`. W_g and W_noise start at zero: no
    signal and some noise, so routing starts uniform.

    `noise_epsilon` keeps the noise scale, and so the load estimate
    `Phi(. / scale)`, finite where softplus underflows; the paper authors'
    code uses the same 1e-2.

    Call arguments:
        tokens: `[tokens, d]` floating tensor.
        token_mask: optional `[tokens]` bool; masked tokens get zero gate
            weights and count in neither importance nor load.
        training: adds noise when true.

    Returns:
        A `GateOutput`.
    """

    def __init__(self, num_experts, k, noisy_gating=True, noise_epsilon=1e-2,
                 kernel_initializer="zeros", seed=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(
                f"`num_experts` must be an int >= 1, got {num_experts!r}.")
        if not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(
                f"`k` must be an int in [1, num_experts={num_experts}], "
                f"got {k!r}.")
        if noise_epsilon < 0:
            raise ValueError(
                f"`noise_epsilon` must be >= 0, got {noise_epsilon!r}.")
        self.num_experts = num_experts
        self.k = k
        self.noisy_gating = bool(noisy_gating)
        self.noise_epsilon = float(noise_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.gate_kernel = self.add_weight(
            name="gate_kernel", shape=(model_dim, self.num_experts),
            initializer=self.kernel_initializer)
        if self.noisy_gating:
            self.noise_kernel = self.add_weight(
                name="noise_kernel", shape=(model_dim, self.num_experts),
                initializer=self.kernel_initializer)

    def call(self, tokens, token_mask=None, training=None):
        tokens = tf.cast(tokens, self.compute_dtype)
        clean_logits = tf.matmul(tokens, self.gate_kernel)
        # With k+1 values the load estimator finds kth_excluding for every
        # expert from the same top_k call that picks the experts.
        num_top = min(self.k + 1, self.num_experts)

        if self.noisy_gating:
            noise_stddev = (tf.nn.softplus(tf.matmul(tokens, self.noise_kernel))
                            + self.noise_epsilon)
            if training:
                noise = keras.random.normal(
                    tf.shape(clean_logits), dtype=clean_logits.dtype,
                    seed=self.seed_generator)
                logits = clean_logits + noise * noise_stddev
            else:
                logits = clean_logits
        else:
            logits = clean_logits

        top_values, top_ids = tf.math.top_k(logits, k=num_top)
        expert_ids = top_ids[:, :self.k]
        gate_weights = tf.nn.softmax(top_values[:, :self.k], axis=-1)
        token_weights = None
        if token_mask is not None:
            token_weights = tf.cast(token_mask, gate_weights.dtype)
            gate_weights *= token_weights[:, None]

        importance = balance.importance(expert_ids, gate_weights,
                                        self.num_experts)
        load = None
        if self.noisy_gating:
            load = balance.smooth_load(clean_logits, logits, noise_stddev,
                                       top_values, self.k, token_weights)
        return GateOutput(expert_ids, gate_weights, importance, load)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            k=self.k,
            noisy_gating=self.noisy_gating,
            noise_epsilon=self.noise_epsilon,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            seed=self.seed,
        )
        return config
