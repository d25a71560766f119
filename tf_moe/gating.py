"""Gates: which experts each token goes to, and with what weight.

Every gate implements one interface (`Gate`): a kernel `[(groups,) d,
logit_width]` that turns tokens (or a hierarchical layer's group rows) into
logits, and `route(logits, row_valid, ...)`, which turns rows of logits into
a `Routing`. `call` on tokens is the same for every gate. The gates:

- `NoisyTopKGate`: the paper's noisy top-k gate (section 2.1) with the
  smooth load estimate of section 4.
- `BatchwiseGate`: the strictly balanced gate of appendix F. In training
  every expert takes exactly its top `m = ceil(k * tokens / E)` tokens of
  the batch; at inference learned per-expert thresholds replace the batch
  statistics. Tokens get a variable number of experts (k on average).

A gate is flat (weights `[d, E]`) or grouped (`num_groups`: weights
`[groups, d, E]`, one gate per group of a `HierarchicalMoE`, whose logits
the layer computes over its group buffers and passes to `route`).

Gate arithmetic runs in the gate's compute dtype (float32 under mixed
precision: the layers build their gates with the variable dtype), and gate
weights are never autocast, even when a hierarchical layer reads them from
its own (bfloat16) call.
"""

import abc
import math
from typing import Any, NamedTuple, Optional

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe import distribution


class GateOutput(NamedTuple):
    """What a gate decides for a batch of tokens.

    Attributes:
        expert_ids: `[tokens, k]` int32, the chosen experts, best first. For
            a gate with a variable number of experts per token, k is the
            largest number any token got, and `slot_mask` marks the padding.
        gate_weights: `[tokens, k]` float32; each token's weights sum to 1
            over its experts (0 for masked tokens and padding slots).
        importance: `[E]` float32, sum of gate values per expert.
        load: `[E]` float32 smooth load estimate, or None for a gate
            without noise (no estimator exists then).
        slot_mask: optional `[tokens, k]` bool, the slots to route (None:
            every slot of every unmasked token).
        threshold_loss: optional scalar, the batchwise gate's L_batchwise.
        num_dropped: scalar int32, assignments the gate decided but had no
            slot for (the batchwise gate on a mesh), 0 otherwise.
    """

    expert_ids: tf.Tensor
    gate_weights: tf.Tensor
    importance: tf.Tensor
    load: Optional[tf.Tensor]
    slot_mask: Optional[tf.Tensor] = None
    threshold_loss: Optional[tf.Tensor] = None
    num_dropped: Any = 0


class Routing(NamedTuple):
    """A gate's decision for rows of logits (see `Gate.route`).

    Attributes:
        expert_ids, gate_weights: `[rows, k]`; zero weights for invalid
            rows.
        selection_probability: `[rows, E]` P(x, i) of the smooth load
            estimate (zero for invalid rows), or None for a gate without
            one.
        slot_mask, threshold_loss, num_dropped: as in `GateOutput`.
    """

    expert_ids: tf.Tensor
    gate_weights: tf.Tensor
    selection_probability: Optional[tf.Tensor] = None
    slot_mask: Optional[tf.Tensor] = None
    threshold_loss: Optional[tf.Tensor] = None
    num_dropped: Any = 0

    @property
    def routed_slots(self):
        """`[rows, k]` bool: the slots that carry an expert (every slot
        without a `slot_mask`)."""
        if self.slot_mask is None:
            return tf.ones_like(self.expert_ids, tf.bool)
        return self.slot_mask


def top_k_with_gather_gradient(logits, k):
    """`tf.math.top_k` whose values get their gradient through a gather.

    TopKV2's own gradient scatters into the flattened logits with global
    indices, which is wrong when the rows are split over a DTensor mesh
    (indices past the local shard); a batched gather's gradient is
    computed row by row. Values and gradients are the same.
    """
    top_ids = tf.math.top_k(tf.stop_gradient(logits), k=k).indices
    return tf.gather(logits, top_ids, batch_dims=1), top_ids


@keras.saving.register_keras_serializable(package="tf_moe")
class Gate(keras.layers.Layer, metaclass=abc.ABCMeta):
    """The interface of every gate.

    Subclasses make their weights in `build_weights(model_dim)`, give the
    projection of tokens to logits as `kernel` (`[(groups,) d,
    logit_width]`) and implement `route`.

    Args:
        num_experts: E, the experts the gate chooses among (per group).
        k: experts per token (on average, for the batchwise gate).
        kernel_initializer: for the gate's kernels (the paper: zeros).
        seed: seed of the gate's random draws.
        num_groups: None for a flat gate; else one gate per group.

    Call arguments (flat gate):
        tokens: `[tokens, d]` floating tensor.
        token_mask: optional `[tokens]` bool; masked tokens get zero gate
            weights and count in no balancing statistic.
        training: the training-mode routing when true.

    Returns:
        A `GateOutput`.
    """

    # Whether a layer sums this gate's balancing statistics over
    # data-parallel replicas (the batch is global), or keeps them per
    # replica (a gate that balances each replica's own batch).
    sums_statistics_over_replicas = True
    # The names of the extra loss terms its `Routing` carries.
    loss_names = ()

    def __init__(self, num_experts, k, kernel_initializer="zeros", seed=None,
                 num_groups=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(
                f"`num_experts` must be an int >= 1, got {num_experts!r}.")
        if not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(
                f"`k` must be an int in [1, num_experts={num_experts}], "
                f"got {k!r}.")
        if num_groups is not None and (not isinstance(num_groups, int)
                                       or num_groups < 1):
            raise ValueError("`num_groups` must be None or an int >= 1, got "
                             f"{num_groups!r}.")
        self.num_experts = num_experts
        self.k = k
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.num_groups = num_groups
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.strategy = distribution.strategy_at_build()
        self.build_weights(input_shape[-1])

    @abc.abstractmethod
    def build_weights(self, model_dim):
        """Makes the gate's weights for inputs of width `model_dim`."""

    def weight_shape(self, *shape):
        """`shape`, with the groups first for a grouped gate."""
        return shape if self.num_groups is None else (self.num_groups,) + shape

    @property
    @abc.abstractmethod
    def kernel(self):
        """`[(groups,) d, logit_width]`: tokens -> the logits of `route`."""

    @abc.abstractmethod
    def route(self, logits, row_valid, training=None, noise=None,
              row_groups=None, num_segments=1):
        """Routing of rows of logits.

        Args:
            logits: `[rows, logit_width]`, rows projected by `kernel`.
            row_valid: `[rows]` bool, the rows to route (the others get zero
                weights and count in no statistic).
            training: the training-mode routing when true.
            noise: optional `[rows, E]` standard normal noise for a noisy
                gate in training, instead of drawing it: a caller whose
                rows are laid out differently on a mesh than on one device
                draws the noise per token and moves it with the rows.
            row_groups: `[rows]` int32, each row's group (grouped gate).
            num_segments: rows come in this many equal segments that a gate
                balancing its batch balances on their own (a hierarchical
                layer's groups, and on a mesh each token shard's rows).

        Returns:
            A `Routing`.
        """

    def rows_per_expert(self, num_valid_rows, training):
        """The rows every expert receives, when the gate fixes it (a
        balanced gate in training); None otherwise."""
        del num_valid_rows, training
        return None

    def uses_noise(self, training):
        """Whether `route` draws noise (which a caller may pass instead)."""
        del training
        return False

    def draw_noise(self, shape, dtype):
        """Standard normal noise of `shape` from the gate's seed stream,
        the same on any mesh as on one device."""
        return self.strategy.normal(shape, dtype, self.seed_generator)

    def call(self, tokens, token_mask=None, training=None):
        tokens = tf.cast(tokens, self.compute_dtype)
        row_valid = (tf.ones(tf.shape(tokens)[:1], tf.bool)
                     if token_mask is None else tf.reshape(token_mask, [-1]))
        routing = self.route(
            tf.matmul(tokens, self.kernel), row_valid, training=training,
            num_segments=self.strategy.num_token_shards)
        importance = balance.importance(routing.expert_ids,
                                        routing.gate_weights,
                                        self.num_experts)
        probability = routing.selection_probability
        load = (None if probability is None
                else tf.reduce_sum(probability, axis=0))
        return GateOutput(routing.expert_ids, routing.gate_weights,
                          importance, load, slot_mask=routing.slot_mask,
                          threshold_loss=routing.threshold_loss,
                          num_dropped=routing.num_dropped)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            k=self.k,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            seed=self.seed,
            num_groups=self.num_groups,
        )
        return config


@keras.saving.register_keras_serializable(package="tf_moe")
class NoisyTopKGate(Gate):
    """The paper's noisy top-k gate.

    `H(x) = x W_g + N(0, 1) * (softplus(x W_noise) + noise_epsilon)` in
    training (no noise at inference, so routing is deterministic),
    `G(x) = softmax(KeepTopK(H(x), k))`. W_g and W_noise start at zero: no
    signal and some noise, so routing starts uniform. Its `kernel` is W_g
    and W_noise side by side, `[(groups,) d, 2E]` (W_g alone without
    noise).

    `noise_epsilon` keeps the noise scale, and so the load estimate
    `Phi(. / scale)`, finite where softplus underflows; the paper authors'
    code uses the same 1e-2.

    Args: as `Gate`, and
        noisy_gating: the trainable noise and the load estimate; False
            gives plain top-k.
        noise_epsilon: added to the noise scale.
    """

    def __init__(self, num_experts, k, noisy_gating=True, noise_epsilon=1e-2,
                 **kwargs):
        super().__init__(num_experts, k, **kwargs)
        if noise_epsilon < 0:
            raise ValueError(
                f"`noise_epsilon` must be >= 0, got {noise_epsilon!r}.")
        self.noisy_gating = bool(noisy_gating)
        self.noise_epsilon = float(noise_epsilon)

    def uses_noise(self, training):
        return self.noisy_gating and bool(training)

    def build_weights(self, model_dim):
        shape = self.weight_shape(model_dim, self.num_experts)
        self.gate_kernel = self.add_weight(
            name="gate_kernel", shape=shape,
            initializer=self.kernel_initializer, autocast=False)
        if self.noisy_gating:
            self.noise_kernel = self.add_weight(
                name="noise_kernel", shape=shape,
                initializer=self.kernel_initializer, autocast=False)

    @property
    def kernel(self):
        kernel = tf.convert_to_tensor(self.gate_kernel)
        if self.noisy_gating:
            # One matmul for the gate and the noise logits.
            kernel = tf.concat([kernel, self.noise_kernel], axis=-1)
        return kernel

    def route(self, logits, row_valid, training=None, noise=None,
              row_groups=None, num_segments=1):
        del row_groups, num_segments  # Each row is routed on its own.
        clean_logits = logits
        if self.noisy_gating:
            clean_logits, noise_logits = tf.split(logits, 2, axis=-1)
            noise_stddev = tf.nn.softplus(noise_logits) + self.noise_epsilon
        noisy_logits = clean_logits
        if self.noisy_gating and training:
            if noise is None:
                noise = self.draw_noise(tf.shape(clean_logits),
                                        clean_logits.dtype)
            noisy_logits = clean_logits + noise * noise_stddev
        # With k+1 values the load estimator finds kth_excluding for every
        # expert from the same top_k call that picks the experts.
        num_top = min(self.k + 1, self.num_experts)
        top_values, top_ids = top_k_with_gather_gradient(noisy_logits,
                                                         num_top)
        expert_ids = top_ids[:, :self.k]
        row_weights = tf.cast(row_valid, clean_logits.dtype)[:, None]
        gate_weights = (tf.nn.softmax(top_values[:, :self.k], axis=-1)
                        * row_weights)
        probability = None
        if self.noisy_gating:
            probability = balance.selection_probability(
                clean_logits, noisy_logits, noise_stddev, top_values,
                self.k) * row_weights
        return Routing(expert_ids, gate_weights, probability)

    def get_config(self):
        config = super().get_config()
        config.update(noisy_gating=self.noisy_gating,
                      noise_epsilon=self.noise_epsilon)
        return config


def balanced_capacity(num_valid, num_experts, k):
    """`m = ceil(k * num_valid / E)`, the tokens each expert takes (int32)."""
    return (k * num_valid + num_experts - 1) // num_experts


def batchwise_mask(log_probabilities, row_valid, k, shuffle_seed=None,
                   max_per_expert=None):
    """M_batchwise: each expert keeps its top m rows of a segment.

    Args:
        log_probabilities: `[segments, rows, E]` (any per-element monotone
            function of the softmax gives the same mask).
        row_valid: `[segments, rows]` bool; invalid rows are never kept.
        k: experts per row on average: `m = ceil(k * valid rows / E)` per
            segment (at most the valid rows, as k <= E).
        shuffle_seed: optional SeedGenerator: each expert breaks ties in
            its own random order of the rows. Without it the first rows win
            every tie, and a zero-initialised gate (all values equal) would
            send the first m rows to every expert and none to the rest.
        max_per_expert: optional static int >= every segment's m (on a
            mesh, where shapes must be static); default: the largest m.

    Returns:
        `[segments, rows, E]` bool, exactly m True per (segment, expert).
    """
    num_rows, num_experts = tf.unstack(tf.shape(log_probabilities)[1:])
    num_valid = tf.reduce_sum(tf.cast(row_valid, tf.int32), axis=1)
    per_expert = balanced_capacity(num_valid, num_experts, k)  # m [S]
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


def slots_from_mask(probabilities, mask, max_slots=None):
    """Turns a `[rows, E]` expert mask into padded routing slots.

    `G(x)_i = p_i M_i / sum_j p_j M_j` (appendix F's renormalised gate),
    over the experts the row keeps.

    Args:
        probabilities: `[rows, E]` softmax of the gate logits.
        mask: `[rows, E]` bool, the experts each row goes to.
        max_slots: optional static int: a row keeps at most its
            `max_slots` most probable masked experts (on a mesh, where
            shapes must be static); default: the most any row has.

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

    def route(self, logits, row_valid, training=None, noise=None,
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
            def segments(x):
                return tf.reshape(
                    x, tf.concat([[num_segments, -1], tf.shape(x)[1:]], 0))
            mask = tf.reshape(
                batchwise_mask(segments(log_probabilities),
                               segments(row_valid), self.k,
                               shuffle_seed=self.seed_generator,
                               max_per_expert=max_per_expert),
                tf.shape(log_probabilities))
            loss = threshold_loss(
                log_probabilities, thresholds, threshold_mask, mask,
                tf.cast(row_valid, log_probabilities.dtype))
        else:
            mask = threshold_mask
            loss = tf.zeros([], log_probabilities.dtype)
        expert_ids, gate_weights, slot_mask, num_dropped = slots_from_mask(
            tf.exp(log_probabilities), mask, max_slots)
        return Routing(expert_ids, gate_weights, slot_mask=slot_mask,
                       threshold_loss=loss, num_dropped=num_dropped)


GATES = {"noisy_top_k": NoisyTopKGate, "batchwise": BatchwiseGate}


def make_gate(gating, num_experts, k, noisy_gating=True, noise_epsilon=1e-2,
              **kwargs):
    """The gate named `gating` (a key of `GATES`); the noise arguments go
    to the gates that have noise."""
    gate_class = GATES[gating]
    if issubclass(gate_class, NoisyTopKGate):
        kwargs.update(noisy_gating=noisy_gating, noise_epsilon=noise_epsilon)
    return gate_class(num_experts, k, **kwargs)
