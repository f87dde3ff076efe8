"""The label-prior baseline: every video scored with the training split's label frequencies, whatever it shows.

It knows which classes are common and nothing about any video, so a model that does not beat it on GAP, Hit@1
and mAP has not learned from the frames (``model.evaluate --prior-from TRAIN_DATA``; the demo prints it beside
its models).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from model.networks.asge import read_training_labels
from model.data.video import DataError
from model.networks.losses import label_frequencies
from pipeline import shards


def label_prior(train: str, num_classes: int) -> np.ndarray:
    """(K,) float32: the fraction of the training videos at ``train`` that carry each class."""
    return label_frequencies(read_training_labels(train), num_classes).astype(np.float32)


def predict_prior(prior: np.ndarray, data: str) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """Like ``model.evaluate.predict``: (ids, scores (B, K), multi-hot labels (B, K)) per shard batch of ``data``,
    every row of scores equal to ``prior``. Reads only the id and labels columns."""
    K = prior.shape[0]
    for path in shards.list_shards(data):
        for batch in shards.iter_batches(path, features=(), columns=["id", "labels"]):
            ids = batch.column("id").to_pylist()
            labels = np.zeros((len(ids), K), np.float32)
            for i, video_labels in enumerate(batch.column("labels").to_pylist()):
                video_labels = np.asarray(video_labels or [], np.int64)
                if video_labels.size and (video_labels.min() < 0 or video_labels.max() >= K):
                    raise DataError(f"video {ids[i]} of {path} has label {int(video_labels.max())} outside the "
                                    f"{K} classes of the prior (--num-classes)")
                labels[i, video_labels] = 1.0
            yield ids, np.broadcast_to(prior, labels.shape), labels  # (B, K) view, no copy
