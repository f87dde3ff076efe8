"""Where an image model's attention goes, measured against ground-truth boxes (the image twin of
``model.metrics.attention``).

Lift of a (image, class k) pair, for a class present in the image: the attention mass of class k inside the
union of k's boxes, divided by the share of the map those boxes cover. A map cell's coverage is the fraction of its
area inside the boxes (boxes rasterized at image resolution, then averaged over each cell), so a box smaller than
a cell still counts by its area. Uniform attention (global pooling) gives 1; attention entirely inside boxes that
cover a fraction c of the image gives 1 / c. The images must reach the model resized to a square without a crop
(``model.data.images.eval_transform``), so boxes scale linearly onto the map.

    acc = BoxAttentionLift(num_classes)
    acc.update(attn (K, h, w), boxes (N, 4) xywh pixels, box_labels (N,), width, height)
    acc.compute() -> {"lift": mean over pairs, "pairs": n, "per_class": {k: mean lift}}
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import Yt8mError


class BoxAttentionError(Yt8mError, ValueError):
    """Attention and boxes that do not fit together (shapes, class ids outside the model's)."""


def box_coverage(boxes: np.ndarray, width: int, height: int, h: int, w: int) -> torch.Tensor:
    """(h, w) fraction of each map cell's area that lies inside the union of ``boxes`` (N, 4) xywh in pixels of a
    ``width`` x ``height`` image."""
    mask = torch.zeros(1, 1, height, width)
    for x, y, bw, bh in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        x1, y1 = min(int(np.ceil(x + bw)), width), min(int(np.ceil(y + bh)), height)
        mask[..., y0:y1, x0:x1] = 1.0
    return F.adaptive_avg_pool2d(mask, (h, w))[0, 0]  # (h, w)


class BoxAttentionLift:
    """Streams per-image attention maps and boxes into the mean lift inside boxes.

    Args:
        num_classes: K of the attention maps.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.lifts: list[float] = []
        self.classes: list[int] = []

    def update(self, attn: torch.Tensor, boxes: np.ndarray, box_labels: np.ndarray, width: int, height: int) -> None:
        K, h, w = attn.shape
        if K != self.num_classes:
            raise BoxAttentionError(f"attention has {K} classes, expected {self.num_classes}")
        box_labels = np.asarray(box_labels, dtype=np.int64)
        if box_labels.size and (box_labels.min() < 0 or box_labels.max() >= K):
            raise BoxAttentionError(f"box class {box_labels.max()} outside the model's {K} classes")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for k in np.unique(box_labels):
            cover = box_coverage(boxes[box_labels == k], width, height, h, w)
            share = float(cover.mean())
            if share <= 0.0 or share >= 1.0:  # an empty box, or boxes over the whole image: no lift defined
                continue
            a = attn[k].float().cpu()
            self.lifts.append(float((a * cover).sum() / a.sum().clamp_min(1e-12)) / share)
            self.classes.append(int(k))

    def merge(self, other: "BoxAttentionLift") -> None:
        self.lifts += other.lifts
        self.classes += other.classes

    def compute(self) -> dict:
        per_class: dict[int, list[float]] = {}
        for k, v in zip(self.classes, self.lifts):
            per_class.setdefault(k, []).append(v)
        return {"lift": float(np.mean(self.lifts)) if self.lifts else float("nan"), "pairs": len(self.lifts),
                "per_class": {k: float(np.mean(v)) for k, v in sorted(per_class.items())}}
