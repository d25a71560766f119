"""Sparse dispatch: (token, slot) routing -> per-expert buffers -> tokens.

A plan sorts the `tokens * k` routing slots by expert (one argsort of
`tokens * k` ints) and gives every slot its position in its expert's buffer.
Dispatch and combine are then plain gathers: no tensor of shape
`[tokens, experts, capacity]`, no one-hot einsum, no loop over experts.
Their gradients are segment sums over the same indices.

Buffers are `[E, C, d]`. C is the capacity: the largest expert's count
(dropless) or a fixed number (then slots past it are dropped and counted).
"""

import math
from typing import NamedTuple

import tensorflow as tf


class DispatchPlan(NamedTuple):
    """Where every routing slot goes, for one batch.

    Slots are numbered token-major: slot `token * k + rank`. Buffer rows are
    numbered `expert * C + position`. The two index maps below are inverse
    to each other on kept slots, which makes dispatch and combine, and both
    of their gradients, plain gathers.

    Attributes:
        buffer_slot: `[E, C]` int32, the slot that fills each buffer row;
            `tokens * k` (one past the last slot) for unfilled rows.
        slot_buffer_row: `[tokens, k]` int32, the buffer row holding each
            slot; `E * C` (one past the last row) for slots not kept
            (masked tokens, and slots past their expert's capacity).
        expert_counts: `[E]` int32 slots routed to each expert, before the
            capacity is applied (masked tokens not counted).
        capacity: scalar int32, C.
        num_dropped: scalar int32, routed slots past the capacity.
    """

    buffer_slot: tf.Tensor
    slot_buffer_row: tf.Tensor
    expert_counts: tf.Tensor
    capacity: tf.Tensor
    num_dropped: tf.Tensor

    @property
    def slot_kept(self):
        """`[tokens, k]` bool: the slot is computed by its expert."""
        num_rows = tf.size(self.buffer_slot, out_type=tf.int32)
        return self.slot_buffer_row < num_rows


def fixed_capacity(num_tokens, num_experts, k, capacity_factor):
    """`ceil(capacity_factor * k * tokens / E)`, a Python int when it can be.

    Args:
        num_tokens: int, or a scalar int tensor when the batch is dynamic.
    """
    if isinstance(num_tokens, int):
        return int(math.ceil(capacity_factor * k * num_tokens / num_experts))
    expected = tf.cast(num_tokens * k, tf.float64) / num_experts
    return tf.cast(tf.math.ceil(capacity_factor * expected), tf.int32)


def make_dispatch_plan(expert_ids, num_experts, capacity=None,
                       token_mask=None):
    """Builds the routing plan for one batch.

    Within an expert, slots are taken in order of gate rank, then token:
    every token's first choice is placed before any token's second choice,
    so a capacity drops the weakest assignments first.

    Args:
        expert_ids: `[tokens, k]` int32 expert of each slot.
        num_experts: E.
        capacity: None for dropless (C = the largest count, at least 1), or
            an int / scalar int tensor.
        token_mask: optional `[tokens]` bool; masked tokens are not routed.

    Returns:
        A `DispatchPlan`.
    """
    expert_ids = tf.convert_to_tensor(expert_ids, tf.int32)
    k = expert_ids.shape[-1]
    num_tokens = tf.shape(expert_ids)[0]
    num_slots = num_tokens * k

    # Slot s = rank * tokens + token (rank-major), see the docstring.
    slot_experts = tf.reshape(tf.transpose(expert_ids), [-1])
    if token_mask is not None:
        # Masked slots go to a sentinel expert E: sorted last, never placed.
        slot_valid = tf.tile(tf.reshape(token_mask, [-1]), [k])
        slot_experts = tf.where(slot_valid, slot_experts, num_experts)
    counts_with_sentinel = tf.math.unsorted_segment_sum(
        tf.ones_like(slot_experts), slot_experts, num_experts + 1)
    expert_counts = counts_with_sentinel[:num_experts]
    starts = tf.cumsum(counts_with_sentinel, exclusive=True)

    if capacity is None:
        capacity = tf.maximum(tf.reduce_max(expert_counts), 1)
    capacity = tf.convert_to_tensor(capacity, tf.int32)

    order = tf.argsort(slot_experts, stable=True)  # sorted pos -> slot

    # Slot side: each slot's position within its expert's buffer.
    sorted_experts = tf.gather(slot_experts, order)
    position_sorted = tf.range(num_slots) - tf.gather(starts, sorted_experts)
    position = tf.gather(position_sorted, tf.math.invert_permutation(order))
    slot_kept = (slot_experts < num_experts) & (position < capacity)
    slot_row = tf.where(slot_kept, slot_experts * capacity + position,
                        num_experts * capacity)
    slot_buffer_row = tf.transpose(tf.reshape(slot_row, [k, num_tokens]))

    # Buffer side: row (e, c) takes the c-th sorted slot of expert e,
    # renumbered from rank-major to token-major.
    row_in_expert = tf.range(capacity)
    sorted_pos = starts[:num_experts, None] + row_in_expert[None, :]
    row_filled = row_in_expert[None, :] < expert_counts[:, None]
    rank_major_slot = tf.gather(
        tf.concat([order, [num_slots]], axis=0),
        tf.where(row_filled, sorted_pos, num_slots))
    safe_tokens = tf.maximum(num_tokens, 1)
    buffer_slot = tf.where(
        row_filled,
        (rank_major_slot % safe_tokens) * k + rank_major_slot // safe_tokens,
        num_slots)

    num_dropped = tf.reduce_sum(tf.maximum(expert_counts - capacity, 0))
    return DispatchPlan(
        buffer_slot=buffer_slot,
        slot_buffer_row=slot_buffer_row,
        expert_counts=expert_counts,
        capacity=capacity,
        num_dropped=num_dropped,
    )


def _gather_padded(values, indices):
    """`values[indices]` for `[n, d]` values, with index n giving zeros."""
    zero_row = tf.zeros([1, values.shape[-1]], values.dtype)
    return tf.gather(tf.concat([values, zero_row], axis=0), indices)


def dispatch(tokens, plan):
    """Gathers tokens into per-expert buffers.

    The gradient sums each token's k buffer rows with one gather through
    `slot_buffer_row` (rather than TensorFlow's default scatter-add).

    Args:
        tokens: `[tokens, d]`.
        plan: a `DispatchPlan`.

    Returns:
        `[E, C, d]`; unfilled rows are zero.
    """
    k = plan.slot_buffer_row.shape[-1]

    @tf.custom_gradient
    def gather_into_buffers(tokens):
        buffers = _gather_padded(tokens, plan.buffer_slot // k)

        def grad(d_buffers):
            d_rows = tf.reshape(d_buffers, [-1, tokens.shape[-1]])
            return tf.reduce_sum(
                _gather_padded(d_rows, plan.slot_buffer_row), axis=1)

        return buffers, grad

    return gather_into_buffers(tokens)


def combine(expert_outputs, plan, gate_weights):
    """Weighted sum of each token's expert outputs.

    Args:
        expert_outputs: `[E, C, d_out]`.
        plan: the `DispatchPlan` the buffers were made with.
        gate_weights: `[tokens, k]`; slots not kept contribute nothing.

    Returns:
        `[tokens, d_out]`, zero for masked tokens.
    """
    d_out = expert_outputs.shape[-1]

    @tf.custom_gradient
    def gather_from_buffers(rows):
        slot_outputs = _gather_padded(rows, plan.slot_buffer_row)

        def grad(d_slot_outputs):
            d_slots = tf.reshape(d_slot_outputs, [-1, d_out])
            return _gather_padded(d_slots, plan.buffer_slot)

        return slot_outputs, grad

    slot_outputs = gather_from_buffers(tf.reshape(expert_outputs, [-1, d_out]))
    # Multiply and sum rather than einsum, which becomes a batched matmul
    # of `tokens` tiny [1, k] x [k, d] products (several times slower here).
    weights = tf.cast(gate_weights, slot_outputs.dtype)[:, :, None]
    return tf.reduce_sum(slot_outputs * weights, axis=1)
