"""What a log file or a pipe gets from `curator`: plain progress lines, full-width tables, the version."""

from __future__ import annotations

import subprocess
import sys

import pytest

CURATOR = [sys.executable, "-c", "from curator.cli import main; main()"]


@pytest.mark.slow  # runs `curator clean` in a subprocess (25 s on 2 busy cores)
def test_a_pipe_gets_plain_progress_lines_and_uncut_tables(small_tree, tmp_path):
    long_class = small_tree / "Abstract_Expressionism_and_Other_Long_Names"
    next(p for p in small_tree.iterdir() if p.is_dir()).rename(long_class)
    out = subprocess.run([*CURATOR, "clean", str(small_tree), "--out", str(tmp_path / "ws"), "--workers", "0"],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("integrity + embeddings: ") and line.endswith("(done)") for line in lines), lines
    assert "0/?" not in out.stdout and "\x1b[" not in out.stdout  # no bars of unknown length, no terminal codes
    assert "Abstract_Expressionism_and_Other_Long_Names" in out.stdout and "…" not in out.stdout
    assert any(line.startswith("  quality: ") for line in lines)


def test_version_and_pipeline_order_in_help():
    version = subprocess.run([*CURATOR, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0 and version.stdout.startswith("curator (atelier) ")
    shown = subprocess.run([*CURATOR, "--help"], capture_output=True, text=True, timeout=60, check=False).stdout
    assert shown.index("ingest ") < shown.index("clean ") < shown.index("split ")
    assert "curator clean raw --out curated" in shown


def test_plain_progress_says_counts_rates_and_the_end_never_an_unknown_total():
    """`PlainProgress` (cli_support, shared by both CLIs): a line per stage when `every` seconds have passed and one
    when it ends; a stage of unknown length counts without a total; a new stage ends the previous one."""
    from io import StringIO

    from rich.console import Console

    from curator.cli_support import PlainProgress

    out = StringIO()
    with PlainProgress(Console(file=out, width=200), every=0.0) as bar:
        listed = bar.add_task("listing", total=None)
        bar.advance(listed, 3)
        decode = bar.add_task("decode", total=10)
        bar.update(decode, advance=4, description="decode (workers 2)")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("listing: 3, ") and lines[1].startswith("listing: 3, ") and lines[1].endswith("(done)")
    assert lines[2].startswith("decode (workers 2): 4/10, ") and lines[-1].endswith("(done)"), lines
    assert len(lines) == 4 and "?" not in out.getvalue()
