"""The image model learns: CMA on a frozen pretrained backbone against baselines computed in the same run.

Synthetic COCO-format data (``pipeline.synthetic_coco``) through ``model.train_image --freeze-backbone
--cache-features`` with default flags except size and epochs; baselines on the same cached maps: the training
label prior (every image scored with the class frequencies) and a logistic-regression probe on the
global-average-pooled stride-32 map.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import train_image
from model.data.map_cache import MapCacheDataset, make_map_loader, read_map_cache
from model.metrics.image import ImageMetrics
from pipeline import synthetic_coco


def _pooled(cache_dir, K):
    feats, labels = [], []
    for batch in make_map_loader(MapCacheDataset(read_map_cache(cache_dir), K), 64, shuffle=False):
        feats.append(batch["maps"][1].mean(dim=(2, 3)).numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(feats), np.concatenate(labels)


def _map(probs, labels):
    m = ImageMetrics(labels.shape[1])
    m.update(probs, labels)
    return m.compute()["map"]


@pytest.mark.usefixtures("torch_one_thread")
def test_cma_beats_the_label_prior_and_a_linear_probe_on_the_same_maps(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = tmp_path / "coco"
    synthetic_coco.generate(data, train_images=320, val_images=160, size=128, seed=0, fmt="jpeg")
    run, cache = tmp_path / "run", tmp_path / "cache"
    train_image.main(train_image.get_args_parser().parse_args([
        "--train-ann", str(data / "annotations/instances_train.json"), "--train-images", str(data / "train"),
        "--val-ann", str(data / "annotations/instances_val.json"), "--val-images", str(data / "val"),
        "--out", str(run), "--freeze-backbone", "--cache-features", str(cache), "--image-size", "128",
        "--epochs", "8", "--batch-size", "32", "--workers", "0", "--asge-epochs", "60"]))
    model_map = json.loads((run / "metrics.json").read_text())["best_val_map"]

    K = 14
    xtr, ytr = _pooled(cache / "train", K)
    xva, yva = _pooled(cache / "val", K)
    prior_map = _map(np.broadcast_to(ytr.mean(axis=0), yva.shape).copy(), yva)
    scaler = StandardScaler().fit(xtr)
    probe = np.stack([LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(xtr), ytr[:, k])
                      .predict_proba(scaler.transform(xva))[:, 1] for k in range(K)], axis=1)
    probe_map = _map(probe, yva)
    print(f"\nmAP: CMA {model_map:.3f}, linear probe {probe_map:.3f}, label prior {prior_map:.3f}")
    assert model_map > prior_map + 0.3
    assert model_map >= probe_map - 0.02
