"""Segment-level scoring (2019 YouTube-8M segment challenge): 5-second windows, two scorers, bounded top lists.

Windows. A segment is the 5 frames starting at a multiple of 5 s. Like the official inference, a video of T frames
is cut into S = ceil(T / 5) consecutive windows from frame 0; the last one may be partial (T = 12 -> starts 0, 5,
10, the last holding frames 10-11) and is scored on the frames it has. A 1-frame video has one window, start 0.

Scorers (``SCORERS``; which one is the default is measured by ``bench/segments.py``):

* ``frames``: the model applied to each window's own frames, as if the window were a whole video (B * S windows,
  batched, the partial last window masked). SNet turns a 5-frame window into one output step (ceil pooling).
  The natural scorer of a model fine-tuned on rated segments (``model.train_video --segment-labels``).
* ``context``: the video-level model runs once per video; a segment inherits the video probability p_k of a
  class, weighted by where the class attends. With a_k (T',) the class-k attention over the backbone's output
  steps, the mass of segment s is M_k(s) = sum_j a_k(j) |step j ∩ seg s| / |step j| (a step's weight is spread
  evenly over the valid frames it covers), and its attention density relative to uniform is
  r_k(s) = M_k(s) / (n_s / T), n_s the segment's valid frames. The score is

      score_k(s) = p_k * r_k(s) / max_s' r_k(s')        in [0, p_k]

  so the segment where class k attends most keeps the video probability and the others are scaled down in
  proportion to their attention density. Output step j of SNet covers frames [j * 2^4, (j + 1) * 2^4) (4 ceil
  max-pool stages of stride 2; the stride is read from the backbone, ``time_stride``); a segment inside one
  step gets that step's density, so the context scorer localizes to 16 frames with SNet and to single frames
  with the FC backbone. Heads without class-specific attention (``MeanPoolHead``), or attention that is zero
  for every step, give every segment the video probability (r = const).

Public API (also used by ``beam_jobs.tag_segments`` and ``model.explain``):

    segment_starts(num_frames) -> int64 (S,)                       # 0, 5, ..., < num_frames
    segment_frame_counts(num_frames) -> int64 (S,)                 # 5, ..., 5 or the partial rest
    time_stride(backbone) -> int                                   # frames per backbone output step
    score_segments(model, x (B, T, D), mask (B, T), scorer) -> SegmentScores
        # .scores (B, S, K) float32 probabilities, .valid (B, S) bool, .start_times (S,) int64 (same for all rows)
    score_video_segments(model, x (T, D) | (B, T, D), mask=None, scorer=DEFAULT_SCORER, top_k=20, classes=None)
        -> [(start_time, class, score), ...] ranked by segment then score (a list of such lists for a batch)
    TopSegmentsPerClass(classes, max_per_class).add(video_ids, start_times, scores (N, C)); .ranked() -> {class: [(vid, start)]}
    segment_training_examples(batch, num_classes) -> SegmentExamples (5-frame windows of rated segments + targets + ignore mask)
    rated_segment_map(model, loader, device, scorer, k, ratings=None, classes=None) -> SegmentMapReport
        # segment MAP@k of the model: every window ranked per class, scored as the challenge scores a submission
    read_segment_ratings(data) -> SegmentRatings; rated_classes(data) -> int64 (C,)

``score_video_segments`` is a pure function of (model, frames): it does not touch the model's mode, so call
``model.eval()`` first (batch-norm statistics), and it runs under ``torch.no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from model.networks.heads import MeanPoolHead
from model.metrics.video import SEGMENT_TOP_K, SegmentMapReport, SegmentRatings, as_str_id, segment_map_report
from pipeline.errors import Yt8mError

SEGMENT_FRAMES = 5
SCORERS = ("context", "frames")
DEFAULT_SCORER = "frames"  # measured: bench/segments.py (see docs/design.md)


class SegmentError(Yt8mError, ValueError):
    """A scorer that does not exist, a model it cannot apply to, or segment inputs of the wrong shape."""


# ---------------------------------------------------------------------------------------------------------------
# window arithmetic


def num_segments(num_frames: int) -> int:
    """S = ceil(T / 5): the windows of a T-frame video (0 for T = 0)."""
    return -(-int(num_frames) // SEGMENT_FRAMES)


def segment_starts(num_frames: int) -> np.ndarray:
    """Start times (seconds = frame index) of the consecutive windows from frame 0: (S,) int64."""
    return np.arange(num_segments(num_frames), dtype=np.int64) * SEGMENT_FRAMES


def segment_frame_counts(num_frames: int) -> np.ndarray:
    """Frames each window holds: 5, except a partial last window: (S,) int64."""
    starts = segment_starts(num_frames)
    return np.minimum(starts + SEGMENT_FRAMES, int(num_frames)) - starts


def time_stride(backbone: nn.Module) -> int:
    """Frames covered by one backbone output step: the product of the pooling strides of its stages (SNet:
    2^4 = 16), 1 for a backbone that keeps the time axis (FC). Valid for non-overlapping ceil-mode pooling,
    where output step j covers input frames [j * stride, (j + 1) * stride)."""
    stages = getattr(backbone, "stages", None)
    if stages is None:
        return 1
    return int(math.prod(int(getattr(stage, "pool", 1)) for stage in stages))


def step_segment_weights(num_frames: torch.Tensor, T: int, T_out: int, stride: int) -> torch.Tensor:
    """W (B, T', S): the share of output step j's valid frames that fall in segment s.

    Rows of a valid step sum to 1; a step without valid frames is all zero. Contracting the step attention
    (B, K, T') with W gives each segment's attention mass (B, K, S).
    """
    B = num_frames.shape[0]
    device = num_frames.device
    S = num_segments(T)
    t = torch.arange(T, device=device)
    valid = (t.unsqueeze(0) < num_frames.unsqueeze(1)).float()  # (B, T)
    step_of = torch.nn.functional.one_hot(t // stride, T_out).float()  # (T, T')
    seg_of = torch.nn.functional.one_hot(t // SEGMENT_FRAMES, S).float()  # (T, S)
    counts = torch.einsum("bt,tj,ts->bjs", valid, step_of, seg_of)  # (B, T', S)
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------------
# scorers


@dataclass
class SegmentScores:
    """Scores of every window of a batch.

    scores: (B, S, K) float32 probabilities (zero at invalid windows), on the model's device.
    valid: (B, S) bool, True for windows that hold at least one frame.
    start_times: (S,) int64, the start of window s in every row.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    start_times: np.ndarray


def _check_inputs(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 3:
        raise SegmentError(f"x must be (B, T, D), got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
    if mask.shape != (B, T):
        raise SegmentError(f"mask must be ({B}, {T}), got {tuple(mask.shape)}")
    mask = mask.to(device=x.device, dtype=torch.bool)
    lengths = mask.sum(dim=1)
    # windows are cut from frame 0, so the valid frames must be a prefix (the loader's padding is)
    prefix = torch.arange(T, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(prefix, mask):
        raise SegmentError("mask must mark a prefix of frames (real frames first, padding after)")
    if bool((lengths == 0).any()):
        raise SegmentError("a video without frames has no segment to score")
    return x, mask


@torch.no_grad()
def score_frames(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, window_batch: int = 4096) -> SegmentScores:
    """``frames`` scorer: each window through the model on its own frames."""
    x, mask = _check_inputs(x, mask)
    B, T, D = x.shape
    S = num_segments(T)
    pad = S * SEGMENT_FRAMES - T
    xw = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(B * S, SEGMENT_FRAMES, D)  # (B*S, 5, D)
    mw = torch.nn.functional.pad(mask, (0, pad)).reshape(B * S, SEGMENT_FRAMES)  # (B*S, 5)
    valid = mw.any(dim=1)  # (B*S,)
    rows = torch.nonzero(valid).squeeze(1)
    out: torch.Tensor | None = None
    for i in range(0, rows.numel(), window_batch):
        r = rows[i:i + window_batch]
        p = torch.sigmoid(model(xw[r], mw[r]).float())  # (n, K)
        if out is None:
            out = torch.zeros(B * S, p.shape[1], device=x.device)
        out[r] = p
    assert out is not None  # every video has a frame (_check_inputs)
    return SegmentScores(out.reshape(B, S, -1), valid.reshape(B, S), segment_starts(T))  # (B, S, K)


@torch.no_grad()
def score_context(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> SegmentScores:
    """``context`` scorer (module docstring): video probability x relative attention density, max-normalized."""
    x, mask = _check_inputs(x, mask)
    B, T, D = x.shape
    feats, fmask = model.forward_features(x, mask)  # (B, T', C), (B, T')
    p = torch.sigmoid(model.forward_head(feats, fmask).float())  # (B, K)
    K = p.shape[1]
    S = num_segments(T)
    lengths = mask.sum(dim=1)  # (B,)
    valid = torch.arange(S, device=x.device).unsqueeze(0) * SEGMENT_FRAMES < lengths.unsqueeze(1)  # (B, S)
    head = getattr(model, "head", None)
    if head is None or isinstance(head, MeanPoolHead) or not hasattr(head, "attention"):
        scores = p.unsqueeze(1).expand(B, S, K) * valid.unsqueeze(-1)  # (B, S, K)
        return SegmentScores(scores.contiguous(), valid, segment_starts(T))
    T_out = feats.shape[1]
    stride = time_stride(model.backbone)
    if -(-T // stride) != T_out:
        raise SegmentError(f"backbone maps {T} frames to {T_out} steps, not ceil(T / {stride}): cannot map its "
                           f"output steps back to frames")
    attn = head.attention(feats, fmask).float()  # (B, K, T')
    W = step_segment_weights(lengths, T, T_out, stride)  # (B, T', S)
    mass = attn @ W  # (B, K, S)
    frames = torch.clamp(lengths.unsqueeze(1) - torch.arange(S, device=x.device) * SEGMENT_FRAMES, 0,
                         SEGMENT_FRAMES)  # (B, S) valid frames per segment
    share = frames.float() / lengths.unsqueeze(1).float()  # (B, S)
    density = (mass / share.clamp_min(1e-12).unsqueeze(1)) * valid.unsqueeze(1)  # (B, K, S)
    peak = density.amax(dim=-1, keepdim=True)  # (B, K, 1)
    rel = torch.where(peak > 0, density / peak.clamp_min(torch.finfo(density.dtype).tiny),
                      valid.unsqueeze(1).float())  # (B, K, S)
    scores = (p.unsqueeze(-1) * rel).transpose(1, 2)  # (B, S, K)
    return SegmentScores(scores.contiguous(), valid, segment_starts(T))


def score_segments(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                   scorer: str = DEFAULT_SCORER) -> SegmentScores:
    """Scores of every window of every video in the batch with the chosen scorer (see the module docstring)."""
    if scorer == "frames":
        return score_frames(model, x, mask)
    if scorer == "context":
        return score_context(model, x, mask)
    raise SegmentError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")


def top_classes(scores: SegmentScores, top_k: int, classes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` best classes of every window: (values (B, S, k), class ids (B, S, k)), best first.
    ``classes`` (C,) restricts the choice to those class ids. Ties: ``torch.topk`` order."""
    s = scores.scores
    ids = None
    if classes is not None:
        ids = classes.to(s.device)
        s = s.index_select(-1, ids)
    k = min(int(top_k), s.shape[-1])
    if k < 1:
        raise SegmentError(f"top_k must be >= 1, got {top_k}")
    values, idx = torch.topk(s, k, dim=-1)  # (B, S, k)
    if ids is not None:
        idx = ids[idx]
    return values, idx


def score_video_segments(model: nn.Module, x: torch.Tensor | np.ndarray, mask: torch.Tensor | None = None,
                         scorer: str = DEFAULT_SCORER, top_k: int = 20, classes: Sequence[int] | None = None
                         ) -> list:
    """Per video: ``[(start_time, class, score), ...]``, the ``top_k`` classes of each window, windows in time
    order and classes best first. ``x`` (T, D) gives one list; (B, T, D) with ``mask`` (B, T) a list of lists.
    Runs on ``x``'s device; the model must already be there and in eval mode."""
    x = torch.as_tensor(x)
    single = x.ndim == 2
    if single:
        x = x.unsqueeze(0)
        mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
    x = x.float()
    cls = None if classes is None else torch.as_tensor(np.asarray(classes, np.int64))
    with torch.no_grad():
        scored = score_segments(model, x, mask, scorer)
        values, idx = top_classes(scored, top_k, cls)
    values, idx, valid = values.cpu().numpy(), idx.cpu().numpy(), scored.valid.cpu().numpy()
    out = []
    for b in range(values.shape[0]):
        rows = []
        for s in np.flatnonzero(valid[b]):
            start = int(scored.start_times[s])
            rows.extend((start, int(c), float(v)) for c, v in zip(idx[b, s], values[b, s]))
        out.append(rows)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------------------------
# bounded per-class top lists


class TopSegmentsPerClass:
    """The ``max_per_class`` best-scored segments of each class over a stream, in O(C * max_per_class) memory.

    Every added segment carries one score per tracked class. Entries accumulate in a (C, capacity) buffer; when
    it is full each class keeps only its ``max_per_class`` best (a stable sort, so among equal scores the
    segment added first ranks first; the same rule as a full stable sort of the whole stream). Video ids live
    in a table that is pruned at every compaction to the ids still referenced, so it stays bounded too.

    Args:
        classes: class ids to track (C,), e.g. the 1000 segment-rated classes.
        max_per_class: list length per class (challenge: 100,000).
        capacity: buffer columns before a compaction (default: 2 x max_per_class, at least 1024 more).
    """

    def __init__(self, classes: Sequence[int], max_per_class: int, capacity: int | None = None):
        if max_per_class < 1:
            raise SegmentError(f"max_per_class must be >= 1, got {max_per_class}")
        self.classes = np.asarray(classes, dtype=np.int64).reshape(-1)
        if self.classes.size == 0:
            raise SegmentError("no class to track")
        if np.unique(self.classes).size != self.classes.size:
            raise SegmentError("a class id is listed twice")
        self.max_per_class = int(max_per_class)
        self.capacity = int(capacity) if capacity else self.max_per_class + max(self.max_per_class, 1024)
        if self.capacity <= self.max_per_class:
            raise SegmentError(f"capacity {self.capacity} must exceed max_per_class {self.max_per_class}")
        C = self.classes.size
        # Buffers start small and double up to ``capacity``: a small corpus never pays for 1000 x 200,000 columns.
        width = min(self.capacity, 4096)
        self._score = np.full((C, width), -np.inf, dtype=np.float32)
        self._vid = np.zeros((C, width), dtype=np.int32)  # index into self._ids
        self._start = np.zeros((C, width), dtype=np.int32)
        self._n = 0  # filled columns (the same for every class: each segment scores every class)
        self._ids: list[str] = []
        self._id_index: dict[str, int] = {}
        self.segments_seen = 0

    def _id_indices(self, video_ids: Sequence[Any]) -> np.ndarray:
        out = np.empty(len(video_ids), dtype=np.int32)
        for i, vid in enumerate(video_ids):
            vid = as_str_id(vid)
            j = self._id_index.get(vid)
            if j is None:
                j = self._id_index[vid] = len(self._ids)
                self._ids.append(vid)
            out[i] = j
        return out

    def add(self, video_ids: Sequence[Any], start_times: Any, scores: Any) -> None:
        """N segments: ``video_ids`` (N,), ``start_times`` (N,), ``scores`` (N, C) in the order of ``classes``."""
        scores = np.asarray(scores, dtype=np.float32)
        starts = np.asarray(start_times, dtype=np.int64).reshape(-1)
        N = len(video_ids)
        if scores.shape != (N, self.classes.size) or starts.shape != (N,):
            raise SegmentError(f"{N} ids, {starts.shape[0]} start times and scores {scores.shape}; expected "
                               f"scores ({N}, {self.classes.size})")
        if np.isnan(scores).any():
            raise SegmentError("segment scores contain NaN")
        self.segments_seen += N
        done = 0
        while done < N:
            width = self._score.shape[1]
            if self._n == width:
                if width < self.capacity:
                    self._grow(min(2 * width, self.capacity))
                else:
                    self._compact()
                width = self._score.shape[1]
            take = min(N - done, width - self._n)
            cols = slice(self._n, self._n + take)
            self._score[:, cols] = scores[done:done + take].T  # (C, take)
            # ids are registered after any compaction, which prunes the table to referenced ids
            self._vid[:, cols] = self._id_indices(video_ids[done:done + take])
            self._start[:, cols] = starts[done:done + take]
            self._n += take
            done += take

    def _grow(self, width: int) -> None:
        C, n = self._score.shape[0], self._n
        score = np.full((C, width), -np.inf, dtype=np.float32)
        vid, start = np.zeros((C, width), dtype=np.int32), np.zeros((C, width), dtype=np.int32)
        score[:, :n], vid[:, :n], start[:, :n] = self._score[:, :n], self._vid[:, :n], self._start[:, :n]
        self._score, self._vid, self._start = score, vid, start

    def _compact(self) -> None:
        n, m = self._n, min(self.max_per_class, self._n)
        order = np.argsort(-self._score[:, :n], axis=1, kind="stable")[:, :m]  # (C, m)
        for arr in (self._score, self._vid, self._start):
            arr[:, :m] = np.take_along_axis(arr[:, :n], order, axis=1)
        self._score[:, m:] = -np.inf
        self._n = m
        # prune the id table to the ids still referenced
        used = np.unique(self._vid[:, :m])
        remap = np.zeros(len(self._ids), dtype=np.int32)
        remap[used] = np.arange(used.size, dtype=np.int32)
        self._vid[:, :m] = remap[self._vid[:, :m]]
        self._ids = [self._ids[i] for i in used.tolist()]
        self._id_index = {vid: i for i, vid in enumerate(self._ids)}

    def ranked_with_scores(self) -> dict[int, list[tuple[str, int, float]]]:
        """{class id: [(video id, start time, score), ...]} best first, at most ``max_per_class`` each."""
        self._compact()
        out = {}
        for row, cls in enumerate(self.classes.tolist()):
            out[cls] = [(self._ids[v], int(s), float(x)) for v, s, x in
                        zip(self._vid[row, :self._n].tolist(), self._start[row, :self._n].tolist(),
                            self._score[row, :self._n].tolist())]
        return out

    def ranked(self) -> dict[int, list[tuple[str, int]]]:
        """{class id: [(video id, start time), ...]} best first: the input of ``write_segment_submission``."""
        return {c: [(v, s) for v, s, _ in rows] for c, rows in self.ranked_with_scores().items()}

    @property
    def nbytes(self) -> int:
        return self._score.nbytes + self._vid.nbytes + self._start.nbytes


# ---------------------------------------------------------------------------------------------------------------
# rated segments: fine-tuning examples and validation


@dataclass
class SegmentExamples:
    """One training example per rated (video, segment): its window of frames and the ratings as targets.

    x: (N, 5, D) frames (zero after a partial window's end), mask (N, 5), targets (N, K) 1/0 at rated classes,
    ignore (N, K) True at unrated classes (the loss must skip them), ids / start_times (N,), and
    ``dropped``: ratings whose start time lies outside the video's frames (at or past its last frame): counted,
    not trained on (they stay in the shards, where the segment MAP counts them as unhittable positives).
    """

    x: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    ignore: torch.Tensor
    ids: list
    start_times: list
    dropped: int = 0


def segment_training_examples(batch: Mapping[str, Any], num_classes: int) -> SegmentExamples:
    """Rated segments of a ``model.data.video`` batch (``segment_labels=True``) as 5-frame examples."""
    x, mask = batch["x"], batch["mask"]
    B, T, D = x.shape
    lengths = mask.sum(dim=1).tolist()
    windows: dict[tuple[int, int], dict[int, float]] = {}
    dropped = 0
    for b in range(B):
        starts = np.asarray(batch["segment_start_times"][b]).reshape(-1)
        labels = np.asarray(batch["segment_labels"][b]).reshape(-1)
        rates = np.asarray(batch["segment_scores"][b]).reshape(-1)
        for start, cls, rate in zip(starts.tolist(), labels.tolist(), rates.tolist()):
            if start >= lengths[b] or start < 0:
                dropped += 1
                continue
            if not 0 <= cls < num_classes:
                raise SegmentError(f"video {batch['ids'][b]!r}: segment label {cls} outside [0, {num_classes})")
            windows.setdefault((b, int(start)), {})[int(cls)] = float(rate)
    N = len(windows)
    xs = torch.zeros(N, SEGMENT_FRAMES, D, dtype=x.dtype, device=x.device)
    ms = torch.zeros(N, SEGMENT_FRAMES, dtype=torch.bool, device=x.device)
    targets = torch.zeros(N, num_classes)
    ignore = torch.ones(N, num_classes, dtype=torch.bool)
    ids, starts_out = [], []
    for n, ((b, start), rated) in enumerate(windows.items()):
        end = min(start + SEGMENT_FRAMES, int(lengths[b]))
        xs[n, :end - start] = x[b, start:end]
        ms[n, :end - start] = True
        cls = torch.tensor(list(rated), dtype=torch.long)
        targets[n, cls] = torch.tensor(list(rated.values()))
        ignore[n, cls] = False
        ids.append(batch["ids"][b])
        starts_out.append(start)
    return SegmentExamples(xs, ms, targets.to(x.device), ignore.to(x.device), ids, starts_out, dropped)


# One code path for the segment MAP of a model: ``model.evaluate --segments`` and the validation that picks
# ``best.pt`` in ``model.train_video --segment-labels`` both call ``rated_segment_map`` with the ratings read from
# the shards, so they give the same number for the same checkpoint (tests/test_train_video.py).


def read_segment_ratings(data: str) -> SegmentRatings:
    """Every segment rating of the shards under ``data`` (only the id and segment columns are read), also those
    that start past their video's last frame: the metric counts them (see ``segment_map_report``).
    Raises ``DataError`` when a shard has no segment columns."""
    from model.data.video import DataError
    from pipeline import shards as shard_io

    ratings = SegmentRatings()
    for path in shard_io.list_shards(str(data)):
        if not shard_io.read_shard_info(path).has_segments:
            raise DataError(f"{path} has no segment columns: segment MAP needs segment-rated data "
                            f"(e.g. the 2019 validate split)")
        cols = ["id", "segment_start_times", "segment_labels", "segment_scores"]
        for batch in shard_io.iter_batches(path, columns=cols):
            d = batch.to_pydict()
            for vid, starts, labels, scores in zip(d["id"], d["segment_start_times"], d["segment_labels"],
                                                   d["segment_scores"]):
                ratings.add_video(vid, starts or [], labels or [], scores or [])
    return ratings


def rated_classes(data: str) -> np.ndarray:
    """Ascending ids of the classes that carry at least one segment rating in the shards under ``data``
    (positive or negative); empty when no shard has segment columns (test data, video-level data)."""
    from pipeline import shards as shard_io

    found: set[int] = set()
    for path in shard_io.list_shards(str(data)):
        if not shard_io.read_shard_info(path).has_segments:
            continue
        for batch in shard_io.iter_batches(path, columns=["segment_labels"]):
            found.update(int(c) for c in batch.column("segment_labels").flatten().to_pylist())
    return np.array(sorted(found), dtype=np.int64)


def ratings_from_loader(loader: Iterable[Mapping[str, Any]]) -> SegmentRatings:
    """The ratings a loader made with ``segment_labels=True`` carries, all of them (a pass over the data)."""
    ratings = SegmentRatings()
    for batch in loader:
        if "segment_labels" not in batch:
            raise SegmentError("the loader yields no segment ratings (make it with segment_labels=True)")
        for b, vid in enumerate(batch["ids"]):
            ratings.add_video(vid, batch["segment_start_times"][b], batch["segment_labels"][b],
                              batch["segment_scores"][b])
    return ratings


@torch.no_grad()
def rank_segments(model: nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device,
                  classes: Sequence[int], k: int, scorer: str = DEFAULT_SCORER
                  ) -> tuple[dict[int, list[tuple[str, int]]], int]:
    """Per class of ``classes``, its ``k`` best windows over every window of every video of ``loader`` (what a
    submission holds): ``({class: [(video id, start)]}, windows ranked)``. Ties: loader order. Runs the model
    as it is (call ``model.eval()`` first) under the device's autocast."""
    from model.engine.device import autocast

    classes = np.asarray(classes, dtype=np.int64)
    top = TopSegmentsPerClass(classes, k)
    index = torch.as_tensor(classes, device=device)
    for batch in loader:
        x = batch["x"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        with autocast(device):
            scored = score_segments(model, x, mask, scorer)
        if int(classes.max()) >= scored.scores.shape[-1]:
            raise SegmentError(f"class {int(classes.max())} is outside the model's {scored.scores.shape[-1]} "
                               f"classes")
        b_idx, s_idx = np.nonzero(scored.valid.cpu().numpy())  # valid windows in (video, time) order
        sel = scored.scores.index_select(-1, index).float().cpu().numpy()[b_idx, s_idx]  # (n, C)
        top.add([batch["ids"][b] for b in b_idx.tolist()], scored.start_times[s_idx], sel)
    return top.ranked(), top.segments_seen


def rated_segment_map(model: nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device,
                      scorer: str = DEFAULT_SCORER, k: int = SEGMENT_TOP_K, ratings: SegmentRatings | None = None,
                      classes: Sequence[int] | None = None) -> SegmentMapReport:
    """Segment MAP@k of a model exactly as the 2019 challenge scores a submission built from it.

    Every window of every video of ``loader`` is ranked per class (``rank_segments``: the ``k`` best per class,
    rated or not, so the cut at k applies as in a submission), then ``segment_map_report`` scores the ranking
    against ``ratings``: unrated windows are dropped, positive ratings that no window can hit (a segment starting
    past its video's last frame, or past the loader's ``max_frames``) still count in the denominators, and only
    submitted classes with a positive rating enter the mean.

    Args:
        ratings: the ground truth; default: every rating the loader's batches carry (one extra pass; the loader
            must be made with ``segment_labels=True``). ``model.evaluate`` and ``model.train_video`` pass the
            ratings of the shards (``read_segment_ratings``), which are the same set.
        classes: classes to rank (the submission's classes); default: every rated class of ``ratings``.
    The model is put in eval mode for the ranking and its mode restored after.
    ``report.windows`` counts the windows ranked.
    """
    if ratings is None:
        ratings = ratings_from_loader(loader)
    classes = np.array(sorted(ratings) if classes is None else classes, dtype=np.int64).reshape(-1)
    if classes.size == 0:
        return segment_map_report({}, ratings, k)
    was_training = model.training
    model.eval()
    try:
        submission, windows = rank_segments(model, loader, device, classes, k, scorer)
    finally:
        model.train(was_training)
    report = segment_map_report(submission, ratings, k)
    report.windows = windows
    return report


# ---------------------------------------------------------------------------------------------------------------
# class lists


def read_class_ids(path: str) -> np.ndarray:
    """Class ids of a ``segment_label_ids.csv``-style file: an optional ``Index`` header, one id per line.
    Blank lines are skipped; anything else that is not a non-negative integer, or a repeated id, raises."""
    ids: list[int] = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            text = line.strip().split(",")[0].strip()
            if not text or (number == 1 and text.lower() == "index"):
                continue
            try:
                value = int(text)
            except ValueError:
                raise SegmentError(f"{path}:{number}: class id {text!r} is not an integer") from None
            if value < 0:
                raise SegmentError(f"{path}:{number}: class id {value} is negative")
            ids.append(value)
    if not ids:
        raise SegmentError(f"{path} lists no class id")
    if len(set(ids)) != len(ids):
        raise SegmentError(f"{path} lists a class id twice")
    return np.asarray(ids, dtype=np.int64)
