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
from model.engine.checkpoint import CheckpointError
from model.metrics.video import VideoMetrics
from model.engine.submission import recompute_gap_from_csv
from model.networks.video_model import CMA_FLAG_DEFAULTS
from pipeline.shards import iter_videos

from conftest import prepare_planted_splits

REPO = Path(__file__).resolve().parents[1]
TINY = ["--optimizer", "adam", "--lr", "3e-3", "--batch-size", "16", "--workers", "0", "--device", "cpu",
        "--num-classes", "3862", "--asge-epochs", "30", "--shuffle-buffer", "64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Train/validate splits: 64 + 24 synthetic videos through the real Beam job, whitened to 32 dims."""
    return prepare_planted_splits(tmp_path_factory.mktemp("tv"), 64, 2)


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
    from model.data.video import make_loader
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
        _train(data, run, "--epochs", "2", "--cma-attention", "relu", "--cma-scale", "5", "--finetune-label-emb",
               "--label-emb", "random", "--resume")


def _one_epoch_before_the_cma_flags(data: Path, run: Path, *flags: str) -> None:
    """A 1-epoch run whose last.pt lacks the CMA flags, as checkpoints written before them do."""
    _train(data, run, "--epochs", "1", *flags)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for key in CMA_FLAG_DEFAULTS:
        del ckpt["args"][key]
    torch.save(ckpt, run / "last.pt")


def test_checkpoint_from_before_the_cma_flags_resumes(data, tmp_path):
    run = tmp_path / "run"
    _one_epoch_before_the_cma_flags(data, run, "--head", "mean", "--backbone", "fc")
    resumed = _train(data, run, "--epochs", "2", "--head", "mean", "--backbone", "fc", "--resume")
    assert resumed["epoch"] == 1


def test_cma_checkpoint_from_before_the_cma_flags_is_eq7_not_the_new_softmax_default(data, tmp_path):
    run = tmp_path / "run"
    _one_epoch_before_the_cma_flags(data, run, "--cma-attention", "relu", "--label-emb", "random")
    model, _ = evaluate.load_model(str(run / "last.pt"), torch.device("cpu"))
    assert model.head.attention_kind == "relu"
    with pytest.raises(CheckpointError, match="cma-attention"):  # today's default would change the model
        _train(data, run, "--epochs", "2", "--label-emb", "random", "--resume")
    resumed = _train(data, run, "--epochs", "2", "--cma-attention", "relu", "--label-emb", "random", "--resume")
    assert resumed["epoch"] == 1


def test_self_attn_checkpoint_from_before_the_single_map_head_resumes_and_inits(data, tmp_path, capsys):
    """A run saved when 'self-attn' named the per-class head continues with it under --head self-attn."""
    run = tmp_path / "run"
    _train(data, run, "--epochs", "1", "--head", "self-attn-per-class", "--width", "16")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["args"]["head"] = "self-attn"  # as written before the rename
    torch.save(ckpt, run / "last.pt")
    resumed = _train(data, run, "--epochs", "2", "--head", "self-attn", "--width", "16", "--resume")
    assert resumed["epoch"] == 1 and "self-attn-per-class" in capsys.readouterr().err
    assert torch.load(run / "last.pt", weights_only=True)["args"]["head"] == "self-attn-per-class"
    torch.save(ckpt, run / "old.pt")
    _train(data, tmp_path / "init", "--epochs", "1", "--head", "self-attn", "--width", "16",
           "--init", str(run / "old.pt"), "--lr", "0")
    model, a = evaluate.load_model(str(tmp_path / "init/last.pt"), torch.device("cpu"))
    assert a["head"] == "self-attn-per-class" and model.head.attn_conv.weight.shape == (3862, 16)
    for name, p in model.named_parameters():  # lr 0: the --init weights
        torch.testing.assert_close(p.detach(), ckpt["model"][name], msg=name)


def test_segment_validation_picks_best_pt_by_the_number_evaluate_reports(tmp_path):
    """--segment-labels validation and `model.evaluate --segments` go through one code path: the best epoch's
    val_segment_map in metrics.json is the segment MAP evaluate gives for best.pt (ratings past a video's last
    frame included, every window ranked)."""
    from model.engine.segments import read_segment_ratings
    from shard_factory import write_random_shards

    data = write_random_shards(tmp_path / "seg", num_videos=24, num_shards=2, with_segments=True, num_classes=20,
                               frames=(5, 30), seed=34, ratings_past_end=True)
    past = sum(int((v.segment_start_times >= v.num_frames).sum()) for v in data.videos.values()
               if v.segment_start_times is not None)
    assert past > 0
    common = ["--batch-size", "8", "--workers", "0", "--device", "cpu"]
    train_video.main(train_video.get_args_parser().parse_args(
        ["--train", str(tmp_path / "seg"), "--val", str(tmp_path / "seg"), "--out", str(tmp_path / "run"),
         "--segment-labels", "--head", "self-attn", "--width", "16", "--num-classes", "20", "--optimizer", "adam",
         "--lr", "1e-2", "--epochs", "3", "--shuffle-buffer", "8"] + common))
    epochs = json.loads((tmp_path / "run/metrics.json").read_text())["epochs"]
    values = [e["val_segment_map"] for e in epochs]
    best = values.index(max(values))  # best.pt is rewritten only on a strict improvement
    assert torch.load(tmp_path / "run/best.pt", weights_only=True)["epoch"] == best
    r = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--segments", "--checkpoint", str(tmp_path / "run/best.pt"), "--data", str(tmp_path / "seg"),
         "--out", str(tmp_path / "eval.json")] + common))
    assert r["segment_map"] == pytest.approx(values[best], rel=1e-12, abs=1e-12)
    assert r["ratings"] == read_segment_ratings(str(tmp_path / "seg")).num_ratings  # past-the-end ones included
    assert epochs[best]["val_segment_classes"] == r["scored_classes"]


def test_label_prior_baseline_and_comparison_table(data, tmp_path, capsys):
    from model import compare

    result = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--prior-from", str(data / "train"), "--data", str(data / "val"), "--out", str(tmp_path / "prior.json"),
         "--write-predictions", str(tmp_path / "prior.csv")]))
    train = [v.labels for p in sorted((data / "train/shards").glob("*.parquet")) for v in iter_videos(p)]
    val = {v.id: v.labels for p in sorted((data / "val/shards").glob("*.parquet")) for v in iter_videos(p)}
    freqs = np.zeros(3862)
    for labels in train:
        freqs[np.unique(labels)] += 1 / len(train)
    y = np.zeros((len(val), 3862))
    for i, labels in enumerate(val.values()):
        y[i, labels] = 1
    ref = VideoMetrics(3862)
    ref.update(np.tile(freqs, (len(val), 1)), y)
    want = ref.compute()
    assert result["videos"] == 24 and result["prior_from"] == str(data / "train")
    for k in ("gap", "hit_at_1", "perr", "map"):
        assert result[k] == pytest.approx(want[k], abs=1e-6), k
    assert recompute_gap_from_csv(tmp_path / "prior.csv", val).gap == pytest.approx(result["gap"], abs=1e-5)
    with pytest.raises(CheckpointError, match="not both"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--prior-from", str(data / "train"), "--data", str(data / "val"), "--checkpoint", "x.pt"]))

    better = {**result, "gap": result["gap"] + 0.1}
    (tmp_path / "better.json").write_text(json.dumps(better))
    text = compare.main(compare.get_args_parser().parse_args(
        [f"label prior={tmp_path / 'prior.json'}", f"a model={tmp_path / 'better.json'}"]))
    lines = text.splitlines()
    assert lines[0].split("|")[1:6] == [" model       ", " GAP@20 ", "  Hit@1 ", "   PERR ", "    mAP "]
    assert "reference" in lines[2] and "+10.0 pts" in lines[3] and f"{100 * result['gap']:.1f}" in lines[2]
    assert any(line.startswith("GAP@20:") for line in lines) and "same 24 videos" in text
    with pytest.raises(compare.CompareError, match="NAME=FILE"):
        compare.read_result(str(tmp_path / "prior.json"))


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(data, tmp_path, capsys):
    """last.pt truncated on disk: --resume names the file, continues from last.prev.pt, and ends where an
    uninterrupted run ends."""
    full = _train(data, tmp_path / "full", "--epochs", "3")
    _train(data, tmp_path / "split", "--epochs", "2")
    last = tmp_path / "split/last.pt"
    assert torch.load(tmp_path / "split/last.prev.pt", weights_only=True)["epoch"] == 0
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    capsys.readouterr()
    resumed = _train(data, tmp_path / "split", "--epochs", "3", "--resume")
    err = capsys.readouterr().err
    assert "last.pt" in err and "previous checkpoint" in err and "last.prev.pt" in err
    assert resumed["val_gap"] == pytest.approx(full["val_gap"], rel=1e-6)
    hist = json.loads((tmp_path / "split/metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    a = torch.load(tmp_path / "full/last.pt", weights_only=True)["model"]
    b = torch.load(last, weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    # both files damaged: one error naming both
    last.write_bytes(b"not a checkpoint")
    (tmp_path / "split/last.prev.pt").write_bytes(b"")
    from model.engine.checkpoint import CheckpointError, load_latest_checkpoint

    with pytest.raises(CheckpointError, match="last.pt.*previous one.*last.prev.pt"):
        load_latest_checkpoint(last)
