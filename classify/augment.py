"""Stage 2's augmentation: timm's training transform on the pixel cache's squares, each crop seeded on its own.

`augmentation` is `timm.data.create_transform(is_training=True)` for the model's data config (crop side,
interpolation), with the run's random-resized-crop scale, horizontal flip and colour jitter, plus a small rotation
(timm's factory has none; torchvision's, between timm's crop/flip and its colour stage). It takes the cached square
as a uint8 CHW tensor as it is: timm's crop and torchvision's flip, rotation and jitter all work on tensors, and the
prefetcher form of the transform (`use_prefetcher=True`) ends in uint8, unnormalised, because `Classifier` normalises
on the device.

timm's crop draws from Python's `random`, the others from torch's default generator; neither takes a generator.
`SeededAugment` therefore runs the transform inside `classify.rng.private_rng(seed)`, with `seed` drawn for that crop
from the run's generator: a crop depends on its seed alone (not on the worker process that made it, nor on the order),
the pixel-cache and the decoded-on-the-fly paths give the same crops, and the process's generators are left as they
were.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from classify.rng import private_rng
from curator.embedding.preprocess import Preprocess

if TYPE_CHECKING:
    from classify.train_settings import TrainSettings

#: serialises `SeededAugment` within a process: it reseeds the process's generators (restored after), which two
#: staging threads (a train and a target stream on CUDA without workers) must not do at the same time
_AUGMENT_LOCK = threading.Lock()


def augmentation(settings: TrainSettings, preprocess: Preprocess):
    """Stage 2's augmentation of a uint8 CHW square to a uint8 CHW crop of side `preprocess.crop`: timm's random
    resized crop (at least `min_scale` of the area, the model's interpolation) and horizontal flip, a rotation of up to
    `rotation` degrees, timm's colour jitter (`jitter` on brightness, contrast and saturation, a fifth of it on hue)."""
    from timm.data import create_transform
    from torchvision import transforms

    s = settings
    crop_flip, colour, to_tensor = create_transform(
        preprocess.crop, is_training=True, scale=(s.min_scale, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
        color_jitter=(s.jitter, s.jitter, s.jitter, s.jitter / 5), interpolation=preprocess.interpolation,
        mean=preprocess.mean, std=preprocess.std, use_prefetcher=True, separate=True)
    return transforms.Compose([*crop_flip.transforms, transforms.RandomRotation(s.rotation), *colour.transforms,
                               *to_tensor.transforms])


class SeededAugment:
    """`augmentation` as a `classify.data.Augment`: (square HWC uint8, seed) to a uint8 CHW crop whose randomness
    comes from `seed` alone (module docstring). Picklable, for DataLoader and data-plane worker processes."""

    def __init__(self, settings: TrainSettings, preprocess: Preprocess):
        self.settings = settings
        self.preprocess = preprocess
        self._transform = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_transform": None}

    def __call__(self, square: np.ndarray, seed: int) -> np.ndarray:
        if self._transform is None:
            self._transform = augmentation(self.settings, self.preprocess)
        pixels = torch.from_numpy(np.array(square)).permute(2, 0, 1)
        with _AUGMENT_LOCK, private_rng(seed):
            return self._transform(pixels).contiguous().numpy()
