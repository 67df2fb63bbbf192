"""Randomness without side effects on the process.

Everything `classify train` draws itself comes from explicit generators made from its seed (sampler orders, crop
seeds, DataLoader worker seeds). Third-party code that takes no generator draws from the process's default ones:
timm's and torch's weight initialisation, dropout, a DataLoader's base seed where the data plane makes one. That code
runs inside `private_rng`, which seeds those default generators from the run's seed and puts them back as they were
on the way out, so a library call leaves `torch.random.get_rng_state()`, `np.random.get_state()` and
`random.getstate()` as it found them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def _cuda_indices(device: torch.device) -> list[int]:
    """The CUDA device whose generator `device` uses, as a list (empty off CUDA)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextmanager
def private_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Within: torch's default CPU generator (and `device`'s CUDA generator), numpy's legacy global generator and
    Python's `random` seeded from `seed`; afterwards each of them exactly as before. Not for use while another
    thread draws from the same default generators (they are the process's)."""
    cuda = _cuda_indices(torch.device(device))
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
