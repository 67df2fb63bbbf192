"""The one preprocessing path: a model's eval transform, built from its timm data config, used by every stage.

Geometry (timm's centre-crop eval transform): the shorter side is resized to `resize` = floor(input / crop_pct) with
the config's interpolation, the centre `resize` x `resize` square is kept (`square`: what the pixel cache stores),
and the centre `crop` x `crop` of that square is the model's input (`pixels`). `curator clean`, `classify train`,
`classify eval`, `classify dir` and the GPU decode path all produce their uint8 batches this way, so a cached
embedding, a training crop's source and a prediction see the same pixels; normalisation (`mean`, `std`) is applied
to whole batches on the model's device. `key` names all of it, for cache keys.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from curator.core.errors import SettingsError

#: Bumped whenever the geometry or the resampling below changes, so that caches keyed by it are not reused.
VERSION = 2
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, keep the centre square, then its centre `crop` square; uint8 out."""

    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not (0 < self.crop <= self.resize):
            raise SettingsError(f"preprocessing needs 0 < crop <= resize, got crop {self.crop} and resize "
                                f"{self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise SettingsError(f"unknown interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}")

    @classmethod
    def from_data_config(cls, config: dict) -> Preprocess:
        """The preprocessing a timm data config describes (`timm.data.resolve_model_data_config`)."""
        crop = int(config["input_size"][-1])
        crop_pct = float(config.get("crop_pct") or 1.0)
        resize = max(crop, int(math.floor(crop / crop_pct)))
        interpolation = str(config.get("interpolation") or "bilinear")
        if interpolation not in INTERPOLATIONS:
            interpolation = "bicubic" if interpolation == "random" else "bilinear"
        return cls(resize, crop, interpolation, tuple(map(float, config["mean"])), tuple(map(float, config["std"])))

    @property
    def draft_size(self) -> tuple[int, int]:
        """What a JPEG may be draft-decoded to (never below): the resized square's side."""
        return (self.resize, self.resize)

    @property
    def offset(self) -> int:
        """Where the model's crop starts inside the square, on both axes."""
        return (self.resize - self.crop) // 2

    def key(self) -> str:
        """Every parameter that changes the pixels, as text for cache keys."""
        return ",".join(f"{k}={v}" for k, v in sorted({**asdict(self), "version": VERSION}.items()))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the shorter side is resized to `resize` (torchvision's rounding)."""
        if width <= height:
            return self.resize, max(self.resize, int(self.resize * height / width))
        return max(self.resize, int(self.resize * width / height)), self.resize

    def square(self, image) -> np.ndarray:
        """A PIL RGB image to the centre `resize` square, uint8 HWC."""
        from PIL import Image

        width, height = self.resized_size(*image.size)
        resample = getattr(Image.Resampling, self.interpolation.upper())
        resized = image.resize((width, height), resample, reducing_gap=None)
        left, top = (width - self.resize) // 2, (height - self.resize) // 2
        return np.asarray(resized.crop((left, top, left + self.resize, top + self.resize)), dtype=np.uint8)

    def crop_square(self, square: np.ndarray) -> np.ndarray:
        """The model's input from a `square` (HWC): uint8 CHW, contiguous."""
        o = self.offset
        return np.ascontiguousarray(square[o:o + self.crop, o:o + self.crop].transpose(2, 0, 1))

    def pixels(self, image) -> np.ndarray:
        """A PIL RGB image to the model's input, uint8 CHW."""
        return self.crop_square(self.square(image))
