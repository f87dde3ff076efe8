"""YouTube-8M evaluation metrics: Hit@1, PERR, GAP@20, YouTube-8M mAP, full-ranking mAP and segment MAP@K.

The definitions are those of the official YouTube-8M evaluation (starter code ``eval_util.py``), edge cases included:

* **Hit@1**: fraction of videos whose top-scored class is one of their labels (a video without labels scores 0).
* **PERR**: per video, with k = its number of labels, the fraction of its top-k classes that are labels *and* have a
  score > 0; averaged over all videos (k = 0 contributes 0 and still counts).
* **GAP** (top 20): the (score, is-label) pairs of every video's top 20 classes are pooled and ranked;
  ``GAP = sum_i P(i) rel(i) / P_total`` with P_total = all labels, also those outside any top 20. No label -> 0.
* **mAP (YouTube-8M)**: the same top-20 pairs split by class; per class the average precision with denominator =
  all positives of that class; averaged over the classes with at least one positive (``map``). The variant that
  divides the sum by all classes (another published port; much lower on small sets) is ``map_all_classes``.
* **mAP (full ranking)**: per class the average precision over *all* videos, exactly what scikit-learn's
  ``average_precision_score`` computes, averaged over classes with at least one positive (``map_full_ranking``).
  It needs every score (N x K), so it is optional.
* **Segment MAP@K** (2019 challenge): see :func:`segment_map_report`.

Tie rule, one for the whole module:

* Choosing a video's top k classes (:func:`top_k_per_row`): higher score first, equal scores -> lower class index
  first. Hit@1 is therefore numpy's ``argmax``, and the top 20 written to a submission are the top 20 evaluated.
* Ranking (score, relevance) pairs for an average precision: pairs with equal scores form one block, and each
  positive of the block gets the precision measured at the end of the block. This is scikit-learn's rule (its
  precision-recall curve has one point per distinct score), it does not depend on input order (so batching never
  changes a result), and it is what the histogram mode below applies to score bins. The official calculator
  instead shuffles ties with a fixed seed: the results differ only where scores tie exactly (saturated float32
  sigmoids, for instance, are exactly 1.0).

Bounded memory (:class:`VideoMetrics`): Hit@1 and PERR are running sums. GAP and mAP need the pooled top-k pairs
(score float64, class int32, relevance bool: 13 bytes a pair, 260 bytes a video at k = 20). They are kept exactly
until ``exact_limit`` pairs (default 5,000,000, i.e. 250,000 videos, 65 MB). Past that the accumulator switches
once to "histogram" mode, whose memory no longer grows with the number of videos. Each ranked list (the pooled
GAP list, and one list per class for mAP) then keeps its best items exactly (``gap_head`` = 100,000 and
``class_head`` = 1,000; average precision weighs the top of a list most) and counts the items below them, positives
and negatives, in score bins: ``gap_bins`` = 65,536 bins with edges at quantiles of the scores seen before the
switch (so any score scale works, logits included), and per class ``class_bins`` = 512 coarser bins at quantiles of
that class's scores. For 3,862 classes that is about 85 MB (35 MB of class heads, 47 MB of class bins) plus a
merge buffer of at most 1,000,000 pairs. Within a bin the items' order is unknown; the tie rule treats each bin
as one tie block. Because bins are contiguous score ranges below all exact items, the exact value differs from
this only by the order inside each bin, which is bounded from the counts alone (best case: the bin's positives
first; worst case: its negatives first). ``compute()`` reports these bounds as ``gap_error_bound`` and
``map_error_bound`` (0 in exact mode): the exact results are guaranteed to lie within them. Measured on synthetic
data (200,000 videos, 200 classes, switch after 10,000 videos): GAP off by 2e-6, mAP by 1e-5 to 4e-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pipeline.errors import Yt8mError

SEGMENT_TOP_K = 100_000  # the 2019 challenge's MAP@K


class MetricsError(Yt8mError):
    """Inputs a metric cannot be computed on (bad shapes, NaN scores, non-binary labels, bad ratings)."""


# ---------------------------------------------------------------------------------------------------------------
# helpers


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view of an array or a torch tensor (detached, on the CPU; bfloat16 widened to float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def top_k_per_row(scores: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores of each row, like ``torch.topk``: returns ``(values (B, k), indices (B, k))``.

    Rows are sorted by score, highest first; equal scores are ordered by column index, lowest first (also when a
    tie straddles the k-th place). k larger than the number of columns is clipped to it.
    """
    s = _float_scores(scores)
    if k < 1:
        raise MetricsError(f"k must be >= 1, got {k}")
    b, n = s.shape
    k = min(int(k), n)
    if b == 0:
        return s[:, :k].copy(), np.zeros((0, k), dtype=np.int64)
    if k < n:
        # kth: the k-th largest score of each row. All scores above it are in; of those equal to it, the lowest
        # column indices fill the remaining places.
        kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]  # (B, 1)
        above = s > kth
        tied = s == kth
        chosen = above | tied
        crowded = np.count_nonzero(chosen, axis=1) > k  # rows where the tie at the k-th place must be cut
        if crowded.any():
            places_left = k - np.count_nonzero(above[crowded], axis=1)[:, None]
            chosen[crowded] = above[crowded] | (tied[crowded] & (np.cumsum(tied[crowded], axis=1) <= places_left))
        cols = np.nonzero(chosen)[1].reshape(b, k)  # each row's chosen columns, ascending
    else:
        cols = np.broadcast_to(np.arange(n), (b, n))
    vals = np.take_along_axis(s, cols, axis=1)
    # a stable sort on -score keeps ascending columns within ties
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(cols, order, axis=1).astype(np.int64, copy=False)
    return np.take_along_axis(vals, order, axis=1), idx


def _float_scores(scores: Any) -> np.ndarray:
    """(B, K) float32/float64 scores without NaN (float16 and integers are widened)."""
    s = as_numpy(scores)
    if s.ndim != 2:
        raise MetricsError(f"scores must be 2-D (B, K), got shape {s.shape}")
    if s.dtype == bool or not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise MetricsError(f"scores must be real numbers, got dtype {s.dtype}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    elif s.dtype.itemsize < 4:
        s = s.astype(np.float32)
    if np.isnan(s).any():
        raise MetricsError("scores contain NaN")
    return s


def _check_scores(scores: Any, num_classes: int) -> np.ndarray:
    s = _float_scores(scores)
    if s.shape[1] != num_classes:
        raise MetricsError(f"scores must have shape (B, {num_classes}), got {s.shape}")
    return s


def _multi_hot(labels: Any, batch: int, num_classes: int) -> np.ndarray:
    """(B, K) bool from a multi-hot array/tensor or from a list of B label-id sequences."""
    if isinstance(labels, (list, tuple)):
        if len(labels) != batch:
            raise MetricsError(f"{len(labels)} label lists for {batch} score rows")
        out = np.zeros((batch, num_classes), dtype=bool)
        for row, ids in enumerate(labels):
            ids = as_numpy(ids).reshape(-1)
            if ids.size == 0:
                continue
            if not np.issubdtype(ids.dtype, np.integer):
                if not np.all(np.mod(ids, 1) == 0):
                    raise MetricsError(f"label ids of row {row} are not integers: {ids[:5]}")
                ids = ids.astype(np.int64)
            if ids.min() < 0 or ids.max() >= num_classes:
                raise MetricsError(f"label id out of range [0, {num_classes}) in row {row}: {ids.min()}..{ids.max()}")
            out[row, ids] = True
        return out
    y = as_numpy(labels)
    if y.shape != (batch, num_classes):
        raise MetricsError(f"multi-hot labels must have shape ({batch}, {num_classes}), got {y.shape}")
    if y.dtype == bool:
        return y
    if not np.all((y == 0) | (y == 1)):
        raise MetricsError("multi-hot labels must be 0 or 1 (pass label ids as a list of sequences instead)")
    return y.astype(bool)


def _grouped_block_ap_sums(group: np.ndarray, score: np.ndarray, rel: np.ndarray, num_groups: int) -> np.ndarray:
    """Per group, sum over its positives of the precision at the end of the positive's tie block.

    Dividing by a group's number of positives gives its average precision (module tie rule).
    """
    out = np.zeros(num_groups, dtype=np.float64)
    n = score.shape[0]
    if n == 0:
        return out
    order = np.lexsort((-score, group))  # group ascending, then score descending
    g, s, r = group[order], score[order], rel[order]
    idx = np.arange(n)
    first = np.ones(n, dtype=bool)
    first[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(first, idx, 0))
    tp = np.cumsum(r, dtype=np.int64)
    tp_in_group = tp - (tp[group_start] - r[group_start])
    rank_in_group = idx - group_start + 1
    block_end = np.ones(n, dtype=bool)
    block_end[:-1] = first[1:] | (s[1:] != s[:-1])
    end_of = np.minimum.accumulate(np.where(block_end, idx, n)[::-1])[::-1]  # index of each item's block end
    precision = tp_in_group[end_of] / rank_in_group[end_of]
    return np.bincount(g[r], weights=precision[r], minlength=num_groups)


def _histogram_ap_sums(pos: np.ndarray, neg: np.ndarray, tp0: np.ndarray, n0: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (G, bins) positive/negative counts over ascending score bins, ranked below ``n0`` (G,) items holding
    ``tp0`` (G,) positives: per group the tie-rule sum of precisions over the binned positives, and a lower and
    an upper bound on that sum under any ordering of the items inside each bin."""
    p = pos[:, ::-1].astype(np.float64)  # highest scores first
    c = p + neg[:, ::-1]
    tp_before = np.cumsum(p, axis=1) - p + tp0[:, None]
    n_before = np.cumsum(c, axis=1) - c + n0[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(p > 0, p * (tp_before + p) / (n_before + c), 0.0)
        # best case: the bin's positives come first; each gets at most (tp_before + p) / (n_before + p)
        upper = np.where(p > 0, p * (tp_before + p) / (n_before + p), 0.0)
        # worst case: negatives first; sum_j (a + j) / (x + j) >= p - (x - a) * ln(1 + p / x) for x > 0
        x = n_before + (c - p)
        worst = p - (x - tp_before) * np.log1p(p / x)
        lower = np.where(p > 0, np.where(x > 0, np.maximum(worst, 0.0), p), 0.0)
    return value.sum(axis=1), lower.sum(axis=1), upper.sum(axis=1)


def average_precision(scores: Any, relevant: Any, num_positives: int | None = None) -> float:
    """Average precision of one ranked list under the module tie rule.

    ``num_positives`` is the denominator (default: the positives in ``relevant``); pass the true total when the
    list holds only part of them (as GAP does). Zero positives -> 0.0.
    """
    s = np.asarray(as_numpy(scores), dtype=np.float64).reshape(-1)
    r = np.asarray(as_numpy(relevant)).reshape(-1).astype(bool)
    if s.shape != r.shape:
        raise MetricsError(f"{s.size} scores but {r.size} relevance flags")
    total = int(r.sum()) if num_positives is None else int(num_positives)
    if total <= 0:
        return 0.0
    return float(_grouped_block_ap_sums(np.zeros(s.size, dtype=np.int64), s, r, 1)[0] / total)


# ---------------------------------------------------------------------------------------------------------------
# video level


class _HeadTailRanking:
    """One ranked list of (score, relevance) items per group, in bounded memory: per group its ``head``
    best-scored items are kept exactly, every item below them is counted in score bins (positives, negatives).

    Invariant: a group's binned items all score <= ``cut[group]`` < all its exact items, so the exact items rank
    first and the bins follow in score order. New items above the cut wait in a pending buffer; a merge keeps
    each group's ``head`` best, raises the cut to the best item it evicts (ties with it go too, so a tie block is
    never split) and bins the evicted items.

    Args:
        fine_edges: sorted score edges of the fine bins: ``fine bin = searchsorted(fine_edges, score, "right")``.
        tail_edges: (G, bins - 1) nondecreasing edges of each group's bins, in fine-bin units.
        head: exact items kept per group.
        pending_limit: items buffered before a merge.
    """

    def __init__(self, fine_edges: np.ndarray, tail_edges: np.ndarray, head: int, pending_limit: int = 1_000_000):
        groups, inner = tail_edges.shape
        self.fine_edges, self.fine_bins = fine_edges, fine_edges.size + 1
        self.groups, self.bins, self.head, self.pending_limit = groups, inner + 1, int(head), int(pending_limit)
        # class g's edges shifted by g * fine_bins: one sorted array, so one searchsorted bins every group
        self._flat_edges = (np.arange(groups, dtype=np.int64)[:, None] * self.fine_bins + tail_edges).reshape(-1)
        self.pos = np.zeros((groups, self.bins), dtype=np.int64)
        self.neg = np.zeros((groups, self.bins), dtype=np.int64)
        self.head_score = np.full((groups, self.head), -np.inf)
        self.head_rel = np.zeros((groups, self.head), dtype=bool)
        self.head_count = np.zeros(groups, dtype=np.int64)
        self.cut = np.full(groups, -np.inf)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._num_pending = 0

    def add(self, score: np.ndarray, group: np.ndarray, rel: np.ndarray) -> None:
        low = score <= self.cut[group]
        if low.any():
            self._bin(score[low], group[low], rel[low])
        high = ~low
        if high.any():
            self._pending.append((score[high], group[high], rel[high]))
            self._num_pending += int(high.sum())
            if self._num_pending > self.pending_limit:
                self._merge()

    def _exact_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        held = np.arange(self.head)[None, :] < self.head_count[:, None]  # (G, head)
        parts = [(self.head_score[held], np.nonzero(held)[0], self.head_rel[held])] + self._pending
        return tuple(np.concatenate(p) for p in zip(*parts))

    def _merge(self) -> None:
        score, group, rel = self._exact_items()
        order = np.lexsort((-score, group))
        score, group, rel = score[order], group[order], rel[order]
        n = np.bincount(group, minlength=self.groups)
        start = n.cumsum() - n
        over = n > self.head
        self.cut[over] = score[start[over] + self.head]  # the best item that does not fit
        evict = score <= self.cut[group]
        self._bin(score[evict], group[evict], rel[evict])
        keep = ~evict
        rank = np.arange(score.size) - start[group]
        self.head_score.fill(-np.inf)
        self.head_rel.fill(False)
        self.head_score[group[keep], rank[keep]] = score[keep]
        self.head_rel[group[keep], rank[keep]] = rel[keep]
        self.head_count = np.bincount(group[keep], minlength=self.groups)
        self._pending, self._num_pending = [], 0

    def _bin(self, score: np.ndarray, group: np.ndarray, rel: np.ndarray) -> None:
        group = group.astype(np.int64)
        fine = np.searchsorted(self.fine_edges, score, side="right")
        within = np.searchsorted(self._flat_edges, group * self.fine_bins + fine, side="right")
        cell = group * self.bins + within - group * (self.bins - 1)
        for counts, sel in ((self.pos, rel), (self.neg, ~rel)):
            cells, n = np.unique(cell[sel], return_counts=True)
            counts.reshape(-1)[cells] += n

    def ap_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Per group: the tie-rule sum of precisions over its positives, and a bound on its error."""
        score, group, rel = self._exact_items()
        value = _grouped_block_ap_sums(group, score, rel, self.groups)
        tp0 = np.bincount(group, weights=rel, minlength=self.groups)
        n0 = np.bincount(group, minlength=self.groups).astype(np.float64)
        error = np.zeros(self.groups)
        step = max(1, 2_000_000 // self.bins)  # groups at a time: bounds the float64 temporaries
        for lo in range(0, self.groups, step):
            sl = slice(lo, lo + step)
            v, low, up = _histogram_ap_sums(self.pos[sl], self.neg[sl], tp0[sl], n0[sl])
            value[sl] += v
            error[sl] = np.maximum(up - v, v - low)
        return value, error


def _quantile_tail_edges(fine: np.ndarray, group: np.ndarray, groups: int, bins: int,
                         fine_bins: int) -> np.ndarray:
    """(G, bins - 1) edges per group in fine-bin units: equal-count quantiles of the group's items seen so far,
    pooled with ``bins`` points spread evenly over the fine bins, so a group seen rarely so far still gets
    usable bins. Repeated edges only leave bins empty."""
    pool_group = np.concatenate([group, np.repeat(np.arange(groups, dtype=group.dtype), bins)])
    pool_fine = np.concatenate([fine, np.tile((np.arange(bins) * fine_bins) // bins, groups)])
    ordered = pool_fine[np.lexsort((pool_fine, pool_group))]  # ascending within each group
    n = np.bincount(pool_group, minlength=groups)  # (G,), each >= bins
    at = (n.cumsum() - n)[:, None] + (np.arange(1, bins)[None, :] * n[:, None]) // bins  # (G, bins - 1)
    return ordered[at]


class VideoMetrics:
    """Streaming Hit@1, PERR, GAP@top_k and YouTube-8M mAP (optionally the full-ranking mAP) over many batches.

    Args:
        num_classes: K, the number of score columns.
        top_k: classes kept per video for GAP and mAP (official: 20).
        full_ranking: also compute ``map_full_ranking``; keeps every score and label (N x K x 5 bytes for float32
            scores, 9 for float64): 3,862 classes x 1M videos would need 19 GB, so leave it off for big sets.
        exact_limit: pooled top-k pairs kept exactly before switching to bounded memory (None: never switch;
            0: from the first batch on). See the module docstring.
        gap_bins: score bins of the GAP list (after the switch).
        gap_head: best pairs of the GAP list kept exactly (after the switch).
        class_bins: score bins per class for mAP (after the switch).
        class_head: best pairs per class kept exactly (after the switch).
        merge_every: pairs above the heads buffered before they are merged into them (after the switch).
    """

    def __init__(self, num_classes: int, top_k: int = 20, full_ranking: bool = False,
                 exact_limit: int | None = 5_000_000, gap_bins: int = 65_536, gap_head: int = 100_000,
                 class_bins: int = 512, class_head: int = 1_000, merge_every: int = 1_000_000):
        if num_classes < 1:
            raise MetricsError(f"num_classes must be >= 1, got {num_classes}")
        if top_k < 1:
            raise MetricsError(f"top_k must be >= 1, got {top_k}")
        if min(gap_bins, class_bins) < 2 or min(gap_head, class_head, merge_every) < 1:
            raise MetricsError("gap_bins and class_bins must be >= 2; gap_head, class_head, merge_every >= 1")
        if exact_limit is not None and exact_limit < 0:
            raise MetricsError(f"exact_limit must be None or >= 0, got {exact_limit}")
        self.num_classes = int(num_classes)
        self.top_k = min(int(top_k), self.num_classes)
        self.full_ranking = bool(full_ranking)
        self.exact_limit = exact_limit
        self.gap_bins, self.gap_head = int(gap_bins), int(gap_head)
        self.class_bins, self.class_head = int(class_bins), int(class_head)
        self.merge_every = int(merge_every)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.num_videos = 0
        self.num_videos_without_labels = 0
        self._hits = 0
        self._perr_sum = 0.0
        self._class_positives = np.zeros(self.num_classes, dtype=np.int64)
        self._positives_in_top_k = 0
        # exact mode: the pooled top-k pairs
        self._pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (score f64, class i32, rel bool)
        self._num_pairs = 0
        # bounded mode (after the switch)
        self._gap: _HeadTailRanking | None = None
        self._classes: _HeadTailRanking | None = None
        # full-ranking mAP
        self._all_scores: list[np.ndarray] = []
        self._all_labels: list[np.ndarray] = []

    @property
    def mode(self) -> str:
        """"exact" until ``exact_limit`` pairs were seen, "histogram" after."""
        return "exact" if self._gap is None else "histogram"

    def update(self, scores: Any, labels: Any) -> "VideoMetrics":
        """Add a batch. ``scores``: (B, K) array or tensor. ``labels``: (B, K) multi-hot array/tensor, or a
        Python list/tuple of B label-id sequences."""
        s = _check_scores(scores, self.num_classes)
        b = s.shape[0]
        y = _multi_hot(labels, b, self.num_classes)
        if b == 0:
            return self
        num_labels = y.sum(axis=1)  # (B,)
        _, top = top_k_per_row(s, max(self.top_k, int(num_labels.max())))  # (B, k')
        top_scores = np.take_along_axis(s, top, axis=1)
        top_rel = np.take_along_axis(y, top, axis=1)

        self.num_videos += b
        self.num_videos_without_labels += int((num_labels == 0).sum())
        self._hits += int(top_rel[:, 0].sum())
        # PERR: of each video's top-k (k = its label count), the labels with a positive score
        within_k = np.arange(top.shape[1])[None, :] < num_labels[:, None]
        found = (top_rel & within_k & (top_scores > 0)).sum(axis=1)
        has = num_labels > 0
        self._perr_sum += float(np.sum(found[has] / num_labels[has]))
        self._class_positives += y.sum(axis=0)

        score = top_scores[:, : self.top_k].astype(np.float64).reshape(-1)  # (B * top_k,)
        cls = top[:, : self.top_k].astype(np.int32).reshape(-1)
        rel = top_rel[:, : self.top_k].reshape(-1)
        self._positives_in_top_k += int(rel.sum())
        self._add_pairs(score, cls, rel)

        if self.full_ranking:
            self._all_scores.append(np.array(s, copy=True))
            self._all_labels.append(y.copy())
        return self

    def _add_pairs(self, score: np.ndarray, cls: np.ndarray, rel: np.ndarray) -> None:
        if self._gap is None:
            self._pairs.append((score, cls, rel))
            self._num_pairs += score.size
            if self.exact_limit is not None and self._num_pairs > self.exact_limit:
                self._switch_to_bounded()
        else:
            self._gap.add(score, np.zeros(score.size, dtype=np.int32), rel)
            self._classes.add(score, cls, rel)

    def merge(self, other: "VideoMetrics") -> "VideoMetrics":
        """Add everything ``other`` accumulated (another process's share of the same evaluation), as if its batches
        had been passed to ``update`` here. ``other`` must still hold its pairs exactly: give the sharing
        processes ``exact_limit=None``; this accumulator may switch to bounded memory while merging, as it would
        while updating."""
        if (other.num_classes, other.top_k, other.full_ranking) != (self.num_classes, self.top_k,
                                                                      self.full_ranking):
            raise MetricsError(f"cannot merge metrics over {other.num_classes} classes (top {other.top_k}, full "
                               f"ranking {other.full_ranking}) into {self.num_classes} (top {self.top_k}, full "
                               f"ranking {self.full_ranking})")
        if other._gap is not None:
            raise MetricsError("cannot merge an accumulator that switched to bounded memory; give the processes "
                               "that share an evaluation exact_limit=None")
        self.num_videos += other.num_videos
        self.num_videos_without_labels += other.num_videos_without_labels
        self._hits += other._hits
        self._perr_sum += other._perr_sum
        self._class_positives += other._class_positives
        self._positives_in_top_k += other._positives_in_top_k
        for score, cls, rel in other._pairs:
            self._add_pairs(score, cls, rel)
        self._all_scores += other._all_scores
        self._all_labels += other._all_labels
        return self

    def _switch_to_bounded(self) -> None:
        score, cls, rel = (np.concatenate(p) for p in zip(*self._pairs))
        self._pairs, self._num_pairs = [], 0
        # fine bins: equal-count quantiles of the scores seen so far (any score scale works); with fewer distinct
        # scores than bins, each distinct score gets a bin of its own
        distinct = np.unique(score)
        if distinct.size < self.gap_bins:
            fine_edges = distinct
        else:
            ranked = np.sort(score)
            fine_edges = np.unique(ranked[(np.arange(1, self.gap_bins) * ranked.size) // self.gap_bins])
        fine_bins = fine_edges.size + 1
        fine = np.searchsorted(fine_edges, score, side="right")
        self._gap = _HeadTailRanking(fine_edges, np.arange(1, fine_bins)[None, :], self.gap_head, self.merge_every)
        class_edges = _quantile_tail_edges(fine, cls, self.num_classes, self.class_bins, fine_bins)
        self._classes = _HeadTailRanking(fine_edges, class_edges, self.class_head, self.merge_every)
        self._gap.add(score, np.zeros(score.size, dtype=np.int32), rel)
        self._classes.add(score, cls, rel)

    # -- results ---------------------------------------------------------------------------------------------
    def _class_ap_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class sum of precisions over positives, and its error bound (0 in exact mode)."""
        if self._classes is None:
            score, cls, rel = self._exact_pairs()
            return _grouped_block_ap_sums(cls, score, rel, self.num_classes), np.zeros(self.num_classes)
        return self._classes.ap_sums()

    def _gap_sum(self) -> tuple[float, float]:
        if self._gap is None:
            score, _, rel = self._exact_pairs()
            return float(_grouped_block_ap_sums(np.zeros(rel.size, np.int64), score, rel, 1)[0]), 0.0
        value, error = self._gap.ap_sums()
        return float(value[0]), float(error[0])

    def _exact_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._pairs:
            return np.zeros(0), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool)
        return tuple(np.concatenate(p) for p in zip(*self._pairs))

    def per_class_ap(self) -> np.ndarray:
        """(K,) YouTube-8M average precision per class (top-k pairs); NaN for classes without positives."""
        sums, _ = self._class_ap_sums()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self._class_positives > 0, sums / self._class_positives, np.nan)

    def per_class_ap_full_ranking(self) -> np.ndarray:
        """(K,) scikit-learn average precision per class over all videos; NaN for classes without positives."""
        if not self.full_ranking:
            raise MetricsError("per_class_ap_full_ranking needs VideoMetrics(..., full_ranking=True)")
        sums = np.zeros(self.num_classes)
        n = self.num_videos
        chunk = max(1, 4_000_000 // max(n, 1))  # columns at a time: bounds the temporary arrays
        for lo in range(0, self.num_classes, chunk):
            hi = min(lo + chunk, self.num_classes)
            s = np.concatenate([a[:, lo:hi] for a in self._all_scores]).astype(np.float64)  # (N, c)
            y = np.concatenate([a[:, lo:hi] for a in self._all_labels])  # (N, c)
            col = np.broadcast_to(np.arange(hi - lo), s.shape)
            sums[lo:hi] = _grouped_block_ap_sums(col.reshape(-1), s.reshape(-1), y.reshape(-1), hi - lo)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self._class_positives > 0, sums / self._class_positives, np.nan)

    def compute(self) -> dict:
        """All metrics as plain Python numbers (JSON-ready).

        Keys: ``hit_at_1``, ``perr``, ``gap``, ``map`` (YouTube-8M, over classes with positives),
        ``map_all_classes`` (same sum over all K classes), ``map_full_ranking`` (None unless enabled), counts
        (``num_videos``, ``num_videos_without_labels``, ``num_positives``, ``num_positives_in_top_k``,
        ``num_classes``, ``num_classes_with_positives``), ``top_k``, ``mode`` ("exact" or "histogram") and
        ``gap_error_bound`` / ``map_error_bound`` (guaranteed bounds on |reported - exact|; 0 in exact mode).
        """
        if self.num_videos == 0:
            raise MetricsError("no video was accumulated")
        total_pos = int(self._class_positives.sum())
        gap_sum, gap_err = self._gap_sum()
        sums, errs = self._class_ap_sums()
        has = self._class_positives > 0
        n_has = int(has.sum())
        ap = sums[has] / self._class_positives[has]
        map_full = None
        if self.full_ranking:
            map_full = float(np.mean(self.per_class_ap_full_ranking()[has])) if n_has else 0.0
        return {
            "hit_at_1": self._hits / self.num_videos,
            "perr": self._perr_sum / self.num_videos,
            "gap": gap_sum / total_pos if total_pos else 0.0,
            "map": float(ap.mean()) if n_has else 0.0,
            "map_all_classes": float(ap.sum() / self.num_classes),
            "map_full_ranking": map_full,
            "num_videos": self.num_videos,
            "num_videos_without_labels": self.num_videos_without_labels,
            "num_positives": total_pos,
            "num_positives_in_top_k": self._positives_in_top_k,
            "num_classes": self.num_classes,
            "num_classes_with_positives": n_has,
            "top_k": self.top_k,
            "mode": self.mode,
            "gap_error_bound": gap_err / total_pos if total_pos else 0.0,
            "map_error_bound": float(np.mean(errs[has] / self._class_positives[has])) if n_has else 0.0,
        }


# one-shot forms of the same definitions


def hit_at_1(scores: Any, labels: Any) -> float:
    """Fraction of videos whose top class (ties: lowest index) is a label."""
    return _one_shot(scores, labels)["hit_at_1"]


def perr(scores: Any, labels: Any) -> float:
    """Precision at equal recall rate (official definition; see the module docstring)."""
    return _one_shot(scores, labels)["perr"]


def gap(scores: Any, labels: Any, top_k: int = 20) -> float:
    """Global average precision over each video's top_k classes (exact)."""
    return _one_shot(scores, labels, top_k)["gap"]


def youtube8m_map(scores: Any, labels: Any, top_k: int = 20, all_classes: bool = False) -> float:
    """YouTube-8M mAP over each video's top_k classes (exact); ``all_classes`` divides by K instead of by the
    number of classes with positives."""
    r = _one_shot(scores, labels, top_k)
    return r["map_all_classes"] if all_classes else r["map"]


def map_full_ranking(scores: Any, labels: Any) -> float:
    """Mean over classes with positives of scikit-learn's ``average_precision_score`` per class."""
    s = as_numpy(scores)
    m = VideoMetrics(s.shape[-1] if s.ndim == 2 else 1, top_k=1, full_ranking=True, exact_limit=None)
    return m.update(s, labels).compute()["map_full_ranking"]


def _one_shot(scores: Any, labels: Any, top_k: int = 20) -> dict:
    s = as_numpy(scores)
    if s.ndim != 2:
        raise MetricsError(f"scores must be 2-D (B, K), got shape {s.shape}")
    return VideoMetrics(s.shape[1], top_k=top_k, exact_limit=None).update(s, labels).compute()


# ---------------------------------------------------------------------------------------------------------------
# segment level (2019 challenge)

Segment = tuple[str, int]  # (video id, start time in seconds)


def as_str_id(video_id: Any) -> str:
    """A video id as ``str``: bytes (as TFRecords store ids) are decoded as UTF-8."""
    if isinstance(video_id, (bytes, bytearray)):  # np.bytes_ included
        return bytes(video_id).decode("utf-8")
    return str(video_id)


class SegmentRatings(Mapping[int, Mapping[Segment, int]]):
    """Human segment ratings: class id -> {(video id, start time): 1 positive / 0 negative}.

    Video ids are always ``str`` (bytes are decoded as UTF-8), start times ``int``. Only rated pairs are present;
    an unrated pair is unknown, not negative. Re-adding a pair with the same rating is counted in
    ``duplicates``; with a different rating it raises :class:`MetricsError`.
    """

    def __init__(self, entries: Iterable[tuple[Any, Any, Any, Any]] = ()):
        self._by_class: dict[int, dict[Segment, int]] = {}
        self.duplicates = 0
        self.update(entries)

    def add(self, video_id: Any, start_time: Any, class_id: Any, score: Any) -> None:
        """Add one rating; ``score`` must be 1 (positive) or 0 (negative)."""
        rating = float(score)
        if rating not in (0.0, 1.0):
            raise MetricsError(f"segment rating must be 0 or 1, got {score!r} for {video_id}:{start_time} "
                               f"class {class_id}")
        key = (as_str_id(video_id), int(start_time))
        ratings = self._by_class.setdefault(int(class_id), {})
        old = ratings.get(key)
        if old is not None:
            if old != int(rating):
                raise MetricsError(f"conflicting ratings for {key[0]}:{key[1]} class {int(class_id)}")
            self.duplicates += 1
            return
        ratings[key] = int(rating)

    def update(self, entries: Iterable[tuple[Any, Any, Any, Any]]) -> None:
        """Add ``(video_id, start_time, class_id, score)`` tuples from any iterable (read lazily)."""
        for video_id, start, cls, score in entries:
            self.add(video_id, start, cls, score)

    def add_video(self, video_id: Any, start_times: Any, labels: Any, scores: Any) -> None:
        """Add one video's parallel arrays (``segment_start_times``, ``segment_labels``, ``segment_scores``)."""
        start_times, labels, scores = (as_numpy(a).reshape(-1) for a in (start_times, labels, scores))
        if not (start_times.size == labels.size == scores.size):
            raise MetricsError(f"video {as_str_id(video_id)}: {start_times.size} start times, {labels.size} "
                               f"labels, {scores.size} scores")
        for start, cls, score in zip(start_times.tolist(), labels.tolist(), scores.tolist()):
            self.add(video_id, start, cls, score)

    @classmethod
    def from_videos(cls, videos: Iterable[Any]) -> "SegmentRatings":
        """From objects with ``id``, ``segment_start_times``, ``segment_labels``, ``segment_scores`` (records or
        shard rows); videos whose segment arrays are None are skipped (they carry no rating)."""
        out = cls()
        for v in videos:
            if getattr(v, "segment_start_times", None) is not None:
                out.add_video(v.id, v.segment_start_times, v.segment_labels, v.segment_scores)
        return out

    def __getitem__(self, class_id: int) -> Mapping[Segment, int]:
        return self._by_class[class_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_class)

    def __len__(self) -> int:
        return len(self._by_class)

    def num_positives(self, class_id: int) -> int:
        return sum(self._by_class.get(class_id, {}).values())

    @property
    def num_ratings(self) -> int:
        return sum(len(r) for r in self._by_class.values())


@dataclass
class SegmentMapReport:
    """Segment MAP@K and what went into it."""

    map: float
    per_class_ap: dict[int, float]
    k: int
    classes: int = 0  # classes in the submission
    scored_classes: int = 0  # submitted classes with at least one positive rating: the mean runs over them
    classes_without_positives: list[int] = field(default_factory=list)  # submitted, no positive: not in the mean
    rated_classes_not_submitted: int = 0  # not in the mean (the official definition)
    positives: int = 0  # positive ratings of the scored classes (the AP denominators), hittable or not
    predictions: int = 0  # submitted (class, segment) entries within the first k of each class
    truncated: int = 0  # entries past the first k, ignored
    unrated: int = 0  # within k but not rated for that class: neither hit nor miss
    duplicates: int = 0  # a segment repeated within a class's list: only its first occurrence counts
    hits: int = 0  # positively rated predictions
    windows: int = 0  # windows ranked, when the submission came from a model (``model.engine.segments``)


def segment_map_report(submission: Mapping[int, Sequence[tuple[Any, Any]]],
                       ratings: Mapping[int, Mapping[Segment, int]], k: int = SEGMENT_TOP_K) -> SegmentMapReport:
    """Segment MAP@K of the 2019 challenge.

    For each class of ``submission`` (class id -> segments ``(video_id, start_time)``, best first) only the
    first ``k`` entries count (the cut comes first, the filtering below after it). Entries not rated for that
    class are dropped (neither hit nor miss); so is a repeat of an earlier entry. Over the remaining list,
    ``AP_c = sum_i P(i) rel(i) / N_c`` with N_c = every positively rated segment of class c in ``ratings``,
    including ratings that no submission can hit (segments starting past their video's last frame: they stay in
    the shards and in ``ratings`` for exactly this reason).

    MAP is the mean of AP_c over the classes that are in the submission *and* have at least one positive rating.
    A submitted class without a positive (unrated, or rated only negative) has AP = 0/0: the official 2019
    calculator skips such classes (it only builds AP for classes with a positive in the ground truth), so they are
    left out of the mean here too and listed in ``classes_without_positives`` (``per_class_ap`` omits them).
    Rated classes missing from the submission are not in the mean either (``rated_classes_not_submitted``).
    An empty submission, or one whose classes have no positive, -> 0.
    """
    if k < 1:
        raise MetricsError(f"k must be >= 1, got {k}")
    rep = SegmentMapReport(map=0.0, per_class_ap={}, k=int(k))
    submitted = set()
    for cls, ranked in submission.items():
        cls = int(cls)
        submitted.add(cls)
        rated = ratings.get(cls, {})
        total = sum(1 for v in rated.values() if v)
        ranked = list(ranked)
        rep.truncated += max(0, len(ranked) - k)
        seen: set[Segment] = set()
        kept = hits = 0
        precision_sum = 0.0
        for vid, start in ranked[:k]:
            rep.predictions += 1
            key = (as_str_id(vid), int(start))
            if key in seen:
                rep.duplicates += 1
                continue
            seen.add(key)
            rating = rated.get(key)
            if rating is None:
                rep.unrated += 1
                continue
            kept += 1
            if rating:
                hits += 1
                precision_sum += hits / kept
        rep.hits += hits
        if total == 0:  # AP 0/0: not in the mean (official)
            rep.classes_without_positives.append(cls)
        else:
            rep.per_class_ap[cls] = precision_sum / total
            rep.positives += total
    rep.classes = len(submitted)
    rep.scored_classes = len(rep.per_class_ap)
    rep.rated_classes_not_submitted = sum(1 for c in ratings if int(c) not in submitted)
    rep.classes_without_positives.sort()
    if rep.per_class_ap:
        rep.map = math.fsum(rep.per_class_ap.values()) / len(rep.per_class_ap)
    return rep


def segment_map(submission: Mapping[int, Sequence[tuple[Any, Any]]], ratings: Mapping[int, Mapping[Segment, int]],
                k: int = SEGMENT_TOP_K) -> tuple[float, dict[int, float]]:
    """``(MAP@K, {class id: AP})``; see :func:`segment_map_report` for the definition and the counts."""
    rep = segment_map_report(submission, ratings, k)
    return rep.map, rep.per_class_ap
