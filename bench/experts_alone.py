"""The floor of a sparse layer's step: tf_moe's experts alone.

Every token's k rows, already sorted by expert and split evenly (`k *
tokens / E` rows per expert), run through `tf_moe.Experts` in the layout
the layer would choose for that shape (`Experts.layout`), with no gate, no
plan, no dispatch and no combine. Its step over the dense FFN's is what
any MoE layer with these experts pays before it routes anything: a layer's
ratio above it is the cost of its routing, and the ratio itself is the
cost of running the same FLOPs as E smaller products.
"""

import keras
import tensorflow as tf

import tf_moe


class ExpertsAlone(keras.layers.Layer):
    """tf_moe's experts on balanced, presorted rows.

    Call arguments:
        rows: `[k * tokens, d]`, `k * tokens / E` rows of each expert in
            turn (E must divide k * tokens).

    Returns:
        `[k * tokens, d]`, every row through its expert.
    """

    def __init__(self, num_experts, hidden_size, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_size = hidden_size

    def build(self, input_shape):
        num_rows, model_dim = input_shape
        if num_rows % self.num_experts:
            raise ValueError(f"`rows` must split evenly over {self.num_experts} "
                             f"experts, got {num_rows} rows.")
        self.rows_per_expert = num_rows // self.num_experts
        self.experts = tf_moe.Experts(self.num_experts, self.hidden_size,
                                      model_dim, name="experts")
        self.experts.build((self.num_experts, None, model_dim))
        self.packed = self.experts.layout(self.rows_per_expert,
                                          self.compute_dtype) == "packed"

    def call(self, rows, training=None):
        if self.packed:
            expert_rows = tf.fill([self.num_experts], self.rows_per_expert)
            return self.experts(rows, training=training,
                                expert_rows=expert_rows)
        buffers = tf.reshape(rows, [self.num_experts, self.rows_per_expert,
                                    rows.shape[-1]])
        return tf.reshape(self.experts(buffers, training=training),
                          tf.shape(rows))
