"""Sparse upcycling (Komatsuzaki et al., 2022): an MoE layer whose experts
all start as copies of a trained dense feed-forward network."""

import numpy as np

from tf_moe import distribution

# The dense network's weights, in the order `upcycle` takes them.
_WEIGHT_NAMES = {
    "ffn": ("kernel_in", "bias_in", "kernel_out", "bias_out"),
    "glu": ("kernel_gate", "kernel_up", "kernel_out"),
}


def upcycle(moe, *weights):
    """Copies a dense FFN into every routed expert of a built MoE layer.

    The dense network is the layer's expert type without the expert axis:
    for `expert_type="ffn"`, `upcycle(moe, kernel_in [d, h], bias_in [h],
    kernel_out [h, d_out], bias_out [d_out])` (e.g. the weights of two
    Keras `Dense` layers); for `"glu"`, `upcycle(moe, kernel_gate [d, h],
    kernel_up [d, h], kernel_out [h, d_out])`.

    Every expert then computes the dense FFN, so wherever a token's gates
    sum to 1 (the paper's gates, batchwise, `top_k` with
    `normalize_gates=True`) and nothing is dropped by a capacity, the layer
    outputs exactly what the dense FFN did; the gates are left as they are
    (zero-initialised gates route uniformly). Shared experts would add
    their own output, so a layer with them is refused.

    Args:
        moe: a built `tf_moe.MoE` or `tf_moe.HierarchicalMoE`.
        *weights: the dense FFN's arrays, as above.

    Returns:
        `moe`, upcycled in place.
    """
    if not getattr(moe, "built", False) or not hasattr(moe, "experts"):
        raise ValueError("`moe` must be a built tf_moe layer (call it once "
                         "or call `build`), got "
                         f"{type(moe).__name__} (built={moe.built}).")
    if moe.num_shared_experts:
        raise ValueError(
            "`moe` has shared experts, whose output would add to the dense "
            "FFN's; upcycle a layer with num_shared_experts=0.")
    experts = moe.experts
    names = _WEIGHT_NAMES[experts.expert_type]
    if len(weights) != len(names):
        raise ValueError(
            f"upcycle of expert_type={experts.expert_type!r} takes "
            f"{len(names)} arrays {names}, got {len(weights)}.")
    weights = dict(zip(names, (np.asarray(w) for w in weights)))
    hidden, model_dim = experts.hidden_size, moe.model_dim
    output_size = experts.output_size
    expected = {"kernel_in": (model_dim, hidden), "bias_in": (hidden,),
                "kernel_gate": (model_dim, hidden),
                "kernel_up": (model_dim, hidden),
                "kernel_out": (hidden, output_size),
                "bias_out": (output_size,)}
    for name, value in weights.items():
        if value.shape != expected[name]:
            raise ValueError(f"`{name}` must have shape {expected[name]} "
                             f"for this layer, got {value.shape}.")
    if experts.expert_type == "glu":
        weights["kernel_in"] = np.concatenate(
            [weights.pop("kernel_gate"), weights.pop("kernel_up")], axis=-1)
    num_experts = experts.num_experts
    for name, value in weights.items():
        distribution.assign(getattr(experts, name),
                            np.broadcast_to(value, (num_experts,) + value.shape))
    return moe
