"""The gates by name, and the router arguments the MoE layers share.

`gating=` of a layer names a gate class of `GATES`; `make_gate` builds it
with the arguments that concern it. `balancing=None` takes the gate's
default: "paper" for the paper's gates, "switch" for softmax top-k,
"none" for expert choice (balanced by construction).
"""

from tf_moe.arguments import check_non_negative
from tf_moe.balanced_gating import BatchwiseGate, ExpertChoiceGate
from tf_moe.gating import BALANCINGS
from tf_moe.top_k_gating import NoisyTopKGate, TopKGate

GATES = {
    "noisy_top_k": NoisyTopKGate,
    "top_k": TopKGate,
    "batchwise": BatchwiseGate,
    "expert_choice": ExpertChoiceGate,
}
# Gates that route the tokens of a whole (flat) batch at once.
FLAT_ONLY = ("expert_choice",)


def default_balancing(gating):
    """The balancing a layer of this gating has unless told otherwise."""
    return GATES[gating].balancings[0]


def check_router_arguments(gating, balancing, aux_loss_weight,
                           bias_update_rate, router_z_loss_weight,
                           router_jitter):
    """Refuses bad router arguments, naming them.

    Returns the balancing to use (`balancing`, or the gate's default).
    """
    if gating not in GATES:
        raise ValueError(
            f"`gating` must be one of {tuple(GATES)}, got {gating!r}.")
    if balancing is None:
        balancing = default_balancing(gating)
    if balancing not in BALANCINGS:
        raise ValueError(
            f"`balancing` must be one of {BALANCINGS}, got {balancing!r}.")
    supported = GATES[gating].balancings
    if balancing not in supported:
        raise ValueError(
            f"`balancing={balancing!r}` does not apply to "
            f"`gating={gating!r}`; it supports {supported}.")
    for name, value in (("aux_loss_weight", aux_loss_weight),
                        ("bias_update_rate", bias_update_rate),
                        ("router_z_loss_weight", router_z_loss_weight),
                        ("router_jitter", router_jitter)):
        check_non_negative(name, value)
    if router_jitter >= 1:
        raise ValueError(
            f"`router_jitter` must be in [0, 1), got {router_jitter!r}.")
    return balancing


def make_gate(gating, num_experts, k, noisy_gating=True, noise_epsilon=1e-2,
              normalize_gates=True, bias_update_rate=1e-3,
              capacity_factor=None, **kwargs):
    """The gate named `gating` (a key of `GATES`); each gate-specific
    argument goes to the gates that have it (`capacity_factor` to expert
    choice)."""
    gate_class = GATES[gating]
    if issubclass(gate_class, NoisyTopKGate):
        kwargs.update(noisy_gating=noisy_gating, noise_epsilon=noise_epsilon)
    if issubclass(gate_class, TopKGate):
        kwargs.update(normalize_gates=normalize_gates,
                      bias_update_rate=bias_update_rate)
    if issubclass(gate_class, ExpertChoiceGate):
        kwargs.update(capacity_factor=capacity_factor)
    return gate_class(num_experts, k, **kwargs)
