"""Multi-label image metrics (MS-COCO): mAP, CP, CR, CF1, OP, OR, OF1, all and top-k (the paper's Table 1).

Definitions (``/work/shared/reference/coco.md``; ML-GCN's evaluation, with the edge cases pinned down here):

* **AP** of a class: non-interpolated average precision over the full ranking of all images, i.e. the mean over
  the class's positives of the precision at each positive's rank (ML-GCN, ASL, CSRA, mmpretrain; *not* the
  VOC-style interpolated AP that Query2Label reports). **mAP** is the mean of AP over classes.
* **Tie rule of a ranking**: images with equal scores form one block, and every positive of a block gets the
  precision measured at the end of the block (positives so far / images so far, the whole block included). This
  is what scikit-learn's ``average_precision_score`` computes (one precision-recall point per distinct score), it
  does not depend on the order of the inputs (batching and merging never change a result), and without ties it
  equals ML-GCN's loop (sort descending, precision at each hit, averaged over the positives). The same rule as
  ``model.metrics.video``.
* A class is **predicted** for an image iff its probability >= ``threshold`` (0.5; logit >= 0).
* **CP** = mean over classes of TP_c / (TP_c + FP_c); a class with no prediction counts precision 0 (ML-GCN,
  CSRA, mmpretrain; SALGL counts 1). **CR** = mean over classes of TP_c / positives_c.
  **CF1** = 2 CP CR / (CP + CR): the harmonic mean of the two means, *not* the mean of per-class F1 (ASL's
  scripts), which is generally a different number.
* **OP** = sum_c TP_c / sum_c predicted_c, **OR** = sum_c TP_c / sum_c positives_c, **OF1** = 2 OP OR / (OP + OR),
  sums over *all* classes (a false positive of a class without positives still lowers OP).
* Any of these with a zero denominator is 0 (e.g. OP when nothing is predicted, CF1 when CP = CR = 0).
* **Top-k block** (``top3_*`` for k = 3): per image keep the k highest-scored classes *and* require probability
  >= ``threshold`` (ML-GCN's convention; other codebases drop the threshold, which is ``threshold=0`` here), then
  the same six numbers. Equal scores at the k-th place: the lower class index is kept (``top_k_per_row`` of
  ``model.metrics.video``, the tie rule of the whole project).

Classes without a positive (possible on a small or a filtered evaluation set; never on full COCO val2014): their
AP is 0/0, and so is their recall. Such a class is **excluded from every per-class mean (mAP, CP and CR)** and
listed in ``classes_without_positives``; its AP is reported as ``None``. (ML-GCN divides by zero there and gets
NaN for everything; counting it as AP 0 would depend on how the set was cut.) Its predictions still count in OP.
The classes that enter CP with precision 0 for lack of a prediction are listed in ``classes_without_predictions``
(threshold block) and ``top3_classes_without_predictions`` (top-k block).

:class:`ImageMetrics` keeps every probability and label (N x K x 9 bytes: 29 MB for COCO val2014's 40,137 images
x 80 classes), since AP needs the whole ranking. Accumulators of several processes combine with
:meth:`ImageMetrics.merge` (the accumulator pickles, e.g. for ``torch.distributed.all_gather_object``); the result
equals one accumulator fed everything, exactly. Optional image ids guard against counting an image twice (a
repeat raises, or with ``drop_duplicate_ids=True`` is dropped, for ``DistributedSampler``'s padding). Values are
fractions in [0, 1]; :func:`format_table1` prints them as Table 1's percentages.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from model.metrics.video import as_numpy, top_k_per_row
from pipeline.errors import Yt8mError

SIX = ("cp", "cr", "cf1", "op", "or", "of1")  # the six thresholded numbers of Table 1, in its column order


class ImageMetricsError(Yt8mError):
    """Inputs image metrics cannot be computed on (bad shapes, NaN, probabilities outside [0, 1], non-binary
    labels, repeated image ids, accumulators that do not match)."""


# ---------------------------------------------------------------------------------------------------------------
# average precision


def _column_average_precisions(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K,) average precision of each column of (N, K) scores against (N, K) bool labels under the module tie
    rule; NaN for a column without positives.

    The sum is taken block by block (positives in the block x precision at its end), so it is bit-for-bit the same
    for any order of the rows.
    """
    n, k = scores.shape
    npos = labels.sum(axis=0)
    if n == 0:
        return np.full(k, np.nan)
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    y = np.take_along_axis(labels, order, axis=0)
    tp = np.cumsum(y, axis=0, dtype=np.int64)  # (N, K) positives ranked at or above each row
    block_end = np.ones((n, k), dtype=bool)
    block_end[:-1] = s[1:] != s[:-1]
    # positives ranked above the block of each block end: tp at the previous block end
    tp_at_ends = np.maximum.accumulate(np.where(block_end, tp, 0), axis=0)
    tp_before = np.zeros_like(tp)
    tp_before[1:] = tp_at_ends[:-1]
    rank = np.arange(1, n + 1, dtype=np.float64)[:, None]
    sums = np.where(block_end, (tp - tp_before) * (tp / rank), 0.0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(npos > 0, sums / np.maximum(npos, 1), np.nan)


def average_precision(scores: Any, labels: Any) -> float:
    """Non-interpolated average precision of one class over the full ranking (module tie rule).

    ``scores``: (N,) real scores (probabilities or logits: only their order matters); ``labels``: (N,) 0/1 or bool.
    Equals ``sklearn.metrics.average_precision_score(labels, scores)``. No positive -> NaN (undefined).
    """
    s = _real(scores, "scores")
    if s.ndim != 1:
        raise ImageMetricsError(f"scores must be 1-D (N,), got shape {s.shape}")
    y = _binary(labels, s.shape, "labels")
    return float(_column_average_precisions(s[:, None], y[:, None])[0])


# ---------------------------------------------------------------------------------------------------------------
# input checks


def _real(x: Any, name: str) -> np.ndarray:
    """A float32/float64 array without NaN (integers and float16 are widened)."""
    a = as_numpy(x)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ImageMetricsError(f"{name} must be real numbers, got dtype {a.dtype}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    elif a.dtype.itemsize < 4:
        a = a.astype(np.float32)
    if np.isnan(a).any():
        raise ImageMetricsError(f"{name} contain NaN")
    return a


def _binary(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A bool array of ``shape`` from 0/1 numbers or bools."""
    a = as_numpy(x)
    if a.shape != shape:
        raise ImageMetricsError(f"{name} must have shape {shape}, got {a.shape}")
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ImageMetricsError(f"{name} must be 0/1, got dtype {a.dtype}")
    if not np.all((a == 0) | (a == 1)):
        raise ImageMetricsError(f"{name} must be 0 or 1")
    return a.astype(bool)


def _id_list(ids: Any, n: int) -> list[Hashable]:
    if isinstance(ids, (str, bytes)):
        raise ImageMetricsError("ids must be a sequence of image ids, not one string")
    if hasattr(ids, "detach") or isinstance(ids, np.ndarray):
        ids = as_numpy(ids).reshape(-1).tolist()
    ids = list(ids)
    if len(ids) != n:
        raise ImageMetricsError(f"{len(ids)} ids for {n} images")
    try:
        for i in ids:
            hash(i)
    except TypeError as e:
        raise ImageMetricsError(f"image ids must be hashable: {e}") from None
    return ids


# ---------------------------------------------------------------------------------------------------------------
# the accumulator


def _six(tp: np.ndarray, predicted: np.ndarray, positives: np.ndarray) -> tuple[dict[str, float], list[int]]:
    """CP, CR, CF1, OP, OR, OF1 from per-class counts, and the classes that enter CP with precision 0 for lack of
    a prediction. Per-class means run over the classes with positives."""
    has = positives > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = tp / np.maximum(positives, 1)
    cp = float(np.mean(precision[has])) if has.any() else 0.0
    cr = float(np.mean(recall[has])) if has.any() else 0.0
    tp_all, pred_all, pos_all = int(tp.sum()), int(predicted.sum()), int(positives.sum())
    op = tp_all / pred_all if pred_all else 0.0
    orr = tp_all / pos_all if pos_all else 0.0
    values = {
        "cp": cp, "cr": cr, "cf1": 2 * cp * cr / (cp + cr) if cp + cr > 0 else 0.0,
        "op": op, "or": orr, "of1": 2 * op * orr / (op + orr) if op + orr > 0 else 0.0,
    }
    return values, np.flatnonzero(has & (predicted == 0)).tolist()


class ImageMetrics:
    """Streaming multi-label image metrics of Table 1 (see the module docstring for every definition).

    Args:
        num_classes: K, the number of probability columns.
        threshold: a class is predicted iff its probability >= threshold (in [0, 1]; 0 predicts everything, which
            turns the top-k block into the plain top-k without a threshold).
        top_k: classes kept per image in the top-k block (Table 1: 3); names the keys (``top3_cp``, ...). A k
            larger than K keeps every class.
        drop_duplicate_ids: when ``ids`` are given, an image id seen before (in the same batch, an earlier batch or
            a merged accumulator) raises :class:`ImageMetricsError` by default; with True the repeat is dropped
            and counted (``num_duplicates_dropped``), the first occurrence kept. This is meant for
            ``DistributedSampler``, which pads the last batches by repeating images.
    """

    def __init__(self, num_classes: int, threshold: float = 0.5, top_k: int = 3, *,
                 drop_duplicate_ids: bool = False):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ImageMetricsError(f"num_classes must be an integer >= 1, got {num_classes}")
        if not 0.0 <= float(threshold) <= 1.0:  # NaN fails too
            raise ImageMetricsError(f"threshold must be in [0, 1], got {threshold}")
        if int(top_k) != top_k or top_k < 1:
            raise ImageMetricsError(f"top_k must be an integer >= 1, got {top_k}")
        self.num_classes = int(num_classes)
        self.threshold = float(threshold)
        self.top_k = int(top_k)
        self.drop_duplicate_ids = bool(drop_duplicate_ids)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._probs: list[np.ndarray] = []  # (B, K) float32/float64 per batch
        self._labels: list[np.ndarray] = []  # (B, K) bool per batch
        self._ids: list[list[Hashable]] = []  # per batch, when ids are given
        self._seen: set[Hashable] = set()
        self._without_ids = 0  # images accumulated without ids
        self.num_images = 0
        self.num_duplicates_dropped = 0

    def update(self, probs: Any, labels: Any, ids: Sequence[Hashable] | None = None) -> "ImageMetrics":
        """Add a batch. ``probs``: (B, K) probabilities in [0, 1] (array or tensor); ``labels``: (B, K) 0/1 or
        bool; ``ids``: optional B hashable image ids (all batches or none), checked for repeats."""
        p = _real(probs, "probabilities")
        if p.ndim != 2 or p.shape[1] != self.num_classes:
            raise ImageMetricsError(f"probabilities must have shape (B, {self.num_classes}), got {p.shape}")
        if np.any((p < 0) | (p > 1)):
            bad = p[(p < 0) | (p > 1)]
            raise ImageMetricsError(f"probabilities must lie in [0, 1] (pass sigmoid(logits)), got e.g. {bad[0]}")
        y = _binary(labels, p.shape, "labels")
        if ids is None:
            self._add(p, y, None)
        else:
            self._add(p, y, _id_list(ids, p.shape[0]))
        return self

    def _add(self, p: np.ndarray, y: np.ndarray, ids: list[Hashable] | None) -> None:
        """Store a checked batch; every check comes before any change, so a raise leaves the state as it was."""
        if ids is None:
            if self._seen:
                raise ImageMetricsError("ids were given for earlier images but not for these: give them always "
                                        "or never")
            self._without_ids += p.shape[0]
        else:
            if self._without_ids:
                raise ImageMetricsError("earlier images came without ids: give them always or never")
            keep = np.ones(len(ids), dtype=bool)
            new: set[Hashable] = set()
            for row, i in enumerate(ids):
                if i in self._seen or i in new:
                    if not self.drop_duplicate_ids:
                        raise ImageMetricsError(f"image id {i!r} was already accumulated (pass "
                                                "drop_duplicate_ids=True to count it once)")
                    keep[row] = False
                new.add(i)
            self._seen |= new
            if not keep.all():
                self.num_duplicates_dropped += int((~keep).sum())
                p, y = p[keep], y[keep]
                ids = [i for i, k in zip(ids, keep) if k]
            if ids:
                self._ids.append(ids)
        if p.shape[0]:
            self._probs.append(p)
            self._labels.append(y)
        self.num_images += p.shape[0]

    def merge(self, other: "ImageMetrics") -> "ImageMetrics":
        """Add everything ``other`` accumulated (same num_classes, threshold, top_k); returns self. The result is
        exactly that of one accumulator fed both inputs. ``other`` is left unchanged."""
        if other is self:
            raise ImageMetricsError("cannot merge an accumulator into itself")
        if not isinstance(other, ImageMetrics):
            raise ImageMetricsError(f"can only merge an ImageMetrics, got {type(other).__name__}")
        mine = (self.num_classes, self.threshold, self.top_k)
        theirs = (other.num_classes, other.threshold, other.top_k)
        if mine != theirs:
            raise ImageMetricsError(f"cannot merge accumulators with (num_classes, threshold, top_k) {theirs} "
                                    f"into {mine}")
        if (self._seen and other._without_ids) or (self._without_ids and other._seen):
            raise ImageMetricsError("cannot merge an accumulator with image ids and one without")
        if not self.drop_duplicate_ids:
            common = self._seen & other._seen
            if common:
                raise ImageMetricsError(f"{len(common)} image ids are in both accumulators, e.g. "
                                        f"{next(iter(common))!r} (pass drop_duplicate_ids=True to count them once)")
        self.num_duplicates_dropped += other.num_duplicates_dropped
        if other._seen:
            for p, y, ids in zip(other._probs, other._labels, other._ids):
                self._add(p, y, list(ids))
        elif other._probs:
            self._add(np.concatenate(other._probs), np.concatenate(other._labels), None)
        return self

    def compute(self) -> dict:
        """All metrics as plain Python values (JSON-ready), fractions in [0, 1].

        Keys: ``map``; ``cp``, ``cr``, ``cf1``, ``op``, ``or``, ``of1`` (threshold block); ``top{k}_cp`` ...
        ``top{k}_of1`` (top-k block, k = ``top_k``); ``ap`` (per class, None without positives);
        ``classes_without_positives`` (left out of mAP, CP, CR); ``classes_without_predictions`` and
        ``top{k}_classes_without_predictions`` (in CP with precision 0); ``num_images``, ``num_classes``,
        ``num_classes_with_positives``, ``num_duplicates_dropped``, ``threshold``, ``top_k``.
        """
        if self.num_images == 0:
            raise ImageMetricsError("no image was accumulated")
        p = np.concatenate(self._probs)
        y = np.concatenate(self._labels)
        ap = _column_average_precisions(p, y)
        positives = y.sum(axis=0)
        has = positives > 0

        predicted = p.astype(np.float64) >= self.threshold  # compare the values themselves, not float32(threshold)
        _, top = top_k_per_row(p, self.top_k)
        in_top = np.zeros_like(predicted)
        np.put_along_axis(in_top, top, True, axis=1)
        predicted_top = predicted & in_top

        out: dict[str, Any] = {"map": float(np.mean(ap[has])) if has.any() else 0.0}
        for prefix, pred in (("", predicted), (f"top{self.top_k}_", predicted_top)):
            values, no_pred = _six((pred & y).sum(axis=0), pred.sum(axis=0), positives)
            out.update({prefix + key: values[key] for key in SIX})
            out[prefix + "classes_without_predictions"] = no_pred
        out.update({
            "ap": [None if np.isnan(a) else float(a) for a in ap],
            "classes_without_positives": np.flatnonzero(~has).tolist(),
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "num_classes_with_positives": int(has.sum()),
            "num_duplicates_dropped": self.num_duplicates_dropped,
            "threshold": self.threshold,
            "top_k": self.top_k,
        })
        return out


# ---------------------------------------------------------------------------------------------------------------
# Table 1


def format_table1(result: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """The Table 1 block of a :meth:`ImageMetrics.compute` result as aligned text, percentages with one decimal::

          mAP    CP    CR   CF1    OP    OR   OF1 | top-3:    CP    CR   CF1    OP    OR   OF1
         71.0  45.8  54.2  49.7  50.0  55.6  52.6 |         58.3  54.2  56.2  55.6  55.6  55.6
        excluded from mAP, CP, CR (no positive): class 3
        precision 0 in CP (no prediction at >= 0.5): class 2

    followed by one line naming the classes left out for lack of positives and one naming the classes that count
    precision 0 for lack of predictions, each only when there are any (``class_names`` turns indices into names).
    """
    k = int(result.get("top_k", 3))
    width = 5
    head = ["mAP", *(c.upper() for c in SIX)]
    row = [result["map"], *(result[c] for c in SIX)]
    top_row = [result[f"top{k}_{c}"] for c in SIX]
    tag = f"top-{k}:"

    def cells(values: Sequence[Any]) -> str:
        return " ".join(f"{v:>{width}}" for v in values)

    def pct(values: Sequence[float]) -> list[str]:
        return [f"{100 * float(v):.1f}" for v in values]

    lines = [
        f"{cells(head)} | {tag} {cells([c.upper() for c in SIX])}",
        f"{cells(pct(row))} | {'':{len(tag)}} {cells(pct(top_row))}",
    ]

    def named(indices: Sequence[int]) -> str:
        names = ", ".join(str(class_names[i]) if class_names is not None else str(i) for i in indices)
        return ("class " if len(indices) == 1 else "classes ") + names

    missing = list(result.get("classes_without_positives", []))
    if missing:
        lines.append(f"excluded from mAP, CP, CR (no positive): {named(missing)}")
    thr = result.get("threshold", 0.5)
    silent = list(result.get("classes_without_predictions", []))
    if silent:
        lines.append(f"precision 0 in CP (no prediction at >= {thr:g}): {named(silent)}")
    silent_top = [c for c in result.get(f"top{k}_classes_without_predictions", []) if c not in set(silent)]
    if silent_top:
        lines.append(f"precision 0 in top-{k} CP only (never in an image's top {k} at >= {thr:g}): "
                     f"{named(silent_top)}")
    return "\n".join(lines)
