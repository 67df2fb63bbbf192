"""Library calls leave the process as they found it: no allocator setting (mallopt or the environment), no change to
torch's, numpy's or Python's global random generators, no matplotlib backend switch."""

from __future__ import annotations

import ctypes
import os
import random

import matplotlib
import numpy as np
import pytest
import torch

from classify.evaluate import evaluate
from classify.rng import private_rng
from classify.train import TrainSettings, train

FAST = dict(model="efficientnet_lite0", epochs=1, unfreeze=1, batch_size=16, workers=0, probe_l2=(1e-2,),
            probe_steps=50)


class _Process:
    """What a library call must not change, captured now, and whether mallopt was looked up since."""

    def __init__(self, monkeypatch):
        self.mallopt: list[str] = []
        spy = self.mallopt
        real = ctypes.CDLL

        class SpyCDLL(real):
            def __getattr__(self, name):
                if name == "mallopt":
                    spy.append(self._name)
                return super().__getattr__(name)

        monkeypatch.setattr(ctypes, "CDLL", SpyCDLL)
        self.state = self.capture()

    @staticmethod
    def capture() -> dict:
        numpy_state = np.random.get_state()
        return {"torch": torch.random.get_rng_state(), "numpy": (numpy_state[0], numpy_state[1].copy(),
                                                                 *numpy_state[2:]),
                "python": random.getstate(), "backend": matplotlib.get_backend(), "environ": dict(os.environ),
                "threads": torch.get_num_threads()}

    def assert_unchanged(self) -> None:
        now = self.capture()
        assert torch.equal(now["torch"], self.state["torch"])
        assert now["numpy"][0] == self.state["numpy"][0] and np.array_equal(now["numpy"][1], self.state["numpy"][1])
        assert now["numpy"][2:] == self.state["numpy"][2:]
        for key in ("python", "backend", "environ", "threads"):
            assert now[key] == self.state[key], key
        assert self.mallopt == []


@pytest.mark.slow  # trains (probe + one fine-tune epoch) and evaluates a real model
def test_train_and_evaluate_leave_the_allocator_rngs_and_matplotlib_backend_alone(sample_ws, tmp_path, monkeypatch):
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    process = _Process(monkeypatch)
    result = train(sample_ws / "splits.parquet", tmp_path / "run", TrainSettings(**FAST))
    process.assert_unchanged()
    evaluate(result.run_dir, workers=0)
    process.assert_unchanged()
    assert (result.run_dir / "eval-test" / "confusion_matrix.png").is_file()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="glibc (Linux) only")
def test_the_mallopt_spy_sees_the_allocator_being_configured(monkeypatch):
    """The spy above is not blind: the CLIs' `configure_allocator` looks mallopt up through it."""
    from curator.core.runtime import configure_allocator

    process = _Process(monkeypatch)
    configure_allocator()
    assert process.mallopt and "mallopt" not in str(process.mallopt)
    with pytest.raises(AssertionError):
        process.assert_unchanged()


def test_private_rng_seeds_within_and_restores_every_generator_after():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with private_rng(42):
        first = torch.rand(2), random.random(), np.random.rand()
    with private_rng(42):
        again = torch.rand(2), random.random(), np.random.rand()
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert torch.equal(torch.random.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    with pytest.raises(RuntimeError), private_rng(7):
        torch.rand(1)
        raise RuntimeError("restored on the way out of an error too")
    assert torch.equal(torch.random.get_rng_state(), before[0])
