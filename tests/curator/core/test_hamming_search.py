from __future__ import annotations

import numpy as np
import pytest

from curator.core import hamming_search
from curator.core.hamming_search import (
    MIN_MIH_BASE,
    Plan,
    choose_plan,
    flat_search,
    mih_search,
    plan_for,
    popcount64,
    radius_search,
)


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)


def flips(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One random 64-bit mask of each given weight."""
    out = np.zeros(len(weights), dtype=np.uint64)
    for k, weight in enumerate(weights):
        for bit in rng.choice(64, size=int(weight), replace=False):
            out[k] |= np.uint64(1) << np.uint64(bit)
    return out


def planted(n: int, seed: int, max_distance: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` uniform hashes, 1,000 of them near copies of the first 1,000 at distances 0..max_distance."""
    rng = np.random.default_rng(seed)
    hashes = random_hashes(rng, n)
    src = np.arange(1000)
    dst = src + n // 2
    hashes[dst] = hashes[src] ^ flips(rng, src % (max_distance + 1))
    return hashes, src, dst


def numpy_pairs(queries: np.ndarray, base: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force in numpy: every pair's popcount, in row blocks; ordered by query, then base index."""
    qs, bs, ds = [], [], []
    for lo in range(0, len(queries), 500):
        dist = np.bitwise_count(queries[lo:lo + 500, None] ^ base[None, :])
        q, b = np.nonzero(dist <= radius)
        qs.append(q + lo)
        bs.append(b)
        ds.append(dist[q, b])
    return np.concatenate(qs), np.concatenate(bs), np.concatenate(ds).astype(np.int32)


def assert_same(found, expected) -> None:
    for got, want in zip(found, expected):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def hashes_20k():
    hashes, src, dst = planted(20_000, seed=0)
    return hashes, src, dst, numpy_pairs(hashes, hashes, 12)


@pytest.mark.parametrize("radius", [0, 1, 4, 8, 12])
def test_mih_equals_brute_force_on_random_and_planted_hashes(hashes_20k, radius):
    hashes, src, dst, (q12, b12, d12) = hashes_20k
    within = d12 <= radius
    expected = q12[within], b12[within], d12[within]
    assert plan_for(radius, len(hashes), len(hashes)) is not None  # MIH runs, not the fallback
    found = radius_search(hashes, hashes, radius, method="mih")
    assert_same(found, expected)
    assert_same(flat_search(hashes, hashes, radius), expected)
    pairs = set(zip(found[0].tolist(), found[1].tolist()))
    near = src % 13 <= radius
    assert all((int(s), int(t)) in pairs and (int(t), int(s)) in pairs for s, t in zip(src[near], dst[near]))
    assert len(pairs) == len(found[0])  # no pair twice


@pytest.mark.parametrize("plan", [
    Plan((0, 22, 43), (22, 21, 21), (2, 2, 2)),  # the 1M plan: wide, sparse tables on a small base
    Plan((0, 16, 32, 48), (16, 16, 16, 16), (2, 1, 1, 1)),  # uneven radii
    Plan((2, 22, 44), (18, 18, 18), (2, 2, 2)),  # 10 bits unused: the pigeonhole still holds
])
def test_every_sound_plan_is_exact(hashes_20k, plan):
    hashes, _, _, (q12, b12, d12) = hashes_20k
    within = d12 <= 8
    assert_same(mih_search(hashes, hashes, 8, plan), (q12[within], b12[within], d12[within]))


def test_unsound_plan_is_refused(hashes_20k):
    with pytest.raises(ValueError, match="cannot find every pair within 8 bits"):
        mih_search(hashes_20k[0], hashes_20k[0], 8, Plan((0, 22, 43), (22, 21, 21), (2, 2, 1)))


def test_skewed_hashes_many_equal_and_differing_in_one_substring(monkeypatch):
    rng = np.random.default_rng(3)
    hashes = random_hashes(rng, 20_000)
    hashes[:1500] = hashes[0]  # 1,500 equal hashes: one bucket in every table, 2.25M pairs
    hashes[1500:1600] = hashes[1] ^ np.uint64(1)  # and 100 one bit from another hash
    # 1,500 hashes that differ only in their low 22 bits: they share a bucket of every other substring table
    hashes[2000:3500] = (hashes[2] & ~np.uint64((1 << 22) - 1)) | rng.integers(0, 1 << 22, 1500, dtype=np.uint64)
    # and near copies of those in another substring
    hashes[4000:5500] = hashes[2000:3500] ^ (np.uint64(0b111) << np.uint64(40))
    # small chunks and candidate slices, so that the splitting paths run
    monkeypatch.setattr(hamming_search, "QUERY_CHUNK", 5000)
    monkeypatch.setattr(hamming_search, "CANDIDATE_BUDGET", 20_000)
    q8, b8, d8 = numpy_pairs(hashes, hashes, 8)
    for radius in (3, 8):
        expected = q8[d8 <= radius], b8[d8 <= radius], d8[d8 <= radius]
        assert_same(radius_search(hashes, hashes, radius, method="mih"), expected)
        assert_same(mih_search(hashes, hashes, radius, Plan((0, 22, 43), (22, 21, 21), (2, 2, 2))), expected)


def test_queries_other_than_base_the_crop_case():
    rng = np.random.default_rng(4)
    phash = random_hashes(rng, 10_000)
    crop = random_hashes(rng, (10_000, 4))
    # a cropped copy's full-frame hash lands near one of its original's crop hashes
    rows = rng.choice(10_000, 600, replace=False)
    phash[rows[:300]] = crop[rows[300:], rng.integers(0, 4, 300)] ^ flips(rng, np.arange(300) % 9)
    base = crop.reshape(-1)
    expected = numpy_pairs(phash, base, 8)
    found = radius_search(phash, base, 8)
    assert choose_plan(len(phash), len(base), 8) is not None
    assert_same(found, expected)
    assert {(int(a), int(b)) for a, b in zip(rows[:300], rows[300:])} <= set(
        zip(found[0].tolist(), (found[1] // 4).tolist()))
    # few queries against a large base, and many against a small one
    assert_same(radius_search(phash[:300], base, 8, method="mih"), numpy_pairs(phash[:300], base, 8))
    assert_same(radius_search(base, phash[:300], 8, method="mih"), numpy_pairs(base, phash[:300], 8))


@pytest.mark.slow
def test_recall_is_one_against_brute_force_at_radius_8_on_100k():
    hashes, src, dst = planted(100_000, seed=5, max_distance=8)
    assert choose_plan(len(hashes), len(hashes), 8) is not None  # the default path is MIH at this size
    found = radius_search(hashes, hashes, 8)
    expected = flat_search(hashes, hashes, 8)
    assert len(expected[0]) >= 2 * 1000 + len(hashes)
    assert_same(found, expected)  # recall 1.000 and precision 1.000, distances equal
    pairs = set(zip(found[0].tolist(), found[1].tolist()))
    assert all((int(s), int(t)) in pairs for s, t in zip(src, dst))


def test_plans_are_sound_for_every_radius_and_size():
    for n in (MIN_MIH_BASE, 100_000, 1_000_000, 4_000_000):
        for radius in range(65):
            plan = plan_for(radius, n, n)
            assert plan is not None
            assert sum(r + 1 for r in plan.radii) > radius
            spans = sorted(zip(plan.shifts, plan.bits))
            assert all(s + b <= t for (s, b), (t, _) in zip(spans, spans[1:])) and spans[-1][0] + spans[-1][1] <= 64
            assert max(plan.bits) <= max(8, n.bit_length() + 2)


def test_auto_uses_flat_for_small_bases_and_large_radii_and_mih_at_scale():
    assert choose_plan(10_000, MIN_MIH_BASE - 1, 8) is None
    assert choose_plan(1_000_000, 1_000_000, 24) is None
    plan = choose_plan(1_000_000, 1_000_000, 8)
    assert plan is not None and plan.bits == (22, 21, 21) and plan.radii == (2, 2, 2)
    assert plan.seconds(1_000_000, 1_000_000) < 60


def test_empty_inputs_and_radius_64():
    rng = np.random.default_rng(6)
    hashes = random_hashes(rng, 50)
    for found in (radius_search(hashes[:0], hashes, 8), radius_search(hashes, hashes[:0], 8, method="mih")):
        assert [len(a) for a in found] == [0, 0, 0]
        assert [a.dtype for a in found] == [np.int64, np.int64, np.int32]
    q, b, d = radius_search(hashes, hashes, 64, method="mih")
    assert len(q) == 50 * 50 and (d == np.bitwise_count(hashes[q] ^ hashes[b])).all()


@pytest.mark.parametrize("radius, method", [(-1, "auto"), (65, "auto"), (2.5, "auto"), (True, "auto"), (8, "fast")])
def test_bad_arguments_are_one_line_errors(radius, method):
    with pytest.raises(ValueError) as err:
        radius_search(np.zeros(3, np.uint64), np.zeros(3, np.uint64), radius, method=method)
    assert "\n" not in str(err.value)
    assert ("radius" in str(err.value)) != ("method" in str(err.value))


def test_popcount_byte_table_matches_bitwise_count(monkeypatch):
    rng = np.random.default_rng(7)
    x = np.concatenate([random_hashes(rng, 1000), np.array([0, 2**64 - 1, 1, 2**63], dtype=np.uint64)])
    expected = [bin(int(v)).count("1") for v in x]
    assert popcount64(x).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count")  # numpy < 2
    assert popcount64(x).tolist() == expected
    assert popcount64(x.reshape(4, -1)).shape == (4, 251)
