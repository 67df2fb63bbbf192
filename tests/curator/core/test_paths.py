from __future__ import annotations

import os

import polars as pl
import pytest

from curator.core.paths import display, from_text, relative_text, source_path, to_text

NAMES = [b"caf\xe9.jpg", b"back\\slash\xff.png", b"\\x41 literal.jpg", b"ok \xe5\x90\x8d.jpg", b"\xc3(.jpg", b"a\\\\b\x80"]


@pytest.mark.parametrize("raw", NAMES)
def test_every_byte_name_round_trips_through_parquet(raw, tmp_path):
    name = os.fsdecode(raw)
    text, escaped = to_text(name)
    assert escaped == (not _utf8(raw))
    path = tmp_path / "names.parquet"
    pl.DataFrame({"path": [text], "path_escaped": [escaped]}).write_parquet(path)
    back = pl.read_parquet(path).row(0)
    assert os.fsencode(from_text(*back)) == raw


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_valid_utf8_names_are_stored_as_they_are():
    assert to_text("Baroque/名前 with space.jpeg") == ("Baroque/名前 with space.jpeg", False)
    assert from_text("a\\xe9.jpg", False) == "a\\xe9.jpg"  # an unflagged backslash is a real backslash


def test_relative_text_and_source_path_find_the_file(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"Rococo")
    os.mkdir(folder)
    with open(os.path.join(folder, b"caf\xe9.jpg"), "wb") as fh:
        fh.write(b"x")
    (entry,) = list((tmp_path / "Rococo").iterdir())
    text, escaped = relative_text(entry, tmp_path)
    assert (text, escaped) == ("Rococo/caf\\xe9.jpg", True)
    assert source_path(tmp_path, text, escaped).read_bytes() == b"x"
    assert display(str(entry)).endswith("caf\\xe9.jpg")


def test_display_never_raises_even_for_a_lone_surrogate_no_file_name_gives():
    assert display("label \ud800 x") == "label \\ud800 x"
    assert display(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
