"""The execution strategy: everything an MoE layer needs to know about where
it runs, behind one object chosen when the layer is built.

The layers, gates and experts call these methods and never branch on where
they run. Three strategies implement them:

- `OneDevice` (here): one token shard, dropless dispatch allowed, the
  experts' products free to run XLA-compiled (`tf_moe.kernels` chooses).
- `replicas.Replicas`: the one-device program on every replica of a
  `tf.distribute` strategy, with the balancing statistics summed over the
  replicas. It is what a layer gets off a mesh, since Keras may build a
  layer on one device and call it later under `strategy.run`; with one
  replica it is `OneDevice`.
- `mesh_strategy.Mesh`: a DTensor mesh; one token shard per batch shard,
  static shapes, buffers relayouted to the experts' devices and back.
"""

import contextlib

import tensorflow as tf

from tf_moe import noise
from tf_moe import plan as plan_lib


class OneDevice:
    """The layer's program on one device: the reference the others match."""

    # Token shards a batch is routed as (each with its own buffers).
    num_token_shards = 1
    # Programs need static shapes and no while loops (DTensor): no dropless
    # overflow group, recurrent layers unroll.
    static_shapes = False
    # The experts' batched products may run as XLA-compiled functions
    # (whether they do is `tf_moe.kernels`' choice).
    compiles_experts = True

    def check_num_experts(self, num_experts, layer_name):
        """Refuses, at build, a number of experts this placement cannot
        hold."""

    def expert_variables(self):
        """Scope for the experts' weights (`[E, ...]`, split by expert on a
        mesh)."""
        return contextlib.nullcontext()

    def capacity_factor(self, capacity_factor):
        """The capacity factor the layer dispatches with, given its own
        (None: dropless)."""
        return capacity_factor

    def plan(self, expert_ids, num_experts, experts_per_token,
             capacity_factor, token_mask=None, slot_mask=None,
             exact_capacity=None, packed=False):
        """The plan of a batch's routing slots into `num_experts` buffers,
        one set per token shard.

        Args:
            expert_ids: `[T, k]` int32.
            num_experts: E of the buffers.
            experts_per_token: k of the layer, for the capacity.
            capacity_factor: the layer's (None: dropless where allowed).
            token_mask: optional `[T]` bool.
            slot_mask: optional `[T, k]` bool.
            exact_capacity: optional scalar int32, the rows every expert
                receives when a balanced gate fixes it.
            packed: the packed buffer layout (`tf_moe.plan`); only where
                shapes may vary (`static_shapes` False).

        Returns:
            `(plan, shards)`: the `DispatchPlan` (with a shard dimension)
            and `shards`, this strategy's `shard_tokens`, for the tensors
            that go with the plan.
        """
        expert_ids = self.shard_tokens(expert_ids)
        capacity = None
        capacity_factor = self.capacity_factor(capacity_factor)
        if capacity_factor is not None:
            tokens_per_shard = expert_ids.shape[1]
            if tokens_per_shard is None:
                tokens_per_shard = tf.shape(expert_ids)[1]
            capacity = plan_lib.fixed_capacity(
                tokens_per_shard, num_experts, experts_per_token,
                capacity_factor)
        if exact_capacity is not None:
            capacity = self.fit_capacity(capacity, exact_capacity)
        plan = plan_lib.make_dispatch_plan(
            expert_ids, num_experts, capacity=capacity,
            token_mask=self.shard_tokens(token_mask),
            slot_mask=self.shard_tokens(slot_mask), packed=packed)
        return plan, self.shard_tokens

    def fit_capacity(self, capacity, exact_capacity):
        """The capacity of a plan whose experts each receive exactly
        `exact_capacity` rows (a balanced gate), given the layer's fixed
        capacity or None."""
        if capacity is None:
            return exact_capacity
        return tf.minimum(capacity, exact_capacity)

    def shard_tokens(self, x):
        """`[T, ...]` -> `[shards, T / shards, ...]` (None stays None)."""
        # expand_dims, not x[None]: a slice's gradient copies the whole.
        return None if x is None else tf.expand_dims(x, 0)

    def merge_shards(self, x):
        """`[shards, T / shards, ...]` -> `[T, ...]`."""
        rest = x.shape[2:]
        if not rest.is_fully_defined():
            rest = tf.shape(x)[2:]
        return tf.reshape(x, tf.concat([[-1], rest], axis=0))

    def to_experts(self, buffers):
        """`[shards, E, C, d]` buffers -> where the experts live."""
        return buffers

    def from_experts(self, outputs):
        """`[shards, E, C, d_out]` expert outputs -> where their tokens
        live."""
        return outputs

    def sum_over_replicas(self, values):
        """Sums batch statistics (a tensor or a list) over data-parallel
        replicas; identity with one."""
        return values

    def normal(self, shape, dtype, seed):
        """Standard normal noise, the same values however the tokens are
        laid out."""
        return noise.standard_normal(shape, dtype, seed)

    def batchwise_bounds(self, rows_per_segment, num_experts, k,
                         capacity_factor=1.0):
        """Static bounds of the balanced gates (each expert takes
        `ceil(capacity_factor * k * rows / E)` rows of a segment):
        `(max_per_expert, max_slots)`, None where shapes may vary."""
        del rows_per_segment, num_experts, k, capacity_factor
        return None, None


def strategy_at_build():
    """The strategy of a layer built now: a mesh inside a placement's scope,
    else `Replicas` (one device, or any tf.distribute strategy)."""
    # Imported here: both modules build on this one.
    from tf_moe.distribution import mesh as mesh_lib
    from tf_moe.distribution import mesh_strategy
    from tf_moe.distribution import replicas

    placement = mesh_lib.current_placement()
    if placement is not None:
        return mesh_strategy.Mesh(placement)
    return replicas.Replicas()
