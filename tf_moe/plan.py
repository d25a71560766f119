"""The dispatch plan: which buffer row every routing slot goes to.

Tokens come in token shards: one off a mesh, one per batch shard on it.
Each shard routes its own tokens into its own buffers, so a shard's plan is
the plan of a batch of its own, and every op here is batched over the
leading shard dimension (DTensor runs each shard where it lives). Within a
shard, one argsort of its `tokens * k` routing slots by expert gives every
slot its row; dispatch and combine (`tf_moe.dispatch`) are then gathers,
and so are their gradients: no tensor of shape `[tokens, experts,
capacity]`, no one-hot einsum, no loop over experts.

Buffer layout of a shard. The experts run as batched matmuls, which need
the same number of rows for every expert, so rows are padded. Padding
every expert to the largest count wastes compute (at initialisation, with
E=256 and 32K slots, the largest count is 1.27 times the mean) and, when
routing is skewed, grows with E. So the rows come in two buffer groups:

- main: `[E, C, d]`, rows `e * C + c`: the first C slots of every expert;
- overflow: `[E2, C2, d]`, rows `E * C + j * C2 + c`: slots C .. C + C2 - 1
  of the E2 experts that have more than C (their weights are gathered).

Dropless (no capacity): C2 = largest count - C, and C minimises the padded
rows plus a cost per overflow expert for gathering its weights. The shapes
then vary per batch, so a dropless plan has one shard. With a fixed
capacity C there is no overflow group, and slots past C are dropped and
counted: static shapes, for XLA and for a mesh.

The packed layout (one shard, dropless or a fixed capacity) has no padding:
`[N, d]`, the N kept slots sorted by expert, expert e's `expert_rows[e]`
rows in turn. Batched matmuls cannot run it; experts run one matmul each
on their own rows (`tf_moe.experts`), as a per-expert dispatcher does,
which is the faster form where TensorFlow's 2-D kernels beat its batched
ones (`tf_moe.kernels.choose_layout`).
"""

import math
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

# What running an expert in the overflow group costs beyond its rows
# (gathering its weights, scattering their gradient back), in rows of
# compute. About 16 for d=512, h=1024 on a 2-core CPU: 4 passes over the
# expert's weights at ~19 GB/s against 6 multiply-adds per weight and row
# at ~100 GFLOP/s.
OVERFLOW_EXPERT_COST = 16


class DispatchPlan(NamedTuple):
    """Where every routing slot goes, for one batch.

    `[...]` below is the shard dimension `[shards]`, or nothing for a plan
    made from `[tokens, k]` expert ids. Slots are numbered token-major
    within a shard: slot `token * k + rank`. The two index maps are inverse
    to each other on kept slots.

    Attributes:
        buffer_slot: `[..., rows]` int32, the slot that fills each buffer
            row (main rows first, then overflow rows); `tokens * k` (one
            past the last slot) for unfilled rows.
        slot_buffer_row: `[..., tokens, k]` int32, the buffer row holding
            each slot; `rows` (one past the last row) for slots not kept
            (masked tokens, and slots past a fixed capacity).
        expert_counts: `[E]` int32 slots routed to each expert over all
            shards (masked tokens not counted).
        capacity: C, rows per expert in the main buffer group (an int, or a
            scalar int32 tensor).
        overflow_experts: `[E2]` int32, experts with overflow rows.
        overflow_capacity: C2, rows per overflow expert: a scalar int32
            tensor for a dropless plan, the int 0 for a fixed capacity
            (which has no overflow group).
        num_dropped: scalar int32, routed slots that were not kept.
        expert_rows: `[E]` int32 rows of each expert in a packed plan's
            buffer `[N, d]` (the module docstring); None in the padded
            layout. A packed plan has no overflow group, and its capacity
            is the fixed one, or None for dropless.
    """

    buffer_slot: tf.Tensor
    slot_buffer_row: tf.Tensor
    expert_counts: tf.Tensor
    capacity: Any
    overflow_experts: tf.Tensor
    overflow_capacity: Any
    num_dropped: tf.Tensor
    expert_rows: Any = None

    @property
    def packed(self):
        """Whether the buffer is packed, `[N, d]` (else `[E, C, d]`)."""
        return self.expert_rows is not None

    @property
    def has_overflow(self):
        """Whether the plan has an overflow buffer group (dropless)."""
        return not isinstance(self.overflow_capacity, int)

    @property
    def num_experts(self):
        return self.expert_counts.shape[0]

    @property
    def slot_kept(self):
        """`[..., tokens, k]` bool: the slot is computed by its expert."""
        return self.slot_buffer_row < tf.shape(self.buffer_slot)[-1]


def fixed_capacity(num_tokens, num_experts, k, capacity_factor):
    """`ceil(capacity_factor * k * tokens / E)`, a Python int when it can be.

    Args:
        num_tokens: int, or a scalar int tensor when the batch is dynamic.
    """
    if isinstance(num_tokens, int):
        return int(math.ceil(capacity_factor * k * num_tokens / num_experts))
    expected = tf.cast(num_tokens * k, tf.float64) / num_experts
    return tf.cast(tf.math.ceil(capacity_factor * expected), tf.int32)


def balanced_rows(shard_tokens, num_experts, k):
    """Rows per expert of a perfectly balanced routing of one token shard,
    `ceil(k * shard_tokens / E)`; None when the tokens are not static.
    (What the experts' kernels are chosen for, `tf_moe.kernels`.)

    Args:
        shard_tokens: the static number of tokens of one shard, or None.
    """
    if shard_tokens is None:
        return None
    return max(1, math.ceil(k * shard_tokens / num_experts))


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


def typical_dropless_buffers(num_slots, num_experts, seed=0):
    """The buffers a dropless padded plan makes for a balanced routing.

    `num_slots` routing slots fall on the experts uniformly at random (what
    the balancing losses aim for, and the noisy gate at initialisation
    gives); `split_capacity` then splits their counts. What the padded
    layout is timed at (`tf_moe.kernels.choose_layout`), so that its
    padding and overflow group are in its timing.

    Returns:
        `(C, E2, C2)` ints: main rows per expert, overflow experts, and
        overflow rows per overflow expert.
    """
    counts = np.random.default_rng(seed).multinomial(
        num_slots, np.full(num_experts, 1 / num_experts))
    capacity, overflow_capacity = split_capacity(
        tf.constant(counts, tf.int32))
    capacity = int(capacity)
    return capacity, int(np.sum(counts > capacity)), int(overflow_capacity)


def make_dispatch_plan(expert_ids, num_experts, capacity=None,
                       token_mask=None, slot_mask=None,
                       overflow_expert_cost=None, packed=False):
    """Builds the routing plan for one batch.

    Within an expert, slots are taken in order of gate rank, then token:
    every token's first choice is placed before any token's second choice,
    so a capacity drops the weakest assignments first.

    Args:
        expert_ids: `[tokens, k]`, or `[shards, tokens, k]` (a static number
            of shards), int32 expert of each slot; k may be dynamic (gates
            that give tokens a variable number of experts pad them to the
            largest, and mask the padding).
        num_experts: E.
        capacity: None for dropless (one shard only), or an int / scalar
            int tensor: each expert keeps at most that many slots of each
            shard.
        token_mask: optional `[..., tokens]` bool; masked tokens are not
            routed.
        slot_mask: optional `[..., tokens, k]` bool; masked slots are not
            routed.
        overflow_expert_cost: see `split_capacity` (dropless, padded only).
        packed: the packed layout (the module docstring; one shard).

    Returns:
        A `DispatchPlan`, its index maps with the shard dimension of
        `expert_ids` (none for `[tokens, k]`).
    """
    expert_ids = tf.convert_to_tensor(expert_ids, tf.int32)

    def sharded_plan(expert_ids, token_mask, slot_mask):
        if packed:
            return _packed_plan(expert_ids, num_experts, capacity, token_mask,
                                slot_mask)
        return _sharded_plan(expert_ids, num_experts, capacity, token_mask,
                             slot_mask, overflow_expert_cost)

    if expert_ids.shape.rank == 3:
        return sharded_plan(expert_ids, token_mask, slot_mask)

    def one_shard(x):
        return None if x is None else tf.convert_to_tensor(x)[None]

    plan = sharded_plan(expert_ids[None], one_shard(token_mask),
                        one_shard(slot_mask))
    return plan._replace(buffer_slot=plan.buffer_slot[0],
                         slot_buffer_row=plan.slot_buffer_row[0])


def _invert_permutations(order):
    """`[shards, n]` permutations -> their inverses, as a second sort: it
    is batched, DTensor lays it out, and XLA compiles it (InvertPermutation
    fails under XLA here, and a scatter crashes DTensor, TF 2.21)."""
    return tf.argsort(order, axis=1, stable=True)


class _SortedSlots(NamedTuple):
    """A batch's routing slots sorted by expert, per shard. Slots are
    numbered rank-major here, `rank * tokens + token`, so that a stable
    sort puts every first choice of an expert before any second choice."""

    slot_experts: tf.Tensor  # [S, k*T], E (a sentinel) for masked slots
    shard_counts: tf.Tensor  # [S, E] slots routed to each expert
    starts: tf.Tensor  # [S, E + 1] sorted position of each expert's first
    order: tf.Tensor  # [S, k*T] sorted position -> slot
    position: tf.Tensor  # [S, k*T] each slot's position within its expert


def _sort_slots(expert_ids, num_experts, token_mask, slot_mask):
    num_shards = expert_ids.shape[0]
    shape = tf.shape(expert_ids)
    num_tokens, k = shape[1], shape[2]

    def rank_major(x):  # [S, T, k] -> [S, k*T]: slot s = rank * T + token
        return tf.reshape(tf.transpose(x, [0, 2, 1]), [num_shards, -1])

    slot_experts = rank_major(expert_ids)
    slot_valid = None
    if token_mask is not None:
        slot_valid = tf.tile(tf.convert_to_tensor(token_mask), [1, k])
    if slot_mask is not None:
        slot_mask = rank_major(tf.convert_to_tensor(slot_mask))
        slot_valid = (slot_mask if slot_valid is None
                      else slot_valid & slot_mask)
    if slot_valid is not None:
        # Masked slots go to a sentinel expert E: sorted last, never placed.
        slot_experts = tf.where(slot_valid, slot_experts, num_experts)
    counts_with_sentinel = tf.reshape(tf.math.unsorted_segment_sum(
        tf.ones_like(slot_experts),
        slot_experts + (num_experts + 1) * tf.range(num_shards)[:, None],
        num_shards * (num_experts + 1)), [num_shards, num_experts + 1])
    starts = tf.cumsum(counts_with_sentinel, axis=1, exclusive=True)
    order = tf.argsort(slot_experts, axis=1, stable=True)
    sorted_experts = tf.gather(slot_experts, order, batch_dims=1)
    position = tf.gather(
        tf.range(num_tokens * k)
        - tf.gather(starts, sorted_experts, batch_dims=1),
        _invert_permutations(order), batch_dims=1)
    return _SortedSlots(slot_experts, counts_with_sentinel[:, :num_experts],
                        starts, order, position)


def _token_major(rank_major_slot, num_tokens, k):
    """Rank-major slot numbers (`_SortedSlots`) -> token-major ones, `token
    * k + rank`."""
    safe_tokens = tf.maximum(num_tokens, 1)
    return (rank_major_slot % safe_tokens) * k + rank_major_slot // safe_tokens


def _packed_plan(expert_ids, num_experts, capacity, token_mask, slot_mask):
    """The packed layout (see `make_dispatch_plan`), one shard."""
    if expert_ids.shape[0] != 1:
        raise ValueError("a packed plan has one token shard (its shapes vary "
                         f"per batch); got {expert_ids.shape[0]} shards.")
    shape = tf.shape(expert_ids)
    num_tokens, k = shape[1], shape[2]
    slots = _sort_slots(expert_ids, num_experts, token_mask, slot_mask)
    slot_experts, order = slots.slot_experts[0], slots.order[0]
    position = slots.position[0]
    expert_counts = slots.shard_counts[0]
    expert_rows = (expert_counts if capacity is None
                   else tf.minimum(expert_counts, capacity))
    num_rows = tf.reduce_sum(expert_rows)
    real_expert = tf.minimum(slot_experts, num_experts - 1)
    slot_kept = (slot_experts < num_experts) & (
        position < tf.gather(expert_rows, real_expert))
    slot_row = tf.where(
        slot_kept,
        tf.gather(tf.cumsum(expert_rows, exclusive=True), real_expert)
        + position, num_rows)
    slot_buffer_row = tf.transpose(tf.reshape(slot_row, [1, k, num_tokens]),
                                   [0, 2, 1])
    slot_buffer_row.set_shape(expert_ids.shape)
    # Sorted order is by expert, then position: the kept slots, in it, are
    # the rows in order.
    buffer_slot = _token_major(
        tf.boolean_mask(order, tf.gather(slot_kept, order)), num_tokens, k)
    return DispatchPlan(
        buffer_slot=buffer_slot[None],
        slot_buffer_row=slot_buffer_row,
        expert_counts=expert_counts,
        capacity=capacity,
        overflow_experts=tf.zeros([0], tf.int32),
        overflow_capacity=0,
        num_dropped=tf.reduce_sum(expert_counts - expert_rows),
        expert_rows=expert_rows)


def _sharded_plan(expert_ids, num_experts, capacity, token_mask, slot_mask,
                  overflow_expert_cost):
    # Longer than most functions here: the slot side and the buffer side
    # share the sort, the counts and the capacities.
    num_shards = expert_ids.shape[0]
    shape = tf.shape(expert_ids)
    num_tokens, k = shape[1], shape[2]
    num_slots = num_tokens * k
    slots = _sort_slots(expert_ids, num_experts, token_mask, slot_mask)
    slot_experts, shard_counts, starts, order, position = slots
    expert_counts = tf.reduce_sum(shard_counts, axis=0)

    dropless = capacity is None
    if dropless:
        if num_shards != 1:
            raise ValueError(
                "a dropless plan has one token shard (its shapes vary per "
                f"batch); got {num_shards} shards without a capacity.")
        capacity, overflow_capacity = split_capacity(expert_counts,
                                                     overflow_expert_cost)
        is_overflow = expert_counts > capacity
        overflow_experts = tf.cast(tf.where(is_overflow)[:, 0], tf.int32)
        overflow_rank = tf.cumsum(tf.cast(is_overflow, tf.int32),
                                  exclusive=True)
    else:
        overflow_capacity = 0
        overflow_experts = tf.zeros([0], tf.int32)
    num_main_rows = num_experts * capacity
    num_rows = num_main_rows + tf.size(overflow_experts) * overflow_capacity

    # Slot side: each slot's row.
    slot_row = slot_experts * capacity + position
    if dropless:
        real_expert = tf.minimum(slot_experts, num_experts - 1)
        overflow_row = (num_main_rows
                        + tf.gather(overflow_rank, real_expert)
                        * overflow_capacity + position - capacity)
        slot_row = tf.where(position < capacity, slot_row, overflow_row)
    slot_kept = (slot_experts < num_experts) & (
        position < capacity + overflow_capacity)
    slot_row = tf.where(slot_kept, slot_row, num_rows)
    slot_buffer_row = tf.transpose(
        tf.reshape(slot_row, [num_shards, k, num_tokens]), [0, 2, 1])
    slot_buffer_row.set_shape(expert_ids.shape)

    # Buffer side: the sorted position of the slot each row takes.
    def sorted_positions(counts, first_positions, first, size):
        """`[S, experts]` counts and first sorted positions -> `[S, experts
        * size]`, rows first .. first + size - 1 of every expert."""
        row_in_expert = tf.range(size)
        filled = first + row_in_expert < counts[:, :, None]
        position = first_positions[:, :, None] + first + row_in_expert
        return tf.reshape(tf.where(filled, position, num_slots),
                          [num_shards, -1])

    row_sorted_position = sorted_positions(
        shard_counts, starts[:, :num_experts], 0, capacity)
    if dropless:
        row_sorted_position = tf.concat([row_sorted_position, sorted_positions(
            tf.gather(shard_counts, overflow_experts, axis=1),
            tf.gather(starts, overflow_experts, axis=1), capacity,
            overflow_capacity)], axis=1)
    rank_major_slot = tf.gather(
        tf.concat([order, tf.fill([num_shards, 1], num_slots)], axis=1),
        row_sorted_position, batch_dims=1)
    buffer_slot = tf.where(rank_major_slot < num_slots,
                           _token_major(rank_major_slot, num_tokens, k),
                           num_slots)

    num_dropped = tf.reduce_sum(tf.maximum(
        shard_counts - capacity - overflow_capacity, 0))
    return DispatchPlan(
        buffer_slot=buffer_slot,
        slot_buffer_row=slot_buffer_row,
        expert_counts=expert_counts,
        capacity=capacity,
        overflow_experts=overflow_experts,
        overflow_capacity=overflow_capacity,
        num_dropped=num_dropped,
    )
