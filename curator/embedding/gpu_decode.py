"""Batched JPEG decoding on the model's device (nvjpeg on CUDA), for the data plane.

Two steps, so that the safe loader's judgement stays the only judgement:
- `jpeg_precheck` runs on the CPU, on each file's bytes, before anything reaches nvjpeg (~0.1 ms a file, no
  decoding). It answers None only for a plain 8-bit baseline or progressive JPEG (YCbCr or grayscale) that
  `curator.core.images.decode_bytes` would accept judging by its header: not a bomb, not too small, readable EXIF, and
  complete (an end-of-image marker after the scan data), with no marker inside the scan data that a JPEG cannot
  hold there (nvjpeg decodes random scan data to noise without complaint). Anything else (other formats, text under
  an image name, CMYK/YCCK, RGB-coded, 12-bit, lossless or arithmetic-coded JPEGs, truncated or damaged files, bombs,
  tiny images) is judged and decoded by `decode_bytes` right there, so its row, reason and pixels are exactly the CPU
  loader's.
  `jpeg_info` gives the `FileInfo` (the CPU loader's, field for field) for a file that then decodes here.
- `decode_batch` applies the same header gate itself (a file that would not pass is reported failed, never decoded),
  decodes the rest in one `torchvision.io.decode_jpeg` call on `device` (nvjpeg on CUDA; libjpeg-turbo on the CPU,
  which is how the tests cover it, though there it is slower than Pillow), applies the EXIF orientation itself
  (torchvision does that on the CPU only, so doing it here keeps both devices identical), resizes the shorter side to
  `preprocess.resize` with antialiasing in the config's interpolation family, horizontal pass then vertical pass in
  float32 with 8-bit rounding between them (as Pillow does), and keeps the centre crop (`Preprocess`'s geometry).
  A file that fails to decode is reported by position: the caller hands it to the CPU loader, which gives the reason.

On the CPU the pixels equal the CPU loader's for full decodes to within 1-2 levels (rounding). Differences that
remain: nvjpeg's IDCT and chroma upsampling vs libjpeg-turbo's (CUDA only), and the CPU loader's draft (DCT-scaled)
decoding of JPEGs at least twice the resize side, which the device path does not imitate: it decodes them whole, as
timm's own transform does. tests/curator/embedding/test_gpu_decode.py bounds both and checks the default backbone's
top-1.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from curator.core.images import _DECODE_ERRORS, MAX_PIXELS, MIN_SIDE, STATUS_OK, Decoded, FileInfo, decode_bytes
from curator.embedding.preprocess import Preprocess

#: Interpolations the device path reproduces (torch's antialiased kernels are Pillow's filters for these).
DEVICE_INTERPOLATIONS = ("bilinear", "bicubic")
#: Start-of-frame markers nvjpeg decodes: baseline, extended sequential (8-bit only, checked) and progressive Huffman.
_DEVICE_SOF = (0xC0, 0xC1, 0xC2)
_OTHER_SOF = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
#: What may follow a 0xFF byte from the first scan to the end of the image: stuffing (00), fill (FF), restart markers,
#: the segments a progressive or multi-scan file puts between scans (DHT, DAC, DQT, DNL, DRI, APPn, COM, SOS) and EOI.
_SCAN_FOLLOWERS = np.zeros(256, dtype=bool)
_SCAN_FOLLOWERS[[0x00, 0xFF, 0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xD0, 0xD8),
                 *range(0xE0, 0xF0)]] = True
#: EXIF orientations that turn an image, looked up as `ImageOps.exif_transpose` looks them up.
_ORIENTATIONS = {value: value for value in range(2, 9)}
#: Resampling works on float32 copies; groups of same-size images are cut into chunks of at most this many pixels.
_CHUNK_PIXELS = 32 * 1024 * 1024


@dataclass(frozen=True)
class _Frame:
    """What the JPEG markers before the first scan say: frame type, size and layout, and whether the file ends."""

    sof: int
    precision: int
    width: int
    height: int
    component_ids: tuple[int, ...]
    adobe_transform: int | None
    has_app1: bool  # EXIF or XMP, where Pillow looks for the orientation
    complete: bool


def _scan_data_plausible(data: bytes, start: int) -> bool:
    """Whether the bytes from the first scan to the first end-of-image marker hold only the markers a JPEG may hold
    there. nvjpeg decodes random entropy data without complaint (to noise), where libjpeg-turbo gives up; a file whose
    scan data is damaged this way goes to the CPU loader, which judges it. Costs ~0.1 ms per 100 KB."""
    end = data.find(b"\xff\xd9", start)
    tail = np.frombuffer(data, dtype=np.uint8, count=(len(data) if end == -1 else end) - start, offset=start)
    at = np.flatnonzero(tail[:-1] == 0xFF)
    return bool(_SCAN_FOLLOWERS[tail[at + 1]].all())


def _scan_markers(data: bytes, check_scan: bool = True) -> _Frame | None:
    """Walk the marker segments from SOI to the first SOS; None when the structure is not a plain JPEG's, or (with
    `check_scan`) when the scan data holds a marker no JPEG holds there."""
    pos, n = 2, len(data)
    frame = None
    adobe = None
    app1 = False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return None
        body = data[pos + 4:pos + 2 + length]
        if marker in _DEVICE_SOF or marker in _OTHER_SOF:
            if frame is not None or len(body) < 6 or len(body) < 6 + 3 * body[5]:
                return None
            ids = tuple(body[6 + 3 * i] for i in range(body[5]))
            frame = (marker, body[0], int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"), ids)
        elif marker == 0xEE and body.startswith(b"Adobe") and len(body) >= 12:
            adobe = body[11]
        elif marker == 0xE1:
            app1 = True
        elif marker == 0xDA:
            if frame is None or (check_scan and not _scan_data_plausible(data, pos + 2 + length)):
                return None
            # FF D9 cannot occur inside entropy-coded data (a data FF is stuffed as FF 00), so without one after the
            # first scan the file was cut short. Searched from the end, where it is.
            return _Frame(*frame, adobe, app1, data.rfind(b"\xff\xd9", pos + 2 + length) != -1)
        elif marker == 0xD9:
            return None
        pos += 2 + length
    return None


def _device_decodable(frame: _Frame) -> bool:
    """Whether nvjpeg decodes this frame, completely and to the colours libjpeg-turbo gives."""
    if frame.sof not in _DEVICE_SOF or frame.precision != 8 or not frame.complete:
        return False
    if len(frame.component_ids) == 1:
        return True
    if len(frame.component_ids) != 3:
        return False  # CMYK / YCCK and other layouts: the CPU loader converts them
    # libjpeg-turbo reads components named R, G, B, or an Adobe marker with transform 0, as RGB rather than YCbCr.
    return frame.component_ids != (0x52, 0x47, 0x42) and frame.adobe_transform != 0


def _header(data: bytes) -> tuple[Image.Image, int]:
    """Pillow's lazily opened image (nothing decoded) and the EXIF orientation `decode_bytes` applies (1 for anything
    but 2-8). Raises what Pillow raises for a bad header or bad EXIF."""
    im = Image.open(io.BytesIO(data))
    return im, _ORIENTATIONS.get(im.getexif().get(0x0112, 1), 1)


def _oriented(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _device_header(data: bytes, preprocess: Preprocess, prechecked: bool = False) -> tuple[int, int, int] | None:
    """(width, height as stored, EXIF orientation) when `data` may be decoded on the device: a plain JPEG that the
    safe loader accepts judging by its header; None for anything the CPU loader must judge. `prechecked`: these
    bytes passed `jpeg_precheck` (Pillow opened them, their scan data was checked), so neither check runs again for
    a file without EXIF or XMP."""
    if preprocess.interpolation not in DEVICE_INTERPOLATIONS or not data.startswith(b"\xff\xd8\xff"):
        return None
    frame = _scan_markers(data, check_scan=not prechecked)
    if frame is None or not _device_decodable(frame):
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and frame.width * frame.height > limit:
        return None  # Pillow would warn about or refuse it: the CPU loader judges it, in its own words
    if prechecked and not frame.has_app1:
        return _judged(frame.width, frame.height, 1)
    try:
        im, orientation = _header(data)
    except (*_DECODE_ERRORS, TypeError):  # TypeError: an orientation value Pillow cannot look up
        return None
    if im.format not in ("JPEG", "MPO") or im.mode not in ("RGB", "L") or im.size != (frame.width, frame.height):
        return None
    return _judged(frame.width, frame.height, orientation)


def _judged(width: int, height: int, orientation: int) -> tuple[int, int, int] | None:
    """The header, unless the CPU loader rejects this geometry (a bomb, too small) without decoding."""
    upright_width, upright_height = _oriented(width, height, orientation)
    if upright_width * upright_height > MAX_PIXELS or min(upright_width, upright_height) < MIN_SIDE:
        return None
    return width, height, orientation


def jpeg_precheck(path: Path, data: bytes, preprocess: Preprocess) -> Decoded | None:
    """None when `data` may go to `decode_batch`: a plain 8-bit JPEG that the safe loader accepts by its header.
    Otherwise the CPU loader's own row, `decode_bytes(path, data, preprocess.draft_size)`: corrupt or ignored with its
    reason, or ok with the decoded image for files the device path leaves to the CPU (CMYK, a PNG under a .jpg name,
    a configuration whose interpolation has no device kernel, ...)."""
    if _device_header(data, preprocess) is None:
        return decode_bytes(Path(path), data, preprocess.draft_size)
    return None


def jpeg_info(path: Path, data: bytes) -> FileInfo:
    """The `FileInfo` the CPU loader gives a JPEG that `jpeg_precheck` passed and `decode_batch` decoded."""
    im, orientation = _header(data)
    width, height = _oriented(*im.size, orientation)
    sha = hashlib.sha256(data).hexdigest()
    return FileInfo(Path(path), sha, len(data), width, height, im.format, im.mode, STATUS_OK, None)


def _apply_orientation(image, orientation: int):
    """(C, H, W) tensor turned upright the way `PIL.ImageOps.exif_transpose` turns an image."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def _decode(datas: Sequence[bytes], device) -> list:
    """Decoded (3, H, W) uint8 tensors on `device`, None where a file fails; one batched call when none fails."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass  # one bad file fails the whole batched call: find it
    images = []
    for tensor in tensors:
        try:
            images.append(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=device)[0])
        except (RuntimeError, ValueError):
            images.append(None)
    return images


def _resample(batch, size: tuple[int, int], interpolation: str):
    """(N, 3, H, W) uint8 to (N, 3, height, width) uint8, antialiased, in float32, the way Pillow resamples: the
    horizontal pass first, rounded and clipped to 8 bits, then the vertical pass (an axis whose size does not change
    is skipped). Rounding between the passes keeps a sharp edge's overshoot from reaching the second pass, which
    would otherwise move such pixels by up to ~15 levels."""
    import torch

    height, width = size
    x = batch.float()
    for target in ((x.shape[-2], width), (height, width)):
        if tuple(x.shape[-2:]) != target:
            x = torch.nn.functional.interpolate(x, size=target, mode=interpolation, antialias=True,
                                                align_corners=False)
            x = x.add_(0.5).floor_().clamp_(0, 255)
    return x.to(torch.uint8)


def decode_batch(datas: Sequence[bytes], preprocess: Preprocess, device, *, prechecked: bool = False) -> tuple:
    """Decode JPEG bytes (each passed by `jpeg_precheck`) on `device` and preprocess them there.

    The header gate runs again here (~0.1 ms a file and ~0.1 ms per 100 KB of scan data, in the caller's thread);
    `prechecked=True` says that every file did pass `jpeg_precheck`, which skips the scan check and, for files without
    EXIF or XMP, Pillow.

    Returns `(pixels, ok, failed)`: `pixels` is uint8 (len(ok), 3, crop, crop) on `device`, row i being the file at
    position `ok[i]` of `datas`; `failed` lists the positions that did not decode, or that `jpeg_precheck` would not
    have passed (to be judged by the CPU loader). Images of one size are resampled together.
    """
    import torch

    if preprocess.interpolation not in DEVICE_INTERPOLATIONS:
        raise ValueError(f"the device decode path resamples with {' or '.join(DEVICE_INTERPOLATIONS)}, not "
                         f"{preprocess.interpolation}; jpeg_precheck leaves such files to the CPU loader")
    device = torch.device(device)
    crop, resize, offset = preprocess.crop, preprocess.resize, preprocess.offset
    headers = [_device_header(data, preprocess, prechecked) for data in datas]
    wanted = [i for i, header in enumerate(headers) if header is not None]
    images = dict(zip(wanted, _decode([datas[i] for i in wanted], device))) if wanted else {}
    upright: dict[int, object] = {}
    failed = []
    for i, header in enumerate(headers):
        image = images.get(i)
        if image is None or tuple(image.shape) != (3, header[1], header[0]):
            failed.append(i)
            continue
        upright[i] = _apply_orientation(image, header[2])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in upright.items():
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    crops = {}
    for (height, width), members in groups.items():
        target_w, target_h = preprocess.resized_size(width, height)
        top = (target_h - resize) // 2 + offset
        left = (target_w - resize) // 2 + offset
        per_chunk = max(1, _CHUNK_PIXELS // (height * width))
        for start in range(0, len(members), per_chunk):
            chunk = members[start:start + per_chunk]
            resized = _resample(torch.stack([upright[i] for i in chunk]), (target_h, target_w),
                                preprocess.interpolation)
            for j, i in enumerate(chunk):
                crops[i] = resized[j, :, top:top + crop, left:left + crop]
    ok = sorted(crops)
    if not ok:
        return torch.empty((0, 3, crop, crop), dtype=torch.uint8, device=device), ok, failed
    return torch.stack([crops[i] for i in ok]), ok, failed
