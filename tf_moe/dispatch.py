"""Dispatch and combine: tokens -> expert buffers -> tokens, by a plan.

Both are gathers through a `tf_moe.plan.DispatchPlan`'s index maps, and so
are their gradients (through the inverse map, rather than TensorFlow's
default scatter-add). Every function takes the plan's shard dimension,
`[shards, ...]`, or none (a plan made from `[tokens, k]` ids).
"""

import tensorflow as tf

from tf_moe import scoped_gradient


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
    padded = _pad_one_row(values, batch_dims)
    return tf.gather(padded, indices, batch_dims=batch_dims)


def _pad_one_row(values, axis):
    """`values` with one zero row appended along `axis` (the index one past
    the end reads it); see `gather_padded`."""
    values = tf.convert_to_tensor(values)
    if values.shape[axis]:
        # A zero slice of the values keeps their layout on a mesh (a Pad
        # would give the n + 1 rows the sharding of the n).
        pad = tf.zeros_like(values[(slice(None),) * axis + (slice(0, 1),)])
        return tf.concat([values, pad], axis=axis)
    paddings = [[0, 0]] * values.shape.rank  # n unknown, or 0 (empty batch)
    paddings[axis] = [0, 1]
    return tf.pad(values, paddings)


def dispatch(tokens, plan):
    """Gathers tokens into the expert buffers.

    Each buffer group is gathered on its own, and the gradient gathers both
    groups' rows back to the tokens: the groups are never sliced out of one
    tensor (a slice's gradient writes a zero tensor of the whole).

    Args:
        tokens: `[..., tokens, d]`.
        plan: a `DispatchPlan`.

    Returns:
        `(main [..., E, C, d], overflow [E2, C2, d])`, overflow None for a
        plan without an overflow group; unfilled rows are zero. A packed
        plan's main buffer is `[..., N, d]`, its rows.
    """
    shard_dims = _shard_dims(plan)
    k = tf.shape(plan.slot_buffer_row)[-1]
    model_dim = tokens.shape[-1]
    num_experts = plan.num_experts
    lead = plan.slot_buffer_row.shape[:shard_dims].as_list()
    row_tokens = plan.buffer_slot // k  # One past the last: a zero row.

    def to_main(rows):
        if plan.packed:
            return rows
        return tf.reshape(rows, lead + [num_experts, plan.capacity,
                                        model_dim])

    def to_overflow(rows):  # One shard: its overflow rows follow the main.
        return tf.reshape(rows, [tf.size(plan.overflow_experts),
                                 plan.overflow_capacity, model_dim])

    def rows_to_tokens(d_rows):
        return tf.reduce_sum(gather_padded(
            d_rows, plan.slot_buffer_row, batch_dims=shard_dims), axis=-2)

    if not plan.has_overflow:
        @scoped_gradient.custom_gradient
        def gather_main(tokens):
            def grad(d_main):
                return rows_to_tokens(tf.reshape(d_main,
                                                 lead + [-1, model_dim]))
            return to_main(gather_padded(tokens, row_tokens,
                                         batch_dims=shard_dims)), grad

        return gather_main(tokens), None

    num_main_rows = num_experts * plan.capacity

    @scoped_gradient.custom_gradient
    def gather_both(tokens):
        padded = _pad_one_row(tokens, shard_dims)
        main = tf.gather(padded, row_tokens[..., :num_main_rows],
                         batch_dims=shard_dims)
        overflow = tf.gather(tf.reshape(padded, [-1, model_dim]),
                             tf.reshape(row_tokens, [-1])[num_main_rows:])

        def grad(d_main, d_overflow):
            return rows_to_tokens(tf.concat(
                [tf.reshape(d_main, lead + [-1, model_dim]),
                 tf.reshape(d_overflow, [1] * shard_dims + [-1, model_dim])],
                axis=-2))

        return (to_main(main), to_overflow(overflow)), grad

    return gather_both(tokens)


def combine(expert_outputs, plan, gate_weights):
    """Weighted sum of each token's expert outputs.

    Args:
        expert_outputs: `(main [..., E, C, d_out], overflow [E2, C2, d_out]
            or None)`; a packed plan's main is `[..., N, d_out]`.
        plan: the `DispatchPlan` the buffers were made with.
        gate_weights: `[..., tokens, k]`; slots not kept contribute nothing.

    Returns:
        `[..., tokens, d_out]`, zero for masked tokens.
    """
    main, overflow = expert_outputs
    shard_dims = _shard_dims(plan)
    d_out = main.shape[-1]
    lead = main.shape[:shard_dims].as_list()
    main_shape = tf.shape(main)

    def main_rows(main):
        return tf.reshape(main, lead + [-1, d_out])

    def slots_padded(d_slot_outputs):
        return _pad_one_row(tf.reshape(d_slot_outputs, lead + [-1, d_out]),
                            shard_dims)

    if overflow is None:
        @scoped_gradient.custom_gradient
        def gather_from_main(main):
            def grad(d_slot_outputs):
                return tf.reshape(gather_padded(
                    tf.reshape(d_slot_outputs, lead + [-1, d_out]),
                    plan.buffer_slot, batch_dims=shard_dims), main_shape)
            return gather_padded(main_rows(main), plan.slot_buffer_row,
                                 batch_dims=shard_dims), grad

        slot_outputs = gather_from_main(main)
    else:
        overflow_shape = tf.shape(overflow)
        num_main_rows = plan.num_experts * plan.capacity

        @scoped_gradient.custom_gradient
        def gather_from_both(main, overflow):
            rows = tf.concat([main_rows(main), tf.reshape(
                overflow, [1] * shard_dims + [-1, d_out])], axis=-2)

            def grad(d_slot_outputs):
                # Each group's rows gathered on its own (no slices of one
                # tensor of all rows).
                padded = slots_padded(d_slot_outputs)
                d_main = tf.gather(padded,
                                   plan.buffer_slot[..., :num_main_rows],
                                   batch_dims=shard_dims)
                d_overflow = tf.gather(
                    tf.reshape(padded, [-1, d_out]),
                    tf.reshape(plan.buffer_slot, [-1])[num_main_rows:])
                return (tf.reshape(d_main, main_shape),
                        tf.reshape(d_overflow, overflow_shape))

            return gather_padded(rows, plan.slot_buffer_row,
                                 batch_dims=shard_dims), grad

        slot_outputs = gather_from_both(main, overflow)
    # slot_outputs: [..., tokens, k, d_out]. Multiply and sum rather than
    # einsum, which becomes a batched matmul of `tokens` tiny [1, k] x
    # [k, d] products (several times slower here).
    weights = tf.cast(gate_weights, slot_outputs.dtype)[..., None]
    return tf.reduce_sum(slot_outputs * weights, axis=-2)
