"""Where a model's attention goes, measured against rated segments (YouTube-8M Segments ratings, or the synthetic
data's planted evidence).

Two numbers, both computed from the head's video-level attention a_k (B, K, T') over backbone output steps:

* Lift of a rated (segment s, class k) pair: the attention mass of class k on segment s, M_k(s) (step weights
  spread evenly over the valid frames each step covers, as in ``model.engine.segments``), divided by the segment's share
  of the video's valid frames, n_s / T. Uniform attention (mean pooling) gives 1 everywhere. Attention that sits
  entirely on the one step holding s gives T / stride at most (SNet: one step covers 16 frames), so the ceiling
  grows with video length; compare models on the same data only. A head that localizes class k lifts the segments
  rated positive for k above 1 and leaves those rated negative at or below 1.
* Overlap of two labels i, j of the same video: sum over steps of min(a_i, a_j), 1 when they attend alike, 0 when
  their attention is disjoint. Label embeddings that tie co-occurring classes together (ASGE) raise it; where
  co-occurring classes show on different segments, a high overlap means each class's evidence is diluted by its
  neighbours'.

Public API:

    acc = AttentionStatsAccumulator(overlap_classes=None)
    acc.update(attn, num_frames, T, stride, batch); acc.compute() -> AttentionStats
    attention_stats(model, loader, device, overlap_classes=None) -> AttentionStats
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from model.engine.segments import SEGMENT_FRAMES, step_segment_weights, time_stride
from pipeline.errors import Yt8mError


class AttentionStatsError(Yt8mError, ValueError):
    """The model or the batches cannot give attention statistics (no attention, no segment ratings)."""


@dataclass
class AttentionStats:
    """positive_lift / negative_lift: mean lift over the (segment, class) ratings of 1 / of 0 (NaN when none).
    overlap: mean attention overlap over the pairs of labels present in the same video (NaN when none).
    positives, negatives, pairs: how many ratings and label pairs the means cover; skipped: ratings outside the
    video or with a class outside the model's."""
    positive_lift: float
    negative_lift: float
    overlap: float
    positives: int
    negatives: int
    pairs: int
    skipped: int


class AttentionStatsAccumulator:
    """Streams batches of attention and segment ratings into ``AttentionStats``.

    Args:
        overlap_classes: only labels in this set form the overlap pairs (all labels when None), e.g. the classes
            whose evidence is known to lie on separate segments.
    """

    def __init__(self, overlap_classes: Sequence[int] | None = None):
        self.overlap_classes = None if overlap_classes is None else {int(c) for c in overlap_classes}
        self._pos: list[float] = []
        self._neg: list[float] = []
        self._overlap_sum = 0.0
        self._pairs = 0
        self._skipped = 0

    def update(self, attn: torch.Tensor, num_frames: torch.Tensor, T: int, stride: int,
               batch: Mapping[str, Any]) -> None:
        """Add one batch.

        Args:
            attn: (B, K, T') attention over output steps, zero at padded steps.
            num_frames: (B,) valid input frames per video.
            T: padded input frames; stride: frames per output step.
            batch: ``model.data.video`` batch with ``segment_start_times``, ``segment_labels``, ``segment_scores``
                (per-video arrays) and ``labels`` (B, K) multi-hot for the overlap.
        """
        B, K, T_out = attn.shape
        attn = attn.detach().float().cpu()
        num_frames = num_frames.detach().cpu().long()
        W = step_segment_weights(num_frames, T, T_out, stride)  # (B, T', S)
        mass = (attn @ W).numpy()  # (B, K, S)
        lengths = num_frames.tolist()
        for b in range(B):
            n = lengths[b]
            starts = np.asarray(batch["segment_start_times"][b]).reshape(-1)
            classes = np.asarray(batch["segment_labels"][b]).reshape(-1)
            rates = np.asarray(batch["segment_scores"][b]).reshape(-1)
            for start, cls, rate in zip(starts.tolist(), classes.tolist(), rates.tolist()):
                if not (0 <= start < n and start % SEGMENT_FRAMES == 0 and 0 <= cls < K):
                    self._skipped += 1
                    continue
                share = min(SEGMENT_FRAMES, n - start) / n
                (self._pos if rate > 0 else self._neg).append(float(mass[b, cls, start // SEGMENT_FRAMES]) / share)
            present = torch.nonzero(batch["labels"][b] > 0).flatten().tolist()
            if self.overlap_classes is not None:
                present = [c for c in present if c in self.overlap_classes]
            if len(present) < 2:
                continue
            a = attn[b, present]  # (n, T')
            both = torch.minimum(a.unsqueeze(0), a.unsqueeze(1)).sum(dim=-1)  # (n, n)
            i, j = torch.triu_indices(len(present), len(present), offset=1)
            self._overlap_sum += float(both[i, j].sum())
            self._pairs += int(i.numel())

    def compute(self) -> AttentionStats:
        def mean(v: list[float]) -> float:
            return float(np.mean(v)) if v else float("nan")
        overlap = self._overlap_sum / self._pairs if self._pairs else float("nan")
        return AttentionStats(mean(self._pos), mean(self._neg), overlap, len(self._pos), len(self._neg),
                              self._pairs, self._skipped)


@torch.no_grad()
def attention_stats(model: nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device,
                    overlap_classes: Sequence[int] | None = None) -> AttentionStats:
    """``AttentionStats`` of a ``VideoClassifier`` (eval mode) over a loader made with ``segment_labels=True``."""
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "attention"):
        raise AttentionStatsError(f"{type(head).__name__} exposes no attention")
    stride = time_stride(model.backbone)
    acc = AttentionStatsAccumulator(overlap_classes)
    for batch in loader:
        if "segment_labels" not in batch:
            raise AttentionStatsError("the loader yields no segment ratings (make it with segment_labels=True)")
        x = batch["x"].to(device)
        mask = batch["mask"].to(device)
        feats, fmask = model.forward_features(x, mask)  # (B, T', C), (B, T')
        acc.update(head.attention(feats, fmask), mask.sum(dim=1), x.shape[1], stride, batch)
    return acc.compute()
