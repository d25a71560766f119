"""The MoE layers the shared tests run on: every behaviour of the flat layer
(masks, metrics, mixed precision, saving, export, edge cases) holds for the
hierarchical layer, batchwise gating and the newer routers too."""

import tf_moe


def moe(**kwargs):
    return tf_moe.MoE(8, 16, k=2, seed=1, **kwargs)


def hierarchical(**kwargs):
    return tf_moe.HierarchicalMoE(4, 3, 16, k_primary=2, k_secondary=2,
                                  seed=1, **kwargs)


def moe_batchwise(**kwargs):
    return moe(gating="batchwise", **kwargs)


def hierarchical_batchwise(**kwargs):
    return hierarchical(gating="batchwise", **kwargs)


def moe_top_k(**kwargs):
    """Softmax top-k with Switch balancing, the z-loss, jitter, and SwiGLU
    routed and shared experts."""
    return moe(gating="top_k", router_z_loss_weight=1e-3, router_jitter=0.01,
               expert_type="glu", num_shared_experts=1, **kwargs)


def hierarchical_top_k(**kwargs):
    """Softmax top-k at both levels with bias balancing and the z-loss."""
    return hierarchical(gating="top_k", balancing="bias",
                        router_z_loss_weight=1e-3, **kwargs)


def moe_expert_choice(**kwargs):
    return moe(gating="expert_choice", router_z_loss_weight=1e-3, **kwargs)


ALL = [moe, hierarchical, moe_batchwise, hierarchical_batchwise, moe_top_k,
       hierarchical_top_k, moe_expert_choice]
# Batchwise gating gives tokens a variable number of experts (dynamic
# shapes): no XLA. Expert choice has static shapes with a capacity.
STATIC_SHAPES = [moe, hierarchical, moe_top_k, hierarchical_top_k,
                 moe_expert_choice]
