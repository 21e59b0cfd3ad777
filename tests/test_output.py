"""The one output layer: every format, the same conventions for every command, hostile names."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from ramcli.errors import UsageError
from ramcli.output import Layout, RecordWriter, photo_result_layout, result_writer, write_records
from ramcli.tagging.records import PhotoResult, TagScore

ODD = "/photos/[red]a\tb\nc \"q\".jpg"  # markup, a tab, a newline and quotes in one file name

LAYOUT = Layout(columns=("path", "tags"), row=lambda r: [r["path"], r["tags"]],
                json=lambda r: {"path": r["path"], "tags": r["tags"]}, path=lambda r: r["path"])
RECORDS = [{"path": ODD, "tags": ["dog", "christmas tree"]}, {"path": "/p/plain.jpg", "tags": []}]


def _written(capsysbinary, fmt: str, **kwargs) -> bytes:
    write_records(RECORDS, fmt, LAYOUT, **kwargs)
    return capsysbinary.readouterr().out


def test_csv_and_tsv_round_trip_any_value(capsysbinary):
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        rows = list(csv.reader(io.StringIO(_written(capsysbinary, fmt).decode(), newline=""), delimiter=delimiter))
        assert rows == [["path", "tags"], [ODD, "dog|christmas tree"], ["/p/plain.jpg", ""]], fmt
    plain = [{"path": "/p/x.jpg", "tags": ["a", "b"]}]
    write_records(plain, "tsv", LAYOUT)
    assert capsysbinary.readouterr().out == b"path\ttags\n/p/x.jpg\ta|b\n"  # ordinary values as they are


def test_json_jsonl_and_paths(capsysbinary):
    assert json.loads(_written(capsysbinary, "json")) == RECORDS
    assert [json.loads(line) for line in _written(capsysbinary, "jsonl").splitlines()] == RECORDS
    assert _written(capsysbinary, "paths", null=True) == os.fsencode(ODD) + b"\0/p/plain.jpg\0"


def test_paths_keep_names_that_are_not_utf8(capsysbinary):
    name = os.fsdecode(b"/p/caf\xe9.jpg")  # Latin-1 on disk: a surrogate escape in Python
    write_records([{"path": name, "tags": []}], "paths", LAYOUT)
    assert capsysbinary.readouterr().out == b"/p/caf\xe9.jpg\n"


def test_table_cells_are_text_not_markup(capsysbinary):
    out = _written(capsysbinary, "table").decode()
    assert "[red]a" in out and "dog|christmas tree" in out  # markup would have eaten "[red]"


def test_formats_are_checked_per_layout():
    no_paths = Layout(columns=("name",), row=lambda r: [r], json=lambda r: {"name": r})
    with pytest.raises(UsageError, match="unknown format 'paths'"):
        RecordWriter("paths", no_paths)
    with pytest.raises(UsageError, match="-0 only goes with --format paths"):
        RecordWriter("csv", LAYOUT, null=True)
    with pytest.raises(UsageError, match="unknown format 'xml'"):
        RecordWriter("xml", LAYOUT)


def test_streaming_formats_flush_each_batch_and_a_resumed_jsonl_appends(tmp_path):
    out = tmp_path / "results.csv"
    writer = result_writer("csv", out)
    result = PhotoResult("/p/a.jpg", "tagged", model_id="m", tags=[TagScore("dog", "狗", 0.91234)], caption="a dog")
    writer([result])
    assert out.read_text().splitlines() == ["path,status,tags,scores,caption,error", "/p/a.jpg,tagged,dog,0.9123,a dog,"]
    writer([PhotoResult("/p/b.jpg", "failed", error="cannot decode image")])
    assert out.read_text().splitlines()[-1] == "/p/b.jpg,failed,,,,cannot decode image"  # before close
    writer.close()
    jsonl = tmp_path / "results.jsonl"
    for _ in range(2):
        with result_writer("jsonl", jsonl) as w:
            w([result])
    assert [json.loads(line)["path"] for line in jsonl.read_text().splitlines()] == ["/p/a.jpg", "/p/a.jpg"]


def test_tag_layout_languages():
    result = PhotoResult("/p/a.jpg", "tagged", tags=[TagScore("dog", "狗", 0.9), TagScore("cat", "", 0.8)])
    assert photo_result_layout("zh").row(result)[2] == ["狗", "cat"]
    assert photo_result_layout("both").row(result)[2] == ["dog (狗)", "cat"]
    with pytest.raises(UsageError, match="unknown language"):
        photo_result_layout("fr")


def test_a_tag_record_carries_its_error_in_every_format():
    written = PhotoResult("/p/a.jpg", "tagged", tags=[TagScore("dog", "狗", 0.9)])
    unwritten = PhotoResult("/p/b.jpg", "tagged", tags=[TagScore("dog", "狗", 0.9)],
                            error="metadata not written: read-only file")
    broken = PhotoResult("/p/c.jpg", "broken", error="empty file (0 bytes)")
    layout = photo_result_layout()
    assert "error" not in layout.json(written) and "status" not in layout.json(written)
    assert layout.json(unwritten)["error"] == "metadata not written: read-only file"
    assert "status" not in layout.json(unwritten) and layout.json(unwritten)["tags"]
    assert (layout.json(broken)["status"], layout.json(broken)["error"]) == ("broken", "empty file (0 bytes)")
    assert layout.row(broken)[1] == "broken" and layout.row(broken)[-1] == "empty file (0 bytes)"
    assert layout.row(unwritten)[-1] == "metadata not written: read-only file"
