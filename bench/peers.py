"""The other MoE layers of this ecosystem, as bench_layer's peers.

- `GShardMoE`: the one-hot einsum dispatch of GShard (Lepikhin et al. 2020)
  and Mesh-TF, re-implemented: the tokens are split into groups of S, in
  each group every expert has a buffer of a fixed capacity C, the dispatch
  and combine tensors are `[groups, S, E, C]`, and both moves are einsums
  with them. Their FLOPs, `2 * tokens * E * C * d` each, grow with S (C is
  proportional to S), which is why these libraries route in groups
  (Mesh-TF's default S is 1,024). It uses tf_moe's noisy gate, as the
  per-expert dispatcher does (bench/partition_baseline.py), so only the
  dispatch and the experts differ from tf_moe's.
- `garden_moe`: TF Model Garden's `MoeLayer` (expert-choice routing, its
  only router) from `official/nlp/modeling/layers/moe.py`, which installs
  without its dependencies: `pip install --no-deps tf-models-official
  "tf-keras~=2.21.0" gin-config`.
- `mixtral_moe`: keras-hub's `MixtralSparseMoeBlock`, which runs every
  expert (SwiGLU, three matrices) on every token and weights the outputs.

Each is wrapped to take `[tokens, d]` and to give its trainable variables
and losses the way bench_layer's step reads a Keras layer's.
"""

import math

import keras
import tensorflow as tf

from tf_moe import balance
from tf_moe.experts import per_expert_initializer
from tf_moe.top_k_gating import NoisyTopKGate

class GShardMoE(keras.layers.Layer):
    """MoE with capacity buffers and one-hot einsum dispatch (GShard).

    Slots claim buffer places in priority order, as GShard's top-2 does:
    every token's first choice before any token's second, and within one
    rank in token order; a slot past its expert's capacity is dropped.

    Args:
        num_experts, hidden_size, k: E, the experts' hidden width, the
            experts per token.
        capacity_factor: each expert's buffer holds
            `ceil(capacity_factor * k * group_size / E)` rows per group.
        group_size: tokens routed together, S; it must divide the tokens.

    Call arguments:
        inputs: `[tokens, d]`.

    Returns:
        `[tokens, d]`.
    """

    def __init__(self, num_experts, hidden_size, k, capacity_factor=1.25,
                 group_size=1024, seed=None, **kwargs):
        super().__init__(**kwargs)
        if capacity_factor <= 0:
            raise ValueError("`capacity_factor` must be > 0, got "
                             f"{capacity_factor!r}.")
        if group_size < 1:
            raise ValueError(f"`group_size` must be >= 1, got {group_size!r}.")
        self.group_size = group_size
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.k = k
        self.capacity_factor = capacity_factor
        self.gate = NoisyTopKGate(num_experts, k, seed=seed)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.gate.build(input_shape)
        e, h = self.num_experts, self.hidden_size
        initializer = per_expert_initializer("glorot_uniform", e)
        self.kernel_in = self.add_weight(
            name="kernel_in", shape=(e, model_dim, h), initializer=initializer)
        self.bias_in = self.add_weight(name="bias_in", shape=(e, h),
                                       initializer="zeros")
        self.kernel_out = self.add_weight(
            name="kernel_out", shape=(e, h, model_dim),
            initializer=initializer)
        self.bias_out = self.add_weight(name="bias_out", shape=(e, model_dim),
                                        initializer="zeros")

    def capacity(self, group_size):
        return math.ceil(self.capacity_factor * self.k * group_size
                         / self.num_experts)

    def dispatch_and_combine(self, expert_ids, gate_weights, capacity):
        """`[G, S, E, C]` 0/1 dispatch and gate-weighted combine tensors
        from `expert_ids`, `gate_weights`: `[G, S, k]`."""
        filled = tf.zeros([expert_ids.shape[0], 1, self.num_experts],
                          tf.int32)
        dispatch = combine = 0.0
        for rank in range(self.k):
            chosen = tf.one_hot(expert_ids[..., rank], self.num_experts,
                                dtype=tf.int32)  # [G, S, E]
            places = tf.cumsum(chosen, axis=1, exclusive=True) + filled
            place = tf.reduce_sum(places * chosen, axis=2)  # [G, S]
            filled += tf.reduce_sum(chosen, axis=1, keepdims=True)
            # one_hot of a place >= capacity is all zeros: a dropped slot.
            mask = (tf.cast(chosen, tf.float32)[..., None]
                    * tf.one_hot(place, capacity)[:, :, None, :])
            dispatch += mask
            combine += mask * gate_weights[..., rank, None, None]
        return dispatch, combine

    def call(self, inputs, training=None):
        num_tokens, model_dim = inputs.shape
        if num_tokens % self.group_size:
            raise ValueError(f"`group_size` {self.group_size} must divide "
                             f"the tokens, {num_tokens}.")
        gate = self.gate(inputs, training=training)
        groups = [num_tokens // self.group_size, self.group_size]
        dispatch, combine = self.dispatch_and_combine(
            tf.reshape(gate.expert_ids, groups + [self.k]),
            tf.reshape(gate.gate_weights, groups + [self.k]),
            self.capacity(self.group_size))
        buffers = tf.einsum("gsec,gsd->egcd", dispatch,
                            tf.reshape(inputs, groups + [model_dim]))
        hidden = tf.nn.relu(
            tf.einsum("egcd,edh->egch", buffers, self.kernel_in)
            + self.bias_in[:, None, None, :])
        outputs = (tf.einsum("egch,ehd->egcd", hidden, self.kernel_out)
                   + self.bias_out[:, None, None, :])
        importance_loss, load_loss = balance.balancing_loss(
            gate.importance, gate.load, 0.1, 0.1)
        self.add_loss(importance_loss + load_loss)
        return tf.reshape(tf.einsum("gsec,egcd->gsd", combine, outputs),
                          [num_tokens, model_dim])


class _TokensAdapter:
    """Calls a layer of `[batch, length, d]` (which may return a tuple) on
    `[tokens, d]` as sequences of `length` tokens."""

    def __init__(self, layer, length=None):
        self.layer = layer
        self.length = length

    def __call__(self, inputs, training=None):
        num_tokens, model_dim = inputs.shape
        length = self.length or num_tokens
        if num_tokens % length:
            raise ValueError(f"The group size {length} must divide the "
                             f"tokens, {num_tokens}.")
        outputs = self.layer(tf.reshape(inputs, [-1, length, model_dim]),
                             training=training)
        if isinstance(outputs, tuple):
            outputs = outputs[0]
        return tf.reshape(outputs, [num_tokens, model_dim])

    @property
    def trainable_variables(self):
        return self.layer.trainable_variables

    @property
    def losses(self):
        return self.layer.losses


def garden_moe(num_experts, hidden_size, k, group_size=1024):
    """TF Model Garden's MoeLayer with ReLU experts; expert choice in
    groups of `group_size` tokens (one "example" each) with a capacity
    factor of k, so each expert takes `k * group_size / E` tokens of a group
    and the layer computes what top-k would. Raises ImportError where Model
    Garden (and tf-keras, gin-config) are not installed."""
    from official.nlp.modeling.layers import moe as garden

    experts = garden.FeedForwardExperts(num_experts, hidden_size,
                                        activation=tf.nn.relu)
    router = garden.ExpertsChooseMaskedRouter(num_experts,
                                              export_metrics=False)
    return _TokensAdapter(garden.MoeLayer(
        experts, router, train_capacity_factor=float(k),
        eval_capacity_factor=float(k), examples_per_group=1.0),
        length=group_size)


def mixtral_moe(num_experts, hidden_size, k, model_dim):
    """keras-hub's Mixtral sparse MoE block, top-k."""
    from keras_hub.src.models.mixtral.mixtral_decoder import (
        MixtralSparseMoeBlock)

    return _TokensAdapter(MixtralSparseMoeBlock(
        hidden_dim=model_dim, intermediate_dim=hidden_size,
        num_experts=num_experts, top_k=k))
