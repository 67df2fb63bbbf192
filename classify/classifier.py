"""The classifier network: a pretrained backbone's feature vector (pooled + style statistics) into a linear head, and
which of its parts stage 2 trains.

The head reads exactly the vector `curator` caches as an image's embedding (`curator.embedding.embed.forward_features`),
so the stage-1 probe trains on cached embeddings in seconds and its weights start stage 2, where the backbone's last
blocks are fine-tuned with the head ("linear probe, then fine-tune": the head does not wreck the pretrained features
with random gradients in the first steps). Freezing goes through timm's `freeze`/`unfreeze`.

(`classify.models` is something else: the catalogue of backbones this machine can run, for `classify models`.)
"""

from __future__ import annotations

import torch
from torch import nn

from curator.embedding.backbones import Backbone
from curator.embedding.embed import forward_features, pixel_scale


class FeatureHead(nn.Module):
    """Standardise the feature vector with the train split's statistics, dropout, then one linear layer."""

    def __init__(self, dim: int, classes: int, dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, classes)

    def set_statistics(self, features: torch.Tensor) -> None:
        """Take the mean and standard deviation of each feature from `features` (the train split's)."""
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp_min(1e-6))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.standardise(features)))


class Classifier(nn.Module):
    """Backbone + head. `forward` takes uint8 NCHW pixels made by the backbone's `preprocess` (cropped to its input
    size) and normalises them with that preprocessing's mean and std."""

    def __init__(self, backbone: Backbone, classes: int, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.net = backbone.model
        self.head = FeatureHead(backbone.feature_dim, classes, dropout)
        preprocess = backbone.preprocess
        mean, std = pixel_scale(preprocess.mean, preprocess.std)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() - self.pixel_mean) / self.pixel_std
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return forward_features(self.backbone, self.normalise(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


def block_sequence(model: nn.Module) -> tuple[str, nn.Sequential | nn.ModuleList] | None:
    """The model's main sequence of blocks/stages (timm names it blocks, stages or layers), if it has one."""
    for name in ("blocks", "stages", "layers"):
        seq = getattr(model, name, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
            return name, seq
    return None


def trainable_names(model: nn.Module, unfreeze: int) -> list[str]:
    """Names (as `named_modules` gives them) of the backbone's last `unfreeze` blocks and of every top-level module
    after the block sequence (final conv, norm, pooling); [""] (the whole model) when it has no block sequence;
    [] when `unfreeze` is 0."""
    if unfreeze <= 0:
        return []
    found = block_sequence(model)
    if found is None:
        return [""]
    name, seq = found
    names = [f"{name}.{i}" for i in range(max(0, len(seq) - unfreeze), len(seq))]
    children = [child for child, _ in model.named_children()]
    return names + children[children.index(name) + 1:]


def set_trainable(model: nn.Module, unfreeze: int) -> list[nn.Module]:
    """Freeze the backbone except its last `unfreeze` blocks and what follows them (`trainable_names`), with timm's
    `freeze`/`unfreeze`; returns the trainable modules. `unfreeze=0` freezes everything.

    Batch norm stays `BatchNorm2d` (timm's `include_bn_running_stats` would swap frozen ones for
    `FrozenBatchNorm2d`, whose tensors a checkpoint of this architecture does not have); frozen blocks keep their
    statistics by staying in eval mode (`set_train_mode`)."""
    from timm.utils import freeze
    from timm.utils import unfreeze as unfreeze_modules

    freeze(model, include_bn_running_stats=False)
    names = trainable_names(model, unfreeze)
    if not names:
        return []
    unfreeze_modules(model, [n for n in names if n], include_bn_running_stats=False)
    return [model.get_submodule(n) for n in names]


def set_train_mode(classifier: Classifier, trainable: list[nn.Module]) -> None:
    """Train mode for the head and the unfrozen modules only: frozen blocks keep their ImageNet batch-norm
    statistics instead of drifting towards a small batch's."""
    classifier.eval()
    classifier.head.train()
    for module in trainable:
        module.train()
