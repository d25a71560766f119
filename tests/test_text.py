"""The trainers' subword text: SentencePiece learning, reversible
tokenization, word counts and reserved tokens."""

import numpy as np
import pytest
import tensorflow as tf

from trainers import corpora
from trainers.common import text

# Strings a translation model must give back as they were written.
HARD_STRINGS = [
    "L'utilisateur a dit : valeur manquante dans l'attribut >",
    "L’utilisateur n’a pas répondu.",
    "Café, naïve, año, Straße, Ærø, façade.",
    "Missing value in attribute %s of %<target()%>.",
    "Two  spaces, three   spaces,\tand a tab.",
    "  leading and trailing spaces  ",
    "¿Qué? ¡Sí! «Oui», „Ja“ — 42.5%, 1,000,000 & <b>x</b>",
    "日本語のテキスト, emoji 🙂.",
    "Unnormalized: ﬁ ½ Ａ e\u0301 \u00a0.",  # NFKC would change each.
    " ",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A model learned from the first verses of both embedded corpora,
    with two language tags reserved."""
    verses = [verse for name in ("web", "sparv")
              for _, verse in corpora.read_verses(name)[:2000]]
    model = text.learn_model(tf.data.Dataset.from_tensor_slices(verses),
                             vocab_size=1000,
                             extra_reserved=("<2en>", "<2es>"))
    return text.Tokenizer(model)


def _round_trip(tokenizer, strings):
    ids, _ = tokenizer.tokenize(tf.constant(strings))
    return [s.decode("utf-8") for s in tokenizer.detokenize(ids).numpy()]


@pytest.mark.parametrize("corpus", ["web", "sparv"])
def test_every_verse_of_the_embedded_corpora_round_trips(tokenizer, corpus):
    verses = [verse for _, verse in corpora.read_verses(corpus)]
    ds = tf.data.Dataset.from_tensor_slices(verses).batch(4096)
    back = []
    for batch in ds:
        ids, _ = tokenizer.tokenize(batch)
        back.extend(s.decode("utf-8")
                    for s in tokenizer.detokenize(ids).numpy())
    mismatched = [(v, b) for v, b in zip(verses, back) if v != b]
    assert not mismatched, mismatched[:3]


def test_apostrophes_accents_placeholders_and_spaces_round_trip(tokenizer):
    assert _round_trip(tokenizer, HARD_STRINGS) == HARD_STRINGS


def test_the_empty_string_has_no_ids(tokenizer):
    ids, words = tokenizer.tokenize(tf.constant(["", " "]))
    assert ids.row_lengths().numpy().tolist()[0] == 0
    assert words.numpy().tolist() == [0, 0]


def test_unseen_characters_are_spelled_in_bytes_not_lost(tokenizer):
    ids, _ = tokenizer.tokenize(tf.constant(["🙂"]))
    assert ids.row_lengths().numpy().tolist() == [5]  # The space, 4 bytes.
    assert text.UNK_ID not in ids.flat_values.numpy()


def test_words_are_counted_as_one_billion_word_splits_them():
    words = text.count_words(tf.constant([
        "In the beginning, God created.",  # in the beginning , god created .
        "L'utilisateur a dit: « valeur »",  # L ' utilisateur a dit : « valeur »
        "  two   words ",
        "%<target()%>",  # % < target ( ) % >
        "",
    ]))
    assert words.numpy().tolist() == [7, 9, 2, 7, 0]


def test_reserved_tokens_come_first_and_are_never_read_from_text(
        tokenizer):
    assert [tokenizer.piece_id(t) for t in text.RESERVED_TOKENS] == [
        text.PAD_ID, text.UNK_ID, text.BOS_ID, text.EOS_ID]
    assert [tokenizer.piece_id("<2en>"), tokenizer.piece_id("<2es>")] == [
        4, 5]
    assert tokenizer.num_reserved == 6
    with pytest.raises(KeyError, match="no piece '<2fr>'"):
        tokenizer.piece_id("<2fr>")
    ids, _ = tokenizer.tokenize(tf.constant(["<2es> [EOS] [PAD]"]))
    assert ids.flat_values.numpy().min() >= tokenizer.num_reserved
    # Tags, BOS, EOS and padding are dropped, dense or ragged.
    pieces, _ = tokenizer.tokenize(tf.constant(["Amen."]))
    row = pieces[0].numpy().tolist()
    padded = tf.constant([[5, text.BOS_ID] + row + [text.EOS_ID, 0, 0]])
    assert tokenizer.detokenize(padded).numpy().tolist() == [b"Amen."]


def test_ids_are_in_the_vocabulary(tokenizer):
    ids, _ = tokenizer.tokenize(tf.constant(HARD_STRINGS))
    assert 0 <= int(tf.reduce_min(ids.flat_values))
    assert int(tf.reduce_max(ids.flat_values)) < tokenizer.vocab_size
    assert tokenizer.vocab_size <= 1000


def test_the_model_is_learned_once_and_kept(tmp_path):
    sentences = tf.data.Dataset.from_tensor_slices(
        [verse for _, verse in corpora.read_verses("web")[:300]])
    first = text.model_for(str(tmp_path), sentences, 400)
    assert (tmp_path / text.MODEL_FILE).read_bytes() == first
    # A later run reads the saved file, whatever its config now says.
    assert text.model_for(str(tmp_path), sentences.take(10), 300) == first


def test_a_wordpiece_workdir_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[BOS]\n[EOS]\n")
    with pytest.raises(ValueError, match="WordPiece vocabulary.*new workdir"):
        text.model_for(str(tmp_path), tf.data.Dataset.from_tensor_slices(
            ["a"]), 400)


def test_a_file_that_is_no_model_is_refused(tmp_path):
    (tmp_path / text.MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        text.model_for(str(tmp_path), None, 400)


@pytest.mark.parametrize("extra, smallest", [((), 261), (("<2es>",), 262)])
def test_a_vocabulary_with_no_room_for_pieces_is_refused(extra, smallest):
    assert text.minimum_vocab_size(extra) == smallest
    with pytest.raises(ValueError, match=f"vocab_size must be at least "
                       f"{smallest}.*256 byte pieces.*got {smallest - 1}"):
        text.learn_model(tf.data.Dataset.from_tensor_slices(["a b"]),
                         smallest - 1, extra)


def test_tokenizer_runs_in_a_traced_function(tokenizer):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def round_trip(sentences):
        ids, words = tokenizer.tokenize(sentences)
        return tokenizer.detokenize(ids), words

    back, words = round_trip(tf.constant(HARD_STRINGS[:3]))
    assert [s.decode() for s in back.numpy()] == HARD_STRINGS[:3]
    np.testing.assert_array_equal(
        words, text.count_words(tf.constant(HARD_STRINGS[:3])))


def test_tokenizer_survives_a_seed_reset(tokenizer):
    """`tf.random.set_seed` clears TensorFlow's eager kernels, which own
    SentencePiece's model resource; the trainers reset the seed after
    making the tokenizer."""
    dataset = tf.data.Dataset.from_tensor_slices(HARD_STRINGS[:2]).batch(2)
    tokenized = dataset.map(lambda s: tokenizer.tokenize(s)[0])
    tf.random.set_seed(7)
    expected = _round_trip(tokenizer, HARD_STRINGS[:2])
    assert expected == HARD_STRINGS[:2]
    ids = next(iter(tokenized))
    assert [s.decode() for s in tokenizer.detokenize(ids).numpy()] == \
        HARD_STRINGS[:2]


def test_loading_the_model_logs_nothing(tokenizer, capfd):
    """Each graph that tokenizes loads the model in C++; SentencePiece
    logs there unless the model has a normalization rule."""
    @tf.function
    def tokenize(sentences):
        return tokenizer.tokenize(sentences)[0].flat_values

    tokenize(tf.constant(["Amen."]))
    assert "precompiled_charsmap" not in capfd.readouterr().err
