from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from curator.core.rowfile import RowFile


@pytest.fixture
def rows() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1000, 48)).astype(np.float16)


def test_rows_read_back_as_indexed_and_the_file_has_no_name(tmp_path, rows):
    spilled = RowFile.write(rows, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert len(spilled) == 1000 and spilled.shape == (1000, 48) and spilled.dtype == np.float16
    assert np.array_equal(np.asarray(spilled), rows)
    assert np.array_equal(spilled[7], rows[7]) and np.array_equal(spilled[-1], rows[-1])
    assert np.array_equal(spilled[10:20], rows[10:20]) and np.array_equal(spilled[990:2000], rows[990:])
    assert np.array_equal(spilled[5:50:7], rows[5:50:7]) and spilled[20:10].shape == (0, 48)
    asked = np.array([999, 3, 4, 5, 3, 0, 500, -2])  # unsorted, repeated, runs, negative
    assert np.array_equal(spilled[asked], rows[asked])
    mask = np.zeros(1000, dtype=bool)
    mask[[1, 2, 900]] = True
    assert np.array_equal(spilled[mask], rows[mask]) and spilled[np.array([], dtype=int)].shape == (0, 48)
    assert np.array_equal(np.asarray(spilled, dtype=np.float32), rows.astype(np.float32))


def test_bad_rows_raise_index_error(tmp_path, rows):
    spilled = RowFile.write(rows, tmp_path)
    for bad in (1000, -1001, np.array([0, 1000])):
        with pytest.raises(IndexError):
            spilled[bad]
    with pytest.raises(TypeError):
        spilled[0, 1]


def _resident_mb() -> float:
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")
def test_reading_scattered_rows_makes_only_them_resident(tmp_path):
    """The reason for the class: 2,000 scattered rows of a 64 MB file cost about their own 8 MB of resident memory
    (a memory map of the same file made nearly all 64 MB resident on Linux 6.18)."""
    rows = np.random.default_rng(0).standard_normal((16_384, 2_048)).astype(np.float16)
    spilled = RowFile.write(rows, tmp_path)
    asked = np.random.default_rng(1).choice(16_384, 2_000, replace=False)
    before = _resident_mb()
    got = spilled[asked]
    grown = _resident_mb() - before
    assert np.array_equal(got, rows[asked])
    assert grown < 24, f"{grown:.0f} MB resident after reading 8 MB of rows"


def test_close_deletes_the_file(tmp_path, rows):
    spilled = RowFile.write(rows, tmp_path)
    spilled.close()
    with pytest.raises((OSError, ValueError)):
        spilled[0]
