"""The device JPEG path (curator.embedding.gpu_decode) against the CPU loader: same verdicts, same pixels within a
stated tolerance, same top-1 of the default backbone. Runs on the CPU (torchvision's decode_jpeg runs there too); the
CUDA cases run where a GPU is present."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curator.core.images import decode_bytes
from curator.embedding.gpu_decode import decode_batch, jpeg_info, jpeg_precheck
from curator.embedding.preprocess import Preprocess
from tests.conftest import SAMPLE, png_header_only, sample_paintings

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
#: Largest mean / single-pixel difference allowed from the CPU path on full-size decodes. On the CPU both decode
#: with libjpeg-turbo and resample the way Pillow does, so they agree to rounding (measured: mean 0.0000-0.013,
#: max 1-2). nvjpeg's IDCT and chroma upsampling differ from libjpeg-turbo's; the CUDA bound is torchvision's own for
#: nvjpeg against its CPU decoder (mean < 2), not yet measured here: tighten it from a GPU run.
TOLERANCE = {"cpu": (0.05, 2), "cuda": (2.0, 96)}
#: Top-1 agreement with the full CPU decode. nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: on one H200
#: 0.960 of the sample paintings and 0.967 of the 1,600-px set agreed (docs/BENCHMARKS.md), why --gpu-decode is opt-in.
MIN_TOP1_AGREEMENT = {"cpu": 0.995, "cuda": 0.95}
#: The CPU loader draft-decodes large JPEGs (DCT scaling to >= `resize`); the device path decodes them whole.
DRAFT_TOLERANCE = (1.5, 64)


@pytest.fixture(scope="module")
def backbone():
    from curator.embedding.backbones import load_backbone

    return load_backbone()


@pytest.fixture(scope="module")
def preprocess(backbone) -> Preprocess:
    return Preprocess.from_data_config(backbone.data_config)


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def upscaled() -> list[bytes]:
    """30 paintings upscaled to 1,600 px on the longer side (the size of real WikiArt downloads), quality 90, in
    landscape, portrait and square shapes."""
    shapes = [(1600, 1200), (1200, 1600), (1600, 1600), (1600, 1067), (1067, 1600)]
    out = []
    for i, path in enumerate(sample_paintings(30)):
        image = Image.open(path).convert("RGB").resize(shapes[i % len(shapes)], Image.Resampling.BICUBIC)
        out.append(jpeg_bytes(image, quality=90))
    return out


@pytest.fixture(scope="module")
def image_sets(upscaled) -> dict[str, list[bytes]]:
    """The 150 sample paintings as stored (224 px) and the 30 upscaled ones."""
    return {"sample": [p.read_bytes() for p in sorted(SAMPLE.rglob("*.jpg"))], "1,600 px": upscaled}


@pytest.fixture(scope="module")
def decoded(preprocess, image_sets):
    """decode_batch's result for a set on a device, and the CPU path's pixels for it (full or draft decode), each
    computed once for the module: `decoded(set, device)`, `decoded(set, "full")`, `decoded(set, "draft")`."""
    memo = {}

    def get(name: str, how: str):
        if (name, how) not in memo:
            files = image_sets[name]
            if how in ("full", "draft"):
                memo[name, how] = cpu_pixels(files, preprocess, draft=how == "draft")
            else:
                memo[name, how] = decode_batch(files, preprocess, how)
        return memo[name, how]

    return get


def cpu_row(data: bytes, preprocess: Preprocess, name: str = "x.jpg", draft: bool = True):
    """What the CPU loader gives these bytes."""
    return decode_bytes(Path(name), data, preprocess.draft_size if draft else None)


def cpu_pixels(datas: list[bytes], preprocess: Preprocess, draft: bool = True) -> np.ndarray:
    return np.stack([preprocess.pixels(cpu_row(d, preprocess, draft=draft).image) for d in datas])


def differences(device_pixels: torch.Tensor, reference: np.ndarray) -> tuple[float, int]:
    diff = np.abs(device_pixels.cpu().numpy().astype(np.int16) - reference.astype(np.int16))
    return float(diff.mean()), int(diff.max())


def top1_agreement(backbone, preprocess: Preprocess, pixels, reference: np.ndarray) -> float:
    """Share of images whose default-backbone ImageNet top-1 is the same for `pixels` (uint8 (N, 3, crop, crop)) as
    for `reference`, normalised as every stage normalises. Images whose pixels are identical agree without a
    forward pass (on the CPU most are), so the model runs only where the two differ."""
    pixels = torch.as_tensor(pixels).cpu()
    reference = torch.as_tensor(reference)
    differ = (pixels != reference).flatten(1).any(1).nonzero().flatten()
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    disagree = 0
    with torch.inference_mode():
        for start in range(0, len(differ), 32):
            rows = differ[start:start + 32]
            both = torch.cat([pixels[rows], reference[rows]]).float() / 255.0
            labels = backbone.model((both - mean) / std).argmax(1)
            disagree += int((labels[:len(rows)] != labels[len(rows):]).sum())
    return 1.0 - disagree / len(pixels)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_paintings_decode_to_the_cpu_paths_pixels(preprocess, image_sets, decoded, device):
    datas = image_sets["sample"]
    assert len(datas) == 150
    assert all(jpeg_precheck(Path("a.jpg"), d, preprocess) is None for d in datas)
    pixels, ok, failed = decoded("sample", device)
    assert (ok, failed) == (list(range(150)), [])
    assert pixels.shape == (150, 3, preprocess.crop, preprocess.crop) and pixels.dtype == torch.uint8
    assert pixels.device.type == device
    mean, worst = differences(pixels, decoded("sample", "draft"))
    print(f"sample, {device}: mean abs diff {mean:.4f}, max {worst}")
    assert mean <= TOLERANCE[device][0] and worst <= TOLERANCE[device][1]


@pytest.mark.parametrize("device", DEVICES)
def test_large_jpegs_decode_to_the_cpu_paths_pixels(preprocess, image_sets, decoded, device):
    assert all(jpeg_precheck(Path("big.jpg"), d, preprocess) is None for d in image_sets["1,600 px"])
    pixels, ok, failed = decoded("1,600 px", device)
    assert (ok, failed) == (list(range(30)), [])
    mean, worst = differences(pixels, decoded("1,600 px", "full"))
    print(f"1,600 px, {device}, vs full decode: mean abs diff {mean:.4f}, max {worst}")
    assert mean <= TOLERANCE[device][0] and worst <= TOLERANCE[device][1]
    mean, worst = differences(pixels, decoded("1,600 px", "draft"))
    print(f"1,600 px, {device}, vs draft decode: mean abs diff {mean:.4f}, max {worst}")
    assert mean <= DRAFT_TOLERANCE[0] and worst <= DRAFT_TOLERANCE[1]


@pytest.mark.parametrize("name", ["sample", pytest.param("1,600 px", marks=pytest.mark.slow)])
@pytest.mark.parametrize("device", DEVICES)
def test_top1_agrees_with_the_cpu_path(backbone, preprocess, decoded, device, name):
    """The reference is Preprocess.pixels on the whole decoded image (timm's eval transform). The CPU loader's draft
    (DCT-scaled) decoding of large JPEGs is compared too, but only reported: on ImageNet top-1 of paintings (median
    margin between the first two classes ~0.1) the draft alone moves ~3% of 1,600-px images off the full decode."""
    pixels, ok, failed = decoded(name, device)
    agreement = top1_agreement(backbone, preprocess, pixels, decoded(name, "full"))
    drafted = top1_agreement(backbone, preprocess, pixels, decoded(name, "draft"))
    print(f"{name}, {device}: top-1 agreement {agreement:.3f} with the full decode, {drafted:.3f} with the draft "
          f"decode, over {len(ok)}")
    assert len(ok) == {"sample": 150, "1,600 px": 30}[name] and agreement >= MIN_TOP1_AGREEMENT[device]


def test_other_configurations_follow_the_config(backbone):
    """A bilinear config with another crop_pct and a non-square shape: same geometry and filter as the CPU path."""
    preprocess = Preprocess.from_data_config({**backbone.data_config, "interpolation": "bilinear", "crop_pct": 0.95,
                                              "input_size": (3, 200, 200)})
    assert (preprocess.resize, preprocess.crop) == (210, 200)
    paintings = [Image.open(p).convert("RGB") for p in sample_paintings(4)]
    datas = [jpeg_bytes(im.resize(size), quality=90) for im, size in
             zip(paintings, [(300, 220), (221, 333), (640, 480), (224, 224)])]
    pixels, ok, failed = decode_batch(datas, preprocess, "cpu")
    assert (ok, failed) == ([0, 1, 2, 3], [])
    mean, worst = differences(pixels, cpu_pixels(datas, preprocess, draft=False))
    assert mean <= TOLERANCE["cpu"][0] and worst <= TOLERANCE["cpu"][1]


def test_interpolation_without_a_device_kernel_stays_on_the_cpu(backbone):
    preprocess = Preprocess.from_data_config({**backbone.data_config, "interpolation": "lanczos"})
    data = sample_paintings(1)[0].read_bytes()
    row = jpeg_precheck(Path("a.jpg"), data, preprocess)
    assert row is not None and row.info.ok and row.image is not None
    with pytest.raises(ValueError, match="lanczos") as caught:
        decode_batch([data], preprocess, "cpu")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_the_cpu_loader(preprocess, orientation):
    image = Image.open(sample_paintings(1)[0]).convert("RGB").resize((320, 200))
    data = jpeg_bytes(image, exif=_orientation_exif(orientation), quality=95)
    assert jpeg_precheck(Path("r.jpg"), data, preprocess) is None
    info = jpeg_info(Path("r.jpg"), data)
    assert info == cpu_row(data, preprocess, "r.jpg").info
    assert (info.width, info.height) == ((200, 320) if orientation >= 5 else (320, 200))
    pixels, ok, failed = decode_batch([data], preprocess, "cpu")
    assert (ok, failed) == ([0], [])
    mean, worst = differences(pixels, cpu_pixels([data], preprocess))
    assert mean <= TOLERANCE["cpu"][0] and worst <= TOLERANCE["cpu"][1]


def with_component_ids(data: bytes, ids: bytes) -> bytes:
    """A baseline 3-component JPEG with its components renamed in the frame and scan headers (libjpeg-turbo reads
    components named R, G, B as RGB rather than YCbCr)."""
    out = bytearray(data)
    sof = out.index(b"\xff\xc0")
    sos = out.index(b"\xff\xda")
    for i in range(3):
        out[sof + 4 + 6 + 3 * i] = ids[i]
        out[sos + 4 + 1 + 2 * i] = ids[i]
    return bytes(out)


def _orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@functools.cache
def odd_files() -> dict[str, bytes]:
    """Files that must not reach the device path unjudged, written from a real painting."""
    painting = Image.open(sample_paintings(1)[0]).convert("RGB")
    good = jpeg_bytes(painting, quality=90)
    sos = good.index(b"\xff\xda")
    rng = np.random.default_rng(0)
    sof = good.index(b"\xff\xc0")
    claiming = lambda side: good[:sof + 5] + side.to_bytes(2, "big") * 2 + good[sof + 9:]  # noqa: E731
    png, mpo = io.BytesIO(), io.BytesIO()
    painting.save(png, "PNG")
    painting.save(mpo, "MPO", save_all=True, append_images=[painting.rotate(90)])
    return {
        "truncated.jpg": good[: int(len(good) * 0.4)],
        "garbage.jpg": good[: sos + 20] + rng.bytes(len(good) - sos - 22) + b"\xff\xd9",
        "garbage_no_end.jpg": good[: sos + 20] + rng.bytes(len(good) - sos - 20),
        "cmyk.jpg": jpeg_bytes(painting.convert("CMYK"), quality=90),
        "rgb_components.jpg": with_component_ids(jpeg_bytes(painting, quality=90, subsampling=0), b"RGB"),
        "rotated.jpg": jpeg_bytes(painting.resize((320, 200)), exif=_orientation_exif(6), quality=90),
        "gray.jpg": jpeg_bytes(painting.convert("L"), quality=90),
        "progressive.jpg": jpeg_bytes(painting, quality=90, progressive=True),
        "subsampling_444.jpg": jpeg_bytes(painting, quality=90, subsampling=0),
        "subsampling_422.jpg": jpeg_bytes(painting, quality=90, subsampling=1),
        "mpo.jpg": mpo.getvalue(),
        "png.jpg": png.getvalue(),
        "page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "bomb.jpg": claiming(20000),
        "over_pillows_warning.jpg": claiming(10000),
        "png_bomb.jpg": png_header_only(20000, 20000),
        "tiny.jpg": jpeg_bytes(painting.resize((10, 10)), quality=90),
        "empty.jpg": b"",
    }


#: name -> where the file must go: "cpu" (jpeg_precheck answers with the CPU loader's row), "device" (decoded here
#: to the CPU loader's pixels), "failed" (passes the header checks, fails in decode_batch), with the CPU loader's
#: verdict ("ok", a fragment of its reason, or None where it is not the point).
ROUTES = {
    "truncated.jpg": ("cpu", "truncated JPEG"),
    "garbage.jpg": ("cpu", "broken JPEG data"),  # nvjpeg would decode its noise: the scan check keeps it away
    "garbage_no_end.jpg": ("cpu", "JPEG"),
    "cmyk.jpg": ("cpu", "ok"),
    "rgb_components.jpg": ("cpu", "ok"),
    "rotated.jpg": ("device", "ok"),
    "gray.jpg": ("device", "ok"),
    "progressive.jpg": ("device", "ok"),
    "subsampling_444.jpg": ("device", "ok"),
    "subsampling_422.jpg": ("device", "ok"),
    "mpo.jpg": ("device", "ok"),
    "png.jpg": ("cpu", "ok"),
    "page.jpg": ("cpu", "HTML page saved under an image name"),
    "bomb.jpg": ("cpu", "decompression bomb: 400 MP exceeds the limit of 179 MP"),
    "png_bomb.jpg": ("cpu", "decompression bomb"),
    "over_pillows_warning.jpg": ("cpu", None),  # the CPU loader decodes it: libjpeg pads the missing scan data
    "tiny.jpg": ("cpu", "too small: 10x10 px, below the minimum side of 32 px"),
    "empty.jpg": ("cpu", "empty file (0 bytes)"),
}


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest.mark.parametrize("device", DEVICES)
def test_odd_files_get_the_cpu_loaders_verdict(preprocess, device, name):
    data = odd_files()[name]
    path = Path("Baroque") / name
    expected = cpu_row(data, preprocess, str(path))
    route, verdict = ROUTES[name]
    if verdict == "ok":
        assert expected.info.ok
    elif verdict is not None:
        assert not expected.info.ok and verdict in expected.info.reason
        assert "\n" not in expected.info.reason
    row = jpeg_precheck(path, data, preprocess)
    if route == "cpu":
        assert row is not None, "must not reach the device path"
        assert row.info == expected.info
        if expected.info.ok:
            assert np.array_equal(np.asarray(row.image), np.asarray(expected.image))
        return
    assert row is None
    pixels, ok, failed = decode_batch([data], preprocess, device)
    if route == "failed":
        assert (ok, failed) == ([], [0]) and pixels.shape == (0, 3, preprocess.crop, preprocess.crop)
        assert not expected.info.ok
        return
    assert (ok, failed) == ([0], [])
    assert jpeg_info(path, data) == expected.info
    mean, worst = differences(pixels, cpu_pixels([data], preprocess))
    assert mean <= TOLERANCE[device][0] and worst <= TOLERANCE[device][1]


@pytest.mark.parametrize("device", DEVICES)
def test_failed_files_are_reported_by_position_and_the_rest_stay_in_order(preprocess, device):
    """A file the decoder rejects fails the batched call; the retry finds it and keeps the others' order. Files that
    jpeg_precheck would not pass are never decoded here, only reported (the CPU loader judges them)."""
    files = odd_files()
    good = [p.read_bytes() for p in sample_paintings(3)]
    batch = [good[0], files["garbage.jpg"], good[1], files["page.jpg"], good[2], files["rotated.jpg"],
             files["bomb.jpg"], files["cmyk.jpg"], files["truncated.jpg"]]
    pixels, ok, failed = decode_batch(batch, preprocess, device)
    assert (ok, failed) == ([0, 2, 4, 5], [1, 3, 6, 7, 8])
    mean, worst = differences(pixels, cpu_pixels([batch[i] for i in ok], preprocess))
    assert mean <= TOLERANCE[device][0] and worst <= TOLERANCE[device][1]


def test_an_empty_batch_gives_an_empty_tensor(preprocess):
    pixels, ok, failed = decode_batch([], preprocess, "cpu")
    assert pixels.shape == (0, 3, preprocess.crop, preprocess.crop) and (ok, failed) == ([], [])


def test_prechecked_batches_skip_pillow_only_for_files_without_exif(preprocess, monkeypatch):
    """`prechecked=True` trusts jpeg_precheck's verdict: files with no EXIF or XMP are not reopened by Pillow, files
    with EXIF still are (for their orientation), and the pixels are the same as with the full gate."""
    import curator.embedding.gpu_decode as gpu_decode

    painting = Image.open(sample_paintings(1)[0]).convert("RGB").resize((320, 200))
    datas = [p.read_bytes() for p in sample_paintings(4)]
    datas += [jpeg_bytes(painting, exif=_orientation_exif(o), quality=90) for o in (3, 6, 8)]
    assert all(jpeg_precheck(Path("a.jpg"), d, preprocess) is None for d in datas)
    full, ok, failed = decode_batch(datas, preprocess, "cpu")
    assert (ok, failed) == (list(range(7)), [])
    opened = []
    real_header = gpu_decode._header
    monkeypatch.setattr(gpu_decode, "_header", lambda data: opened.append(data) or real_header(data))
    trusted, ok, failed = decode_batch(datas, preprocess, "cpu", prechecked=True)
    assert (ok, failed) == (list(range(7)), [])
    assert opened == datas[4:]
    assert torch.equal(trusted, full)
