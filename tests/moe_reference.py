"""A slow, obviously correct MoE: every expert on every token.

The gate decisions come from the layer's own gate; what this checks is that
sparse dispatch, the batched experts and combine compute
`y = sum_i G(x)_i E_i(x)` exactly, with capacity drops decided by a plain
Python walk over the slots.
"""

import numpy as np
import tensorflow as tf


def capacity_keep_mask(expert_ids, num_experts, capacity, token_mask):
    """`[tokens, k]` bool: slot kept, walking first choices before second."""
    num_tokens, k = expert_ids.shape
    used = np.zeros(num_experts, int)
    kept = np.zeros((num_tokens, k), bool)
    for rank in range(k):
        for token in range(num_tokens):
            expert = expert_ids[token, rank]
            if token_mask[token] and (capacity is None or used[expert] < capacity):
                used[expert] += 1
                kept[token, rank] = True
    return kept


def dense_moe(layer, inputs, mask=None, capacity=None):
    """Reference forward pass of `tf_moe.MoE` at inference.

    Args:
        layer: a built `tf_moe.MoE`.
        inputs: `[..., d]`.
        mask: optional `[...]` bool.
        capacity: None (dropless) or the layer's per-expert capacity.

    Returns:
        `[..., d_out]`.
    """
    inputs = tf.convert_to_tensor(inputs)
    tokens = tf.reshape(inputs, [-1, inputs.shape[-1]])
    num_tokens = tokens.shape[0]
    token_mask = (np.ones(num_tokens, bool) if mask is None
                  else np.reshape(np.asarray(mask), [-1]))
    gate = layer.gate(tokens, token_mask=tf.constant(token_mask))
    kept = capacity_keep_mask(gate.expert_ids.numpy(), layer.num_experts,
                              capacity, token_mask)
    weights = gate.gate_weights * kept
    token_index = np.repeat(np.arange(num_tokens), layer.k)
    dense_gates = tf.scatter_nd(
        np.stack([token_index, gate.expert_ids.numpy().ravel()], axis=1),
        tf.reshape(weights, [-1]), [num_tokens, layer.num_experts])

    experts = layer.experts
    hidden = tf.einsum("td,edh->teh", tokens, experts.kernel_in) + experts.bias_in
    hidden = experts.activation(hidden)
    every_output = (tf.einsum("teh,eho->teo", hidden, experts.kernel_out)
                    + experts.bias_out)
    outputs = tf.einsum("te,teo->to", dense_gates, every_output)
    return tf.reshape(outputs, list(inputs.shape[:-1]) + [outputs.shape[-1]])
