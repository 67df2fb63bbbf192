"""What the model side can run on (`classify models`): the offline backbones and their state on this machine. The
network a run trains, backbone + head, is `classify.classifier`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from curator.embedding.backbones import REGISTRY, load_backbone


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    installed: bool
    description: str
    input_size: str | None = None
    feature_dim: int | None = None


def describe_backbones(load: bool = False) -> list[BackboneInfo]:
    """One entry per registered offline backbone; with `load`, installed ones are built to report their shapes."""
    out = []
    for name, spec in REGISTRY.items():
        installed = importlib.util.find_spec(spec.package) is not None
        input_size = feature_dim = None
        if load and installed:
            backbone = load_backbone(name)
            _, h, w = backbone.data_config["input_size"]
            input_size, feature_dim = f"{h}x{w}", backbone.feature_dim
        out.append(BackboneInfo(name, installed, spec.description, input_size, feature_dim))
    return out
