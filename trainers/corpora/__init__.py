"""Embedded public-domain corpora for the trainers' default runs.

`web`: the World English Bible with Deuterocanon (English, 37,457 verses).
`sparv`: the Reina-Valera 1909 (Spanish, 31,084 verses).
`austen`: Jane Austen's six novels (English, 31,411 sentences, 716,788
    words).
`tdavid`: Spurgeon's The Treasury of David (English, 90,839 sentences,
    2,109,631 words).
One verse or sentence per record, keyed by its reference ("Genesis 1:1",
"Emma 12:3", "Psalm 23:1:40"); the two Bibles are verse-aligned where their
versifications agree. Provenance and licences: PROVENANCE.md; rebuilt from
Debian packages by build_bible.py and build_english.py.
"""

import gzip
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

CORPORA = ("web", "sparv", "austen", "tdavid")


def corpus_path(name):
    """The path of an embedded corpus file (`<name>.tsv.gz`)."""
    if name not in CORPORA:
        raise ValueError(
            f"Unknown corpus {name!r}: the embedded corpora are {CORPORA}.")
    return os.path.join(_HERE, f"{name}.tsv.gz")


def read_verses(name):
    """`[(reference, text)]`, in the corpus's order (canonical book order;
    the novels' and psalms' order)."""
    with gzip.open(corpus_path(name), "rt", encoding="utf-8") as lines:
        return [tuple(line.rstrip("\n").split("\t")) for line in lines]


def parallel_verses(source, target):
    """Verses present in both corpora: `[(reference, source, target)]`.

    In the source corpus's order. References that only one corpus has (its
    versification or canon differs) are left out; their count is
    `len(read_verses(source)) - len(result)` on the source side.
    """
    target_text = dict(read_verses(target))
    return [(reference, text, target_text[reference])
            for reference, text in read_verses(source)
            if reference in target_text]
