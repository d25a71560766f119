"""Rebuilds the embedded English prose corpora from Debian packages.

    apt-get install diatheke sword-comm-tdavid r-cran-janeaustenr
    python -m trainers.corpora.build_english

(r-cran-janeaustenr pulls in R, which this script does not use: instead
`apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb
DIR` and pass `--janeaustenr_dir=DIR/usr/lib/R/site-library/janeaustenr`.)

Writes `trainers/corpora/<name>.tsv.gz` in the format of build_bible.py's
corpora, one sentence per line, `reference<TAB>text`, for:
- `austen`: Jane Austen's six novels (Debian package r-cran-janeaustenr),
  in publication order, `<Novel> <chapter>:<n>` (e.g. `Emma 12:3`): the
  chapter is counted through the whole novel (Emma's three volumes restart
  their chapter numbers; here they run 1-55), chapter 0 is the front matter
  kept (Northanger Abbey's "Advertisement"), n counts sentences within the
  chapter from 1;
- `tdavid`: C. H. Spurgeon's The Treasury of David (SWORD module TDavid,
  Debian package sword-comm-tdavid), `Psalm <chapter>:<verse>:<n>`, the
  verse where the commentary entry first appears (the module has one entry
  per psalm, at its first verse), n counting sentences within the entry.
Both texts are public domain. See PROVENANCE.md beside this file.

What each step changes:
- Austen (`read_austen`): the novels are character vectors of printed
  lines in R's lazy-load database, read here without R (rdata.py).
  Lines are joined into paragraphs (`_paragraphs`).
  Dropped: chapter and volume headings, the title page (front-matter
  paragraphs under 10 words), everything from "THE END"/"Finis"/"A NOTE ON
  THE TEXT" on (the last is a modern editor's note), the editions' bracketed
  volume-end notes, `* * *` section breaks and Northanger Abbey's one
  footnote (`_novel_chapters`). Removed from the text: the `_` marks of
  italics and the `*` footnote marker (`_clean_austen`).
- TDavid (`read_tdavid`): diatheke renders every verse of the Psalms; the
  module's entries are each kept once, in order of first appearance
  (`_entries`). Dropped: the section headings ("Psalm 1 OVERVIEW",
  "TITLE.", "EXPOSITION", "EXPLANATORY NOTES AND QUAINT SAYINGS", "HINTS
  TO PREACHERS", ...), the labels that open each note ("Verse 1.",
  "Verses 3-5.", "Whole Psalm.", "Title."), the bibliography that ends many
  entries ("WORKS UPON THE FIRST PSALM" and after: lists of book titles),
  the `*` marks of emphasis, `{1}` footnote markers, list bullets, stray
  C1 control characters and any markup diatheke lets through
  (`_clean_tdavid`). The author a quoted note is from ("John Trapp.") stays
  with the note's last sentence rather than making a record of its own.
- Both: whitespace is normalised to single spaces, and the text is split
  into sentences (`split_sentences`); sentences with no letters (a stray
  list number) are left out.
The output is deterministic (gzip without a timestamp:
`build_bible.write_corpus`).
"""

import os
import re
import subprocess

from absl import app
from absl import flags

from trainers.corpora import build_bible
from trainers.corpora import rdata

_HERE = os.path.dirname(os.path.abspath(__file__))

_JANEAUSTENR_DIR = flags.DEFINE_string(
    "janeaustenr_dir", "/usr/lib/R/site-library/janeaustenr",
    "The installed R package janeaustenr (the directory holding "
    "data/Rdata.rdb and data/Rdata.rdx), e.g. extracted from the .deb.")

# --- Sentences ---------------------------------------------------------------

# A sentence ends at `.`, `!` or `?` (and any closing quotes or brackets after
# it) when whitespace and then an uppercase letter or an opening quote or
# bracket follow.
_SENTENCE_END = re.compile(
    r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[\"'`\u201c\u2018(\[]*[A-Z])")
# Words whose period does not end a sentence.
_ABBREVIATIONS = frozenset("""
    Mr Mrs Messrs Dr St Esq Col Capt Gen Lieut Lt Rev Revd Hon Sr Jr Prof Mt
    Ver ver Vers vers Ps Psa Vol vol viz Viz ibid Ibid cf Cf ch Chap chap p pp
    ed Ed vs i.e e.g Heb Sept
""".split())
# Initials (`E. W. Hengstenberg`), list numbers (`1. By God; 2. In Christ`)
# and Roman numerals (`II. Saints on earth`).
_NOT_SENTENCE_END = re.compile(r"(?:[A-Z]\.)*[A-Z]|\d{1,3}|[IVXLC]+")
# Put before a word, keeps it in the sentence before (split_sentences never
# splits before it, and removes it).
NO_SPLIT = "\x00"
# What separates the word before a period from the text before it: so that
# `Ps 96:3.` ends a sentence and `(1.`, `--Mr.` or `"Mrs.` do not.
_WORD_BOUNDARY = re.compile(r"[\s(\[\"'`\u201c\u2018\u2014\x00]|--")


def _is_abbreviation(text_before_period):
    """Whether the word just before a period is one that does not end
    sentences (an abbreviation, an initial, a list number)."""
    word = _WORD_BOUNDARY.split(text_before_period[-40:])[-1]
    return word in _ABBREVIATIONS or bool(_NOT_SENTENCE_END.fullmatch(word))


def split_sentences(text):
    """The sentences of a whitespace-normalised text, in order.

    Splits after `.`, `!` or `?` (with any closing quotes or brackets) that
    whitespace and an uppercase letter or opening quote follow, except after
    the abbreviations, initials and list numbers of `_is_abbreviation`, and
    before `NO_SPLIT` marks (which are removed). Sentences without a letter
    are left out.
    """
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        if (end.group().startswith(".")
                and _is_abbreviation(text[start:end.start()])):
            continue
        sentences.append(text[start:end.end()].strip())
        start = end.end()
    sentences.append(text[start:].strip())
    return [s.replace(NO_SPLIT, "") for s in sentences
            if any(c.isalpha() for c in s)]


def _normalise(text):
    """Runs of whitespace (line breaks, no-break spaces) become one space."""
    return " ".join(text.split())

# --- Austen ------------------------------------------------------------------

# The package's objects and the novels' names, in publication order.
NOVELS = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
_CHAPTER = re.compile(r"(?:CHAPTER|Chapter) +(?:[IVXLC]+|\d+)\.?")
_VOLUME = re.compile(r"(?:VOLUME|Volume) +(?:[IVXLC]+|\d+)\.?")
_END_OF_NOVEL = re.compile(r"THE END|FINIS|Finis|A NOTE ON THE TEXT")
# Paragraphs that are not the novel's text: the editions' notes on where
# volumes end, section breaks (`* * * * *`), the one footnote (`*Vide ...`).
_NOT_NOVEL_TEXT = re.compile(r"\[.*\beditions?\b.*\]|[*\s]+|\*.*")
_FRONT_MATTER_WORDS = 10


def _paragraphs(lines):
    """Printed lines joined into paragraphs (empty lines separate them)."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


def _clean_austen(paragraph):
    """A paragraph without italics marks (`_word_`) or footnote marks."""
    return _normalise(paragraph.replace("_", "").replace("*", ""))


def _novel_chapters(lines):
    """`[(chapter, paragraph)]` of a novel, chapters counted from 1 through
    the whole novel (0 for the front matter kept), headings and the
    matter that is not the novel's text left out."""
    chapters, chapter = [], 0
    for paragraph in _paragraphs(lines):
        if _END_OF_NOVEL.fullmatch(paragraph):
            break
        if _CHAPTER.fullmatch(paragraph):
            chapter += 1
        elif _VOLUME.fullmatch(paragraph) or _NOT_NOVEL_TEXT.fullmatch(
                paragraph):
            continue
        elif chapter or len(paragraph.split()) >= _FRONT_MATTER_WORDS:
            chapters.append((chapter, _clean_austen(paragraph)))
    return chapters


def read_austen(janeaustenr_dir):
    """`[(reference, sentence)]` of the six novels, in publication order."""
    novels = rdata.read_lazy_load_db(
        os.path.join(janeaustenr_dir, "data", "Rdata"))
    records = []
    for key, title in NOVELS:
        sentence_in_chapter = {}
        for chapter, paragraph in _novel_chapters(novels[key]):
            for sentence in split_sentences(paragraph):
                n = sentence_in_chapter[chapter] = (
                    sentence_in_chapter.get(chapter, 0) + 1)
                records.append((f"{title} {chapter}:{n}", sentence))
    return records

# --- The Treasury of David ---------------------------------------------------

TDAVID_MODULE = "TDavid"
_PSALMS = "Ps 1:1-150:6"
_ENTRY_START = re.compile(r"^Psalms (?P<chapter>\d+):(?P<verse>\d+): ?"
                          r"(?P<text>.*)$")
_LEAKED_TAG = re.compile(r"<[^>]+>")
# The bibliography closing an entry: "WORKS UPON THE FIRST PSALM" and on.
_BIBLIOGRAPHY = re.compile(r"\bWORKS? UPON THE\b.*", re.S)
_SECTION_HEADING = re.compile(
    r"^\s*Psalms? \d+(?: OVERVIEW)?|\b(?:TITLE AND SUBJECT|SUBJECT AND "
    r"DIVISION|SUBJECT|TITLE|DIVISIONS?|EXPOSITION|EXPLANATORY NOTES AND "
    r"QUAINT SAYINGS|HINTS TO PREACHERS|HINTS TO THE VILLAGE PREACHER)\b\.?")
# The label opening a note, at the start of a paragraph (a line, two spaces
# or a `*`): "* Verse 1. *", "* Ver. 2. *", "Verses 12-15.",
# "* Verse 5 (* last clause *).", "* Verse 12. * (* last clause *).",
# "* Whole Psalm. *", "* Title *.".
_NOTE_LABEL = re.compile(
    r"(?:^|(?<=\s\s)|(?<=\*))[\s*]*"
    r"(?:(?:Verses?|Vers?\.?)\s*\d+(?:\s*(?:[-\u2013\u2014,]|and|to)\s*\d+)*"
    r"|Whole\s+Psalm|Title)"
    r"(?=\s*[.*(])[\s*.]*(?:\([^()]{0,40}\)[\s*.]*)?", re.M)
# The author a quotation is from, starred after its last sentence and ending
# the paragraph ("...shall not prosper. * John Trapp. *   * Verse 2. *"). It
# is kept with that sentence (`NO_SPLIT`).
_ATTRIBUTION = re.compile(
    r"(?<=[.!?\"'\u201d)])\s*\*\s*(?P<name>[A-Z\u2014][^*\n]{0,99}?)\s*\*"
    r"(?=[ \t]{2}|[ \t]*$)", re.M)
_FOOTNOTE_MARK = re.compile(r"\{\d+\}")
_CONTROL = re.compile("[\u0080-\u009f\ufeff\u2022]")
# `*` marks of emphasis go; punctuation they leave detached is reattached.
_STAR_BEFORE_PUNCTUATION = re.compile(r"\s*\*\s*(?=[.,;:!?)\]])")
_STAR_AFTER_BRACKET = re.compile(r"(?<=[(\[])\s*\*\s*")


def _render_psalms(module):
    """diatheke's plain rendering of every verse of the Psalms."""
    return subprocess.run(
        ["diatheke", "-b", module, "-f", "plain", "-k", _PSALMS],
        capture_output=True, text=True, check=True).stdout


def _entries(rendered, module):
    """`[((chapter, verse), text)]`: each distinct commentary entry once,
    at the verse where it first appears.

    diatheke prints `Psalms C:V: ` before every verse and the entry that
    covers it after; an entry covering several verses may be printed
    again (or, in this module, left empty) at the others.
    """
    entries, seen, key, lines = [], set(), None, []

    def flush():
        text = "\n".join(lines).strip()
        if key is not None and text and text not in seen:
            seen.add(text)
            entries.append((key, text))

    for line in rendered.splitlines():
        match = _ENTRY_START.match(line)
        if match or line.strip() == f"({module})":
            flush()
            key, lines = None, []
        if match:
            key = (int(match["chapter"]), int(match["verse"]))
            lines = [match["text"]]
        elif key is not None:
            lines.append(line)
    flush()
    return entries


def _clean_tdavid(text):
    """An entry's running text: no headings, labels, bibliography, marks."""
    text = _LEAKED_TAG.sub(" ", text)
    text = _BIBLIOGRAPHY.sub("", text)
    # Headings and labels end or begin paragraphs: they leave a paragraph
    # break (two spaces or more), which `_ATTRIBUTION` looks for.
    text = _SECTION_HEADING.sub("   ", text)
    text = _NOTE_LABEL.sub("   ", text)
    text = _ATTRIBUTION.sub(lambda m: f" {NO_SPLIT}{m['name']}", text)
    text = _CONTROL.sub("", _FOOTNOTE_MARK.sub(" ", text))
    text = _STAR_AFTER_BRACKET.sub("", _STAR_BEFORE_PUNCTUATION.sub("", text))
    return _normalise(text.replace("*", " "))


def read_tdavid(module=TDAVID_MODULE):
    """`[(reference, sentence)]` of the commentary, psalm by psalm."""
    records = []
    for (chapter, verse), text in _entries(_render_psalms(module), module):
        for n, sentence in enumerate(split_sentences(_clean_tdavid(text)), 1):
            records.append((f"Psalm {chapter}:{verse}:{n}", sentence))
    return records


def main(argv):
    del argv
    for name, records in (("austen", read_austen(_JANEAUSTENR_DIR.value)),
                          ("tdavid", read_tdavid())):
        path = os.path.join(_HERE, f"{name}.tsv.gz")
        build_bible.write_corpus(path, records)
        words = sum(len(text.split()) for _, text in records)
        print(f"{name}: {len(records)} sentences, {words} words -> {path} "
              f"({os.path.getsize(path) / 2**20:.1f} MB)")


if __name__ == "__main__":
    app.run(main)
