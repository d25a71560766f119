"""The language models: the paper's (section 5, appendix C) and its
baselines, and a Transformer whose feed-forward layers are tf_moe layers.

`config.model.architecture` is "lstm" (this module's block list) or
"transformer" (trainers/lm/transformer.py, where `blocks` lists each
Transformer block's feed-forward sublayer).

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
from tf_moe import expert_weights
from tf_moe import recurrent
from trainers.lm import transformer

ARCHITECTURES = ("lstm", "transformer")

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


@keras.saving.register_keras_serializable(package="tf_moe_trainers")
class DenseFeedForward(keras.layers.Layer):
    """ReLU hidden layers of `hidden_sizes` units, each with `dropout` in
    training (as the experts' hidden units, `config.model.expert_dropout`),
    then a linear one of `output_size`: `[..., d] -> [..., output_size]`.
    Keeps the padding mask (a Sequential of Dense layers drops it)."""

    def __init__(self, hidden_sizes, output_size, dropout=0.0, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.hidden_sizes = tuple(int(width) for width in hidden_sizes)
        self.output_size = int(output_size)
        self.dropout_rate = dropout
        self.seed = seed
        self.supports_masking = True
        self.hidden = [keras.layers.Dense(width, activation="relu",
                                          name=f"hidden_{i}")
                       for i, width in enumerate(self.hidden_sizes)]
        self.dropout = keras.layers.Dropout(dropout, seed=seed)
        self.projection = keras.layers.Dense(self.output_size,
                                             name="projection")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        self.projection.build(shape)

    def call(self, x, training=None):
        for layer in self.hidden:
            x = layer(x)
            if self.dropout_rate > 0:
                x = self.dropout(x, training=training)
        return self.projection(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.output_size,)

    def get_config(self):
        return dict(super().get_config(), hidden_sizes=self.hidden_sizes,
                    output_size=self.output_size, dropout=self.dropout_rate,
                    seed=self.seed)


def check_model_config(model):
    """Raises ValueError naming the field when `model` (the config's
    `model` block) cannot build a model."""
    if model.architecture not in ARCHITECTURES:
        raise ValueError(f"config.model.architecture must be one of "
                         f"{ARCHITECTURES}, got {model.architecture!r}.")
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("config.model.blocks is empty.")
    if model.architecture == "transformer":
        transformer.check_transformer_config(model)
    for block in blocks:
        if block not in BLOCKS:
            raise ValueError(f"config.model.blocks has {block!r}; each block "
                             f"must be one of {BLOCKS}.")
    for field in ("d_model", "num_experts", "k", "expert_hidden"):
        if int(model[field]) < 1:
            raise ValueError(f"config.model.{field} must be >= 1, got "
                             f"{model[field]}.")
    for field in ("dropout", "expert_dropout"):
        if not 0 <= model[field] < 1:
            raise ValueError(f"config.model.{field} must be in [0, 1), got "
                             f"{model[field]}.")
    expert_weights.check_storage(model.expert_storage,
                                 "config.model.expert_storage")
    if model.expert_type not in ("ffn", "glu"):
        raise ValueError(f"config.model.expert_type must be 'ffn' or 'glu', "
                         f"got {model.expert_type!r}.")
    if "moe" in blocks and model.k > model.num_experts:
        raise ValueError(f"config.model.k ({model.k}) is larger than "
                         f"config.model.num_experts ({model.num_experts}).")


def _router_arguments(model):
    """The tf_moe arguments every MoE block of the config shares."""
    return dict(
        gating=model.gating, noisy_gating=model.noisy_gating,
        normalize_gates=model.normalize_gates, balancing=model.balancing,
        importance_weight=model.importance_weight,
        load_weight=model.load_weight, aux_loss_weight=model.aux_loss_weight,
        capacity_factor=model.capacity_factor, expert_type=model.expert_type,
        expert_dropout=model.expert_dropout,
        expert_storage=model.expert_storage)


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
            k=model.k, seed=seed, name=name, **_router_arguments(model))
    if kind == "hmoe":
        return tf_moe.HierarchicalMoE(
            num_groups=model.num_groups,
            experts_per_group=model.experts_per_group,
            hidden_size=model.expert_hidden, k_primary=model.k_primary,
            k_secondary=model.k_secondary, seed=seed, name=name,
            **_router_arguments(model))
    return DenseFeedForward(model.ffn_hidden, model.d_model,
                            dropout=model.expert_dropout, seed=seed,
                            name=name)


def build_language_model(model, vocab_size, seed=0):
    """A functional Keras model `ids [batch, time] -> hidden [batch, time,
    d_model]` (masked where ids == 0) and the softmax layer over the vocab.

    Returns:
        `(body, softmax)`: the softmax is a `Dense(vocab_size)` kept apart
        so that training can use a sampled softmax over its weights.
    """
    check_model_config(model)
    if model.architecture == "transformer":
        body = transformer.build_transformer_body(
            model, lambda kind, index, seed: _make_block(kind, index, model,
                                                         seed),
            vocab_size, seed)
    else:
        body = _recurrent_body(model, vocab_size, seed)
    softmax = keras.layers.Dense(vocab_size, name="softmax")
    softmax.build((None, model.d_model))
    return body, softmax


def _recurrent_body(model, vocab_size, seed):
    """The paper's body: embedding, then the block list with residuals."""
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
    return keras.Model(ids, x, name="body")


def block_ops_per_timestep(kind, model):
    """Multiply-adds per token of one block (the paper's ops/timestep),
    counting only the experts a token runs on, and the gates."""
    d = model.d_model
    if kind == "lstm":
        return 4 * d * (d + d)
    if kind == "projected_lstm":
        units = model.projected_lstm_units
        return 4 * units * (d + d) + units * d
    # A GLU expert has two input matrices (gate and up) and one output.
    expert = (3 if model.expert_type == "glu" else 2) * d * model.expert_hidden
    if kind == "moe":
        return d * model.num_experts + model.k * expert
    if kind == "hmoe":
        return (d * model.num_groups
                + model.k_primary * d * model.experts_per_group
                + model.k_primary * model.k_secondary * expert)
    widths = [d] + list(model.ffn_hidden) + [d]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def ops_per_timestep(model):
    """The model's ops/timestep without embedding and softmax (as Table 7);
    a Transformer block adds its attention projections."""
    ops = sum(block_ops_per_timestep(kind, model) for kind in model.blocks)
    if model.architecture == "transformer":
        ops += len(model.blocks) * transformer.attention_ops_per_timestep(
            model)
    return ops


def count_parameters(body):
    """Parameters of the blocks: all but the embedding (and the softmax,
    which is not in `body`), as the paper counts them."""
    embedding = body.get_layer("embedding")
    return sum(int(tf.size(v)) for v in body.trainable_variables
               if not any(v is e for e in embedding.trainable_variables))
