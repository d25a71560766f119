"""Top-k gates: each token takes the k experts with the largest logits.

- `NoisyTopKGate`: the paper's (section 2.1), with trainable noise in
  training and the smooth load estimate of section 4.
- `TopKGate`: `softmax(x W_g)`, then the k largest, as GShard, Switch
  Transformer, Mixtral, Qwen-MoE and DeepSeek-V3 route; with DeepSeek-V3's
  auxiliary-loss-free balancing bias when `balancing="bias"`.
"""

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe.gating import Gate, Routing, top_k_with_gather_gradient


def _row_weights(row_valid, dtype):
    """`[rows, 1]`: 1 for valid rows, 0 for the others."""
    return tf.cast(row_valid, dtype)[:, None]


@keras.saving.register_keras_serializable(package="tf_moe")
class NoisyTopKGate(Gate):
    """The paper's noisy top-k gate.

    `H(x) = x W_g + N(0, 1) * (softplus(x W_noise) + noise_epsilon)` in
    training (no noise at inference, so routing is deterministic),
    `G(x) = softmax(KeepTopK(H(x), k))`. W_g and W_noise start at zero: no
    signal and some noise, so routing starts uniform. Its `kernel` is W_g
    and W_noise side by side, `[(groups,) d, 2E]` (W_g alone without
    noise).

    `noise_epsilon` keeps the noise scale, and so the load estimate
    `Phi(. / scale)`, finite where softplus underflows; the paper authors'
    code uses the same 1e-2.

    Args: as `Gate`, and
        noisy_gating: the trainable noise and the load estimate; False
            gives plain top-k.
        noise_epsilon: added to the noise scale.
    """

    def __init__(self, num_experts, k, noisy_gating=True, noise_epsilon=1e-2,
                 **kwargs):
        super().__init__(num_experts, k, **kwargs)
        if noise_epsilon < 0:
            raise ValueError(
                f"`noise_epsilon` must be >= 0, got {noise_epsilon!r}.")
        self.noisy_gating = bool(noisy_gating)
        self.noise_epsilon = float(noise_epsilon)

    def uses_noise(self, training):
        return self.noisy_gating and bool(training)

    def build_weights(self, model_dim):
        shape = self.weight_shape(model_dim, self.num_experts)
        self.gate_kernel = self.add_weight(
            name="gate_kernel", shape=shape,
            initializer=self.kernel_initializer, autocast=False)
        if self.noisy_gating:
            self.noise_kernel = self.add_weight(
                name="noise_kernel", shape=shape,
                initializer=self.kernel_initializer, autocast=False)

    @property
    def kernel(self):
        kernel = tf.convert_to_tensor(self.gate_kernel)
        if self.noisy_gating:
            # One matmul for the gate and the noise logits.
            kernel = tf.concat([kernel, self.noise_kernel], axis=-1)
        return kernel

    def decide(self, logits, row_valid, training=None, noise=None,
               row_groups=None, num_segments=1):
        del row_groups, num_segments  # Each row is routed on its own.
        clean_logits = logits
        if self.noisy_gating:
            clean_logits, noise_logits = tf.split(logits, 2, axis=-1)
            noise_stddev = tf.nn.softplus(noise_logits) + self.noise_epsilon
        noisy_logits = clean_logits
        if self.noisy_gating and training:
            if noise is None:
                noise = self.draw_noise(tf.shape(clean_logits),
                                        clean_logits.dtype)
            noisy_logits = clean_logits + noise * noise_stddev
        # With k+1 values the load estimator finds kth_excluding for every
        # expert from the same top_k call that picks the experts.
        num_top = min(self.k + 1, self.num_experts)
        top_values, top_ids = top_k_with_gather_gradient(noisy_logits,
                                                         num_top)
        expert_ids = top_ids[:, :self.k]
        row_weights = _row_weights(row_valid, clean_logits.dtype)
        gate_weights = (tf.nn.softmax(top_values[:, :self.k], axis=-1)
                        * row_weights)
        probability = None
        if self.noisy_gating:
            probability = balance.selection_probability(
                clean_logits, noisy_logits, noise_stddev, top_values,
                self.k) * row_weights
        return Routing(expert_ids, gate_weights, clean_logits, probability)

    def get_config(self):
        config = super().get_config()
        config.update(noisy_gating=self.noisy_gating,
                      noise_epsilon=self.noise_epsilon)
        return config


@keras.saving.register_keras_serializable(package="tf_moe")
class TopKGate(Gate):
    """Softmax top-k: `p = softmax(x W_g)`, each token keeps the k largest.

    `normalize_gates=True` renormalises the kept probabilities to sum to 1
    (Mixtral; Qwen-MoE's `norm_topk_prob`), which is the softmax of the k
    kept logits; False keeps them as they are (GShard, Switch Transformer),
    so a token's gates sum to less than 1. No noise, so no smooth load
    estimate: the paper's balancing has its importance term only.

    With `balancing="bias"` (DeepSeek-V3's auxiliary-loss-free balancing,
    Wang et al. 2024) a non-trainable per-expert bias b joins the logits
    for the choice only: the experts are the top k of `x W_g + b`, their
    gates come from `x W_g` alone. After every training call, `b_i +=
    bias_update_rate * sign(mean load - load_i)`, with load_i the slots
    routed to expert i in the call (summed over data-parallel replicas;
    per group for a grouped gate), so an overloaded expert becomes less
    likely to be chosen, with no gradient through the router at all.

    Its `kernel` is W_g, `[(groups,) d, E]`.

    Args: as `Gate`, and
        normalize_gates: renormalise the kept gates to sum to 1.
        bias_update_rate: the bias step of `balancing="bias"` (>= 0).
    """

    balancings = ("switch", "paper", "bias", "none")

    def __init__(self, num_experts, k, normalize_gates=True,
                 bias_update_rate=1e-3, **kwargs):
        super().__init__(num_experts, k, **kwargs)
        if (not isinstance(bias_update_rate, (int, float))
                or isinstance(bias_update_rate, bool)
                or bias_update_rate < 0):
            raise ValueError("`bias_update_rate` must be a number >= 0, got "
                             f"{bias_update_rate!r}.")
        self.normalize_gates = bool(normalize_gates)
        self.bias_update_rate = float(bias_update_rate)

    def build_weights(self, model_dim):
        self.gate_kernel = self.add_weight(
            name="gate_kernel",
            shape=self.weight_shape(model_dim, self.num_experts),
            initializer=self.kernel_initializer, autocast=False)
        if self.balancing == "bias":
            # Every replica applies the same update (from summed loads).
            self.expert_bias = self.add_weight(
                name="expert_bias", shape=self.weight_shape(self.num_experts),
                initializer="zeros", trainable=False, autocast=False,
                aggregation="only_first_replica")

    @property
    def kernel(self):
        return tf.convert_to_tensor(self.gate_kernel)

    def decide(self, logits, row_valid, training=None, noise=None,
               row_groups=None, num_segments=1):
        del training, noise, num_segments  # No noise; rows on their own.
        selection = logits
        if self.balancing == "bias":
            bias = tf.convert_to_tensor(self.expert_bias)
            if row_groups is not None:
                bias = tf.gather(bias, row_groups)
            selection = logits + bias
        expert_ids = tf.math.top_k(tf.stop_gradient(selection),
                                   k=self.k).indices
        kept_logits = tf.gather(logits, expert_ids, batch_dims=1)
        if self.normalize_gates:
            gate_weights = tf.nn.softmax(kept_logits, axis=-1)
        else:  # p_i = exp(logit_i - logsumexp(all logits)).
            gate_weights = tf.exp(kept_logits - tf.reduce_logsumexp(
                logits, axis=-1, keepdims=True))
        gate_weights *= _row_weights(row_valid, logits.dtype)
        return Routing(expert_ids, gate_weights, logits)

    def after_routing(self, statistics, training):
        if self.balancing != "bias" or not training:
            return
        load = self.strategy.sum_over_replicas(statistics.assignments)
        step = self.bias_update_rate * tf.sign(
            tf.reduce_mean(load, axis=-1, keepdims=True) - load)
        self.expert_bias.assign_add(tf.reshape(step, self.expert_bias.shape))

    def get_config(self):
        config = super().get_config()
        config.update(normalize_gates=self.normalize_gates,
                      bias_update_rate=self.bias_update_rate)
        return config
