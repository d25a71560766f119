"""Sentences for the language model: sources, tokenization, token batches.

Sources (`config.data.source`):
    "embedded"  the corpora shipped in trainers/corpora named by
                `config.data.corpora` (default the World English Bible
                alone), one verse or sentence a record; of each corpus every
                50th record is valid, every 50th from the 25th is test, the
                rest train. Several corpora are interleaved evenly, in a
                fixed order, so that every stretch of an epoch (and of the
                shuffle buffer) mixes them in proportion.
    "text"      plain text files, one sentence per line
                (`config.data.{train,valid,test}_path`).
    "lm1b"      tfds `lm1b` (1 Billion Word); its test split is halved into
                valid and test, as the builder has no validation split.

Each example is one sentence: `inputs = [BOS] + pieces`, `targets = pieces
+ [EOS]`, and the number of words it holds (its words plus the end of
sentence, the per-word perplexity's denominator). Sentences longer than
`config.data.max_len` pieces are filtered out (eval counts them); empty
lines are dropped.
"""

import tensorflow as tf

from trainers import corpora
from trainers.common import batching
from trainers.common import text

SOURCES = ("embedded", "text", "lm1b")
SPLITS = ("train", "valid", "test")
_EMBEDDED_PERIOD = 50


def _split_records(records, split):
    """`split`'s share of one corpus's records (the module docstring)."""
    offset = {"valid": 0, "test": _EMBEDDED_PERIOD // 2}.get(split)
    if offset is None:
        return [r for i, r in enumerate(records)
                if i % _EMBEDDED_PERIOD not in (0, _EMBEDDED_PERIOD // 2)]
    return records[offset::_EMBEDDED_PERIOD]


def interleave_evenly(lists):
    """The items of `lists` merged so that each list's items are spread
    evenly through the result, each list's order kept: item i of a list of
    n sits at fraction (i + 1/2) / n (ties broken by list order)."""
    keyed = [((i + 0.5) / len(items), which, item)
             for which, items in enumerate(lists)
             for i, item in enumerate(items)]
    return [item for _, _, item in sorted(keyed, key=lambda k: k[:2])]


def _embedded_split(names, split):
    chosen = interleave_evenly([
        _split_records([text for _, text in corpora.read_verses(name)],
                       split)
        for name in names])
    return tf.data.Dataset.from_tensor_slices(chosen)


def _text_file(path, field):
    if not path:
        raise ValueError(f"config.data.{field} is empty: source 'text' needs "
                         "a file with one sentence per line.")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"config.data.{field}: no file at {path!r}.")
    if tf.io.gfile.stat(path).length == 0:
        raise ValueError(f"config.data.{field}: {path!r} is empty.")
    return tf.data.TextLineDataset(path)


def _lm1b(split, data_dir):
    import tensorflow_datasets as tfds  # Only this source needs it.
    tfds_split = {"train": "train", "valid": "test[:50%]",
                  "test": "test[50%:]"}[split]
    ds = tfds.load("lm1b", split=tfds_split, data_dir=data_dir or None,
                   shuffle_files=False)
    return ds.map(lambda example: example["text"])


def check_data_config(data):
    """Raises a clear error for a data config that cannot give sentences,
    before anything is built."""
    if data.source not in SOURCES:
        raise ValueError(f"config.data.source must be one of {SOURCES}, got "
                         f"{data.source!r}.")
    if data.source == "embedded":
        names = tuple(data.corpora)
        unknown = [name for name in names if name not in corpora.CORPORA]
        if not names or unknown or len(set(names)) < len(names):
            raise ValueError(
                "config.data.corpora must name distinct embedded corpora of "
                f"{corpora.CORPORA}, got {names!r}.")
    if data.source == "text":
        for split in SPLITS:
            _text_file(data[f"{split}_path"], f"{split}_path")
    if data.max_len < 2:
        raise ValueError(
            f"config.data.max_len must be >= 2, got {data.max_len}.")
    if data.tokens_per_batch < data.max_len + 1:
        raise ValueError(
            f"config.data.tokens_per_batch ({data.tokens_per_batch}) must "
            f"hold one sentence of config.data.max_len + 1 tokens "
            f"({data.max_len + 1}).")


def sentences(data, split):
    """A dataset of raw sentence strings of `split` ('train', ...)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if data.source == "embedded":
        ds = _embedded_split(data.corpora, split)
    elif data.source == "text":
        ds = _text_file(data[f"{split}_path"], f"{split}_path")
    else:
        ds = _lm1b(split, data.tfds_data_dir)
    return ds.filter(lambda s: tf.strings.length(tf.strings.strip(s)) > 0)


def tokenized(ds, tokenizer, batch=256):
    """Strings -> dicts of `pieces` `[n]` int32 and `words` scalar int32
    (`words` includes the end of sentence)."""
    def tokenize(lines):
        ids, words = tokenizer.tokenize(lines)
        return {"pieces": ids, "words": words + 1}
    return ds.batch(batch).map(tokenize).unbatch()


def to_example(sentence):
    pieces = sentence["pieces"]
    return {"inputs": tf.concat([[text.BOS_ID], pieces], 0),
            "targets": tf.concat([pieces, [text.EOS_ID]], 0),
            "words": sentence["words"]}


def fits(max_len):
    return lambda sentence: tf.size(sentence["pieces"]) <= max_len


def token_batches(examples, tokens_per_batch, max_len, multiple=1):
    """Bucketed batches of about `tokens_per_batch` tokens each (padding
    included), sizes a multiple of `multiple` (the replicas)."""
    return batching.token_batches(
        examples, lambda example: tf.size(example["inputs"]),
        tokens_per_batch, max_len + 1,
        {"inputs": [None], "targets": [None], "words": []}, multiple)


def train_batches(data, tokenizer, seed, multiple=1):
    """The endless, shuffled training batches (checkpointable iterator)."""
    ds = sentences(data, "train").shuffle(
        data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = tokenized(ds.repeat(), tokenizer).filter(fits(data.max_len))
    ds = token_batches(ds.map(to_example), data.tokens_per_batch,
                       data.max_len, multiple)
    return batching.checkpointable(ds.prefetch(2))


def eval_batches(data, tokenizer, split, multiple=1, max_sentences=None):
    """`(batches, too_long)`: one pass over `split` in order (its first
    `max_sentences` only, if given), and the number of its sentences
    longer than `max_len` (left out)."""
    ds = sentences(data, split)
    if max_sentences is not None:
        ds = ds.take(max_sentences)
    ds = tokenized(ds, tokenizer)
    too_long = ds.reduce(tf.constant(0, tf.int64), lambda n, s: n + tf.cast(
        tf.size(s["pieces"]) > data.max_len, tf.int64))
    ds = token_batches(ds.filter(fits(data.max_len)).map(to_example),
                       data.tokens_per_batch, data.max_len, multiple)
    return batching.checkpointable(ds.prefetch(2)), int(too_long)


def vocabulary_sentences(data):
    """The training sentences the text model is learned from (at most
    `config.data.vocab_sentences` of them)."""
    return sentences(data, "train").take(data.vocab_sentences)


def text_model(data, workdir):
    """The workdir's SentencePiece model (`text.model_for`), serialized."""
    return text.model_for(workdir, vocabulary_sentences(data),
                          data.vocab_size)
