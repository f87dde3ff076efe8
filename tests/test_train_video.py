"""Training and evaluation entry points end to end on tiny preprocessed synthetic data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import evaluate, train_video
from model.checkpoint import CheckpointError
from model.metrics import VideoMetrics
from model.submission import recompute_gap_from_csv
from model.video_model import CMA_FLAG_DEFAULTS
from pipeline.shards import iter_videos

REPO = Path(__file__).resolve().parents[1]
TINY = ["--optimizer", "adam", "--lr", "3e-3", "--batch-size", "16", "--workers", "0", "--device", "cpu",
        "--num-classes", "3862", "--asge-epochs", "30", "--shuffle-buffer", "64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Train/validate splits: 64 + 24 synthetic videos through the real Beam job, whitened to 32 dims."""
    from beam_jobs import preprocess
    from pipeline import synthetic

    root = tmp_path_factory.mktemp("tv")
    synthetic.main(["--out", str(root / "raw/train"), "--videos", "64", "--shards", "2", "--seed", "11",
                    "--prefix", "train"])
    synthetic.main(["--out", str(root / "raw/val"), "--videos", "24", "--shards", "1", "--seed", "12",
                    "--prefix", "validate"])
    beam = ["--direct_num_workers", "1"]
    preprocess.run(["--input", str(root / "raw/train/*.tfrecord"), "--output", str(root / "train"),
                    "--pca-dims", "32"] + beam)
    preprocess.run(["--input", str(root / "raw/val/*.tfrecord"), "--output", str(root / "val"),
                    "--whitening", str(root / "train/whitening.npz")] + beam)
    return root


def _train(data: Path, out: Path, *extra: str) -> dict:
    argv = ["--train", str(data / "train"), "--val", str(data / "val"), "--out", str(out)] + TINY + list(extra)
    return train_video.main(train_video.get_args_parser().parse_args(argv))


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    full = _train(data, tmp_path / "full", "--epochs", "2")
    _train(data, tmp_path / "split", "--epochs", "1")
    resumed = _train(data, tmp_path / "split", "--epochs", "2", "--resume")
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
    assert resumed["val_gap"] == pytest.approx(full["val_gap"], rel=1e-6)
    a = torch.load(tmp_path / "full/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split/last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    cfg = json.loads((tmp_path / "full/config.json").read_text())
    assert cfg["head"] == "cma" and cfg["epochs"] == 2
    hist = json.loads((tmp_path / "full/metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert (tmp_path / "full/best.pt").exists() and (tmp_path / "full/label_emb.pt").exists()


def test_evaluate_matches_training_metrics_and_csv_recomputes_gap(data, tmp_path):
    run = tmp_path / "run"
    final = _train(data, run, "--epochs", "1", "--head", "mean", "--backbone", "fc")
    csv = tmp_path / "pred.csv"
    args = evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(run / "best.pt"), "--data", str(data / "val"), "--out", str(tmp_path / "m.json"),
         "--write-predictions", str(csv), "--workers", "0", "--device", "cpu"])
    result = evaluate.main(args)
    assert result["gap"] == pytest.approx(final["val_gap"], abs=1e-6)
    assert result["videos"] == 24
    labels = {v.id: v.labels for v in iter_videos(next((data / "val/shards").glob("*.parquet")))}
    for p in sorted((data / "val/shards").glob("*.parquet"))[1:]:
        labels.update({v.id: v.labels for v in iter_videos(p)})
    assert recompute_gap_from_csv(csv, labels).gap == pytest.approx(result["gap"], abs=1e-5)
    assert csv.read_text().splitlines()[0] == "VideoId,LabelConfidencePairs"


def _cli(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_user_errors_are_one_line(data, tmp_path):
    missing = _cli("model.train_video", "--train", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    run = tmp_path / "run"
    _train(data, run, "--epochs", "1", "--head", "mean", "--backbone", "fc")
    other_head = _cli("model.train_video", "--train", str(data / "train"), "--out", str(run), "--head", "cma",
                      "--backbone", "fc", "--resume", *TINY)
    assert other_head.returncode != 0 and "Traceback" not in other_head.stderr
    assert "head" in other_head.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    no_data = _cli("model.evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(empty))
    assert no_data.returncode != 0 and "Traceback" not in no_data.stderr


def test_wrong_feature_dims_are_refused(data, tmp_path):
    from beam_jobs import preprocess

    wide = tmp_path / "wide"
    preprocess.run(["--input", str(data / "raw/val/*.tfrecord"), "--output", str(wide), "--pca-dims", "16",
                    "--direct_num_workers", "1"])
    run = tmp_path / "run"
    _train(data, run, "--epochs", "1", "--head", "mean", "--backbone", "fc")
    r = _cli("model.evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(wide))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "dims" in r.stderr


def test_streaming_metrics_equal_one_shot_on_real_predictions(data, tmp_path):
    """The per-batch accumulation inside evaluate() gives the same numbers as one call on all scores."""
    run = tmp_path / "run"
    _train(data, run, "--epochs", "1", "--head", "mean", "--backbone", "fc")
    model, a = evaluate.load_model(str(run / "best.pt"), torch.device("cpu"))
    from model.data import make_loader
    loader = make_loader(str(data / "val"), batch_size=5, workers=0, features=("rgb",), num_classes=3862,
                         max_frames=300, shuffle=False, device=torch.device("cpu"))
    scores, labels, stream = [], [], VideoMetrics(3862)
    for _, s, y in evaluate.predict(model, loader, torch.device("cpu")):
        stream.update(s, y)
        scores.append(s)
        labels.append(y)
    one = VideoMetrics(3862)
    one.update(np.concatenate(scores), np.concatenate(labels))
    for k in ("gap", "hit_at_1", "perr", "map"):
        assert stream.compute()[k] == pytest.approx(one.compute()[k], abs=1e-9)


def test_cma_attention_flags_travel_with_the_checkpoint(data, tmp_path):
    """--cma-attention softmax and --finetune-label-emb are rebuilt by evaluate from the checkpoint alone."""
    run = tmp_path / "run"
    final = _train(data, run, "--epochs", "1", "--cma-attention", "softmax", "--cma-scale", "5",
                   "--finetune-label-emb", "--label-emb", "random")
    model, a = evaluate.load_model(str(run / "last.pt"), torch.device("cpu"))
    assert (model.head.attention_kind, model.head.scale) == ("softmax", 5.0)
    assert "head.label_embeddings" in dict(model.named_parameters())
    saved = torch.load(run / "last.pt", weights_only=True)["model"]["head.label_embeddings"]
    g = torch.Generator().manual_seed(0)  # --label-emb random draws with the run's seed
    assert not torch.allclose(saved, torch.randn(saved.shape, generator=g)), "embeddings were not trained"
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(run / "last.pt"), "--data", str(data / "val"), "--out", str(tmp_path / "m.json"),
         "--workers", "0", "--device", "cpu"]))
    assert result["gap"] == pytest.approx(final["val_gap"], abs=1e-6)
    with pytest.raises(CheckpointError, match="cma-attention"):
        _train(data, run, "--epochs", "2", "--finetune-label-emb", "--label-emb", "random", "--resume")


def test_checkpoint_from_before_the_cma_flags_resumes(data, tmp_path):
    run = tmp_path / "run"
    _train(data, run, "--epochs", "1", "--head", "mean", "--backbone", "fc")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for key in CMA_FLAG_DEFAULTS:
        del ckpt["args"][key]
    torch.save(ckpt, run / "last.pt")
    resumed = _train(data, run, "--epochs", "2", "--head", "mean", "--backbone", "fc", "--resume")
    assert resumed["epoch"] == 1
