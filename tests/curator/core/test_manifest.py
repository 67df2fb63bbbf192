from __future__ import annotations

import polars as pl
import pytest

from curator.core import manifest
from curator.core.errors import ManifestError


def frame(**overrides) -> pl.DataFrame:
    row = {
        "id": manifest.row_id("A/x.jpg"), "path": "A/x.jpg", "label": "A", "group": None, "sha256": "ab" * 32,
        "bytes": 10, "width": 40, "height": 40, "format": "JPEG", "mode": "RGB", "status": "ok", "reason": None,
        "keep": True, "pixel_sha256": "cd" * 32, "phash": "00ff00ff00ff00ff", "dhash": "0f0f0f0f0f0f0f0f",
        "crop_phash": ["00ff00ff00ff00fe", "00ff00ff00ff00fc"], "colour": "00" * 32,
    }
    row.update(overrides)
    return pl.DataFrame([row], schema=manifest.schema())


def test_round_trip_is_atomic_and_validated(tmp_path):
    path = manifest.write_atomic(frame(), tmp_path / "manifest.parquet", {"backbone_key": "k"})
    assert manifest.read(tmp_path).equals(frame())
    assert manifest.read_metadata(path)["backbone_key"] == "k"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]  # no temp file left behind


def test_missing_column_is_rejected_with_what_to_run():
    with pytest.raises(ManifestError, match="missing column.*status.*run `curator clean`"):
        manifest.validate(frame().drop("status"))


def test_wrong_type_unknown_column_and_bad_status_are_rejected():
    with pytest.raises(ManifestError, match="bytes is String"):
        manifest.validate(frame().with_columns(pl.col("bytes").cast(pl.String)))
    with pytest.raises(ManifestError, match="unknown column"):
        manifest.validate(frame().with_columns(pl.lit(1).alias("extra")))
    with pytest.raises(ManifestError, match="unknown status"):
        manifest.validate(frame(status="fine"))
    with pytest.raises(ManifestError, match="repeated paths"):
        manifest.validate(pl.concat([frame(), frame()]))


def test_missing_file_and_other_schema_version(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        manifest.read(tmp_path)
    frame().write_parquet(tmp_path / "manifest.parquet")  # no atelier metadata: an older or foreign file
    with pytest.raises(ManifestError, match="schema version None"):
        manifest.read(tmp_path)


def test_fingerprints_are_read_from_the_previous_version_too(tmp_path):
    """A rerun after an upgrade reuses version 3's verdicts (its cluster ids were row numbers; nothing else
    changed) instead of decoding every file again; other versions are refused."""
    old = frame().with_columns(pl.lit(0, dtype=pl.Int32).alias("cluster"))
    path = tmp_path / "manifest.parquet"
    old.write_parquet(path, metadata={"atelier": '{"schema_version": 3}'})
    with pytest.raises(ManifestError, match="schema version 3"):
        manifest.read(path)
    prints = manifest.read_fingerprints(path)
    assert prints.columns == list(manifest.FINGERPRINT_COLUMNS) and prints["phash"].item() == "00ff00ff00ff00ff"
    old.write_parquet(path, metadata={"atelier": '{"schema_version": 2}'})
    with pytest.raises(ManifestError, match="another manifest schema version"):
        manifest.read_fingerprints(path)
