from __future__ import annotations

from typer.testing import CliRunner

from classify.cli import app
from classify.models import describe_backbones


def test_default_backbone_is_installed_and_described():
    rows = {row.name: row for row in describe_backbones(load=True)}
    lite0 = rows["efficientnet_lite0"]
    assert lite0.installed and lite0.input_size == "224x224" and lite0.feature_dim == 2304
    lite2 = rows["efficientnet_lite2"]  # `classify train`'s default: installed with atelier, offline
    assert lite2.installed and lite2.input_size == "260x260"


def test_training_defaults_to_an_installed_offline_backbone():
    from classify.train import TrainSettings
    from curator.embedding.backbones import REGISTRY

    assert TrainSettings().model in REGISTRY


def test_cli_models_lists_offline_backbones():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "efficientnet_lite0" in result.output and "efficientnet_lite2" in result.output
