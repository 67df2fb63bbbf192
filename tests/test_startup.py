"""Start-up hygiene: the command lines and every `--help` load none of the heavy libraries.

`curator --help` has to answer in a blink, so torch, timm, faiss, scikit-learn, matplotlib and polars are imported
only inside the commands that use them. Each check runs in a fresh interpreter (this test process has long since
imported them all) and asks it which of them ended up in `sys.modules`. Timings are not asserted here: they are
measured by hand and recorded in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from classify.cli import app as classify_app
from curator.cli import app as curator_app
from tests.conftest import REPO

HEAVY = ("torch", "timm", "faiss", "sklearn", "matplotlib", "polars")

#: Prints, as JSON, the exit code of `curator.entry.run(APP, ARGS)` (or null when no app is named) and which HEAVY
#: modules were loaded; argv: heavy names (comma-separated), a statement to run first, then the app module and args.
PROBE = """
import json, sys
exec(sys.argv[2])
import curator.cli, classify.cli
code = None
if len(sys.argv) > 3:
    import importlib
    from curator.entry import run
    code = run(importlib.import_module(sys.argv[3]).app, sys.argv[4:])
print(json.dumps({"code": code, "loaded": sorted(m for m in sys.argv[1].split(",") if m in sys.modules)}))
"""


def probe(*args: str, first: str = "pass") -> tuple[dict, str]:
    """Run PROBE in a fresh interpreter; its JSON verdict (last stdout line) and everything it printed."""
    done = subprocess.run([sys.executable, "-c", PROBE, ",".join(HEAVY), first, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return json.loads(done.stdout.strip().splitlines()[-1]), output


def command_paths(app: typer.Typer) -> list[list[str]]:
    """Every command and group under `app`, as the argument lists that name them ([] is the app itself)."""
    paths: list[list[str]] = []

    def walk(command, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


HELP_CASES = [("curator.cli", path) for path in command_paths(curator_app)] + \
             [("classify.cli", path) for path in command_paths(classify_app)]


def test_every_command_is_covered():
    """The walk finds the commands (a walk that found none would make the --help checks pass vacuously)."""
    named = {(module, " ".join(path)) for module, path in HELP_CASES}
    for expected in [("curator.cli", ""), ("curator.cli", "clean"), ("curator.cli", "split"),
                     ("curator.cli", "ingest folder"), ("classify.cli", ""), ("classify.cli", "train"),
                     ("classify.cli", "eval"), ("classify.cli", "dir"), ("classify.cli", "models"),
                     ("classify.cli", "serve")]:
        assert expected in named


def test_the_probe_sees_a_heavy_import():
    """The same probe reports a heavy library when one is imported, so an empty answer means something."""
    verdict, output = probe(first="import polars")
    assert verdict["loaded"] == ["polars"], output


def test_importing_both_command_lines_loads_no_heavy_library():
    verdict, output = probe()
    assert verdict["loaded"] == [], output


@pytest.mark.parametrize("module, path", HELP_CASES, ids=[f"{m.split('.')[0]} {' '.join(p)}".strip()
                                                           for m, p in HELP_CASES])
def test_help_loads_no_heavy_library(module, path):
    verdict, output = probe(module, *path, "--help")
    assert verdict["code"] == 0, output
    assert "Usage" in output and "Traceback" not in output, output
    assert verdict["loaded"] == [], output
