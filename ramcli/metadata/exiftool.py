"""The ExifTool process, and the rules that keep file names and values from ever being read as
ExifTool options.

PyExifTool talks to `exiftool -stay_open` by writing the arguments of a command one per line.
A file name with a line break would therefore become several arguments: a photo named
`x⏎-if⏎system(...)⏎y.jpg` runs Perl code, one named `z⏎-all=⏎w.jpg` wipes another photo. So no
user path and no value ever is an argument:

- Files: ExifTool sees only links that ramcli makes in a folder of its own (`Workspace`), named
  `f000001.jpg`, ... with the extension of the format discovery detected. Every argument is
  checked (`safe_argument`) before it is sent.
- Values: keywords and captions travel in a JSON file (`-j=FILE`), each encoded as
  `base64:<UTF-8 bytes>`, which ExifTool's JSON import decodes to exactly those bytes (a value
  that itself starts with `base64:`, or reads `true` or `007`, arrives unchanged).
- Reading: `-X` (RDF/XML) keeps every value the exact string the file holds (its JSON output
  turns `TRUE` into `true` and types numbers), and non-UTF-8 or control bytes come as base64.
  No `-fast` option: a PNG whose XMP follows the image data is read to its end. `-m`: a list of
  more than 1,000 items is read whole (else ExifTool stops at 1,000, and a write planned from
  that would drop the rest).

Writing never replaces a file: ExifTool writes the new version to a separate folder (`-o`) and
ramcli copies it into the original (`ramcli.journal.Journal`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from ramcli.errors import RamcliError

MIN_EXIFTOOL = (12, 15)  # PyExifTool 0.5.6 needs -echo4 ${status}
# After Ctrl-C ExifTool got the SIGINT too and is gone. PyExifTool warns about it on stderr when
# it next looks, from whichever thread; ramcli says what that means itself (the interrupt, or a
# failed write with its reason).
warnings.filterwarnings("ignore", "ExifTool process was previously running but died", UserWarning)

# What ExifTool is asked to read: every field the planner looks at, in full.
READ_TAGS = ("-XMP:all", "-IPTC:all", "-Photoshop:IPTCDigest", "-File:CurrentIPTCDigest", "-EXIF:ImageDescription")
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_BASE64 = "http://www.w3.org/2001/XMLSchema#base64Binary"
_GROUP_URI = re.compile(r"^http://ns\.exiftool\.org/(?:.+/)?([^/]+)/1\.0/$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# An empty XMP packet: what a new sidecar starts from (ExifTool writes its own packet around it).
EMPTY_XMP = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/">\n</x:xmpmeta>\n<?xpacket end="w"?>\n'
)


def safe_argument(arg: str) -> str:
    """`arg`, if ExifTool can only read it as the one argument it is; else a RamcliError.

    Every path ramcli passes is absolute and made of ramcli's own names; a control character can
    only come from the environment (TMPDIR, RAMCLI_HOME)."""
    if _UNSAFE.search(arg):
        raise RamcliError(f"refusing to pass {arg!r} to ExifTool: it contains a control character "
                          "(check TMPDIR and RAMCLI_HOME)")
    return arg


def encode_value(value: str) -> str:
    """A value as ExifTool's JSON import takes it byte for byte."""
    return "base64:" + base64.b64encode(value.encode("utf-8", "surrogateescape")).decode("ascii")


def import_entry(source: str, values: dict[str, list[str] | str]) -> dict:
    """One object of a `-j=` import file: the file's workspace name and its new values."""
    encoded = {k: [encode_value(v) for v in val] if isinstance(val, list) else encode_value(val)
               for k, val in values.items()}
    return {"SourceFile": source, **encoded}


def parse_exiftool_xml(raw: bytes) -> list[dict]:
    """ExifTool's `-X -G1` output: per file a dict of `Group:Tag` -> text or list of texts, and
    `SourceFile`. Texts are exact; base64 items (binary or non-UTF-8) are decoded, with bytes that
    are not UTF-8 kept as surrogate escapes so that they are written back unchanged."""
    if not raw.strip():
        return []
    # XML parsers turn a CR into a LF; ExifTool leaves a CR of a value as it is.
    root = ET.fromstring(raw.replace(b"\r", b"&#13;"))
    out = []
    for desc in root.iter(f"{_RDF}Description"):
        found: dict = {"SourceFile": desc.get(f"{_RDF}about", "")}
        for elem in desc:
            uri, _, tag = elem.tag[1:].partition("}")
            group = _GROUP_URI.match(uri)
            if not group:
                continue
            items = [_text(li) for li in elem.iter(f"{_RDF}li")]
            found[f"{group.group(1)}:{tag}"] = items if len(elem) else _text(elem)
        out.append(found)
    return out


def _text(elem: ET.Element) -> str:
    text = elem.text or ""
    if elem.get(f"{_RDF}datatype") == _BASE64:
        return base64.b64decode("".join(text.split())).decode("utf-8", "surrogateescape")
    return text


def per_file_messages(stderr: str) -> dict[str, list[str]]:
    """`Error: msg - FILE` / `Warning: msg - FILE` lines of stderr, keyed by FILE."""
    out: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        if " - " in line and (line.startswith("Error") or line.startswith("Warning")):
            message, _, name = line.rpartition(" - ")
            out.setdefault(name.strip(), []).append(message.strip())
    return out


class Workspace:
    """A folder of ramcli's own where ExifTool sees the files under generated, harmless names.

    Each name is a symbolic link to the real file (or, for a sidecar still to be created, an empty
    XMP packet); `real` maps a name back. One workspace per batch; `close` removes it."""

    def __init__(self, parent: str | os.PathLike | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="batch-", dir=parent))
        safe_argument(str(self.folder))
        self._names: dict[str, str] = {}  # real -> name
        self.real: dict[str, str] = {}  # name -> real

    def link(self, real: str, extension: str) -> str:
        """The workspace name of `real` (made on first use)."""
        if real not in self._names:
            name = str(self.folder / f"f{len(self._names) + 1:06d}{extension}")
            if os.path.exists(real):
                os.symlink(os.path.abspath(real), name)
            else:
                Path(name).write_bytes(EMPTY_XMP)
            self._names[real], self.real[name] = name, real
        return self._names[real]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def find_exiftool(executable: str = "exiftool") -> str:
    """The ExifTool executable's path, or a one-line error saying how to install it."""
    found = shutil.which(executable)
    if not found:
        raise RamcliError(
            f"ExifTool not found ({executable!r}): install it (Debian/Ubuntu: apt install "
            "libimage-exiftool-perl; macOS: brew install exiftool; Windows: exiftool.org) "
            "or write the index only with --no-write"
        )
    return found


class ExifToolProcess:
    """One long-lived `exiftool -stay_open` process, with a clear error when ExifTool is missing.
    It is given workspace names only (see the module docstring)."""

    def __init__(self, executable: str = "exiftool"):
        import exiftool

        found = find_exiftool(executable)
        self._et = exiftool.ExifTool(executable=found, common_args=["-G1"])
        try:
            self._et.run()
            version = self._et.version
        except Exception as exc:  # PyExifTool raises its own types for a bad binary or old version
            raise RamcliError(f"ExifTool at {found} could not be started: {exc}") from exc
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < MIN_EXIFTOOL:
            self.close()
            raise RamcliError(
                f"ExifTool {version} is too old: ramcli needs {'.'.join(map(str, MIN_EXIFTOOL))} or newer"
            )
        self.version = version

    def execute(self, *args: str) -> tuple[bytes, str]:
        """Run one command; returns (stdout, stderr). A non-zero status is left to the caller,
        which reads per-file errors from stderr."""
        from exiftool.exceptions import ExifToolNotRunning

        try:
            stdout = self._et.execute(*map(safe_argument, args), raw_bytes=True)
        except ExifToolNotRunning:  # killed (by a Ctrl-C meant for ramcli, or out of memory)
            raise RamcliError("ExifTool stopped while ramcli was using it; re-run to continue") from None
        return stdout, self._et.last_stderr.decode("utf-8", "replace")

    def read(self, names: Sequence[str]) -> tuple[dict[str, dict], dict[str, list[str]]]:
        """Every XMP and IPTC field (keywords, descriptions) and EXIF ImageDescription of the
        workspace files `names`, keyed by name; plus read errors and warnings per name."""
        if not names:
            return {}, {}
        stdout, stderr = self.execute("-X", "-m", *READ_TAGS, *names)
        found = {d["SourceFile"]: d for d in parse_exiftool_xml(stdout)}
        return found, per_file_messages(stderr)

    def write(self, entries: list[dict], folder: Path, out: Path) -> tuple[dict[str, list[str]], set[str]]:
        """Import `entries` (see `import_entry`) into their files, each new version written to
        `out` under the same name; the originals are never touched. Returns the error and warning
        lines per name, and the names ExifTool could not write."""
        json_path, errors_path = folder / "import.json", folder / "errors.txt"
        errors_path.unlink(missing_ok=True)  # ExifTool appends to it
        json_path.write_text(json.dumps(entries), encoding="ascii")
        names = [e["SourceFile"] for e in entries]
        _, stderr = self.execute(f"-j={json_path}", "-efile", str(errors_path), "-o", f"{out}/", *names)
        failed = set(errors_path.read_text().splitlines()) if errors_path.exists() else set()
        return per_file_messages(stderr), failed

    def close(self) -> None:
        if self._et.running:
            self._et.terminate()
