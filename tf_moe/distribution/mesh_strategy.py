"""A DTensor mesh: the paper's section 3, data and model parallelism mixed.

Each batch shard is one token shard: it routes its own tokens into its own
`[E, C, d]` buffers, as each replica does in the paper, and relayouting the
stacked `[shards, E, C, d]` buffers from batch-sharded to expert-sharded is
the all-to-all that takes every token to the device of its expert.
"""

import math
import tensorflow as tf
from tensorflow.experimental import dtensor

from tf_moe.distribution import mesh as mesh_lib
from tf_moe.distribution.strategy import OneDevice


class Mesh(OneDevice):
    """The strategy of a layer built under `placement.scope()`.

    Args:
        placement: the `MeshPlacement`.
    """

    static_shapes = True

    def __init__(self, placement):
        self.placement = placement

    @property
    def num_token_shards(self):
        return self.placement.num_batch_shards

    @property
    def compiles_experts(self):
        # DTensor runs an XLA-compiled function on a one-device mesh only.
        return self.placement.mesh.size == 1

    def check_num_experts(self, num_experts, layer_name):
        self.placement.check_num_experts(num_experts, layer_name)

    def expert_variables(self):
        return mesh_lib.expert_sharded_variables()

    def capacity_factor(self, capacity_factor):
        # Buffers need static shapes: no dropless dispatch.
        return capacity_factor or self.placement.capacity_factor

    def fit_capacity(self, capacity, exact_capacity):
        # Static shapes: the fixed capacity, whatever this batch needs.
        del exact_capacity
        return capacity

    def shard_tokens(self, x):
        if x is None:
            return None
        num_tokens = x.shape[0]
        if num_tokens is None:
            raise ValueError(
                "on a mesh the number of tokens must be static (call the "
                "layer inside a tf.function traced on the batch).")
        self.placement.check_batch(num_tokens, what="number of tokens")
        shards = self.num_token_shards
        x = tf.reshape(x, [shards, num_tokens // shards] + x.shape[1:].as_list())
        return dtensor.relayout(x, self.placement.batch_sharded(x.shape.rank))

    def merge_shards(self, x):
        return tf.reshape(x, [-1] + x.shape[2:].as_list())

    def to_experts(self, buffers):
        return dtensor.relayout(buffers, self.placement.buffer_layout())

    def from_experts(self, outputs):
        return dtensor.relayout(outputs,
                                self.placement.batch_sharded(outputs.shape.rank))

    def normal(self, shape, dtype, seed):
        # Drawn whole on every device, so that the noise (and the routing)
        # is the same on any mesh as on one device; DTensor would otherwise
        # draw each shard's rows from a stream of its own.
        noise = super().normal(shape, dtype, seed)
        return dtensor.relayout(noise,
                                self.placement.replicated(noise.shape.rank))

    def batchwise_bounds(self, rows_per_segment, num_experts, k,
                         capacity_factor=1.0):
        # A token keeps at most min(E, 2k) of the experts that chose it (its
        # most probable ones; the rest count as dropped).
        max_per_expert = min(rows_per_segment, math.ceil(
            capacity_factor * k * rows_per_segment / num_experts))
        return max_per_expert, min(num_experts, 2 * k)
