"""A decoder-only Transformer language model with tf_moe feed-forward layers.

    ids -> embedding (+ learned positions) -> dropout -> block x L
        -> layer norm -> softmax

    block i:  x = x + dropout(attention(norm(x)))     causal, multi-head
              x = x + dropout(feed_forward_i(norm(x)))

Pre-norm (the norm inside each residual branch, one more before the
softmax), as GPT-2, Switch and Mixtral. `feed_forward_i` is
`config.model.blocks[i]`: "moe" (tf_moe.MoE), "hmoe" (tf_moe.HierarchicalMoE)
or "ffn" (a dense ReLU FFN of `config.model.ffn_hidden`), so a list such as
("ffn", "moe", "ffn", "moe") puts a MoE layer in every other block, as GShard
and Switch do.

Positions: "rotary" (Su et al., 2021: queries and keys rotated by an angle
that grows with the position, so attention sees relative offsets and any
length is accepted) or "learned" (a table of `config.model.max_positions`
vectors added to the embedding).

There is no time loop: one step is a few batched matmuls per block, the same
program on one device, under MirroredStrategy and on a DTensor mesh.
"""

import keras
import tensorflow as tf

FEED_FORWARDS = ("moe", "hmoe", "ffn")
POSITIONS = ("rotary", "learned")


@keras.saving.register_keras_serializable(package="tf_moe_trainers")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head self-attention where position t attends to 0..t only.

    `[batch, time, d] -> [batch, time, d]`, `d = num_heads * head_size`.
    Right padding needs no mask: a real position never attends to a later
    one, and the outputs at padded positions are masked downstream.

    Args:
        num_heads: attention heads; must divide the input width.
        rotary: rotate queries and keys by position (rotary embedding,
            rotate-half form, base 10000); the head size must be even.
        dropout: dropout on the attention weights in training.
        seed: the dropout's seed.
    """

    def __init__(self, num_heads, rotary=True, dropout=0.0, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        if int(num_heads) < 1:
            raise ValueError(f"`num_heads` must be >= 1, got {num_heads}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        self.num_heads = int(num_heads)
        self.rotary = bool(rotary)
        self.dropout = dropout
        self.seed = seed
        self.supports_masking = True
        self._dropout = keras.layers.Dropout(dropout, seed=seed)

    def build(self, input_shape):
        width = int(input_shape[-1])
        if width % self.num_heads:
            raise ValueError(f"the input width {width} is not a multiple of "
                             f"`num_heads` ({self.num_heads}).")
        self.head_size = width // self.num_heads
        if self.rotary and self.head_size % 2:
            raise ValueError(f"rotary positions need an even head size; "
                             f"{width} / {self.num_heads} heads = "
                             f"{self.head_size}.")
        # Three kernels, not one stacked: slicing a stacked projection of a
        # batch-sharded input gives wrong values on a DTensor mesh (TF 2.21).
        for projection in ("query", "key", "value"):
            setattr(self, f"{projection}_kernel", self.add_weight(
                shape=(width, self.num_heads, self.head_size),
                initializer=keras.initializers.GlorotUniform(),
                name=f"{projection}_kernel"))
        self.output_kernel = self.add_weight(
            shape=(self.num_heads, self.head_size, width),
            initializer=keras.initializers.GlorotUniform(),
            name="output_kernel")

    def _rotate(self, x, positions):
        """Rotary embedding of `x [batch, time, heads, head_size]`: each
        pair (x_i, x_{i + head_size/2}) turned by `position * 10000^(-2i /
        head_size)`."""
        half = self.head_size // 2
        frequencies = 10000.0 ** (-tf.range(half, dtype=tf.float32) / half)
        angles = positions[:, None] * frequencies[None]  # [time, half]
        cos = tf.cast(tf.cos(angles), x.dtype)[None, :, None]
        sin = tf.cast(tf.sin(angles), x.dtype)[None, :, None]
        first, second = x[..., :half], x[..., half:]
        return tf.concat([first * cos - second * sin,
                          second * cos + first * sin], axis=-1)

    def call(self, x, training=None, mask=None):
        query, key, value = (
            tf.einsum("btd,dhk->bthk", x, tf.cast(kernel, x.dtype))
            for kernel in (self.query_kernel, self.key_kernel,
                           self.value_kernel))
        length = tf.shape(x)[1]
        if self.rotary:
            positions = tf.cast(tf.range(length), tf.float32)
            query = self._rotate(query, positions)
            key = self._rotate(key, positions)
        logits = tf.einsum("bqhk,bthk->bhqt", query, key)
        logits = tf.cast(logits, tf.float32) * self.head_size ** -0.5
        # 0 where t <= q, -1e9 above the diagonal (added, not selected, so
        # the same op works on a DTensor mesh).
        causal = tf.linalg.band_part(tf.ones([length, length]), -1, 0)
        weights = tf.nn.softmax(logits + (causal - 1.0) * 1e9, axis=-1)
        weights = self._dropout(tf.cast(weights, x.dtype), training=training)
        attended = tf.einsum("bhqt,bthk->bqhk", weights, value)
        return tf.einsum("bqhk,hkd->bqd", attended,
                         tf.cast(self.output_kernel, x.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return dict(super().get_config(), num_heads=self.num_heads,
                    rotary=self.rotary, dropout=self.dropout, seed=self.seed)


@keras.saving.register_keras_serializable(package="tf_moe_trainers")
class LearnedPositions(keras.layers.Layer):
    """Adds a learned vector per position: `[batch, time, d] -> [batch,
    time, d]`, for `time <= max_positions` (a longer input is an error)."""

    def __init__(self, max_positions, **kwargs):
        super().__init__(**kwargs)
        if int(max_positions) < 1:
            raise ValueError(
                f"`max_positions` must be >= 1, got {max_positions}.")
        self.max_positions = int(max_positions)
        self.supports_masking = True

    def build(self, input_shape):
        self.table = self.add_weight(
            shape=(self.max_positions, int(input_shape[-1])),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="table")

    def call(self, x):
        length = tf.shape(x)[1]
        tf.debugging.assert_less_equal(
            length, self.max_positions,
            message="the sequence is longer than max_positions")
        return x + tf.cast(self.table[:length], x.dtype)[None]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return dict(super().get_config(), max_positions=self.max_positions)


def check_transformer_config(model):
    """Raises ValueError naming the field when the Transformer fields of
    `model` (the config's `model` block) cannot build a model."""
    for block in model.blocks:
        if block not in FEED_FORWARDS:
            raise ValueError(
                f"config.model.blocks has {block!r}; a Transformer block's "
                f"feed-forward sublayer must be one of {FEED_FORWARDS}.")
    if model.positions not in POSITIONS:
        raise ValueError(f"config.model.positions must be one of "
                         f"{POSITIONS}, got {model.positions!r}.")
    if int(model.num_heads) < 1 or model.d_model % model.num_heads:
        raise ValueError(
            f"config.model.num_heads ({model.num_heads}) must be >= 1 and "
            f"divide config.model.d_model ({model.d_model}).")
    if model.positions == "rotary" and (model.d_model // model.num_heads) % 2:
        raise ValueError(
            f"rotary positions need an even head size: config.model.d_model "
            f"({model.d_model}) / config.model.num_heads ({model.num_heads}) "
            f"is odd.")
    if model.positions == "learned" and int(model.max_positions) < 1:
        raise ValueError(f"config.model.max_positions must be >= 1, got "
                         f"{model.max_positions}.")


def build_transformer_body(model, make_feed_forward, vocab_size, seed):
    """The functional body `ids [batch, time] -> hidden [batch, time,
    d_model]` (masked where ids == 0).

    Args:
        model: the config's `model` block.
        make_feed_forward: `(kind, index, seed) -> layer` for the feed-forward
            sublayer of block `index` (kind from FEED_FORWARDS).
        vocab_size: the embedding's rows.
        seed: the seed every dropout and gate seed derives from.
    """
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab_size, model.d_model, mask_zero=True,
                               name="embedding")(ids)
    if model.positions == "learned":
        x = LearnedPositions(model.max_positions, name="positions")(x)
    x = keras.layers.Dropout(model.dropout, seed=seed,
                             name="embedding_dropout")(x)
    for index, kind in enumerate(model.blocks):
        y = keras.layers.LayerNormalization(
            epsilon=1e-6, name=f"attention_norm_{index}")(x)
        y = CausalSelfAttention(
            model.num_heads, rotary=model.positions == "rotary",
            dropout=model.dropout, seed=seed + 201 + index,
            name=f"attention_{index}")(y)
        y = keras.layers.Dropout(model.dropout, seed=seed + 301 + index,
                                 name=f"attention_dropout_{index}")(y)
        x = keras.layers.Add(name=f"attention_residual_{index}")([x, y])
        y = keras.layers.LayerNormalization(
            epsilon=1e-6, name=f"feed_forward_norm_{index}")(x)
        y = make_feed_forward(kind, index, seed + 1 + index)(y)
        y = keras.layers.Dropout(model.dropout, seed=seed + 101 + index,
                                 name=f"dropout_{index}")(y)
        x = keras.layers.Add(name=f"residual_{index}")([x, y])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    return keras.Model(ids, x, name="body")


def attention_ops_per_timestep(model):
    """Multiply-adds per token of one attention sublayer's projections
    (queries, keys, values, output). The scores and the weighted sum (d per
    attended position) are left out: every model of a family has the same
    attention, and the count would depend on the sentence length."""
    return 4 * model.d_model * model.d_model
