"""The model side of `classify serve`, with no HTTP in it: load, decode an upload, predict a batch, describe.

Everything that decides a number is `classify dir`'s own code: the model is loaded by `classify.predict.Predictor`
(a run folder through `classify.checkpoint`, offline and validated; without a run, the backbone's ImageNet-1k
classes), an upload's bytes become the model's input through `classify.predict.image_pixels` (the safe loader's
checks and decode, `curator.core.images.decode_bytes`, then the model's `curator.embedding.preprocess.Preprocess`), and
a batch is ranked by `classify.predict.predict_pixels`. A served prediction therefore equals `classify dir --run
RUN`'s for the same file (up to float rounding between batch compositions).

One difference, for speed only: the loaded network's batch norms are folded into their convolutions
(`classify.serve.folding`; 12-15% less CPU per image in fp32), checked at load on a probe batch and undone unless the
outputs stay within 1e-5 of the unfolded model's, so the served numbers stay within float rounding of `classify dir`'s.
Under bf16 or fp16 autocast the folded weights round differently (outputs move by about 1e-2), so the check undoes it
there: folding serves fp32. `ServeSettings(fold=False)` serves the network exactly as loaded.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classify.serve import DEFAULT_MAX_BATCH, DEFAULT_MAX_BYTES, DEFAULT_MAX_WAIT_MS
from classify.serve.batcher import check_limits
from curator.core.errors import SettingsError, UsageError
from curator.core.images import STATUS_IGNORED, ReadPolicy
from curator.embedding.backbones import DEFAULT_BACKBONE

#: /similar's default and largest k
SIMILAR_K, MAX_SIMILAR_K = 8, 50


@dataclass(frozen=True)
class ServeSettings:
    """What `classify serve` was asked for; checked on creation (one-line `UsageError`s)."""

    model: str | None = None  # a `classify train` run folder; None: the backbone's ImageNet-1k classes
    backbone: str = DEFAULT_BACKBONE
    device: str = "auto"
    dtype: str = "auto"
    max_bytes: int = DEFAULT_MAX_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    top_k: int = 5
    fold: bool = True  # fold batch norms into convolutions at load (checked; see the module docstring)

    def __post_init__(self) -> None:
        ReadPolicy(max_bytes=self.max_bytes)  # the one-line error for --max-bytes below 1
        check_limits(self.max_batch, self.max_wait_ms)
        if self.top_k < 1:
            raise SettingsError(f"top-k must be at least 1, got {self.top_k}")
        if self.model is not None and not Path(self.model).is_dir():
            what = "a file" if Path(self.model).exists() else "not there"
            raise SettingsError(f"--run {self.model} is {what}; give the run folder `classify train` wrote")


@dataclass
class Upload:
    """One uploaded file after the safe loader: its pixels, or the reason it has none and the HTTP status that
    reason gets (413 too large, 415 not an image, 422 an image file that cannot be decoded)."""

    filename: str
    pixels: np.ndarray | None = None
    error: str | None = None
    status: int = 200


@dataclass
class Engine:
    """A loaded model with its preprocessing, runtime and similarity index (see the module docstring)."""

    settings: ServeSettings
    predictor: object
    runtime: object
    meta: dict | None
    similar: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    folding: str = "not asked for"

    @classmethod
    def load(cls, settings: ServeSettings) -> Engine:
        """Load the model as `classify dir` does, on the device asked for, and index the run's training images."""
        import torch

        from classify.checkpoint import read_meta
        from classify.predict import Predictor, PredictSettings
        from classify.serve.similar import SimilarIndex, build_index
        from curator.core.runtime import select_runtime

        runtime = select_runtime(settings.device, settings.dtype)
        predict_settings = PredictSettings(model=settings.model, backbone=settings.backbone, top_k=settings.top_k,
                                           device=settings.device, dtype=settings.dtype)
        predictor = Predictor(predict_settings).to(torch.device(runtime.device))
        folding = fold_predictor(predictor, runtime) if settings.fold else "not asked for"
        meta = read_meta(Path(settings.model)) if settings.model else None
        engine = cls(settings, predictor, runtime, meta, SimilarIndex.unavailable(
            "served without --run: the ImageNet classes have no training images to compare with"), folding=folding)
        if meta is not None:
            engine.similar = build_index(meta, engine.embedder(predictor), predictor.preprocess,
                                         lambda: engine.pretrained_embedder(meta["backbone"]["name"]))
        return engine

    def embedder(self, predictor) -> Callable[[np.ndarray], np.ndarray]:
        """uint8 pixels (n, 3, crop, crop) -> float32 features, by `predictor` on this engine's device."""
        import torch

        def embed(pixels: np.ndarray) -> np.ndarray:
            from classify.predict import predict_pixels

            batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.runtime.device)
            _, feats = predict_pixels(predictor, batch, self.runtime, 1, features=True)
            return feats

        return embed

    def pretrained_embedder(self, name: str) -> Callable[[np.ndarray], np.ndarray] | None:
        """The embedder of the pretrained backbone `name` when it loads offline (a registered name) with the same
        preprocessing as the run; else None. Never reaches a network."""
        import torch

        from classify.predict import Predictor, PredictSettings
        from curator.embedding.backbones import REGISTRY

        if name not in REGISTRY:
            return None
        try:
            pretrained = Predictor(PredictSettings(backbone=name)).to(torch.device(self.runtime.device))
        except UsageError:
            return None
        if pretrained.preprocess != self.predictor.preprocess:
            return None
        if self.settings.fold:
            fold_predictor(pretrained, self.runtime)
        return self.embedder(pretrained)

    # --- per upload (decode threads) ------------------------------------------------------------------------------

    def decode(self, filename: str | None, data: bytes | bytearray | None, size: int) -> Upload:
        """An uploaded file to the model's input, or its reason and status. `data` None: it passed max_bytes."""
        from classify.predict import image_pixels
        from curator.core.paths import display

        name = display(filename or "upload")
        if data is None:
            return Upload(name, error=f"too large: {size:,} bytes exceeds --max-bytes {self.settings.max_bytes:,}",
                          status=413)
        # only the name's suffix is read (to judge a file with no image header); nothing touches the disk
        pixels, decoded = image_pixels(Path(name.replace("\\", "/")).name or "upload", bytes(data),
                                       self.predictor.preprocess)
        if pixels is None:
            status = 415 if decoded.info.status == STATUS_IGNORED else 422
            return Upload(name, error=decoded.info.reason or decoded.info.status, status=status)
        return Upload(name, pixels)

    # --- per batch (the model thread) -----------------------------------------------------------------------------

    def _batch(self, pixels: list[np.ndarray]):
        import torch

        return torch.from_numpy(np.stack(pixels)).to(self.runtime.device)

    def predict(self, items: list[tuple[np.ndarray, int]]) -> list[dict]:
        """One forward pass for (pixels, k) items: each item's prediction as the API returns it."""
        from classify.predict import predict_pixels

        k = max(k for _, k in items)
        with self.lock:
            predictions, _ = predict_pixels(self.predictor, self._batch([p for p, _ in items]), self.runtime, k)
        return [{"label": p.label, "confidence": p.confidence,
                 "topk": [{"label": label, "score": score} for label, score in p.topk[:k_item]]}
                for p, (_, k_item) in zip(predictions, items)]

    def neighbours(self, items: list[tuple[np.ndarray, int]]) -> list[dict]:
        """One embedding pass for (pixels, k) items: each item's k most similar training images, as the API returns
        them (`{"similar": [{"id", "path", "label", "score", "thumbnail"}]}`)."""
        k = max(k for _, k in items)
        with self.lock:
            features = self.similar.embed(np.stack([p for p, _ in items]))
        found = self.similar.search(features, k)
        images = self.similar.images
        return [{"similar": [{"id": i, "path": images[i].path, "label": images[i].label, "score": round(score, 6),
                              "thumbnail": f"/train-image/{i}"} for i, score in hits[:k_item]]}
                for hits, (_, k_item) in zip(found, items)]

    # --- description ----------------------------------------------------------------------------------------------

    def card(self) -> dict:
        """The model card: classes, backbone, preprocessing, the checkpoint's val metrics, what /similar searches."""
        predictor, meta = self.predictor, self.meta or {}
        pre = predictor.preprocess
        card = {
            "name": predictor.name,
            "trained": predictor.trained,
            "classes": list(predictor.classes),
            "backbone": (meta.get("backbone") or {}).get("name") or self.settings.backbone,
            "preprocessing": {"resize": pre.resize, "crop": pre.crop, "interpolation": pre.interpolation,
                              "mean": list(pre.mean), "std": list(pre.std), "tta": bool(predictor.tta)},
            "val": _finite(meta.get("val")),
            "threshold": predictor.threshold,
            "best_epoch": meta.get("best_epoch"),
            "runtime": {"device": self.runtime.device, "dtype": self.runtime.dtype, "folding": self.folding},
            "top_k": self.settings.top_k,
            "max_bytes": self.settings.max_bytes,
            "similar": self.similar.card(),
        }
        return card


def fold_predictor(predictor, runtime) -> str:
    """Fold `predictor`'s batch norms into its convolutions when that leaves its probabilities and features where they
    were (`classify.serve.folding.fold_checked`, on a fixed probe batch through the serving forward pass); returns what
    was done, for the model card."""
    import torch

    from classify.serve.folding import fold_checked

    generator = torch.Generator().manual_seed(17)  # its own generator: the global RNG is left alone
    probe = torch.randint(0, 256, (2, *predictor.shape), generator=generator, dtype=torch.uint8)
    probe = probe.to(runtime.device)

    def run():
        probs, feats = predictor(probe, runtime, features=True)
        return torch.cat([probs, feats / feats.abs().amax(1, keepdim=True).clamp_min(1e-6)], 1)

    _, done = fold_checked(predictor.backbone.model, run)
    predictor.backbone.model.to(memory_format=torch.channels_last)  # as `Predictor.to` lays it out
    return done


def _finite(value):
    """`value` with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
