"""The paper's translation model: GNMT reduced, with MoE layers (appendix E).

    encoder  embedding -> bidirectional LSTM -> LSTM -> MoE -> LSTM
    decoder  embedding -> LSTM -> attention -> MoE -> LSTM -> softmax

Every LSTM and MoE layer's output goes through dropout and is added to its
input (the residual connection). Attention is GNMT's additive attention,
queried by the first decoder layer's output; its context is concatenated to
the input of the layers above it (the MoE and the last LSTM), as GNMT feeds
it to every upper decoder layer. `config.model.moe` picks the layer between
the LSTMs: "moe", "hmoe" (hierarchical) or "ffn", the dense baseline.

The decoder runs two ways: over a whole target sequence (teacher forcing,
`decode`) and one position at a time from a state (`decode_step`, for beam
search); both compute the same function with the same weights.
"""

import keras
import tensorflow as tf

import tf_moe
from tf_moe import expert_weights
from tf_moe import recurrent
from tf_moe import sharding

MIXTURES = ("moe", "hmoe", "ffn")


def check_model_config(model):
    """Raises ValueError naming the field when `model` cannot build."""
    if model.moe not in MIXTURES:
        raise ValueError(f"config.model.moe must be one of {MIXTURES}, got "
                         f"{model.moe!r}.")
    for field in ("d_model", "num_experts", "k", "expert_hidden",
                  "ffn_hidden", "num_groups", "experts_per_group",
                  "k_primary", "k_secondary"):
        if int(model[field]) < 1:
            raise ValueError(f"config.model.{field} must be >= 1, got "
                             f"{model[field]}.")
    if model.d_model % 2:
        raise ValueError(f"config.model.d_model must be even (the first "
                         f"encoder layer is two LSTMs of d_model / 2), got "
                         f"{model.d_model}.")
    for field in ("dropout", "expert_dropout"):
        if not 0 <= model[field] < 1:
            raise ValueError(f"config.model.{field} must be in [0, 1), got "
                             f"{model[field]}.")
    expert_weights.check_storage(model.expert_storage,
                                 "config.model.expert_storage")
    if model.moe == "moe" and model.k > model.num_experts:
        raise ValueError(f"config.model.k ({model.k}) is larger than "
                         f"config.model.num_experts ({model.num_experts}).")


def _mixture(model, output_size, seed, name):
    """The layer between the LSTMs: `[..., d_in] -> [..., output_size]`."""
    common = dict(hidden_size=model.expert_hidden, output_size=output_size,
                  gating=model.gating, noisy_gating=model.noisy_gating,
                  importance_weight=model.importance_weight,
                  load_weight=model.load_weight,
                  capacity_factor=model.capacity_factor,
                  expert_dropout=model.expert_dropout,
                  expert_storage=model.expert_storage, seed=seed, name=name)
    if model.moe == "moe":
        return tf_moe.MoE(num_experts=model.num_experts, k=model.k, **common)
    if model.moe == "hmoe":
        return tf_moe.HierarchicalMoE(
            num_groups=model.num_groups,
            experts_per_group=model.experts_per_group,
            k_primary=model.k_primary, k_secondary=model.k_secondary,
            **common)
    return FeedForward(model.ffn_hidden, output_size,
                       dropout=model.expert_dropout, seed=seed, name=name)


@keras.saving.register_keras_serializable(package="tf_moe_trainers")
class FeedForward(keras.layers.Layer):
    """The dense baseline's layer: `relu(x W1 + b1) W2 + b2`, on any number
    of leading dimensions (one expert that every token runs on), with
    `dropout` on its hidden units in training, as the experts' own
    (`config.model.expert_dropout`)."""

    def __init__(self, hidden_size, output_size, dropout=0.0, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.dropout_rate = dropout
        self.seed = seed
        self.hidden = keras.layers.Dense(hidden_size, activation="relu",
                                         name="hidden")
        self.dropout = keras.layers.Dropout(dropout, seed=seed)
        self.output_layer = keras.layers.Dense(output_size, name="output")

    def call(self, inputs, mask=None, training=None):
        del mask  # Position-wise: padding cannot reach other positions.
        hidden = self.hidden(inputs)
        if self.dropout_rate > 0:
            hidden = self.dropout(hidden, training=training)
        return self.output_layer(hidden)

    def get_config(self):
        return dict(super().get_config(), hidden_size=self.hidden_size,
                    output_size=self.output_size, dropout=self.dropout_rate,
                    seed=self.seed)


@keras.saving.register_keras_serializable(package="tf_moe_trainers")
class AdditiveAttention(keras.layers.Layer):
    """GNMT's (Bahdanau's) attention: `score(q, m) = v . tanh(W_q q + W_m m)`
    over the source positions, padding masked out.

    Keys (`W_m m`) are computed once per source (`keys`), then queried for
    every decoder position or step.
    """

    def __init__(self, units, query_size, memory_size, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True  # The source mask is an argument.
        self.units = units
        self.query_size = query_size
        self.memory_size = memory_size
        # Built now: `keys` runs before the first call.
        self.build()

    def build(self, input_shape=None):
        del input_shape  # The sizes are the constructor's.
        self.query_kernel = self.add_weight(
            shape=(self.query_size, self.units), name="query_kernel")
        self.memory_kernel = self.add_weight(
            shape=(self.memory_size, self.units), name="memory_kernel")
        self.score_vector = self.add_weight(
            shape=(self.units,), name="score_vector")
        self.built = True

    def keys(self, memory):
        """`[batch, source, d] -> [batch, source, units]`."""
        return tf.matmul(memory, self.memory_kernel)

    def call(self, query, memory, keys, source_mask):
        """Context vectors: `query [batch, (time,) d_q]`, `memory [batch,
        source, d]`, `keys` of the memory, `source_mask [batch, source]`
        bool -> `[batch, (time,) d]`."""
        # expand_dims, not `[:, None]`: DTensor cannot lay out a
        # StridedSlice that adds an axis to a batch-sharded tensor.
        single = query.shape.rank == 2
        if single:
            query = tf.expand_dims(query, 1)
        projected = tf.matmul(query, self.query_kernel)  # [b, t, u]
        scores = tf.reduce_sum(
            self.score_vector * tf.tanh(tf.expand_dims(projected, 2)
                                        + tf.expand_dims(keys, 1)),
            -1)  # [b, t, s]
        scores = tf.where(tf.expand_dims(source_mask, 1), scores, -1e9)
        weights = tf.nn.softmax(scores, axis=-1)
        context = tf.matmul(weights, memory)
        return tf.squeeze(context, 1) if single else context

    def get_config(self):
        return dict(super().get_config(), units=self.units,
                    query_size=self.query_size, memory_size=self.memory_size)


class Seq2Seq(keras.layers.Layer):
    """The encoder-decoder; see the module docstring. (A Keras layer, not a
    model: it has two inputs and no Keras serving signature of its own; the
    trainer's `Translator` is what is saved.)

    Args:
        model: the config's `model` block.
        vocab_size: the shared vocabulary's size.
        seed: seeds dropout and the gates' noise.
    """

    def __init__(self, model, vocab_size, seed=0, **kwargs):
        super().__init__(**kwargs)
        check_model_config(model)
        d = model.d_model
        self.d_model = d
        self.vocab_size = vocab_size
        self.source_embedding = keras.layers.Embedding(
            vocab_size, d, name="source_embedding")
        self.target_embedding = keras.layers.Embedding(
            vocab_size, d, name="target_embedding")
        self.encoder_lstm_1 = recurrent.Bidirectional(
            recurrent.LSTM(d // 2, return_sequences=True),
            name="encoder_lstm_1")
        self.encoder_lstm_2 = recurrent.LSTM(
            d, return_sequences=True, name="encoder_lstm_2")
        self.encoder_mixture = _mixture(model, d, seed + 1, "encoder_moe")
        self.encoder_lstm_3 = recurrent.LSTM(
            d, return_sequences=True, name="encoder_lstm_3")
        self.decoder_lstm_1 = recurrent.LSTM(
            d, return_sequences=True, name="decoder_lstm_1")
        self.attention = AdditiveAttention(d, d, d, name="attention")
        self.decoder_mixture = _mixture(model, d, seed + 2, "decoder_moe")
        self.decoder_lstm_2 = recurrent.LSTM(
            d, return_sequences=True, name="decoder_lstm_2")
        self.softmax = keras.layers.Dense(vocab_size, name="softmax")
        self.dropouts = [keras.layers.Dropout(model.dropout, seed=seed + 10 + i)
                         for i in range(8)]
        self._built_all = False

    def build_all(self):
        """Creates every weight (on one-token sentences, one per batch
        shard of a mesh), so that optimizers and checkpoints see them before
        training."""
        if not self._built_all:
            placement = sharding.current_placement()
            rows = placement.num_batch_shards if placement else 1
            ids = tf.fill([rows, 1], 3)
            memory, mask = self.encode(ids, training=False)
            self.decode(ids, memory, mask, training=False)
            self._built_all = True

    def encode(self, source, training=None):
        """`source [batch, source]` ids (0 = padding) -> `(memory [batch,
        source, d], source_mask [batch, source] bool)`."""
        mask = tf.not_equal(source, 0)
        drop = iter(self.dropouts[:4])
        x = self.source_embedding(source)
        for layer in (self.encoder_lstm_1, self.encoder_lstm_2,
                      self.encoder_mixture, self.encoder_lstm_3):
            x = x + next(drop)(layer(x, mask=mask, training=training),
                               training=training)
        return x, mask

    def decode(self, inputs, memory, source_mask, training=None):
        """Teacher forcing: decoder `inputs [batch, time]` ids -> logits
        `[batch, time, vocab]`."""
        mask = tf.not_equal(inputs, 0)
        drop = iter(self.dropouts[4:])
        x = self.target_embedding(inputs)
        query = self.decoder_lstm_1(x, mask=mask, training=training)
        x = x + next(drop)(query, training=training)
        context = self.attention(query, memory, self.attention.keys(memory),
                                 source_mask)
        for layer in (self.decoder_mixture, self.decoder_lstm_2):
            y = layer(tf.concat([x, context], -1), mask=mask,
                      training=training)
            x = x + next(drop)(y, training=training)
        return self.softmax(x)

    def initial_state(self, batch):
        """The decoder LSTMs' zero states: `[h1, c1, h2, c2]`, `[batch, d]`."""
        return [tf.zeros([batch, self.d_model])] * 4

    def decode_step(self, ids, state, memory, keys, source_mask):
        """One position in inference mode: `ids [n]` (the previous tokens)
        and `state` -> `(logits [n, vocab], state)`; `memory`, `keys` and
        `source_mask` as `attention`'s, for the same n rows."""
        x = self.target_embedding(ids)
        query, lstm_1 = self.decoder_lstm_1.cell(x, state[:2])
        x = x + query
        context = self.attention(query, memory, keys, source_mask)
        x = x + self.decoder_mixture(tf.concat([x, context], -1),
                                     training=False)
        output, lstm_2 = self.decoder_lstm_2.cell(
            tf.concat([x, context], -1), state[2:])
        x = x + output
        return self.softmax(x), list(lstm_1) + list(lstm_2)

    def call(self, source, inputs, training=None):
        memory, source_mask = self.encode(source, training=training)
        return self.decode(inputs, memory, source_mask, training=training)


def _lstm_ops(inputs, units):
    return 4 * units * (inputs + units)


def _mixture_ops(model, d_in):
    """Multiply-adds per token: the gates and the experts a token runs on."""
    d = model.d_model
    if model.moe == "ffn":
        return d_in * model.ffn_hidden + model.ffn_hidden * d
    expert = d_in * model.expert_hidden + model.expert_hidden * d
    if model.moe == "moe":
        return d_in * model.num_experts + model.k * expert
    return (d_in * model.num_groups
            + model.k_primary * d_in * model.experts_per_group
            + model.k_primary * model.k_secondary * expert)


def ops_per_timestep(model):
    """Multiply-adds per timestep (a source and a target position), without
    embeddings and softmax, as the paper counts them; attention counts its
    query projection only (its other terms grow with the source length)."""
    d = model.d_model
    encoder = (2 * _lstm_ops(d, d // 2) + 2 * _lstm_ops(d, d)
               + _mixture_ops(model, d))
    decoder = (_lstm_ops(d, d) + d * d + _mixture_ops(model, 2 * d)
               + _lstm_ops(2 * d, d))
    return encoder + decoder


def count_parameters(model):
    """Parameters of all but the embeddings and the softmax, as the paper
    counts them."""
    excluded = {id(v) for layer in (model.source_embedding,
                                    model.target_embedding, model.softmax)
                for v in layer.trainable_variables}
    return sum(int(tf.size(v)) for v in model.trainable_variables
               if id(v) not in excluded)
