"""The batched data plane: batch assembly, worker order, the device-JPEG path (decode_batch on the CPU) and its
fallback to the CPU loader, the defaults by device, and `curator clean`'s embedding pass on the same plane."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from curator.core.images import ReadPolicy, read_source
from curator.embedding.dataplane import (
    CPU_ONLY,
    Context,
    DataPlane,
    Item,
    assemble,
    choose_workers,
    chunked,
    decode_routed,
    default_batch_size,
    default_workers,
)
from curator.embedding.preprocess import Preprocess
from tests.conftest import sample_paintings

LITE0 = Preprocess(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
SHAPE = (3, 224, 224)


class ReadDecode:
    """Per-file work as `classify dir` does it: (name, error) metadata, pixels or JPEG bytes."""

    def __init__(self, preprocess: Preprocess = LITE0):
        self.preprocess = preprocess
        self.policy = ReadPolicy()

    def __call__(self, path: Path, ctx: Context) -> Item:
        data, row = read_source(path, self.policy)
        if row is not None:
            return Item((path.name, row.info.reason))
        decoded = decode_routed(path, data, self.preprocess, ctx)
        if decoded is None:
            return Item((path.name, None), jpeg=data)
        if not decoded.info.ok:
            return Item((path.name, decoded.info.reason))
        return Item((path.name, None), self.preprocess.pixels(decoded.image))


def garbled_jpeg(source: Path) -> bytes:
    """A JPEG whose scan header names a component its frame does not have (id 9): the header checks pass it (they
    read up to the scan and look for markers inside it), both decoders refuse it."""
    data = bytearray(source.read_bytes())
    data[data.find(b"\xff\xda") + 5] = 0x09
    return bytes(data)


@pytest.fixture
def mixed(tmp_path) -> list[Path]:
    """Real paintings with a text file, an empty file, a truncated JPEG, a PNG, a CMYK JPEG, an EXIF-rotated JPEG
    and a JPEG with broken image data among them."""
    paintings = sample_paintings(6)
    painting = Image.open(paintings[0]).convert("RGB")
    files = []
    for i, p in enumerate(paintings):
        files.append(tmp_path / f"{i:02d}_{p.name}")
        shutil.copy(p, files[-1])
    extra = tmp_path / "x"
    extra.mkdir()
    (extra / "notes.txt").write_text("not an image")
    (extra / "empty.jpg").write_bytes(b"")
    data = paintings[1].read_bytes()
    (extra / "truncated.jpg").write_bytes(data[: int(len(data) * 0.4)])
    painting.save(extra / "plain.png")
    painting.convert("CMYK").save(extra / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    painting.resize((320, 200)).save(extra / "exif_rotated.jpg", exif=exif, quality=90)
    (extra / "garbled.jpg").write_bytes(garbled_jpeg(paintings[2]))
    order = ["notes.txt", "empty.jpg", "truncated.jpg", "plain.png", "cmyk.jpg", "exif_rotated.jpg", "garbled.jpg"]
    for i, name in enumerate(order):  # interleaved with the paintings, so errors sit inside batches
        files.insert(2 * i + 1, extra / name)
    return files


def cpu_rows(files: list[Path]) -> tuple[list, list[np.ndarray | None]]:
    """What the CPU loader gives each file, one at a time: metadata and pixels."""
    work = ReadDecode()
    items = [work(p, CPU_ONLY) for p in files]
    return [item.meta for item in items], [item.pixels for item in items]


def collect(plane: DataPlane) -> tuple[list, dict[int, np.ndarray]]:
    """Every batch's metadata in order, and the pixels by input position over the whole run."""
    meta, pixels, offset = [], {}, 0
    for ready in plane:
        assert ready.pixels.dtype == torch.uint8 and tuple(ready.pixels.shape[1:]) == SHAPE
        assert len(ready.positions) == len(ready.pixels)
        for j, pos in enumerate(ready.positions):
            pixels[offset + int(pos)] = ready.pixels[j].numpy()
        meta.extend(ready.meta)
        offset += len(ready.meta)
    return meta, pixels


def test_a_batch_is_one_contiguous_array_with_rows_in_input_order(mixed):
    expected_meta, expected_pixels = cpu_rows(mixed[:8])
    batch = assemble(7, mixed[:8], ReadDecode(), CPU_ONLY, SHAPE, shared=True)
    assert batch.index == 7 and batch.meta == expected_meta
    good = [i for i, px in enumerate(expected_pixels) if px is not None]
    assert batch.positions.tolist() == good and len(good) < 8  # errors sit between the good rows
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (len(good), *SHAPE)
    assert batch.pixels.is_contiguous() and batch.pixels.is_shared()  # one shared-memory block crosses over
    for j, i in enumerate(good):
        assert np.array_equal(batch.pixels[j].numpy(), expected_pixels[i])
    errors = {name: error for name, error in batch.meta if error}
    assert errors["notes.txt"] == "not an image file (.txt)"
    assert "empty file" in errors["empty.jpg"] and "truncated JPEG" in errors["truncated.jpg"]
    assert batch.jpeg_data is None and batch.jpeg_positions.size == 0


def test_a_batch_of_nothing_but_errors_has_no_pixels(tmp_path):
    for name in ("a.txt", "b.jpg"):
        (tmp_path / name).write_bytes(b"x" * 10)
    batch = assemble(0, sorted(tmp_path.iterdir()), ReadDecode(), CPU_ONLY, SHAPE)
    assert batch.pixels.shape == (0, *SHAPE) and batch.positions.size == 0
    assert [error is not None for _, error in batch.meta] == [True, True]


def test_the_work_must_give_the_planes_shape(mixed):
    with pytest.raises(ValueError, match="expected"):
        assemble(0, mixed[:1], ReadDecode(), CPU_ONLY, (3, 200, 200))


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_hand_back_every_batch_in_order(mixed, workers):
    expected_meta, expected_pixels = cpu_rows(mixed)
    plane = DataPlane(lambda: chunked(mixed, 3), ReadDecode(), SHAPE, workers=workers)
    meta, pixels = collect(plane)
    assert meta == expected_meta
    assert sorted(pixels) == [i for i, px in enumerate(expected_pixels) if px is not None]
    assert all(np.array_equal(pixels[i], expected_pixels[i]) for i in pixels)
    assert plane.stats.batches == -(-len(mixed) // 3) and plane.stats.files == len(mixed)
    assert 0 <= plane.stats.wait_seconds <= plane.stats.wall_seconds and plane.stats.bound in ("decoding", "model")


@pytest.mark.parametrize("workers", [0, 2])
def test_the_device_jpeg_path_gives_the_cpu_loaders_rows(mixed, workers):
    """decode_batch on the CPU stands in for nvjpeg: JPEGs that pass the header checks are decoded there, the rest
    (PNG, CMYK, truncated) by the CPU loader, and a JPEG the device decoder refuses (garbled) goes back to the CPU
    loader, which gives the reason. Same rows, errors included; pixels within a few levels."""
    expected_meta, expected_pixels = cpu_rows(mixed)
    plane = DataPlane(lambda: chunked(mixed, 4), ReadDecode(), SHAPE, workers=workers, preprocess=LITE0,
                      device_jpegs=True, cpu_jpeg_share=0.0)
    meta, pixels = collect(plane)
    assert meta == expected_meta
    assert dict(meta)["garbled.jpg"].startswith("broken JPEG data")
    assert sorted(pixels) == [i for i, px in enumerate(expected_pixels) if px is not None]
    for i in pixels:
        diff = np.abs(pixels[i].astype(int) - expected_pixels[i].astype(int))
        assert diff.mean() < 2.0, (mixed[i].name, diff.mean())
    assert plane.stats.device_jpegs == 7  # six paintings and the rotated JPEG
    assert plane.stats.fallbacks == 1  # the garbled one


def test_a_share_of_jpegs_stays_on_the_cpu(mixed):
    plane = DataPlane(lambda: chunked(mixed, 4), ReadDecode(), SHAPE, preprocess=LITE0, device_jpegs=True,
                      cpu_jpeg_share=0.5)
    meta, _ = collect(plane)
    assert meta == cpu_rows(mixed)[0]
    assert 3 <= plane.stats.device_jpegs <= 4  # every other eligible JPEG


def test_staging_in_a_thread_adapts_the_share_and_keeps_the_rows(mixed):
    """The staging thread (on CUDA it overlaps copies and nvjpeg with the model) run on a CPU: the workers' share
    of JPEGs moves with how long staging waits for them, and the rows stay the CPU loader's."""
    plane = DataPlane(lambda: chunked(mixed * 3, 2), ReadDecode(), SHAPE, workers=2, preprocess=LITE0,
                      device_jpegs=True, staged=True)
    assert plane.adaptive and plane.stats.cpu_jpeg_share == 0.25
    meta, pixels = collect(plane)
    assert meta == cpu_rows(mixed)[0] * 3 and len(pixels) == 3 * 9
    assert plane.stats.cpu_jpeg_share != 0.25 and 0.0 <= plane.stats.cpu_jpeg_share <= 1.0
    assert plane.stats.device_jpegs > 0 and plane.stats.fallbacks <= 3  # the garbled JPEG, when routed there


class Exploding(ReadDecode):
    def __call__(self, path: Path, ctx: Context) -> Item:
        if path.name == "plain.png":
            raise RuntimeError("boom in the work")
        return super().__call__(path, ctx)


@pytest.mark.parametrize("workers,staged", [(0, False), (2, False), (0, True), (2, True)])
def test_a_bug_in_the_work_surfaces_instead_of_hanging(mixed, workers, staged):
    plane = DataPlane(lambda: chunked(mixed, 3), Exploding(), SHAPE, workers=workers, staged=staged)
    with pytest.raises(RuntimeError, match="boom in the work"):
        collect(plane)


def test_context_routes_the_share_it_is_given():
    ctx = Context(True, 0.25)
    assert [ctx.take_jpeg() for _ in range(8)] == [False, True, True, True, False, True, True, True]
    assert not any(CPU_ONLY.take_jpeg() for _ in range(4))
    assert all(Context(True, 0.0).take_jpeg() for _ in range(4))


def test_defaults_by_device():
    assert default_batch_size("cpu") == 64 and default_batch_size("cuda") == 256
    cores = len(__import__("os").sched_getaffinity(0))
    assert default_workers("cuda") == max(1, cores - 1) and default_workers("cpu") == max(1, cores // 4)
    assert choose_workers(None, "cpu", 3) == 0  # a handful of files: no worker processes to start
    assert choose_workers(None, "cuda", 10_000) == default_workers("cuda")
    assert choose_workers(4, "cpu", 3) == 4


def test_clean_embeds_through_the_plane_with_or_without_workers(small_tree, tmp_path):
    """`curator clean`'s pass (hashes, fingerprints, pixels only for uncached images) runs on the same plane: the
    same verdicts, fingerprints and vectors whether it decodes in workers or in the process, and the vectors are
    `classify dir --embeddings`' for the same files (float16 precision)."""
    from classify.predict import PredictSettings, classify_dir
    from curator.core.images import scan
    from curator.core.runtime import select_runtime
    from curator.embedding.backbones import load_backbone
    from curator.embedding.embed import cache_for, embed_files

    (small_tree / "Baroque" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    paths = scan(small_tree)
    backbone = load_backbone()
    runtime = select_runtime("cpu", "fp32")
    reports, vectors = [], []
    for workers in (0, 2):
        cache = cache_for(tmp_path / f"ws{workers}", backbone)
        reports.append(embed_files(paths, backbone, cache, runtime, batch_size=4, workers=workers))
        shas = [info.sha256 for info in reports[-1].infos if info.ok]
        vectors.append(cache.get(shas))
    a, b = reports
    assert a.infos == b.infos and a.fingerprints == b.fingerprints and (a.computed, b.computed) == (8, 8)
    assert [info.status for info in a.infos].count("corrupt") == 1 and b.workers == 2
    assert np.array_equal(vectors[0], vectors[1])
    out = classify_dir(small_tree, tmp_path / "p.parquet", PredictSettings(workers=0, embeddings=True)).out
    df = pl.read_parquet(out).filter(pl.col("error").is_null())
    by_path = dict(zip(df["path"], df["embedding"]))
    for info, vector in zip([i for i in a.infos if i.ok], vectors[0]):
        theirs = np.asarray(by_path[info.path.relative_to(small_tree).as_posix()], dtype=np.float32)
        assert np.allclose(theirs[:len(vector)], vector, rtol=2e-3, atol=2e-3)
