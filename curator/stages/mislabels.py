"""Stage 6: images whose label the rest of the collection contradicts.

Two independent witnesses, combined:
- a linear probe's out-of-fold class probabilities (scikit-learn logistic regression on the standardised
  embedding, k folds grouped by `group` when known, so that an artist's other works never vouch for it);
- the label distribution of the image's nearest neighbours in embedding space, leaving out neighbours of the same
  group and exact or near copies (their agreement says nothing).
Both scale to a million rows: the vote reads the collection's shared neighbour graph (`curator.core.neighbours`, the one
the duplicate cascade used, mapped to the kept rows) and is vectorised over blocks of rows; above `PROBE_LIMIT` rows
the probe trains on the graph's 256-dimensional projection with training folds of at most `PROBE_TRAIN_ROWS` rows.
Their average is the evidence `q(label | image)` (rows sum to 1); `mislabel_score` is 1 - q(given label).

How many rows to flag comes from an empirical null, so that the number flagged tracks the estimated noise rate
rather than a fixed count or score: the evidence a row gives to classes other than its own is what a wrong label
looks like. If a fraction e of labels were replaced at random, the share of rows whose own evidence is below a small
tau is about e times the share of other-class evidence below tau (clean rows rarely fall there). So
e = P(own < tau) / P(other < tau), and the round(e n) rows with the least evidence for their label are flagged.

Measured on wikiart-dev (bench/mislabels.py, docs/BENCHMARKS.md): ranking by the evidence for the given label beats
ranking by margin (average precision 0.57 against 0.39 at 10% swaps); confident learning's per-class thresholds
(cleanlab) flagged about 4x the true number of swaps on these overlapping styles; the null estimate came within
+0.04 of the true rate at 5-20% swaps (and gives 0.04 on the unswapped data: ambiguous or mislabelled paintings).

Rows the witnesses cannot judge are left unscored (null score, never flagged, left out of the noise estimate): those
whose own group (artist) makes up more than half of their class, which includes every row of a class by one artist
and of a one-image class. Both witnesses only hear from other groups, so for such a row they can hardly ever speak for
its label: the kNN sees at most the few other-group rows of its class, and the grouped probe, when the row's group is
held out, trains on those few rows alone (on none for a one-artist class). Its low evidence then measures how the class
was assembled, not whether the label is wrong, and ranking by it flagged one-artist classes wholesale. The only other
evidence there is, the artist's own other works, agrees with the label by construction. A file by another artist filed
into such a class is still scored (its group is a minority of the class). Rows with no group (the --group-pattern did
not match) are each a group of their own, as in `curator split`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from curator.core.atomic import atomic_path
from curator.core.neighbours import Graph, Neighbourhood
from curator.core.settings import MislabelSettings  # re-exported: defined in the light module the CLI imports


@dataclass
class MislabelResult:
    """Per-row evidence for the rows scored, in their order."""

    classes: list[str]
    evidence: np.ndarray  # (n, K), rows sum to 1
    probe: np.ndarray  # (n, K) out-of-fold probabilities (rows of probe-less classes: kNN only)
    knn: np.ndarray  # (n, K) neighbour label shares
    votes: np.ndarray  # (n,) neighbours that carry the suggested label
    voters: np.ndarray  # (n,) neighbours consulted
    flagged: np.ndarray  # (n,) bool
    score: np.ndarray  # (n,) 1 - evidence for the given label: 0..1, higher = more likely wrong; NaN if unscored
    suggested: np.ndarray  # (n,) class index
    scored: np.ndarray  # (n,) bool: False where the witnesses cannot judge the label (see the module docstring)
    unscored_classes: list[str]  # classes with at least one unscored row
    noise_rate: float  # estimated fraction of wrong labels among the scored rows


#: Rows above which the probe is fitted on the 256-dimensional projection of the embedding (the one the neighbour
#: search uses) with training folds of at most `PROBE_TRAIN_ROWS` random rows; at or below it, as before, on the full
#: embedding. Its cost in quality, forced on wikiart-dev at 10% planted swaps (bench/neighbours_scale.py --probe, two
#: seeds): flagged-row F1 0.544 against 0.567, probe accuracy 0.50 against 0.545; its fit is O(PROBE_TRAIN_ROWS).
PROBE_LIMIT = 20_000
PROBE_TRAIN_ROWS = 50_000
#: The neighbour vote reads each row's first `VOTE_CANDIDATES` x k neighbours (as it always has) for its k voters.
VOTE_CANDIDATES = 5
#: Rows per block of the vectorised vote (bounds its temporaries).
VOTE_BLOCK = 65_536


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_classes: int,
                              folds: int, regularisation: float, seed: int,
                              max_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold class probabilities from a standardised logistic-regression probe, and which rows got them.

    A class needs two rows (two groups, when groups are known) to be predicted for a row it did not train on;
    classes with fewer are left out of the probe (their rows get none). Folds are capped by the number of groups.
    With `max_train`, each fold trains on at most that many of its training rows (a seeded random subset): the fit
    costs O(max_train), whatever N.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=n_classes)
    if groups is not None:
        codes = groups if groups.dtype.kind in "iu" else np.unique(groups, return_inverse=True)[1].ravel()
        span = int(codes.max()) + 1
        group_counts = np.bincount(np.unique(y.astype(np.int64) * span + codes) // span, minlength=n_classes)
        counts = np.minimum(counts, group_counts)
    usable = counts[y] >= 2
    probs = np.zeros((len(y), n_classes))
    if usable.sum() == 0 or len(set(y[usable])) < 2:
        return probs, np.zeros(len(y), dtype=bool)
    xs, ys = (x, y) if usable.all() else (x[usable], y[usable])  # no copy of a large x when every row is usable
    units = len(np.unique(groups[usable])) if groups is not None else int(np.bincount(ys).min())
    folds = max(2, min(folds, units))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(xs, ys, groups[usable])
    else:
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(xs, ys)
    out = np.zeros((len(ys), n_classes))
    rng = np.random.default_rng(seed)
    for train, test in splits:
        if max_train is not None and len(train) > max_train:
            train = np.sort(rng.choice(train, size=max_train, replace=False))
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=regularisation, max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.fit(xs[train], ys[train])
        out[np.ix_(test, probe.classes_)] = probe.predict_proba(xs[test])
    probs[usable] = out
    return probs, usable


def vote_size(n: int, settings: MislabelSettings) -> tuple[int, int]:
    """(k voters, candidates read) for n rows: k is a tenth of the rows at most (small collections), and the vote
    reads each row's first `VOTE_CANDIDATES` x k other rows to find k that are not of its group."""
    k = min(settings.neighbours, max(5, n // 10))
    return k, max(0, min(n - 1, VOTE_CANDIDATES * k))


def voting_graph(space: Neighbourhood, candidates: int) -> Graph:
    """The graph the vote reads: the shared graph's first `candidates` neighbours. When the graph is exact, rows
    left with fewer (their neighbours were duplicates removed before this stage) are searched again, exactly, among
    these rows, so the vote is the one a search over these rows alone gives. A compressed graph is used as it is:
    such a row votes with the candidates it has (see `neighbour_labels`)."""
    from curator.core.neighbours import without_self

    graph = space.graph.first(candidates)
    if not graph.exact or graph.k == 0:
        return graph
    short = np.flatnonzero((graph.ids >= 0).sum(axis=1) < candidates)
    if len(short) == 0:
        return graph
    import faiss

    unit = space.unit()
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    sims, ids = index.search(unit[short], min(candidates + 1, len(unit)))
    out_ids, out_sims = graph.ids.copy(), graph.sims.copy()
    out_ids[short], out_sims[short] = without_self(ids, sims, short, candidates)
    return Graph(out_ids, out_sims, True, graph.method)


def neighbour_labels(graph: Graph, y: np.ndarray, groups: np.ndarray | None, n_classes: int, k: int,
                     exclude: set[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Share of each class among every row's first k valid neighbours in `graph` (nearest first), weighted by
    cosine, and the plain neighbour counts per class. Valid: not the row's own group, not an `exclude` pair.

    Vectorised over blocks of rows (masks, a cumulative count for the first k valid, and one weighted bincount).
    A row with fewer than k valid neighbours among the graph's candidates votes with those it has (its counts sum to
    fewer); one with none gets uniform shares, so that its evidence comes from the probe alone."""
    from curator.core.neighbours import pair_keys

    n = len(y)
    shares = np.zeros(n * n_classes)
    counts = np.zeros(n * n_classes, dtype=np.int64)
    excluded = (pair_keys(*np.array(sorted(exclude), dtype=np.int64).reshape(-1, 2).T, n)
                if exclude else None)
    for start in range(0, n, VOTE_BLOCK):
        ids = graph.ids[start:start + VOTE_BLOCK]
        rows = np.arange(start, start + len(ids))
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        if groups is not None:
            valid &= groups[safe] != groups[rows][:, None]
        if excluded is not None:
            valid &= ~np.isin(pair_keys(np.broadcast_to(rows[:, None], ids.shape), safe, n), excluded)
        take = valid & (np.cumsum(valid, axis=1, dtype=np.int32) <= k)
        r, c = np.nonzero(take)  # row-major: each row's voters in neighbour order, as the sums have always run
        cell = (rows[r] * n_classes + y[ids[r, c]]).astype(np.int64)
        weight = np.maximum(graph.sims[start:start + VOTE_BLOCK][r, c].astype(np.float64), 0.0) + 1e-6
        lo, hi = start * n_classes, (start + len(ids)) * n_classes
        shares[lo:hi] = np.bincount(cell - lo, weights=weight, minlength=hi - lo)
        counts[lo:hi] = np.bincount(cell - lo, minlength=hi - lo)
    shares = shares.reshape(n, n_classes)
    counts = counts.reshape(n, n_classes)
    total = shares.sum(axis=1, keepdims=True)
    return np.where(total > 0, shares / np.maximum(total, 1e-12), 1.0 / n_classes), counts


def estimate_noise_rate(evidence: np.ndarray, y: np.ndarray, tau: float = 0.01) -> float:
    """Fraction of wrong labels: P(own evidence < tau) / P(other-class evidence < tau), capped at 0.5."""
    n = len(y)
    if n == 0:
        return 0.0
    own = evidence[np.arange(n), y]
    others = np.ones_like(evidence, dtype=bool)
    others[np.arange(n), y] = False
    null_share = float((evidence[others] < tau).mean()) if others.any() else 0.0
    if null_share == 0.0:
        return 0.0
    return min(float((own < tau).mean()) / null_share, 0.5)


def group_codes(groups: list[str | None] | None) -> np.ndarray | None:
    """Groups as integer codes, each row without a group a code of its own (a unit of one, as in `curator split`);
    None when no row has a group."""
    if groups is None or all(g is None for g in groups):
        return None
    known: dict[str, int] = {}
    codes = [known.setdefault(g, len(known)) if g is not None else -1 for g in groups]
    spare = iter(range(len(known), len(known) + len(codes)))
    return np.array([c if c >= 0 else next(spare) for c in codes], dtype=np.int64)


def judgeable(y: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Per row: whether its own group makes up at most half of its class, so that other groups' rows can speak for
    its label (see the module docstring). Without groups every row is a group of its own."""
    n = len(y)
    g = groups if groups is not None else np.arange(n)
    _, pair = np.unique(y.astype(np.int64) * (int(g.max(initial=0)) + 1) + g, return_inverse=True)
    pair = pair.ravel()
    in_pair = np.bincount(pair)[pair]
    in_class = np.bincount(y)[y]
    return in_pair * 2 <= in_class


def score_mislabels(embeddings: np.ndarray | Neighbourhood, labels: list[str], groups: list[str | None] | None,
                    settings: MislabelSettings = MislabelSettings(),
                    exclude: set[tuple[int, int]] | None = None, probe_limit: int = PROBE_LIMIT) -> MislabelResult:
    """Evidence, scores and flags for rows with `labels` (strings), their groups (None where unknown) and their
    embeddings: a matrix (searched here), or a `curator.core.neighbours.Neighbourhood` of these rows whose shared graph
    the vote reads (`voting_graph`). Rows that cannot be judged (`judgeable`) still vote as neighbours and train the
    probe, but get no score, are never flagged and do not enter the noise estimate. Above `probe_limit` rows the
    probe is the fast one (`probe_features`)."""
    from curator.core.neighbours import Neighbourhood, knn

    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels], dtype=np.int64)
    g = group_codes(groups)
    n = len(y)
    k, candidates = vote_size(n, settings)
    if isinstance(embeddings, Neighbourhood):
        space = embeddings
        graph = voting_graph(space, candidates)
    else:
        space = None
        graph = knn(embeddings, candidates, seed=settings.seed)
    features, max_train = probe_features(embeddings if space is None else space, graph, n > probe_limit,
                                         settings.seed)
    probe, has_probe = out_of_fold_probabilities(features, y, g, len(classes), settings.folds,
                                                 settings.regularisation, settings.seed, max_train)
    del features
    knn_shares, counts = neighbour_labels(graph, y, g, len(classes), k, exclude)
    evidence = np.where(has_probe[:, None], (probe + knn_shares) / 2.0, knn_shares)
    own = evidence[np.arange(n), y]
    scored = judgeable(y, g) & has_probe
    noise_rate = estimate_noise_rate(evidence[scored], y[scored], settings.tau)
    candidates_ = np.flatnonzero(scored)
    flagged = np.zeros(n, dtype=bool)
    flagged[candidates_[np.argsort(own[candidates_], kind="stable")][: round(noise_rate * len(candidates_))]] = True
    others = evidence.copy()
    others[np.arange(n), y] = -1.0
    suggested = others.argmax(axis=1)
    votes = counts[np.arange(n), suggested]
    unscored = sorted({classes[c] for c in np.unique(y[~scored])})
    return MislabelResult(classes, evidence, probe, knn_shares, votes, counts.sum(axis=1), flagged,
                          np.where(scored, 1.0 - own, np.nan), suggested, scored, unscored, noise_rate)


def probe_features(embeddings: np.ndarray | Neighbourhood, graph: Graph, fast: bool,
                   seed: int) -> tuple[np.ndarray, int | None]:
    """What the probe trains on, and the cap on its training rows. Today's probe (`fast` False): the embedding as
    given, every training row. The fast probe: the 256-dimensional projection of the unit rows (the compressed
    search's own projection when the graph has one, else one fitted on a sample), read in chunks, and training folds
    of at most `PROBE_TRAIN_ROWS` rows."""
    from curator.core.neighbours import Neighbourhood, fit_projection, normalise

    if not fast:
        return (embeddings.dense() if isinstance(embeddings, Neighbourhood) else embeddings), None
    if isinstance(embeddings, Neighbourhood):
        projection = graph.projection
        if projection is None:
            projection = fit_projection(_Rows(embeddings), seed=seed)
        out = np.empty((len(embeddings), projection.shape[1]), dtype=np.float32)
        for start, block in embeddings.chunks():
            out[start:start + len(block)] = normalise(block) @ projection
        return out, PROBE_TRAIN_ROWS
    from curator.core.neighbours import project

    projection = graph.projection if graph.projection is not None else fit_projection(embeddings, seed=seed)
    return project(embeddings, projection), PROBE_TRAIN_ROWS


class _Rows:
    """A Neighbourhood's rows indexable like an array (for `fit_projection`'s sample)."""

    def __init__(self, space: Neighbourhood):
        self.space = space
        self.shape = (len(space), space.dim)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        return self.space.take(index)


_ARRAYS = ("evidence", "probe", "knn", "votes", "voters", "flagged", "score", "suggested", "scored")
_CACHE_VERSION = 2  # part of the cache key: results of another version are not looked up at all


class _DamagedCache(Exception):
    """A mislabel cache file that cannot be read or does not fit the rows it is meant for."""


def cached_score(cache_dir: Path, key_parts: list, embeddings: np.ndarray | Neighbourhood, labels: list[str],
                 groups: list[str | None], settings: MislabelSettings) -> tuple[MislabelResult, list[str]]:
    """`score_mislabels`, remembered in `cache_dir` under a hash of everything it depends on (file contents, labels,
    groups, settings), so a rerun on an unchanged collection does not refit the probe; and warnings for the user.

    A cache file is verified before use (readable, every array of the right shape and range for these rows); a
    damaged one is reported in a warning, recomputed and replaced (it is atelier's own file)."""
    blob = json.dumps([_CACHE_VERSION, key_parts, labels, groups, asdict(settings)], default=str)
    path = Path(cache_dir) / f"mislabels-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npz"
    notes: list[str] = []
    if path.is_file():
        try:
            return _load_result(path, labels), notes
        except _DamagedCache as exc:
            notes.append(f"mislabel cache {path.name} was damaged ({exc}); recomputed")
    result = score_mislabels(embeddings, labels, groups, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"classes": result.classes, "unscored": result.unscored_classes,
                       "noise_rate": result.noise_rate})
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, meta=np.array(meta), **{name: getattr(result, name) for name in _ARRAYS})
    return result, notes


def _load_result(path: Path, labels: list[str]) -> MislabelResult:
    """A cached result, checked against the rows it is for; `_DamagedCache` saying what is wrong otherwise."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            meta = json.loads(str(saved["meta"]))
            arrays = {name: saved[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        raise _DamagedCache(f"unreadable: {type(exc).__name__}") from None
    classes = sorted(set(labels))
    n, k = len(labels), len(classes)
    if (not isinstance(meta, dict) or meta.get("classes") != classes
            or not isinstance(meta.get("unscored"), list) or not all(c in classes for c in meta["unscored"])
            or not isinstance(meta.get("noise_rate"), (int, float)) or not 0 <= meta["noise_rate"] <= 0.5):
        raise _DamagedCache("its metadata does not fit these rows")
    shapes = {"evidence": (n, k), "probe": (n, k), "knn": (n, k)}
    for name, array in arrays.items():
        kind = "b" if name in ("flagged", "scored") else "iu" if name in ("votes", "voters", "suggested") else "f"
        if array.shape != shapes.get(name, (n,)) or array.dtype.kind not in kind:
            raise _DamagedCache(f"{name} has shape {array.shape} and type {array.dtype}")
    scored = arrays["scored"]
    if (not all(np.isfinite(arrays[name]).all() for name in ("evidence", "probe", "knn"))
            or not np.isfinite(arrays["score"][scored]).all() or (arrays["flagged"] & ~scored).any()
            or ((arrays["suggested"] < 0) | (arrays["suggested"] >= k)).any()):
        raise _DamagedCache("its values are out of range")
    return MislabelResult(classes, *(arrays[name] for name in _ARRAYS), meta["unscored"], float(meta["noise_rate"]))


def apply_mislabels(frame: pl.DataFrame, embeddings: np.ndarray | Neighbourhood,
                    settings: MislabelSettings = MislabelSettings(),
                    cache_dir: Path | None = None) -> tuple[pl.DataFrame, list[str]]:
    """Score the kept, labelled rows of a manifest frame (`embeddings` in the order of those rows: a matrix, or the
    `curator.core.neighbours.Neighbourhood` of those rows, whose graph the vote then reads instead of searching again)
    and act on the flagged ones per `settings.action`. Returns the frame with the mislabel columns, and warnings for the
    user. With `cache_dir`, the scores of an unchanged collection are reused."""
    rows = np.flatnonzero((frame["keep"] & frame["label"].is_not_null()).to_numpy())
    n = len(frame)
    score: list[float | None] = [None] * n
    suggested: list[str | None] = [None] * n
    witnesses_of: list[list[str] | None] = [None] * n
    issue = [False] * n
    original: list[str | None] = [None] * n
    warnings_out: list[str] = []
    labels = frame["label"].to_list()
    kept_labels = [labels[r] for r in rows]
    if len(set(kept_labels)) < 2 or len(rows) < 2 * settings.folds:
        warnings_out.append("mislabel check skipped: it needs at least two classes and "
                            f"{2 * settings.folds} kept images")
        return _with_mislabel_columns(frame, score, suggested, issue, original, witnesses_of), warnings_out
    groups = frame["group"].to_list()
    kept_groups = [groups[r] for r in rows]
    if cache_dir is None:
        result = score_mislabels(embeddings, kept_labels, kept_groups, settings)
    else:
        shas = frame["sha256"].to_list()
        result, notes = cached_score(cache_dir, [shas[r] for r in rows], embeddings, kept_labels, kept_groups,
                                     settings)
        warnings_out.extend(notes)
    if not result.scored.all():
        warnings_out.append(_unscored_warning(kept_labels, result.scored))
    status = frame["status"].to_list()
    keep = frame["keep"].to_list()
    reason = frame["reason"].to_list()
    paths = frame["path"].to_list()
    classes_of = np.array([result.classes.index(label) for label in kept_labels])
    nearest_of = nearest_of_class(embeddings, classes_of, result.suggested, np.flatnonzero(result.flagged))
    for k, r in enumerate(rows.tolist()):
        if not result.scored[k]:
            continue
        score[r] = float(result.score[k])
        suggested[r] = result.classes[result.suggested[k]]
        if not result.flagged[k]:
            continue
        issue[r] = True
        witnesses_of[r] = [paths[rows[j]] for j in nearest_of[k]]
        probe_p = result.probe[k, result.suggested[k]]
        witnesses = f"{result.votes[k]} of {result.voters[k]} nearest neighbours"
        if probe_p > 0:
            witnesses += f" and the probe (p={probe_p:.2f})"
        evidence = f"filed as {labels[r]}; {witnesses} say {suggested[r]} (mislabel score {score[r]:.2f})"
        if settings.action == "relabel" and score[r] >= settings.relabel_min:
            original[r] = labels[r]
            labels[r] = suggested[r]
            reason[r] = f"relabelled: {evidence}"
            continue
        status[r] = "outlier"
        keep[r] = settings.action == "flag-only"
        reason[r] = evidence
    frame = frame.with_columns(
        pl.Series("label", labels, dtype=pl.String), pl.Series("status", status, dtype=pl.String),
        pl.Series("keep", keep, dtype=pl.Boolean), pl.Series("reason", reason, dtype=pl.String),
    )
    return _with_mislabel_columns(frame, score, suggested, issue, original, witnesses_of), warnings_out


def nearest_of_class(embeddings: np.ndarray | Neighbourhood, classes_of: np.ndarray, suggested: np.ndarray,
                     flagged: np.ndarray, count: int = 3) -> dict[int, list[int]]:
    """For each flagged row, its `count` nearest rows filed under its suggested class (the witnesses the report
    shows). Exact (cosine to every row of that class) up to the neighbour search's exact limit; above it, the first
    such rows among the row's graph neighbours (fewer when the graph holds fewer)."""
    from curator.core.neighbours import Neighbourhood, normalise

    if isinstance(embeddings, Neighbourhood) and not embeddings.graph.exact:
        ids = embeddings.graph.ids[flagged]
        match = (ids >= 0) & (classes_of[np.maximum(ids, 0)] == suggested[flagged][:, None])
        return {int(r): ids[i][match[i]][:count].tolist() for i, r in enumerate(flagged)}
    unit = normalise(embeddings.dense() if isinstance(embeddings, Neighbourhood) else embeddings)
    out = {}
    for k in flagged.tolist():
        same_class = np.flatnonzero(classes_of == suggested[k])
        out[k] = same_class[np.argsort(-(unit[same_class] @ unit[k]), kind="stable")[:count]].tolist()
    return out


def _unscored_warning(labels: list[str], scored: np.ndarray) -> str:
    """One sentence naming the classes with rows the mislabel check could not judge, and how many of each."""
    per_class: dict[str, list[int]] = {}
    for label, ok in zip(labels, scored.tolist()):
        counts = per_class.setdefault(label, [0, 0])
        counts[0] += not ok
        counts[1] += 1
    named = ", ".join(f"{c} ({u} of {t})" for c, (u, t) in sorted(per_class.items()) if u)
    return (f"{int((~scored).sum())} images not checked for mislabels: their artist (group) makes up more than half "
            f"of their class (or the class has one image), so no other artist's work can vouch for the label: {named}")


def _with_mislabel_columns(frame, score, suggested, issue, original, witnesses) -> pl.DataFrame:
    return frame.with_columns(
        pl.Series("mislabel_neighbours", witnesses, dtype=pl.List(pl.String)),
        pl.Series("mislabel_score", score, dtype=pl.Float32),
        pl.Series("suggested_label", suggested, dtype=pl.String),
        pl.Series("is_mislabel_issue", issue, dtype=pl.Boolean),
        pl.Series("original_label", original, dtype=pl.String),
    )
