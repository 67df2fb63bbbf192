"""One append-only store of fixed-size records keyed by sha256, for the embedding cache and the pixel cache.

A store is one file of records of a numpy structured dtype whose first field is `sha` (32 bytes, the sha256 of the
source file's bytes); the rest is a fixed-shape payload (a float16 vector, a CRC and a uint8 square, ...). Appending
costs O(batch): the batch is written at the end of the file and its shas are added to an in-memory index
({sha: record number}); nothing already stored is copied. Records are read by number with positioned reads
(`read`, `curator.core.rowfile.read_records`): only the records read become the process's memory. (`records`, a
read-only `np.memmap` of the whole file, is there for tests and whole scans: on current kernels touching a few
scattered rows of a map made most of the file resident.)

Opening is one sequential pass over the file in `SCAN_BYTES` chunks (a fixed-size buffer, not the file in RAM), which
builds the index and lets the caller's `keep` test drop damaged records (e.g. NaN vectors). The index costs about
150 bytes per record (a Python dict of 32-byte keys): about 150 MB at 1M records.

Crash safety, precisely:
- Each `append` is one `write()` of whole records, made before `append` returns. A process that is killed (SIGKILL,
  Ctrl-C, an out-of-memory kill) loses nothing that was appended before: the kernel's page cache holds it and writes
  it out later. Only the batch in flight can be lost, in part: a prefix of it may reach the file, and a torn last
  record (part of one record) is cut off when a writer next opens the file. Whole records of that prefix are kept.
- The file is fsynced every `sync_bytes` (64 MB by default) and on `flush`/`close` (and when the store is garbage
  collected or the interpreter exits), not on every batch. A machine crash (power loss, kernel panic) can lose what
  was appended since the last fsync, or leave zero-filled records at the end on some filesystems; a record whose sha
  is all zero bytes (no file hashes to it) is never indexed.
- Rewriting (dropping records that fail `keep`) goes to a temporary file that is fsynced and renamed over the
  store, so a crash during it leaves either the old file or the new one.
Readers (`writable=False`) never change the file: a torn tail or a damaged record is only left out of the index.
One writer at a time per file (as with the caches before).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from curator.core.atomic import atomic_path

#: fsync after this many bytes appended since the last one (and on flush/close)
SYNC_BYTES = 64 << 20
#: the buffer size of the scan on open (and of a rewrite)
SCAN_BYTES = 16 << 20
_SHA = np.dtype(("u1", (32,)))

KeepFn = Callable[[np.ndarray], np.ndarray]


def whole_records(path: Path, itemsize: int, truncate: bool = True) -> int:
    """How many whole fixed-size records an append-only file holds. A torn last record (a run killed mid-write) is
    cut off when `truncate` (writers, so that appending resumes cleanly); readers leave the file as it is."""
    size = Path(path).stat().st_size
    whole = size // itemsize
    if truncate and whole * itemsize != size:
        os.truncate(path, whole * itemsize)
    return whole


def set_aside(path: Path) -> Path:
    """Rename a damaged cache file (atelier's own) to the first free `NAME.unusable-N` beside it and return that
    path: nothing is deleted or overwritten, and the user can inspect or remove it."""
    path = Path(path)
    n = 1
    while (target := path.with_name(f"{path.name}.unusable-{n}")).exists() or target.is_symlink():
        n += 1
    os.rename(path, target)
    return target


def _sync_and_close(handle: list) -> None:
    """fsync and close the store's append handle, if open (also run by the finaliser)."""
    fh = handle[0]
    if fh is None:
        return
    handle[0] = None
    try:
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        fh.close()


class RecordStore:
    """Append-only file of fixed-size records (`record`: a structured dtype whose first field is `sha`, 32 bytes)
    with a sha index, read memory-mapped. See the module docstring for costs and the crash guarantee.

    On open, records for which `keep(records)` (a vectorised test over a chunk, giving a boolean per record) is
    False are left out of the index; a writer also rewrites the file without them when `rewrite` is set.
    `scanned` is the number of whole records found on open, `dropped` how many of them `keep` refused. When a sha
    was appended more than once, its last record counts."""

    def __init__(self, path: Path, record: np.dtype, *, writable: bool = True, keep: KeepFn | None = None,
                 rewrite: bool = True, sync_bytes: int = SYNC_BYTES):
        record = np.dtype(record)
        if not record.names or record.names[0] != "sha" or record.fields["sha"][0] != _SHA:
            raise ValueError(f"a store record needs a first field `sha` of 32 bytes, got {record}")
        self.path = Path(path)
        self.record = record
        self.writable = writable
        self.sync_bytes = sync_bytes
        self.scanned = 0
        self.dropped = 0
        self._count = 0  # whole records in the file, indexed or not
        self._index: dict[bytes, int] = {}
        self._map: np.ndarray | None = None
        self._handle: list = [None]  # the append handle, in a list so that the finaliser can see it
        self._unsynced = 0
        self._finalizer = weakref.finalize(self, _sync_and_close, self._handle)
        if self.path.exists():
            self._open(keep, rewrite)

    # ------------------------------------------------------------------------------------------------ open

    def _open(self, keep: KeepFn | None, rewrite: bool) -> None:
        """Count whole records (a writer cuts a torn tail), index them, drop (and, writing, rewrite away) those
        that fail `keep`."""
        self._count = self.scanned = whole_records(self.path, self.record.itemsize, truncate=self.writable)
        self._index, bad = self._scan(keep)
        self.dropped = bad
        if bad and self.writable and rewrite:
            self._rewrite(keep)
            self._count = whole_records(self.path, self.record.itemsize, truncate=False)
            self._index, _ = self._scan(None)

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first record number, records) over the file's whole records, read into one reused buffer."""
        per = max(1, SCAN_BYTES // self.record.itemsize)
        raw = np.empty(min(per, max(self._count, 1)) * self.record.itemsize, dtype=np.uint8)
        with open(self.path, "rb") as fh:
            start = 0
            while start < self._count:
                n = min(per, self._count - start)
                want = n * self.record.itemsize
                got = fh.readinto(raw[:want])
                n = got // self.record.itemsize
                if n == 0:
                    return
                yield start, raw[:n * self.record.itemsize].view(self.record)
                start += n

    def _scan(self, keep: KeepFn | None) -> tuple[dict[bytes, int], int]:
        """The sha index of the file's records that pass `keep` (and whose sha is not all zeros), and the number
        that failed `keep`."""
        index: dict[bytes, int] = {}
        bad = 0
        for start, chunk in self._chunks():
            ok = np.asarray(keep(chunk), dtype=bool) if keep is not None else np.ones(len(chunk), dtype=bool)
            bad += int((~ok).sum())
            ok &= chunk["sha"].any(axis=1)
            self._add(index, chunk["sha"][ok], np.flatnonzero(ok) + start)
        return index, bad

    @staticmethod
    def _add(index: dict[bytes, int], shas: np.ndarray, rows: np.ndarray) -> None:
        blob = np.ascontiguousarray(shas).tobytes()
        index.update(zip((blob[i:i + 32] for i in range(0, len(blob), 32)), rows.tolist()))

    def _rewrite(self, keep: KeepFn | None) -> None:
        """Replace the file by its records that pass `keep`, streamed through a temporary file (fsynced, renamed)."""
        _sync_and_close(self._handle)
        self._map = None
        with atomic_path(self.path, fsync=True) as tmp, open(tmp, "wb") as out:
            for _, chunk in self._chunks():
                out.write(chunk[np.asarray(keep(chunk), dtype=bool)].tobytes() if keep is not None
                          else chunk.tobytes())

    # ------------------------------------------------------------------------------------------------ write

    def append(self, records: np.ndarray) -> None:
        """Write `records` (of this store's dtype) at the end of the file and index them, in O(len(records)).
        The bytes are handed to the kernel before this returns (they survive the process being killed); they reach
        the disk at the next fsync (every `sync_bytes`, and on `flush`/`close`)."""
        if not self.writable:
            raise PermissionError(f"the store {self.path} was opened read-only")
        records = np.ascontiguousarray(records)
        if records.dtype != self.record:
            raise ValueError(f"records of {records.dtype} appended to a store of {self.record}")
        if len(records) == 0:
            return
        fh = self._handle[0]
        if fh is None:
            fh = self._handle[0] = open(self.path, "ab")
        data = records.tobytes()
        fh.write(data)
        fh.flush()
        self._unsynced += len(data)
        if self._unsynced >= self.sync_bytes:
            os.fsync(fh.fileno())
            self._unsynced = 0
        ok = records["sha"].any(axis=1)
        self._add(self._index, records["sha"][ok], np.flatnonzero(ok) + self._count)
        self._count += len(records)

    def flush(self) -> None:
        """Make everything appended so far durable (fsync)."""
        fh = self._handle[0]
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
            self._unsynced = 0

    def close(self) -> None:
        """fsync and close the append handle (a later `append` opens it again)."""
        _sync_and_close(self._handle)
        self._unsynced = 0

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ read

    @property
    def records(self) -> np.ndarray:
        """Every whole record in the file (indexed or not), as a read-only memory map: slicing or indexing it reads
        only the rows asked for."""
        if self._count == 0:
            return np.empty(0, dtype=self.record)
        if self._map is None or len(self._map) != self._count:
            self._map = np.memmap(self.path, dtype=self.record, mode="r", shape=(self._count,))
        return self._map

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sha: str | bytes) -> bool:
        return _key(sha) in self._index

    def shas(self) -> set[str]:
        """The hex sha256 of every indexed record."""
        return {sha.hex() for sha in self._index}

    def missing(self, shas: Iterable[str]) -> list[str]:
        """Those of `shas` with no indexed record, in order."""
        return [sha for sha in shas if _key(sha) not in self._index]

    def row(self, sha: str | bytes) -> int | None:
        """The record number of `sha`, or None."""
        return self._index.get(_key(sha))

    def rows(self, shas: Sequence[str | bytes], what: str = "record") -> np.ndarray:
        """Record numbers of `shas`, in order; KeyError naming the first one not indexed."""
        out = np.empty(len(shas), dtype=np.int64)
        index = self._index
        for i, sha in enumerate(shas):
            row = index.get(_key(sha))
            if row is None:
                raise KeyError(f"no cached {what} for sha256 {_key(sha).hex()}")
            out[i] = row
        return out

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The records number `rows` (in the order asked), read from the file with positioned reads; EOFError if
        the file is shorter than a record asked for (rewritten meanwhile)."""
        from curator.core.rowfile import read_records

        fd = os.open(self.path, os.O_RDONLY)
        try:
            return read_records(fd, np.asarray(rows, dtype=np.int64), self.record)
        finally:
            os.close(fd)

    def exclude(self, shas: Iterable[str | bytes]) -> None:
        """Leave `shas` out of the index (their records stay in the file; a later append of the sha is indexed)."""
        for sha in shas:
            self._index.pop(_key(sha), None)

    def __getstate__(self) -> dict:
        """A pickled store (e.g. a DataLoader worker's copy) is a reader: no append handle, a fresh memory map."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_map", "_finalizer")}
        state["writable"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._handle = [None]
        self._map = None
        self._finalizer = weakref.finalize(self, _sync_and_close, self._handle)


def sha_array(shas: Sequence[str]) -> np.ndarray:
    """Hex sha256 strings as the (n, 32) uint8 array a record's `sha` field holds."""
    return np.frombuffer(b"".join(bytes.fromhex(s) for s in shas), dtype=np.uint8).reshape(-1, 32)


def _key(sha: str | bytes) -> bytes:
    return sha if isinstance(sha, bytes) else bytes.fromhex(sha)
