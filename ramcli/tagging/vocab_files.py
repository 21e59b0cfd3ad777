"""The files a vocabulary is imported from, parsed into an `ImportPlan` before anything changes.

`vocab import` reads txt (one name a line), csv (name, threshold, descriptions), the official
RAM++ description list, or `vocab export` output; `vocab add --descriptions` reads the official
description list. Every malformed file is a one-line error naming the file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ramcli.errors import RamcliError
from ramcli.models.labels import OPEN_SET_THRESHOLD
from ramcli.tagging.tag_names import name_key
from ramcli.tagging.vocab import CustomTag


@dataclass(frozen=True)
class ImportPlan:
    """What an import file holds, parsed but not yet checked against the vocabulary."""

    custom: list[CustomTag]
    disabled: list[str]
    thresholds: dict[str, float]
    synonyms: dict[str, str]


def read_descriptions(path: Path, name: str) -> list[str]:
    """Descriptions of `name` from a JSON file: the official [{tag: [...]}] list or a list of strings."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RamcliError(f"descriptions file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RamcliError(f"descriptions file is not UTF-8 JSON: {path}") from None
    except OSError as exc:
        raise RamcliError(f"cannot read descriptions file {path}: {exc.strerror}") from None
    if isinstance(data, list) and all(isinstance(d, str) for d in data):
        return data
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        for entry in data:
            for tag, descriptions in entry.items():
                if name_key(tag) == name_key(name) and isinstance(descriptions, list):
                    return [str(d) for d in descriptions]
        raise RamcliError(f"{path} has no descriptions for '{name}'")
    raise RamcliError(f"{path}: expected a list of strings or the official [{{tag: [descriptions]}}] list")



def parse_import_file(path: Path) -> ImportPlan:
    """txt (one name a line, '#' comments), csv (name[,threshold[,description...]]) or json
    (the official RAM++ [{tag: [descriptions]}] list, a list of names, or `vocab export` output)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise RamcliError(f"import file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise RamcliError(f"import file is not UTF-8 (byte {exc.start}): {path}") from None
    except OSError as exc:
        raise RamcliError(f"cannot read import file {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _parse_json(text, path)
    if suffix == ".csv":
        return _parse_csv(text, path)
    if suffix in (".txt", ""):
        names = [line.strip() for line in text.splitlines()]
        return ImportPlan([CustomTag(n) for n in names if n and not n.startswith("#")], [], {}, {})
    raise RamcliError(f"unknown import format '{suffix}': use .txt, .csv or .json")


def _parse_csv(text: str, path: Path) -> ImportPlan:
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    except csv.Error as exc:
        raise RamcliError(f"malformed CSV in {path}: {exc}") from None
    if rows and rows[0][0].strip().lower() == "name":
        rows = rows[1:]
    tags = []
    for line, row in enumerate(rows, start=1):
        threshold = row[1].strip() if len(row) > 1 and row[1].strip() else OPEN_SET_THRESHOLD
        try:
            threshold = float(threshold)
        except ValueError:
            raise RamcliError(f"{path}: row {line}: threshold {row[1]!r} is not a number") from None
        tags.append(CustomTag(row[0], threshold, [d.strip() for d in row[2:] if d.strip()]))
    return ImportPlan(tags, [], {}, {})


def _parse_json(text: str, path: Path) -> ImportPlan:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RamcliError(f"malformed JSON in {path}: {exc.msg} at line {exc.lineno}") from None
    bad = RamcliError(f"{path}: expected a list of names, a list of {{tag: [descriptions]}} "
                      f"(the official RAM++ format), or `ramcli vocab export` output")
    if isinstance(data, dict) and "custom" in data:
        try:
            custom = [CustomTag(str(e["name"]), e.get("threshold", OPEN_SET_THRESHOLD), list(e.get("descriptions", [])),
                                name_zh=str(e.get("name_zh", ""))) for e in data["custom"]]
            return ImportPlan(custom, list(data.get("disabled", [])), dict(data.get("thresholds", {})),
                              dict(data.get("synonyms", {})))
        except (TypeError, KeyError, AttributeError):
            raise bad from None
    if not isinstance(data, list):
        raise bad
    tags = []
    for item in data:
        if isinstance(item, str):
            tags.append(CustomTag(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, descriptions), = item.items()
            if not (isinstance(descriptions, list) and descriptions and all(isinstance(d, str) for d in descriptions)):
                raise RamcliError(f"{path}: '{name}' needs a non-empty list of description strings")
            tags.append(CustomTag(name, OPEN_SET_THRESHOLD, descriptions))
        else:
            raise bad
    return ImportPlan(tags, [], {}, {})
