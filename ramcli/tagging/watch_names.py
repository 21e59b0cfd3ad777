"""File names the watcher meets: the temporary names other programs write under before they
rename a complete file (`is_temporary`: such files are never tagged), and the path in
watchfiles' error for a name that is not UTF-8 (`undecodable_path`: that folder is looked at
again, see `Watcher._watch`).
"""

from __future__ import annotations

import os
import re

#: Names that sync clients, browsers and editors give files they are still writing (the final
#: name appears by a rename once the file is complete). Names starting with "." are ignored too:
#: Syncthing's `.syncthing.NAME.tmp`, rsync's `.NAME.XXXXXX`, macOS's `._NAME`.
TEMP_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".opdownload", ".tmp", ".temp", ".!sync",
                 ".!qb", ".!ut", "~", "_exiftool_tmp")
TEMP_PREFIXES = (".", "~$")


#: Rust's debug form of a path (watchfiles' error message): a byte that is not UTF-8 as `\xNN`,
#: a character that needs it as `\u{...}` or `\n`-like, anything else as itself.
_RUST_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|u\{[0-9A-Fa-f]{1,6}\}|.)", flags=re.DOTALL)
_RUST_SHORT = {"0": "\0", "t": "\t", "r": "\r", "n": "\n"}


def undecodable_path(message: str) -> str | None:
    """The path (surrogate-escaped, as the walk names it) that watchfiles could not decode, from
    its error message; None for any other error."""
    match = re.fullmatch(r'Unable to decode path "(.*)" to string', message, flags=re.DOTALL)
    if match is None:
        return None
    text, raw, pos = match.group(1), bytearray(), 0
    for m in _RUST_ESCAPE.finditer(text):
        code = m.group(1)
        raw += text[pos:m.start()].encode()
        if code[0] == "x" and len(code) == 3:
            raw.append(int(code[1:], 16))
        elif code[0] == "u" and len(code) > 1:
            raw += chr(int(code[2:-1], 16)).encode()
        else:
            raw += _RUST_SHORT.get(code, code).encode()
        pos = m.end()
    raw += text[pos:].encode()
    return os.fsdecode(bytes(raw))


def is_temporary(name: str) -> bool:
    """A file that another program is still writing under a name it will rename when done."""
    lower = name.lower()
    return lower.startswith(TEMP_PREFIXES) or lower.endswith(TEMP_SUFFIXES)
