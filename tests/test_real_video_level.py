"""The whole chain on genuine YouTube-8M video-level data: preprocess both real shards, train on one, evaluate on
the other. One time step per video, 1152-d (rgb + audio), 3862 classes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REAL_DATA
from model import evaluate, train_video
from model.metrics import VideoMetrics
from pipeline.shards import iter_videos, list_shards


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from beam_jobs import preprocess

    root = tmp_path_factory.mktemp("real")
    common = ["--level", "video", "--features", "rgb,audio", "--direct_num_workers", "1"]
    preprocess.run(["--input", str(REAL_DATA / "validate0067.tfrecord"), "--output", str(root / "train")] + common)
    preprocess.run(["--input", str(REAL_DATA / "validate0076.tfrecord"), "--output", str(root / "eval"),
                    "--whitening", str(root / "train/whitening.npz")] + common)
    return root


def test_train_on_one_real_shard_and_evaluate_on_the_other(real, tmp_path):
    run = tmp_path / "run"
    argv = ["--train", str(real / "train"), "--val", str(real / "eval"), "--out", str(run),
            "--head", "mean", "--backbone", "fc", "--features", "rgb,audio", "--optimizer", "adam", "--lr", "1e-3",
            "--epochs", "3", "--batch-size", "32", "--workers", "0", "--device", "cpu", "--seed", "0"]
    train_video.main(train_video.get_args_parser().parse_args(argv))
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(run / "best.pt"), "--data", str(real / "eval"), "--workers", "0", "--device", "cpu",
         "--out", str(tmp_path / "eval.json")]))
    assert result["videos"] == 251
    (tmp_path / "eval.json").write_text(json.dumps(result))

    # Baselines on the same videos: random scores, and the training label prior (same list for every video).
    # With 243 training videos the prior is hard to beat on GAP; the model must clearly beat chance and get the
    # top class right far more often than chance.
    train_labels = [v.labels for p in list_shards(str(real / "train")) for v in iter_videos(p)]
    freq = np.bincount(np.concatenate(train_labels), minlength=3862).astype(np.float32)
    prior, chance = VideoMetrics(3862), VideoMetrics(3862)
    rng = np.random.default_rng(0)
    for p in list_shards(str(real / "eval")):
        vids = list(iter_videos(p))
        prior.update(np.tile(freq / freq.max(), (len(vids), 1)), [v.labels for v in vids])
        chance.update(rng.random((len(vids), 3862)), [v.labels for v in vids])
    prior, chance = prior.compute(), chance.compute()
    print(f"real video-level: model GAP {result['gap']:.4f} Hit@1 {result['hit_at_1']:.4f}; "
          f"label prior GAP {prior['gap']:.4f} Hit@1 {prior['hit_at_1']:.4f}; chance GAP {chance['gap']:.4f}")
    # Chance: about 3 labels in 3862 classes, so Hit@1 ~ 0.001 and GAP ~ 0.0001.
    assert chance["hit_at_1"] < 0.02 and chance["gap"] < 0.002
    assert result["hit_at_1"] > 0.05 and result["gap"] > 0.005
