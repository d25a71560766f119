"""The paper's language model (section 5, appendix C) and its baselines.

    ids -> embedding -> block -> ... -> block -> softmax

Every block's output goes through dropout and is added to its input (the
residual connection); the output of a MoE block (and of the dense "MoE-1"
baselines) passes through a sigmoid first, as in the paper. The paper's
models are block lists over a width `d_model`:

    MoE-N            lstm, moe, lstm       (hmoe for the hierarchical ones)
    4xLSTM-512       lstm, lstm, lstm, lstm
    MoE-1-Wide/Deep  lstm, ffn, lstm       (one "expert" of `ffn_hidden`)
    LSTM-2048-512    projected_lstm        (wide LSTM, projected to d_model)
"""

import keras
import tensorflow as tf

import tf_moe
from tf_moe import recurrent

BLOCKS = ("lstm", "projected_lstm", "moe", "hmoe", "ffn")
_SQUASHED = ("moe", "hmoe", "ffn")  # Blocks whose output gets the sigmoid.


@keras.saving.register_keras_serializable(package="tf_moe_trainers")
class ProjectedLSTMCell(keras.layers.Layer):
    """An LSTM cell whose output (and recurrent state) is projected down
    (Sak et al., 2014): `h = (o * tanh(c)) @ W_proj`, `c` of `units`.

    State: `[h [batch, projection], c [batch, units]]`.
    """

    def __init__(self, units, projection, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.projection = projection
        self.state_size = [projection, units]
        self.output_size = projection

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1] + self.projection, 4 * self.units),
            initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(
            shape=(4 * self.units,), name="bias",
            initializer=keras.initializers.Constant(
                [0.0] * self.units + [1.0] * self.units
                + [0.0] * 2 * self.units))  # Forget-gate bias 1.
        self.projection_kernel = self.add_weight(
            shape=(self.units, self.projection),
            initializer="glorot_uniform", name="projection_kernel")

    def call(self, inputs, states, training=None):
        h, c = states
        z = tf.matmul(tf.concat([inputs, h], -1), self.kernel) + self.bias
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.matmul(tf.sigmoid(o) * tf.tanh(c), self.projection_kernel)
        return h, [h, c]

    def get_config(self):
        return dict(super().get_config(), units=self.units,
                    projection=self.projection)


def check_model_config(model):
    """Raises ValueError naming the field when `model` (the config's
    `model` block) cannot build a model."""
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("config.model.blocks is empty.")
    for block in blocks:
        if block not in BLOCKS:
            raise ValueError(f"config.model.blocks has {block!r}; each block "
                             f"must be one of {BLOCKS}.")
    for field in ("d_model", "num_experts", "k", "expert_hidden"):
        if int(model[field]) < 1:
            raise ValueError(f"config.model.{field} must be >= 1, got "
                             f"{model[field]}.")
    if not 0 <= model.dropout < 1:
        raise ValueError(
            f"config.model.dropout must be in [0, 1), got {model.dropout}.")
    if "moe" in blocks and model.k > model.num_experts:
        raise ValueError(f"config.model.k ({model.k}) is larger than "
                         f"config.model.num_experts ({model.num_experts}).")


def _make_block(kind, index, model, seed):
    name = f"{kind}_{index}"
    if kind == "lstm":
        return recurrent.LSTM(model.d_model, return_sequences=True,
                              name=name)
    if kind == "projected_lstm":
        return recurrent.RNN(
            ProjectedLSTMCell(model.projected_lstm_units, model.d_model),
            return_sequences=True, name=name)
    if kind == "moe":
        return tf_moe.MoE(
            num_experts=model.num_experts, hidden_size=model.expert_hidden,
            k=model.k, gating=model.gating, noisy_gating=model.noisy_gating,
            importance_weight=model.importance_weight,
            load_weight=model.load_weight,
            capacity_factor=model.capacity_factor, seed=seed, name=name)
    if kind == "hmoe":
        return tf_moe.HierarchicalMoE(
            num_groups=model.num_groups,
            experts_per_group=model.experts_per_group,
            hidden_size=model.expert_hidden, k_primary=model.k_primary,
            k_secondary=model.k_secondary, gating=model.gating,
            noisy_gating=model.noisy_gating,
            importance_weight=model.importance_weight,
            load_weight=model.load_weight,
            capacity_factor=model.capacity_factor, seed=seed, name=name)
    hidden = [keras.layers.Dense(width, activation="relu",
                                 name=f"{name}_hidden_{i}")
              for i, width in enumerate(model.ffn_hidden)]
    return keras.Sequential(hidden + [keras.layers.Dense(model.d_model)],
                            name=name)


def build_language_model(model, vocab_size, seed=0):
    """A functional Keras model `ids [batch, time] -> hidden [batch, time,
    d_model]` (masked where ids == 0) and the softmax layer over the vocab.

    Returns:
        `(body, softmax)`: the softmax is a `Dense(vocab_size)` kept apart
        so that training can use a sampled softmax over its weights.
    """
    check_model_config(model)
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab_size, model.d_model, mask_zero=True,
                               name="embedding")(ids)
    x = keras.layers.Dropout(model.dropout, seed=seed, name="embedding_dropout")(x)
    for index, kind in enumerate(model.blocks):
        y = _make_block(kind, index, model, seed + 1 + index)(x)
        if kind in _SQUASHED:
            y = keras.layers.Activation("sigmoid", name=f"sigmoid_{index}")(y)
        y = keras.layers.Dropout(model.dropout, seed=seed + 101 + index,
                                 name=f"dropout_{index}")(y)
        x = keras.layers.Add(name=f"residual_{index}")([x, y])
    body = keras.Model(ids, x, name="body")
    softmax = keras.layers.Dense(vocab_size, name="softmax")
    softmax.build((None, model.d_model))
    return body, softmax


def block_ops_per_timestep(kind, model):
    """Multiply-adds per token of one block (the paper's ops/timestep),
    counting only the experts a token runs on, and the gates."""
    d = model.d_model
    if kind == "lstm":
        return 4 * d * (d + d)
    if kind == "projected_lstm":
        units = model.projected_lstm_units
        return 4 * units * (d + d) + units * d
    expert = 2 * d * model.expert_hidden
    if kind == "moe":
        return d * model.num_experts + model.k * expert
    if kind == "hmoe":
        return (d * model.num_groups
                + model.k_primary * d * model.experts_per_group
                + model.k_primary * model.k_secondary * expert)
    widths = [d] + list(model.ffn_hidden) + [d]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def ops_per_timestep(model):
    """The model's ops/timestep without embedding and softmax (as Table 7)."""
    return sum(block_ops_per_timestep(kind, model) for kind in model.blocks)


def count_parameters(body):
    """Parameters of the blocks: all but the embedding (and the softmax,
    which is not in `body`), as the paper counts them."""
    embedding = body.get_layer("embedding")
    return sum(int(tf.size(v)) for v in body.trainable_variables
               if not any(v is e for e in embedding.trainable_variables))
