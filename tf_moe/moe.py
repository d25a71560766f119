"""The sparsely-gated Mixture-of-Experts layer (paper sections 2, 2.1, 4)."""

import keras

from tf_moe.arguments import check_positive_int
from tf_moe.mixture import MixtureOfExperts


@keras.saving.register_keras_serializable(package="tf_moe")
class MoE(MixtureOfExperts):
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

    With `gating="batchwise"` (appendix F) every expert takes exactly
    `ceil(k * tokens / E)` tokens in training, and learned thresholds route
    at inference (see `BatchwiseGate`); its L_batchwise joins the losses.

    Metrics (in `model.fit` logs, prefixed with the layer name):
    `importance_loss`, `load_loss`, `importance_cv` (CV of Importance),
    `load_cv` and `load_max_over_mean` (of the tokens each expert
    received), `dropped_fraction` (slots past the capacity), and with
    batchwise gating `threshold_loss`; `routing_metrics()` returns them.
    The token count of each expert in the last call is in
    `expert_token_counts`.

    Args:
        num_experts: E, the number of experts.
        hidden_size: hidden width of every expert.
        k: experts per token (on average, with batchwise gating).
        output_size: output width (default: the input width).
        gating: "noisy_top_k" (section 2.1) or "batchwise" (appendix F).
        noisy_gating: add the paper's trainable noise to the top-k gate in
            training (and estimate the load); False gives plain top-k.
            Batchwise gating has no noise.
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

    def __init__(self, num_experts, hidden_size, k=4, **kwargs):
        check_positive_int("num_experts", num_experts)
        check_positive_int("k", k)
        if k > num_experts:
            raise ValueError(
                f"`k` must be <= num_experts ({num_experts}), got {k}.")
        super().__init__(hidden_size, **kwargs)
        self.num_experts = num_experts
        self.k = k
        self.experts_per_token = k
        self.gate = self._make_gate(num_experts, k, name="gate")

    def _gates(self):
        return [self.gate]

    def _route(self, tokens, token_mask, training):
        gate_output = self.gate(tokens, token_mask=token_mask,
                                training=training)
        return gate_output, gate_output.num_dropped

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, k=self.k)
        return config
