"""Stage 1's linear probe reports what it fitted: the train loss and accuracy of the fitted head, not the loss
L-BFGS starts from (ln of the class count, from zero weights: the `train_loss 1.6094` of a 5-class log)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from classify.classifier import FeatureHead
from classify.probe import train_probe
from classify.train_settings import TrainSettings


@pytest.mark.parametrize("in_place", [False, True])
def test_the_probe_records_the_fitted_heads_train_loss_and_accuracy(in_place):
    generator = torch.Generator().manual_seed(0)
    classes, per_class, dim = 5, 40, 16
    centres = torch.randn(classes, dim, generator=generator) * 4
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    val_labels = np.arange(classes).repeat(4)
    val = centres[torch.from_numpy(val_labels)] + torch.randn(len(val_labels), dim, generator=generator)
    head = FeatureHead(dim, classes, dropout=0.0)
    head.set_statistics(features)
    settings = TrainSettings(probe_l2=(1e-3, 1.0), probe_steps=100, label_smoothing=0.0)
    _, records = train_probe(features.clone(), labels, torch.ones(len(labels)), val, val_labels, head, settings,
                             in_place=in_place)
    weak, strong = records
    assert weak["train_accuracy"] == 1.0 and weak["val_accuracy"] == 1.0  # well-separated clusters
    assert weak["train_loss"] < 0.1 < math.log(classes)
    # a heavy L2 penalty fits less: a higher fitted loss, each strength its own number (not the shared start)
    assert weak["train_loss"] < strong["train_loss"] < math.log(classes)
