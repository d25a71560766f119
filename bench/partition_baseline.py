"""The comparison point: a per-expert dynamic_partition dispatcher.

This is how the paper authors' TensorFlow code (tensor2tensor's
SparseDispatcher) runs a MoE: `tf.dynamic_partition` splits the routed
tokens into one tensor per expert, each expert is its own pair of matmuls
on its own variables (a Python loop over experts that builds E subgraphs),
and `tf.dynamic_stitch` plus a segment sum combine the outputs. No padding,
but E separate small ops. It uses tf_moe's gate, so both layers do the same
routing and losses; only the dispatch and the experts differ.
"""

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe.top_k_gating import NoisyTopKGate


class PartitionedMoE(keras.layers.Layer):
    """MoE with per-expert variables and dynamic_partition dispatch.

    Call arguments:
        inputs: `[tokens, d]`.

    Returns:
        `[tokens, d]`.
    """

    def __init__(self, num_experts, hidden_size, k, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.k = k
        self.gate = NoisyTopKGate(num_experts, k, seed=seed)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.gate.build(input_shape)
        self.expert_weights = []
        for e in range(self.num_experts):
            self.expert_weights.append((
                self.add_weight(name=f"w_in_{e}",
                                shape=(model_dim, self.hidden_size),
                                initializer="glorot_uniform"),
                self.add_weight(name=f"b_in_{e}", shape=(self.hidden_size,),
                                initializer="zeros"),
                self.add_weight(name=f"w_out_{e}",
                                shape=(self.hidden_size, model_dim),
                                initializer="glorot_uniform"),
                self.add_weight(name=f"b_out_{e}", shape=(model_dim,),
                                initializer="zeros"),
            ))

    def call(self, inputs, training=None):
        gate = self.gate(inputs, training=training)
        num_tokens = tf.shape(inputs)[0]
        slot_experts = tf.reshape(gate.expert_ids, [-1])
        slot_tokens = tf.repeat(tf.range(num_tokens), self.k)
        slot_weights = tf.reshape(gate.gate_weights, [-1])
        slot_index = tf.range(tf.size(slot_experts))

        parts = tf.dynamic_partition(tf.gather(inputs, slot_tokens),
                                     slot_experts, self.num_experts)
        part_index = tf.dynamic_partition(slot_index, slot_experts,
                                          self.num_experts)
        outputs = []
        for part, (w_in, b_in, w_out, b_out) in zip(parts,
                                                    self.expert_weights):
            hidden = tf.nn.relu(tf.matmul(part, w_in) + b_in)
            outputs.append(tf.matmul(hidden, w_out) + b_out)
        slot_outputs = tf.dynamic_stitch(part_index, outputs)
        combined = tf.math.unsorted_segment_sum(
            slot_outputs * slot_weights[:, None], slot_tokens, num_tokens)

        importance_loss, load_loss = balance.balancing_loss(
            gate.importance, gate.load, 0.1, 0.1)
        self.add_loss(importance_loss + load_loss)
        return combined
