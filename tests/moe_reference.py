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
    dense_gates = _scatter_gates(gate.expert_ids.numpy(),
                                 gate.gate_weights * kept, layer.num_experts)
    outputs = tf.einsum("te,teo->to", dense_gates,
                        every_expert(layer.experts, tokens))
    outputs += shared_experts(layer, tokens, token_mask)
    return tf.reshape(outputs, list(inputs.shape[:-1]) + [outputs.shape[-1]])


def _scatter_gates(expert_ids, gate_weights, num_experts):
    """`[tokens, k]` sparse gates -> `[tokens, E]` dense ones."""
    num_tokens, k = expert_ids.shape
    token_index = np.repeat(np.arange(num_tokens), k)
    return tf.scatter_nd(
        np.stack([token_index, np.asarray(expert_ids).ravel()], axis=1),
        tf.reshape(gate_weights, [-1]), [num_tokens, num_experts])


def every_expert(experts, tokens):
    """`[tokens, E, d_out]`: every expert's output on every token."""
    hidden = tf.einsum("td,edh->teh", tokens, experts.kernel_in)
    if experts.bias_in is not None:
        hidden += experts.bias_in
    if experts.expert_type == "glu":
        gate, up = tf.split(hidden, 2, axis=-1)
        hidden = experts.activation(gate) * up
    else:
        hidden = experts.activation(hidden)
    outputs = tf.einsum("teh,eho->teo", hidden, experts.kernel_out)
    if experts.bias_out is not None:
        outputs += experts.bias_out
    return outputs


def shared_experts(layer, tokens, token_mask):
    """`[tokens, d_out]`: the layer's shared experts on every unmasked token
    (zeros without shared experts)."""
    if layer.shared_experts is None:
        return 0.0
    outputs = tf.reduce_sum(every_expert(layer.shared_experts, tokens), 1)
    return outputs * np.asarray(token_mask, np.float32)[:, None]


def dense_hierarchical_moe(layer, inputs, mask=None):
    """Reference inference pass of `tf_moe.HierarchicalMoE` (dropless).

    Every group's gate runs on every token and every expert on every token;
    the two levels of top-k gates are combined densely.

    Returns:
        `(outputs [..., d_out], importance_h [G * B], load_h [G * B] or None)`.
    """
    inputs = tf.convert_to_tensor(inputs)
    tokens = tf.reshape(inputs, [-1, inputs.shape[-1]])
    num_tokens = tokens.shape[0]
    token_mask = (np.ones(num_tokens, bool) if mask is None
                  else np.reshape(np.asarray(mask), [-1]))
    groups, per_group = layer.num_groups, layer.experts_per_group
    k2 = layer.k_secondary
    primary = layer.primary_gate(tokens, token_mask=tf.constant(token_mask))
    primary_dense = _scatter_gates(primary.expert_ids.numpy(),
                                   primary.gate_weights, groups)  # [T, G]

    secondary = layer.secondary_gate
    logits = tf.einsum("td,gdb->tgb", tokens, secondary.gate_kernel)
    top_values, top_ids = tf.math.top_k(logits, k=k2)
    secondary_dense = tf.reshape(_scatter_gates(
        tf.reshape(top_ids, [-1, k2]).numpy(),
        tf.nn.softmax(tf.reshape(top_values, [-1, k2]), axis=-1),
        per_group), [num_tokens, groups, per_group])
    gates = primary_dense[:, :, None] * secondary_dense  # [T, G, B]
    flat_gates = tf.reshape(gates, [num_tokens, groups * per_group])
    outputs = tf.einsum("te,teo->to", flat_gates,
                        every_expert(layer.experts, tokens))
    outputs += shared_experts(layer, tokens, token_mask)
    outputs = tf.reshape(outputs,
                         list(inputs.shape[:-1]) + [outputs.shape[-1]])
    importance_h = tf.reduce_sum(flat_gates, axis=0)

    load_h = None
    if primary.load is not None:
        from tf_moe.balance import selection_probability
        noise_logits = tf.einsum("td,gdb->tgb", tokens, secondary.noise_kernel)
        stddev = tf.nn.softplus(noise_logits) + secondary.noise_epsilon
        num_top = min(k2 + 1, per_group)
        flat = lambda x: tf.reshape(x, [-1, x.shape[-1]])
        probability = tf.reshape(selection_probability(
            flat(logits), flat(logits), flat(stddev),
            flat(tf.math.top_k(logits, k=num_top).values), k2),
            [num_tokens, groups, per_group])
        routed = np.zeros((num_tokens, groups), np.float32)
        for token in range(num_tokens):
            if token_mask[token]:
                routed[token, primary.expert_ids.numpy()[token]] = 1.0
        group_tokens = routed.sum(axis=0)
        group_load = tf.einsum("tg,tgb->gb", routed, probability)
        per_token = tf.where(group_tokens[:, None] > 0,
                             group_load / np.maximum(group_tokens, 1)[:, None],
                             k2 / per_group)
        load_h = tf.reshape(primary.load[:, None] * per_token, [-1])
    return outputs, importance_h, load_h
