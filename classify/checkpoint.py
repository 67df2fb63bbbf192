"""Checkpoints: `model.safetensors` (every tensor of backbone and head) + `model.json` (everything else).

Loading never unpickles: tensors come from safetensors, the rest from JSON. The backbone is rebuilt from its timm
architecture with no pretrained download (the file carries all its weights), so a checkpoint loads offline whatever
backbone it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from classify.model import Classifier
from curator.atomic import atomic_path
from curator.backbones import REGISTRY, Backbone, feature_layout_of
from curator.errors import UsageError

WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
FORMAT = "atelier-classifier/1"


@dataclass
class Loaded:
    classifier: Classifier
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


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


def read_meta(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / META_NAME
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a trained model (no {META_NAME}); train one with `classify train`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not valid JSON; the checkpoint is damaged, train again") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path} is not an atelier classifier ({meta.get('format')!r}, expected {FORMAT})")
    return meta


def load(run_dir: Path, expect_backbone: str | None = None) -> Loaded:
    """Rebuild the classifier of `run_dir`; a damaged file, another backbone than `expect_backbone`, or tensors that
    do not fit the architecture are a `UsageError` saying so."""
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    name = meta["backbone"]["name"]
    if expect_backbone and expect_backbone != name:
        raise UsageError(f"{run_dir} was trained on backbone {name!r}, not {expect_backbone!r}")
    weights = run_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise UsageError(f"{run_dir} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"cannot read {weights}: {str(exc).splitlines()[0]}; the checkpoint is damaged") from None
    spec = REGISTRY.get(name)
    model = timm.create_model(spec.timm_arch if spec else name, pretrained=False)
    model.eval()
    data_config = timm.data.resolve_model_data_config(model)
    stored = {part: tuple(span) for part, span in meta["backbone"].get("feature_layout", {}).items()}
    layout = feature_layout_of(model, gram="gram" in stored)
    if stored and stored != layout:
        raise UsageError(f"{run_dir}/{META_NAME} describes features {stored} but backbone {name!r} gives {layout}")
    backbone = Backbone(name, model, data_config, meta["backbone"]["weights_origin"], layout)
    classifier = Classifier(backbone, len(meta["classes"]), meta["settings"].get("dropout", 0.0))
    try:
        classifier.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"{weights} does not fit backbone {name!r} with {len(meta['classes'])} classes: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    classifier.eval()
    return Loaded(classifier, meta)
