"""`classify` as a person meets it: logs in a pipe, `--version`, help in pipeline order, the option names (`--backbone`
for a backbone, `--run` for a run folder) and the deprecated `--model`, one line per failure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from classify.cli import app
from tests.conftest import REPO

CLASSIFY = [sys.executable, "-c", "from classify.cli import main; main()"]
DEPRECATED = "--model is deprecated here, use --run"


def one_error_line(result, fragment: str, code: int = 2) -> str:
    """The failed run's output: exit `code`, exactly one non-empty line, holding `fragment`, no traceback."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def trained(sample_ws, tmp_path_factory) -> tuple[Path, str]:
    """A probe-only run trained through the command line (`--backbone`), and what the command printed."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = CliRunner().invoke(app, ["train", "--splits", str(sample_ws / "splits.parquet"), "--out", str(run),
                                      "--backbone", "efficientnet_lite0", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return run, result.output


def test_version_and_commands_in_pipeline_order_with_examples():
    version = subprocess.run([*CLASSIFY, "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert version.returncode == 0 and version.stdout.startswith("classify (atelier) "), version.stderr
    shown = subprocess.run([*CLASSIFY, "--help"], capture_output=True, text=True, timeout=120, check=False).stdout
    at = [shown.index(f"│ {name} ") for name in ("models", "train", "eval", "dir", "serve")]
    assert at == sorted(at), shown
    for example in ("classify train --splits curated/splits.parquet", "classify eval --run runs/styles",
                    "classify dir ./paintings --out predictions.parquet --run runs/styles"):
        assert example in shown, shown


@pytest.mark.parametrize("command, new", [("train", "--backbone"), ("eval", "--run"), ("dir", "--run"),
                                          ("serve", "--run")])
def test_help_shows_the_new_option_names_and_hides_the_old(command, new):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and new in result.output and "--model" not in result.output.replace(
        "formerly --model", ""), result.output


def test_a_missing_run_is_a_usage_error_in_one_line():
    one_error_line(CliRunner().invoke(app, ["eval"]), "Missing option '--run'")


def test_old_and_new_name_together_are_refused(tmp_path):
    line = one_error_line(CliRunner().invoke(app, ["eval", "--run", str(tmp_path), "--model", str(tmp_path)]),
                          "--model is the old name of --run")
    assert "deprecated" not in line


def test_a_deprecated_name_in_a_failing_command_is_said_inside_the_one_error_line(tmp_path):
    line = one_error_line(CliRunner().invoke(app, ["eval", "--model", str(tmp_path)]), "not a trained model")
    assert DEPRECATED in line
    line = one_error_line(CliRunner().invoke(app, ["train", "--splits", str(tmp_path / "none.parquet"), "--out",
                                                   str(tmp_path / "r"), "--model", "efficientnet_lite0"]),
                          "no splits file")
    assert "--model is deprecated here, use --backbone" in line
    line = one_error_line(CliRunner().invoke(app, ["serve", "--port", "70000", "--model", str(tmp_path)]),
                          "--port must be 0 to 65535")
    assert DEPRECATED in line


def test_notes_of_one_run_do_not_leak_into_the_next(tmp_path):
    CliRunner().invoke(app, ["eval", "--model", str(tmp_path)])
    line = one_error_line(CliRunner().invoke(app, ["eval", "--run", str(tmp_path)]), "not a trained model")
    assert "deprecated" not in line


@pytest.mark.slow  # trains a model (module fixture), after cleaning the sample (session fixture)
def test_the_probe_says_its_fitted_accuracy_not_the_untrained_loss(trained):
    run, output = trained
    header = next(line for line in output.splitlines() if "train_accuracy" in line).split()
    row = dict(zip(header, next(line for line in output.splitlines() if " probe " in line).split()))
    classes = len(json.loads((run / "model.json").read_text())["classes"])
    assert 0.5 < float(row["train_accuracy"]) <= 1.0, output  # 5 styles: chance is 0.2
    assert float(row["train_loss"]) < math.log(classes) - 0.1, output  # ln(5) = 1.6094 is the untrained loss
    history = json.loads((run / "model.json").read_text())["history"][0]
    assert history["stage"] == "probe" and history["train_accuracy"] == pytest.approx(float(row["train_accuracy"]),
                                                                                      abs=1e-4)


@pytest.mark.slow  # trains a model (module fixture), after cleaning the sample (session fixture)
def test_a_pipe_gets_plain_progress_lines_and_uncut_tables(trained):
    run, _ = trained
    done = subprocess.run([*CLASSIFY, "eval", "--run", str(run), "--workers", "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("decode: ") and line.endswith("(done)") for line in lines), lines
    assert "0/?" not in done.stdout and "\x1b[" not in done.stdout and "…" not in done.stdout
    assert any(line.startswith("errors: ") and line.endswith("errors.html") for line in lines), lines
    assert done.stderr == ""  # no deprecation warning for the new names


@pytest.mark.slow  # trains a model (module fixture), after cleaning the sample (session fixture)
def test_the_deprecated_model_still_works_with_one_warning_line(trained, small_tree, tmp_path):
    run, _ = trained
    result = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(tmp_path / "p.parquet"), "--model",
                                      str(run), "--workers", "0"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert warnings == [f"warning: {DEPRECATED}; the old name goes in the next release"], result.stderr
    rows = pl.read_parquet(tmp_path / "p.parquet")
    assert rows["predicted"].null_count() == 0 and "label" not in rows.columns
    result = CliRunner().invoke(app, ["eval", "--model", str(run), "--workers", "0", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0 and result.stderr.count("deprecated") == 1, result.output
    assert (tmp_path / "e" / "metrics.json").is_file()
