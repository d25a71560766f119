"""Sentence pairs for the translation model: sources, tokenization, batches.

Sources (`config.data.source`) and the language codes they know:
    "embedded"  the verse-aligned World English Bible (en) and Reina-Valera
                1909 (es) shipped in trainers/corpora; every 50th verse
                pair is valid, every 50th from the 25th is test, the rest
                train.
    "text"      aligned plain-text files, one sentence per line
                (`config.data.{split}_{source,target}_path`, one pair).
    "wmt14"     tfds `wmt14_translate` (en with cs, de, fr, hi or ru; its
                validation split is newstest2013, test newstest2014).

`config.data.pairs` lists the directions ("en-es"); with more than one the
model is multilingual. Every source sentence starts with its target
language's token (`<2es>`), single-pair models included, so one model
format serves both.

Each example: `source = [<2xx>] + source pieces + [EOS]`, `inputs = [BOS] +
target pieces` (the decoder's), `targets = target pieces + [EOS]`. A pair
with an empty side is left out, and so is one with a side longer than
`config.data.max_len` pieces; `filter_counts` counts both, so nothing is
dropped silently.
"""

import tensorflow as tf

from trainers import corpora
from trainers.common import batching
from trainers.common import text

SOURCES = ("embedded", "text", "wmt14")
SPLITS = ("train", "valid", "test")
EMBEDDED_LANGUAGES = {"en": "web", "es": "sparv"}
WMT14_LANGUAGES = ("cs", "de", "fr", "hi", "ru")  # Each paired with en.
_EMBEDDED_PERIOD = 50


def language_token(language):
    """The reserved token that asks for a translation into `language`."""
    return f"<2{language}>"


def parse_pairs(data):
    """`[(source_language, target_language)]` of `config.data.pairs`,
    checked against what the source has."""
    pairs = []
    for pair in data.pairs:
        source, dash, target = str(pair).partition("-")
        if not dash or not source or not target or source == target:
            raise ValueError(f"config.data.pairs: {pair!r} is not a "
                             f"'source-target' pair of language codes.")
        for language in (source, target):
            if data.source == "embedded" and \
                    language not in EMBEDDED_LANGUAGES:
                raise ValueError(
                    f"config.data.pairs: unknown language code {language!r} "
                    f"in {pair!r}; the embedded corpus has "
                    f"{sorted(EMBEDDED_LANGUAGES)}.")
            if data.source == "wmt14" and language != "en" and \
                    language not in WMT14_LANGUAGES:
                raise ValueError(
                    f"config.data.pairs: unknown language code {language!r} "
                    f"in {pair!r}; wmt14 pairs en with one of "
                    f"{list(WMT14_LANGUAGES)}.")
        if data.source == "wmt14" and "en" not in (source, target):
            raise ValueError(f"config.data.pairs: wmt14 has no {pair!r}; "
                             "one side must be en.")
        pairs.append((source, target))
    if not pairs:
        raise ValueError("config.data.pairs is empty.")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"config.data.pairs repeats a pair: {data.pairs}.")
    if data.source == "text" and len(pairs) != 1:
        raise ValueError("config.data.pairs: source 'text' takes one pair "
                         f"(its files), got {len(pairs)}.")
    return pairs


def target_languages(data):
    """The target languages, in a fixed order (their tokens' order)."""
    return sorted({target for _, target in parse_pairs(data)})


def reserved_tokens(data):
    """The language tokens the vocabulary reserves after `RESERVED_TOKENS`."""
    return [language_token(language) for language in target_languages(data)]


def _count_lines(path):
    with tf.io.gfile.GFile(path, "rb") as f:
        return sum(1 for _ in f)


def _text_path(data, split, side):
    field = f"{split}_{side}_path"
    path = data[field]
    if not path:
        raise ValueError(f"config.data.{field} is empty: source 'text' needs "
                         "a file with one sentence per line.")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"config.data.{field}: no file at {path!r}.")
    if tf.io.gfile.stat(path).length == 0:
        raise ValueError(f"config.data.{field}: {path!r} is empty.")
    return path


def check_data_config(data):
    """Raises a clear error for a data config that cannot give aligned
    pairs, before anything is built (misaligned files included)."""
    if data.source not in SOURCES:
        raise ValueError(f"config.data.source must be one of {SOURCES}, got "
                         f"{data.source!r}.")
    parse_pairs(data)
    if data.source == "text":
        for split in SPLITS:
            source = _text_path(data, split, "source")
            target = _text_path(data, split, "target")
            source_lines, target_lines = _count_lines(source), _count_lines(
                target)
            if source_lines != target_lines:
                raise ValueError(
                    f"config.data.{split}_source_path and "
                    f"{split}_target_path are not aligned: {source!r} has "
                    f"{source_lines} lines, {target!r} has {target_lines}.")
    if data.max_len < 1:
        raise ValueError(f"config.data.max_len must be >= 1, got "
                         f"{data.max_len}.")
    if data.tokens_per_batch < data.max_len + 2:
        raise ValueError(
            f"config.data.tokens_per_batch ({data.tokens_per_batch}) must "
            f"hold one pair of config.data.max_len + 2 tokens a side "
            f"({data.max_len + 2}).")


def _embedded(source, target, split):
    pairs = corpora.parallel_verses(EMBEDDED_LANGUAGES[source],
                                    EMBEDDED_LANGUAGES[target])
    offset = {"valid": 0, "test": _EMBEDDED_PERIOD // 2}.get(split)
    if offset is None:
        chosen = [p for i, p in enumerate(pairs)
                  if i % _EMBEDDED_PERIOD not in (0, _EMBEDDED_PERIOD // 2)]
    else:
        chosen = pairs[offset::_EMBEDDED_PERIOD]
    return tf.data.Dataset.from_tensor_slices(
        ([s for _, s, _ in chosen], [t for _, _, t in chosen]))


def _wmt14(source, target, split, data_dir):
    import tensorflow_datasets as tfds  # Only this source needs it.
    other = source if target == "en" else target
    tfds_split = {"train": "train", "valid": "validation",
                  "test": "test"}[split]
    ds = tfds.load(f"wmt14_translate/{other}-en", split=tfds_split,
                   data_dir=data_dir or None, shuffle_files=False)
    return ds.map(lambda example: (example[source], example[target]))


def _pair_dataset(data, source, target, split):
    """`(source string, target string)` of one direction."""
    if data.source == "embedded":
        return _embedded(source, target, split)
    if data.source == "text":
        return tf.data.Dataset.zip((
            tf.data.TextLineDataset(_text_path(data, split, "source")),
            tf.data.TextLineDataset(_text_path(data, split, "target"))))
    return _wmt14(source, target, split, data.tfds_data_dir)


def sentence_pairs(data, split, repeat=False):
    """Dicts of `source`, `target` (raw strings) and `language` (the
    target language's index in `target_languages`), every direction of
    `config.data.pairs`; with `repeat`, endless and taking the directions
    in turn, otherwise one after another. Empty sides are kept (see
    `usable`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    languages = target_languages(data)
    directions = []
    for source, target in parse_pairs(data):
        index = languages.index(target)
        ds = _pair_dataset(data, source, target, split).map(
            lambda s, t, index=index: {"source": s, "target": t,
                                       "language": tf.constant(index)})
        directions.append(ds.repeat() if repeat else ds)
    if repeat:
        turns = tf.data.Dataset.range(len(directions)).repeat()
        return tf.data.Dataset.choose_from_datasets(directions, turns)
    ds = directions[0]
    for other in directions[1:]:
        ds = ds.concatenate(other)
    return ds


def vocabulary_sentences(data):
    """Training sentences of both sides (source, target, source, ...), at
    most `config.data.vocab_sentences` of them."""
    pairs = sentence_pairs(data, "train")
    both = pairs.flat_map(lambda pair: tf.data.Dataset.from_tensor_slices(
        tf.stack([pair["source"], pair["target"]])))
    return both.take(data.vocab_sentences)


def text_model(data, workdir):
    """The workdir's shared SentencePiece model (`text.model_for`, the
    language tokens reserved), serialized."""
    return text.model_for(workdir, vocabulary_sentences(data),
                          data.vocab_size, reserved_tokens(data))


def tokenized(ds, tokenizer, batch=256):
    """Pair dicts -> dicts with `source_pieces`, `target_pieces` ([n] int32)
    and the raw strings."""
    def tokenize(pairs):
        source, _ = tokenizer.tokenize(pairs["source"])
        target, _ = tokenizer.tokenize(pairs["target"])
        return dict(pairs, source_pieces=source, target_pieces=target)
    return ds.batch(batch).map(tokenize).unbatch()


def _is_empty(pair):
    return (tf.equal(tf.size(pair["source_pieces"]), 0)
            | tf.equal(tf.size(pair["target_pieces"]), 0))


def _is_too_long(pair, max_len):
    return ((tf.size(pair["source_pieces"]) > max_len)
            | (tf.size(pair["target_pieces"]) > max_len))


def usable(max_len):
    """The filter of pairs the model trains and is evaluated on."""
    return lambda pair: ~_is_empty(pair) & ~_is_too_long(pair, max_len)


def filter_counts(pairs, max_len):
    """`{"pairs", "empty", "too_long"}` over a finite dataset of tokenized
    pairs: all of them, those with an empty side, and those left out for a
    side over `max_len` pieces."""
    def count(totals, pair):
        empty = _is_empty(pair)
        too_long = ~empty & _is_too_long(pair, max_len)
        return totals + tf.cast(tf.stack([True, empty, too_long]), tf.int64)
    totals = pairs.reduce(tf.zeros([3], tf.int64), count).numpy()
    return dict(zip(("pairs", "empty", "too_long"), map(int, totals)))


def to_example(first_tag_id):
    """A tokenized pair -> the model's `source`, `inputs`, `targets`."""
    def convert(pair):
        tag = tf.cast(first_tag_id + pair["language"], tf.int32)
        return {
            "source": tf.concat([[tag], pair["source_pieces"],
                                 [text.EOS_ID]], 0),
            "inputs": tf.concat([[text.BOS_ID], pair["target_pieces"]], 0),
            "targets": tf.concat([pair["target_pieces"], [text.EOS_ID]], 0)}
    return convert


def token_batches(examples, tokens_per_batch, max_len, multiple=1):
    """Bucketed batches of about `tokens_per_batch` tokens on the longer
    side (padding included), sizes a multiple of `multiple`."""
    return batching.token_batches(
        examples, lambda example: tf.maximum(tf.size(example["source"]),
                                             tf.size(example["targets"])),
        tokens_per_batch, max_len + 2,
        {"source": [None], "inputs": [None], "targets": [None]}, multiple)


def train_batches(data, tokenizer, first_tag_id, seed, multiple=1):
    """The endless, shuffled training batches (checkpointable iterator)."""
    ds = sentence_pairs(data, "train", repeat=True).shuffle(
        data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = tokenized(ds, tokenizer).filter(usable(data.max_len))
    ds = token_batches(ds.map(to_example(first_tag_id)),
                       data.tokens_per_batch, data.max_len, multiple)
    return batching.checkpointable(ds.prefetch(2))


def eval_pairs(data, tokenizer, split):
    """`(pairs, counts)`: the usable tokenized pairs of `split` in order,
    and `filter_counts` of the split."""
    ds = tokenized(sentence_pairs(data, split), tokenizer)
    return ds.filter(usable(data.max_len)), filter_counts(ds, data.max_len)


def eval_batches(pairs, data, first_tag_id, multiple=1):
    """Token batches of `eval_pairs`' pairs, for perplexity."""
    examples = pairs.map(to_example(first_tag_id))
    return batching.checkpointable(token_batches(
        examples, data.tokens_per_batch, data.max_len, multiple).prefetch(2))
