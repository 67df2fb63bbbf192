"""Loading a `classify train` run: a tampered model.json, damaged tensors or a hub backbone are one line, checked
before the model is allocated, and a run never reaches the network."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from classify import checkpoint
from classify.cli import app
from classify.train import TrainSettings, train
from curator.core.errors import UsageError
from tests.conftest import sample_paintings

PROBE_ONLY = dict(model="efficientnet_lite0", epochs=0, workers=0, probe_l2=(1e-2,), probe_steps=50)


@pytest.fixture(scope="module")
def run(sample_ws, tmp_path_factory) -> Path:
    """A real run of `classify train` (stage-1 probe only) on the sample's splits."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(sample_ws / "splits.parquet", out, TrainSettings(**PROBE_ONLY))
    return out


def tampered(run: Path, dest: Path, meta: Callable[[dict], object] | None = None,
             tensors: Callable[[dict], None] | None = None) -> Path:
    """A copy of `run` in `dest` whose model.json is `meta(parsed)` (a str is written as is) and whose tensors went
    through `tensors`."""
    dest.mkdir(parents=True)
    data = json.loads((run / checkpoint.META_NAME).read_text())
    if meta is not None:
        changed = meta(data)
        data = data if changed is None else changed
    text = data if isinstance(data, str) else json.dumps(data)
    (dest / checkpoint.META_NAME).write_text(text)
    if tensors is None:
        shutil.copy(run / checkpoint.WEIGHTS_NAME, dest / checkpoint.WEIGHTS_NAME)
    else:
        state = load_file(str(run / checkpoint.WEIGHTS_NAME))
        tensors(state)
        save_file(state, str(dest / checkpoint.WEIGHTS_NAME))
    return dest


@pytest.fixture
def real_builds(monkeypatch) -> list[str]:
    """Names of every model timm builds with real memory from here on (meta-device skeletons are not counted)."""
    import timm

    builds = []
    original = timm.create_model

    def counting(name, *args, **kwargs):
        if torch.empty(()).device.type != "meta":
            builds.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", counting)
    return builds


@pytest.fixture
def no_network(monkeypatch) -> list[tuple]:
    """Every socket connection attempt from here on is recorded and refused."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a, **k: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a, **k: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def one_line(message: str) -> str:
    assert message.strip() and "\n" not in message.strip(), message
    return message


def set_in(path: str, value) -> Callable[[dict], None]:
    """An edit of model.json that sets the dotted `path` to `value`."""
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


def drop(path: str) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        del node[last]
    return edit


def _legacy(meta: dict, **changes) -> None:
    """model.json's preprocessing as `classify train` wrote it before the Preprocess was recorded."""
    meta["preprocessing"] = {"resize_side": 256, "crop": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                             "interpolation": "bicubic", "tta": "horizontal flip", **changes}


def _extra_class(meta: dict) -> None:
    meta["classes"].append("Cubism")


def _fewer_classes(meta: dict) -> None:
    meta["classes"].pop()


#: id -> (edit of model.json, fragment the one-line message must hold)
BAD_META = {
    "not json": (lambda m: '{"format": "atelier-classifier/1", "classes": [', "not valid JSON"),
    "a json list": (lambda m: [m], "not a JSON object"),
    "foreign format": (set_in("format", "something-else/3"), "not an atelier classifier"),
    "no classes": (drop("classes"), "classes is missing"),
    "no backbone": (drop("backbone"), "backbone is missing"),
    "no backbone name": (drop("backbone.name"), "backbone.name is missing"),
    "no preprocessing": (drop("preprocessing"), "preprocessing is missing"),
    "no crop": (drop("preprocessing.crop"), "preprocessing.crop is missing"),
    "no settings": (drop("settings"), "settings is missing"),
    "no splits path": (drop("splits.path"), "splits.path is missing"),
    "classes a string": (set_in("classes", "Baroque"), "classes is"),
    "class not a string": (set_in("classes", ["Baroque", 3, "Pointillism", "Rococo", "Ukiyo_e"]), "classes.1"),
    "classes empty": (set_in("classes", []), "classes is empty"),
    "classes twice": (set_in("classes", ["Baroque", "Baroque", "Pointillism", "Rococo", "Ukiyo_e"]),
                      "more than once"),
    "one class too many": (_extra_class, "the head has 5 outputs but model.json lists 6 classes"),
    "one class too few": (_fewer_classes, "the head has 5 outputs but model.json lists 4 classes"),
    "resize as text": (set_in("preprocessing.resize", "256"), "preprocessing.resize"),
    "crop a float": (set_in("preprocessing.crop", 224.5), "expected an integer"),
    "crop a boolean": (set_in("preprocessing.crop", True), "expected an integer"),
    "resize 60000": (set_in("preprocessing.resize", 60000), "within 16..2048"),
    "legacy resize 60000": (lambda m: _legacy(m, resize_side=60000), "preprocessing.resize_side is 60000 pixels"),
    "crop 60000": (set_in("preprocessing.crop", 60000), "within 16..2048"),
    "crop 4": (set_in("preprocessing.crop", 4), "within 16..2048"),
    "crop above resize": (set_in("preprocessing.crop", 300), "larger than preprocessing.resize (256)"),
    "no resize": (drop("preprocessing.resize"), "preprocessing.resize is missing"),
    "no interpolation": (drop("preprocessing.interpolation"), "preprocessing.interpolation is missing"),
    "unknown interpolation": (set_in("preprocessing.interpolation", "magic"), "expected one of nearest"),
    "no version": (drop("preprocessing.version"), "preprocessing.version is missing"),
    "version from the future": (set_in("preprocessing.version", 99), "a newer atelier"),
    "no mean": (drop("preprocessing.mean"), "preprocessing.mean is missing"),
    "std of zero": (set_in("preprocessing.std", [0.5, 0.0, 0.5]), "three positive numbers"),
    "mean of text": (set_in("preprocessing.mean", ["a", 0.5, 0.5]), "three finite numbers"),
    "resize not the model's": (set_in("preprocessing.resize", 300), "preprocessing.resize is 300 but backbone"),
    "interpolation not the model's": (set_in("preprocessing.interpolation", "bilinear"),
                                      'preprocessing.interpolation is "bilinear" but backbone'),
    "mean not the model's": (set_in("preprocessing.mean", [0.485, 0.456, 0.406]), "preprocessing.mean is"),
    "legacy resize not the model's": (lambda m: _legacy(m, resize_side=250), "preprocessing.resize_side is 250"),
    "crop not the model's": (set_in("preprocessing.crop", 200), "takes 224 pixels"),
    "unknown architecture": (set_in("backbone.name", "no_such_net_v9"), "cannot be built offline"),
    "name a number": (set_in("backbone.name", 7), "backbone.name is 7"),
    "dropout 3": (set_in("settings.dropout", 3), "settings.dropout"),
    "threshold NaN": (set_in("threshold", float("nan")), "threshold is nan"),
    "threshold on 5 classes": (set_in("threshold", 0.5), "a threshold needs 2"),
    "layout wider than the head": (set_in("backbone.feature_layout.stats", [1280, 9999]), "describes features up to 9999"),
    "layout not a span": (set_in("backbone.feature_layout.pooled", "0-1280"), "feature_layout.pooled"),
    "history row not an object": (set_in("history", [3]), "history.0"),
    "fine-tune row without loss": (set_in("history", [{"stage": "fine-tune", "epoch": 1}]), "history.0.train_loss"),
}


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_trained_run_passes_the_schema_and_loads_with_the_network_blocked(run, no_network, real_builds):
    meta = json.loads((run / checkpoint.META_NAME).read_text())
    assert checkpoint.validate_meta(meta, run / checkpoint.META_NAME) is meta
    loaded = checkpoint.load(run)
    assert no_network == [] and real_builds == ["tf_efficientnet_lite0"]
    assert loaded.classes == ["Baroque", "Impressionism", "Pointillism", "Rococo", "Ukiyo_e"]
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.isfinite(loaded.classifier(pixels)).all()


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
@pytest.mark.parametrize("case", list(BAD_META))
def test_a_tampered_model_json_is_one_line_before_any_model_is_built(case, run, tmp_path, real_builds):
    edit, fragment = BAD_META[case]
    bad = tampered(run, tmp_path / "run", meta=edit)
    with pytest.raises(UsageError) as info:
        checkpoint.load(bad)
    assert fragment in one_line(str(info.value)), str(info.value)
    assert real_builds == [], f"a model was built for {case}: {real_builds}"


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_model_json_that_is_not_a_regular_file_or_is_huge_is_not_read(run, tmp_path):
    fifo_run = tampered(run, tmp_path / "fifo")
    (fifo_run / checkpoint.META_NAME).unlink()
    os.mkfifo(fifo_run / checkpoint.META_NAME)  # reading it would block forever
    with pytest.raises(UsageError, match="not a trained model") as info:
        checkpoint.load(fifo_run)
    one_line(str(info.value))
    huge_run = tampered(run, tmp_path / "huge")
    with open(huge_run / checkpoint.META_NAME, "r+b") as f:  # sparse: costs no disk
        f.truncate(checkpoint.MAX_META_BYTES + 1)
    with pytest.raises(UsageError, match="more than any model.json") as info:
        checkpoint.load(huge_run)
    one_line(str(info.value))


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_truncated_or_missing_weights_file_is_one_line(run, tmp_path, real_builds):
    cut = tampered(run, tmp_path / "cut")
    data = (cut / checkpoint.WEIGHTS_NAME).read_bytes()
    (cut / checkpoint.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="the checkpoint is damaged") as info:
        checkpoint.load(cut)
    one_line(str(info.value))
    gone = tampered(run, tmp_path / "gone")
    (gone / checkpoint.WEIGHTS_NAME).unlink()
    with pytest.raises(UsageError, match="has no model.safetensors") as info:
        checkpoint.load(gone)
    one_line(str(info.value))
    assert real_builds == []


def _first_backbone_tensor(state: dict) -> str:
    return next(k for k in sorted(state) if k.startswith("net.") and state[k].is_floating_point())


def _poison(value: float, which: Callable[[dict], str]) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[which(state)].view(-1)[3] = value
    return edit


@pytest.mark.parametrize("value,which,named", [
    (float("nan"), lambda s: "head.fc.weight", "head.fc.weight"),
    (float("inf"), _first_backbone_tensor, "net."),
    (float("-inf"), lambda s: "head.mean", "head.mean"),
], ids=["nan in the head", "inf in the backbone", "-inf in the feature mean"])
@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_nan_or_infinite_weights_are_refused_naming_the_tensor(run, tmp_path, real_builds, value, which, named):
    bad = tampered(run, tmp_path / "run", tensors=_poison(value, which))
    with pytest.raises(UsageError) as info:
        checkpoint.load(bad)
    message = one_line(str(info.value))
    assert "NaN or infinite" in message and f"tensor {named}" in message, message
    assert real_builds == []


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_zero_feature_scale_is_refused(run, tmp_path):
    def zero(state: dict) -> None:
        state["head.std"][7] = 0.0

    with pytest.raises(UsageError, match="head.std has values <= 0") as info:
        checkpoint.load(tampered(run, tmp_path / "run", tensors=zero))
    one_line(str(info.value))


@pytest.mark.parametrize("edit,fragment", [
    (lambda s: s.__setitem__(_first_backbone_tensor(s), torch.zeros(3, 3)), "has shape (3, 3)"),
    (lambda s: s.pop(_first_backbone_tensor(s)), "is missing"),
    (lambda s: s.__setitem__("net.extra.weight", torch.zeros(2)), "net.extra.weight is not part of it"),
], ids=["wrong shape", "missing tensor", "foreign tensor"])
@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_backbone_tensors_that_do_not_fit_are_refused_before_the_model_is_allocated(run, tmp_path, real_builds,
                                                                                   edit, fragment):
    with pytest.raises(UsageError) as info:
        checkpoint.load(tampered(run, tmp_path / "run", tensors=edit))
    assert fragment in one_line(str(info.value)) and "does not fit backbone" in str(info.value)
    assert real_builds == []


@pytest.mark.parametrize("name", [
    "hf-hub:timm/something", "hf-hub:timm/tf_efficientnet_lite0.in1k", "local-dir:/tmp/nowhere",
    "tf_efficientnet_lite0.in1k", "timm/tf_efficientnet_lite0",
])
@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_hub_backbone_in_a_checkpoint_never_touches_the_network(run, tmp_path, no_network, real_builds, name):
    bad = tampered(run, tmp_path / "run", meta=set_in("backbone.name", name))
    with pytest.raises(UsageError) as info:
        checkpoint.load(bad)
    assert "cannot be built offline" in one_line(str(info.value))
    assert no_network == [] and real_builds == []


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_timm_architecture_name_with_the_weights_in_the_file_loads_offline(run, tmp_path, no_network):
    """The registered name and timm's own name of the same architecture give the same model, from the file alone."""
    renamed = tampered(run, tmp_path / "run", meta=set_in("backbone.name", "tf_efficientnet_lite0"))
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        original = checkpoint.load(run).classifier(pixels)
        again = checkpoint.load(renamed).classifier(pixels)
    torch.testing.assert_close(again, original)
    assert no_network == []


def _image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for path in sample_paintings(2):
        shutil.copy(path, root / path.name)
    return root


CLI_CASES = {
    "dir, resize 60000": ("dir", dict(meta=set_in("preprocessing.resize", 60000)), "within 16..2048"),
    "dir, hf-hub backbone": ("dir", dict(meta=set_in("backbone.name", "hf-hub:timm/something")),
                             "cannot be built offline"),
    "dir, NaN weights": ("dir", dict(tensors=_poison(float("nan"), lambda s: "head.fc.weight")),
                         "tensor head.fc.weight holds NaN"),
    "eval, NaN weights": ("eval", dict(tensors=_poison(float("nan"), lambda s: "head.fc.weight")),
                          "tensor head.fc.weight holds NaN"),
    "eval, missing key": ("eval", dict(meta=drop("preprocessing")), "preprocessing is missing"),
    "eval, bad json": ("eval", dict(meta=lambda m: "{not json"), "not valid JSON"),
    "eval, unknown architecture": ("eval", dict(meta=set_in("backbone.name", "no_such_net_v9")),
                                   "cannot be built offline"),
    "eval, class list too long": ("eval", dict(meta=_extra_class), "lists 6 classes"),
}


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_a_damaged_run_in_one_line(case, run, tmp_path, no_network, real_builds):
    command, edits, fragment = CLI_CASES[case]
    bad = tampered(run, tmp_path / "run", **edits)
    if command == "dir":
        args = ["dir", str(_image_dir(tmp_path)), "--out", str(tmp_path / "p.parquet"), "--model", str(bad),
                "--workers", "0"]
    else:
        args = ["eval", "--model", str(bad), "--workers", "0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert fragment in res.output.replace("\n", ""), res.output
    assert no_network == [] and real_builds == []
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_runs_preprocessing_round_trips_into_the_loaded_model(run):
    """model.json records the backbone's Preprocess, every parameter, and loading rebuilds the same one."""
    from curator.embedding.backbones import load_backbone
    from curator.embedding.preprocess import VERSION, Preprocess

    meta = json.loads((run / checkpoint.META_NAME).read_text())
    expected = load_backbone("efficientnet_lite0").preprocess
    assert expected == Preprocess(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert meta["preprocessing"] == {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.5] * 3,
                                     "std": [0.5] * 3, "version": VERSION, "tta": "horizontal flip"}
    loaded = checkpoint.load(run)
    assert loaded.preprocess == expected and loaded.tta
    assert checkpoint.preprocessing_meta(loaded.preprocess, "horizontal flip") == meta["preprocessing"]


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_a_run_written_before_the_preprocessing_was_recorded_still_loads(run, tmp_path, real_builds):
    """`resize_side` + `crop` (and, in the oldest runs, no mean or std) map onto a bicubic Preprocess, and the model
    predicts exactly as the same run in today's format."""
    from curator.embedding.preprocess import Preprocess

    old = tampered(run, tmp_path / "old", meta=_legacy)
    oldest = tampered(run, tmp_path / "oldest",
                      meta=lambda m: m.__setitem__("preprocessing", {"resize_side": 256, "crop": 224, "tta": None}))
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    new = checkpoint.load(run)
    for folder, tta in ((old, True), (oldest, False)):
        loaded = checkpoint.load(folder)
        assert loaded.preprocess == Preprocess(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3) and loaded.tta == tta
        with torch.inference_mode():
            torch.testing.assert_close(loaded.classifier(pixels), new.classifier(pixels), rtol=0, atol=0)
    # the earlier path always resized with bicubic, whatever the backbone's config said: that is what it was
    # trained on, so a legacy record maps to bicubic even for a bilinear model (LCNet's config, crop_pct 0.875)
    bilinear = {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875,
                "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    mapped = checkpoint.preprocess_of({"preprocessing": {"resize_side": 256, "crop": 224}}, bilinear)
    assert mapped == Preprocess(256, 224, "bicubic", bilinear["mean"], bilinear["std"])
    assert Preprocess.from_data_config(bilinear).interpolation == "bilinear"


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_classify_dir_with_a_run_sees_the_pixels_training_and_curator_clean_saw(run, sample_ws, tmp_path):
    """`classify dir --model RUN` builds its input with the run's Preprocess: its embeddings equal `curator clean`'s
    cached ones (the probe-only run keeps lite0's weights) and its confidences equal the model's on the training
    pixel cache's centre crops (what `classify eval` reads)."""
    import numpy as np
    import polars as pl

    from classify.data import Crops, PixelCache, file_items, fill_pixel_cache, read_split_table
    from classify.inference import predict_loader
    from classify.predict import PredictSettings, classify_dir
    from curator.core.runtime import select_runtime
    from curator.embedding.backbones import load_backbone
    from curator.embedding.embed import cache_for

    frame = read_split_table(sample_ws / "splits.parquet").frame.head(6)
    images = tmp_path / "images"
    images.mkdir()
    for path in frame["path"].to_list():
        shutil.copy(path, images / Path(path).name)
    out = tmp_path / "pred.parquet"
    classify_dir(images, out, PredictSettings(model=str(run), embeddings=True, dtype="fp32", workers=0))
    pred = pl.read_parquet(out)
    rows = {row["path"]: row for row in pred.iter_rows(named=True)}
    names = [Path(p).name for p in frame["path"].to_list()]
    shas = frame["sha256"].to_list()
    embedded = np.array([rows[n]["embedding"] for n in names], dtype=np.float32)
    cached = cache_for(sample_ws, load_backbone("efficientnet_lite0")).get(shas)
    np.testing.assert_allclose(embedded.astype(np.float16).astype(np.float32), cached, rtol=2e-3, atol=1e-3)

    loaded = checkpoint.load(run)
    pixels = PixelCache(sample_ws / "cache" / "pixels", loaded.preprocess)
    assert fill_pixel_cache(pixels, file_items(frame), workers=0) == {}
    loader = torch.utils.data.DataLoader(Crops(pixels, pixels.rows(shas)), batch_size=8)
    probs, _ = predict_loader(loaded.classifier, loader, select_runtime("cpu", "fp32"), loaded.tta)
    assert [rows[n]["predicted"] for n in names] == [loaded.classes[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([rows[n]["confidence"] for n in names], probs.max(1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # trains on the cleaned sample (module fixture run, session fixture sample_ws)
def test_loading_a_run_leaves_torchs_random_generator_alone(run):
    """Rebuilding the architecture initialises weights at random (then overwritten by the file's): that happens on
    a fork of torch's generator, so loading (in `classify eval`, `dir` and `serve`) draws nothing from the caller's."""
    from curator.embedding.backbones import offline_architecture

    state = torch.random.get_rng_state()
    offline_architecture("efficientnet_lite0")
    assert not torch.equal(torch.random.get_rng_state(), state)  # building one does draw
    state = torch.random.get_rng_state()
    loaded = checkpoint.load(run)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert loaded.classifier.head.fc.weight.abs().sum() > 0
