"""Checkpoints: `model.safetensors` (every tensor of backbone and head) + `model.json` (everything else).

Loading never unpickles: tensors come from safetensors, the rest from JSON. Loading is offline by construction: the
backbone is rebuilt from its architecture name with random weights (`curator.embedding.backbones.offline_architecture`,
which refuses any name that only a hub could resolve, such as `hf-hub:...`) and then takes every tensor from the file,
so a checkpoint loads with no network whatever backbone it was trained on, and never contacts one.

Everything a checkpoint says is checked before it is trusted, in this order, so that a damaged or hostile run is a
one-line `UsageError` before any large allocation: the structure of model.json (`validate_meta`: every key, type and
size, e.g. input sides within MIN_SIDE..MAX_SIDE pixels), the backbone name, then the tensors (all finite, head
widths agreeing with the class list and the feature layout), then every backbone tensor's name and shape against a
skeleton of the architecture on PyTorch's meta device (no memory), and only then the model is allocated.

model.json's `preprocessing` records the model's `curator.embedding.preprocess.Preprocess` (resize, crop, interpolation,
mean, std, version) and the test-time augmentation; loading rebuilds that Preprocess (`Loaded.preprocess`), after
checking that it is the one the backbone's data config gives. Runs written before it was recorded (`resize_side` and
`crop` only, squares resized with bicubic) load as a Preprocess with bicubic interpolation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from classify.classifier import Classifier
from curator.core.atomic import atomic_path
from curator.core.errors import UsageError
from curator.embedding.backbones import Backbone, feature_layout_of, offline_architecture, timm_architecture
from curator.embedding.preprocess import INTERPOLATIONS, Preprocess
from curator.embedding.preprocess import VERSION as PREPROCESS_VERSION

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
FORMAT = "atelier-classifier/1"
# Input sides a checkpoint may ask for: a square image of side s is decoded into s*s*3 bytes per image (and a batch
# of them), so a tampered 60000 would ask for 10.8 GB per image; real backbones use 224 to 600.
MIN_SIDE, MAX_SIDE = 16, 2048
# model.json is a few kB (its largest part lists skipped files); anything beyond this is not one
MAX_META_BYTES = 64 * 1024 * 1024
FEATURE_PARTS = ("pooled", "stats", "gram")
HISTORY_NUMBERS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_macro_f1")


@dataclass
class Loaded:
    classifier: Classifier
    meta: dict
    preprocess: Preprocess  # how the model's input pixels are made, from model.json (see `preprocess_of`)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def tta(self) -> bool:
        """Whether predictions average the image with its horizontal flip (as the run was validated)."""
        return bool(self.meta["preprocessing"].get("tta"))


def preprocessing_meta(preprocess: Preprocess, tta: str | None) -> dict:
    """model.json's `preprocessing`: every parameter of `preprocess`, its version, and the test-time augmentation."""
    return {"resize": preprocess.resize, "crop": preprocess.crop, "interpolation": preprocess.interpolation,
            "mean": list(preprocess.mean), "std": list(preprocess.std), "version": PREPROCESS_VERSION, "tta": tta}


def preprocess_of(meta: dict, data_config: dict) -> Preprocess:
    """The Preprocess a validated model.json records. A run written before the preprocessing was recorded has
    `resize_side` and `crop` only: its squares were resized with bicubic, and its normalisation is the data
    config's where model.json does not give it."""
    pre = meta["preprocessing"]
    mean = tuple(float(v) for v in pre.get("mean") or data_config["mean"])
    std = tuple(float(v) for v in pre.get("std") or data_config["std"])
    if "resize" in pre:
        return Preprocess(pre["resize"], pre["crop"], pre["interpolation"], mean, std)
    return Preprocess(pre["resize_side"], pre["crop"], "bicubic", mean, std)


def _atomic_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path, fsync=True) as tmp:
        tmp.write_bytes(data)


def save(run_dir: Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write the tensors and the metadata atomically (tensors first: a json always describes a complete file)."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    _atomic_bytes(run_dir / WEIGHTS_NAME, save(tensors))
    _atomic_bytes(run_dir / META_NAME, json.dumps({"format": FORMAT, **meta}, indent=2, default=str).encode())
    return run_dir / WEIGHTS_NAME


# --- model.json schema ------------------------------------------------------------------------------------------

_KIND_NAMES = {str: "a string", int: "an integer", float: "a finite number", list: "a list", dict: "an object",
               bool: "true or false", type(None): "null"}


def _is_kind(value: object, kind: type) -> bool:
    """JSON-aware isinstance: booleans are not numbers, and a number must be finite (JSON parsers accept NaN)."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def _show(value: object) -> str:
    """A short, one-line rendering of a JSON value for an error message."""
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _MetaCheck:
    """Reads fields of a parsed model.json, raising one `UsageError` line that names the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str) -> NoReturn:
        raise UsageError(f"{self.path}: {where} {problem}; the checkpoint is damaged or was not written by "
                         f"`classify train`")

    def get(self, obj: dict, key: str, kinds: tuple[type, ...], where: str = "", required: bool = True):
        full = f"{where}.{key}" if where else key
        if key not in obj:
            if required:
                self.fail(full, "is missing")
            return None
        value = obj[key]
        if not any(_is_kind(value, kind) for kind in kinds):
            self.fail(full, f"is {_show(value)}, expected {' or '.join(_KIND_NAMES[k] for k in kinds)}")
        return value

    def side(self, obj: dict, key: str, where: str) -> int:
        value = self.get(obj, key, (int,), where)
        if not MIN_SIDE <= value <= MAX_SIDE:
            self.fail(f"{where}.{key}", f"is {value} pixels; input sides must be within {MIN_SIDE}..{MAX_SIDE}")
        return value


def _check_backbone(check: _MetaCheck, meta: dict) -> None:
    backbone = check.get(meta, "backbone", (dict,))
    if not check.get(backbone, "name", (str,), "backbone").strip():
        check.fail("backbone.name", "is empty")
    check.get(backbone, "weights_origin", (str,), "backbone")
    layout = check.get(backbone, "feature_layout", (dict,), "backbone", required=False)
    if layout is None:
        return
    if "pooled" not in layout:
        check.fail("backbone.feature_layout", "has no pooled part")
    for part, span in layout.items():
        where = f"backbone.feature_layout.{part}"
        if part not in FEATURE_PARTS:
            check.fail(where, f"is not a known feature part ({', '.join(FEATURE_PARTS)})")
        if not (isinstance(span, list) and len(span) == 2 and all(_is_kind(v, int) for v in span)
                and 0 <= span[0] < span[1]):
            check.fail(where, f"is {_show(span)}, expected a span of two integers start < end")


def _check_classes(check: _MetaCheck, meta: dict) -> list[str]:
    classes = check.get(meta, "classes", (list,))
    if not classes:
        check.fail("classes", "is empty")
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name:
            check.fail(f"classes.{i}", f"is {_show(name)}, expected a non-empty string")
    if len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        check.fail("classes", f"names {', '.join(twice[:3])} more than once")
    return classes


def _check_preprocessing(check: _MetaCheck, meta: dict) -> None:
    """`preprocessing` as `preprocessing_meta` writes it (resize, crop, interpolation, mean, std, version, tta), or
    as runs before it wrote it (resize_side, crop, optional mean and std, tta)."""
    pre = check.get(meta, "preprocessing", (dict,))
    legacy = "resize" not in pre and "resize_side" in pre
    resize_key = "resize_side" if legacy else "resize"
    resize = check.side(pre, resize_key, "preprocessing")
    crop = check.side(pre, "crop", "preprocessing")
    if crop > resize:
        check.fail("preprocessing.crop", f"({crop}) is larger than preprocessing.{resize_key} ({resize})")
    check.get(pre, "tta", (str, bool, type(None)), "preprocessing", required=False)
    if not legacy:
        interpolation = check.get(pre, "interpolation", (str,), "preprocessing")
        if interpolation not in INTERPOLATIONS:
            check.fail("preprocessing.interpolation", f"is {_show(interpolation)}, expected one of "
                                                      f"{', '.join(INTERPOLATIONS)}")
        version = check.get(pre, "version", (int,), "preprocessing")
        if not 1 <= version <= PREPROCESS_VERSION:
            check.fail("preprocessing.version", f"is {version}, expected 1..{PREPROCESS_VERSION} (a newer atelier "
                                                f"wrote it?)")
    for key in ("mean", "std"):
        values = check.get(pre, key, (list,), "preprocessing", required=not legacy)
        if values is not None and not (len(values) == 3 and all(_is_kind(v, float) for v in values)):
            check.fail(f"preprocessing.{key}", f"is {_show(values)}, expected three finite numbers")
        if key == "std" and values is not None and not all(v > 0 for v in values):
            check.fail("preprocessing.std", f"is {_show(values)}, expected three positive numbers")


def _check_settings(check: _MetaCheck, meta: dict, classes: list[str]) -> None:
    settings = check.get(meta, "settings", (dict,))
    dropout = check.get(settings, "dropout", (float,), "settings", required=False)
    if dropout is not None and not 0 <= dropout < 1:
        check.fail("settings.dropout", f"is {dropout}, expected a probability in 0..1")
    positive = check.get(settings, "positive", (str, type(None)), "settings", required=False)
    column = check.get(settings, "positive_column", (str,), "settings", required=False)
    if column is not None and column not in ("label", "group"):
        check.fail("settings.positive_column", f"is {_show(column)}, expected label or group")
    if positive is not None and len(classes) != 2:
        check.fail("classes", f"has {len(classes)} names but a one-vs-rest model (settings.positive) has 2")
    threshold = check.get(meta, "threshold", (float, type(None)), required=False)
    if threshold is not None:
        if not 0 <= threshold <= 1:
            check.fail("threshold", f"is {threshold}, expected a probability in 0..1")
        if len(classes) != 2:
            check.fail("threshold", f"is set but the model has {len(classes)} classes (a threshold needs 2)")
    splits = check.get(meta, "splits", (dict,))
    check.get(splits, "path", (str,), "splits")
    check.get(splits, "sha256", (str,), "splits")


def _check_history(check: _MetaCheck, meta: dict) -> None:
    history = check.get(meta, "history", (list,), required=False) or []
    for i, row in enumerate(history):
        where = f"history.{i}"
        if not isinstance(row, dict):
            check.fail(where, f"is {_show(row)}, expected an object")
        stage = check.get(row, "stage", (str,), where, required=False)
        if stage == "fine-tune":
            check.get(row, "epoch", (int,), where)
            for key in HISTORY_NUMBERS:
                check.get(row, key, (float, type(None)), where)
        elif stage == "probe":
            check.get(row, "val_accuracy", (float,), where)
    check.get(meta, "complete", (bool,), required=False)


def validate_meta(meta: object, path: Path) -> dict:
    """Check the whole structure of a parsed model.json (every key the loaders, `classify eval` and `classify dir`
    read: types, sizes, class list, thresholds) and return it; the first problem is a one-line `UsageError` naming
    the key. It runs before anything is built, so an absurd value never reaches an allocation."""
    if not isinstance(meta, dict):
        raise UsageError(f"{path} holds {type(meta).__name__}, not a JSON object; the checkpoint is damaged")
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path} is not an atelier classifier (format {_show(meta.get('format'))}, expected "
                         f"{FORMAT})")
    check = _MetaCheck(path)
    _check_backbone(check, meta)
    classes = _check_classes(check, meta)
    _check_preprocessing(check, meta)
    _check_settings(check, meta, classes)
    _check_history(check, meta)
    return meta


def read_meta(run_dir: Path) -> dict:
    """model.json of `run_dir`, parsed and validated (`validate_meta`); any problem is a one-line `UsageError`."""
    run_dir = Path(run_dir)
    path = run_dir / META_NAME
    if not path.is_file():  # also refuses a FIFO or a device named model.json, which would hang or never end
        raise UsageError(f"{run_dir} is not a trained model (no {META_NAME}); train one with `classify train`")
    size = path.stat().st_size
    if size > MAX_META_BYTES:
        raise UsageError(f"{path} is {size} bytes, more than any model.json ({MAX_META_BYTES}); the checkpoint is "
                         f"damaged")
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UsageError(f"{path} is not valid JSON; the checkpoint is damaged, train again") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return validate_meta(meta, path)


# --- tensors ----------------------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors often run to many), at most 200 characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _read_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = run_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise UsageError(f"{run_dir} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot read {weights}: {_first_line(exc)}; the checkpoint is damaged") from None


def check_tensors(state: dict[str, torch.Tensor], meta: dict, weights: Path) -> None:
    """Refuse tensors that would make every prediction wrong or NaN: any NaN or infinite value, a head whose width
    disagrees with the class list or the feature layout, a feature scale that is not positive."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UsageError(f"{weights}: tensor {name} holds NaN or infinite values; the checkpoint is damaged, "
                             f"train again")
    shapes = {k: tuple(state[k].shape) for k in ("head.fc.weight", "head.fc.bias", "head.mean", "head.std")
              if k in state}
    if len(shapes) < 4:
        missing = sorted({"head.fc.weight", "head.fc.bias", "head.mean", "head.std"} - set(shapes))
        raise UsageError(f"{weights} has no {', '.join(missing)}; it is not an atelier classifier")
    n_classes = len(meta["classes"])
    if len(shapes["head.fc.weight"]) != 2:
        raise UsageError(f"{weights}: tensor head.fc.weight has shape {shapes['head.fc.weight']}, not two axes")
    outputs, dim = shapes["head.fc.weight"]
    if outputs != n_classes or shapes["head.fc.bias"] != (n_classes,):
        raise UsageError(f"{weights}: the head has {outputs} outputs but {META_NAME} lists {n_classes} classes; "
                         f"the checkpoint is damaged")
    if shapes["head.mean"] != (dim,) or shapes["head.std"] != (dim,):
        raise UsageError(f"{weights}: head.mean/head.std do not have the head's width {dim}")
    layout = meta["backbone"].get("feature_layout")
    if layout and max(end for _, end in layout.values()) != dim:
        raise UsageError(f"{META_NAME} describes features up to {max(end for _, end in layout.values())} but the "
                         f"head of {weights} reads {dim}; the checkpoint is damaged")
    if not bool((state["head.std"] > 0).all()):
        raise UsageError(f"{weights}: tensor head.std has values <= 0 (each feature is divided by it); the "
                         f"checkpoint is damaged")


# --- load -------------------------------------------------------------------------------------------------------

def _skeleton(name: str) -> torch.nn.Module | None:
    """`name` built on the meta device (shapes, no memory), or None for an architecture that cannot be built there
    (it is then checked after the real build instead)."""
    try:
        return offline_architecture(name, skeleton=True)
    except UsageError:
        raise
    except Exception:  # timm architectures are third-party code; one that needs real tensors in __init__ is fine
        return None


def _check_preprocess(meta: dict, data_config: dict, run_dir: Path, name: str) -> Preprocess:
    """model.json's Preprocess, after checking it against the backbone's data config: the crop is the model's input
    side, and a recorded Preprocess is the one the config gives (a run before it was recorded: the same resize and,
    where given, the same normalisation; its interpolation was always bicubic)."""
    expected = Preprocess.from_data_config(data_config)
    stored = preprocess_of(meta, data_config)
    legacy = "resize" not in meta["preprocessing"]
    where = f"{run_dir}/{META_NAME}: preprocessing"
    if stored.crop != expected.crop:
        raise UsageError(f"{where}.crop is {stored.crop} but backbone {name!r} takes {expected.crop} pixels; the "
                         f"checkpoint is damaged")
    for part in ("resize", "mean", "std") + (() if legacy else ("interpolation",)):
        got, want = getattr(stored, part), getattr(expected, part)
        if got != want:
            key = "resize_side" if legacy and part == "resize" else part
            raise UsageError(f"{where}.{key} is {_show(got)} but backbone {name!r} preprocesses with {_show(want)}; "
                             f"the checkpoint is damaged")
    return stored


def _check_architecture(model: torch.nn.Module, state: dict[str, torch.Tensor], meta: dict, run_dir: Path,
                        name: str) -> tuple[dict, dict[str, tuple[int, int]], Preprocess]:
    """The backbone's data config, feature layout and the run's Preprocess, after checking that model.json's
    preprocessing (`_check_preprocess`) and layout and the file's backbone tensors (`net.*`: every name and shape)
    are the ones this architecture has."""
    import timm

    data_config = timm.data.resolve_model_data_config(model)
    preprocess = _check_preprocess(meta, data_config, run_dir, name)
    stored = {part: tuple(span) for part, span in meta["backbone"].get("feature_layout", {}).items()}
    layout = feature_layout_of(model, gram="gram" in stored)
    if stored and stored != layout:
        raise UsageError(f"{run_dir}/{META_NAME} describes features {stored} but backbone {name!r} gives {layout}")
    expected = {f"net.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("head.")}
    weights = run_dir / WEIGHTS_NAME
    for key in sorted(expected.keys() | found.keys()):
        if expected.get(key) != found.get(key):
            what = ("is missing" if key not in found else "is not part of it" if key not in expected
                    else f"has shape {found[key]}, not {expected[key]}")
            raise UsageError(f"{weights} does not fit backbone {name!r}: tensor {key} {what}; the checkpoint is "
                             f"damaged")
    return data_config, layout, preprocess


def load(run_dir: Path, expect_backbone: str | None = None) -> Loaded:
    """Rebuild the classifier of `run_dir`, offline, from its own tensors only; a damaged or tampered file, another
    backbone than `expect_backbone`, a backbone that cannot be built offline, or tensors that do not fit the
    architecture are a one-line `UsageError` saying so, raised before the model is allocated wherever possible.
    Loading leaves the process's random generators as they were."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    name = meta["backbone"]["name"]
    if expect_backbone and expect_backbone != name:
        raise UsageError(f"{run_dir} was trained on backbone {name!r}, not {expect_backbone!r}")
    if timm_architecture(name) is None:
        raise UsageError(f"{run_dir}/{META_NAME} records backbone {name!r}, which cannot be built offline; a trained "
                         f"model is rebuilt from its own tensors and never downloads anything")
    weights = run_dir / WEIGHTS_NAME
    state = _read_tensors(run_dir)
    check_tensors(state, meta, weights)
    skeleton = _skeleton(name)
    if skeleton is not None:
        _check_architecture(skeleton, state, meta, run_dir, name)

    # built inside a fork of torch's CPU generator: the random initialisation (overwritten by the file's tensors
    # below) must not move the caller's generator
    with torch.random.fork_rng(devices=[]):
        model = offline_architecture(name)
        data_config, layout, preprocess = _check_architecture(model, state, meta, run_dir, name)
        backbone = Backbone(name, model, data_config, meta["backbone"]["weights_origin"], layout)
        classifier = Classifier(backbone, len(meta["classes"]), meta["settings"].get("dropout", 0.0))
    try:
        classifier.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{weights} does not fit backbone {name!r} with {len(meta['classes'])} classes: "
                         f"{_first_line(exc)}") from None
    classifier.eval()
    return Loaded(classifier, meta, preprocess)
