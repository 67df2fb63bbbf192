from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from curator.core.hashing import hamming
from curator.stages.duplicates import (
    DuplicateSettings,
    connected_clusters,
    embedding_pairs,
    exact_pairs,
    find_duplicates,
    keeper_order,
    phash_pairs,
    radius_pairs,
    similarity,
    typical_gap,
)
from curator.stages.planting import make_copy
from tests.conftest import SAMPLE


def test_radius_search_equals_brute_force_on_random_hashes():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=1000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 1000, np.uint64)
    # plant pairs at known small distances
    for k in range(50):
        flip = np.uint64(0)
        for bit in rng.choice(64, size=k % 7, replace=False):
            flip |= np.uint64(1) << np.uint64(bit)
        hashes[500 + k] = hashes[k] ^ flip
    q, b, d = radius_pairs(hashes, hashes, 6)
    found = {(int(x), int(y)) for x, y in zip(q, b) if x < y}
    brute = hamming(hashes[:, None], hashes[None, :])
    expected = {(int(x), int(y)) for x, y in zip(*np.nonzero(brute <= 6)) if x < y}
    assert found == expected
    assert {(k, 500 + k) for k in range(50)} <= found
    assert (d == brute[q, b]).all()


def test_exact_pairs_link_every_repeat_to_the_first():
    pairs = exact_pairs(["a", None, "b", "a", "a", None], "exact", "same bytes")
    assert pairs.select("i", "j").rows() == [(0, 3), (0, 4)]


def test_phash_pairs_need_both_hashes_and_find_crops():
    far_high, far_low, x, y = 0xFFFFFFFF00000000, 0x00000000FFFFFFFF, 0xFFFF00000000, 0xAAAAAAAAAAAAAAAA
    phash = np.array([0, 0, x, y], dtype=np.uint64)
    dhash = np.array([0, 0xFFFFFFFF, 7, 0], dtype=np.uint64)  # rows 0 and 1 share a pHash but not a dHash
    crop = np.array([[far_high] * 2, [far_high] * 2, [y ^ 1, y ^ 3], [far_low] * 2], dtype=np.uint64)
    pairs = phash_pairs(phash, dhash, crop, DuplicateSettings(phash_radius=4, dhash_radius=4, crop_radius=2))
    assert pairs.select("i", "j").rows() == [(2, 3)]  # row 3's full frame is 1 bit from a centre crop of row 2
    assert pairs["detail"].item() == "crop-aligned pHash distance 1"
    assert pairs["phash_distance"].item() == 1


def test_embedding_pairs_use_a_relative_threshold_and_verify_by_hash():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 16))
    emb = np.vstack([base, base[:3] + rng.normal(scale=0.01, size=(3, 16))])
    phash = rng.integers(0, 2**63, size=43, dtype=np.uint64)
    phash[40:] = phash[:3]
    phash[42] ^= np.uint64(0xFFFFFFFF)  # the third copy looks nothing alike: verification rejects it
    crop = np.zeros((43, 0), dtype=np.uint64)
    colour = np.zeros((43, 32))
    settings = DuplicateSettings(verify_radius=10)
    pairs = embedding_pairs(similarity(emb * 7.5, 8), phash, crop, colour, settings)
    assert set(pairs.select("i", "j").rows()) == {(0, 40), (1, 41)}
    # the same pairs whatever the embedding's scale
    assert set(embedding_pairs(similarity(emb, 8), phash, crop, colour, settings).select("i", "j").rows()) == {
        (0, 40), (1, 41)}
    # ... and none when the colours disagree
    colour[40, 0], colour[0, 0] = 50.0, -50.0
    assert set(embedding_pairs(similarity(emb, 8), phash, crop, colour, settings).select("i", "j").rows()) == {
        (1, 41)}


def test_union_find_clusters():
    clusters = connected_clusters(6, np.array([0, 3, 4]), np.array([3, 4, 1]))
    assert clusters.tolist() == [0, 0, -1, 0, 0, -1]


def test_components_are_named_by_their_best_ranked_member():
    rank = np.array([5, 0, 4, 3, 1, 2])  # row 1 ranks first overall, then row 4
    clusters = connected_clusters(6, np.array([0, 3, 4]), np.array([3, 4, 1]), rank)
    assert clusters.tolist() == [1, 1, -1, 1, 1, -1]
    assert connected_clusters(0, np.zeros(0), np.zeros(0)).tolist() == []


def test_cluster_ids_stay_when_files_are_added_anywhere():
    rows = [
        {"path": "Baroque/a.jpg", "label": "Baroque", "phash": "0000000000000000", "width": 300, "height": 300,
         "sha256": "a" * 64},
        {"path": "Baroque/b.jpg", "label": "Baroque", "phash": "0000000000000001", "sha256": "b" * 64},
        {"path": "Baroque/c.jpg", "label": "Baroque", "phash": "ff00ff00ff00ff00", "sha256": "c" * 64},
        {"path": "Baroque/d.jpg", "label": "Baroque", "phash": "ff00ff00ff00ff01", "sha256": "d" * 64},
    ]
    before, _ = find_duplicates(manifest_frame(rows), None)
    ids = dict(zip(before["path"].to_list(), before["cluster"].to_list()))
    assert ids == {"Baroque/a.jpg": "a" * 16, "Baroque/b.jpg": "a" * 16, "Baroque/c.jpg": "c" * 16,
                   "Baroque/d.jpg": "c" * 16}
    assert before["phash_group"].to_list() == before["cluster"].to_list()
    # new files sorting first, a new cluster, and a smaller copy joining an old cluster: no id changes
    added = [{"path": "Baroque/0.jpg", "label": "Baroque", "phash": "0f0f0f0f0f0f0f0f", "sha256": "0" * 64},
             {"path": "Baroque/00.jpg", "label": "Baroque", "phash": "0f0f0f0f0f0f0f0e", "sha256": "1" * 64},
             {"path": "Baroque/e.jpg", "label": "Baroque", "phash": "0000000000000003", "sha256": "e" * 64,
              "width": 50, "height": 50}]
    after, _ = find_duplicates(manifest_frame(added + rows), None)
    ids_after = dict(zip(after["path"].to_list(), after["cluster"].to_list()))
    assert all(ids_after[path] == cluster for path, cluster in ids.items())
    assert ids_after["Baroque/e.jpg"] == "a" * 16
    assert ids_after["Baroque/0.jpg"] == ids_after["Baroque/00.jpg"] not in ("a" * 16, "c" * 16)


def test_keeper_rule_prefers_pixels_then_lossless_then_bytes_then_path():
    frame = pl.DataFrame({
        "path": ["a.jpg", "b.png", "c.jpg", "d.jpg"],
        "width": [100, 200, 200, 200], "height": [100, 200, 200, 200],
        "format": ["JPEG", "PNG", "JPEG", "JPEG"], "bytes": [999, 10, 50, 60],
    })
    assert keeper_order(frame)["path"].to_list() == ["b.png", "d.jpg", "c.jpg", "a.jpg"]


def manifest_frame(rows: list[dict]) -> pl.DataFrame:
    from curator.core import manifest

    base = {"id": "0", "group": None, "bytes": 1, "width": 100, "height": 100, "format": "JPEG", "mode": "RGB",
            "status": "ok", "reason": None, "keep": True, "dhash": "0000000000000000",
            "crop_phash": ["ffffffffffffffff"], "colour": "00" * 32}
    full = []
    for k, row in enumerate(rows):
        merged = {**base, "id": str(k), "sha256": f"{k:064x}", "pixel_sha256": f"{k:064x}", **row}
        full.append(merged)
    return pl.DataFrame(full, schema=manifest.schema())


def test_conflict_modes():
    rows = [
        {"path": "Baroque/a.jpg", "label": "Baroque", "phash": "0000000000000000", "width": 300, "height": 300},
        {"path": "Rococo/a.jpg", "label": "Rococo", "phash": "0000000000000001"},
        {"path": "Rococo/b.jpg", "label": "Rococo", "phash": "0000000000000003"},
        {"path": "Rococo/c.jpg", "label": "Rococo", "phash": "ff00ff00ff00ff00"},
    ]
    frame = manifest_frame(rows)
    dropped, pairs = find_duplicates(frame, None, DuplicateSettings(conflicts="drop"))
    assert dropped["status"].to_list() == ["conflict", "conflict", "conflict", "ok"]
    assert "filed under Baroque and Rococo" in dropped["reason"][0]
    majority, _ = find_duplicates(frame, None, DuplicateSettings(conflicts="majority"))
    assert majority["status"].to_list() == ["conflict", "ok", "duplicate", "ok"]
    assert majority["duplicate_of"][2] == "Rococo/a.jpg"
    kept, _ = find_duplicates(frame, None, DuplicateSettings(conflicts="keep"))
    assert kept["status"].to_list() == ["ok", "duplicate", "duplicate", "ok"]  # the larger Baroque file is kept
    assert kept["cluster"].to_list() == ["0" * 16] * 3 + [None]  # the keeper's sha256, not a row number
    assert kept["is_phash_issue"].to_list() == [True, True, True, False]
    assert set(pairs.select("i", "j").rows()) == {(0, 1), (0, 2), (1, 2)}


def test_typical_gap_is_read_past_rows_linked_or_hash_close():
    # rows 0-2 are copies of each other (identical pHash), each other's nearest neighbours; row 3 stands alone
    ids = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [2, 0, 1]], dtype=np.int32)
    sims = np.array([[0.99, 0.98, 0.7], [0.99, 0.97, 0.6], [0.98, 0.97, 0.8], [0.8, 0.7, 0.6]], dtype=np.float32)
    phash = np.array([0, 0, 0, 0xFFFFFFFF00000000], dtype=np.uint64)
    crop = np.zeros((4, 0), dtype=np.uint64)
    assert np.isclose(typical_gap(ids, sims), 1 - 0.985)  # nearest neighbours alone: the copies look typical
    # linked pairs are skipped: row 0 goes on to row 2, row 1 to row 2
    linked = pl.DataFrame({"i": [0], "j": [1]})
    assert np.isclose(typical_gap(ids, sims, linked), np.median(1 - np.array([0.98, 0.97, 0.98, 0.8])))
    # rows within the copy radius by pHash are skipped too: every row's typical neighbour is a different image
    assert np.isclose(typical_gap(ids, sims, None, (phash, crop, 16)), np.median(1 - np.array([0.7, 0.6, 0.8, 0.8])))
    # a row with nothing but copies among its neighbours is left out; with no row left, the gap is 1
    assert typical_gap(ids[:3, :2], sims[:3, :2], None, (phash, crop, 16)) == 1.0


def planted_copies(root: Path, paintings: int, copies: int, seed: int = 0) -> list[tuple[str, str]]:
    """`paintings` sample paintings under `root` with `copies` copies each beside them (re-encodes, resizes and crops
    in turn, `make_copy`); the (copy, original) paths relative to `root`."""
    rng = np.random.default_rng(seed)
    planted = []
    for n, source in enumerate(sorted(SAMPLE.rglob("*.jpg"))[::12][:paintings]):
        rel = source.relative_to(SAMPLE)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        (root / rel).write_bytes(data)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        for c in range(copies):
            kind = ("reencode", "resize", "crop")[(n + c) % 3]
            copy, ext = make_copy(image, data, kind, rng)
            name = rel.with_name(f"{rel.stem}__copy{c}-{kind}{ext}")
            (root / name).write_bytes(copy)
            planted.append((name.as_posix(), rel.as_posix()))
    return planted


def test_paintings_with_many_copies_each_cluster_with_all_of_them(tmp_path):
    """8 copies of every painting: the collection's typical nearest-neighbour gap, which the hash-pair and embedding
    thresholds are relative to, is that of the paintings alone. Read among each row's first 8 neighbours less the
    hash-linked ones, it was 1.0 here (no row had an unlinked neighbour left: every threshold wide open) and 0.02 on
    330 wikiart-dev paintings with 8 copies each (a few rows' unlinked copies made it: the originals were rejected
    from their copies' clusters, 19% of the copies found)."""
    import json

    from curator.stages.clean import CleanSettings, clean

    root = tmp_path / "tree"
    planted = planted_copies(root, 12, 8)
    originals = sorted({original for _, original in planted})
    alone = tmp_path / "alone"
    for rel in originals:
        (alone / rel).parent.mkdir(parents=True, exist_ok=True)
        (alone / rel).write_bytes((root / rel).read_bytes())
    gaps = []
    for folder, workspace in ((alone, tmp_path / "ws-alone"), (root, tmp_path / "ws")):
        result = clean(CleanSettings(root=folder, workspace=workspace, workers=1))
        recorded = json.loads((workspace / "settings.json").read_text())["duplicates"]["thresholds"]
        gaps.append(recorded["typical_gap"])
        assert np.isclose(recorded["embedding_min_cosine"], 1 - 0.5 * recorded["typical_gap"], atol=1e-5)
    print("typical gaps, alone and with copies:", gaps)
    assert 0.75 < gaps[1] / gaps[0] < 1.33, gaps
    frame = result.manifest
    cluster = dict(zip(frame["path"].to_list(), frame["cluster"].to_list()))
    missed = [copy for copy, original in planted if cluster[copy] is None or cluster[copy] != cluster[original]]
    assert missed == []
    assert len({cluster[o] for o in originals}) == len(originals)  # no two paintings merged
    assert frame.filter(pl.col("keep"))["path"].to_list() == originals  # each original kept, its copies not
