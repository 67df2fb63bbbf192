"""The append-only record store behind the embedding and pixel caches: O(batch) appends, positioned reads, a torn
tail cut on open, fsync per chunk rather than per batch, and a killed writer losing at most the batch in flight."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from curator.core import store as store_module
from curator.core.store import RecordStore
from curator.embedding.embed import EmbeddingCache

RECORD = np.dtype([("sha", "u1", (32,)), ("vec", "<f2", (4,))])
REPO = Path(__file__).resolve().parents[3]


def batch(start: int, n: int, record: np.dtype = RECORD) -> np.ndarray:
    """Records whose sha is sha256(str(i)) and whose payload is i (so any record can be checked on its own)."""
    out = np.zeros(n, dtype=record)
    out["sha"] = np.frombuffer(b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(start, start + n)),
                               dtype=np.uint8).reshape(n, 32)
    payload = out.dtype.names[-1]
    out[payload] = np.arange(start, start + n).reshape((n,) + (1,) * (out[payload].ndim - 1)) % 251
    return out


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_append_reopen_and_get_give_back_the_same_records(tmp_path):
    path = tmp_path / "s.rec"
    store = RecordStore(path, RECORD)
    for start in range(0, 100, 32):
        store.append(batch(start, min(32, 100 - start)))
    assert len(store) == 100 and store.rows([sha(5), sha(99)]).tolist() == [5, 99]
    store.append(batch(5, 1))  # the same sha again: its last record counts
    store.close()
    reopened = RecordStore(path, RECORD)
    assert len(reopened) == 100 and reopened.shas() == {sha(i) for i in range(100)}
    assert reopened.rows([sha(5)]).tolist() == [100]
    assert np.array_equal(reopened.records[:100], batch(0, 100))
    assert np.array_equal(reopened.records[reopened.rows([sha(7), sha(3)])], np.concatenate([batch(7, 1), batch(3, 1)]))
    assert np.array_equal(reopened.read([7, 3, 7, 8]), np.concatenate([batch(7, 1), batch(3, 1), batch(7, 2)]))
    assert reopened.read([]).shape == (0,) and reopened.missing([sha(3), sha(500)]) == [sha(500)]
    with pytest.raises(KeyError, match=sha(500)):
        reopened.rows([sha(1), sha(500)])
    with pytest.raises(EOFError):
        reopened.read([101])


def test_a_torn_tail_is_cut_by_a_writer_and_left_alone_by_a_reader(tmp_path):
    path = tmp_path / "s.rec"
    RecordStore(path, RECORD).append(batch(0, 3))
    with open(path, "ab") as fh:  # a run killed part way through a record
        fh.write(b"\x05" * (RECORD.itemsize - 1))
    size = path.stat().st_size
    reader = RecordStore(path, RECORD, writable=False)
    assert len(reader) == 3 and path.stat().st_size == size
    with pytest.raises(PermissionError):
        reader.append(batch(3, 1))
    writer = RecordStore(path, RECORD)
    assert len(writer) == 3 and path.stat().st_size == 3 * RECORD.itemsize
    writer.append(batch(3, 2))
    assert np.array_equal(RecordStore(path, RECORD).records, batch(0, 5))


def test_records_that_fail_keep_are_left_out_and_a_writer_rewrites_the_file_without_them(tmp_path):
    path = tmp_path / "s.rec"
    RecordStore(path, RECORD).append(batch(0, 6))

    def keep(records):
        return records["vec"][:, 0] % 2 == 0

    before = path.read_bytes()
    reader = RecordStore(path, RECORD, writable=False, keep=keep)
    assert (reader.scanned, reader.dropped, len(reader)) == (6, 3, 3) and path.read_bytes() == before
    writer = RecordStore(path, RECORD, keep=keep)
    assert writer.shas() == {sha(0), sha(2), sha(4)} and path.stat().st_size == 3 * RECORD.itemsize
    assert np.array_equal(writer.records[writer.rows([sha(4)])]["vec"], batch(4, 1)["vec"])


def test_a_record_with_an_all_zero_sha_is_never_indexed(tmp_path):
    """What a machine crash can leave at the end of a file on some filesystems: zero-filled records."""
    path = tmp_path / "s.rec"
    store = RecordStore(path, RECORD)
    store.append(batch(0, 2))
    store.append(np.zeros(2, dtype=RECORD))
    assert len(store) == 2 and len(RecordStore(path, RECORD)) == 2 and store.records.shape == (4,)


def test_fsync_runs_per_chunk_and_on_flush_not_per_batch(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    store = RecordStore(tmp_path / "s.rec", RECORD, sync_bytes=10 * RECORD.itemsize)
    for start in range(0, 100, 2):  # 50 batches of 2 records
        store.append(batch(start, 2))
    assert len(synced) == 10
    store.flush()
    assert len(synced) == 11
    store.close()
    assert len(synced) == 12 and len(RecordStore(tmp_path / "s.rec", RECORD)) == 100


def test_reads_are_memory_mapped_and_do_not_load_the_file(tmp_path):
    """An embedding cache of 64 MB: opening it and getting a few rows leaves the resident set far below the file's
    size (the old cache held the whole matrix in RAM), and no attribute holds an in-memory matrix."""
    dim = 2304
    n = 64 * 2**20 // (32 + 2 * dim)
    cache = EmbeddingCache(tmp_path, "k", dim)
    shas = [sha(i) for i in range(n)]
    rng = np.random.default_rng(0)
    for start in range(0, n, 1024):
        cache.append(shas[start:start + 1024], rng.standard_normal((len(shas[start:start + 1024]), dim)))
    cache.close()
    del cache
    size = (tmp_path / "k.emb").stat().st_size
    base = rss_bytes()
    reopened = EmbeddingCache(tmp_path, "k", dim)
    got = reopened.get([shas[3], shas[n - 1]])
    grown = rss_bytes() - base
    assert got.shape == (2, dim) and np.isfinite(got).all() and len(reopened) == n
    assert grown < size / 4, (grown, size)
    assert isinstance(reopened.vectors(), np.memmap)
    held = [v for obj in (reopened, reopened._store) for v in vars(obj).values()
            if isinstance(v, np.ndarray) and not isinstance(v, np.memmap) and v.nbytes > 1 << 20]
    assert held == []


def test_a_pickled_store_is_a_reader_of_the_same_records(tmp_path):
    store = RecordStore(tmp_path / "s.rec", RECORD)
    store.append(batch(0, 4))
    copy = pickle.loads(pickle.dumps(store))
    assert not copy.writable and np.array_equal(copy.records[copy.rows([sha(2)])], store.records[[2]])


def test_a_record_dtype_without_a_leading_sha_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sha"):
        RecordStore(tmp_path / "s.rec", np.dtype([("vec", "<f2", (4,)), ("sha", "u1", (32,))]))
    store = RecordStore(tmp_path / "s.rec", RECORD)
    with pytest.raises(ValueError, match="appended"):
        store.append(np.zeros(1, dtype=[("sha", "u1", (32,)), ("vec", "<f4", (4,))]))


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from tests.curator.core.test_store import batch, RecordStore, np
    PIX = np.dtype([("sha", "u1", (32,)), ("pix", "u1", (64, 64, 3))])
    store = RecordStore(sys.argv[1], PIX)
    start = 0
    while True:
        store.append(batch(start, 64, PIX))
        start += 64
        print(start, flush=True)
""")


def test_a_killed_writer_loses_at_most_the_batch_in_flight(tmp_path):
    """SIGKILL a process appending 64-record batches (no fsync in between): every batch whose append returned is
    there, intact, after a writer reopens the file; of the batch in flight only whole records may remain."""
    path = tmp_path / "s.rec"
    pix = np.dtype([("sha", "u1", (32,)), ("pix", "u1", (64, 64, 3))])
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        done = 0
        while done < 64 * 40:
            line = child.stdout.readline()
            assert line, "the writer ended early"
            done = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    store = RecordStore(path, pix)
    assert path.stat().st_size % pix.itemsize == 0
    assert done <= len(store) and len(store) <= store.records.shape[0]
    assert np.array_equal(store.records[:len(store)], batch(0, len(store), pix))
