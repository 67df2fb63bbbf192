"""Stage 2's parts on timm's tools: freezing, no-decay groups with the head's rate, the per-update schedule, and a
GradScaler exactly when it trains under fp16 autocast (CUDA mocked on CPU tensors)."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch

from classify.classifier import Classifier, set_trainable
from classify.finetune import FineTuner, grad_scaler, optimizer_for, schedule_for
from classify.train import TrainSettings, training_runtime
from curator.core.runtime import Runtime
from curator.embedding.backbones import load_backbone


@pytest.fixture(scope="module")
def backbone():
    """lite0 with random weights: the architecture is what these tests are about."""
    return load_backbone("efficientnet_lite0", pretrained=False)


def _classifier(backbone, classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    return Classifier(backbone, classes, dropout=0.2)


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Small uint8 images (lite0 takes any side) and their row positions."""
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8))
    return pixels, torch.arange(n)


def _tuner(backbone, runtime: Runtime, **settings) -> FineTuner:
    settings = TrainSettings(**{"epochs": 2, "unfreeze": 1, **settings})
    labels, weights = np.array([0, 1, 2, 1]), np.ones(4, dtype=np.float32)
    return FineTuner(_classifier(backbone), settings, runtime, steps_per_epoch=3, labels=labels, weights=weights)


def test_timm_freezing_leaves_the_last_blocks_and_the_head_trainable_and_the_checkpoint_keys_unchanged(backbone):
    net = _classifier(backbone).net
    keys = list(net.state_dict())
    modules = set_trainable(net, 2)
    trainable = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks.") else "")
                 for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{len(net.blocks) - 2}", f"blocks.{len(net.blocks) - 1}", "conv_head", "bn2",
                         "classifier"}
    assert modules[0] is net.blocks[-2]
    assert list(net.state_dict()) == keys  # batch norm stays BatchNorm2d: checkpoints keep their tensors
    assert set_trainable(net, 0) == [] and not any(p.requires_grad for p in net.parameters())


def test_optimizer_groups_have_no_decay_on_biases_and_norms_and_the_head_at_its_scale(backbone):
    classifier = _classifier(backbone)
    set_trainable(classifier.net, 1)
    settings = TrainSettings(epochs=2, lr=1e-3, head_lr_scale=3.0, weight_decay=0.05)
    optimizer = optimizer_for(classifier, settings)
    assert isinstance(optimizer, torch.optim.AdamW)
    grouped = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    assert set(grouped) == {id(p) for p in trainable}  # frozen parameters are in no group
    for p in trainable:
        assert grouped[id(p)]["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05)
    head_groups = [grouped[id(classifier.head.fc.weight)], grouped[id(classifier.head.fc.bias)]]
    assert all(g["lr_scale"] == 3.0 for g in head_groups)
    assert all("lr_scale" not in grouped[id(p)] for p in classifier.net.parameters() if p.requires_grad)


def test_the_schedule_warms_up_per_update_then_follows_a_cosine_to_zero(backbone):
    classifier = _classifier(backbone)
    set_trainable(classifier.net, 1)
    settings = TrainSettings(epochs=3, lr=1e-3, head_lr_scale=3.0, warmup_epochs=1.0)
    optimizer = optimizer_for(classifier, settings)
    scheduler = schedule_for(optimizer, settings, steps_per_epoch=4)  # 12 updates, 4 of warm-up
    backbone_group = next(g for g in optimizer.param_groups if "lr_scale" not in g)
    head_group = next(g for g in optimizer.param_groups if "lr_scale" in g)
    lrs = []
    for update in range(12):
        lrs.append(backbone_group["lr"])
        assert head_group["lr"] == pytest.approx(3.0 * backbone_group["lr"])
        scheduler.step_update(update + 1)
    assert lrs[0] == pytest.approx(1e-3 / 4)
    assert lrs[:4] == sorted(lrs[:4]) and lrs[4] == pytest.approx(1e-3)
    assert lrs[4:] == sorted(lrs[4:], reverse=True)
    assert lrs[6] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert backbone_group["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last update


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast("cuda") is off on CPU tensors
@pytest.mark.parametrize("runtime, scaled", [
    (Runtime("cuda", "float16", "mocked"), True),
    (Runtime("cuda", "bfloat16", "mocked"), False),
    (Runtime("cpu", "float32", "cpu"), False),
])
def test_a_grad_scaler_is_used_exactly_when_training_under_fp16(backbone, runtime, scaled):
    """A runtime that reports CUDA (made while CUDA is mocked as available) trains here on CPU tensors: the update
    goes through the scaler's scale/unscale/step/update under fp16, and is plain under bf16 or fp32."""
    with mock.patch("torch.cuda.is_available", return_value=True):
        tuner = _tuner(backbone, runtime)
        assert tuner.scaler.is_enabled() is scaled and grad_scaler(runtime).is_enabled() is scaled
    before = tuner.classifier.head.fc.weight.detach().clone()
    scaler = tuner.scaler
    with mock.patch.object(scaler, "scale", wraps=scaler.scale) as scale, \
            mock.patch.object(scaler, "unscale_", wraps=scaler.unscale_) as unscale, \
            mock.patch.object(scaler, "update", wraps=scaler.update) as update:
        loss, correct = tuner.step(*_batch())
    assert scale.call_count == 1 and update.call_count == 1
    assert unscale.call_count == (1 if scaled else 0)  # step() unscales the gradients before the update
    if scaled:
        assert scale.call_args.args[0].item() == pytest.approx(loss)  # the loss, scaled by 2**16 for backward
        assert scaler.get_scale() == 2.0 ** 16  # no inf/NaN gradient: the scale stays
    assert math.isfinite(loss) and 0 <= correct <= 4 and tuner.updates == 1
    after = tuner.classifier.head.fc.weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_training_on_a_cuda_device_without_bf16_is_fp16_with_a_scaler():
    """A T4 or V100 (no bf16): `classify train` picks fp16 autocast, so its stage 2 gets the scaler."""
    fp16 = Runtime("cuda", "float16", "CUDA: fp16 autocast")
    with mock.patch("classify.train.select_runtime", return_value=fp16), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=False), \
            mock.patch("torch.cuda.is_available", return_value=True):
        runtime = training_runtime(TrainSettings(device="cuda"))
        assert runtime.dtype == "float16" and grad_scaler(runtime).is_enabled()
    with mock.patch("classify.train.select_runtime", return_value=fp16), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        assert training_runtime(TrainSettings(device="cuda")).dtype == "bfloat16"
        assert training_runtime(TrainSettings(device="cuda", dtype="fp16")).dtype == "float16"
