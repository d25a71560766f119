"""The two-level hierarchical Mixture-of-Experts (paper appendix B)."""

from typing import NamedTuple, Optional

import keras
import tensorflow as tf
from tensorflow.experimental import dtensor

from tf_moe import balance
from tf_moe import dispatch as dispatch_lib
from tf_moe import grouped_dispatch
from tf_moe.experts import grouped_matmul
from tf_moe.gating import BatchwiseGate, GateOutput, NoisyTopKGate
from tf_moe.gating import balanced_capacity
from tf_moe.mixture import MixtureOfExperts, check_positive_int


class SecondarySlots(NamedTuple):
    """The secondary gates' decisions for every primary slot of every token.

    Attributes:
        expert_ids: `[tokens, k_primary, k_secondary]` int32, experts within
            the slot's group.
        gate_weights: `[tokens, k_primary, k_secondary]` secondary weights.
        slot_mask: `[tokens, k_primary, k_secondary]` bool, routed (the
            primary slot was kept by its group, and the secondary slot is
            real).
        group_load: `[groups, experts_per_group]` sum over the group's
            tokens of the selection probability P(x, j) (noisy gates), or
            None.
        group_tokens: `[groups]` float tokens each group received.
        threshold_loss: the batchwise secondary gate's loss, or None.
        num_dropped: scalar int32, (token, expert) assignments lost: a
            primary slot a full group dropped counts `k_secondary`, and
            the secondary gate's own drops count too.
    """

    expert_ids: tf.Tensor
    gate_weights: tf.Tensor
    slot_mask: tf.Tensor
    group_load: Optional[tf.Tensor]
    group_tokens: tf.Tensor
    threshold_loss: Optional[tf.Tensor]
    num_dropped: tf.Tensor


@keras.saving.register_keras_serializable(package="tf_moe")
class HierarchicalMoE(MixtureOfExperts):
    """`y = sum_i sum_j G_primary(x)_i G_i(x)_j E_ij(x)` (appendix B).

    A primary gate picks `k_primary` of `num_groups` groups for each token;
    each group's own gate picks `k_secondary` of its `experts_per_group`
    experts. The secondary gates are one batched weight
    `[groups, d, experts_per_group]`, and they run only on the tokens routed
    to their group: tokens are dispatched into group buffers (the same
    dispatch as the experts'), the group gates run as a grouped matmul,
    and each token then goes to its `k_primary * k_secondary` experts,
    numbered `group * experts_per_group + expert`, through the flat layer's
    dispatch and experts. Per token, the cost is `d * (num_groups +
    k_primary * experts_per_group)` for the gates and `k_primary *
    k_secondary` experts: it does not grow with the product of the two.

    Losses (appendix B), through `add_loss`:
    `Importance_H[i, j] = sum_x G_primary(x)_i G_i(x)_j` and
    `Load_H[i, j] = Load_primary[i] * Load_i(X_i)[j] / |X_i|`, X_i the
    tokens routed to group i; CV^2 of both over the `groups * experts`
    entries, weighted as in `MoE`. A group that receives no tokens in a batch
    has no Load_i: its experts then count as evenly loaded, `Load_H[i, j] =
    Load_primary[i] * k_secondary / experts_per_group` (what a uniform
    secondary gate would give), so the loss stays finite and still pulls
    tokens towards the group through Load_primary.

    With `gating="batchwise"` both levels are strictly balanced (appendix
    F): in training every group takes exactly `ceil(k_primary * tokens /
    groups)` tokens and every expert exactly `ceil(k_secondary * m1 /
    experts_per_group)` of its group's `m1`; thresholds route at inference.

    Args:
        num_groups: groups, each a MoE of its own.
        experts_per_group: experts in every group.
        hidden_size: hidden width of every expert.
        k_primary: groups per token.
        k_secondary: experts per token within each of its groups.
        capacity_factor: None for dropless dispatch at both levels; a float
            > 0 fixes the group buffers at `ceil(capacity_factor * k_primary
            * tokens / num_groups)` rows and the expert buffers at
            `ceil(capacity_factor * k_primary * k_secondary * tokens /
            (num_groups * experts_per_group))`; past them, assignments are
            dropped and counted.
        Every other argument is `MoE`'s.

    Call arguments and output: as `MoE`. Metrics: as `MoE`, over all
    `num_groups * experts_per_group` experts (`expert_token_counts` too);
    `dropped_fraction` counts a token dropped by a full group as
    `k_secondary` dropped assignments.
    """

    _default_name = "hierarchical_moe"

    def __init__(self, num_groups, experts_per_group, hidden_size,
                 k_primary=2, k_secondary=2, output_size=None,
                 gating="noisy_top_k", noisy_gating=True,
                 importance_weight=0.1, load_weight=0.1,
                 capacity_factor=None, activation="relu", expert_dropout=0.0,
                 noise_epsilon=1e-2, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", gate_initializer="zeros",
                 seed=None, **kwargs):
        check_positive_int("num_groups", num_groups)
        check_positive_int("experts_per_group", experts_per_group)
        check_positive_int("k_primary", k_primary)
        check_positive_int("k_secondary", k_secondary)
        if k_primary > num_groups:
            raise ValueError(f"`k_primary` must be <= num_groups "
                             f"({num_groups}), got {k_primary}.")
        if k_secondary > experts_per_group:
            raise ValueError(f"`k_secondary` must be <= experts_per_group "
                             f"({experts_per_group}), got {k_secondary}.")
        super().__init__(
            hidden_size, output_size=output_size, gating=gating,
            noisy_gating=noisy_gating, importance_weight=importance_weight,
            load_weight=load_weight, capacity_factor=capacity_factor,
            activation=activation, expert_dropout=expert_dropout,
            noise_epsilon=noise_epsilon,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            gate_initializer=gate_initializer, seed=seed, **kwargs)
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.k_primary = k_primary
        self.k_secondary = k_secondary
        self.num_experts = num_groups * experts_per_group
        self.experts_per_token = k_primary * k_secondary

        primary_kwargs = self._gate_kwargs()
        # The secondary gates draw their own noise (and tie-breaking order).
        secondary_kwargs = dict(primary_kwargs,
                                seed=None if seed is None else seed + 1)
        if self.gating == "batchwise":
            self.primary_gate = BatchwiseGate(
                num_groups, k_primary, name="primary_gate", **primary_kwargs)
            self.secondary_gate = BatchwiseGate(
                experts_per_group, k_secondary, num_groups=num_groups,
                name="secondary_gate", **secondary_kwargs)
        else:
            noise = dict(noisy_gating=self.noisy_gating,
                         noise_epsilon=noise_epsilon)
            self.primary_gate = NoisyTopKGate(
                num_groups, k_primary, name="primary_gate", **noise,
                **primary_kwargs)
            self.secondary_gate = NoisyTopKGate(
                experts_per_group, k_secondary, num_groups=num_groups,
                name="secondary_gate", **noise, **secondary_kwargs)

    def _build_gates(self, model_dim):
        self.primary_gate.build((None, model_dim))
        self.secondary_gate.build((None, model_dim))

    def _route(self, tokens, token_mask, training):
        primary = self.primary_gate(tokens, token_mask=token_mask,
                                    training=training)
        # The secondary noise is drawn per (token, primary slot) and moves
        # with the slot into its group's rows, so the routing does not
        # depend on how the rows are laid out (one device or a mesh).
        noise = None
        if self.noisy_gating and training:
            noise = self.secondary_gate.draw_noise(
                [tf.shape(tokens)[0], self.k_primary,
                 self.experts_per_group], self.secondary_gate.compute_dtype)
        if self._placement is None:
            slots = self._secondary_on_device(tokens, token_mask, primary,
                                              noise, training)
        else:
            slots = self._secondary_on_mesh(tokens, token_mask, primary,
                                            noise, training)

        primary_ids = primary.expert_ids[:, :, None]
        expert_ids = primary_ids * self.experts_per_group + slots.expert_ids
        gate_weights = (primary.gate_weights[:, :, None]
                        * tf.cast(slots.gate_weights,
                                  primary.gate_weights.dtype))

        def flat(x):  # [T, k1, k2] -> [T, k1 * k2]
            return tf.reshape(x, [tf.shape(x)[0], -1])

        expert_ids, gate_weights, slot_mask = (
            flat(expert_ids), flat(gate_weights), flat(slots.slot_mask))
        importance = balance.importance(expert_ids, gate_weights,
                                        self.num_experts)
        load = None
        if primary.load is not None:
            load = self._hierarchical_load(primary.load, slots)
        threshold_loss = None
        if primary.threshold_loss is not None:
            threshold_loss = primary.threshold_loss + slots.threshold_loss
        gate_output = GateOutput(expert_ids, gate_weights, importance, load,
                                 slot_mask=slot_mask,
                                 threshold_loss=threshold_loss)
        # A token the primary gate had no slot for would have gone to
        # k_secondary experts of its group.
        return gate_output, (slots.num_dropped
                             + primary.num_dropped * self.k_secondary)

    def _group_capacity(self, tokens, token_mask, training):
        if self.gating == "batchwise" and training:
            # Every group gets exactly m1 tokens: one buffer of m1 rows per
            # group, which the secondary batchwise gate balances on its own.
            num_valid = (tf.shape(tokens)[0] if token_mask is None else
                         tf.reduce_sum(tf.cast(token_mask, tf.int32)))
            capacity = balanced_capacity(num_valid, self.num_groups,
                                         self.k_primary)
            fixed = self._capacity(tokens, self.num_groups, self.k_primary)
            return capacity if fixed is None else tf.minimum(capacity, fixed)
        return self._capacity(tokens, self.num_groups, self.k_primary)

    def _secondary_kernel(self):
        """`[groups, d, B]` (`[groups, d, 2B]`: gate, then noise kernel)."""
        gate = self.secondary_gate
        kernel = tf.convert_to_tensor(gate.gate_kernel)
        if self.noisy_gating:
            # One grouped matmul for the gate and the noise logits.
            kernel = tf.concat([kernel, gate.noise_kernel], axis=-1)
        return kernel

    def _route_rows(self, logits, noise, row_valid, row_groups, training,
                    num_segments=None):
        """The secondary gate on `[rows, B or 2B]` logits of group rows
        (batchwise: `num_segments` equal segments, default one a group)."""
        gate = self.secondary_gate
        if self.gating == "batchwise":
            return gate.route(logits, row_valid, training=training,
                              row_groups=row_groups,
                              num_segments=num_segments or self.num_groups)
        if self.noisy_gating:
            clean_logits, noise_logits = tf.split(logits, 2, axis=-1)
            return gate.route(clean_logits, noise_logits, training=training,
                              noise=noise)
        return gate.route(logits, training=training)

    def _secondary_on_device(self, tokens, token_mask, primary, noise,
                             training):
        """Tokens into dropless (or fixed) group buffers, each group's gate
        as a grouped matmul over them, and back: `SecondarySlots`."""
        group_plan = dispatch_lib.make_dispatch_plan(
            primary.expert_ids, self.num_groups,
            capacity=self._group_capacity(tokens, token_mask, training),
            token_mask=token_mask, slot_mask=primary.slot_mask)
        main, overflow = dispatch_lib.dispatch(tokens, group_plan)
        kernel = self._secondary_kernel()
        dtype = self.secondary_gate.compute_dtype
        main_logits, overflow_logits = grouped_matmul(
            tf.cast(main, dtype), tf.cast(overflow, dtype), kernel,
            group_plan.overflow_experts)
        logits = tf.concat(
            [tf.reshape(main_logits, [-1, kernel.shape[-1]]),
             tf.reshape(overflow_logits, [-1, kernel.shape[-1]])], axis=0)
        num_slots = tf.size(group_plan.slot_buffer_row)
        row_valid = group_plan.buffer_slot < num_slots
        row_groups = tf.concat([
            tf.repeat(tf.range(self.num_groups), group_plan.capacity),
            tf.repeat(group_plan.overflow_experts,
                      group_plan.overflow_capacity)], axis=0)
        if noise is not None:  # Token-major slots, as buffer_slot counts.
            noise = dispatch_lib.gather_padded(
                tf.reshape(noise, [-1, self.experts_per_group]),
                group_plan.buffer_slot)
        routing = self._route_rows(logits, noise, row_valid, row_groups,
                                   training)

        row_weights = tf.cast(row_valid, tf.float32)
        group_load = None
        if routing.selection_probability is not None:
            group_load = tf.math.unsorted_segment_sum(
                routing.selection_probability * row_weights[:, None],
                row_groups, self.num_groups)
        group_tokens = tf.math.unsorted_segment_sum(
            row_weights, row_groups, self.num_groups)

        # Back from group rows to each token's primary slots: [T, k1, k2].
        slot_row = group_plan.slot_buffer_row
        slot_mask = dispatch_lib.gather_padded(routing.routed_slots,
                                               slot_row, False)
        return SecondarySlots(
            expert_ids=dispatch_lib.gather_padded(routing.expert_ids,
                                                  slot_row, 0),
            gate_weights=dispatch_lib.gather_padded(routing.gate_weights,
                                                    slot_row, 0.0),
            slot_mask=slot_mask & group_plan.slot_kept[:, :, None],
            group_load=group_load, group_tokens=group_tokens,
            threshold_loss=routing.threshold_loss,
            num_dropped=(group_plan.num_dropped * self.k_secondary
                         + routing.num_dropped))

    def _secondary_on_mesh(self, tokens, token_mask, primary, noise,
                           training):
        """Each batch shard dispatches its tokens into its own group
        buffers `[shards, groups, C1, d]` at a fixed capacity, where the
        (replicated) group gates run as one einsum: no data moves between
        devices until the expert dispatch. Returns `SecondarySlots`."""
        plan, grouped = self._plan_per_shard(
            tokens, token_mask, primary.expert_ids, primary.slot_mask,
            self.num_groups, self.k_primary)
        num_tokens = tokens.shape[0]
        primary_slots = primary.expert_ids.shape[1]  # k1 (static k_max)
        num_shards = self._placement.num_batch_shards
        shard_size = num_tokens // num_shards
        capacity = plan.capacity
        buffers = grouped_dispatch.dispatch(grouped(tokens), plan,
                                            self.num_groups)
        kernel = self._secondary_kernel()
        logits = tf.einsum(
            "gncd,nde->gnce",
            tf.cast(buffers, self.secondary_gate.compute_dtype), kernel)
        row_valid = plan.row_token < shard_size  # [shards, groups * C1]
        if noise is not None:  # [T, k1, B] -> the rows' [shards, rows, B].
            noise = dtensor.relayout(
                tf.reshape(noise, [num_shards, -1, self.experts_per_group]),
                self._placement.batch_sharded(3))
            noise = tf.reshape(
                grouped_dispatch.gather_padded(noise, plan.row_slot),
                [-1, self.experts_per_group])
        # Rows are [shards, groups, C1]: batchwise gating balances each
        # (shard, group) segment, as each replica's groups under
        # tf.distribute.
        row_groups = tf.tile(tf.repeat(tf.range(self.num_groups), capacity),
                             [num_shards])
        routing = self._route_rows(
            tf.reshape(logits, [-1, kernel.shape[-1]]), noise,
            tf.reshape(row_valid, [-1]), row_groups, training,
            num_segments=num_shards * self.num_groups)

        def per_group(x):  # [rows, ...] -> [shards, groups, C1, ...]
            return tf.reshape(x, [num_shards, self.num_groups, capacity]
                              + x.shape[1:].as_list())

        row_weights = per_group(tf.reshape(tf.cast(row_valid, tf.float32),
                                           [-1]))
        group_load = None
        if routing.selection_probability is not None:
            group_load = tf.reduce_sum(
                per_group(routing.selection_probability)
                * row_weights[..., None], axis=[0, 2])
        group_tokens = tf.reduce_sum(row_weights, axis=[0, 2])

        def to_slots(x):  # [rows, k2] -> [T, k1, k2]
            slots = x.shape[-1]  # k2, or the batchwise gate's static k_max
            x = tf.reshape(x, [num_shards, -1, slots])
            x = grouped_dispatch.gather_padded(x, plan.slot_row)
            return tf.reshape(x, [num_tokens, primary_slots, slots])

        slot_kept = tf.reshape(plan.slot_kept, [num_tokens, primary_slots])
        slot_mask = to_slots(routing.routed_slots)
        return SecondarySlots(
            expert_ids=to_slots(routing.expert_ids),
            gate_weights=to_slots(routing.gate_weights),
            slot_mask=slot_mask & slot_kept[:, :, None],
            group_load=group_load, group_tokens=group_tokens,
            threshold_loss=routing.threshold_loss,
            num_dropped=plan.num_dropped * self.k_secondary
            + routing.num_dropped)

    def _hierarchical_load(self, primary_load, slots):
        """`Load_H[i, j] = Load_primary[i] * Load_i(X_i)[j] / |X_i|`."""
        # |X_i| and Load_i over all replicas' tokens; Load_primary stays
        # local (the layer sums Load_H over replicas, and the factor below
        # is the same on every replica).
        group_load, group_tokens = balance.sum_over_replicas(
            [tf.cast(slots.group_load, primary_load.dtype),
             tf.cast(slots.group_tokens, primary_load.dtype)])
        per_token = tf.where(
            group_tokens[:, None] > 0,
            tf.math.divide_no_nan(group_load, group_tokens[:, None]),
            self.k_secondary / self.experts_per_group)
        return tf.reshape(primary_load[:, None] * per_token, [-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_groups=self.num_groups,
                      experts_per_group=self.experts_per_group,
                      k_primary=self.k_primary,
                      k_secondary=self.k_secondary)
        return config
