"""The two-level hierarchical Mixture-of-Experts (paper appendix B)."""

from typing import NamedTuple

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe import dispatch as dispatch_lib
from tf_moe.experts import grouped_matmul
from tf_moe.gating import BatchwiseGate, GateOutput, NoisyTopKGate, Routing
from tf_moe.gating import balanced_capacity
from tf_moe.mixture import MixtureOfExperts, check_positive_int


class GroupRows(NamedTuple):
    """The secondary gates' decisions for the rows of the group buffers.

    Attributes:
        routing: a `Routing` over the rows (main rows, then overflow rows),
            expert ids within the row's group.
        row_valid: `[rows]` bool, the row holds a token (not padding).
        row_groups: `[rows]` int32, the group of each row.
    """

    routing: Routing
    row_valid: tf.Tensor
    row_groups: tf.Tensor


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

    def _check_mesh_support(self):
        # Its group dispatch (tokens into group buffers for the secondary
        # gates) is the dynamic single-device plan, whose searchsorted has
        # no DTensor layout propagation.
        raise ValueError(
            f"{self.name}: HierarchicalMoE cannot be built on a DTensor mesh "
            "yet (built under a MeshPlacement scope); train it data-parallel "
            "under tf.distribute, or use MoE on the mesh.")

    def _build_gates(self, model_dim):
        self.primary_gate.build((None, model_dim))
        self.secondary_gate.build((None, model_dim))

    def _route(self, tokens, token_mask, training):
        primary = self.primary_gate(tokens, token_mask=token_mask,
                                    training=training)
        group_plan = dispatch_lib.make_dispatch_plan(
            primary.expert_ids, self.num_groups,
            capacity=self._group_capacity(tokens, token_mask, training),
            token_mask=token_mask, slot_mask=primary.slot_mask)
        rows = self._secondary_rows(tokens, group_plan, training)
        secondary = rows.routing

        # Back from group rows to each token's primary slots: [T, k1, k2].
        slot_row = group_plan.slot_buffer_row
        row_expert_ids = dispatch_lib.gather_padded(secondary.expert_ids,
                                                    slot_row, 0)
        row_weights = dispatch_lib.gather_padded(secondary.gate_weights,
                                                 slot_row, 0.0)
        slot_mask = dispatch_lib.gather_padded(
            tf.ones_like(secondary.expert_ids, tf.bool)
            if secondary.slot_mask is None else secondary.slot_mask,
            slot_row, False)
        primary_ids = primary.expert_ids[:, :, None]
        expert_ids = primary_ids * self.experts_per_group + row_expert_ids
        gate_weights = (primary.gate_weights[:, :, None]
                        * tf.cast(row_weights, primary.gate_weights.dtype))
        slot_mask &= group_plan.slot_kept[:, :, None]

        def flat(x):
            return tf.reshape(x, [tf.shape(x)[0], -1])

        expert_ids, gate_weights, slot_mask = (
            flat(expert_ids), flat(gate_weights), flat(slot_mask))
        importance = balance.importance(expert_ids, gate_weights,
                                        self.num_experts)
        load = None
        if primary.load is not None:
            load = self._hierarchical_load(primary.load, rows)
        threshold_loss = None
        if primary.threshold_loss is not None:
            threshold_loss = primary.threshold_loss + secondary.threshold_loss
        gate_output = GateOutput(expert_ids, gate_weights, importance, load,
                                 slot_mask=slot_mask,
                                 threshold_loss=threshold_loss)
        # A token dropped by a full group would have gone to k_secondary of
        # its experts.
        return gate_output, group_plan.num_dropped * self.k_secondary

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

    def _secondary_rows(self, tokens, group_plan, training):
        """Runs each group's gate on the tokens in its buffer: `GroupRows`."""
        gate = self.secondary_gate
        main, overflow = dispatch_lib.dispatch(tokens, group_plan)
        dtype = gate.compute_dtype
        kernel = tf.convert_to_tensor(gate.gate_kernel)
        if self.noisy_gating:
            # One grouped matmul for the gate and the noise logits.
            kernel = tf.concat([kernel, gate.noise_kernel], axis=-1)
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

        if self.gating == "batchwise":
            routing = gate.route(logits, row_valid, training=training,
                                 row_groups=row_groups,
                                 num_segments=self.num_groups)
        elif self.noisy_gating:
            clean_logits, noise_logits = tf.split(logits, 2, axis=-1)
            routing = gate.route(clean_logits, noise_logits,
                                 training=training)
        else:
            routing = gate.route(logits, training=training)
        return GroupRows(routing, row_valid, row_groups)

    def _hierarchical_load(self, primary_load, rows):
        """`Load_H[i, j] = Load_primary[i] * Load_i(X_i)[j] / |X_i|`."""
        row_weights = tf.cast(rows.row_valid, primary_load.dtype)
        group_load = tf.math.unsorted_segment_sum(
            rows.routing.selection_probability * row_weights[:, None],
            rows.row_groups, self.num_groups)  # [G, B]
        group_tokens = tf.math.unsorted_segment_sum(
            row_weights, rows.row_groups, self.num_groups)  # [G]
        # |X_i| and Load_i over all replicas' tokens; Load_primary stays
        # local (the layer sums Load_H over replicas, and the factor below
        # is the same on every replica).
        group_load, group_tokens = balance.sum_over_replicas(
            [group_load, group_tokens])
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
