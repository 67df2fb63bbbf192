from __future__ import annotations

import numpy as np
import polars as pl

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
)


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
