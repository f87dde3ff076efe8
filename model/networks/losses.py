"""Class-balanced binary cross-entropy (paper, Eq. 12).

    L = - sum_k w_k [y_k log p_k + (1 - y_k) log(1 - p_k)],   p = sigmoid(logits)
    w_k = y_k exp(beta (1 - f_k)) + (1 - y_k) exp(beta f_k)

f_k is the fraction of training videos that carry label k. The paper prints the negative term as
(1 - y_k)(1 - log p_k); that is a typo for the standard BCE term used here. beta = 0 (the paper's video setting)
gives plain BCE. Computed from logits (``binary_cross_entropy_with_logits``), so saturated scores stay finite.

Reduction: sum over classes, mean over the batch. Entries flagged in ``ignore`` (B, K) contribute nothing (used
for segment fine-tuning, where only the rated class of a segment is known); the batch mean still divides by B.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import Yt8mError


class LossConfigError(Yt8mError, ValueError):
    """beta != 0 without label frequencies, or frequencies of the wrong shape or range."""


def label_frequencies(label_lists: Iterable[Sequence[int]], num_classes: int) -> np.ndarray:
    """f_k: the fraction of videos that carry label k (a label repeated within a video counts once).

    Args:
        label_lists: one int array per training video, or ``model.networks.asge.LabelSets``.
        num_classes: K.
    Returns:
        (K,) float64 in [0, 1].
    """
    from model.networks.asge import video_label_matrix  # one place that validates ids and drops in-video repeats

    x = video_label_matrix(label_lists, num_classes)
    if x.shape[0] == 0:
        raise LossConfigError("label frequencies need at least one training video")
    return np.asarray(x.sum(axis=0), dtype=np.float64).ravel() / x.shape[0]


def class_balance_weights(targets: torch.Tensor, label_freq: torch.Tensor, beta: float) -> torch.Tensor:
    """w of Eq. 12: (B, K) from multi-hot targets (B, K) and label frequencies (K,)."""
    freq = label_freq.to(targets.dtype)
    return targets * torch.exp(beta * (1.0 - freq)) + (1.0 - targets) * torch.exp(beta * freq)


def class_balanced_bce(logits: torch.Tensor, targets: torch.Tensor, label_freq: torch.Tensor | None = None,
                       beta: float = 0.0, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 12 summed over classes and averaged over the batch.

    Args:
        logits: (B, K) raw scores.
        targets: (B, K) multi-hot (float or bool).
        label_freq: (K,) f_k; required when beta != 0.
        beta: class-balance exponent.
        ignore: (B, K) bool, True where an entry must not count.
    Returns:
        scalar loss.
    """
    B, K = logits.shape
    targets = targets.to(logits.dtype)
    if targets.shape != logits.shape:
        raise LossConfigError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (B, K)
    if beta != 0.0:
        if label_freq is None:
            raise LossConfigError(f"beta = {beta} needs the label frequencies of the training set")
        per_entry = per_entry * class_balance_weights(targets, label_freq.to(logits.device), beta)
    if ignore is not None:
        if ignore.shape != logits.shape:
            raise LossConfigError(f"ignore {tuple(ignore.shape)} does not match logits {tuple(logits.shape)}")
        per_entry = per_entry.masked_fill(ignore.to(torch.bool), 0.0)
    return per_entry.sum() / B


class ClassBalancedBCE(nn.Module):
    """``class_balanced_bce`` with beta and the label frequencies bound.

    Args:
        beta: class-balance exponent (paper: 0 for video, 0 for MS-COCO, 0.4 for NUS-WIDE).
        label_freq: (K,) fraction of training videos per label; required when beta != 0.
    """

    def __init__(self, beta: float = 0.0, label_freq: np.ndarray | torch.Tensor | None = None):
        super().__init__()
        if beta != 0.0 and label_freq is None:
            raise LossConfigError(f"beta = {beta} needs the label frequencies of the training set")
        freq = None
        if label_freq is not None:
            freq = torch.as_tensor(np.asarray(label_freq), dtype=torch.float32)
            if freq.ndim != 1 or bool(((freq < 0) | (freq > 1)).any()):
                raise LossConfigError("label frequencies must be a (K,) vector in [0, 1]")
        self.beta = float(beta)
        self.register_buffer("label_freq", freq, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                ignore: torch.Tensor | None = None) -> torch.Tensor:
        return class_balanced_bce(logits, targets, self.label_freq, self.beta, ignore)
