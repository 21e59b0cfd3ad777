"""File names as bytes: the index's text form is lossless, keeps folder prefixes and leaves
ordinary names alone; the display form is one line of valid UTF-8."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from ramcli.pathnames import display, from_text, to_text

# Names as a POSIX file system holds them: any bytes but NUL and '/'; some with the reserved range.
names = st.one_of(
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"_").replace(b"/", b"_")),
    st.text(min_size=1, max_size=20).map(lambda t: t.replace("\0", "_").replace("/", "_").encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from([chr(0x10FF7F), chr(0x10FFAA), chr(0x10FF05), "a"]), min_size=1, max_size=6)
    .map(lambda cs: "".join(cs).encode()),
)
paths = st.lists(names, min_size=1, max_size=4).map(lambda parts: os.fsdecode(b"/" + b"/".join(parts)))


@given(paths)
def test_to_text_round_trips_every_name_and_is_valid_utf8(path):
    text = to_text(path)
    text.encode("utf-8")  # storable: SQLite, JSON
    assert from_text(text) == path
    assert os.fsencode(from_text(text)) == os.fsencode(path)


@given(paths, names)
def test_a_folders_text_is_a_prefix_of_its_contents_text(folder, name):
    child = folder + "/" + os.fsdecode(name)
    assert to_text(child).startswith(to_text(folder) + "/")


@given(st.text(max_size=30))
def test_valid_names_outside_the_reserved_range_are_stored_as_they_are(name):
    if any(0xDC80 <= ord(c) <= 0xDCFF or ord(c) >= 0x10FF7F for c in name):
        return
    assert to_text(name) == name


@given(paths)
def test_display_is_one_line_of_utf8(path):
    shown = display(path)
    shown.encode("utf-8")
    assert "\n" not in shown and "\r" not in shown


def test_display_escapes_what_is_not_text():
    assert display(os.fsdecode(b"/p/caf\xe9\n.jpg")) == "/p/caf\\xe9\\n.jpg"
    assert display("/p/Café 猫.jpg") == "/p/Café 猫.jpg"
