"""A curated, split workspace made from the public-domain sample once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from curator.stages.clean import CleanSettings, clean
from curator.stages.splits import SplitSettings, make_splits
from tests.conftest import SAMPLE

PATTERN = r"^([^_]+)_"


@pytest.fixture(scope="session")
def sample_ws(tmp_path_factory) -> Path:
    """`curator clean` + `curator split` (artist-grouped) on a copy of data/sample; returns the workspace."""
    base = tmp_path_factory.mktemp("classify")
    raw = base / "raw"
    shutil.copytree(SAMPLE, raw, ignore=shutil.ignore_patterns("*.md"))
    ws = base / "ws"
    clean(CleanSettings(root=raw, workspace=ws, group_pattern=PATTERN, workers=1))
    make_splits(ws, SplitSettings(group_pattern=PATTERN))
    return ws


@pytest.fixture(scope="session")
def sample_ws_mixed(tmp_path_factory, sample_ws) -> Path:
    """The same images split with duplicate clusters kept together but artists free to cross splits (for one
    artist against the rest), in a copy of the workspace."""
    ws = tmp_path_factory.mktemp("mixed") / "ws"
    shutil.copytree(sample_ws, ws, ignore=shutil.ignore_patterns("thumbs", "pixels"))
    make_splits(ws, SplitSettings(use_groups=False, seed=3))
    return ws
