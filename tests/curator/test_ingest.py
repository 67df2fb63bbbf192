from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curator.clean import CleanSettings, clean
from curator.cli import app
from curator.fetch import FetchSettings, PoliteClient, retry_after_seconds
from curator.ingest import CATALOG_NAME, safe_name
from tests.conftest import REPO, SAMPLE, sample_paintings

runner = CliRunner()
FAST = ["--rate", "200", "--retries", "3"]


def _catalog(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / CATALOG_NAME)


def _tree_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                  and p.name not in (CATALOG_NAME,))


def test_wikiart_style_with_every_fault(services, tmp_path):
    state, base = services
    out = tmp_path / "raw"
    res = runner.invoke(app, ["ingest", "wikiart", "--style", "Impressionism", "--out", str(out), "--base-url", base,
                              "--image-base-url", base, "--max-bytes", "200000", *FAST])
    assert res.exit_code == 0, res.output
    cat = _catalog(out).sort("source_id")
    assert cat.height == 9 and cat["source_id"].n_unique() == 9
    by_id = {r["source_id"]: r for r in cat.iter_rows(named=True)}
    for sid in ("1001", "1002", "1003", "1004", "1005", "1008", "1009"):
        assert by_id[sid]["status"] == "ok", by_id[sid]
        assert (out / by_id[sid]["path"]).is_file()
    assert "HTML" in by_id["1006"]["error"] and by_id["1006"]["path"] is None
    assert "max-bytes" in by_id["1007"]["error"] and by_id["1007"]["path"] is None
    # retried: 429 (Retry-After), 500, a body cut mid-way
    assert state.hits["/images/ratelimited.jpg!Large.jpg"] == 2
    assert state.hits["/images/flaky.jpg!Large.jpg"] == 2
    assert state.hits["/images/dropped.jpg!Large.jpg"] == 2
    # the hostile title stays inside its class folder
    evil = by_id["1005"]["path"]
    assert evil.startswith("Impressionism/") and ".." not in evil and evil.count("/") == 1
    # one image under two ids: two rows, same content
    assert by_id["1001"]["sha256"] == by_id["1008"]["sha256"]
    assert by_id["1001"]["group"] == "claude-monet" and by_id["1009"]["artist"] == "Berthe Morisot"
    assert by_id["1001"]["year"] == "1872" and by_id["1001"]["url"].endswith("img0.jpg!Large.jpg")
    # failed rows leave no file; no part files remain
    assert len(_tree_files(out)) == 7 and not list(out.rglob("*.part"))
    assert "failed 2" in res.output.replace("\n", " ")


def test_wikiart_rerun_skips_verified_files_and_retries_failures(services, tmp_path):
    state, base = services
    out = tmp_path / "raw"
    args = ["ingest", "wikiart", "--style", "Impressionism", "--out", str(out), "--base-url", base,
            "--image-base-url", base, "--max-bytes", "200000", *FAST]
    assert runner.invoke(app, args).exit_code == 0
    before = state.hits["/images/img0.jpg!Large.jpg"]
    html_before = state.hits["/images/html.jpg!Large.jpg"]
    first = _catalog(out)
    # damage one file: the rerun must fetch it again
    damaged = out / first.filter(pl.col("source_id") == "1009")["path"][0]
    damaged.write_bytes(b"garbage")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert state.hits["/images/img0.jpg!Large.jpg"] == before  # verified, not fetched again
    assert state.hits["/images/html.jpg!Large.jpg"] == html_before + 1  # failed rows are retried
    second = _catalog(out)
    assert second.height == first.height
    assert damaged.read_bytes() != b"garbage"


def test_wikiart_artist_and_v2_pagination(services, tmp_path, monkeypatch):
    state, base = services
    monkeypatch.setenv("WIKIART_ACCESS_KEY", "a")
    monkeypatch.setenv("WIKIART_SECRET_KEY", "b")
    out = tmp_path / "raw"
    res = runner.invoke(app, ["ingest", "wikiart", "--artist", "claude-monet", "--search", "pointillism",
                              "--out", str(out), "--base-url", base, "--image-base-url", base, "--size", "original",
                              *FAST])
    assert res.exit_code == 0, res.output
    cat = _catalog(out)
    assert (cat["status"] == "ok").all()
    assert sorted(cat.filter(pl.col("label") == "claude-monet")["source_id"]) == ["2000", "2001", "2002"]
    assert sorted(cat.filter(pl.col("label") == "pointillism")["source_id"]) == ["3000", "3001", "3002", "3003"]
    assert state.hits["/en/api/2/PaintingSearch"] == 2 and state.hits["/en/api/2/login"] == 1
    assert all("!" not in u for u in cat["url"])  # --size original drops the variant suffix


def test_pixiv_ranking_pages_referer_and_r18(services, tmp_path, monkeypatch):
    state, base = services
    monkeypatch.setenv("PIXIV_REFRESH_TOKEN", "good-refresh")
    out = tmp_path / "px"
    res = runner.invoke(app, ["ingest", "pixiv", "--ranking", "day", "--date", "2024-05-01", "--out", str(out),
                              "--base-url", base, "--oauth-url", base, "--image-base-url", base, *FAST])
    assert res.exit_code == 0, res.output
    cat = _catalog(out)
    assert sorted(cat["source_id"]) == ["101_p0", "102_p0", "102_p1", "104_p0"]  # 103 is R-18: skipped
    assert (cat["status"] == "ok").all()
    assert set(cat["label"]) == {"artist1", "artist2"} and set(cat["group"]) == {"1", "2"}
    assert cat.filter(pl.col("source_id") == "101_p0")["tags"][0].to_list() == ["風景", "oil"]
    assert state.hits["/v1/illust/ranking"] == 2  # followed next_url
    res = runner.invoke(app, ["ingest", "pixiv", "--tag", "oil", "--label-by", "tag", "--allow-r18", "--out",
                              str(tmp_path / "tag"), "--base-url", base, "--oauth-url", base, "--image-base-url",
                              base, *FAST])
    assert res.exit_code == 0, res.output
    assert _catalog(tmp_path / "tag")["label"].to_list() == ["oil"]


def test_pixiv_without_referer_fails_and_bad_token_is_one_line(services, tmp_path, monkeypatch):
    state, base = services
    with PoliteClient(FetchSettings(rate=200, retries=0)) as client:
        from curator.fetch import FetchError

        with pytest.raises(FetchError, match="403"):
            client.get_bytes(f"{base}/img-original/img/2024/05/01/px1_p0.jpg")
    monkeypatch.setenv("PIXIV_REFRESH_TOKEN", "wrong")
    res = runner.invoke(app, ["ingest", "pixiv", "--user", "7", "--out", str(tmp_path / "x"), "--base-url", base,
                              "--oauth-url", base, *FAST])
    assert res.exit_code == 2 and "PIXIV_REFRESH_TOKEN" in res.output and "Traceback" not in res.output
    monkeypatch.delenv("PIXIV_REFRESH_TOKEN")
    res = runner.invoke(app, ["ingest", "pixiv", "--user", "7", "--out", str(tmp_path / "y"), "--base-url", base,
                              "--oauth-url", base])
    assert res.exit_code == 2 and "PIXIV_REFRESH_TOKEN" in res.output


def test_folder_copies_or_links_and_never_moves(tmp_path):
    src = tmp_path / "src"
    paintings = sample_paintings(4)
    for p in paintings:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, src / p.parent.name / p.name)
    (src / "Baroque" / "broken.jpg").write_bytes(paintings[0].read_bytes()[:300])
    (src / "Baroque" / "notes.txt").write_text("not an image")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = tmp_path / "raw"
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out), "--group-pattern", r"^([^_]+)_"])
    assert res.exit_code == 0, res.output
    cat = _catalog(out)
    assert cat.height == 5
    assert cat.filter(pl.col("status") == "failed")["source_id"].to_list() == ["Baroque/broken.jpg"]
    ok = cat.filter(pl.col("status") == "ok")
    assert ok["group"].null_count() == 0
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_artgan_dump_with_missing_rows(tmp_path):
    dump = tmp_path / "wikiart"
    rows = []
    for i, p in enumerate(sample_paintings(4)):
        rel = f"{p.parent.name}/{p.name}"
        (dump / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dump / rel)
        rows.append(f"{rel},{i % 2}")
    rows.append("Impressionism/nobody_missing-work.jpg,1")
    (tmp_path / "style_train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "style_class.txt").write_text("0 Baroque\n1 Impressionism\n")
    out = tmp_path / "raw"
    res = runner.invoke(app, ["ingest", "artgan", str(dump), "--csv", str(tmp_path / "style_train.csv"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    cat = _catalog(out)
    assert cat.height == 5
    missing = cat.filter(pl.col("status") == "failed").row(0, named=True)
    assert missing["error"] == "file is missing" and missing["artist"] == "nobody"
    ok = cat.filter(pl.col("status") == "ok")
    assert set(ok["label"]) == {"Baroque", "Impressionism"}
    assert all(a == Path(s).name.split("_")[0] for a, s in zip(ok["artist"], ok["source_id"]))


def test_parquet_huggingface_layout(tmp_path):
    paintings = sample_paintings(3)
    table = pa.table({
        "image": [{"bytes": p.read_bytes(), "path": p.name} for p in paintings] + [{"bytes": b"<html>", "path": "x"}],
        "artist": [0, 1, 1, 0], "genre": [1, 1, 0, 0], "style": [2, 0, 1, 2],
    })
    features = {"image": {"_type": "Image"},
                "artist": {"names": ["diego-velazquez", "claude-monet"], "_type": "ClassLabel"},
                "genre": {"names": ["portrait", "landscape"], "_type": "ClassLabel"},
                "style": {"names": ["Baroque", "Impressionism", "Rococo"], "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    out = tmp_path / "raw"
    res = runner.invoke(app, ["ingest", "parquet", str(tmp_path / "train-00000.parquet"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    cat = _catalog(out).sort("source_id")
    assert cat["label"].to_list() == ["Rococo", "Baroque", "Impressionism", "Rococo"]
    assert cat["group"].to_list()[:3] == ["diego-velazquez", "claude-monet", "claude-monet"]
    assert cat["status"].to_list() == ["ok", "ok", "ok", "failed"]
    res = runner.invoke(app, ["ingest", "parquet", str(tmp_path / "train-00000.parquet"), "--out", str(out),
                              "--label-column", "nope"])
    assert res.exit_code == 2 and "label column" in res.output


KILL = """
import sys
from curator.cli import main
sys.argv = ["curator", "ingest", "wikiart", "--style", "Impressionism", "--out", sys.argv[1], "--base-url",
            sys.argv[2], "--image-base-url", sys.argv[2], "--max-bytes", "200000", "--rate", "200",
            "--concurrency", "1"]
main()
"""


def test_killed_run_resumes_to_the_same_catalog(services, tmp_path):
    state, base = services
    whole = tmp_path / "whole"
    args = ["--max-bytes", "200000", "--base-url", base, "--image-base-url", base, *FAST]
    assert runner.invoke(app, ["ingest", "wikiart", "--style", "Impressionism", "--out", str(whole), *args]
                         ).exit_code == 0
    state.delay = 0.3
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL)
    proc = subprocess.Popen([sys.executable, str(script), str(out), base], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / ".catalog.journal.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not journal.exists() or journal.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / CATALOG_NAME).exists() or _catalog(out).height < 9
    state.delay = 0.0
    res = runner.invoke(app, ["ingest", "wikiart", "--style", "Impressionism", "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    assert "already there" in res.output
    cols = ["source_id", "status", "sha256", "path"]
    a = _catalog(whole).select(cols).sort("source_id")
    b = _catalog(out).select(cols).sort("source_id")
    assert a.filter(pl.col("status") == "ok").equals(b.filter(pl.col("status") == "ok"))
    assert a["source_id"].to_list() == b["source_id"].to_list()
    assert _tree_files(whole) == _tree_files(out) and not list(out.rglob("*.part"))


def test_clean_reads_the_catalog_for_groups_and_provenance(tmp_path):
    src = tmp_path / "src"
    for p in sorted(SAMPLE.rglob("*.jpg"))[:12]:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, src / p.parent.name / p.name)
    out = tmp_path / "raw"
    assert runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out), "--group-pattern",
                               r"^([^_]+)_"]).exit_code == 0
    result = clean(CleanSettings(root=out, workspace=tmp_path / "ws", workers=0))
    df = result.manifest
    assert df.height == 12  # the catalog itself is not a row
    assert df["source"].to_list() == ["folder"] * 12
    assert df["group"].null_count() == 0 and df["source_id"].null_count() == 0
    assert set(df["group"]) == {Path(p).name.split("_")[0] for p in df["path"]}


def test_safe_names_and_retry_after():
    assert safe_name("../../etc/passwd", "x") == "etc passwd"
    assert "/" not in safe_name("a/b\\c", "x") and safe_name("", "12") == "12"
    assert len(safe_name("é" * 400, "x").encode()) <= 120
    assert safe_name(".hidden", "x") == "hidden"
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0) == pytest.approx(0.0)
    assert retry_after_seconds("soon") is None
