"""Dispatch within groups of tokens at a fixed capacity: the mesh's dispatch.

On a mesh every data-parallel shard of the batch is one group. It routes
its own tokens into its own `[E, C, d]` buffers, as each replica does in
the paper's section 3, and relayouting the stacked `[G, E, C, d]` buffers
from group-sharded to expert-sharded is the all-to-all that takes every
token to the device of its expert. Every op here is batched over the
leading group dimension, so DTensor runs each group where it lives.

The rules are those of `dispatch.make_dispatch_plan` with a fixed
capacity, applied to each group alone: slots are taken rank-major (every
token's first choice before any token's second), so a full expert drops the
weakest assignments. Positions are counted with a one-hot cumulative sum
over `[G, k*S, E]` rather than a sort and a search: the flat plan's
`searchsorted` has no DTensor layout propagation (TF 2.21). That is `O(E)`
integer work per slot, the same order as the gate's `[S, E]` logits.
"""

from typing import NamedTuple

import tensorflow as tf


class GroupedPlan(NamedTuple):
    """Where every routing slot of every group goes.

    Slot `r * S + s` of a group is rank `r` of its token `s` (rank-major).

    Attributes:
        row_token: `[G, E*C]` int32, the token (within its group) that fills
            each buffer row; `S` for an unfilled row.
        row_slot: `[G, E*C]` int32, the token-major slot `s * k + r` that
            fills each row; `S*k` for an unfilled row.
        slot_row: `[G, S, k]` int32, the buffer row of each slot; `E*C` for
            a slot not kept (masked, or past the capacity).
        group_counts: `[G, E]` int32, slots routed to each expert by each
            group, before the capacity.
        capacity: int C, rows per expert per group.
    """

    row_token: tf.Tensor
    row_slot: tf.Tensor
    slot_row: tf.Tensor
    group_counts: tf.Tensor
    capacity: int

    @property
    def expert_counts(self):
        """`[E]` int32 slots routed to each expert over all groups."""
        return tf.reduce_sum(self.group_counts, axis=0)

    @property
    def num_dropped(self):
        """Scalar int32: routed slots that no buffer row holds."""
        kept = tf.reduce_sum(tf.minimum(self.group_counts, self.capacity))
        return tf.reduce_sum(self.group_counts) - kept

    @property
    def slot_kept(self):
        """`[G, S, k]` bool: the slot is computed by its expert."""
        return self.slot_row < tf.shape(self.row_token)[1]


def make_grouped_plan(expert_ids, num_experts, capacity, token_mask=None,
                      slot_mask=None):
    """Builds the plan of every group at once.

    Args:
        expert_ids: `[G, S, k]` int32 expert of each slot.
        num_experts: E.
        capacity: int C, rows per expert in every group.
        token_mask: optional `[G, S]` bool; masked tokens are not routed.
        slot_mask: optional `[G, S, k]` bool; masked slots are not routed.

    Returns:
        A `GroupedPlan`.
    """
    expert_ids = tf.convert_to_tensor(expert_ids, tf.int32)
    shape = tf.shape(expert_ids)
    num_groups, num_tokens, k = shape[0], shape[1], shape[2]
    num_slots = num_tokens * k
    num_rows = num_experts * capacity

    def rank_major(x):  # [G, S, k] -> [G, k*S]
        return tf.reshape(tf.transpose(x, [0, 2, 1]), [num_groups, -1])

    slot_experts = rank_major(expert_ids)
    slot_valid = tf.ones_like(slot_experts, tf.bool)
    if token_mask is not None:
        slot_valid &= tf.tile(token_mask, [1, k])
    if slot_mask is not None:
        slot_valid &= rank_major(slot_mask)
    # Masked slots get the one-hot row of no expert: counted nowhere.
    one_hot = tf.one_hot(tf.where(slot_valid, slot_experts, num_experts),
                         num_experts, dtype=tf.int32)  # [G, k*S, E]
    position = tf.reduce_sum(
        tf.cumsum(one_hot, axis=1, exclusive=True) * one_hot, axis=-1)
    group_counts = tf.reduce_sum(one_hot, axis=1)
    kept = slot_valid & (position < capacity)
    slot_row = tf.where(kept, slot_experts * capacity + position, num_rows)

    # Buffer side: kept slots sorted by row are the filled rows in order, so
    # expert e's c-th row is sorted entry (rows filled before e) + c.
    order = tf.argsort(slot_row, axis=1, stable=True)  # [G, k*S]
    filled = tf.minimum(group_counts, capacity)  # [G, E]
    first = tf.cumsum(filled, axis=1, exclusive=True)
    row_in_expert = tf.range(capacity)
    is_filled = row_in_expert[None, None, :] < filled[:, :, None]
    sorted_index = tf.where(is_filled,
                            first[:, :, None] + row_in_expert, num_slots)
    order = tf.concat([order, tf.fill([num_groups, 1], num_slots)], axis=1)
    rank_major_slot = tf.gather(
        order, tf.reshape(sorted_index, [num_groups, num_rows]), batch_dims=1)
    is_row_filled = rank_major_slot < num_slots
    token = rank_major_slot % tf.maximum(num_tokens, 1)
    row_token = tf.where(is_row_filled, token, num_tokens)
    row_slot = tf.where(is_row_filled,
                        token * k + rank_major_slot // tf.maximum(num_tokens, 1),
                        num_slots)
    slot_row = tf.transpose(
        tf.reshape(slot_row, [num_groups, k, num_tokens]), [0, 2, 1])
    return GroupedPlan(row_token=row_token, row_slot=row_slot,
                       slot_row=slot_row, group_counts=group_counts,
                       capacity=capacity)


def gather_padded(values, indices):
    """`values[g, indices[g]]` for `[G, n, ...]` values; index n (the
    plan's one-past-the-end "none") gives zero (False)."""
    pad = tf.zeros_like(values[:, :1])  # Keeps the values' layout.
    return tf.gather(tf.concat([values, pad], axis=1), indices, batch_dims=1)


def dispatch(tokens, plan, num_experts):
    """Gathers every group's tokens into its expert buffers.

    The gradient sums each token's k rows with one gather through
    `slot_row` (rather than TensorFlow's default scatter-add).

    Args:
        tokens: `[G, S, d]`.
        plan: the groups' `GroupedPlan`.
        num_experts: E.

    Returns:
        `[G, E, C, d]`; unfilled rows are zero.
    """
    num_groups = tf.shape(tokens)[0]
    model_dim = tokens.shape[-1]

    @tf.custom_gradient
    def gather_into_rows(tokens):
        rows = gather_padded(tokens, plan.row_token)

        def grad(d_rows):
            return tf.reduce_sum(gather_padded(d_rows, plan.slot_row),
                                 axis=2)

        return rows, grad

    rows = gather_into_rows(tokens)
    return tf.reshape(rows, [num_groups, num_experts, plan.capacity,
                             model_dim])


def combine(expert_outputs, plan, gate_weights):
    """Weighted sum of each token's expert outputs, group by group.

    Args:
        expert_outputs: `[G, E, C, d_out]`, in the layout of the groups.
        plan: the `GroupedPlan` the buffers were made with.
        gate_weights: `[G, S, k]`; slots not kept contribute nothing.

    Returns:
        `[G, S, d_out]`, zero for masked tokens.
    """
    num_groups = tf.shape(expert_outputs)[0]
    d_out = expert_outputs.shape[-1]

    @tf.custom_gradient
    def gather_from_rows(rows):
        slot_outputs = gather_padded(rows, plan.slot_row)  # [G, S, k, d]

        def grad(d_slot_outputs):
            d_slots = tf.reshape(d_slot_outputs, [num_groups, -1, d_out])
            return gather_padded(d_slots, plan.row_slot)

        return slot_outputs, grad

    rows = tf.reshape(expert_outputs, [num_groups, -1, d_out])
    slot_outputs = gather_from_rows(rows)
    weights = tf.cast(gate_weights, slot_outputs.dtype)[..., None]
    return tf.reduce_sum(slot_outputs * weights, axis=2)
