from __future__ import annotations

import json
import os
import re
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

from curator.cli import app
from curator.core.ownership import MARKER
from curator.ingest.catalog import CATALOG_NAME, PART_SUFFIX, safe_name
from curator.ingest.fetch import FetchSettings, PoliteClient, retry_after_seconds
from curator.stages.clean import CleanSettings, clean
from tests.conftest import REPO, SAMPLE, sample_paintings

runner = CliRunner()
FAST = ["--rate", "200", "--retries", "3"]


def _catalog(out: Path) -> pl.DataFrame:
    with open(out / CATALOG_NAME, "rb") as fh:  # polars refuses a path that is not UTF-8, not a file object
        return pl.read_parquet(fh)


def _tree_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                  and p.name not in (CATALOG_NAME, MARKER))


def _parts(out: Path) -> list[Path]:
    """Part files left in OUT (today's `.NAME.atelier-part` and the `.NAME.part` of earlier versions)."""
    return [p for p in out.rglob("*") if p.name.endswith((PART_SUFFIX, ".part"))]


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
    assert len(_tree_files(out)) == 7 and not _parts(out)
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
        from curator.ingest.fetch import FetchError

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
    # the dump's file names are kept; the title (after the artist) is a column
    assert ok["path"].to_list() == [f"{la}/{Path(s).name}" for la, s in zip(ok["label"], ok["source_id"])]
    assert all(Path(s).stem.split("_", 1)[1] == t for s, t in zip(ok["source_id"], ok["title"]))


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
    assert cat["path"].to_list()[:3] == [f"{la}/{p.name}" for la, p in zip(cat["label"], paintings)]
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
    assert _tree_files(whole) == _tree_files(out) and not _parts(out)


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


# ---------------------------------------------------------------------------------------------- issue 14: reliability

MARK = b"OUTSIDE-SECRET-MARKER-5c1e"


def _one_line_error(res, *fragments: str, code: int = 2) -> str:
    """The run failed with `code`, said why in exactly one `error:` line (the last one), and showed no traceback."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _copy_sample(src: Path, n: int = 4) -> list[Path]:
    placed = []
    for p in sample_paintings(n):
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        placed.append(src / p.parent.name / p.name)
        shutil.copy(p, placed[-1])
    return placed


def _bytes_under(out: Path) -> bytes:
    """Every regular file under OUT, concatenated (symbolic links are not files atelier should leave there)."""
    chunks = []
    for dirpath, _, files in os.walk(out):
        for name in files:
            path = Path(dirpath) / name
            assert not path.is_symlink(), f"{path} is a symbolic link"
            chunks.append(path.read_bytes())
    return b"".join(chunks)


def _fsname(raw: bytes) -> str:
    return os.fsdecode(raw)


def test_names_that_are_not_utf8_become_rows_and_round_trip(tmp_path):
    from curator.core.paths import from_text

    src = tmp_path / "src"
    painting = sample_paintings(2)
    (src / "Baroque").mkdir(parents=True)
    odd_folder = src / _fsname(b"Rok\xf3k\xf3")
    odd_folder.mkdir()
    odd_file = src / "Baroque" / _fsname(b"caf\xe9_portrait.jpg")
    shutil.copy(painting[0], odd_file)
    shutil.copy(painting[1], odd_folder / "plain.jpg")
    out = tmp_path / _fsname(b"raw\xe9")  # OUT's own name is not UTF-8 either
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out), "--group-pattern", r"^([^_]+)_"])
    assert res.exit_code == 0, res.output
    cat = _catalog(out)
    assert cat.height == 2 and (cat["status"] == "ok").all() and cat["source_id_escaped"].all()
    originals = {from_text(s, True) for s in cat["source_id"]}
    assert originals == {odd_file.relative_to(src).as_posix(), (odd_folder / "plain.jpg").relative_to(src).as_posix()}
    for row in cat.iter_rows(named=True):
        row["path"].encode("utf-8")  # landed names are valid UTF-8
        landed = out / row["path"]
        assert landed.read_bytes() == (src / from_text(row["source_id"], True)).read_bytes()
    assert set(cat["group"]) == {"caf\\xe9", None}
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
    assert res.exit_code == 0 and "added 0, already there 2, failed 0" in res.output, res.output

    # the ArtGAN dump: a CSV whose bytes name the file as the file system does
    dump = tmp_path / "dump"
    (dump / "Baroque").mkdir(parents=True)
    shutil.copy(painting[0], dump / "Baroque" / _fsname(b"ren\xe9_study.jpg"))
    (tmp_path / "style_train.csv").write_bytes(b"Baroque/ren\xe9_study.jpg,0\nBaroque/absent\xff.jpg,0\n")
    (tmp_path / "style_class.txt").write_text("0 Baroque\n")
    res = runner.invoke(app, ["ingest", "artgan", str(dump), "--csv", str(tmp_path / "style_train.csv"),
                              "--out", str(tmp_path / "art")])
    assert res.exit_code == 0, res.output
    cat = _catalog(tmp_path / "art").sort("source_id")
    assert cat["status"].to_list() == ["failed", "ok"] and cat["source_id_escaped"].all()
    assert cat["error"][0] == "file is missing" and cat["artist"][1] == "ren\\xe9"
    assert from_text(cat["source_id"][1], True) == _fsname(b"Baroque/ren\xe9_study.jpg")

    # a parquet source whose file name is not UTF-8
    source = tmp_path / _fsname(b"train-\xff.parquet")
    with open(source, "wb") as fh:
        pq.write_table(pa.table({"image": [painting[0].read_bytes()], "style": ["Baroque"]}), fh)
    res = runner.invoke(app, ["ingest", "parquet", str(source), "--out", str(tmp_path / "pq")])
    assert res.exit_code == 0, res.output
    cat = _catalog(tmp_path / "pq")
    assert cat["status"].to_list() == ["ok"] and cat["source_id"].to_list() == ["train-\\xff.parquet:0"]
    assert cat["source_id_escaped"].to_list() == [True]


def test_safe_name_handles_surrogates():
    for text in (_fsname(b"caf\xe9"), "\ud800lone", "x\udcff" * 200):
        name = safe_name(text, "fallback")
        name.encode("utf-8")
        assert "/" not in name and len(name.encode()) <= 120


RUN = "import sys\nfrom curator.cli import main\nsys.argv = ['curator', *sys.argv[1:]]\nmain()\n"


def test_fifo_never_hangs_and_large_files_are_capped(tmp_path):
    src = tmp_path / "src"
    placed = _copy_sample(src, 2)
    os.mkfifo(src / "Baroque" / "pipe.jpg")
    big = src / "Baroque" / "big.png"
    big.write_bytes(placed[0].read_bytes() + bytes(300_000))
    out = tmp_path / "raw"
    script = tmp_path / "run.py"
    script.write_text(RUN)
    proc = subprocess.run([sys.executable, str(script), "ingest", "folder", str(src), "--out", str(out),
                           "--max-bytes", "200000"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["source_id"]: r for r in _catalog(out).iter_rows(named=True)}
    assert rows["Baroque/pipe.jpg"]["status"] == "failed" and "FIFO" in rows["Baroque/pipe.jpg"]["error"]
    big_row = rows["Baroque/big.png"]
    assert big_row["status"] == "failed" and "too large" in big_row["error"]
    assert "--max-bytes 200,000" in big_row["error"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 2
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(tmp_path / "zero"), "--max-bytes", "0"])
    _one_line_error(res, "--max-bytes")
    assert not (tmp_path / "zero").exists()


@pytest.mark.parametrize("link", ["--link", "--no-link"])
def test_links_out_of_the_source_are_rows_and_never_brought_in(tmp_path, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "private.jpg"
    secret.write_bytes(sample_paintings(1)[0].read_bytes() + MARK)  # a real JPEG with the marker after its end
    (outside / "more.jpg").write_bytes(secret.read_bytes())
    src = tmp_path / "src"
    placed = _copy_sample(src, 2)
    os.symlink(secret, src / "Baroque" / "escape.jpg")
    os.symlink(outside, src / "Elsewhere")
    os.symlink(Path("..") / placed[1].parent.name / placed[1].name, src / "Baroque" / "inner.jpg")
    dump_csv = tmp_path / "style_train.csv"
    dump_csv.write_text(f"Baroque/escape.jpg,0\nBaroque/inner.jpg,0\n../outside/private.jpg,0\n"
                        f"Elsewhere/more.jpg,0\n{placed[0].parent.name}/{placed[0].name},0\n")
    (tmp_path / "style_class.txt").write_text("0 Baroque\n")
    for command in (["folder", str(src)], ["artgan", str(src), "--csv", str(dump_csv)]):
        out = tmp_path / f"out-{command[0]}"
        res = runner.invoke(app, ["ingest", *command, "--out", str(out), link])
        assert res.exit_code == 0, res.output
        rows = {r["source_id"]: r for r in _catalog(out).iter_rows(named=True)}
        assert rows["Baroque/escape.jpg"]["status"] == "failed"
        assert str(secret) in rows["Baroque/escape.jpg"]["error"]
        assert "--follow-symlinks" in rows["Baroque/escape.jpg"]["error"]
        elsewhere = rows["Elsewhere" if command[0] == "folder" else "Elsewhere/more.jpg"]
        assert elsewhere["status"] == "failed" and "outside" in elsewhere["error"]
        assert rows["Baroque/inner.jpg"]["status"] == "ok"  # a link inside the source keeps working
        if command[0] == "artgan":
            assert rows["../outside/private.jpg"]["error"] == "path leaves the dump folder"
        assert MARK not in _bytes_under(out)
    # asked for, the outside file is read: the check above can fail
    out = tmp_path / "followed"
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out), "--follow-symlinks", link])
    assert res.exit_code == 0, res.output
    assert MARK in _bytes_under(out)


def test_out_is_claimed_and_only_atelier_part_files_are_removed(tmp_path):
    src = tmp_path / "src"
    _copy_sample(src, 2)
    # a folder of the user's own files is refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(mine)])
    _one_line_error(res, "atelier did not write")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # --out that is a file
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(mine / "notes.txt")])
    _one_line_error(res, "is a file")
    out = tmp_path / "raw"
    assert runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)]).exit_code == 0
    label = next(p for p in out.iterdir() if p.is_dir())
    users = {out / ".notes.part": b"user notes", label / ".draft.jpg.part": b"user draft"}
    for path, data in users.items():
        path.write_bytes(data)
    stale = label / f".left-by-a-kill.jpg{PART_SUFFIX}"
    stale.write_bytes(b"half an image")
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {p: p.read_bytes() for p in users} == users
    assert not stale.exists()


def test_an_earlier_versions_out_is_adopted(tmp_path):
    src = tmp_path / "src"
    _copy_sample(src, 2)
    out = tmp_path / "raw"
    assert runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)]).exit_code == 0
    (out / MARKER).unlink()  # as an earlier version left it: catalog and tree, no marker
    with open(out / ".catalog.journal.jsonl", "ab") as fh:  # a torn line, bytes that are not UTF-8, a stray type
        fh.write(b'{"source": "folder", "source_id": 5, "status": "ok"}\n\xff\xfe garbage\n{"source": "fol')
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "added 0, already there 2" in res.output and (out / MARKER).is_file()
    assert _catalog(out).height == 2


def test_out_inside_the_source_is_not_ingested_again(tmp_path):
    src = tmp_path / "src"
    _copy_sample(src, 4)
    out = src / "raw"
    first = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = _catalog(out)
    second = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "added 0, already there 4, failed 0" in second.output
    after = _catalog(out)
    assert after.height == before.height == 4
    assert not any(s.startswith("raw/") for s in after["source_id"])


def _foreign_parquet(path: Path) -> bytes:
    pl.DataFrame({"path": ["a.jpg"], "score": [0.5]}).write_parquet(path)
    return path.read_bytes()


def test_a_foreign_or_malformed_catalog_in_out_is_refused_and_kept(tmp_path):
    from curator.core.manifest import write_atomic
    from curator.ingest.catalog import CATALOG_KIND

    src = tmp_path / "src"
    _copy_sample(src, 2)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    data = _foreign_parquet(fresh / CATALOG_NAME)
    _one_line_error(runner.invoke(app, ["ingest", "folder", str(src), "--out", str(fresh)]),
                    "not written by atelier")
    assert (fresh / CATALOG_NAME).read_bytes() == data and sorted(os.listdir(fresh)) == [CATALOG_NAME]
    # atelier's own OUT where the user put a parquet of theirs, or a catalog whose columns were rewritten
    out = tmp_path / "raw"
    assert runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)]).exit_code == 0
    data = _foreign_parquet(out / CATALOG_NAME)
    _one_line_error(runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)]), "not written by atelier")
    assert (out / CATALOG_NAME).read_bytes() == data
    bad = _catalog_frame().with_columns(pl.lit(1.5).alias("label"))
    write_atomic(bad, out / CATALOG_NAME, metadata={"kind": CATALOG_KIND})
    data = (out / CATALOG_NAME).read_bytes()
    _one_line_error(runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)]), "label is Float64")
    assert (out / CATALOG_NAME).read_bytes() == data
    (out / CATALOG_NAME).write_bytes(b"PAR1 not really")
    _one_line_error(runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)]), "not a readable Parquet")


def _catalog_frame() -> pl.DataFrame:
    from curator.ingest.catalog import CATALOG_SCHEMA

    row = {c: None for c in CATALOG_SCHEMA} | {"path": "Baroque/a.jpg", "label": "Baroque", "source": "folder",
                                                 "source_id": "Baroque/a.jpg", "status": "ok", "tags": [],
                                                 "source_id_escaped": False}
    return pl.DataFrame([row], schema=CATALOG_SCHEMA)


def test_read_catalog_knows_atelier_catalogs_from_other_files(tmp_path):
    from curator.core.errors import UsageError
    from curator.core.manifest import write_atomic
    from curator.ingest.catalog import CATALOG_KIND, read_catalog

    root = tmp_path / "root"
    root.mkdir()
    assert read_catalog(root) is None
    _foreign_parquet(root / CATALOG_NAME)
    assert read_catalog(root) is None  # someone else's file: clean treats it as an ordinary file
    (root / CATALOG_NAME).write_bytes(b"not parquet at all")
    assert read_catalog(root) is None
    write_atomic(_catalog_frame(), root / CATALOG_NAME, metadata={"kind": CATALOG_KIND})
    assert read_catalog(root)["source_id"].to_list() == ["Baroque/a.jpg"]
    # an earlier version's catalog: atelier metadata without a kind, no source_id_escaped column
    write_atomic(_catalog_frame().drop("source_id_escaped"), root / CATALOG_NAME)
    assert read_catalog(root)["source_id_escaped"].to_list() == [False]
    for broken, fragment in ((_catalog_frame().with_columns(pl.lit(3).alias("status")), "status is Int32"),
                             (_catalog_frame().with_columns(pl.lit("maybe").alias("status")), "unknown status"),
                             (_catalog_frame().drop("sha256"), "lacks column(s) sha256")):
        write_atomic(broken, root / CATALOG_NAME, metadata={"kind": CATALOG_KIND})
        with pytest.raises(UsageError, match=re.escape(fragment)) as info:
            read_catalog(root)
        assert "\n" not in str(info.value)
    # in a folder an ingest made, an unreadable catalog is atelier's, damaged
    out = tmp_path / "raw"
    src = tmp_path / "src"
    _copy_sample(src, 1)
    assert runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)]).exit_code == 0
    (out / CATALOG_NAME).write_bytes(b"truncated")
    with pytest.raises(UsageError, match="unreadable") as info:
        read_catalog(out)
    assert "\n" not in str(info.value)


NOWHERE = "http://127.0.0.1:9"


@pytest.mark.parametrize("args, fragment", [
    (["wikiart", "--style", "Baroque", "--rate", "0"], "--rate"),
    (["wikiart", "--style", "Baroque", "--rate", "-2"], "--rate"),
    (["wikiart", "--style", "Baroque", "--rate", "nan"], "--rate must be a positive number, got nan"),
    (["wikiart", "--style", "Baroque", "--timeout", "nan"], "--timeout"),
    (["wikiart", "--style", "Baroque", "--concurrency", "0"], "--concurrency"),
    (["wikiart", "--style", "Baroque", "--max-bytes", "0"], "--max-bytes"),
    (["folder", "{tmp}/nowhere"], "does not exist"),
    (["folder", "{tmp}/src", "--group-pattern", "([unclosed"], "--group-pattern"),
    (["folder", "{tmp}/src", "--max-bytes", "-5"], "--max-bytes"),
    (["artgan", "{tmp}/src", "--csv", "{tmp}/absent.csv"], "--csv"),
    (["artgan", "{tmp}/src", "--csv", "{tmp}/style_train.csv", "--classes", "{tmp}/absent.txt"], "--classes"),
    (["artgan", "{tmp}/nowhere", "--csv", "{tmp}/style_train.csv"], "does not exist"),
    (["parquet", "{tmp}/float_labels.parquet"], "label column 'style' holds double"),
    (["parquet", "{tmp}/text_images.parquet"], "image column 'image' holds string"),
    (["parquet", "{tmp}/absent.parquet"], "does not exist"),
])
def test_bad_input_is_one_line_before_out_is_touched(tmp_path, args, fragment):
    _copy_sample(tmp_path / "src", 1)
    (tmp_path / "style_train.csv").write_text("Baroque/x.jpg,0\n")
    blob = sample_paintings(1)[0].read_bytes()
    pq.write_table(pa.table({"image": [{"bytes": blob, "path": "a.jpg"}], "style": [1.0]}),
                   tmp_path / "float_labels.parquet")
    pq.write_table(pa.table({"image": ["a.jpg"], "style": [1]}), tmp_path / "text_images.parquet")
    out = tmp_path / "raw"
    argv = ["ingest", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(out)]
    if args[0] == "wikiart":
        argv += ["--base-url", NOWHERE]
    _one_line_error(runner.invoke(app, argv), fragment)
    assert not out.exists()


def test_parquet_class_ids_outside_the_names_are_failed_rows(tmp_path):
    blob = sample_paintings(1)[0].read_bytes()
    table = pa.table({"image": [{"bytes": blob, "path": "a.jpg"}] * 2, "style": [0, 7]})
    features = {"style": {"names": ["Baroque"], "_type": "ClassLabel"}}
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}),
                   tmp_path / "t.parquet")
    res = runner.invoke(app, ["ingest", "parquet", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "raw")])
    assert res.exit_code == 0, res.output
    cat = _catalog(tmp_path / "raw").sort("source_id")
    assert cat["status"].to_list() == ["ok", "failed"] and cat["label"].to_list() == ["Baroque", None]
    assert "class id 7" in cat["error"][1]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_landed_files_follow_the_umask(tmp_path, umask, mode):
    src = tmp_path / "src"
    _copy_sample(src, 2)
    old = os.umask(umask)
    try:
        res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(tmp_path / "raw"), "--no-link"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    cat = _catalog(tmp_path / "raw")
    for rel in [*cat["path"], CATALOG_NAME]:
        assert (tmp_path / "raw" / rel).stat().st_mode & 0o777 == mode, rel


# ---------------------------------------------------------------------------------------------- issue 21: names kept


def _sources_of(out: Path, src: Path) -> dict[str, Path]:
    """The catalog's map of every landed file (path under OUT) to the source file it came from, checked: one row per
    file, every file in the tree is a row's, and each file holds its source's bytes."""
    from curator.core.paths import from_text

    ok = _catalog(out).filter(pl.col("status") == "ok")
    assert ok["path"].n_unique() == ok.height  # one file per item: no two rows share a landed file
    assert sorted(ok["path"]) == _tree_files(out)
    mapping = {row["path"]: src / from_text(row["source_id"], row["source_id_escaped"])
               for row in ok.iter_rows(named=True)}
    for rel, source in mapping.items():
        assert (out / rel).read_bytes() == source.read_bytes(), rel
    return mapping


def test_the_samples_names_survive_ingest_folder_unchanged(tmp_path):
    from tests.conftest import tree_checksums

    before = tree_checksums(SAMPLE)
    out = tmp_path / "raw"
    res = runner.invoke(app, ["ingest", "folder", str(SAMPLE), "--out", str(out), "--group-pattern", r"^([^_]+)_"])
    assert res.exit_code == 0, res.output
    images = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*.jpg"))
    cat = _catalog(out)
    assert cat.height == len(images) == 150 and (cat["status"] == "ok").all()
    assert cat["path"].to_list() == cat["source_id"].to_list()  # OUT/<label>/<name> is the source's label/name
    assert _tree_files(out) == images
    assert "Rococo/william-hogarth_before-1.jpg" in images  # the name the issue saw mangled
    assert not any("__" in p or p.endswith(".jpg.jpg") for p in cat["path"])
    assert {rel: src.relative_to(SAMPLE).as_posix() for rel, src in _sources_of(out, SAMPLE).items()} == \
        {p: p for p in images}
    row = cat.filter(pl.col("path") == "Rococo/william-hogarth_before-1.jpg").row(0, named=True)
    assert row["title"] == "william-hogarth_before-1" and row["group"] == "william-hogarth"
    assert tree_checksums(SAMPLE) == before  # the source is never touched


def _write_clash_tree(src: Path) -> None:
    a, b, c = (p.read_bytes() for p in sample_paintings(3))
    for rel, data in (("Baroque/one/x.jpg", a), ("Baroque/two/x.jpg", b), ("Baroque/x.jpg", c),
                      ("Baroque/one/same.jpg", a), ("Baroque/two/same.jpg", a)):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)


def test_a_clash_gets_a_suffix_in_listing_order_and_never_overwrites(tmp_path):
    src = tmp_path / "src"
    _write_clash_tree(src)
    outs = []
    for run in range(2):
        out = tmp_path / f"raw{run}"
        res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
        assert res.exit_code == 0, res.output
        outs.append(out)
    # listed in order one/, two/, then the folder's own files; the first keeps the name, the next get ~2, ~3
    expected = {"Baroque/x.jpg": "Baroque/one/x.jpg", "Baroque/x~2.jpg": "Baroque/two/x.jpg",
                "Baroque/x~3.jpg": "Baroque/x.jpg", "Baroque/same.jpg": "Baroque/one/same.jpg",
                "Baroque/same~2.jpg": "Baroque/two/same.jpg"}
    for out in outs:  # the same source gives the same names
        mapping = _sources_of(out, src)
        assert {rel: p.relative_to(src).as_posix() for rel, p in mapping.items()} == expected
    # a rerun keeps them; a damaged file is written again under its own name, not a new one
    damaged = outs[0] / "Baroque" / "x~2.jpg"
    damaged.unlink()  # it is a hard link to the source: replace it, do not write through it
    damaged.write_bytes(b"garbage")
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(outs[0])])
    assert res.exit_code == 0 and "added 1, already there 4" in res.output.replace("\n", " "), res.output
    assert {rel: p.relative_to(src).as_posix() for rel, p in _sources_of(outs[0], src).items()} == expected


class _SlowClient:
    """A stand-in for PoliteClient whose downloads finish in the reverse of the listing order (and one fails)."""

    def __init__(self, blobs: dict[str, bytes], delays: dict[str, float]):
        self.blobs, self.delays, self.bytes = blobs, delays, 0

    def get_bytes(self, url: str, headers: dict | None = None) -> bytes:
        from curator.ingest.fetch import FetchError

        time.sleep(self.delays.get(url, 0.0))
        if url not in self.blobs:
            raise FetchError(f"HTTP 404 from {url}")
        return self.blobs[url]


def test_names_follow_the_listing_not_the_order_downloads_finish(tmp_path):
    from curator.ingest.catalog import Item, run_ingest

    paintings = [p.read_bytes() for p in sample_paintings(4)]
    urls = [f"http://mirror/{i}.jpg" for i in range(5)]
    blobs = {urls[0]: paintings[0], urls[1]: paintings[1], urls[3]: paintings[2], urls[4]: paintings[3]}
    delays = {url: 0.4 - 0.1 * i for i, url in enumerate(urls)}  # the first listed finishes last
    items = [Item(source="mirror", source_id=str(i), label="Baroque", url=url, name="study.jpg", title=f"t{i}")
             for i, url in enumerate(urls)]
    result = run_ingest(items, tmp_path / "raw", _SlowClient(blobs, delays), concurrency=5)
    assert (result.added, result.failed) == (4, 1)
    rows = {r["source_id"]: r for r in _catalog(tmp_path / "raw").iter_rows(named=True)}
    assert {sid: r["path"] for sid, r in rows.items()} == {
        "0": "Baroque/study.jpg", "1": "Baroque/study~2.jpg", "2": None, "3": "Baroque/study~3.jpg",
        "4": "Baroque/study~4.jpg"}
    assert "404" in rows["2"]["error"] and rows["3"]["title"] == "t3"  # the title is a column, not the name


def test_kept_names_are_sanitised_only_where_they_must_be():
    from curator.ingest.catalog import MAX_KEPT_BYTES, Item, kept_name, wanted_name

    assert kept_name("william-hogarth_before-1.jpg") == "william-hogarth_before-1.jpg"
    assert kept_name("名前 with space <b>&'50%'.JPEG") == "名前 with space <b>&'50%'.JPEG"  # legal: left alone
    assert kept_name("a/b\\c.jpg") == "a%2Fb%5Cc.jpg"
    assert kept_name("nul\x00line\nbreak\x7f.png") == "nul%00line%0Abreak%7F.png"
    assert kept_name(_fsname(b"caf\xe9.jpg")) == "caf%E9.jpg"  # a byte that is not UTF-8, as itself
    assert kept_name(".hidden.jpg") == "%2Ehidden.jpg" and kept_name("..") == "%2E."
    assert kept_name(f".x.jpg{PART_SUFFIX}").startswith("%2E")  # never mistaken for a part file
    item = Item(source="s", source_id="Baroque/scan", label="Baroque", name="scan")
    assert wanted_name(item, ".png") == "scan.png"  # no image extension: the one its bytes call for
    item.name = "photo.jpeg"
    assert wanted_name(item, ".jpg") == "photo.jpeg"  # an image extension is kept, never doubled
    item.name = "notes.txt"
    assert wanted_name(item, ".jpg") == "notes.txt.jpg"
    item.name, item.title, item.source_id = None, "Sunrise", "1001"
    assert wanted_name(item, ".jpg") == "Sunrise__1001.jpg"  # no source file name: title and id
    item.name = "é" * 200 + ".jpg"
    assert wanted_name(item, ".jpg") == item.name  # cut only where a name must be cut: at landing
    assert MAX_KEPT_BYTES + len(PART_SUFFIX) + 1 == 255


def test_odd_names_land_the_documented_way(tmp_path):
    src = tmp_path / "src"
    (src / "Baroque").mkdir(parents=True)
    a, b, c, d = (p.read_bytes() for p in sample_paintings(4))
    files = {"line\nbreak.jpg": a, _fsname(b"caf\xe9 & <b>.jpg"): b, ".hidden.jpg": c, "scan": d,
             "UPPER.JPEG": a, "e" * 250 + ".jpg": b, "é" * 120 + ".png": c}
    for name, data in files.items():
        (src / "Baroque" / name).write_bytes(data)
    out = tmp_path / "raw"
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    mapping = {rel.split("/", 1)[1]: p.name for rel, p in _sources_of(out, src).items()}
    long_e = "e" * (241 - 4) + ".jpg"
    long_png = "é" * 118 + ".png"  # 240 bytes: a character is never cut in half
    assert mapping == {"line%0Abreak.jpg": "line\nbreak.jpg", "caf%E9 & <b>.jpg": _fsname(b"caf\xe9 & <b>.jpg"),
                       "%2Ehidden.jpg": ".hidden.jpg", "scan.jpg": "scan", "UPPER.JPEG": "UPPER.JPEG",
                       long_e: "e" * 250 + ".jpg", long_png: "é" * 120 + ".png"}
    assert all(len(name.encode()) <= 241 for name in mapping)
    res = runner.invoke(app, ["ingest", "folder", str(src), "--out", str(out)])
    assert res.exit_code == 0 and "added 0, already there 7" in res.output.replace("\n", " "), res.output
