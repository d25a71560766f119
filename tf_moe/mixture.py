"""What every MoE layer shares: tokens in, routed experts, tokens out.

The data flow of one call (the README's ARCHITECTURE section):

    inputs [..., d] -> tokens [T, d]
      -> route (the subclass's gates): a GateOutput over all experts
      -> token shards [shards, T / shards, ...] (the strategy)
      -> plan (`tf_moe.plan`) -> buffers (`tf_moe.dispatch`)
      -> the strategy moves them to the experts -> experts -> back
      -> combine, weighted by the gates -> [..., d_out]
      -> balancing losses (`tf_moe.balance`), summed over replicas by the
         strategy, through add_loss; routing metrics.

A subclass makes its gates and decides the routing (`_route`); this base
checks the shared arguments, runs the rest, and keeps the metrics
(`tf_moe.metrics`).
"""

import abc

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe import dispatch as dispatch_lib
from tf_moe import distribution
from tf_moe import gating as gating_lib
from tf_moe.experts import Experts
from tf_moe.metrics import RoutingMetrics

GATINGS = tuple(gating_lib.GATES)


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")


def check_non_negative(name, value):
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or value < 0):
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")


def _check_arguments(hidden_size, output_size, gating, importance_weight,
                     load_weight, capacity_factor, expert_dropout,
                     noise_epsilon):
    """Refuses bad values of the arguments every MoE layer shares."""
    check_positive_int("hidden_size", hidden_size)
    if output_size is not None:
        check_positive_int("output_size", output_size)
    if gating not in GATINGS:
        raise ValueError(
            f"`gating` must be one of {GATINGS}, got {gating!r}.")
    check_non_negative("importance_weight", importance_weight)
    check_non_negative("load_weight", load_weight)
    if capacity_factor is not None and (
            not isinstance(capacity_factor, (int, float))
            or capacity_factor <= 0):
        raise ValueError("`capacity_factor` must be None (dropless) or a "
                         f"number > 0, got {capacity_factor!r}.")
    if (not isinstance(expert_dropout, (int, float))
            or not 0 <= expert_dropout < 1):
        raise ValueError(
            f"`expert_dropout` must be in [0, 1), got {expert_dropout!r}.")
    check_non_negative("noise_epsilon", noise_epsilon)


class MixtureOfExperts(RoutingMetrics, distribution.PerReplicaLosses,
                       keras.layers.Layer, metaclass=abc.ABCMeta):
    """Base of `MoE` and `HierarchicalMoE` (see their docstrings, which
    document these arguments).

    Subclasses set `num_experts` (all experts) and `experts_per_token` (k
    of the whole layer, for the capacity), make their gates with
    `_make_gate` in `__init__`, list them in `_gates()` (this base builds
    them) and implement `_route`.
    """

    _default_name = "moe"

    def __init__(self, hidden_size, *, output_size=None,
                 gating="noisy_top_k", noisy_gating=True,
                 importance_weight=0.1, load_weight=0.1,
                 capacity_factor=None, activation="relu", expert_dropout=0.0,
                 noise_epsilon=1e-2, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", gate_initializer="zeros",
                 seed=None, **kwargs):
        if "name" not in kwargs:
            # "moe", "moe_1", ... as Keras names its own layers (the class
            # name would give "mo_e"); metric names carry the layer name.
            base = self._default_name
            uid = keras.backend.get_uid(f"tf_moe.{base}")
            kwargs["name"] = base if uid == 1 else f"{base}_{uid - 1}"
        super().__init__(**kwargs)
        _check_arguments(hidden_size, output_size, gating, importance_weight,
                         load_weight, capacity_factor, expert_dropout,
                         noise_epsilon)

        self.hidden_size = hidden_size
        self.output_size = output_size
        self.gating = gating
        # Only the noisy top-k gate has noise (and so a load estimate).
        self.noisy_gating = bool(noisy_gating) and gating == "noisy_top_k"
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.capacity_factor = (None if capacity_factor is None
                                else float(capacity_factor))
        self.activation = keras.activations.get(activation)
        self.expert_dropout = float(expert_dropout)
        self.noise_epsilon = float(noise_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.gate_initializer = keras.initializers.get(gate_initializer)
        self.seed = seed
        self.supports_masking = True

        self._make_metric_trackers(gating_lib.GATES[gating].loss_names)

    def _make_gate(self, num_experts, k, seed_offset=0, **kwargs):
        """A gate of the layer's gating, float32 under mixed precision."""
        return gating_lib.make_gate(
            self.gating, num_experts, k, noisy_gating=self.noisy_gating,
            noise_epsilon=self.noise_epsilon,
            kernel_initializer=self.gate_initializer,
            seed=None if self.seed is None else self.seed + seed_offset,
            dtype=self.dtype_policy.variable_dtype, **kwargs)

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"`inputs` must have rank >= 2 ([..., d]), got shape "
                f"{tuple(input_shape)}.")
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                "`inputs` must have a known last dimension (the model "
                f"width d), got shape {tuple(input_shape)}.")
        self.model_dim = model_dim
        self.strategy = distribution.strategy_at_build()
        self.strategy.check_num_experts(self.num_experts, self.name)
        for gate in self._gates():
            gate.build((None, model_dim))
        self.experts = Experts(
            self.num_experts, self.hidden_size,
            self.output_size or model_dim, activation=self.activation,
            dropout=self.expert_dropout,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer, seed=self.seed,
            dtype=self.dtype_policy, name="experts")
        self.experts.build((self.num_experts, None, model_dim))
        self.expert_token_counts = self.add_weight(
            name="expert_token_counts", shape=(self.num_experts,),
            dtype="int32", initializer="zeros", trainable=False)

    @abc.abstractmethod
    def _gates(self):
        """The layer's gates (the first decides how statistics sum over
        replicas)."""

    @abc.abstractmethod
    def _route(self, tokens, token_mask, training):
        """Decides the routing of a batch.

        Returns:
            `(gate_output, dropped_before_dispatch)`: a `GateOutput` over all
            `num_experts` experts, and the number of (token, expert)
            assignments lost before the expert dispatch (a hierarchical
            layer's group capacity), which `dropped_fraction` counts too.
        """

    def call(self, inputs, training=None, mask=None):
        if not inputs.dtype.is_floating:
            raise ValueError(
                f"`inputs` must be a floating tensor, got dtype "
                f"{inputs.dtype.name}.")
        output_size = self.output_size or self.model_dim
        tokens = tf.reshape(inputs, [-1, self.model_dim])
        token_mask = None if mask is None else tf.reshape(mask, [-1])

        gate_output, dropped_before_dispatch = self._route(
            tokens, token_mask, training)
        outputs, plan = self._run_experts(tokens, token_mask, gate_output,
                                          training)
        self._add_losses_and_metrics(gate_output, plan,
                                     dropped_before_dispatch)
        output_shape = tf.concat(
            [tf.shape(inputs)[:-1], [output_size]], axis=0)
        return tf.reshape(outputs, output_shape)

    def _run_experts(self, tokens, token_mask, gate_output, training):
        """Dispatch, experts and combine: `([T, d_out], DispatchPlan)`."""
        plan, shards = self.strategy.plan(
            gate_output.expert_ids, self.num_experts, self.experts_per_token,
            self.capacity_factor, token_mask=token_mask,
            slot_mask=gate_output.slot_mask)
        main, overflow = dispatch_lib.dispatch(shards(tokens), plan)
        main = self.strategy.to_experts(main)
        if overflow is None:
            main_out, overflow_out = self.experts(main, training=training), None
        else:  # Dropless, one shard: the experts also take the overflow.
            main_out, overflow_out = self.experts(
                main, overflow, plan.overflow_experts, training=training)
        main_out = self.strategy.from_experts(main_out)
        outputs = dispatch_lib.combine((main_out, overflow_out), plan,
                                       shards(gate_output.gate_weights))
        return self.strategy.merge_shards(outputs), plan

    def _add_losses_and_metrics(self, gate_output, plan,
                                dropped_before_dispatch):
        # Batch sums over all data-parallel replicas, in one all-reduce.
        counts_and_drops = tf.concat([
            tf.cast(plan.expert_counts, tf.float32),
            tf.cast(tf.stack([plan.num_dropped, dropped_before_dispatch]),
                    tf.float32)], axis=0)
        statistics = [gate_output.importance, counts_and_drops]
        if gate_output.load is not None:
            statistics.append(gate_output.load)
        if self._gates()[0].sums_statistics_over_replicas:
            statistics = self.strategy.sum_over_replicas(statistics)
        importance, counts_and_drops = statistics[:2]
        load = statistics[2] if gate_output.load is not None else None

        importance_loss, load_loss = balance.balancing_loss(
            importance, load, self.importance_weight, self.load_weight)
        losses = {"importance_loss": importance_loss,
                  "load_loss": load_loss}
        if gate_output.threshold_loss is not None:
            losses["threshold_loss"] = gate_output.threshold_loss
        self.add_loss(tf.add_n(list(losses.values())))

        counts = counts_and_drops[:self.num_experts]
        num_dropped, dropped_before = tf.unstack(
            counts_and_drops[self.num_experts:])
        self._record_routing(importance, counts,
                             num_dropped + dropped_before,
                             tf.reduce_sum(counts) + dropped_before, losses)

    def compute_output_shape(self, input_shape):
        output_size = self.output_size or input_shape[-1]
        return tuple(input_shape[:-1]) + (output_size,)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_size=self.hidden_size,
            output_size=self.output_size,
            gating=self.gating,
            noisy_gating=self.noisy_gating,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            capacity_factor=self.capacity_factor,
            activation=keras.activations.serialize(self.activation),
            expert_dropout=self.expert_dropout,
            noise_epsilon=self.noise_epsilon,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(
                self.bias_initializer),
            gate_initializer=keras.initializers.serialize(
                self.gate_initializer),
            seed=self.seed,
        )
        return config
