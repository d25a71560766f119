"""The two-level hierarchical Mixture-of-Experts (paper appendix B)."""

from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe import dispatch as dispatch_lib
from tf_moe.gating import GateOutput, RouterStatistics
from tf_moe.matmul import buffer_matmul
from tf_moe import plan as plan_lib
from tf_moe import routers
from tf_moe.arguments import check_positive_int
from tf_moe.mixture import MixtureOfExperts


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
        statistics: the secondary gates' `RouterStatistics` (per group).
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
    statistics: RouterStatistics
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

    With the other balancings and the z-loss, each level of gates counts
    on its own and the terms add: "switch" is the primary gate's Switch
    term over the groups plus the mean over groups of each secondary gate's
    term over the rows routed to its group; the z-loss is the mean over
    tokens of the primary gate's `logsumexp^2` plus the mean over group
    rows of the secondary gates'; "bias" keeps one bias per group and one
    per expert of each group. `gating="top_k"` routes both levels by
    softmax top-k; "expert_choice" is for the flat layer only.

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

    # Over 200 lines with its docstring (a quarter of it); the secondary
    # routing (`_route_secondary` and its helpers) is one path for every
    # strategy.
    _default_name = "hierarchical_moe"

    def __init__(self, num_groups, experts_per_group, hidden_size,
                 k_primary=2, k_secondary=2, **kwargs):
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
        gating = kwargs.get("gating", "noisy_top_k")
        if gating in routers.FLAT_ONLY:
            raise ValueError(
                f"`gating={gating!r}` routes a flat layer only (tf_moe.MoE); "
                "HierarchicalMoE takes 'noisy_top_k', 'top_k' or "
                "'batchwise'.")
        super().__init__(hidden_size, **kwargs)
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.k_primary = k_primary
        self.k_secondary = k_secondary
        self.num_experts = num_groups * experts_per_group
        self.experts_per_token = k_primary * k_secondary
        self.primary_gate = self._make_gate(num_groups, k_primary,
                                            name="primary_gate")
        # The secondary gates draw their own noise (and tie-breaking order).
        self.secondary_gate = self._make_gate(
            experts_per_group, k_secondary, seed_offset=1,
            num_groups=num_groups, name="secondary_gate")

    def _gates(self):
        return [self.primary_gate, self.secondary_gate]

    def _route(self, tokens, token_mask, training):
        primary = self.primary_gate(tokens, token_mask=token_mask,
                                    training=training)
        slots = self._route_secondary(tokens, token_mask, primary, training)

        primary_ids = primary.expert_ids[:, :, None]
        expert_ids = primary_ids * self.experts_per_group + slots.expert_ids
        gate_weights = (primary.gate_weights[:, :, None]
                        * tf.cast(slots.gate_weights,
                                  primary.gate_weights.dtype))

        def flat(x):  # [T, k1, k2] -> [T, k1 * k2], keeping static sizes
            shape = tf.shape(x)
            flat_x = tf.reshape(x, [shape[0], shape[1] * shape[2]])
            slots = (None if x.shape[2] is None
                     else x.shape[1] * x.shape[2])
            flat_x.set_shape([x.shape[0], slots])
            return flat_x

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
        gate_output = GateOutput(
            expert_ids, gate_weights, importance, load, slot_mask=slot_mask,
            threshold_loss=threshold_loss,
            statistics=primary.statistics + (slots.statistics,))
        # A token the primary gate had no slot for would have gone to
        # k_secondary experts of its group.
        return gate_output, (slots.num_dropped
                             + primary.num_dropped * self.k_secondary)

    def _route_secondary(self, tokens, token_mask, primary, training):
        """Tokens into their groups' buffers (one set per token shard), each
        group's gate as a batched matmul over its rows, and back to the
        tokens' primary slots: `SecondarySlots`."""
        gate = self.secondary_gate
        plan, shards = self._group_plan(tokens, token_mask, primary,
                                        training)
        logits, row_groups = self._group_logits(shards(tokens), plan)
        num_shards = logits.shape[0]
        num_rows = logits.shape[1] or tf.shape(logits)[1]
        row_valid = tf.reshape(
            plan.buffer_slot < tf.size(plan.slot_buffer_row[0]), [-1])
        row_groups = tf.tile(row_groups, [num_shards])
        noise = None
        if gate.uses_noise(training):
            noise = self._group_noise(tokens, plan, shards)
        # Batchwise gating balances each (shard, group) segment on its own,
        # as each replica's groups under tf.distribute.
        routing = gate.route(
            tf.reshape(logits, [-1, logits.shape[-1]]), row_valid,
            training=training, noise=noise, row_groups=row_groups,
            num_segments=num_shards * self.num_groups)

        group_load = None
        if routing.selection_probability is not None:
            group_load = tf.math.unsorted_segment_sum(
                routing.selection_probability, row_groups, self.num_groups)
        group_tokens = tf.math.unsorted_segment_sum(
            tf.cast(row_valid, tf.float32), row_groups, self.num_groups)

        def to_slots(x):  # [shards * rows, m] -> [T, k1, m]
            x = tf.reshape(x, [num_shards, num_rows, -1])
            x = dispatch_lib.gather_padded(x, plan.slot_buffer_row,
                                           batch_dims=1)
            return self.strategy.merge_shards(x)

        slot_kept = self.strategy.merge_shards(plan.slot_kept)
        return SecondarySlots(
            expert_ids=to_slots(routing.expert_ids),
            gate_weights=to_slots(routing.gate_weights),
            slot_mask=to_slots(routing.routed_slots) & slot_kept[:, :, None],
            group_load=group_load, group_tokens=group_tokens,
            threshold_loss=routing.threshold_loss,
            statistics=routing.statistics,
            num_dropped=(plan.num_dropped * self.k_secondary
                         + routing.num_dropped))

    def _group_logits(self, shard_tokens, plan):
        """The secondary gates' logits of every group row.

        Returns:
            `(logits [shards, rows, width], row_groups [rows])`: per shard
            the main rows `[groups * C1]`, then (one shard) the overflow
            rows, and the group of each.
        """
        gate = self.secondary_gate
        dtype = gate.compute_dtype
        main, overflow = dispatch_lib.dispatch(shard_tokens, plan)
        main_logits, overflow_logits = buffer_matmul(
            tf.cast(main, dtype),
            None if overflow is None else tf.cast(overflow, dtype),
            gate.kernel, plan.overflow_experts,
            allow_xla=self.strategy.compiles_experts,
            rows_hint=plan_lib.balanced_rows(
                shard_tokens.shape[1], self.num_groups, self.k_primary))
        width = main_logits.shape[-1]
        logits = tf.reshape(main_logits, [main.shape[0], -1, width])
        row_groups = tf.repeat(tf.range(self.num_groups), plan.capacity)
        if overflow is not None:
            logits = tf.concat(
                [logits, tf.reshape(overflow_logits, [1, -1, width])], axis=1)
            row_groups = tf.concat([row_groups, tf.repeat(
                plan.overflow_experts, plan.overflow_capacity)], axis=0)
        return logits, row_groups

    def _group_noise(self, tokens, plan, shards):
        """`[shards * rows, experts_per_group]` noise of the group rows.

        Drawn per (token, primary slot) and moved with the slot into its
        group's rows, so the routing does not depend on how the rows are
        laid out (one device or a mesh).
        """
        gate = self.secondary_gate
        num_shards, _, primary_slots = plan.slot_buffer_row.shape.as_list()
        noise = gate.draw_noise(
            [tf.shape(tokens)[0], primary_slots * self.experts_per_group],
            gate.compute_dtype)
        noise = tf.reshape(shards(noise),
                           [num_shards, -1, self.experts_per_group])
        return tf.reshape(dispatch_lib.gather_padded(
            noise, plan.buffer_slot, batch_dims=1),
            [-1, self.experts_per_group])

    def _group_plan(self, tokens, token_mask, primary, training):
        """The plan of the primary slots into the group buffers; in
        batchwise training every group takes exactly m1 tokens of each
        shard (one buffer of m1 rows per group, which the secondary gate
        balances on its own)."""
        num_valid = (tf.shape(tokens)[0] if token_mask is None else
                     tf.reduce_sum(tf.cast(token_mask, tf.int32)))
        return self.strategy.plan(
            primary.expert_ids, self.num_groups, self.k_primary,
            self.capacity_factor, token_mask=token_mask,
            slot_mask=primary.slot_mask,
            exact_capacity=self.primary_gate.rows_per_expert(num_valid,
                                                             training))

    def _hierarchical_load(self, primary_load, slots):
        """`Load_H[i, j] = Load_primary[i] * Load_i(X_i)[j] / |X_i|`."""
        # |X_i| and Load_i over all replicas' tokens; Load_primary stays
        # local (the layer sums Load_H over replicas, and the factor below
        # is the same on every replica).
        group_load, group_tokens = self.strategy.sum_over_replicas(
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
