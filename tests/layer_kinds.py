"""The MoE layers the shared tests run on: every behaviour of the flat layer
(masks, metrics, mixed precision, saving, export, edge cases) holds for the
hierarchical layer and for batchwise gating too."""

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


ALL = [moe, hierarchical, moe_batchwise, hierarchical_batchwise]
# Batchwise gating gives tokens a variable number of experts (dynamic
# shapes): no XLA.
STATIC_SHAPES = [moe, hierarchical]
