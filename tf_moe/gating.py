"""The gate interface: which experts each token goes to, and with what weight.

Every gate implements one interface (`Gate`): a kernel `[(groups,) d,
logit_width]` that turns tokens (or a hierarchical layer's group rows) into
logits, and `route(logits, row_valid, ...)`, which turns rows of logits into
a `Routing` (with the batch sums its balancing and the router z-loss need,
`RouterStatistics`). `call` on tokens is the same for every gate. The gates
(registered by name in `tf_moe.routers`):

- `NoisyTopKGate` (`tf_moe.top_k_gating`): the paper's noisy top-k gate
  (section 2.1) with the smooth load estimate of section 4.
- `TopKGate` (`tf_moe.top_k_gating`): softmax, then the k largest
  (GShard, Switch, Mixtral, DeepSeek-V3's bias balancing).
- `BatchwiseGate` (`tf_moe.balanced_gating`): the strictly balanced gate of
  appendix F.
- `ExpertChoiceGate` (`tf_moe.balanced_gating`): experts choose their
  tokens (Zhou et al. 2022).

A gate is flat (weights `[d, E]`) or grouped (`num_groups`: weights
`[groups, d, E]`, one gate per group of a `HierarchicalMoE`, whose logits
the layer computes over its group buffers and passes to `route`).

Gate arithmetic runs in the gate's compute dtype (float32 under mixed
precision: the layers build their gates with the variable dtype), and gate
weights are never autocast, even when a hierarchical layer reads them from
its own (bfloat16) call.
"""

import abc
from typing import Any, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe import distribution

# How a layer balances its experts (see `tf_moe.routers`).
BALANCINGS = ("paper", "switch", "bias", "none")


class RouterStatistics(NamedTuple):
    """One gate's sums over the valid rows of a batch, per group of rows.

    Sums, so that a layer can add them over data-parallel replicas before
    it computes the Switch balancing term and the router z-loss. The
    leading dimension is the gate's groups (1 for a flat gate).

    Attributes:
        rows: `[groups]` float, the valid rows.
        assignments: `[groups, E]` float, routed (row, expert) slots per
            expert, before any capacity ("switch" and "bias" balancing;
            None otherwise).
        probability_sum: `[groups, E]`, the sum of `softmax(router
            logits)` (Switch's P_i times rows), or None when not needed.
        z_sum: `[groups]`, the sum of `logsumexp(router logits)^2`, or None
            when not needed.
    """

    rows: tf.Tensor
    assignments: Optional[tf.Tensor] = None
    probability_sum: Optional[tf.Tensor] = None
    z_sum: Optional[tf.Tensor] = None


class GateOutput(NamedTuple):
    """What a gate decides for a batch of tokens.

    Attributes:
        expert_ids: `[tokens, k]` int32, the chosen experts, best first. For
            a gate with a variable number of experts per token, k is the
            largest number any token got, and `slot_mask` marks the padding.
        gate_weights: `[tokens, k]` float32 (0 for masked tokens and padding
            slots); they sum to 1 over a token's experts except for the
            gates that say otherwise (top-k without renormalisation, expert
            choice).
        importance: `[E]` float32, sum of gate values per expert.
        load: `[E]` float32 smooth load estimate, or None for a gate
            without noise (no estimator exists then).
        slot_mask: optional `[tokens, k]` bool, the slots to route (None:
            every slot of every unmasked token).
        threshold_loss: optional scalar, the batchwise gate's L_batchwise.
        num_dropped: scalar int32, assignments the gate decided but had no
            slot for (the batchwise gate on a mesh), 0 otherwise.
        statistics: a tuple of `RouterStatistics`, one per level of gates
            (two for a hierarchical layer).
    """

    expert_ids: tf.Tensor
    gate_weights: tf.Tensor
    importance: tf.Tensor
    load: Optional[tf.Tensor]
    slot_mask: Optional[tf.Tensor] = None
    threshold_loss: Optional[tf.Tensor] = None
    num_dropped: Any = 0
    statistics: Tuple[RouterStatistics, ...] = ()


class Routing(NamedTuple):
    """A gate's decision for rows of logits (see `Gate.route`).

    Attributes:
        expert_ids, gate_weights: `[rows, k]`; zero weights for invalid
            rows.
        router_logits: `[rows, E]`, the logits the gate's probabilities are
            the softmax of (without noise or balancing bias): what the
            Switch term and the z-loss read.
        selection_probability: `[rows, E]` P(x, i) of the smooth load
            estimate (zero for invalid rows), or None for a gate without
            one.
        slot_mask, threshold_loss, num_dropped: as in `GateOutput`.
        statistics: `RouterStatistics` (filled in by `Gate.route`).
    """

    expert_ids: tf.Tensor
    gate_weights: tf.Tensor
    router_logits: tf.Tensor
    selection_probability: Optional[tf.Tensor] = None
    slot_mask: Optional[tf.Tensor] = None
    threshold_loss: Optional[tf.Tensor] = None
    num_dropped: Any = 0
    statistics: Optional[RouterStatistics] = None

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
    logit_width]`) and implement `decide`.

    Args:
        num_experts: E, the experts the gate chooses among (per group).
        k: experts per token (on average, for the balanced gates).
        kernel_initializer: for the gate's kernels (the paper: zeros).
        seed: seed of the gate's random draws.
        num_groups: None for a flat gate; else one gate per group.
        balancing: how the layer balances this gate's experts, one of the
            gate's `balancings`; the gate gathers what it needs ("switch":
            the probability sums; "bias": the gate moves its own bias).
        router_z_loss: gather the sums of the router z-loss.

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
    # The balancings it supports; the first is its default.
    balancings = ("paper", "switch", "none")

    def __init__(self, num_experts, k, kernel_initializer="zeros", seed=None,
                 num_groups=None, balancing=None, router_z_loss=False,
                 **kwargs):
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
        balancing = self.balancings[0] if balancing is None else balancing
        if balancing not in self.balancings:
            raise ValueError(
                f"`balancing` must be one of {self.balancings} for "
                f"{type(self).__name__}, got {balancing!r}.")
        self.num_experts = num_experts
        self.k = k
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.num_groups = num_groups
        self.balancing = balancing
        self.router_z_loss = bool(router_z_loss)
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
    def decide(self, logits, row_valid, training=None, noise=None,
               row_groups=None, num_segments=1):
        """The routing of rows of logits, without its `statistics`: the
        gate's own rule. Arguments and result as `route`."""

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
            A `Routing` with its `RouterStatistics`.
        """
        routing = self.decide(logits, row_valid, training=training,
                              noise=noise, row_groups=row_groups,
                              num_segments=num_segments)
        statistics = self.router_statistics(routing, row_valid, row_groups)
        self.after_routing(statistics, training)
        return routing._replace(statistics=statistics)

    def router_statistics(self, routing, row_valid, row_groups=None):
        """The `RouterStatistics` of a routing (see there)."""
        num_groups = self.num_groups or 1
        if row_groups is None:
            row_groups = tf.zeros(tf.shape(row_valid), tf.int32)
        valid = tf.cast(row_valid, tf.float32)
        rows = tf.math.unsorted_segment_sum(valid, row_groups, num_groups)
        logits = tf.cast(routing.router_logits, tf.float32)
        assignments = probability_sum = z_sum = None
        if self.balancing in ("switch", "bias"):
            slots = tf.cast(routing.routed_slots & row_valid[:, None],
                            tf.float32)
            slot_experts = (row_groups[:, None] * self.num_experts
                            + routing.expert_ids)
            assignments = tf.reshape(tf.math.unsorted_segment_sum(
                tf.reshape(slots, [-1]), tf.reshape(slot_experts, [-1]),
                num_groups * self.num_experts),
                [num_groups, self.num_experts])
        if self.balancing == "switch":
            probability_sum = tf.math.unsorted_segment_sum(
                tf.nn.softmax(logits, axis=-1) * valid[:, None], row_groups,
                num_groups)
        if self.router_z_loss:
            z_sum = tf.math.unsorted_segment_sum(
                tf.square(tf.reduce_logsumexp(logits, axis=-1)) * valid,
                row_groups, num_groups)
        return RouterStatistics(rows, assignments, probability_sum, z_sum)

    def after_routing(self, statistics, training):
        """Hook for a gate that learns from its own routing (the bias of
        auxiliary-loss-free balancing); nothing by default."""
        del statistics, training

    def rows_per_expert(self, num_valid_rows, training):
        """The rows every expert receives, when the gate fixes it (a
        balanced gate); None otherwise."""
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
                          num_dropped=routing.num_dropped,
                          statistics=(routing.statistics,))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts,
            k=self.k,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            seed=self.seed,
            num_groups=self.num_groups,
            balancing=self.balancing,
            router_z_loss=self.router_z_loss,
        )
        return config
