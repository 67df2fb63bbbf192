"""Stage 6: images whose label the rest of the collection contradicts, in two tiers.

Three witnesses, none of which hears the row's own label:
- a linear probe's out-of-fold class probabilities (scikit-learn logistic regression on the standardised
  embedding, k folds grouped by `group` when known, so that an artist's other works never vouch for it);
- the label distribution of the image's nearest neighbours in embedding space, leaving out neighbours of the same
  group and exact or near copies (their agreement says nothing);
- the labels of the same group's OTHER works (leave-one-out shares): in art collections labels are mostly per artist,
  so a Rembrandt etching filed as Baroque is backed by Rembrandt's other Baroque works, and a Monet filed as Baroque
  is contradicted by Monet's Impressionism. Weighted m/(m+1) for m other works (none: no group witness).
Both scale to a million rows: the vote reads the collection's shared neighbour graph (`curator.core.neighbours`, the one
the duplicate cascade used, mapped to the kept rows) and is vectorised over blocks of rows; above `PROBE_LIMIT` rows
the probe trains on the graph's 256-dimensional projection with training folds of at most `PROBE_TRAIN_ROWS` rows.
Their weighted average is the evidence `q(label | image)` (rows sum to 1); `mislabel_score` is 1 - q(given label).

The cut is calibrated on the collection itself. Because no witness hears the row's own label, a label replaced at
random gets evidence distributed like the evidence a correctly filed row gives to the classes it is NOT filed under
(the empirical null). So if a fraction e of labels is wrong, P(own < tau) ~ e P(other < tau) (correct rows rarely fall
below tau once their group backs them), e = P(own < tau) / P(other < tau), and its uncertainty is a bootstrap over
groups (artists: their rows are not independent). Rows without a group witness are counted at `tau_alone` (0.01, the
level used before the group witness existed): their evidence, from two witnesses only, is lower for correct rows too. Two tiers follow:
- `outlier` (removed by default): among the round(e n) rows with the least evidence for their label, those where
  every witness (probe, other-group neighbours and the row's own group, where it has one) favours the same other class
  by more than `outlier_margin`;
- `review` (kept, flagged): the other rows whose evidence for their label lies below the level that `review_recall`
  of the null evidence lies below, i.e. that a wrong label would reach with that probability: unusual rows, whose
  witnesses disagree (typically: the image looks like another class, its artist's other works back the label).
Measured on wikiart-dev and wikiart-public-domain with planted swaps (bench/mislabels.py, docs/BENCHMARKS.md). On a
correctly labelled collection e comes out at or near zero, so nothing or little is removed. With fewer than
`min_judged` judged rows that have other works of their group (and fewer than `min_judged_alone` judged rows in all)
the estimate is called unreliable: nothing is removed and the would-be outliers are kept for review. Measured: random
200-image subsets of wikiart-dev (mostly one or two works per artist) estimated 0.11 for 0.09 and removed at
precision 0.5; the 150-image sample (19 artists, 5-15 works each) removed at precision 0.95-1.0.

Rows the witnesses cannot judge are left unscored (null score, never flagged, left out of the noise estimate): those
whose own group (artist) makes up more than half of their class, which includes every row of a class by one artist
and of a one-image class. The probe and the neighbours only hear from other groups, so for such a row they can hardly
ever speak for its label, and the group witness agrees with it by construction: its low evidence would measure how the
class was assembled, not whether the label is wrong. A file by another artist filed into such a class is still scored
(its group is a minority of the class). Rows with no group (the --group-pattern did not match) are each a group of
their own, as in `curator split`, and are judged on the probe and the neighbours alone, as before.
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
from curator.core.settings import (
    MislabelSettings,  # re-exported: defined in the light module the CLI imports
)


@dataclass
class MislabelResult:
    """Per-row evidence for the rows scored, in their order, and the collection's noise estimate."""

    classes: list[str]
    evidence: np.ndarray  # (n, K), rows sum to 1
    probe: np.ndarray  # (n, K) out-of-fold probabilities (rows of probe-less classes: kNN only)
    knn: np.ndarray  # (n, K) neighbour label shares
    votes: np.ndarray  # (n,) neighbours that carry the suggested label
    voters: np.ndarray  # (n,) neighbours consulted
    flagged: np.ndarray  # (n,) bool: either tier (outlier or review)
    score: np.ndarray  # (n,) 1 - evidence for the given label: 0..1, higher = more likely wrong; NaN if unscored
    suggested: np.ndarray  # (n,) class index
    scored: np.ndarray  # (n,) bool: False where the witnesses cannot judge the label (see the module docstring)
    unscored_classes: list[str]  # classes with at least one unscored row
    noise_rate: float  # estimated fraction of wrong labels among the scored rows
    group: np.ndarray | None = None  # (n, K) label shares among the row's group's other works (zeros without any)
    group_size: np.ndarray | None = None  # (n,) the row's group's other works
    outlier: np.ndarray | None = None  # (n,) bool: the tier removed by default (a subset of `flagged`)
    noise_interval: tuple[float, float] = (0.0, 0.0)  # bootstrap interval of `noise_rate` (5th-95th percentile)
    review_cut: float = 0.0  # evidence for the given label below which a scored row is at least `review`
    reliable: bool = True  # False below `MislabelSettings.min_judged` judged rows: nothing is put in `outlier`

    @property
    def tier(self) -> np.ndarray:
        """(n,) "outlier", "review" or None per row."""
        out = np.full(len(self.flagged), None, dtype=object)
        out[self.flagged] = "review"
        out[self.outlier] = "outlier"
        return out

    def summary(self) -> dict:
        """The estimate and the tiers' sizes, as settings.json and the report record them."""
        return {"noise_rate": round(self.noise_rate, 4),
                "noise_interval": [round(self.noise_interval[0], 4), round(self.noise_interval[1], 4)],
                "judged": int(self.scored.sum()), "judged_with_group": int((self.scored & (self.group_size > 0)).sum()),
                "reliable": self.reliable,
                "outliers": int(self.outlier.sum()), "review": int((self.flagged & ~self.outlier).sum()),
                "review_cut": round(self.review_cut, 4)}


def estimate_text(summary: dict) -> str | None:
    """The noise estimate of a `Mislabels.summary()` (as settings.json records it) in words, for the CLI's summary and
    the report alike: "estimated 0.4% of labels wrong (90% interval 0.2-0.7%)", with "; too few images to trust it:
    nothing removed" when it is not reliable. None when there is no estimate."""
    if not summary or not summary.get("noise_interval"):
        return None
    low, high = summary["noise_interval"]
    text = (f"estimated {100 * summary['noise_rate']:.1f}% of labels wrong (90% interval {100 * low:.1f}-"
            f"{100 * high:.1f}%)")
    return text if summary.get("reliable", True) else text + "; too few images to trust it: nothing removed"


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


def estimate_noise_rate(evidence: np.ndarray, y: np.ndarray, tau: float | np.ndarray = 0.05) -> float:
    """Fraction of wrong labels: P(own evidence < tau) / P(other-class evidence < tau), capped at 0.5. `tau` may be
    one level per row (rows with and without a group witness are judged at their own level)."""
    n = len(y)
    if n == 0:
        return 0.0
    own_low, other_low = _below(evidence, y, tau)
    null_share = float(other_low.sum()) / (n * (evidence.shape[1] - 1)) if evidence.shape[1] > 1 else 0.0
    if null_share == 0.0:
        return 0.0
    return min(float(own_low.mean()) / null_share, 0.5)


def _below(evidence: np.ndarray, y: np.ndarray, tau: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether its own evidence is below tau (a level, or one per row), and how many of its other classes'
    evidence is."""
    tau = np.asarray(tau, dtype=np.float64)
    own_low = evidence[np.arange(len(y)), y] < tau
    return own_low, (evidence < (tau[:, None] if tau.ndim else tau)).sum(axis=1) - own_low


#: Bootstrap resamples drawn at a time (bounds the (resamples, groups) weight matrix).
BOOTSTRAP_BLOCK = 16


def noise_interval(evidence: np.ndarray, y: np.ndarray, groups: np.ndarray | None, tau: float | np.ndarray,
                   resamples: int,
                   seed: int, level: float = 0.90) -> tuple[float, float]:
    """A `level` interval of `estimate_noise_rate`, by a bootstrap over groups (an artist's works are not
    independent; rows without a group are groups of one): each resample weights every group by a Poisson(1) count,
    so it costs O(resamples x groups) whatever N. (0, 0) when `resamples` is 0."""
    n = len(y)
    if n == 0 or resamples == 0 or evidence.shape[1] < 2:
        return 0.0, 0.0
    own_low, other_low = _below(evidence, y, tau)
    codes = np.unique(groups, return_inverse=True)[1].ravel() if groups is not None else np.arange(n)
    size = int(codes.max()) + 1
    per_group = np.stack([np.bincount(codes, own_low, size), np.bincount(codes, other_low, size),
                          np.bincount(codes, minlength=size).astype(np.float64)], axis=1)
    rng = np.random.default_rng(seed)
    estimates = []
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        weights = rng.poisson(1.0, (min(BOOTSTRAP_BLOCK, resamples - start), size)).astype(np.float64)
        own, other, rows = (weights @ per_group).T
        null = other / np.maximum(rows * (evidence.shape[1] - 1), 1.0)
        estimates.append(np.where(null > 0, own / np.maximum(rows, 1.0) / np.maximum(null, 1e-12), 0.0))
    values = np.minimum(np.concatenate(estimates), 0.5)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def group_shares(y: np.ndarray, groups: np.ndarray | None, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out label shares within each row's group: (n, K) shares of the group's OTHER works per class (zeros
    for a row alone in its group) and (n,) how many other works there are. Vectorised: one bincount over
    (group, class) pairs of the groups with two or more rows."""
    n = len(y)
    shares = np.zeros((n, n_classes))
    if groups is None or n == 0:
        return shares, np.zeros(n, dtype=np.int64)
    codes = np.unique(groups, return_inverse=True)[1].ravel()
    others = np.bincount(codes)[codes] - 1
    rows = np.flatnonzero(others > 0)
    if len(rows) == 0:
        return shares, others
    multi = np.unique(codes[rows], return_inverse=True)[1].ravel()
    counts = np.bincount(multi * n_classes + y[rows], minlength=(int(multi.max()) + 1) * n_classes)
    counts = counts.reshape(-1, n_classes)[multi].astype(np.float64)
    counts[np.arange(len(rows)), y[rows]] -= 1.0
    shares[rows] = counts / others[rows][:, None]
    return shares, others


def combined_evidence(probe: np.ndarray, has_probe: np.ndarray, knn: np.ndarray, group: np.ndarray,
                      group_size: np.ndarray) -> np.ndarray:
    """The witnesses' weighted average (rows sum to 1): probe and neighbours weight 1 each (no probe: neighbours
    alone), the group m/(m+1) for m other works, so that one other work counts half and a large group almost fully."""
    weight = (group_size / (group_size + 1.0))[:, None]
    probe_weight = has_probe[:, None].astype(np.float64)
    return (probe_weight * probe + knn + weight * group) / (probe_weight + 1.0 + weight)


def tiers(evidence: np.ndarray, y: np.ndarray, scored: np.ndarray, noise_rate: float, witnesses: list[np.ndarray],
          present: list[np.ndarray], settings: MislabelSettings, seed: int) -> tuple[np.ndarray, np.ndarray, float,
                                                                                      np.ndarray]:
    """(flagged, outlier, review cut, suggested class) per row (see the module docstring). `witnesses` are (n, K)
    label distributions and `present` says for which rows each one speaks; all must favour the suggested class over
    the given one by more than `settings.outlier_margin` for a row to be an outlier."""
    n = len(y)
    rows = np.arange(n)
    own = evidence[rows, y]
    others = evidence.copy()
    others[rows, y] = -1.0
    suggested = others.argmax(axis=1)
    agree = scored.copy()
    for witness, speaks in zip(witnesses, present):
        agree &= ~speaks | (witness[rows, suggested] - witness[rows, y] > settings.outlier_margin)
    candidates = np.flatnonzero(scored)
    outlier = np.zeros(n, dtype=bool)
    lowest = candidates[np.argsort(own[candidates], kind="stable")][: round(noise_rate * len(candidates))]
    outlier[lowest] = agree[lowest]
    review_cut = 0.0
    if len(candidates) and evidence.shape[1] > 1:
        # the null's quantile on at most 20,000 rows (seeded): a million rows' n x (K - 1) entries need no sorting
        sample = candidates if len(candidates) <= 20_000 else np.sort(
            np.random.default_rng(seed).choice(candidates, 20_000, replace=False))
        null = others[sample]
        null = null[null >= 0]  # every class but the row's own (marked -1 above)
        review_cut = float(np.quantile(null, settings.review_recall))
    flagged = outlier | (scored & (own < review_cut))
    return flagged, outlier, review_cut, suggested


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
    """Evidence, scores, the noise estimate and the two tiers for rows with `labels` (strings), their groups (None
    where unknown) and their embeddings: a matrix (searched here), or a `curator.core.neighbours.Neighbourhood` of these
    rows whose shared graph the vote reads (`voting_graph`). Rows that cannot be judged (`judgeable`) still vote as
    neighbours, train the probe and count among their group's other works, but get no score, are never flagged and
    do not enter the noise estimate. Above `probe_limit` rows the probe is the fast one (`probe_features`)."""
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
    return judge(classes, y, g, probe, has_probe, knn_shares, counts, settings)


def judge(classes: list[str], y: np.ndarray, g: np.ndarray | None, probe: np.ndarray, has_probe: np.ndarray,
          knn_shares: np.ndarray, counts: np.ndarray, settings: MislabelSettings) -> MislabelResult:
    """The rest of `score_mislabels` once the probe and the neighbours have spoken (class indices `y`, group codes
    `g`): the group witness, the combined evidence, the noise estimate and its interval, and the two tiers."""
    n = len(y)
    group, group_size = group_shares(y, g, len(classes))
    evidence = combined_evidence(probe, has_probe, knn_shares, group, group_size)
    scored = judgeable(y, g) & has_probe
    # rows without a group witness (no group, or alone in it) are judged at the level they always were
    tau = np.where(group_size > 0, settings.tau, settings.tau_alone)[scored]
    noise_rate = estimate_noise_rate(evidence[scored], y[scored], tau)
    interval = noise_interval(evidence[scored], y[scored], None if g is None else g[scored], tau,
                              settings.bootstrap, settings.seed)
    flagged, outlier, review_cut, suggested = tiers(
        evidence, y, scored, noise_rate, [probe, knn_shares, group],
        [has_probe, counts.sum(axis=1) > 0, group_size > 0], settings, settings.seed)
    reliable = (int((scored & (group_size > 0)).sum()) >= settings.min_judged
                or int(scored.sum()) >= settings.min_judged_alone)
    if not reliable:
        outlier[:] = False  # too few rows to trust the estimate: the would-be outliers stay flagged, for review
    own = evidence[np.arange(n), y]
    votes = counts[np.arange(n), suggested]
    unscored = sorted({classes[c] for c in np.unique(y[~scored])})
    return MislabelResult(classes, evidence, probe, knn_shares, votes, counts.sum(axis=1), flagged,
                          np.where(scored, 1.0 - own, np.nan), suggested, scored, unscored, noise_rate,
                          group, group_size, outlier, interval, review_cut, reliable)


def probe_features(embeddings: np.ndarray | Neighbourhood, graph: Graph, fast: bool,
                   seed: int) -> tuple[np.ndarray, int | None]:
    """What the probe trains on, and the cap on its training rows. Today's probe (`fast` False): the embedding as
    given, every training row. The fast probe: the 256-dimensional projection of the unit rows (the compressed
    search's own projections, as it kept them in float16, when it has them; else the rows read in chunks through its
    projection, or one fitted on a sample), and training folds of at most `PROBE_TRAIN_ROWS` rows."""
    from curator.core.neighbours import Neighbourhood, fit_projection, normalise

    if not fast:
        return (embeddings.dense() if isinstance(embeddings, Neighbourhood) else embeddings), None
    if isinstance(embeddings, Neighbourhood):
        projection = graph.projection
        kept = embeddings.projections()
        if kept is not None:  # the search's own projections: no full-width row is read again
            return kept, PROBE_TRAIN_ROWS
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


_ARRAYS = ("evidence", "probe", "knn", "votes", "voters", "flagged", "score", "suggested", "scored", "group",
           "group_size", "outlier")
_CACHE_VERSION = 3  # part of the cache key: results of another version are not looked up at all


class _DamagedCache(Exception):
    """A mislabel cache file that cannot be read or does not fit the rows it is meant for."""


def cached_score(cache_dir: Path, key_parts: list, embeddings: np.ndarray | Neighbourhood, labels: list[str],
                 groups: list[str | None], settings: MislabelSettings) -> tuple[MislabelResult, list[str]]:
    """`score_mislabels`, remembered in `cache_dir` under a hash of everything it depends on (file contents, labels,
    groups, settings), so a rerun on an unchanged collection does not refit the probe; and warnings for the user.

    A cache file is verified before use (readable, every array of the right shape and range for these rows); a
    damaged one is reported in a warning, recomputed and replaced (it is atelier's own file)."""
    # what is done with the flags (action, relabel_min) does not change the scores: not part of the key
    scoring = {k: v for k, v in asdict(settings).items() if k not in ("action", "relabel_min")}
    blob = json.dumps([_CACHE_VERSION, key_parts, labels, groups, scoring], default=str)
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
                       "noise_rate": result.noise_rate, "noise_interval": list(result.noise_interval),
                       "review_cut": result.review_cut, "reliable": result.reliable})
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
            or not all(_fraction(meta.get(key)) for key in ("noise_rate", "review_cut"))
            or not isinstance(meta.get("noise_interval"), list) or len(meta["noise_interval"]) != 2
            or not all(_fraction(v) for v in meta["noise_interval"]) or not isinstance(meta.get("reliable"), bool)):
        raise _DamagedCache("its metadata does not fit these rows")
    shapes = {"evidence": (n, k), "probe": (n, k), "knn": (n, k), "group": (n, k)}
    for name, array in arrays.items():
        kind = ("b" if name in ("flagged", "scored", "outlier")
                else "iu" if name in ("votes", "voters", "suggested", "group_size") else "f")
        if array.shape != shapes.get(name, (n,)) or array.dtype.kind not in kind:
            raise _DamagedCache(f"{name} has shape {array.shape} and type {array.dtype}")
    scored = arrays["scored"]
    if (not all(np.isfinite(arrays[name]).all() for name in ("evidence", "probe", "knn", "group"))
            or not np.isfinite(arrays["score"][scored]).all() or (arrays["flagged"] & ~scored).any()
            or (arrays["outlier"] & ~arrays["flagged"]).any() or (arrays["group_size"] < 0).any()
            or ((arrays["suggested"] < 0) | (arrays["suggested"] >= k)).any()):
        raise _DamagedCache("its values are out of range")
    first = _ARRAYS.index("group")
    return MislabelResult(classes, *(arrays[name] for name in _ARRAYS[:first]), meta["unscored"],
                          float(meta["noise_rate"]), *(arrays[name] for name in _ARRAYS[first:]),
                          tuple(float(v) for v in meta["noise_interval"]), float(meta["review_cut"]),
                          meta["reliable"])


def _fraction(value) -> bool:
    """Whether a cached number is a float in [0, 1] (bools are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def apply_mislabels(frame: pl.DataFrame, embeddings: np.ndarray | Neighbourhood,
                    settings: MislabelSettings = MislabelSettings(),
                    cache_dir: Path | None = None, summary: dict | None = None) -> tuple[pl.DataFrame, list[str]]:
    """Score the kept, labelled rows of a manifest frame (`embeddings` in the order of those rows: a matrix, or the
    `curator.core.neighbours.Neighbourhood` of those rows, whose graph the vote then reads instead of searching again)
    and act on the two tiers: `outlier` rows per `settings.action` (removed, kept with status outlier, or relabelled
    where the score reaches `relabel_min`), `review` rows kept and flagged. Returns the frame with the mislabel
    columns, and warnings for the user. With `cache_dir`, the scores of an unchanged collection are reused. With
    `summary` (a dict), it is filled with the noise estimate and the tiers' sizes (`MislabelResult.summary`)."""
    rows = np.flatnonzero((frame["keep"] & frame["label"].is_not_null()).to_numpy())
    n = len(frame)
    warnings_out: list[str] = []
    labels = frame["label"].to_list()
    kept_labels = [labels[r] for r in rows]
    if len(set(kept_labels)) < 2 or len(rows) < 2 * settings.folds:
        warnings_out.append("mislabel check skipped: it needs at least two classes and "
                            f"{2 * settings.folds} kept images")
        if summary is not None:
            summary.update(skipped=True)
        return _with_mislabel_columns(frame, _Columns.empty(n)), warnings_out
    groups = frame["group"].to_list()
    kept_groups = [groups[r] for r in rows]
    if cache_dir is None:
        result = score_mislabels(embeddings, kept_labels, kept_groups, settings)
    else:
        shas = frame["sha256"].to_list()
        result, notes = cached_score(cache_dir, [shas[r] for r in rows], embeddings, kept_labels, kept_groups,
                                     settings)
        warnings_out.extend(notes)
    if summary is not None:
        summary.update(result.summary())
    if not result.scored.all():
        warnings_out.append(_unscored_warning(kept_labels, result.scored))
    if not result.reliable:
        judged = result.summary()
        warnings_out.append(
            f"mislabel noise estimate unreliable: {judged['judged']} images judged, {judged['judged_with_group']} of "
            f"them with other works of their group (it needs {settings.min_judged} with, or "
            f"{settings.min_judged_alone} in all): nothing removed as mislabelled; {int(result.flagged.sum())} kept "
            f"for review")
    status = frame["status"].to_list()
    keep = frame["keep"].to_list()
    reason = frame["reason"].to_list()
    paths = frame["path"].to_list()
    classes_of = np.unique(np.array(kept_labels, dtype=object), return_inverse=True)[1].ravel()  # sorted, as classes
    columns = _Columns.of(result, classes_of, rows, n)
    flagged = np.flatnonzero(result.flagged)
    nearest_of = nearest_of_class(embeddings, classes_of, result.suggested, flagged)
    for k in flagged.tolist():  # the flagged rows only: a handful, whatever N
        r = int(rows[k])
        columns.witnesses[r] = [paths[rows[j]] for j in nearest_of[k]]
        evidence = _evidence_text(result, k, labels[r], groups[r])
        if not result.outlier[k]:
            reason[r] = f"{reason[r]}; {evidence}" if reason[r] else evidence
            continue
        if settings.action == "relabel" and result.score[k] >= settings.relabel_min:
            columns.original[r] = labels[r]
            labels[r] = result.classes[result.suggested[k]]
            reason[r] = f"relabelled: {evidence}"
            continue
        status[r] = "outlier"
        keep[r] = settings.action == "flag-only"
        reason[r] = evidence
    frame = frame.with_columns(
        pl.Series("label", labels, dtype=pl.String), pl.Series("status", status, dtype=pl.String),
        pl.Series("keep", keep, dtype=pl.Boolean), pl.Series("reason", reason, dtype=pl.String),
    )
    return _with_mislabel_columns(frame, columns), warnings_out


def _evidence_text(result: MislabelResult, k: int, label: str, group: str | None) -> str:
    """Why row k is flagged, in one line: what each witness says, and for the review tier what speaks for the label
    (or that the estimate was too uncertain to remove anything)."""
    given, suggested = result.classes.index(label), int(result.suggested[k])
    name = result.classes[suggested]
    for_suggested, against = [], []
    voters = int(result.voters[k])
    if voters:
        if result.knn[k, suggested] > result.knn[k, given]:
            for_suggested.append(f"{int(result.votes[k])} of {voters} nearest neighbours by other artists")
        else:
            against.append(f"the nearest neighbours by other artists ({result.knn[k, given]:.0%} {label})")
    probe_p, probe_own = result.probe[k, suggested], result.probe[k, given]
    if probe_p + probe_own > 0:
        (for_suggested if probe_p > probe_own else against).append(
            f"the probe (p={probe_p:.2f})" if probe_p > probe_own else f"the probe (p={probe_own:.2f} for {label})")
    size = int(result.group_size[k])
    if size:
        for_name = round(result.group[k, suggested] * size)
        own = round(result.group[k, given] * size)
        who = f"of {group}'s {size} other works" if group else f"of its group's {size} other works"
        if result.group[k, suggested] > result.group[k, given]:
            for_suggested.append(f"{for_name} {who}")
        else:
            against.append(f"{own} {who} are filed as {label}")
    said = f"filed as {label}; {_join(for_suggested) or 'the evidence'} say {name} (mislabel score {result.score[k]:.2f})"
    if result.outlier[k]:
        return said
    if against:
        return f"{said}; against it: {_join(against)}; kept for review"
    if not result.reliable:
        return f"{said}: kept for review (too few images to trust the noise estimate)"
    return f"{said}: kept for review (weaker evidence than the rows removed)"


def _join(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + (parts[-1] if parts else "")


@dataclass
class _Columns:
    """The mislabel columns for every row of the frame (null where a row was not scored)."""

    score: np.ndarray  # float, NaN = null
    suggested: np.ndarray  # object
    tier: np.ndarray  # object
    issue: np.ndarray  # bool
    group_share: np.ndarray  # float, NaN = null
    margin: np.ndarray  # float, NaN = null
    original: list[str | None]
    witnesses: list[list[str] | None]

    @classmethod
    def empty(cls, n: int) -> _Columns:
        return cls(np.full(n, np.nan), np.full(n, None, dtype=object), np.full(n, None, dtype=object),
                   np.zeros(n, dtype=bool), np.full(n, np.nan), np.full(n, np.nan), [None] * n, [None] * n)

    @classmethod
    def of(cls, result: MislabelResult, given: np.ndarray, rows: np.ndarray, n: int) -> _Columns:
        """Vectorised over the scored rows (`given`: their class indices; `rows`: their rows in the frame)."""
        out = cls.empty(n)
        ok = result.scored
        at = rows[ok]
        k = np.arange(len(rows))
        suggested = result.suggested
        out.score[at] = result.score[ok]
        out.suggested[at] = np.array(result.classes, dtype=object)[suggested[ok]]
        out.tier[at] = result.tier[ok]
        out.issue[at] = result.flagged[ok]
        grouped = ok & (result.group_size > 0)
        out.group_share[rows[grouped]] = result.group[k, given][grouped]
        # each witness's preference for the suggested class over the given one; the smallest is the margin (a
        # witness that does not speak for a row, a probe-less class or a group of one, is left out)
        margins = [np.where(result.probe.sum(axis=1) > 0, result.probe[k, suggested] - result.probe[k, given], np.inf),
                   np.where(result.voters > 0, result.knn[k, suggested] - result.knn[k, given], np.inf),
                   np.where(result.group_size > 0, result.group[k, suggested] - result.group[k, given], np.inf)]
        margin = np.minimum.reduce(margins)
        out.margin[at] = np.where(np.isfinite(margin), margin, np.nan)[ok]
        return out


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


def _with_mislabel_columns(frame: pl.DataFrame, columns: _Columns) -> pl.DataFrame:
    return frame.with_columns(
        pl.Series("mislabel_neighbours", columns.witnesses, dtype=pl.List(pl.String)),
        pl.Series("mislabel_score", columns.score, dtype=pl.Float32).fill_nan(None),
        pl.Series("suggested_label", columns.suggested.tolist(), dtype=pl.String),
        pl.Series("is_mislabel_issue", columns.issue, dtype=pl.Boolean),
        pl.Series("mislabel_tier", columns.tier.tolist(), dtype=pl.String),
        pl.Series("mislabel_group_share", columns.group_share, dtype=pl.Float32).fill_nan(None),
        pl.Series("mislabel_margin", columns.margin, dtype=pl.Float32).fill_nan(None),
        pl.Series("original_label", columns.original, dtype=pl.String),
    )
