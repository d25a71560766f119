"""The embedded corpora the trainers default to: present, clean, aligned."""

import os

import pytest

from trainers import corpora


@pytest.mark.parametrize("name, records, first, last", [
    ("web", 37457, ("Genesis 1:1", "In the beginning, God"),
     "Revelation of John 22:21"),
    ("sparv", 31084, ("Genesis 1:1", "EN el principio crió Dios"),
     "Revelation of John 22:21"),
    ("austen", 31411, ("Sense and Sensibility 1:1",
                       "The family of Dashwood had long been settled"),
     "Persuasion 24:46"),
    ("tdavid", 90839, ("Psalm 1:1:1", "This Psalm may be regarded as THE "
                       "PREFACE PSALM"), "Psalm 150:1:221"),
])
def test_corpus_reads_whole_and_clean(name, records, first, last):
    rows = corpora.read_verses(name)
    assert len(rows) == records
    assert rows[0][0] == first[0] and rows[0][1].startswith(first[1])
    assert rows[-1][0] == last
    references = [reference for reference, _ in rows]
    assert len(set(references)) == len(references)
    for reference, text in rows:
        assert text and text == " ".join(text.split()), reference
        assert "<" not in text and "\t" not in text, reference
    # "A few MB at most" in the repository.
    assert os.path.getsize(corpora.corpus_path(name)) < 5 * 2**20


def test_parallel_verses_align_by_reference():
    pairs = corpora.parallel_verses("web", "sparv")
    assert len(pairs) == 31077
    by_reference = {reference: (en, es) for reference, en, es in pairs}
    en, es = by_reference["John 11:35"]
    assert en == "Jesus wept."
    assert "Jesús" in es


def test_unknown_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown corpus 'kjv'"):
        corpora.read_verses("kjv")


def test_sentence_splitter_keeps_abbreviations_and_initials():
    from trainers.corpora import build_english
    text = ('"Is it so?" said Mr. Darcy. "Yes!" It was 1. dull and 2. '
            'long, wrote C. H. Spurgeon. Selah.')
    assert build_english.split_sentences(text) == [
        '"Is it so?" said Mr. Darcy.', '"Yes!"',
        "It was 1. dull and 2. long, wrote C. H. Spurgeon.", "Selah."]
