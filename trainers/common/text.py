"""Subword text for the trainers: a WordPiece vocabulary and its tokenizer.

The vocabulary is learned from training text with tensorflow-text's own
learner (`bert_vocab_from_dataset`) and saved one piece per line. The
tokenizer is tensorflow-text's `BertTokenizer` over an in-graph table, so the
same ops run in the tf.data pipeline and inside an exported SavedModel (which
then needs `import tensorflow_text` for its ops, and nothing else).

Words are what BERT's basic tokenizer splits on (whitespace and punctuation,
as the 1 Billion Word benchmark is tokenized); per-word perplexity counts
them, plus one end of sentence per sentence.
"""

import os

import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
RESERVED_TOKENS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(RESERVED_TOKENS))
_SUFFIX = "##"


def learn_vocabulary(sentences, vocab_size, extra_reserved=(),
                     lower_case=True):
    """Learns a WordPiece vocabulary from a dataset of strings.

    Args:
        sentences: a `tf.data.Dataset` of scalar strings.
        vocab_size: the target size; the learner may return fewer pieces.
        extra_reserved: more reserved tokens (e.g. target-language tags),
            placed after `RESERVED_TOKENS`.
        lower_case: lower-case (and strip accents, as BERT's tokenizer
            does) first; a translation model's output keeps both.
    Returns:
        The pieces, reserved tokens first (`[PAD]` has id 0).
    """
    reserved = list(RESERVED_TOKENS) + list(extra_reserved)
    return bert_vocab_from_dataset.bert_vocab_from_dataset(
        sentences.batch(1024).prefetch(2),
        vocab_size=vocab_size,
        reserved_tokens=reserved,
        bert_tokenizer_params=dict(lower_case=lower_case),
        learn_params={})


def save_vocabulary(pieces, path):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(piece + "\n" for piece in pieces))


def load_vocabulary(path):
    with tf.io.gfile.GFile(path) as f:
        pieces = f.read().splitlines()
    if list(pieces[:len(RESERVED_TOKENS)]) != list(RESERVED_TOKENS):
        raise ValueError(
            f"{path} is not a tf_moe vocabulary: it must start with "
            f"{RESERVED_TOKENS}, got {pieces[:len(RESERVED_TOKENS)]}.")
    return pieces


def vocabulary_for(workdir, sentences, vocab_size, extra_reserved=(),
                   lower_case=True):
    """The workdir's `vocab.txt`, learned from `sentences` on the first run.

    Learning is deterministic, but a resumed run must tokenize exactly as
    the run that wrote its checkpoints did, so the file is the source of
    truth once written.
    """
    path = os.path.join(workdir, "vocab.txt")
    if tf.io.gfile.exists(path):
        return load_vocabulary(path)
    pieces = learn_vocabulary(sentences, vocab_size, extra_reserved,
                              lower_case)
    tf.io.gfile.makedirs(workdir)
    save_vocabulary(pieces, path)
    return pieces


class Tokenizer(tf.Module):
    """Raw strings to WordPiece ids and back, all TensorFlow ops.

    Args:
        pieces: the vocabulary (`RESERVED_TOKENS` first).
        lower_case: as the vocabulary was learned.
        num_reserved: the reserved tokens at the vocabulary's start
            (`RESERVED_TOKENS` and any extra), which `detokenize` drops.
    """

    def __init__(self, pieces, lower_case=True,
                 num_reserved=len(RESERVED_TOKENS), name=None):
        super().__init__(name=name)
        self.pieces = tf.constant(list(pieces))
        self.vocab_size = len(pieces)
        self.num_reserved = num_reserved
        table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(
                self.pieces, tf.range(self.vocab_size, dtype=tf.int64)),
            num_oov_buckets=1)
        self._table = table
        self._bert = tf_text.BertTokenizer(
            table, suffix_indicator=_SUFFIX, unknown_token=UNK,
            lower_case=lower_case, token_out_type=tf.int64)

    def tokenize(self, sentences):
        """`[batch]` strings -> ids `[batch, (pieces)]` int32 (ragged) and
        words `[batch]` int32 (whitespace- and punctuation-split words)."""
        by_word = self._bert.tokenize(sentences)  # [batch, (words), (pieces)]
        ids = tf.cast(by_word.merge_dims(-2, -1), tf.int32)
        # An out-of-vocabulary piece lands in the one OOV bucket.
        ids = tf.ragged.map_flat_values(
            lambda flat: tf.where(flat >= self.vocab_size, UNK_ID, flat), ids)
        return ids, tf.cast(by_word.row_lengths(axis=1), tf.int32)

    def detokenize(self, ids):
        """ids `[batch, length]` (dense, or ragged) -> `[batch]` strings.

        Reserved tokens are dropped; pieces are joined into words ("##"
        continues a word) and words by single spaces.
        """
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(ids)
        ids = tf.ragged.boolean_mask(ids, ids >= self.num_reserved)
        pieces = tf.gather(self.pieces, ids)
        joined = tf.strings.reduce_join(pieces, axis=-1, separator=" ")
        return tf.strings.regex_replace(joined, " " + _SUFFIX, "")
