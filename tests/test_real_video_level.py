"""The whole chain on genuine YouTube-8M video-level data: preprocess both real shards with default flags, train on
one (243 videos), evaluate on the other (251 videos). One time step per video, 1152-d (rgb + audio), 3862 classes.

The bar is the simplest honest baseline computed here on the same split: a scikit-learn logistic regression per
class on the raw dequantized mean_rgb + mean_audio (0.3155 GAP when measured), and the training label prior."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REAL_DATA
from model import evaluate, train_video
from model.metrics.video import VideoMetrics
from pipeline.shards import iter_videos, list_shards

NUM_CLASSES = 3862


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from beam_jobs import preprocess

    root = tmp_path_factory.mktemp("real")
    common = ["--level", "video", "--features", "rgb,audio", "--direct_num_workers", "1"]
    preprocess.run(["--input", str(REAL_DATA / "validate0067.tfrecord"), "--output", str(root / "train")] + common)
    preprocess.run(["--input", str(REAL_DATA / "validate0076.tfrecord"), "--output", str(root / "eval"),
                    "--whitening", str(root / "train/whitening.npz")] + common)
    return root


def raw_split(name: str):
    """(X (N, 1152) raw dequantized means, label lists) of one real shard, straight from the TFRecords."""
    from pipeline.records import decode_example
    from pipeline.tfrecord import read_records

    recs = [decode_example(b) for _, b in read_records(str(REAL_DATA / name))]
    x = np.concatenate([np.concatenate([r.features("rgb"), r.features("audio")], axis=1) for r in recs])
    return x, [r.labels for r in recs]


def logistic_regression_gap(train, heldout) -> float:
    """GAP of one scikit-learn LogisticRegression (C=1) per class with >= 2 training positives; other classes
    score lowest."""
    from sklearn.linear_model import LogisticRegression

    (x_tr, y_tr), (x_te, y_te) = train, heldout
    counts = np.bincount(np.concatenate(y_tr), minlength=NUM_CLASSES)
    scores = np.full((len(x_te), NUM_CLASSES), -1.0)
    for c in np.flatnonzero(counts >= 2):
        target = np.array([c in labels for labels in y_tr])
        scores[:, c] = LogisticRegression(C=1.0, max_iter=1000).fit(x_tr, target).predict_proba(x_te)[:, 1]
    m = VideoMetrics(NUM_CLASSES)
    m.update(scores, y_te)
    return m.compute()["gap"]


def prior_gap(train_labels, heldout_labels) -> float:
    freq = np.bincount(np.concatenate(train_labels), minlength=NUM_CLASSES).astype(np.float64)
    m = VideoMetrics(NUM_CLASSES)
    m.update(np.tile(freq / freq.max(), (len(heldout_labels), 1)), heldout_labels)
    return m.compute()["gap"]


def test_preprocessing_keeps_only_spanned_directions_and_says_so(real):
    summary = json.loads((real / "train/summary.json").read_text())
    kept = summary["whitening"]["components"]
    assert kept["rgb"]["requested"] == 1024 and kept["rgb"]["kept"] == 242  # 243 videos span 242 directions
    assert "243 frames" in kept["rgb"]["why"] and summary["whitening"]["warnings"]
    train = np.concatenate([v.features["rgb"] for v in iter_videos(str(real / "train"), features=("rgb",))])
    heldout = np.concatenate([v.features["rgb"] for v in iter_videos(str(real / "eval"), features=("rgb",))])
    assert 0.5 < heldout.std() / train.std() < 2.0  # was 37 / 0.57 before the rank rule
    assert np.abs(heldout).max() < 50.0


def test_train_on_one_real_shard_beats_logistic_regression_on_the_other(real, tmp_path):
    run = tmp_path / "run"
    argv = ["--train", str(real / "train"), "--val", str(real / "eval"), "--out", str(run),
            "--head", "mean", "--backbone", "fc", "--features", "rgb,audio", "--optimizer", "adam", "--lr", "1e-3",
            "--epochs", "30", "--batch-size", "32", "--workers", "0", "--device", "cpu", "--seed", "0"]
    train_video.main(train_video.get_args_parser().parse_args(argv))
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(run / "best.pt"), "--data", str(real / "eval"), "--workers", "0", "--device", "cpu",
         "--out", str(tmp_path / "eval.json")]))
    assert result["videos"] == 251

    train, heldout = raw_split("validate0067.tfrecord"), raw_split("validate0076.tfrecord")
    ids = [v.id for p in list_shards(str(real / "eval")) for v in iter_videos(p, features=("rgb",))]
    assert len(ids) == len(heldout[1]) == 251
    lr_gap = logistic_regression_gap(train, heldout)
    prior = prior_gap(train[1], heldout[1])
    print(f"real video-level GAP: model {result['gap']:.4f}, logistic regression {lr_gap:.4f}, "
          f"label prior {prior:.4f}")
    assert prior < lr_gap
    assert result["gap"] >= lr_gap - 0.02
