"""The language model as a SavedModel that works on raw text.

Serving needs `tensorflow` and `import tensorflow_text` (for the tokenizer's
ops), never tf_moe: the layers are traced into the graph.

Signatures:
    score(sentences [batch] string) -> log_likelihood [batch] (nats, the
        end of sentence included), words [batch], tokens [batch],
        perplexity_per_word [batch]
    sample(prefixes [batch] string, max_tokens int32, temperature float32,
        seed int32) -> continuations [batch] string
"""

import tensorflow as tf

from tf_moe.distribution.trainer import compile_without_autograph
from trainers.common import serving
from trainers.common import text


class LanguageModelServer(tf.Module):
    """Tokenizer, model body and softmax, with the serving functions."""

    def __init__(self, tokenizer, body, softmax):
        super().__init__(name="language_model")
        self.tokenizer = tokenizer
        self.body = body
        self.softmax = softmax
        self.layer_variables = serving.layer_variables(body, softmax)

    def _logits(self, ids):
        return self.softmax(self.body(ids, training=False))

    def _prefix_ids(self, sentences):
        """`[BOS] + pieces`, padded: ids `[batch, time]`, lengths, words."""
        pieces, words = self.tokenizer.tokenize(sentences)
        bos = tf.fill([tf.shape(sentences)[0], 1], text.BOS_ID)
        ids = tf.concat([tf.RaggedTensor.from_tensor(bos), pieces], axis=1)
        return ids.to_tensor(), tf.cast(ids.row_lengths(), tf.int32), words

    @compile_without_autograph(
        input_signature=[tf.TensorSpec([None], tf.string)])
    def score(self, sentences):
        inputs, lengths, words = self._prefix_ids(sentences)
        # Targets: the pieces, then the end of sentence at each row's end.
        batch = tf.shape(inputs)[0]
        targets = tf.concat([inputs[:, 1:], tf.zeros([batch, 1], tf.int32)], 1)
        targets = tf.tensor_scatter_nd_update(
            targets, tf.stack([tf.range(batch), lengths - 1], 1),
            tf.fill([batch], text.EOS_ID))
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets, logits=self._logits(inputs))
        mask = tf.sequence_mask(lengths, tf.shape(inputs)[1], tf.float32)
        log_likelihood = -tf.reduce_sum(nll * mask, axis=1)
        words = words + 1  # The end of sentence is a word, as in training.
        return {"log_likelihood": log_likelihood, "words": words,
                "tokens": lengths,
                "perplexity_per_word": tf.exp(
                    -log_likelihood / tf.cast(words, tf.float32))}

    @compile_without_autograph(input_signature=[
        tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32)])
    def sample(self, prefixes, max_tokens, temperature, seed):
        ids, lengths, _ = self._prefix_ids(prefixes)
        batch = tf.shape(ids)[0]
        start = tf.shape(ids)[1]
        # Room for the continuation; padding (id 0) after a row's end is
        # masked and cannot change the positions before it.
        ids = tf.pad(ids, [[0, 0], [0, max_tokens]])
        prefix_lengths = lengths
        rows = tf.range(batch)
        done = tf.zeros([batch], tf.bool)

        def step(i, ids, lengths, done):
            logits = self._logits(ids[:, :start + i])
            last = tf.gather(logits, lengths - 1, batch_dims=1)
            drawn = tf.random.stateless_categorical(
                last / tf.maximum(temperature, 1e-6), 1,
                seed=tf.stack([seed, i]), dtype=tf.int32)[:, 0]
            drawn = tf.where(done, text.PAD_ID, drawn)
            ids = tf.tensor_scatter_nd_update(
                ids, tf.stack([rows, lengths], 1), drawn)
            lengths += tf.cast(~done, tf.int32)
            return i + 1, ids, lengths, done | (drawn == text.EOS_ID)

        _, ids, _, _ = tf.while_loop(
            lambda i, ids, lengths, done: (i < max_tokens)
            & ~tf.reduce_all(done),
            step, [tf.constant(0), ids, lengths, done],
            shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None]),
                              tf.TensorShape([None]), tf.TensorShape([None])])
        # Each row's continuation starts at its own prefix's end.
        continuation = tf.RaggedTensor.from_tensor(tf.gather(
            ids, prefix_lengths[:, None] + tf.range(max_tokens)[None],
            batch_dims=1))
        # Keep what comes before the end of sentence.
        continuation = tf.ragged.boolean_mask(
            continuation,
            tf.math.cumsum(tf.cast(continuation == text.EOS_ID, tf.int32),
                           axis=1) == 0)
        return self.tokenizer.detokenize(continuation)


def export(tokenizer, body, softmax, export_dir):
    """Writes the SavedModel; returns the server (usable in-process)."""
    server = LanguageModelServer(tokenizer, body, softmax)
    tf.saved_model.save(server, export_dir, signatures={
        "score": server.score, "sample": server.sample})
    return server
