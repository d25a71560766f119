"""Balanced gates: every expert takes a fixed number of the batch's tokens.

- `BatchwiseGate`: the strictly balanced gate of appendix F. In training
  every expert takes exactly its top `m = ceil(k * tokens / E)` tokens of
  the batch; at inference learned per-expert thresholds replace the batch
  statistics. Tokens get a variable number of experts (k on average).
- `ExpertChoiceGate`: expert-choice routing (Zhou et al. 2022): every
  expert takes its top `C = ceil(capacity_factor * k * tokens / E)` tokens,
  in training and at inference, with their softmax scores as gates.

Both rank the batch's tokens per expert with `batchwise_mask`.
"""

import math

import keras
import tensorflow as tf

from tf_moe.gating import Gate, Routing, top_k_with_gather_gradient


def balanced_capacity(num_valid, num_experts, k, capacity_factor=1.0):
    """`m = ceil(capacity_factor * k * num_valid / E)`, the tokens each
    expert takes, at most `num_valid` (int32 tensor, or int for an int)."""
    if capacity_factor == 1:  # Exact in integers (k <= E, so m <= valid).
        return (k * num_valid + num_experts - 1) // num_experts
    if isinstance(num_valid, int):
        return min(num_valid,
                   math.ceil(capacity_factor * k * num_valid / num_experts))
    num_valid = tf.cast(num_valid, tf.float64)
    return tf.cast(tf.minimum(num_valid, tf.math.ceil(
        capacity_factor * k * num_valid / tf.cast(num_experts, tf.float64))),
        tf.int32)


def batchwise_mask(log_probabilities, row_valid, k, shuffle_seed=None,
                   max_per_expert=None, capacity_factor=1.0):
    """M_batchwise: each expert keeps its top m rows of a segment.

    Args:
        log_probabilities: `[segments, rows, E]` (any per-element monotone
            function of the softmax gives the same mask).
        row_valid: `[segments, rows]` bool; invalid rows are never kept.
        k: experts per row on average: `m = ceil(capacity_factor * k *
            valid rows / E)` per segment, at most the valid rows.
        shuffle_seed: optional SeedGenerator: each expert breaks ties in
            its own random order of the rows. Without it the first rows win
            every tie, and a zero-initialised gate (all values equal) would
            send the first m rows to every expert and none to the rest.
        max_per_expert: optional static int >= every segment's m (on a
            mesh, where shapes must be static); default: the largest m.
        capacity_factor: scales m (expert choice; 1 for appendix F).

    Returns:
        `[segments, rows, E]` bool, exactly m True per (segment, expert).
    """
    num_rows, num_experts = tf.unstack(tf.shape(log_probabilities)[1:])
    num_valid = tf.reduce_sum(tf.cast(row_valid, tf.int32), axis=1)
    per_expert = balanced_capacity(num_valid, num_experts, k,
                                   capacity_factor)  # m [S]
    keys = tf.where(row_valid[:, :, None], log_probabilities,
                    tf.constant(-math.inf, log_probabilities.dtype))
    keys = tf.transpose(keys, [0, 2, 1])  # [S, E, N]
    # order[e, p]: the row expert e visits p-th; top_k prefers earlier
    # positions among equal values.
    order = tf.broadcast_to(tf.range(num_rows), [num_experts, num_rows])
    if shuffle_seed is not None:
        # One random order of the rows, then a random rotation of it per
        # expert, so that each expert breaks its ties differently.
        shuffled = keras.random.shuffle(tf.range(num_rows), seed=shuffle_seed)
        offsets = tf.cast(
            keras.random.uniform([num_experts, 1], seed=shuffle_seed)
            * tf.cast(num_rows, tf.float32), tf.int32)
        order = tf.gather(shuffled,
                          (order + offsets) % tf.maximum(num_rows, 1))
    keys = tf.gather(keys, tf.broadcast_to(order, tf.shape(keys)),
                     batch_dims=2)  # In visiting order.
    if max_per_expert is None:
        max_per_expert = tf.reduce_max(tf.concat([per_expert, [0]], axis=0))
    # A sentinel column (each row of keys' minimum, visited last, so it
    # ranks after every row) keeps top_k and the gathers below defined for
    # an empty segment (m = 0, where nothing is taken anyway).
    sentinel = tf.reduce_min(keys, axis=-1, keepdims=True)
    top_values, top_positions = tf.math.top_k(
        tf.concat([keys, sentinel], axis=-1), k=max_per_expert + 1)
    # The m-th best (value, position) of each (segment, expert): a
    # position is taken when it comes before it, ties going to the earlier
    # position as in top_k. Compared rather than scattered, so that every
    # op is batched over the segments (DTensor shards them).
    last = tf.maximum(per_expert - 1, 0)[:, None, None]  # [S, 1, 1]
    last = tf.broadcast_to(last, tf.concat([tf.shape(keys)[:2], [1]], 0))
    mth_value = tf.gather(top_values, last, batch_dims=2)  # [S, E, 1]
    mth_position = tf.gather(top_positions, last, batch_dims=2)
    position = tf.range(num_rows)
    taken = ((keys > mth_value)
             | ((keys == mth_value) & (position <= mth_position)))
    taken &= (per_expert > 0)[:, None, None]
    # Back from visiting order to rows: row order[e, p] is position p.
    inverse = tf.argsort(order, axis=1)  # [E, N]
    taken = tf.gather(taken, tf.broadcast_to(inverse, tf.shape(taken)),
                      batch_dims=2)
    return tf.transpose(taken, [0, 2, 1])


def segmented_batchwise_mask(log_probabilities, row_valid, k, num_segments,
                             **kwargs):
    """`batchwise_mask` of `[rows, E]` rows in `num_segments` equal
    segments, each balanced on its own: `[rows, E]` bool. `kwargs` go to
    `batchwise_mask`."""
    def segments(x):
        return tf.reshape(
            x, tf.concat([[num_segments, -1], tf.shape(x)[1:]], 0))
    return tf.reshape(
        batchwise_mask(segments(log_probabilities), segments(row_valid), k,
                       **kwargs),
        tf.shape(log_probabilities))


def slots_from_mask(probabilities, mask, max_slots=None, normalize=True):
    """Turns a `[rows, E]` expert mask into padded routing slots.

    `G(x)_i = p_i M_i / sum_j p_j M_j` (appendix F's renormalised gate),
    over the experts the row keeps; `p_i M_i` with `normalize=False`.

    Args:
        probabilities: `[rows, E]` softmax of the gate logits.
        mask: `[rows, E]` bool, the experts each row goes to.
        max_slots: optional static int: a row keeps at most its
            `max_slots` most probable masked experts (on a mesh, where
            shapes must be static); default: the most any row has.
        normalize: renormalise the kept probabilities of each row.

    Returns:
        `(expert_ids, gate_weights, slot_mask, num_dropped)`: the first
        three `[rows, k_max]` (rows with no expert get zero weights, so
        their output is zero), and the scalar int32 number of masked
        experts past `max_slots`.
    """
    per_row = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    if max_slots is None:
        max_slots = tf.reduce_max(tf.concat([per_row, [0]], axis=0))
    values, expert_ids = top_k_with_gather_gradient(
        tf.where(mask, probabilities, -tf.ones_like(probabilities)),
        max_slots)
    slot_mask = tf.gather(mask, expert_ids, batch_dims=1)
    kept = tf.where(slot_mask, values, tf.zeros_like(values))
    gate_weights = kept
    if normalize:
        gate_weights = tf.math.divide_no_nan(
            kept, tf.reduce_sum(kept, axis=1, keepdims=True))
    num_dropped = (tf.reduce_sum(per_row)
                   - tf.reduce_sum(tf.cast(slot_mask, tf.int32)))
    return expert_ids, gate_weights, slot_mask, num_dropped


def threshold_loss(log_probabilities, thresholds, threshold_mask, batch_mask,
                   row_weights):
    """L_batchwise, per valid row: `sum_i (M_thr - M_batch)_i (X_i - T_i)`.

    Every term is >= 0 and vanishes where the threshold mask agrees with
    the batchwise one; it pushes T_i above the values the batch dropped
    and below the ones it kept. Divided by the number of valid rows (the
    paper sums over the batch) so that its scale does not grow with it.

    Args:
        log_probabilities: `[rows, E]`.
        thresholds: `[E]` or `[rows, E]`.
        threshold_mask, batch_mask: `[rows, E]` bool.
        row_weights: `[rows]` 1 for valid rows, 0 otherwise.

    Returns:
        Scalar.
    """
    disagreement = (tf.cast(threshold_mask, log_probabilities.dtype)
                    - tf.cast(batch_mask, log_probabilities.dtype))
    per_row = tf.reduce_sum(disagreement * (log_probabilities - thresholds),
                            axis=1)
    return tf.math.divide_no_nan(tf.reduce_sum(per_row * row_weights),
                                 tf.reduce_sum(row_weights))


@keras.saving.register_keras_serializable(package="tf_moe")
class BatchwiseGate(Gate):
    """Strictly balanced gating (paper appendix F).

    `G_sigma(x) = softmax(x W_g)`. In training the mask is M_batchwise: each
    expert takes the m tokens of the batch with the largest G_sigma for it,
    `m = ceil(k * tokens / E)` (masked tokens not counted), so every expert
    receives exactly m tokens and a token gets k experts on average (some
    none, some more than k). At inference, M_threshold keeps expert i for x
    when `log G_sigma(x)_i > T_i`, so serving needs no batch statistics.
    `G(x)` is G_sigma renormalised over the kept experts.

    The thresholds T are trained by the paper's L_batchwise (returned as
    `threshold_loss`; the layers add it to their losses). They live in
    log-probability space: the masks are the paper's (log is monotone),
    and a threshold's scale does not shrink as 1/E, so an optimizer's
    usual step sizes suit it. They start at `log(1 / E)`, the uniform gate.

    There is no noise and no load estimate: the load is exactly balanced
    in training. Ties are broken at random in training (see
    `batchwise_mask`).

    Its `kernel` is W_g, `[(groups,) d, E]`. Args, call arguments: as
    `Gate`; in training the batchwise mask, otherwise the threshold mask.
    The `GateOutput` has `slot_mask` and `threshold_loss`.
    """

    # Each replica (and each mesh shard) balances its own batch.
    sums_statistics_over_replicas = False
    loss_names = ("threshold_loss",)

    def build_weights(self, model_dim):
        self.gate_kernel = self.add_weight(
            name="gate_kernel",
            shape=self.weight_shape(model_dim, self.num_experts),
            initializer=self.kernel_initializer, autocast=False)
        self.thresholds = self.add_weight(
            name="thresholds", shape=self.weight_shape(self.num_experts),
            initializer=keras.initializers.Constant(
                -math.log(self.num_experts)), autocast=False)

    @property
    def kernel(self):
        return tf.convert_to_tensor(self.gate_kernel)

    def rows_per_expert(self, num_valid_rows, training):
        if not training:
            return None
        return balanced_capacity(num_valid_rows, self.num_experts, self.k)

    def decide(self, logits, row_valid, training=None, noise=None,
               row_groups=None, num_segments=1):
        """See `Gate.route`. Returns expert_ids, gate_weights and slot_mask
        `[rows, k_max]`, threshold_loss and num_dropped. Where the strategy
        needs static shapes, k_max is `min(E, 2k)`: a row keeps its most
        probable experts up to it, and the rest count as dropped."""
        del noise  # No noise.
        num_rows = logits.shape[0]
        max_per_expert, max_slots = self.strategy.batchwise_bounds(
            None if num_rows is None else num_rows // num_segments,
            self.num_experts, self.k)
        log_probabilities = tf.nn.log_softmax(logits, axis=-1)
        thresholds = tf.convert_to_tensor(self.thresholds)
        if row_groups is not None:
            thresholds = tf.gather(thresholds, row_groups)
        threshold_mask = ((log_probabilities > thresholds)
                          & row_valid[:, None])
        if training:
            mask = segmented_batchwise_mask(
                log_probabilities, row_valid, self.k, num_segments,
                shuffle_seed=self.seed_generator,
                max_per_expert=max_per_expert)
            loss = threshold_loss(
                log_probabilities, thresholds, threshold_mask, mask,
                tf.cast(row_valid, log_probabilities.dtype))
        else:
            mask = threshold_mask
            loss = tf.zeros([], log_probabilities.dtype)
        expert_ids, gate_weights, slot_mask, num_dropped = slots_from_mask(
            tf.exp(log_probabilities), mask, max_slots)
        return Routing(expert_ids, gate_weights, logits, slot_mask=slot_mask,
                       threshold_loss=loss, num_dropped=num_dropped)


@keras.saving.register_keras_serializable(package="tf_moe")
class ExpertChoiceGate(Gate):
    """Expert-choice routing (Zhou et al., 2022): experts choose tokens.

    `S = softmax(x W_g)` over the experts; every expert takes the `C =
    ceil(capacity_factor * k * tokens / E)` tokens of the batch with the
    highest score for it (masked tokens neither counted nor taken), and a
    token's gate for each expert that took it is its score there, not
    renormalised. A token may get no expert (its output is zero) or
    several. Every expert receives exactly C tokens, so it is balanced by
    construction and has no balancing loss (only `balancing="none"`).
    Ties are broken at random in training and by position at inference.

    It reads the whole batch to route any token, in training and at
    inference alike: a token's experts depend on the other tokens of its
    batch, including later positions of its own sequence. An
    autoregressive decoder that feeds one position at a time therefore
    routes differently than it did in training (and is not causal in
    training); use it where the whole sequence is known (encoders, scoring
    full sequences), or a token-choice gate for decoding.

    On a mesh each token shard (as each tf.distribute replica) chooses
    among its own tokens, and a token keeps at most `min(E, 2k)` of the
    experts that chose it (its highest scores; the rest count as dropped).

    Its `kernel` is W_g, `[d, E]` (flat layers only).

    Args: as `Gate`, and
        capacity_factor: C's factor; None for 1 (k experts per token on
            average) with shapes that follow the batch, a number for static
            shapes (what XLA needs).
    """

    sums_statistics_over_replicas = False
    balancings = ("none",)

    def __init__(self, num_experts, k, capacity_factor=None, **kwargs):
        super().__init__(num_experts, k, **kwargs)
        if self.num_groups is not None:
            raise ValueError("`gating='expert_choice'` routes a flat layer "
                             "only (got a grouped gate).")
        if capacity_factor is not None and (
                not isinstance(capacity_factor, (int, float))
                or isinstance(capacity_factor, bool) or capacity_factor <= 0):
            raise ValueError("`capacity_factor` must be None or a number > 0, "
                             f"got {capacity_factor!r}.")
        self.capacity_factor = (None if capacity_factor is None
                                else float(capacity_factor))

    @property
    def factor(self):
        """C's factor: `capacity_factor`, 1 by default."""
        return self.capacity_factor or 1.0

    def bounds(self, rows_per_segment):
        """`(max_per_expert, max_slots)`: the strategy's static bounds; off
        a mesh, with a `capacity_factor` and a static batch, static ones
        that drop nothing (a token may be taken by all E experts), so that
        the gate compiles with XLA; else None (dynamic)."""
        bounds = self.strategy.batchwise_bounds(
            rows_per_segment, self.num_experts, self.k, self.factor)
        if (bounds[1] is None and self.capacity_factor is not None
                and rows_per_segment is not None):
            bounds = (balanced_capacity(rows_per_segment, self.num_experts,
                                        self.k, self.factor),
                      self.num_experts)
        return bounds

    def build_weights(self, model_dim):
        self.gate_kernel = self.add_weight(
            name="gate_kernel",
            shape=self.weight_shape(model_dim, self.num_experts),
            initializer=self.kernel_initializer, autocast=False)

    @property
    def kernel(self):
        return tf.convert_to_tensor(self.gate_kernel)

    def rows_per_expert(self, num_valid_rows, training):
        del training  # The same rule at inference.
        return balanced_capacity(num_valid_rows, self.num_experts, self.k,
                                 self.factor)

    def decide(self, logits, row_valid, training=None, noise=None,
               row_groups=None, num_segments=1):
        del noise, row_groups  # No noise; flat.
        num_rows = logits.shape[0]
        max_per_expert, max_slots = self.bounds(
            None if num_rows is None else num_rows // num_segments)
        log_probabilities = tf.nn.log_softmax(logits, axis=-1)
        mask = segmented_batchwise_mask(
            log_probabilities, row_valid, self.k, num_segments,
            shuffle_seed=self.seed_generator if training else None,
            max_per_expert=max_per_expert, capacity_factor=self.factor)
        expert_ids, gate_weights, slot_mask, num_dropped = slots_from_mask(
            tf.exp(log_probabilities), mask, max_slots, normalize=False)
        return Routing(expert_ids, gate_weights, logits, slot_mask=slot_mask,
                       num_dropped=num_dropped)

    def get_config(self):
        config = super().get_config()
        config.update(capacity_factor=self.capacity_factor)
        return config
