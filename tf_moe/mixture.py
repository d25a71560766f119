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
from tf_moe import expert_weights
from tf_moe import plan as plan_lib
from tf_moe import routers
from tf_moe.arguments import (check_activation, check_non_negative,
                              check_positive_int)
from tf_moe.experts import EXPERT_TYPES, Experts
from tf_moe.metrics import RoutingMetrics

# The default hidden activation of each expert type.
DEFAULT_ACTIVATIONS = {"ffn": "relu", "glu": "silu"}


def _check_arguments(hidden_size, output_size, importance_weight,
                     load_weight, capacity_factor, expert_dropout,
                     noise_epsilon, expert_type, activation,
                     num_shared_experts, shared_hidden_size):
    """Refuses bad values of the arguments every MoE layer shares (the
    router's: `routers.check_router_arguments`)."""
    check_positive_int("hidden_size", hidden_size)
    if output_size is not None:
        check_positive_int("output_size", output_size)
    check_non_negative("importance_weight", importance_weight)
    check_non_negative("load_weight", load_weight)
    if capacity_factor is not None and (
            not isinstance(capacity_factor, (int, float))
            or isinstance(capacity_factor, bool) or capacity_factor <= 0):
        raise ValueError("`capacity_factor` must be None (dropless) or a "
                         f"number > 0, got {capacity_factor!r}.")
    if (not isinstance(expert_dropout, (int, float))
            or not 0 <= expert_dropout < 1):
        raise ValueError(
            f"`expert_dropout` must be in [0, 1), got {expert_dropout!r}.")
    check_non_negative("noise_epsilon", noise_epsilon)
    if expert_type not in EXPERT_TYPES:
        raise ValueError(f"`expert_type` must be one of {EXPERT_TYPES}, got "
                         f"{expert_type!r}.")
    if activation is not None:
        check_activation("activation", activation)
    if (not isinstance(num_shared_experts, int)
            or isinstance(num_shared_experts, bool) or num_shared_experts < 0):
        raise ValueError("`num_shared_experts` must be an int >= 0, got "
                         f"{num_shared_experts!r}.")
    if shared_hidden_size is not None:
        check_positive_int("shared_hidden_size", shared_hidden_size)


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
                 normalize_gates=True, balancing=None,
                 importance_weight=0.1, load_weight=0.1,
                 aux_loss_weight=0.01, bias_update_rate=1e-3,
                 router_z_loss_weight=0.0, router_jitter=0.0,
                 capacity_factor=None, expert_type="ffn", activation=None,
                 num_shared_experts=0, shared_hidden_size=None,
                 expert_dropout=0.0, noise_epsilon=1e-2,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", gate_initializer="zeros",
                 expert_storage="stacked", seed=None, **kwargs):
        if "name" not in kwargs:
            # "moe", "moe_1", ... as Keras names its own layers (the class
            # name would give "mo_e"); metric names carry the layer name.
            base = self._default_name
            uid = keras.backend.get_uid(f"tf_moe.{base}")
            kwargs["name"] = base if uid == 1 else f"{base}_{uid - 1}"
        super().__init__(**kwargs)
        self.balancing = routers.check_router_arguments(
            gating, balancing, aux_loss_weight, bias_update_rate,
            router_z_loss_weight, router_jitter)
        _check_arguments(hidden_size, output_size, importance_weight,
                         load_weight, capacity_factor, expert_dropout,
                         noise_epsilon, expert_type, activation,
                         num_shared_experts, shared_hidden_size)

        self.hidden_size = hidden_size
        self.output_size = output_size
        self.gating = gating
        # Only the noisy top-k gate has noise (and so a load estimate).
        self.noisy_gating = bool(noisy_gating) and gating == "noisy_top_k"
        self.normalize_gates = bool(normalize_gates)
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.aux_loss_weight = float(aux_loss_weight)
        self.bias_update_rate = float(bias_update_rate)
        self.router_z_loss_weight = float(router_z_loss_weight)
        self.router_jitter = float(router_jitter)
        self.capacity_factor = (None if capacity_factor is None
                                else float(capacity_factor))
        self.expert_type = expert_type
        self.activation = keras.activations.get(
            DEFAULT_ACTIVATIONS[expert_type] if activation is None
            else activation)
        self.num_shared_experts = num_shared_experts
        self.shared_hidden_size = shared_hidden_size or hidden_size
        self.expert_dropout = float(expert_dropout)
        self.noise_epsilon = float(noise_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.gate_initializer = keras.initializers.get(gate_initializer)
        expert_weights.check_storage(expert_storage)
        self.expert_storage = expert_storage
        self.seed = seed
        self.supports_masking = True
        # The jitter draws its own stream (the gates have theirs).
        self.jitter_seed = keras.random.SeedGenerator(
            None if seed is None else seed + 2)

        loss_names = routers.GATES[gating].loss_names
        if self.balancing == "switch":
            loss_names += ("switch_loss",)
        if self.router_z_loss_weight > 0:
            loss_names += ("z_loss",)
        self._make_metric_trackers(loss_names)

    def _make_gate(self, num_experts, k, seed_offset=0, **kwargs):
        """A gate of the layer's gating, float32 under mixed precision."""
        return routers.make_gate(
            self.gating, num_experts, k, noisy_gating=self.noisy_gating,
            noise_epsilon=self.noise_epsilon,
            normalize_gates=self.normalize_gates,
            bias_update_rate=self.bias_update_rate,
            capacity_factor=self.capacity_factor, balancing=self.balancing,
            router_z_loss=self.router_z_loss_weight > 0,
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
        self.experts = self._make_experts(self.num_experts, self.hidden_size,
                                          storage=self.expert_storage,
                                          name="experts")
        self.experts.build((self.num_experts, None, model_dim))
        self.shared_experts = None
        if self.num_shared_experts:
            # Every token goes through all of them (replicated on a mesh).
            self.shared_experts = self._make_experts(
                self.num_shared_experts, self.shared_hidden_size,
                sharded=False, name="shared_experts")
            self.shared_experts.build((self.num_shared_experts, None,
                                       model_dim))
        self.expert_token_counts = self.add_weight(
            name="expert_token_counts", shape=(self.num_experts,),
            dtype="int32", initializer="zeros", trainable=False)

    def _make_experts(self, num_experts, hidden_size, **kwargs):
        return Experts(
            num_experts, hidden_size, self.output_size or self.model_dim,
            activation=self.activation, dropout=self.expert_dropout,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer, seed=self.seed,
            expert_type=self.expert_type, dtype=self.dtype_policy, **kwargs)

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

        # The name scopes are the stages bench/profile_layer.py reports.
        with tf.name_scope("route"):
            gate_output, dropped_before_dispatch = self._route(
                self._jitter(tokens, training), token_mask, training)
        outputs, plan = self._run_experts(tokens, token_mask, gate_output,
                                          training)
        if self.shared_experts is not None:
            outputs += self._run_shared_experts(tokens, token_mask, training)
        with tf.name_scope("losses"):
            self._add_losses_and_metrics(gate_output, plan,
                                         dropped_before_dispatch)
        output_shape = tf.concat(
            [tf.shape(inputs)[:-1], [output_size]], axis=0)
        return tf.reshape(outputs, output_shape)

    def _jitter(self, tokens, training):
        """Switch's router jitter: the routers read `x * U(1 - eps, 1 +
        eps)` in training (the experts read x)."""
        if not training or self.router_jitter == 0:
            return tokens
        # Uniform as Phi of the strategy's normal draw, so that the values
        # do not depend on how a mesh lays out the tokens.
        uniform = balance.normal_cdf(self.strategy.normal(
            tf.shape(tokens), tf.float32, self.jitter_seed))
        scale = 1 - self.router_jitter + 2 * self.router_jitter * uniform
        return tokens * tf.cast(scale, tokens.dtype)

    def _run_shared_experts(self, tokens, token_mask, training):
        """`[T, d_out]`: the shared experts on every (unmasked) token."""
        outputs = self.shared_experts.every_token(tokens, training=training)
        if token_mask is not None:
            outputs *= tf.cast(token_mask, outputs.dtype)[:, None]
        return outputs

    def _run_experts(self, tokens, token_mask, gate_output, training):
        """Dispatch, experts and combine: `([T, d_out], DispatchPlan)`."""
        shard_tokens = (None if tokens.shape[0] is None else
                        tokens.shape[0] // self.strategy.num_token_shards)
        rows_hint = plan_lib.balanced_rows(
            shard_tokens, self.num_experts, self.experts_per_token)
        with tf.name_scope("plan"):
            # The packed layout's shapes vary per batch: not on a mesh.
            packed = not self.strategy.static_shapes and (
                self.experts.layout(rows_hint, tokens.dtype,
                                    self._fixed_capacity(shard_tokens))
                == "packed")
            plan, shards = self.strategy.plan(
                gate_output.expert_ids, self.num_experts,
                self.experts_per_token, self.capacity_factor,
                token_mask=token_mask, slot_mask=gate_output.slot_mask,
                packed=packed)
        with tf.name_scope("dispatch"):
            main, overflow = dispatch_lib.dispatch(shards(tokens), plan)
            main = self.strategy.to_experts(main)
        if overflow is None:
            main_out, overflow_out = self.experts(
                main, training=training, rows_hint=rows_hint,
                expert_rows=plan.expert_rows), None
        else:  # Dropless, one shard: the experts also take the overflow.
            main_out, overflow_out = self.experts(
                main, overflow, plan.overflow_experts, training=training,
                rows_hint=rows_hint)
        with tf.name_scope("combine"):
            main_out = self.strategy.from_experts(main_out)
            outputs = dispatch_lib.combine((main_out, overflow_out), plan,
                                           shards(gate_output.gate_weights))
            return self.strategy.merge_shards(outputs), plan

    def _fixed_capacity(self, shard_tokens):
        """The rows of each expert's buffer under a fixed capacity factor,
        or None (dropless, or tokens known only at run time)."""
        capacity_factor = self.strategy.capacity_factor(self.capacity_factor)
        if capacity_factor is None or shard_tokens is None:
            return None
        return plan_lib.fixed_capacity(shard_tokens, self.num_experts,
                                       self.experts_per_token,
                                       capacity_factor)

    def _add_losses_and_metrics(self, gate_output, plan,
                                dropped_before_dispatch):
        statistics = self._batch_statistics(gate_output, plan,
                                            dropped_before_dispatch)
        losses = {"importance_loss": tf.zeros([]), "load_loss": tf.zeros([])}
        if self.balancing == "paper":
            losses["importance_loss"], losses["load_loss"] = (
                balance.balancing_loss(
                    statistics["importance"], statistics.get("load"),
                    self.importance_weight, self.load_weight))
        if self.balancing == "switch":
            losses["switch_loss"] = self.aux_loss_weight * tf.add_n(
                [balance.switch_loss(level)
                 for level in statistics["levels"]])
        if self.router_z_loss_weight > 0:
            losses["z_loss"] = self.router_z_loss_weight * tf.add_n(
                [balance.router_z_loss(level)
                 for level in statistics["levels"]])
        if gate_output.threshold_loss is not None:
            losses["threshold_loss"] = gate_output.threshold_loss
        self.add_loss(tf.add_n(list(losses.values())))

        counts = statistics["counts"]
        num_dropped = statistics["num_dropped"]
        self._record_routing(statistics["importance"], counts, num_dropped,
                             tf.reduce_sum(counts)
                             + statistics["dropped_before_dispatch"], losses)

    def _batch_statistics(self, gate_output, plan, dropped_before_dispatch):
        """The batch's sums the losses and metrics read, over all
        data-parallel replicas (one all-reduce) unless the gate balances
        each replica's batch on its own.

        Returns:
            A dict: `importance` and `counts` `[E]`, `load` `[E]` (noisy
            gates), `num_dropped` and `dropped_before_dispatch` scalars,
            and `levels`, the gates' `RouterStatistics`.
        """
        values = {
            "importance": gate_output.importance,
            "counts": tf.cast(plan.expert_counts, tf.float32),
            "drops": tf.cast(tf.stack([plan.num_dropped,
                                       dropped_before_dispatch]), tf.float32),
            "load": gate_output.load,
            "levels": [level._asdict() for level in gate_output.statistics],
        }
        flat = tf.nest.flatten(values)  # None counts as a leaf.
        present = [i for i, value in enumerate(flat) if value is not None]
        if self._gates()[0].sums_statistics_over_replicas:
            summed = self.strategy.sum_over_replicas(
                [flat[i] for i in present])
            for i, value in zip(present, summed):
                flat[i] = value
        values = tf.nest.pack_sequence_as(values, flat)
        num_dropped, dropped_before = tf.unstack(values.pop("drops"))
        values["num_dropped"] = num_dropped + dropped_before
        values["dropped_before_dispatch"] = dropped_before
        values["levels"] = [
            type(level)(**summed) for level, summed in
            zip(gate_output.statistics, values["levels"])]
        return values

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
            normalize_gates=self.normalize_gates,
            balancing=self.balancing,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            aux_loss_weight=self.aux_loss_weight,
            bias_update_rate=self.bias_update_rate,
            router_z_loss_weight=self.router_z_loss_weight,
            router_jitter=self.router_jitter,
            capacity_factor=self.capacity_factor,
            expert_type=self.expert_type,
            activation=keras.activations.serialize(self.activation),
            num_shared_experts=self.num_shared_experts,
            shared_hidden_size=self.shared_hidden_size,
            expert_dropout=self.expert_dropout,
            noise_epsilon=self.noise_epsilon,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(
                self.bias_initializer),
            gate_initializer=keras.initializers.serialize(
                self.gate_initializer),
            expert_storage=self.expert_storage,
            seed=self.seed,
        )
        return config


def moe_layers(*models):
    """The tf_moe MoE layers (`MoE`, `HierarchicalMoE`) in Keras models or
    layers, at any depth, each once, in the order Keras walks them."""
    layers = []
    for model in models:
        for layer in [model] + list(model._flatten_layers(include_self=False)):
            if isinstance(layer, MixtureOfExperts) and not any(
                    layer is seen for seen in layers):
                layers.append(layer)
    return layers
