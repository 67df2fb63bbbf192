"""One settings-error type: every settings class of both tools rejects a bad value with `SettingsError`, which the
CLIs print as one line with exit 2 (a `UsageError`) and which code catching `ValueError` still sees."""

from __future__ import annotations

import pytest

from curator.core.errors import SettingsError, UsageError


def _cases():
    from classify.predict import PredictSettings
    from classify.serve.engine import ServeSettings
    from classify.train_settings import TrainSettings
    from curator.core.settings import DuplicateSettings, MislabelSettings, QualitySettings
    from curator.embedding.preprocess import Preprocess
    from curator.embedding.ray_embed import RaySettings
    from curator.ingest.fetch import FetchSettings
    from curator.stages.splits import SplitSettings

    return {
        "DuplicateSettings": lambda: DuplicateSettings(conflicts="sometimes"),
        "MislabelSettings": lambda: MislabelSettings(folds=1),
        "QualitySettings": lambda: QualitySettings(z=-1.0),
        "SplitSettings": lambda: SplitSettings(folds=1),
        "FetchSettings": lambda: FetchSettings(rate=0),
        "RaySettings": lambda: RaySettings(concurrency=0),
        "Preprocess": lambda: Preprocess(resize=10, crop=20, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1)),
        "TrainSettings": lambda: TrainSettings(epochs=-1),
        "PredictSettings": lambda: PredictSettings(top_k=0),
        "ServeSettings": lambda: ServeSettings(top_k=0),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_every_settings_class_raises_the_one_settings_error(name):
    with pytest.raises(SettingsError) as caught:
        _cases()[name]()
    assert isinstance(caught.value, UsageError) and isinstance(caught.value, ValueError)
    assert caught.value.exit_code == 2
    assert "\n" not in str(caught.value) and str(caught.value)
