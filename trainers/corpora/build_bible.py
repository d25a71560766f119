"""Rebuilds the embedded Bible corpora from Debian's SWORD packages.

    apt-get install diatheke sword-text-web sword-text-sparv
    python -m trainers.corpora.build_bible

Writes `trainers/corpora/<name>.tsv.gz`, one verse per line,
`reference<TAB>text` (e.g. `Genesis 1:1<TAB>In the beginning, ...`), for:
- `web`: the World English Bible with Deuterocanon (module engWEB2015eb,
  Debian package sword-text-web), English, public domain;
- `sparv`: the Reina-Valera 1909 (module spaRV1909eb, Debian package
  sword-text-sparv), Spanish, public domain.
See PROVENANCE.md beside this file. The text is the modules' own, as
diatheke renders it in plain form; the only changes are whitespace (runs of
spaces and line breaks within a verse become one space) and the removal of
headings (psalm superscriptions, which diatheke also repeats where they do
not belong: `_drop_headings`), the few non-verse notes the modules attach
after a verse (`_verse_text`) and markup that leaks through diatheke
(`_LEAKED_TAG`). The output is deterministic (gzip without a timestamp).
"""

import collections
import gzip
import os
import re
import subprocess

from absl import app

_HERE = os.path.dirname(os.path.abspath(__file__))

MODULES = {"web": "engWEB2015eb", "sparv": "spaRV1909eb"}
# Every verse from Genesis to Revelation, in the module's versification
# (the deuterocanonical books of the WEB come in their canonical places).
_WHOLE_BIBLE = "Gen 1:1-Rev 22:21"
_VERSE_START = re.compile(
    r"^\s*(?P<reference>[A-Z][A-Za-z ()]*? \d+:\d+): (?P<text>.*)$")
# diatheke's plain rendering lets a few OSIS elements through (the heading
# of the WEB's Additional Psalm, repeated before later books' first verse):
# headings go with their text, other tags alone.
_LEAKED_HEADING = re.compile(r"<title\b[^>]*>.*?</title>")
_LEAKED_TAG = re.compile(r"<[^>]+>")


def _verse_text(lines):
    """One verse's text from its rendered lines.

    Two blank lines in a row end the verse (one separates the poetry and
    prose parts of a verse): what the modules put after them is not
    scripture (the WEB appends its glossary to Revelation 22:21).
    """
    kept, blank_run = [], 0
    for line in lines:
        blank_run = blank_run + 1 if not line.strip() else 0
        if blank_run == 2:
            break
        kept.append(line)
    return " ".join(" ".join(kept).split())


def _drop_headings(lines):
    """Leaves out heading lines (psalm superscriptions).

    diatheke renders a heading on its own line just before a verse's
    first line, and repeats the last heading it saw before every verse
    after it, even in later books. Verse text can sit there too (the last
    line of a verse), but never twice with the same text; a heading always
    comes back at least at the psalm's next verse. So a line is a heading
    when it stands before a verse at least twice.
    """
    def before_a_verse(index):
        return (lines[index].strip() and not _VERSE_START.match(lines[index])
                and index + 1 < len(lines)
                and _VERSE_START.match(lines[index + 1]))

    positions = [i for i in range(len(lines)) if before_a_verse(i)]
    seen = collections.Counter(lines[i].strip() for i in positions)
    headings = {i for i in positions if seen[lines[i].strip()] >= 2}
    return [line for i, line in enumerate(lines) if i not in headings]


def read_module(module):
    """`[(reference, text)]` of every non-empty verse of a SWORD module."""
    rendered = subprocess.run(
        ["diatheke", "-b", module, "-f", "plain", "-k", _WHOLE_BIBLE],
        capture_output=True, text=True, check=True).stdout
    lines = [_LEAKED_TAG.sub("", _LEAKED_HEADING.sub("", line))
             for line in rendered.splitlines()]
    verses, reference, verse_lines = [], None, []
    for line in _drop_headings(lines):
        match = _VERSE_START.match(line)
        if match or line.strip() == f"({module})":
            if reference is not None:
                verses.append((reference, _verse_text(verse_lines)))
            reference, verse_lines = None, []
        if match:
            reference, verse_lines = match["reference"], [match["text"]]
        elif reference is not None:
            verse_lines.append(line)
    return [(ref, text) for ref, text in verses if text]


def write_corpus(path, verses):
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                           filename="") as compressed:
            for reference, text in verses:
                compressed.write(f"{reference}\t{text}\n".encode("utf-8"))


def main(argv):
    del argv
    for name, module in MODULES.items():
        verses = read_module(module)
        path = os.path.join(_HERE, f"{name}.tsv.gz")
        write_corpus(path, verses)
        print(f"{name}: {len(verses)} verses from {module} -> {path} "
              f"({os.path.getsize(path) / 2**20:.1f} MB)")


if __name__ == "__main__":
    app.run(main)
