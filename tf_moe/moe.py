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

    Routers (`gating`, see `tf_moe.routers` and the README's Routers
    section): "noisy_top_k" (the paper's, default), "top_k" (softmax then
    the k largest: GShard, Switch, Mixtral, DeepSeek), "batchwise"
    (appendix F: every expert takes exactly `ceil(k * tokens / E)` tokens
    in training, learned thresholds at inference) and "expert_choice"
    (every expert takes its `ceil(capacity_factor * k * tokens / E)` best
    tokens; see `ExpertChoiceGate` for what that means for decoding).

    Losses (through `add_loss`, so `model.fit` adds them to the objective),
    by `balancing`:
    - "paper": `importance_weight * CV(Importance)^2 + load_weight *
      CV(Load)^2`, with Load the paper's smooth estimator (only the
      importance term without noise);
    - "switch": `aux_loss_weight * E * sum_i f_i P_i` (Fedus et al.), f_i
      the fraction of routed assignments to expert i, P_i its mean router
      probability;
    - "bias": none; DeepSeek-V3's per-expert bias, added to the logits for
      the choice only, moves towards balance after each training call;
    - "none": none.
    Plus, with `router_z_loss_weight > 0`, ST-MoE's `mean logsumexp(logits)
    ^2`, and with batchwise gating its L_batchwise. Statistics are summed
    over data-parallel replicas before any term is computed.

    Metrics (in `model.fit` logs, prefixed with the layer name):
    `importance_loss`, `load_loss`, `importance_cv` (CV of Importance),
    `load_cv` and `load_max_over_mean` (of the tokens each expert
    received), `dropped_fraction` (slots past the capacity), and where on
    `switch_loss`, `z_loss`, `threshold_loss`; `routing_metrics()` returns
    them. The token count of each expert in the last call is in
    `expert_token_counts`.

    Args:
        num_experts: E, the number of experts.
        hidden_size: hidden width of every expert.
        k: experts per token (on average, for the balanced gates).
        output_size: output width (default: the input width).
        gating: "noisy_top_k", "top_k", "batchwise" or "expert_choice".
        noisy_gating: add the paper's trainable noise to the noisy top-k
            gate in training (and estimate the load); False gives plain
            top-k over the kept logits.
        normalize_gates: for "top_k": renormalise the kept probabilities to
            sum to 1 (Mixtral); False keeps the full-softmax values (GShard,
            Switch).
        balancing: "paper", "switch", "bias" ("top_k" only) or "none"; None
            for the gate's default ("paper"; "switch" for "top_k"; "none"
            for "expert_choice").
        importance_weight, load_weight: the paper's two weights.
        aux_loss_weight: the Switch term's weight.
        bias_update_rate: the step of the balancing bias.
        router_z_loss_weight: weight of the router z-loss (0: off).
        router_jitter: eps of Switch's multiplicative jitter of the router
            input in training, `x * U(1 - eps, 1 + eps)` (0: off).
        capacity_factor: None for dropless dispatch (every routed token is
            computed); a float > 0 fixes each expert's buffer at
            `ceil(capacity_factor * k * tokens / E)` slots, `tokens` counting
            every position of the batch; slots past it are dropped (zero
            contribution) and counted. Needed for `jit_compile=True`. For
            expert choice it is also C's factor (None: 1).
        expert_type: "ffn" (the paper's two layers with biases) or "glu"
            (`(activation(x W_gate) * (x W_up)) W_out`, no biases).
        activation: the experts' hidden activation (a Keras name or a
            callable); default "relu" for ffn, "silu" for glu (SwiGLU).
        num_shared_experts: experts of the same type that every token goes
            through, added to the routed output (DeepSeekMoE).
        shared_hidden_size: their hidden width (default `hidden_size`).
        expert_dropout: dropout rate on the experts' hidden activations.
        noise_epsilon: added to the noise scale (see `NoisyTopKGate`).
        kernel_initializer, bias_initializer: for the experts; a
            variance-scaling initializer scales each expert on its own.
        gate_initializer: for the gate kernels (the paper: zeros).
        expert_storage: how the routed experts' weights are held:
            "stacked", one `[E, ...]` variable each (any placement), or
            "per_expert", E variables each (one device), which a
            per-expert dispatcher's layout runs without stacking their
            gradients (`tf_moe.expert_weights`): less memory and faster
            gradients from a few hundred experts on a CPU, where it also
            keeps the packed layout that stacked weights give up above
            `tf_moe.kernels.PER_EXPERT_MAX_EXPERTS`, and a faster step with
            Adam at any E for experts of 1M weights (slower at 0.26M); a
            slower first trace (README, "The floor").
        seed: seed of the gate noise, the jitter and the dropout.

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
