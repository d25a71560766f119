"""Raw sentences in, translations out: the serving module and its export.

The same module translates for BLEU during evaluation and, saved, serves:
`tf.saved_model.load` in a fresh process needs `tensorflow` and `import
tensorflow_text` (the tokenizer's ops), never tf_moe.

Signatures:
    translate(sources [batch] string) -> translations [batch] string
        into the model's first target language (its only one, single-pair)
    translate_to(sources [batch] string, target_languages [batch] string)
        -> translations [batch] string; an unknown language code gives an
        InvalidArgumentError naming the known ones.
Beam size, length penalty and the length limit are the config's `decode`
block's, fixed at export.
"""

import tensorflow as tf

from tf_moe.distribution.trainer import compile_without_autograph
from trainers.common import serving
from trainers.common import text
from trainers.nmt import beam_search as beam_search_lib


class Translator(tf.Module):
    """Tokenizer, model and decoding settings, with the serving functions.

    Args:
        tokenizer: `trainers.common.text.Tokenizer` of the shared vocabulary.
        model: a `trainers.nmt.model.Seq2Seq` (built).
        languages: the target languages, in their tokens' order.
        first_tag_id: the id of `languages[0]`'s token.
        decode: the config's `decode` block.
    """

    def __init__(self, tokenizer, model, languages, first_tag_id, decode):
        super().__init__(name="translator")
        self.tokenizer = tokenizer
        self.model = model
        self.tracked_variables = serving.layer_variables(model)
        self.languages = tf.constant(list(languages))
        self._language_table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                self.languages, tf.range(len(languages), dtype=tf.int32)),
            default_value=-1)
        self.first_tag_id = first_tag_id
        self.beam_size = int(decode.beam_size)
        self.alpha = float(decode.length_penalty)
        self.max_length_ratio = float(decode.max_length_ratio)

    def source_ids(self, sources, language_indices):
        """`[<2xx>] + pieces + [EOS]` of each source, padded: `[batch,
        source]` int32."""
        pieces, _ = self.tokenizer.tokenize(sources)
        batch = tf.shape(sources)[0]
        tags = tf.RaggedTensor.from_tensor(
            (self.first_tag_id + language_indices)[:, None])
        eos = tf.RaggedTensor.from_tensor(tf.fill([batch, 1], text.EOS_ID))
        return tf.concat([tags, pieces, eos], axis=1).to_tensor()

    def translate_ids(self, source):
        """Beam search over `source [batch, source]` ids -> the best outputs
        `[batch, length]` (end of sentence and padding included)."""
        memory, source_mask = self.model.encode(source, training=False)
        batch = tf.shape(source)[0]
        beam = self.beam_size

        def tile(tensor):  # [batch, ...] -> [batch * beam, ...]
            return tf.repeat(tensor, beam, axis=0)

        memory, source_mask = tile(memory), tile(source_mask)
        keys = self.model.attention.keys(memory)

        def step(ids, state):
            logits, state = self.model.decode_step(ids, state, memory, keys,
                                                   source_mask)
            return tf.nn.log_softmax(logits), state

        source_lengths = tf.reduce_sum(tf.cast(source_mask, tf.float32), 1)
        max_length = tf.cast(
            self.max_length_ratio * tf.reduce_max(source_lengths), tf.int32
        ) + 10
        state = self.model.initial_state(batch * beam)
        if beam == 1:
            ids, _ = beam_search_lib.greedy_search(
                step, state, batch, max_length, text.BOS_ID, text.EOS_ID)
        else:
            ids, _ = beam_search_lib.beam_search(
                step, state, batch, beam, max_length, self.alpha,
                text.BOS_ID, text.EOS_ID)
        return ids[:, 0]

    def _translate(self, sources, language_indices):
        ids = self.translate_ids(self.source_ids(sources, language_indices))
        # Keep what comes before the end of sentence.
        ids = tf.RaggedTensor.from_tensor(ids)
        ids = tf.ragged.boolean_mask(ids, tf.math.cumsum(
            tf.cast(ids == text.EOS_ID, tf.int32), axis=1) == 0)
        return self.tokenizer.detokenize(ids)

    @compile_without_autograph(
        input_signature=[tf.TensorSpec([None], tf.string)])
    def translate(self, sources):
        return self._translate(sources, tf.zeros_like(sources, tf.int32))

    @compile_without_autograph(input_signature=[
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.string)])
    def translate_to(self, sources, target_languages):
        indices = self._language_table.lookup(target_languages)
        known = tf.debugging.Assert(tf.reduce_all(indices >= 0), [
            "target_languages: unknown language code in", target_languages,
            "; this model translates into", self.languages], summarize=20)
        with tf.control_dependencies([known]):
            indices = tf.identity(indices)
        return self._translate(sources, indices)


def export(translator, export_dir):
    """Writes `translator` as a SavedModel with its two signatures."""
    tf.saved_model.save(translator, export_dir, signatures={
        "translate": translator.translate,
        "translate_to": translator.translate_to})
