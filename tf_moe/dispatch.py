"""Sparse dispatch: (token, slot) routing -> per-expert buffers -> tokens.

A plan sorts the `tokens * k` routing slots by expert (one argsort of
`tokens * k` ints) and gives every slot a row in the expert buffers.
Dispatch and combine are then gathers, and so are their gradients (through
the inverse index map): no tensor of shape `[tokens, experts, capacity]`, no
one-hot einsum, no loop over experts.

Buffer layout. The experts run as batched matmuls, which need the same
number of rows for every expert, so rows are padded. Padding every expert to
the largest count wastes compute (at initialisation, with E=256 and 32K
slots, the largest count is 1.27 times the mean) and, when routing is
skewed, grows with E. So the rows come in two groups:

- main: `[E, C, d]`, rows `e * C + c`: the first C slots of every expert;
- overflow: `[E2, C2, d]`, rows `E * C + j * C2 + c`: slots C .. C + C2 - 1
  of the E2 experts that have more than C (their weights are gathered).

Dropless (no capacity): C2 = largest count - C, and C minimises the padded
rows plus a cost per overflow expert for gathering its weights. With a fixed
capacity: C is that capacity, E2 = C2 = 0, and slots past it are dropped and
counted (static shapes, so this mode compiles with XLA).
"""

import math
from typing import NamedTuple

import tensorflow as tf

# What running an expert in the overflow group costs beyond its rows
# (gathering its weights, scattering their gradient back), in rows of
# compute. About 16 for d=512, h=1024 on a 2-core CPU: 4 passes over the
# expert's weights at ~19 GB/s against 6 multiply-adds per weight and row
# at ~100 GFLOP/s.
OVERFLOW_EXPERT_COST = 16


class DispatchPlan(NamedTuple):
    """Where every routing slot goes, for one batch.

    Slots are numbered token-major: slot `token * k + rank`. The two index
    maps below are inverse to each other on kept slots.

    Attributes:
        buffer_slot: `[rows]` int32, the slot that fills each buffer row
            (main rows first, then overflow rows); `tokens * k` (one past
            the last slot) for unfilled rows.
        slot_buffer_row: `[tokens, k]` int32, the buffer row holding each
            slot; `rows` (one past the last row) for slots not kept (masked
            tokens, and slots past a fixed capacity).
        expert_counts: `[E]` int32 slots routed to each expert (masked
            tokens not counted).
        capacity: scalar int32 C, rows per expert in the main group.
        overflow_experts: `[E2]` int32, experts with overflow rows.
        overflow_capacity: scalar int32 C2, rows per overflow expert.
        num_dropped: scalar int32, routed slots that were not kept.
    """

    buffer_slot: tf.Tensor
    slot_buffer_row: tf.Tensor
    expert_counts: tf.Tensor
    capacity: tf.Tensor
    overflow_experts: tf.Tensor
    overflow_capacity: tf.Tensor
    num_dropped: tf.Tensor

    @property
    def slot_kept(self):
        """`[tokens, k]` bool: the slot is computed by its expert."""
        return self.slot_buffer_row < tf.size(self.buffer_slot)


def fixed_capacity(num_tokens, num_experts, k, capacity_factor):
    """`ceil(capacity_factor * k * tokens / E)`, a Python int when it can be.

    Args:
        num_tokens: int, or a scalar int tensor when the batch is dynamic.
    """
    if isinstance(num_tokens, int):
        return int(math.ceil(capacity_factor * k * num_tokens / num_experts))
    expected = tf.cast(num_tokens * k, tf.float64) / num_experts
    return tf.cast(tf.math.ceil(capacity_factor * expected), tf.int32)


def bucket_capacity(capacity):
    """Rounds capacities up to one of 8 sizes per octave (exact below 16).

    The experts' compiled kernels are specialised to the main group's shape
    `[E, C, d]`; with C from a few sizes they compile a few times per run
    rather than at nearly every batch, for at most 1/8 more rows.

    Args:
        capacity: int32 tensor of any shape, >= 0.

    Returns:
        The same shape: `capacity` rounded up to a multiple of
        `2 ** (floor(log2(capacity)) - 3)`.
    """
    capacity = tf.convert_to_tensor(capacity, tf.int32)
    log2 = tf.math.floor(tf.math.log(
        tf.cast(tf.maximum(capacity, 1), tf.float32)) / math.log(2.0))
    step = tf.cast(tf.pow(2.0, tf.maximum(log2 - 3.0, 0.0)), tf.int32)
    return (capacity + step - 1) // step * step


def split_capacity(expert_counts, overflow_expert_cost=None):
    """Chooses the main capacity C for dropless dispatch.

    Total cost of a choice: `E * C` main rows, plus `C2 + cost` for each
    expert with more than C slots, C2 = largest count - C. The cost is
    piecewise linear in C with a jump at each count, so the best C is 0 or
    one of the counts (rounded up by `bucket_capacity`): all E candidates
    are scored at once.

    Args:
        expert_counts: `[E]` int32.
        overflow_expert_cost: rows of compute one overflow expert costs
            beyond its rows (default `OVERFLOW_EXPERT_COST`).

    Returns:
        `(C, C2)`, scalar int32 tensors.
    """
    if overflow_expert_cost is None:
        overflow_expert_cost = OVERFLOW_EXPERT_COST
    num_experts = expert_counts.shape[0]
    sorted_counts = tf.sort(expert_counts)
    largest = sorted_counts[-1]
    candidates = bucket_capacity(tf.concat([[0], sorted_counts], axis=0))
    num_over = num_experts - tf.searchsorted(sorted_counts, candidates,
                                             side="right")
    overflow_rows = tf.maximum(largest - candidates, 0)
    cost = (num_experts * candidates
            + num_over * (overflow_rows + overflow_expert_cost))
    capacity = tf.gather(candidates, tf.argmin(cost, output_type=tf.int32))
    return capacity, tf.maximum(largest - capacity, 0)


def make_dispatch_plan(expert_ids, num_experts, capacity=None,
                       token_mask=None, slot_mask=None,
                       overflow_expert_cost=None):
    """Builds the routing plan for one batch.

    Within an expert, slots are taken in order of gate rank, then token:
    every token's first choice is placed before any token's second choice,
    so a capacity drops the weakest assignments first.

    Args:
        expert_ids: `[tokens, k]` int32 expert of each slot; k may be
            dynamic (gates that give tokens a variable number of experts
            pad them to the largest, and mask the padding).
        num_experts: E.
        capacity: None for dropless, or an int / scalar int tensor: each
            expert keeps at most that many slots.
        token_mask: optional `[tokens]` bool; masked tokens are not routed.
        slot_mask: optional `[tokens, k]` bool; masked slots are not routed.
        overflow_expert_cost: see `split_capacity` (dropless only).

    Returns:
        A `DispatchPlan`.
    """
    expert_ids = tf.convert_to_tensor(expert_ids, tf.int32)
    num_tokens, k = tf.unstack(tf.shape(expert_ids))
    num_slots = num_tokens * k

    # Slot s = rank * tokens + token (rank-major), see the docstring.
    slot_experts = tf.reshape(tf.transpose(expert_ids), [-1])
    slot_valid = None
    if token_mask is not None:
        slot_valid = tf.tile(tf.reshape(token_mask, [-1]), [k])
    if slot_mask is not None:
        slot_mask = tf.reshape(tf.transpose(slot_mask), [-1])
        slot_valid = (slot_mask if slot_valid is None
                      else slot_valid & slot_mask)
    if slot_valid is not None:
        # Masked slots go to a sentinel expert E: sorted last, never placed.
        slot_experts = tf.where(slot_valid, slot_experts, num_experts)
    counts_with_sentinel = tf.math.unsorted_segment_sum(
        tf.ones_like(slot_experts), slot_experts, num_experts + 1)
    expert_counts = counts_with_sentinel[:num_experts]
    starts = tf.cumsum(counts_with_sentinel, exclusive=True)

    if capacity is None:
        capacity, overflow_capacity = split_capacity(expert_counts,
                                                     overflow_expert_cost)
        is_overflow = expert_counts > capacity
        overflow_experts = tf.cast(tf.where(is_overflow)[:, 0], tf.int32)
    else:
        # A fixed capacity has no overflow group: static shapes for XLA.
        capacity = tf.convert_to_tensor(capacity, tf.int32)
        overflow_capacity = tf.constant(0, tf.int32)
        is_overflow = tf.zeros([num_experts], tf.bool)
        overflow_experts = tf.zeros([0], tf.int32)
    overflow_rank = tf.cumsum(tf.cast(is_overflow, tf.int32), exclusive=True)
    num_main_rows = num_experts * capacity
    num_rows = num_main_rows + tf.size(overflow_experts) * overflow_capacity

    order = tf.argsort(slot_experts, stable=True)  # sorted pos -> slot

    # Slot side: each slot's position within its expert, then its row.
    sorted_experts = tf.gather(slot_experts, order)
    position_sorted = tf.range(num_slots) - tf.gather(starts, sorted_experts)
    position = tf.gather(position_sorted, tf.math.invert_permutation(order))
    real_expert = tf.minimum(slot_experts, num_experts - 1)
    in_main = position < capacity
    slot_kept = (slot_experts < num_experts) & (
        in_main | (position < capacity + overflow_capacity))
    slot_row = tf.where(
        in_main,
        slot_experts * capacity + position,
        num_main_rows
        + tf.gather(overflow_rank, real_expert) * overflow_capacity
        + position - capacity)
    slot_row = tf.where(slot_kept, slot_row, num_rows)
    slot_buffer_row = tf.transpose(tf.reshape(slot_row, [k, num_tokens]))
    slot_buffer_row.set_shape(expert_ids.shape)

    # Buffer side: the sorted position of the slot each row takes.
    def sorted_positions(experts, first, size):
        row_in_expert = tf.range(size)
        counts = tf.gather(expert_counts, experts)
        filled = first + row_in_expert[None, :] < counts[:, None]
        pos = tf.gather(starts, experts)[:, None] + first + row_in_expert
        return tf.reshape(tf.where(filled, pos, num_slots), [-1])

    row_sorted_pos = tf.concat([
        sorted_positions(tf.range(num_experts), 0, capacity),
        sorted_positions(overflow_experts, capacity, overflow_capacity),
    ], axis=0)
    rank_major_slot = tf.gather(tf.concat([order, [num_slots]], axis=0),
                                row_sorted_pos)
    safe_tokens = tf.maximum(num_tokens, 1)
    buffer_slot = tf.where(
        rank_major_slot < num_slots,
        (rank_major_slot % safe_tokens) * k + rank_major_slot // safe_tokens,
        num_slots)

    num_dropped = tf.reduce_sum(tf.maximum(
        expert_counts - capacity - overflow_capacity, 0))
    return DispatchPlan(
        buffer_slot=buffer_slot,
        slot_buffer_row=slot_buffer_row,
        expert_counts=expert_counts,
        capacity=capacity,
        overflow_experts=overflow_experts,
        overflow_capacity=overflow_capacity,
        num_dropped=num_dropped,
    )


def gather_padded(values, indices, padding=0):
    """`values[indices]` for `[n, ...]` values, index n giving `padding`.

    The index maps of a `DispatchPlan` use one-past-the-end for "none"
    (unfilled rows, slots not kept); this reads them without a mask.
    """
    pad = tf.fill(tf.concat([[1], tf.shape(values)[1:]], axis=0),
                  tf.constant(padding, values.dtype))
    return tf.gather(tf.concat([values, pad], axis=0), indices)


def dispatch(tokens, plan):
    """Gathers tokens into the expert buffers.

    The gradient sums each token's k rows with one gather through
    `slot_buffer_row` (rather than TensorFlow's default scatter-add).

    Args:
        tokens: `[tokens, d]`.
        plan: a `DispatchPlan`.

    Returns:
        `(main [E, C, d], overflow [E2, C2, d])`; unfilled rows are zero.
    """
    k = tf.shape(plan.slot_buffer_row)[1]
    model_dim = tokens.shape[-1]

    @tf.custom_gradient
    def gather_into_rows(tokens):
        rows = gather_padded(tokens, plan.buffer_slot // k)

        def grad(d_rows):
            return tf.reduce_sum(
                gather_padded(d_rows, plan.slot_buffer_row), axis=1)

        return rows, grad

    rows = gather_into_rows(tokens)
    num_experts = plan.expert_counts.shape[0]
    num_main_rows = num_experts * plan.capacity
    main = tf.reshape(rows[:num_main_rows],
                      [num_experts, plan.capacity, model_dim])
    overflow = tf.reshape(
        rows[num_main_rows:],
        [tf.size(plan.overflow_experts), plan.overflow_capacity, model_dim])
    return main, overflow


def combine(expert_outputs, plan, gate_weights):
    """Weighted sum of each token's expert outputs.

    Args:
        expert_outputs: `(main [E, C, d_out], overflow [E2, C2, d_out])`.
        plan: the `DispatchPlan` the buffers were made with.
        gate_weights: `[tokens, k]`; slots not kept contribute nothing.

    Returns:
        `[tokens, d_out]`, zero for masked tokens.
    """
    main, overflow = expert_outputs
    d_out = main.shape[-1]

    @tf.custom_gradient
    def gather_from_rows(rows):
        slot_outputs = gather_padded(rows, plan.slot_buffer_row)

        def grad(d_slot_outputs):
            d_slots = tf.reshape(d_slot_outputs, [-1, d_out])
            return gather_padded(d_slots, plan.buffer_slot)

        return slot_outputs, grad

    rows = tf.concat([tf.reshape(main, [-1, d_out]),
                      tf.reshape(overflow, [-1, d_out])], axis=0)
    slot_outputs = gather_from_rows(rows)  # [tokens, k, d_out]
    # Multiply and sum rather than einsum, which becomes a batched matmul
    # of `tokens` tiny [1, k] x [k, d] products (several times slower here).
    weights = tf.cast(gate_weights, slot_outputs.dtype)[:, :, None]
    return tf.reduce_sum(slot_outputs * weights, axis=1)
