"""trainers/corpora/rdata.py against R serializations written by hand.

The bytes follow R's serialize.c: XDR big-endian ints, an item's flags word
holding its SEXP type (low byte), has-attributes (bit 9), has-tag (bit 10)
and the CHARSXP encoding levels (from bit 12).
"""

import bz2
import gzip
import lzma
import struct
import zlib

import pytest

from trainers.corpora import rdata

_NIL = 254


def _int(*values):
    return struct.pack(f">{len(values)}i", *values)


def _flags(kind, attributes=False, tag=False, levels=0):
    return _int(kind | attributes << 9 | tag << 10 | levels << 12)


def _char(text, encoding="utf-8", levels=1 << 3):
    if text is None:
        return _flags(9) + _int(-1)
    data = text.encode(encoding)
    return _flags(9, levels=levels) + _int(len(data)) + data


def _symbol(name):
    return _flags(1) + _char(name)


def _names_attribute(names, symbol=None):
    """The attribute pairlist `names = names`; `symbol` the tag's bytes
    (a reference to an earlier symbol, say)."""
    return (_flags(2, tag=True) + (symbol or _symbol("names"))
            + _strings(names) + _int(_NIL))


def _strings(values, names=None):
    body = _int(len(values)) + b"".join(_char(v) for v in values)
    if names is None:
        return _flags(16) + body
    return _flags(16, attributes=True) + body + _names_attribute(names)


def _ints(values, kind=13):
    return _flags(kind) + _int(len(values)) + _int(*values)


def _doubles(values):
    return (_flags(14) + _int(len(values))
            + struct.pack(f">{len(values)}d", *values))


def _serialization(item, version=2):
    header = b"X\n" + _int(version, 0x40200, 0x30500)
    if version == 3:
        header += _int(5) + b"UTF-8"
    return header + item


def test_atomic_vectors_and_na():
    assert rdata.read_rds(_serialization(_strings(["a", None, "b"]))) == [
        "a", None, "b"]
    assert rdata.read_rds(_serialization(_ints([1, -2**31, 3]))) == [
        1, None, 3]
    assert rdata.read_rds(_serialization(_ints([1, 0], kind=10))) == [1, 0]
    assert rdata.read_rds(_serialization(_doubles([0.5, -2.0]))) == [0.5,
                                                                     -2.0]
    assert rdata.read_rds(_serialization(_int(_NIL))) is None


def test_names_make_a_dict_and_latin1_is_decoded():
    item = _strings(["x", "y"], names=["first", "second"])
    assert rdata.read_rds(_serialization(item)) == {"first": "x",
                                                    "second": "y"}
    latin1 = _flags(16) + _int(1) + _char("caf\u00e9", "latin-1", 1 << 2)
    assert rdata.read_rds(_serialization(latin1)) == ["caf\u00e9"]


def test_a_list_whose_names_symbol_is_a_reference():
    # list(a = list(c = 1L), b = c("p")): the inner list's names tag is the
    # first symbol written (reference 1), the outer names tag refers to it.
    inner = (_flags(19, attributes=True) + _int(1) + _ints([1])
             + _names_attribute(["c"]))
    outer = (_flags(19, attributes=True) + _int(2) + inner + _strings(["p"])
             + _names_attribute(["a", "b"], symbol=_int(255 | 1 << 8)))
    assert rdata.read_rds(_serialization(outer)) == {"a": {"c": [1]},
                                                     "b": ["p"]}


def test_version_3_header_is_read():
    assert rdata.read_rds(_serialization(_strings(["v3"]), version=3)) == [
        "v3"]


@pytest.mark.parametrize("data, message", [
    (b"A\n" + _int(2, 0, 0), "Not an XDR"),
    (b"X\n" + _int(4, 0, 0), "version 4"),
    (_serialization(_flags(3)), "SEXP type 3"),
])
def test_unreadable_input_is_a_clear_error(data, message):
    with pytest.raises(ValueError, match=message):
        rdata.read_rds(data)


def _rdb_entry(data, compressed, kind=b"Z"):
    if compressed == 1:
        return struct.pack(">I", len(data)) + zlib.compress(data)
    compress = {b"Z": zlib.compress, b"2": bz2.compress,
                b"X": lzma.compress, b"0": bytes}[kind]
    return struct.pack(">I", len(data)) + kind + compress(data)


def _write_database(stem, objects, compressed, kind=b"Z"):
    blob, offsets = b"", {}
    for name, item in objects.items():
        entry = _rdb_entry(_serialization(item), compressed, kind)
        offsets[name] = (len(blob), len(entry))
        blob += entry
    names = list(offsets)
    variables = (_flags(19, attributes=True) + _int(len(names))
                 + b"".join(_ints(list(offsets[n])) for n in names)
                 + _names_attribute(names))
    flag = _ints([1], kind=10) if compressed == 1 else _ints([compressed])
    index = (_flags(19, attributes=True) + _int(3) + variables
             + _flags(19) + _int(0) + flag
             + _names_attribute(["variables", "references", "compressed"]))
    with open(f"{stem}.rdb", "wb") as f:
        f.write(blob)
    with open(f"{stem}.rdx", "wb") as f:
        f.write(gzip.compress(_serialization(index)))


@pytest.mark.parametrize("compressed, kind", [
    (1, b"Z"), (2, b"Z"), (2, b"2"), (2, b"X"), (2, b"0")])
def test_lazy_load_database(tmp_path, compressed, kind):
    stem = str(tmp_path / "Rdata")
    _write_database(stem, {"emma": _strings(["Emma Woodhouse,", "handsome"]),
                           "counts": _ints([3, 4])}, compressed, kind)
    assert rdata.read_lazy_load_db(stem) == {
        "emma": ["Emma Woodhouse,", "handsome"], "counts": [3, 4]}


def test_a_truncated_entry_is_an_error():
    entry = _rdb_entry(b"0123456789", 1)
    too_long = struct.pack(">I", 11) + entry[4:]
    with pytest.raises(ValueError, match="Truncated"):
        rdata._decompress_rdb_entry(too_long, 1)
