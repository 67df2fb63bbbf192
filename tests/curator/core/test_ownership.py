from __future__ import annotations

import json

import pytest

from curator.core.errors import UsageError
from curator.core.ownership import MARKER, claim, marker_kind


def test_a_new_or_empty_folder_is_claimed_and_marked(tmp_path):
    claim(tmp_path / "new" / "ws", "workspace", "--out")
    assert marker_kind(tmp_path / "new" / "ws") == "workspace"
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", "export", "--export")
    assert json.loads((tmp_path / "empty" / MARKER).read_text())["kind"] == "export"
    claim(tmp_path / "empty", "export", "--export")  # its own folder: reused


def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "manifest.parquet").write_bytes(b"my own file")
    with pytest.raises(UsageError, match="already holds files that atelier did not write"):
        claim(folder, "workspace", "--out")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.parquet"]
    assert (folder / "manifest.parquet").read_bytes() == b"my own file"


def test_another_kind_a_file_and_adoption(tmp_path):
    claim(tmp_path / "ws", "workspace", "--out")
    with pytest.raises(UsageError, match="is an atelier workspace folder, not an export folder"):
        claim(tmp_path / "ws", "export", "--export")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        claim(tmp_path / "f", "workspace", "--out")
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.parquet").write_bytes(b"from an earlier atelier")
    claim(old, "workspace", "--out", adopt=True)
    assert marker_kind(old) == "workspace"
