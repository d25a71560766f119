"""Reads R's serialized objects without R: `read_rds` for one XDR
serialization (what saveRDS writes, uncompressed), `read_lazy_load_db` for a
package's lazy-load database (`data/Rdata.rdb` and `.rdx`), which is how
installed R packages such as janeaustenr keep their data.

Only what data packages hold is read: character, logical, integer, double
vectors and lists, with names; symbols and pairlists (for attributes and
the database's index); references to earlier symbols. Attributes other than
names are dropped; any other SEXP type is a ValueError. The format is R's
serialize.c (R Internals, "Serialization Formats").
"""

import bz2
import gzip
import lzma
import struct
import zlib

# SEXP types, from R's Rinternals.h and serialize.c.
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP = 1, 2, 9, 10, 13, 14
_STRSXP, _VECSXP = 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_NA_INTEGER = -2**31
_LATIN1_MASK = 1 << 2


class _XdrReader:
    """Reads the items of one XDR (big-endian) R serialization."""

    def __init__(self, data):
        self._data, self._at, self._references = data, 0, []

    def _ints(self, count):
        values = struct.unpack_from(f">{count}i", self._data, self._at)
        self._at += 4 * count
        return list(values)

    def _bytes(self, count):
        value = self._data[self._at:self._at + count]
        self._at += count
        return value

    def _length(self):
        length, = self._ints(1)
        if length == -1:  # A long vector: the length in two words.
            upper, lower = self._ints(2)
            length = (upper << 32) + (lower & 0xFFFFFFFF)
        return length

    def header(self):
        """Checks the serialization header; skips its native encoding."""
        if self._bytes(2) != b"X\n":
            raise ValueError("Not an XDR R serialization.")
        version, _, _ = self._ints(3)
        if version == 3:
            self._bytes(self._ints(1)[0])
        elif version != 2:
            raise ValueError(f"R serialization version {version} unknown.")

    def item(self):
        """The next item: a str (or None for NA) for a CHARSXP; a list for
        an atomic vector or a list (a dict if it has names); a dict of tag
        to value for a pairlist; `("symbol", name)` for a symbol; None for
        NULL. Attributes other than names are dropped."""
        flags_, = self._ints(1)
        kind = flags_ & 0xFF
        has_attributes, has_tag = flags_ & (1 << 9), flags_ & (1 << 10)
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            return self._references[(flags_ >> 8 or self._ints(1)[0]) - 1]
        if kind == _SYMSXP:
            symbol = ("symbol", self.item())
            self._references.append(symbol)
            return symbol
        if kind == _CHARSXP:
            length, = self._ints(1)
            if length == -1:
                return None
            encoding = "latin-1" if (flags_ >> 12) & _LATIN1_MASK else "utf-8"
            return self._bytes(length).decode(encoding)
        if kind == _LISTSXP:
            if has_attributes:
                self.item()
            tag = self.item() if has_tag else None
            value = {tag[1] if tag else None: self.item()}
            rest = self.item()
            value.update(rest or {})
            return value
        if kind in (_STRSXP, _VECSXP):
            value = [self.item() for _ in range(self._length())]
        elif kind in (_LGLSXP, _INTSXP):
            value = [None if v == _NA_INTEGER else v
                     for v in self._ints(self._length())]
        elif kind == _REALSXP:
            count = self._length()
            value = list(struct.unpack_from(f">{count}d", self._data,
                                            self._at))
            self._at += 8 * count
        else:
            raise ValueError(f"R SEXP type {kind} is not read here.")
        attributes = self.item() if has_attributes else {}
        names = attributes.get("names")
        return dict(zip(names, value)) if names else value


def read_rds(data):
    """The object in an uncompressed XDR R serialization."""
    reader = _XdrReader(data)
    reader.header()
    return reader.item()


def _decompress_rdb_entry(blob, compressed):
    """An object's serialization from its .rdb bytes: a 4-byte big-endian
    length, then (format 2 and 3) a type byte, then the compressed data."""
    length, = struct.unpack(">I", blob[:4])
    if compressed == 1:
        data = zlib.decompress(blob[4:])
    else:
        kind, payload = blob[4:5], blob[5:]
        data = {b"Z": zlib.decompress, b"2": bz2.decompress,
                b"X": lzma.decompress, b"0": bytes}[kind](payload)
    if len(data) != length:
        raise ValueError("Truncated lazy-load database entry.")
    return data


def read_lazy_load_db(path_stem):
    """`{name: object}` from R's lazy-load database `<path_stem>.rdb/.rdx`.

    The .rdx is a saveRDS file (gzip, or a length then a zlib stream) of
    `list(variables = list(name = c(offset, length)), references, compressed)`.
    """
    with open(path_stem + ".rdx", "rb") as index_file:
        index = index_file.read()
    if index[:2] == b"\x1f\x8b":
        index = gzip.decompress(index)
    else:
        index = _decompress_rdb_entry(index, True)
    index = read_rds(index)
    with open(path_stem + ".rdb", "rb") as database:
        blob = database.read()
    return {name: read_rds(_decompress_rdb_entry(
                blob[offset:offset + length], index["compressed"][0]))
            for name, (offset, length) in index["variables"].items()}
