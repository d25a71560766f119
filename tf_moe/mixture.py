"""What every MoE layer shares: tokens in, routed experts, tokens out.

A subclass decides the routing (`_route`: a `GateOutput` over all of its
experts); this base checks the arguments, flattens the input into tokens,
dispatches them to the experts, combines the outputs, adds the balancing
losses and records the metrics.
"""

import threading

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from tf_moe import balance
from tf_moe import dispatch as dispatch_lib
from tf_moe import grouped_dispatch
from tf_moe import sharding
from tf_moe.experts import Experts

GATINGS = ("noisy_top_k", "batchwise")


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")


def check_non_negative(name, value):
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or value < 0):
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")


class MixtureOfExperts(keras.layers.Layer):
    """Base of `MoE` and `HierarchicalMoE` (see their docstrings).

    Subclasses set `num_experts` (all experts) and `experts_per_token` (k
    of the whole layer, for the capacity) before `build`, build their gates
    in `_build_gates(model_dim)` and implement `_route`.
    """

    _default_name = "moe"

    def __init__(self, hidden_size, output_size=None, gating="noisy_top_k",
                 noisy_gating=True, importance_weight=0.1, load_weight=0.1,
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
        self._placement = None  # The MeshPlacement it was built under.
        self._loss_threads = {}  # id(loss) -> the thread that added it.

        # The paper's Table 6 measures: CV(Importance), CV(Load) and
        # max(Load)/mean(Load), with Load the tokens each expert received
        # (what the smooth Load estimates). Means over the calls since the
        # last reset_state.
        metrics = ["importance_loss", "load_loss", "importance_cv", "load_cv",
                   "load_max_over_mean", "dropped_fraction"]
        if gating == "batchwise":
            metrics.append("threshold_loss")
        self._metric_trackers = {
            metric: keras.metrics.Mean(name=f"{self.name}_{metric}")
            for metric in metrics
        }

    def _gate_kwargs(self):
        """Arguments of the gates: float32 under mixed precision."""
        return dict(kernel_initializer=self.gate_initializer, seed=self.seed,
                    dtype=self.dtype_policy.variable_dtype)

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
        # Built under a placement scope, the layer routes on its mesh.
        self._placement = sharding.current_placement()
        if self._placement is not None:
            self._placement.check_num_experts(self.num_experts, self.name)
        self._build_gates(model_dim)
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

    def _build_gates(self, model_dim):
        """Builds the subclass's gates for inputs of width `model_dim`."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement _build_gates.")

    def _route(self, tokens, token_mask, training):
        """Decides the routing of a batch.

        Returns:
            `(gate_output, dropped_before_dispatch)`: a `GateOutput` over all
            `num_experts` experts, and the number of (token, expert)
            assignments lost before the expert dispatch (a hierarchical
            layer's group capacity), which `dropped_fraction` counts too.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement _route.")

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
        if self._placement is None:
            outputs, plan = self._run_experts(tokens, token_mask, gate_output,
                                              training)
        else:
            outputs, plan = self._run_experts_on_mesh(
                tokens, token_mask, gate_output, training)

        # Batch sums over all data-parallel replicas, in one all-reduce.
        counts_and_drops = tf.concat([
            tf.cast(plan.expert_counts, tf.float32),
            tf.cast(tf.stack([plan.num_dropped, dropped_before_dispatch]),
                    tf.float32)], axis=0)
        statistics = [gate_output.importance, counts_and_drops]
        if gate_output.load is not None:
            statistics.append(gate_output.load)
        if self.gating == "noisy_top_k":
            # (Batchwise gating balances each replica's own batch, m tokens
            # per expert of it, so its statistics stay per replica too.)
            statistics = balance.sum_over_replicas(statistics)
        importance, counts_and_drops = statistics[:2]
        load = statistics[2] if gate_output.load is not None else None

        importance_loss, load_loss = balance.balancing_loss(
            importance, load, self.importance_weight, self.load_weight)
        losses = {"importance_loss": importance_loss,
                  "load_loss": load_loss}
        if gate_output.threshold_loss is not None:
            losses["threshold_loss"] = gate_output.threshold_loss
        self.add_loss(tf.add_n(list(losses.values())))
        self._record_routing(importance, counts_and_drops, losses)

        output_shape = tf.concat(
            [tf.shape(inputs)[:-1], [output_size]], axis=0)
        return tf.reshape(outputs, output_shape)

    def add_loss(self, loss):
        super().add_loss(loss)
        self._loss_threads[id(loss)] = threading.get_ident()

    def _clear_losses(self):
        super()._clear_losses()
        self._loss_threads.clear()

    def _get_own_losses(self):
        # MirroredStrategy runs its replicas as threads that take turns at
        # every cross-replica sync, and Keras keeps a layer's losses in one
        # list. The all-reduce of Importance and Load comes before add_loss,
        # so replica r would read the r+1 losses added so far (the reported
        # loss, not the gradients, which are per thread). Each replica
        # keeps to its own.
        losses = super()._get_own_losses()
        if tf.distribute.get_strategy().num_replicas_in_sync == 1:
            return losses
        thread = threading.get_ident()
        return [loss for loss in losses
                if self._loss_threads.get(id(loss), thread) == thread]

    def _run_experts(self, tokens, token_mask, gate_output, training):
        """Dispatch, experts and combine on one device: `([T, d_out],
        DispatchPlan)`."""
        plan = dispatch_lib.make_dispatch_plan(
            gate_output.expert_ids, self.num_experts,
            capacity=self._capacity(tokens, self.num_experts,
                                    self.experts_per_token),
            token_mask=token_mask, slot_mask=gate_output.slot_mask)
        main, overflow = dispatch_lib.dispatch(tokens, plan)
        expert_outputs = self.experts(main, overflow, plan.overflow_experts,
                                      training=training)
        outputs = dispatch_lib.combine(expert_outputs, plan,
                                       gate_output.gate_weights)
        return outputs, plan

    def _run_experts_on_mesh(self, tokens, token_mask, gate_output,
                             training):
        """Each batch shard routes its tokens into its own `[E, C, d]`
        buffers; relayouting them to the experts' devices and back is the
        all-to-all. Returns `([T, d_out], GroupedPlan)`."""
        placement = self._placement
        plan, grouped = self._plan_per_shard(
            tokens, token_mask, gate_output.expert_ids, gate_output.slot_mask,
            self.num_experts, self.experts_per_token)
        buffers = grouped_dispatch.dispatch(grouped(tokens), plan,
                                            self.num_experts)
        buffers = dtensor.relayout(buffers, placement.buffer_layout())
        expert_outputs = self.experts(buffers, training=training)
        expert_outputs = dtensor.relayout(
            expert_outputs, placement.batch_sharded(4))
        outputs = grouped_dispatch.combine(
            expert_outputs, plan, grouped(gate_output.gate_weights))
        return tf.reshape(outputs, [tokens.shape[0], -1]), plan

    def _plan_per_shard(self, tokens, token_mask, expert_ids, slot_mask,
                        num_experts, experts_per_token):
        """On a mesh, every batch shard's plan for its own `[num_experts,
        C, d]` buffers at a fixed capacity C.

        Returns:
            `(plan, grouped)`: the `GroupedPlan`, and `grouped(x)`, which
            splits a `[T, ...]` tensor into `[shards, T / shards, ...]`
            (None stays None).
        """
        placement = self._placement
        num_shards = placement.num_batch_shards
        shard_size = self._check_static_tokens(tokens) // num_shards
        capacity = dispatch_lib.fixed_capacity(
            shard_size, num_experts, experts_per_token,
            self.capacity_factor or placement.capacity_factor)

        def grouped(x):
            return None if x is None else tf.reshape(
                x, [num_shards, shard_size] + x.shape[1:].as_list())

        plan = grouped_dispatch.make_grouped_plan(
            grouped(expert_ids), num_experts, capacity,
            token_mask=grouped(token_mask), slot_mask=grouped(slot_mask))
        return plan, grouped

    def _check_static_tokens(self, tokens):
        """The number of `[T, d]` tokens, which on a mesh must be static and
        divisible by the batch axis."""
        num_tokens = tokens.shape[0]
        if num_tokens is None:
            raise ValueError(
                f"{self.name}: on a mesh the number of tokens must be static "
                "(call the layer inside a tf.function traced on the batch).")
        self._placement.check_batch(num_tokens, what="number of tokens")
        return num_tokens

    def _capacity(self, tokens, num_experts, experts_per_token):
        """The fixed per-expert capacity, or None (dropless)."""
        if self.capacity_factor is None:
            return None
        num_tokens = tokens.shape[0]
        if num_tokens is None:
            num_tokens = tf.shape(tokens)[0]
        return dispatch_lib.fixed_capacity(
            num_tokens, num_experts, experts_per_token, self.capacity_factor)

    def _record_routing(self, importance, counts_and_drops, losses):
        """Metrics from the batch's `[E]` Importance and from
        `[E + 2]` float32: each expert's routed slots, then the slots
        dropped at dispatch and before it."""
        counts = counts_and_drops[:self.num_experts]
        num_dropped, dropped_before = tf.unstack(
            counts_and_drops[self.num_experts:])
        routed = tf.reduce_sum(counts) + dropped_before
        values = dict(losses)
        values["importance_cv"] = tf.sqrt(
            balance.cv_squared(tf.cast(importance, tf.float32)))
        values["load_cv"] = tf.sqrt(balance.cv_squared(counts))
        values["load_max_over_mean"] = tf.math.divide_no_nan(
            tf.reduce_max(counts), tf.reduce_mean(counts))
        values["dropped_fraction"] = tf.math.divide_no_nan(
            num_dropped + dropped_before, routed)
        for metric, value in values.items():
            self._metric_trackers[metric].update_state(value)
        self.expert_token_counts.assign(tf.cast(counts, tf.int32))

    def routing_metrics(self, reset=False):
        """The routing metrics averaged over the calls since the last reset.

        Returns a dict of float scalars: `importance_loss`, `load_loss`
        (`threshold_loss` with batchwise gating), `importance_cv`,
        `load_cv` and `load_max_over_mean` (Load counted in tokens routed to
        each expert) and `dropped_fraction`. With `reset=True` the averages
        start again afterwards, e.g. between training and evaluation.
        """
        values = {name: float(sharding.to_numpy(tracker.result()))
                  for name, tracker in self._metric_trackers.items()}
        if reset:
            for tracker in self._metric_trackers.values():
                tracker.reset_state()
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
