from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser

import polars as pl
import pytest
from typer.testing import CliRunner

from curator.cli import app
from curator.core import manifest
from curator.core.errors import AtelierError
from curator.stages.clean import CleanSettings, clean
from curator.stages.export import export_kept
from tests.conftest import tree_checksums


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    from tests.conftest import write_odd_tree

    root = tmp_path_factory.mktemp("odd") / "raw"
    write_odd_tree(root)
    # a label conflict: the same painting under two styles
    shutil.copy(root / "Baroque" / "good.jpg", root / "Rococo" / "good_refiled.jpg")
    result = clean(CleanSettings(root=root, workspace=root.parent / "ws", workers=1))
    return root, result


def test_report_names_every_problem_and_every_image_resolves(cleaned):
    root, result = cleaned
    page = result.report_path.read_text(encoding="utf-8")
    problems = result.manifest.filter(pl.col("status") != "ok")
    assert len(problems) > 10
    for path in problems["path"]:
        assert path.replace("&", "&amp;") in page, path
    assert "label conflict: Baroque vs Rococo" in page
    parser = _Images()
    parser.feed(page)
    assert parser.sources
    for src in parser.sources:
        assert (result.report_path.parent / src).stat().st_size > 0, src
    assert re.search(r"class=\"item keeper\"", page)


def test_export_places_exactly_the_kept_rows_and_leaves_the_source(cleaned, tmp_path):
    root, result = cleaned
    before = tree_checksums(root)
    report = export_kept(result.manifest, root, tmp_path / "set")
    assert tree_checksums(root) == before
    kept = set(result.manifest.filter(pl.col("keep"))["path"])
    exported = {p.relative_to(tmp_path / "set").as_posix() for p in (tmp_path / "set").rglob("*")
                if p.is_file() and p.name not in ("manifest.parquet", ".atelier")}
    assert exported == kept and report.files == len(kept)
    assert set(manifest.read(tmp_path / "set")["path"]) == kept
    again = export_kept(result.manifest, root, tmp_path / "set")  # a rerun finds everything there
    assert again.already_there == len(kept) and again.linked == again.copied == 0
    victim = tmp_path / "set" / sorted(kept)[0]
    victim.unlink()
    victim.write_bytes(b"something else")
    with pytest.raises(AtelierError, match="already exists with other content"):
        export_kept(result.manifest, root, tmp_path / "set")


def test_cli_export_and_report_paths(small_tree, tmp_path):
    result = CliRunner().invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"), "--workers", "0",
                                      "--export", str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "export: 8 kept images" in result.output
    assert (tmp_path / "ws" / "report.html").is_file()
    inside = CliRunner().invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"), "--workers", "0",
                                      "--export", str(small_tree / "out")])
    assert inside.exit_code == 1 and "inside the source folder" in inside.output
