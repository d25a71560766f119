"""The embedded corpora the trainers default to: present, clean, aligned."""

import os

import pytest

from trainers import corpora


@pytest.mark.parametrize("name, verses, first", [
    ("web", 37457, "In the beginning, God"),
    ("sparv", 31084, "EN el principio crió Dios"),
])
def test_corpus_reads_whole_and_clean(name, verses, first):
    rows = corpora.read_verses(name)
    assert len(rows) == verses
    assert rows[0][0] == "Genesis 1:1" and rows[0][1].startswith(first)
    assert rows[-1][0] == "Revelation of John 22:21"
    references = [reference for reference, _ in rows]
    assert len(set(references)) == len(references)
    for reference, text in rows:
        assert text and text == " ".join(text.split()), reference
        assert "<" not in text and "\t" not in text, reference
    # "A few MB at most" in the repository.
    assert os.path.getsize(corpora.corpus_path(name)) < 3 * 2**20


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
