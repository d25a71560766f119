"""The dispatch plan, dispatch and combine on constructed batches."""

import numpy as np
import pytest
import tensorflow as tf

from tf_moe import dispatch
from tf_moe import plan as plan_lib


def _slow_plan(expert_ids, num_experts, capacity, token_mask=None):
    """Reference: walk the slots in (rank, token) order, fill each expert."""
    num_tokens, k = expert_ids.shape
    if token_mask is None:
        token_mask = np.ones(num_tokens, bool)
    filled = [[] for _ in range(num_experts)]
    kept = np.zeros((num_tokens, k), bool)
    position = np.zeros((num_tokens, k), int)
    dropped = 0
    for rank in range(k):
        for token in range(num_tokens):
            if not token_mask[token]:
                continue
            expert = expert_ids[token, rank]
            if capacity is None or len(filled[expert]) < capacity:
                kept[token, rank] = True
                position[token, rank] = len(filled[expert])
                filled[expert].append(token)
            else:
                dropped += 1
    return filled, kept, position, dropped


def test_capacity_drops_and_counts_exactly_the_overflow():
    # 6 tokens, k = 2, E = 3, capacity 2.
    expert_ids = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [0, 2]])
    plan = plan_lib.make_dispatch_plan(expert_ids, 3, capacity=2)
    # First choices: expert 0 gets tokens 0, 1, 2, 5 -> keeps 0 and 1;
    # expert 1 gets token 3; expert 2 gets token 4. Second choices then
    # fill what is left: expert 1 takes token 0 (its 2nd), drops 2 and 4;
    # expert 0 is full (drops token 3's 2nd); expert 2 takes token 1, drops 5.
    np.testing.assert_array_equal(plan.expert_counts.numpy(), [5, 4, 3])
    assert plan.num_dropped.numpy() == (5 - 2) + (4 - 2) + (3 - 2)
    np.testing.assert_array_equal(
        plan.slot_kept.numpy(),
        [[True, True], [True, True], [False, False], [True, False],
         [True, False], [False, False]])
    # Token-major slots: token * 2 + rank; token 0's 2nd choice is slot 1.
    np.testing.assert_array_equal(plan.buffer_slot.numpy(),
                                  [0, 2, 6, 1, 8, 3])
    # Dropped slots point one past the last buffer row.
    assert plan.slot_buffer_row.numpy()[2, 0] == 3 * 2
    assert plan.overflow_experts.shape == (0,)


def test_dropless_split_puts_a_skewed_expert_in_the_overflow_group():
    # Expert 0 gets 10 slots, the others 1: padding all to 10 would be 40
    # rows; C = 1 plus 9 overflow rows for expert 0 is 13.
    expert_ids = np.array([[0]] * 10 + [[1], [2], [3]])
    plan = plan_lib.make_dispatch_plan(expert_ids, 4, overflow_expert_cost=0)
    assert plan.capacity.numpy() == 1
    np.testing.assert_array_equal(plan.overflow_experts.numpy(), [0])
    assert plan.overflow_capacity.numpy() == 9
    assert plan.buffer_slot.shape == (13,)
    assert plan.num_dropped.numpy() == 0
    # A high gather cost keeps everything in one padded group.
    padded = plan_lib.make_dispatch_plan(expert_ids, 4,
                                         overflow_expert_cost=100)
    assert padded.capacity.numpy() == 10
    assert padded.overflow_experts.shape == (0,)


def test_split_capacity_minimises_rows_plus_gather_cost():
    counts = tf.constant([5, 9, 5, 6, 12, 5])
    for cost in (0, 3, 50):
        capacity, overflow = plan_lib.split_capacity(counts, cost)
        largest = 12

        def total(c):
            over = sum(1 for n in counts.numpy() if n > c)
            return 6 * c + over * (largest - c + cost)

        best = min(total(c) for c in range(largest + 1))
        assert total(int(capacity)) == best
        assert int(capacity) + int(overflow) == largest


def test_typical_dropless_buffers_are_the_split_of_a_uniform_draw():
    num_slots, num_experts = 4 * 8192, 256
    capacity, overflow_experts, overflow_rows = (
        plan_lib.typical_dropless_buffers(num_slots, num_experts, seed=3))
    counts = np.random.default_rng(3).multinomial(
        num_slots, np.full(num_experts, 1 / num_experts))
    assert capacity + overflow_rows == counts.max()
    assert overflow_experts == np.sum(counts > capacity)
    # Every slot has a row; padding a balanced routing costs a little.
    rows = num_experts * capacity + overflow_experts * overflow_rows
    assert num_slots <= rows <= 1.3 * num_slots


def test_capacities_come_in_buckets():
    values = np.arange(0, 5000)
    buckets = plan_lib.bucket_capacity(values).numpy()
    assert np.all(buckets >= values)
    np.testing.assert_array_equal(buckets[:17], values[:17])
    assert np.all(buckets <= values * 1.125 + 1e-9)
    assert np.all(np.diff(buckets) >= 0)
    # 8 sizes per octave: a handful of shapes for the compiled kernels.
    assert len(np.unique(buckets[1024:2048])) <= 9
    # The split picks among bucketed sizes; every slot still has a row.
    counts = tf.constant([100, 97, 101, 103, 99, 98, 102, 130])
    capacity, overflow = plan_lib.split_capacity(counts, 16)
    assert int(capacity) in buckets
    assert int(capacity) + int(overflow) >= 130


@pytest.mark.parametrize("num_experts, k, capacity, masked, cost", [
    (4, 2, None, False, 16), (4, 2, None, True, 0), (8, 3, 2, True, 0),
    (5, 5, 3, False, 0), (1, 1, None, True, 0), (16, 4, 1, False, 0),
    (16, 2, None, False, 0), (16, 2, None, True, 2),
])
def test_plan_matches_slow_reference(num_experts, k, capacity, masked, cost):
    rng = np.random.default_rng(num_experts * 10 + k)
    num_tokens = 23
    # Skewed routing (expert e drawn with weight 1/(e+1)) so that dropless
    # plans have overflow groups.
    p = 1.0 / np.arange(1, num_experts + 1)
    expert_ids = np.stack([rng.choice(num_experts, k, replace=False, p=p / p.sum())
                           for _ in range(num_tokens)])
    token_mask = rng.random(num_tokens) < 0.7 if masked else None
    plan = plan_lib.make_dispatch_plan(
        expert_ids, num_experts, capacity,
        None if token_mask is None else tf.constant(token_mask),
        overflow_expert_cost=cost)
    filled, kept, position, dropped = _slow_plan(expert_ids, num_experts,
                                                 capacity, token_mask)
    assert plan.num_dropped.numpy() == dropped
    np.testing.assert_array_equal(plan.slot_kept.numpy(), kept)
    main_capacity = int(plan.capacity)
    overflow_capacity = int(plan.overflow_capacity)
    overflow_experts = list(plan.overflow_experts.numpy())
    if capacity is not None:
        assert main_capacity == capacity and not overflow_experts
    else:
        largest = max(len(f) for f in filled)
        if overflow_experts:
            assert main_capacity + overflow_capacity == largest
        else:  # one group, its capacity rounded up to a bucket
            assert main_capacity == plan_lib.bucket_capacity(largest)
    num_rows = (num_experts * main_capacity
                + len(overflow_experts) * overflow_capacity)
    buffer_slot = plan.buffer_slot.numpy()
    assert buffer_slot.shape == (num_rows,)

    # Every row holds the right slot: main rows the first C of each expert,
    # overflow rows the next C2 of each overflow expert.
    def expected_rows(expert, first, size):
        tokens = filled[expert][first:first + size]
        ranks = [int(np.flatnonzero(expert_ids[t] == expert)[0]) for t in tokens]
        slots = [t * k + r for t, r in zip(tokens, ranks)]
        return slots + [num_tokens * k] * (size - len(slots))

    expected = []
    for expert in range(num_experts):
        expected += expected_rows(expert, 0, main_capacity)
    for expert in overflow_experts:
        assert len(filled[expert]) > main_capacity
        expected += expected_rows(expert, main_capacity, overflow_capacity)
    np.testing.assert_array_equal(buffer_slot, expected)

    # The two maps are inverse on kept slots; the rest point past the end.
    rows = plan.slot_buffer_row.numpy()
    assert np.all(rows[~kept] == num_rows)
    slots = np.flatnonzero(kept.ravel())
    np.testing.assert_array_equal(buffer_slot[rows.ravel()[slots]], slots)


@pytest.mark.parametrize("num_experts, k, capacity, masked", [
    (4, 2, None, False), (4, 2, None, True), (8, 3, 2, True),
    (5, 5, 3, False), (1, 1, None, True), (16, 2, None, False),
])
def test_packed_plan_matches_slow_reference(num_experts, k, capacity, masked):
    rng = np.random.default_rng(num_experts * 10 + k)
    num_tokens = 23
    p = 1.0 / np.arange(1, num_experts + 1)
    expert_ids = np.stack([rng.choice(num_experts, k, replace=False,
                                      p=p / p.sum())
                           for _ in range(num_tokens)])
    token_mask = rng.random(num_tokens) < 0.7 if masked else None
    plan = plan_lib.make_dispatch_plan(
        expert_ids, num_experts, capacity,
        None if token_mask is None else tf.constant(token_mask), packed=True)
    filled, kept, _, dropped = _slow_plan(expert_ids, num_experts, capacity,
                                          token_mask)
    assert plan.packed and not plan.has_overflow
    assert plan.num_dropped.numpy() == dropped
    np.testing.assert_array_equal(plan.slot_kept.numpy(), kept)
    np.testing.assert_array_equal(plan.expert_rows.numpy(),
                                  [len(f) for f in filled])
    # No padding: expert 0's slots, then expert 1's, ... in gate-rank order.
    expected = [t * k + int(np.flatnonzero(expert_ids[t] == e)[0])
                for e in range(num_experts) for t in filled[e]]
    np.testing.assert_array_equal(plan.buffer_slot.numpy(), expected)
    rows = plan.slot_buffer_row.numpy()
    assert np.all(rows[~kept] == len(expected))
    slots = np.flatnonzero(kept.ravel())
    np.testing.assert_array_equal(
        plan.buffer_slot.numpy()[rows.ravel()[slots]], slots)


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_equal_those_of_plain_gathers(packed):
    """The custom gradients (gathers through the inverse map) are exact."""
    rng = np.random.default_rng(5)
    tokens = tf.constant(rng.normal(size=(11, 4)).astype(np.float32))
    expert_ids = np.stack([rng.permutation(6)[:3] for _ in range(11)])
    weights = tf.constant(rng.uniform(size=(11, 3)).astype(np.float32))
    mask = tf.constant(rng.random(11) < 0.8)
    plan = plan_lib.make_dispatch_plan(expert_ids, 6, capacity=4,
                                       token_mask=mask, packed=packed)
    # A different scale per expert (per row for packed buffers).
    scale = tf.constant(rng.normal(size=(6, 1, 4)).astype(np.float32))
    if packed:
        scale = tf.repeat(scale[:, 0], plan.expert_rows, axis=0)
    cotangent = tf.constant(rng.normal(size=(11, 4)).astype(np.float32))

    def plain(tokens, weights):
        padded = tf.concat([tokens, tf.zeros((1, 4))], axis=0)
        buffers = tf.gather(padded, plan.buffer_slot // 3)
        if not packed:
            buffers = tf.reshape(buffers, [6, -1, 4])
        buffers *= scale
        rows = tf.concat([tf.reshape(buffers, [-1, 4]), tf.zeros((1, 4))], 0)
        slot_outputs = tf.gather(rows, plan.slot_buffer_row)
        return tf.einsum("tk,tkd->td", weights, slot_outputs)

    def fast(tokens, weights):
        main, overflow = dispatch.dispatch(tokens, plan)
        return dispatch.combine((main * scale, overflow), plan, weights)

    results = []
    for fn in (plain, fast):
        with tf.GradientTape() as tape:
            tape.watch([tokens, weights])
            value = tf.reduce_sum(fn(tokens, weights) * cotangent)
        grads = tape.gradient(value, [tokens, weights])
        results.append([value] + [tf.convert_to_tensor(g) for g in grads])
    for plain_value, fast_value in zip(*results):
        np.testing.assert_allclose(fast_value.numpy(), plain_value.numpy(),
                                   rtol=1e-6, atol=1e-6)
    assert plan.num_dropped.numpy() > 0


def test_dispatch_then_combine_round_trips_tokens():
    rng = np.random.default_rng(3)
    tokens = rng.normal(size=(10, 4)).astype(np.float32)
    expert_ids = np.stack([rng.permutation(5)[:2] for _ in range(10)])
    gate_weights = rng.uniform(size=(10, 2)).astype(np.float32)
    plan = plan_lib.make_dispatch_plan(expert_ids, 5, overflow_expert_cost=0)
    buffers = dispatch.dispatch(tokens, plan)
    # Identity experts: every token comes back scaled by its summed gates.
    combined = dispatch.combine(buffers, plan, gate_weights)
    np.testing.assert_allclose(combined.numpy(),
                               tokens * gate_weights.sum(1, keepdims=True),
                               rtol=1e-6)
    # Unfilled buffer rows are zeros.
    rows = np.concatenate([b.numpy().reshape(-1, 4) for b in buffers])
    unfilled = plan.buffer_slot.numpy() == 20
    assert unfilled.any() and np.all(rows[unfilled] == 0.0)


@pytest.mark.parametrize("packed", [False, True])
def test_empty_batch(packed):
    plan = plan_lib.make_dispatch_plan(np.zeros((0, 2), np.int32), 4,
                                       packed=packed)
    main, overflow = dispatch.dispatch(tf.zeros((0, 3)), plan)
    combined = dispatch.combine((main, overflow), plan, tf.zeros((0, 2)))
    if packed:
        assert main.shape == (0, 3) and overflow is None
        assert plan.expert_rows.numpy().tolist() == [0] * 4
    else:
        assert main.shape == (4, 0, 3) and overflow.shape == (0, 0, 3)
    assert combined.shape == (0, 3)
    assert plan.num_dropped.numpy() == 0


def test_fixed_capacity():
    assert plan_lib.fixed_capacity(100, 8, 2, 1.0) == 25
    assert plan_lib.fixed_capacity(10, 8, 1, 1.25) == 2
    dynamic = plan_lib.fixed_capacity(tf.constant(100), 8, 2, 1.0)
    assert dynamic.numpy() == 25


def test_custom_gradients_are_named_under_their_forward_scope():
    """The gradient ops of dispatch's custom gradients carry the forward's
    stage scope (what bench/profile_layer.py attributes time by), and the
    gradient is still the gather's."""
    ids = tf.constant([[0, 1], [1, 0], [1, 1]])
    plan = plan_lib.make_dispatch_plan(ids, 2)
    tokens = tf.random.normal([3, 4], seed=0)

    @tf.function
    def gradient(tokens):
        with tf.GradientTape() as tape:
            tape.watch(tokens)
            with tf.name_scope("dispatch"):
                main, overflow = dispatch.dispatch(tokens, plan)
            loss = tf.reduce_sum(main * main)
            if overflow is not None:
                loss += tf.reduce_sum(overflow * overflow)
        return tape.gradient(loss, tokens)

    graph = gradient.get_concrete_function(tokens).graph
    names = [op.name for op in graph.get_operations()]
    assert any(name.startswith("dispatch/") and "/gradient/" in name
               for name in names), names
    # Every slot of every token is routed: d loss / d token = 2 k token.
    np.testing.assert_allclose(gradient(tokens), 4 * tokens.numpy(),
                               rtol=1e-6)
