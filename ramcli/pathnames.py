"""File names that are not valid UTF-8: stored losslessly as text, shown escaped.

POSIX file names are bytes. Python hands a name that is not valid UTF-8 to ramcli as a `str`
with lone surrogates (`os.fsdecode`, PEP 383), which opens the file fine but which SQLite text,
JSON and a strict terminal all refuse. Such names come from old cameras, Windows archives
unpacked on Linux and NAS shares mounted with the wrong charset; one of them must never stop a
run. Two forms exist besides the file-system one:

* `to_text` / `from_text`: the form stored in the index. Each undecodable byte 0xNN (surrogate
  U+DCNN) becomes the private-use character U+10FFNN, and a name that already contains one of
  U+10FF7F..U+10FFFF gets that character prefixed by U+10FF7F, so the mapping is reversible for
  every name. It works character by character, so a folder's stored form is a prefix of the
  stored form of everything under it (the index's folder ranges keep working), and every valid
  UTF-8 name without those 129 Supplementary Private Use Area characters is stored unchanged
  (Datasette shows the plain path).
* `display`: the form for people and for JSON: undecodable bytes as `\\xNN` and control
  characters (a newline in a name) escaped, so one photo is one line. It is not reversible;
  `ramcli search --format paths` prints the real bytes instead.
"""

from __future__ import annotations

import os
import re

_ESCAPE = 0x10FF7F  # prefixes a literal character of the reserved range
_BYTE_BASE = 0x10FF00  # + 0x80..0xFF: one undecodable byte
_SURROGATE_BASE = 0xDC00  # os.fsdecode's lone surrogates U+DC80..U+DCFF


def to_text(path: str | os.PathLike) -> str:
    """The index's text for a file-system path (lossless; see the module docstring)."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name.isascii():  # the common case, unchanged and fast
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(chr(_BYTE_BASE + code - _SURROGATE_BASE))
        elif code >= _ESCAPE:
            out.append(chr(_ESCAPE) + ch)
        else:
            out.append(ch)
    return "".join(out)


def from_text(text: str) -> str:
    """The file-system path (`str`, surrogate-escaped where not UTF-8) of an index text."""
    if text.isascii():
        return text
    out = []
    chars = iter(text)
    for ch in chars:
        code = ord(ch)
        if code == _ESCAPE:
            out.append(next(chars, ""))
        elif code >= _BYTE_BASE + 0x80:
            out.append(chr(_SURROGATE_BASE + code - _BYTE_BASE))
        else:
            out.append(ch)
    return "".join(out)


def display(path: str | os.PathLike) -> str:
    """A path for people, JSON and logs: bytes that are not UTF-8 as `\\xNN`, control characters
    as `\\n`, `\\t`, `\\x1b`, ...; every other character as it is."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name.isprintable():
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - _SURROGATE_BASE:02x}")
        elif not ch.isprintable() and ch != " ":
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str | os.PathLike) -> bool:
    """'s3://bucket/key', 'gs://…', 'file:///…': an object-storage address (`ramcli tag --ray`),
    kept as given; there is no local file to resolve, stat or write."""
    return isinstance(path, str) and _URI.match(path) is not None
