"""Dispatch and combine: tokens -> expert buffers -> tokens, by a plan.

Both are gathers through a `tf_moe.plan.DispatchPlan`'s index maps, and so
are their gradients (through the inverse map, rather than TensorFlow's
default scatter-add). Every function takes the plan's shard dimension,
`[shards, ...]`, or none (a plan made from `[tokens, k]` ids).
"""

import tensorflow as tf

def _shard_dims(plan):
    """0 for a plan without a shard dimension, 1 with one."""
    return plan.slot_buffer_row.shape.rank - 2


def gather_padded(values, indices, batch_dims=0):
    """`values[..., indices]` along axis `batch_dims`, the index one past
    the end giving zero (False).

    A plan's index maps use one-past-the-end for "none" (unfilled rows,
    slots not kept); this reads them without a mask.

    Args:
        values: `[*batch, n, ...]`, `batch_dims` leading batch dimensions.
        indices: `[*batch, ...]` int32 in `[0, n]`.
    """
    values = tf.convert_to_tensor(values)
    if values.shape[batch_dims]:
        # A zero slice of the values keeps their layout on a mesh (a Pad
        # would give the n + 1 rows the sharding of the n).
        pad = tf.zeros_like(values[(slice(None),) * batch_dims
                                   + (slice(0, 1),)])
        padded = tf.concat([values, pad], axis=batch_dims)
    else:  # n unknown, or 0 (an empty batch)
        paddings = [[0, 0]] * values.shape.rank
        paddings[batch_dims] = [0, 1]
        padded = tf.pad(values, paddings)
    return tf.gather(padded, indices, batch_dims=batch_dims)


def dispatch(tokens, plan):
    """Gathers tokens into the expert buffers.

    Args:
        tokens: `[..., tokens, d]`.
        plan: a `DispatchPlan`.

    Returns:
        `(main [..., E, C, d], overflow [E2, C2, d])`, overflow None for a
        plan without an overflow group; unfilled rows are zero.
    """
    shard_dims = _shard_dims(plan)
    k = tf.shape(plan.slot_buffer_row)[-1]
    model_dim = tokens.shape[-1]

    @tf.custom_gradient
    def gather_into_rows(tokens):
        rows = gather_padded(tokens, plan.buffer_slot // k,
                             batch_dims=shard_dims)

        def grad(d_rows):
            return tf.reduce_sum(gather_padded(
                d_rows, plan.slot_buffer_row, batch_dims=shard_dims), axis=-2)

        return rows, grad

    rows = gather_into_rows(tokens)  # [..., rows, d]
    num_experts = plan.num_experts
    num_main_rows = num_experts * plan.capacity
    lead = rows.shape[:shard_dims].as_list()
    main = tf.reshape(rows[..., :num_main_rows, :],
                      lead + [num_experts, plan.capacity, model_dim])
    overflow = None
    if plan.has_overflow:  # One shard: its overflow rows follow the main.
        overflow = tf.reshape(
            rows[..., num_main_rows:, :],
            [tf.size(plan.overflow_experts), plan.overflow_capacity,
             model_dim])
    return main, overflow


def combine(expert_outputs, plan, gate_weights):
    """Weighted sum of each token's expert outputs.

    Args:
        expert_outputs: `(main [..., E, C, d_out], overflow [E2, C2, d_out]
            or None)`.
        plan: the `DispatchPlan` the buffers were made with.
        gate_weights: `[..., tokens, k]`; slots not kept contribute nothing.

    Returns:
        `[..., tokens, d_out]`, zero for masked tokens.
    """
    main, overflow = expert_outputs
    shard_dims = _shard_dims(plan)
    d_out = main.shape[-1]
    lead = main.shape[:shard_dims].as_list()
    rows = tf.reshape(main, lead + [-1, d_out])
    if overflow is not None:
        rows = tf.concat(
            [rows, tf.reshape(overflow, [1] * shard_dims + [-1, d_out])],
            axis=-2)

    @tf.custom_gradient
    def gather_from_rows(rows):
        slot_outputs = gather_padded(rows, plan.slot_buffer_row,
                                     batch_dims=shard_dims)

        def grad(d_slot_outputs):
            d_slots = tf.reshape(d_slot_outputs, lead + [-1, d_out])
            return gather_padded(d_slots, plan.buffer_slot,
                                 batch_dims=shard_dims)

        return slot_outputs, grad

    slot_outputs = gather_from_rows(rows)  # [..., tokens, k, d_out]
    # Multiply and sum rather than einsum, which becomes a batched matmul
    # of `tokens` tiny [1, k] x [k, d] products (several times slower here).
    weights = tf.cast(gate_weights, slot_outputs.dtype)[..., None]
    return tf.reduce_sum(slot_outputs * weights, axis=-2)
