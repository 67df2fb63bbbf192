"""The training images most similar to an upload: the "reason to believe" beside a prediction.

At start-up the run's training images are indexed: the train rows of the split table the run was trained on
(model.json's `splits`), with the embeddings `curator clean` / `classify train` cached in that workspace for the
run's backbone (`curator.embedding.embed.open_cache`, read-only: the server never writes to a workspace), for the rows
whose file is still at its recorded path. Vectors are compared as everywhere in atelier
(`curator.embedding.embed.embedding_matrix`: pooled and style statistics, each part L2-normalised) with an exact
inner-product search (faiss `IndexFlatIP`), so a score is a cosine similarity.

An upload is embedded by a model whose features are those of the cache, checked rather than assumed: one training
image is read from disk and embedded, and its vector must match its cached one (cosine >= MATCH). The run's own model
passes for a linear-probe run; a fine-tuned run's backbone no longer gives the cached features, so the pretrained
backbone is tried next (offline registry names only: loading never reaches a network). When nothing fits, or the run
has no usable training rows (splits moved, files moved, cache missing), the index is `unavailable` with the reason,
which `/similar` returns as its JSON error and the page reads to hide the section.

Thumbnails are served by index into the training rows only (never by a path a client names), read through the safe
loader under the dataset's root, and only while the file still has the sha256 it was trained with.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from curator.core.errors import UsageError
from curator.core.images import ReadPolicy, decode_bytes, read_source
from curator.core.paths import display, from_text

#: A candidate embedder fits the cache when it reproduces a cached vector at least this closely (float16 storage
#: alone keeps the cosine above 0.9999; another model's features fall far below).
MATCH = 0.99
THUMB_SIDE = 192
THUMB_CACHE = 1024

Embed = Callable[[np.ndarray], np.ndarray]  # uint8 (n, 3, crop, crop) -> float32 (n, width) features


@dataclass(frozen=True)
class TrainImage:
    """One indexed training image: its path as stored (relative to the dataset root), its label, where the OS finds
    it, and the sha256 it was trained with."""

    path: str
    label: str
    source: str
    sha256: str


class SimilarIndex:
    """Nearest training images by embedding; `available` False with a `reason` when there is nothing to search."""

    def __init__(self, images: list[TrainImage] | None = None, index=None, layout: dict | None = None,
                 embed: Embed | None = None, root: Path | None = None, reason: str | None = None,
                 note: str | None = None):
        self.images = images or []
        self.index = index  # a faiss index of `embedding_matrix` rows, one per image, in order
        self.layout = layout or {}
        self.embed = embed
        self.root = root
        self.reason = reason
        self.note = note  # how the uploads are embedded, for the model card
        self._thumbnail = lru_cache(maxsize=THUMB_CACHE)(self._make_thumbnail)

    @classmethod
    def unavailable(cls, reason: str) -> SimilarIndex:
        return cls(reason=reason)

    @property
    def available(self) -> bool:
        return self.index is not None and self.embed is not None

    def card(self) -> dict:
        """What the model card says about it."""
        return {"available": self.available, "images": len(self.images) if self.available else 0,
                "reason": self.reason, "embedded_by": self.note}

    def search(self, features: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """For each row of raw `features` (the embedder's), the `k` nearest training images as (index, cosine)."""
        from curator.embedding.embed import embedding_matrix

        query = embedding_matrix(features, self.layout)
        scores, ids = self.index.search(query, min(k, len(self.images)))
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]

    def thumbnail(self, i: int) -> bytes | None:
        """A WebP thumbnail of training image `i` (at most THUMB_SIDE a side), or None when `i` is not one, or its
        file is gone, unreadable or no longer the image it was trained with."""
        if not (isinstance(i, int) and 0 <= i < len(self.images)):
            return None
        return self._thumbnail(i)

    def _make_thumbnail(self, i: int) -> bytes | None:
        image = self.images[i]
        data, row = read_source(Path(image.source), ReadPolicy(self.root))
        if row is not None:
            return None
        import hashlib

        if hashlib.sha256(data).hexdigest() != image.sha256:
            return None
        decoded = decode_bytes(Path(image.source), data, (THUMB_SIDE, THUMB_SIDE))
        if decoded.image is None:
            return None
        thumb = decoded.image.copy()
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        thumb.save(out, "WEBP", quality=80)
        return out.getvalue()


def _cosine(a: np.ndarray, b: np.ndarray, layout: dict) -> float:
    from curator.embedding.embed import embedding_matrix

    x, y = embedding_matrix(a[None, :], layout), embedding_matrix(b[None, :], layout)
    return float((x * y).sum())


def _train_rows(meta: dict) -> tuple[list[TrainImage], Path, Path] | str:
    """The run's train rows whose files exist, with the dataset root and workspace; or why there are none."""
    from classify.data import read_split_table

    splits = Path(meta["splits"]["path"])
    if not splits.is_file():
        return f"the run's split table {display(str(splits))} is not there (moved or deleted)"
    try:
        table = read_split_table(splits, need=("train",))
    except UsageError as exc:
        return str(exc)
    rows = table.rows("train")
    images = [TrainImage(path, label, from_text(text, escaped), sha)
              for path, label, text, escaped, sha in zip(rows["rel_path"].to_list(), rows["label"].to_list(),
                                                          rows["path"].to_list(), rows["path_escaped"].to_list(),
                                                          rows["sha256"].to_list())]
    present = [image for image in images if os.path.isfile(image.source)]
    if not present:
        return (f"none of the run's {len(images)} training images is at its recorded path under "
                f"{display(str(table.root))} (moved or deleted)")
    return present, table.root, table.workspace


def _probe(images: list[TrainImage], root: Path, preprocess, tries: int = 20) -> tuple[int, np.ndarray] | None:
    """The first of the training images (of the first `tries`) that still reads, with its trained sha256, and
    decodes: its index and its pixels, made from disk as `classify dir` makes them."""
    import hashlib

    from classify.predict import image_pixels

    for i, image in enumerate(images[:tries]):
        data, row = read_source(Path(image.source), ReadPolicy(root))
        if row is not None or hashlib.sha256(data).hexdigest() != image.sha256:
            continue
        pixels, _ = image_pixels(Path(image.source), data, preprocess)
        if pixels is not None:
            return i, pixels
    return None


def _flat_index(cache, images: list[TrainImage], layout: dict, chunk: int = 8192):
    """An exact inner-product faiss index of the images' cached embeddings (`embedding_matrix`), added a chunk at a
    time so that start-up never holds more than the index and one chunk."""
    import faiss

    from curator.embedding.embed import embedding_matrix

    index = None
    for start in range(0, len(images), chunk):
        vectors = embedding_matrix(cache.get([image.sha256 for image in images[start:start + chunk]]), layout)
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def build_index(meta: dict, run_embed: Embed, preprocess, pretrained_embed: Callable[[], Embed | None]
                ) -> SimilarIndex:
    """The index of a run (module docstring). `run_embed` embeds with the run's model; `pretrained_embed` loads
    the pretrained backbone's embedder (None where it cannot be loaded offline) and is called only when needed."""
    from curator.embedding.embed import open_cache

    found = _train_rows(meta)
    if isinstance(found, str):
        return SimilarIndex.unavailable(found)
    images, root, workspace = found
    try:
        cache = open_cache(workspace, meta["backbone"]["key"], meta["backbone"]["feature_layout"])
    except UsageError as exc:
        return SimilarIndex.unavailable(str(exc))
    missing = set(cache.missing([image.sha256 for image in images]))
    images = [image for image in images if image.sha256 not in missing]
    if not images:
        return SimilarIndex.unavailable(f"no cached embeddings for the run's training images in "
                                        f"{display(str(workspace))}; run `curator clean` on it again")
    layout = cache.layout
    probe = _probe(images, root, preprocess)
    if probe is None:
        return SimilarIndex.unavailable(f"the run's training images under {display(str(root))} no longer read as "
                                        f"they were trained (changed or unreadable)")
    i, pixels = probe
    cached = cache.get([images[i].sha256])[0]
    candidates = [("the run's model", lambda: run_embed),
                  (f"the pretrained {meta['backbone']['name']} (the run was fine-tuned)", pretrained_embed)]
    for note, make in candidates:
        embed = make()
        if embed is not None and _cosine(embed(pixels[None])[0], cached, layout) >= MATCH:
            return SimilarIndex(images, _flat_index(cache, images, layout), layout, embed, root, note=note)
    return SimilarIndex.unavailable(f"no model here reproduces the cached embeddings of the run's training images "
                                    f"(backbone {meta['backbone']['name']} fine-tuned, and its pretrained weights "
                                    f"are not installed or differ)")
