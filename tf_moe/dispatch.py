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

    Attributes:
        buffer_token_index: `[E, C]` int32, the token that fills each buffer
            row; unfilled rows point at index `tokens` (a zero row).
        slot_buffer_row: `[tokens, k]` int32, the row of `[E * C]` buffers
            that holds each slot's expert output (0 where not kept).
        slot_kept: `[tokens, k]` bool, the slot is a real token within its
            expert's capacity.
        expert_counts: `[E]` int32 slots routed to each expert, before the
            capacity is applied (masked tokens not counted).
        capacity: scalar int32, C.
        num_dropped: scalar int32, routed slots past the capacity.
    """

    buffer_token_index: tf.Tensor
    slot_buffer_row: tf.Tensor
    slot_kept: tf.Tensor
    expert_counts: tf.Tensor
    capacity: tf.Tensor
    num_dropped: tf.Tensor


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

    # Buffer side: row (e, c) takes the c-th sorted slot of expert e.
    row_in_expert = tf.range(capacity)
    sorted_pos = starts[:num_experts, None] + row_in_expert[None, :]
    row_filled = row_in_expert[None, :] < expert_counts[:, None]
    # The trailing entry is the zero row for unfilled buffer rows (and the
    # only entry when the batch is empty, so the gather stays in range).
    token_of_sorted = tf.concat(
        [order % tf.maximum(num_tokens, 1), num_tokens[None]], axis=0)
    buffer_token_index = tf.gather(
        token_of_sorted,
        tf.where(row_filled, sorted_pos, num_slots))

    # Slot side: each slot's position within its expert's buffer.
    sorted_experts = tf.gather(slot_experts, order)
    position_sorted = tf.range(num_slots) - tf.gather(starts, sorted_experts)
    position = tf.gather(position_sorted, tf.math.invert_permutation(order))
    slot_kept = (slot_experts < num_experts) & (position < capacity)
    slot_row = tf.where(slot_kept, slot_experts * capacity + position, 0)

    def to_token_major(slot_values):
        return tf.transpose(tf.reshape(slot_values, [k, num_tokens]))

    num_dropped = tf.reduce_sum(tf.maximum(expert_counts - capacity, 0))
    return DispatchPlan(
        buffer_token_index=buffer_token_index,
        slot_buffer_row=to_token_major(slot_row),
        slot_kept=to_token_major(slot_kept),
        expert_counts=expert_counts,
        capacity=capacity,
        num_dropped=num_dropped,
    )


def dispatch(tokens, plan):
    """Gathers tokens into per-expert buffers.

    Args:
        tokens: `[tokens, d]`.
        plan: a `DispatchPlan`.

    Returns:
        `[E, C, d]`; unfilled rows are zero.
    """
    zero_row = tf.zeros([1, tokens.shape[-1]], tokens.dtype)
    return tf.gather(tf.concat([tokens, zero_row], axis=0),
                     plan.buffer_token_index)


def combine(expert_outputs, plan, gate_weights):
    """Weighted sum of each token's expert outputs.

    Args:
        expert_outputs: `[E, C, d_out]`.
        plan: the `DispatchPlan` the buffers were made with.
        gate_weights: `[tokens, k]`; dropped and masked slots count as 0.

    Returns:
        `[tokens, d_out]`, zero for masked tokens.
    """
    d_out = expert_outputs.shape[-1]
    rows = tf.reshape(expert_outputs, [-1, d_out])
    slot_outputs = tf.gather(rows, plan.slot_buffer_row)  # [tokens, k, d_out]
    weights = tf.where(plan.slot_kept, gate_weights,
                       tf.zeros_like(gate_weights))
    return tf.einsum("tk,tkd->td", tf.cast(weights, rows.dtype), slot_outputs)
