from __future__ import annotations

import errno

import pytest

from classify.cli import app as classify_app
from curator import entry
from curator.cli import app as curator_app


@pytest.mark.parametrize(
    "app, args, fragment",
    [
        (curator_app, ["clean", "data/sample", "--batch-size", "0"], "--batch-size"),
        (curator_app, ["clean", "data/sample", "--workers", "-1"], "--workers"),
        (curator_app, ["clean", "data/sample", "--no-such-flag"], "No such option"),
        (curator_app, ["clean"], "Missing argument"),
        (curator_app, ["split", "--folds", "many"], "--folds"),
        (classify_app, ["dir"], "Missing argument"),
        (classify_app, ["eval", "--bogus"], "No such option"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(app, args, fragment, capsys):
    assert entry.run(app, args) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_an_os_error_nobody_expected_is_one_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    import curator.stages.clean

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ws" / "manifest.parquet"))

    monkeypatch.setattr(curator.stages.clean, "clean", disk_full)
    assert entry.run(curator_app, ["clean", "data/sample", "--out", str(tmp_path / "ws")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help_still_exits_0(capsys):
    assert entry.run(curator_app, ["--help"]) == 0
    assert "clean" in capsys.readouterr().out
