"""Subword text for the trainers: a SentencePiece model and its tokenizer.

The model is learned from training text with the `sentencepiece` package (a
unigram model) and saved as its serialized proto. The tokenizer is
tensorflow-text's `SentencepieceTokenizer`, so the same ops run in the
tf.data pipeline and inside an exported SavedModel (which then needs
`import tensorflow_text` for its ops, and nothing else).

The text is reversible: `detokenize(tokenize(s)) == s` for any string
without U+FFFF (see `_NORMALIZATION_RULES`). The model keeps case, accents
and every space (no Unicode normalization, no collapsing of runs of
spaces), and a character it has no piece for is spelled in UTF-8 byte
pieces (byte fallback) rather than lost to `[UNK]`.

Words, the per-word perplexity's denominator, are counted as the 1 Billion
Word benchmark's text is tokenized (and as BERT's basic tokenizer splits):
runs of other characters between whitespace, with each punctuation mark a
word of its own.
"""

import io
import os
import tempfile

import sentencepiece
import tensorflow as tf
import tensorflow_text as tf_text

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
RESERVED_TOKENS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(RESERVED_TOKENS))
BYTE_PIECES = 256  # One per byte value, for byte fallback.
MODEL_FILE = "sentencepiece.model"
_WORDPIECE_FILE = "vocab.txt"  # What workdirs before SentencePiece hold.

# The model's one normalization rule: U+FFFF, a noncharacter that Unicode
# keeps out of interchange, becomes U+FFFD. Any rule would do; with none
# (SentencePiece's "identity"), tensorflow-text's tokenizer logs
# "precompiled_charsmap is empty" to stderr each time it loads the model.
_NORMALIZATION_RULES = "FFFF\tFFFD\n"

# What the model sees in front of every non-empty sentence, so that its
# first word is tokenized as the words after a space are. SentencePiece's
# own `add_dummy_prefix` does the same, but tensorflow-text's decoder then
# drops all of a sentence's leading spaces, not just the one it added; the
# tokenizer adds and removes its own.
_PREFIX = " "

# ASCII punctuation and symbols, and Unicode punctuation: each is a word.
_PUNCTUATION = r"[!-/:-@\[-`{-~]|\pP"


def minimum_vocab_size(extra_reserved=()):
    """The smallest `vocab_size` that leaves room for learned pieces: the
    reserved tokens, the byte pieces and one more."""
    return len(RESERVED_TOKENS) + len(extra_reserved) + BYTE_PIECES + 1


def learn_model(sentences, vocab_size, extra_reserved=()):
    """Learns a SentencePiece unigram model from a dataset of strings.

    Args:
        sentences: a `tf.data.Dataset` of scalar strings.
        vocab_size: the target size; a small corpus may give fewer pieces.
        extra_reserved: more reserved tokens (e.g. target-language tags),
            ids right after `RESERVED_TOKENS`. They are control symbols:
            text never tokenizes to them, and detokenizing drops them.
    Returns:
        The serialized model proto (bytes).
    """
    if vocab_size < minimum_vocab_size(extra_reserved):
        raise ValueError(
            f"vocab_size must be at least {minimum_vocab_size(extra_reserved)}"
            f" ({len(RESERVED_TOKENS) + len(extra_reserved)} reserved tokens, "
            f"{BYTE_PIECES} byte pieces and one learned piece), got "
            f"{vocab_size}.")
    model = io.BytesIO()
    rules = tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False)
    try:
        rules.write(_NORMALIZATION_RULES)
        rules.close()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_prefixed_lines(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            control_symbols=list(extra_reserved),
            byte_fallback=True,
            # Reversible: no normalization but `_NORMALIZATION_RULES`,
            # every space kept. The dummy prefix is added by the tokenizer
            # itself (see `_PREFIX`).
            normalization_rule_tsv=rules.name,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            hard_vocab_limit=False,
            num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as error:
        raise ValueError(f"SentencePiece could not learn a model of "
                         f"vocab_size={vocab_size}: {error}") from error
    finally:
        os.remove(rules.name)
    return model.getvalue()


def _prefixed_lines(sentences):
    """The dataset's strings, decoded and `_PREFIX`ed, in order; read in
    batches (one element at a time, tf.data costs 4x the time here)."""
    for batch in sentences.batch(4096).as_numpy_iterator():
        for sentence in batch:
            yield _PREFIX + sentence.decode("utf-8")


def save_model(model_proto, path):
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(model_proto)


def load_model(path):
    with tf.io.gfile.GFile(path, "rb") as f:
        model_proto = f.read()
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_proto)
    except RuntimeError as error:
        raise ValueError(f"{path} is not a SentencePiece model: "
                         f"{error}") from error
    pieces = [processor.IdToPiece(i) for i in range(len(RESERVED_TOKENS))]
    if pieces != list(RESERVED_TOKENS):
        raise ValueError(
            f"{path} is not a tf_moe text model: its first pieces must be "
            f"{RESERVED_TOKENS}, got {pieces}.")
    return model_proto


def model_for(workdir, sentences, vocab_size, extra_reserved=()):
    """The workdir's `sentencepiece.model`, learned from `sentences` on the
    first run.

    Learning is deterministic, but a resumed run must tokenize exactly as
    the run that wrote its checkpoints did, so the file is the source of
    truth once written.
    """
    path = os.path.join(workdir, MODEL_FILE)
    if tf.io.gfile.exists(path):
        return load_model(path)
    if tf.io.gfile.exists(os.path.join(workdir, _WORDPIECE_FILE)):
        raise ValueError(
            f"{workdir} holds a WordPiece vocabulary ({_WORDPIECE_FILE}) of "
            f"an earlier tf_moe, whose checkpoints this version cannot "
            f"tokenize for; start a new workdir.")
    model_proto = learn_model(sentences, vocab_size, extra_reserved)
    tf.io.gfile.makedirs(workdir)
    save_model(model_proto, path)
    return model_proto


def count_words(sentences):
    """`[batch]` strings -> `[batch]` int32 words (whitespace-separated
    runs, each punctuation mark a word)."""
    words = tf_text.regex_split(sentences, r"\s+|" + _PUNCTUATION,
                                _PUNCTUATION)
    return tf.cast(words.row_lengths(), tf.int32)


class Tokenizer(tf.Module):
    """Raw strings to subword ids and back, all TensorFlow ops.

    Args:
        model_proto: a serialized SentencePiece model (`learn_model`).
    Attributes:
        vocab_size: the model's pieces.
        num_reserved: the reserved tokens at the vocabulary's start
            (`RESERVED_TOKENS` and any extra), which `detokenize` drops.
    """

    def __init__(self, model_proto, name=None):
        super().__init__(name=name)
        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(model_proto)
        self._processor = processor
        self.vocab_size = processor.GetPieceSize()
        self.num_reserved = len(RESERVED_TOKENS)
        while processor.IsControl(self.num_reserved):
            self.num_reserved += 1
        self._model_proto = model_proto

    def _sentencepiece(self):
        """tensorflow-text's tokenizer, made anew in each graph and eager
        call. Its model is a resource owned by the kernel that created it,
        and `tf.random.set_seed` (which Keras's `set_random_seed` calls)
        clears eager kernels: a tokenizer made once would lose its model.
        Made per graph, the kernel lives with the graph; in eager, the
        cached kernel is found again, or made anew after a clear."""
        return tf_text.SentencepieceTokenizer(model=self._model_proto,
                                              out_type=tf.int32)

    def piece_id(self, piece):
        """The id of `piece` (a reserved token, say); KeyError if the model
        has none."""
        piece_id = self._processor.PieceToId(piece)
        if self._processor.IdToPiece(piece_id) != piece:
            raise KeyError(f"the text model has no piece {piece!r}.")
        return piece_id

    def tokenize(self, sentences):
        """`[batch]` strings -> ids `[batch, (pieces)]` int32 (ragged) and
        words `[batch]` int32 (`count_words`)."""
        # The empty string stays empty: no ids, not a lone space's.
        prefixed = tf.where(tf.strings.length(sentences) > 0,
                            tf.strings.join([_PREFIX, sentences]),
                            sentences)
        return (self._sentencepiece().tokenize(prefixed),
                count_words(sentences))

    def detokenize(self, ids):
        """ids `[batch, length]` (dense, or ragged) -> `[batch]` strings.

        Reserved tokens (padding, ends of sentence, language tags) are
        dropped."""
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(ids)
        ids = tf.ragged.boolean_mask(ids, ids >= self.num_reserved)
        prefixed = self._sentencepiece().detokenize(ids)
        return tf.strings.regex_replace(prefixed, "^" + _PREFIX, "")
