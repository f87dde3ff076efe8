"""Data-parallel training (torchrun, gloo on CPU) equals one process; global batches do not depend on readers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

from model.data.global_batches import GlobalBatchVideos, batch_counts, interleave_streams, join_batches
from model.data.video import DataError, collate_videos
from model.engine.distributed import CrossRankBatchNorm, convert_sync_batch_norm
from model.metrics.video import MetricsError, VideoMetrics
from model.networks.video_backbones import MaskedBatchNorm1d

from conftest import prepare_planted_splits

REPO = Path(__file__).resolve().parents[1]
SIZES = (7, 31, 22)  # uneven shards: 60 training videos


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """60 training videos re-cut into 3 uneven shards of 5-video row groups, and 24 validation videos."""
    root = prepare_planted_splits(tmp_path_factory.mktemp("ddp"), sum(SIZES), 1, train_out="one")
    table = pq.read_table(next((root / "one/shards").glob("*.parquet")))
    (root / "train").mkdir()
    start = 0
    for i, n in enumerate(SIZES):
        pq.write_table(table.slice(start, n), root / f"train/part-{i}.parquet", row_group_size=5,
                       write_page_checksum=True)
        start += n
    return root


def test_interleave_and_batch_counts_by_hand():
    # streams of 3, 1 and 2 videos: rounds (0, 1, 2), (0, 2), (0,) -> 0 1 2 0 2 0
    assert interleave_streams([3, 1, 2]).tolist() == [0, 1, 2, 0, 2, 0]
    assert batch_counts([3, 1, 2], 2).tolist() == [[1, 1, 0], [1, 0, 1], [1, 0, 1]]
    assert batch_counts([3, 1, 2], 4).tolist() == [[2, 1, 1], [1, 0, 1]]  # last batch smaller
    assert batch_counts([0, 0], 4).shape == (0, 2)


def _epoch(path, readers: int, streams: int, epoch: int = 0, batch: int = 8) -> list[list[set]]:
    """Per step, each reader's set of video ids (readers played by rank/world_size, one worker each)."""
    per_reader = []
    for r in range(readers):
        ds = GlobalBatchVideos(path, batch_size=batch, num_streams=streams, features=("rgb",), shuffle_buffer=16,
                               seed=3, rank=r, world_size=readers)
        ds.set_epoch(epoch)
        per_reader.append([set(b["ids"]) for b in ds])
    assert len({len(steps) for steps in per_reader}) == 1, "every reader yields one share per step"
    return [list(step) for step in zip(*per_reader)]


@pytest.mark.parametrize("readers", [2, 3, 4])
def test_global_batches_do_not_depend_on_the_number_of_readers(data, readers):
    one = _epoch(data / "train", 1, streams=4)
    many = _epoch(data / "train", readers, streams=4)
    assert len(one) == len(many) == 8  # ceil(60 / 8) steps on every reader
    assert [s[0] for s in one] == [set().union(*step) for step in many]
    ids = [i for step in many for share in step for i in share]
    assert len(ids) == len(set(ids)) == sum(SIZES)  # every video once, none dropped or repeated
    assert all(len(set().union(*step)) == 8 for step in many[:-1]) and len(set().union(*many[-1])) == 4


def test_batches_follow_seed_epoch_and_streams(data):
    base = _epoch(data / "train", 1, streams=4)
    assert _epoch(data / "train", 1, streams=4, epoch=1) != base
    assert _epoch(data / "train", 1, streams=2) != base
    # three shards on two streams: whole shards are dealt (7 + 22 videos against 31, or similar), still once each
    uneven = _epoch(data / "train", 2, streams=2)
    assert sorted(i for step in uneven for share in step for i in share) == sorted(
        i for step in base for share in step for i in share)


def test_more_readers_than_streams_is_an_error(data):
    ds = GlobalBatchVideos(data / "train", batch_size=8, num_streams=2, features=("rgb",), rank=0, world_size=3)
    with pytest.raises(DataError, match="raise --data-streams to at least 3"):
        next(iter(ds))


def test_join_batches_pads_to_the_longest_and_skips_empty_shares():
    def item(vid, t):
        return {"id": vid, "x": np.full((t, 3), 1.0, np.float16), "labels": np.eye(4, dtype=np.float32)[t % 4],
                "num_frames": t}

    a, b = collate_videos([item("a", 2)]), collate_videos([item("b", 5), item("c", 1)])
    empty = {k: (v[:0] if torch.is_tensor(v) else []) for k, v in a.items()}
    joined = join_batches([a, empty, b])
    assert joined["ids"] == ["a", "b", "c"] and joined["x"].shape == (3, 5, 3)
    assert joined["mask"].sum(dim=1).tolist() == [2, 5, 1]
    assert joined["x"][0, 2:].abs().sum() == 0  # padding stays zero


def test_video_metrics_merge_equals_one_accumulator():
    rng = np.random.default_rng(0)
    scores, labels = rng.random((90, 12)), rng.random((90, 12)) < 0.2
    whole = VideoMetrics(12, top_k=5).update(scores, labels).compute()
    merged = VideoMetrics(12, top_k=5)
    for part in np.array_split(np.arange(90), 3):
        merged.merge(VideoMetrics(12, top_k=5, exact_limit=None).update(scores[part], labels[part]))
    got = merged.compute()
    for k in ("gap", "map", "hit_at_1", "perr", "num_videos", "num_positives"):
        assert got[k] == pytest.approx(whole[k], rel=1e-12), k
    bounded = VideoMetrics(12, top_k=5, exact_limit=0).update(scores, labels)
    with pytest.raises(MetricsError, match="exact_limit=None"):
        VideoMetrics(12, top_k=5).merge(bounded)
    with pytest.raises(MetricsError, match="cannot merge"):
        VideoMetrics(12, top_k=3).merge(VideoMetrics(12, top_k=5, exact_limit=None))


def test_convert_sync_batch_norm_keeps_the_mask():
    net = nn.Sequential(nn.Conv1d(3, 4, 1), MaskedBatchNorm1d(4), nn.Sequential(nn.BatchNorm2d(4)))
    keys = set(net.state_dict())
    convert_sync_batch_norm(net)
    assert type(net[1]) is MaskedBatchNorm1d and net[1].synchronized
    # on CPU (DDP refuses torch's SyncBatchNorm there) the project's own, with the same checkpoint keys
    assert isinstance(net[2][0], CrossRankBatchNorm) and set(net.state_dict()) == keys
    # torch's own converter drops the mask: the reason the project has its own
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(MaskedBatchNorm1d(4)))
    assert type(plain[0]) is nn.SyncBatchNorm


FLAGS = ["--optimizer", "sgd", "--lr", "0.05", "--batch-size", "16", "--device", "cpu", "--asge-epochs", "30",
         "--shuffle-buffer", "32", "--epochs", "2", "--width", "32", "--num-classes", "3862"]


def _run(data: Path, out: Path, procs: int, *extra: str, timeout: float = 300) -> dict:
    argv = ["-m", "model.train_video", "--train", str(data / "train"), "--val", str(data / "val"), "--out",
            str(out), *FLAGS, *extra]
    if procs > 1:
        # --standalone: a free local port per run; a short collective timeout turns a hang into a failure
        argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *argv,
                "--dist-timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_train_the_same_model_as_one(data, tmp_path):
    """3 uneven shards (7, 31, 22 videos) on 2 ranks with one data stream each (rank 0 reads two shards, rank 1
    one); the 2-process run stops after epoch 0 and resumes to epoch 1. It must match one process's 2 epochs."""
    streams = ["--workers", "0", "--data-streams", "2"]
    one = _run(data, tmp_path / "one", 1, *streams)
    first = _run(data, tmp_path / "two", 2, *streams, "--epochs", "1")
    two = _run(data, tmp_path / "two", 2, *streams, "--resume")
    assert two["epochs"][:1] == first["epochs"]
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert b["train_samples"] == a["train_samples"] == sum(SIZES)  # every video once per epoch
        assert b["step"] == a["step"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        for k in ("val_gap", "val_map", "val_hit_at_1", "val_perr"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), k
    # The same global batches summed in another order: float rounding only (measured 2.4e-7 with SGD; Adam's
    # per-parameter normalization magnifies such rounding in parameters whose gradients are near zero).
    wa = torch.load(tmp_path / "one/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two/last.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    # only rank 0 wrote: one TensorBoard event file per invocation, the usual files
    assert len(list((tmp_path / "two/tb").glob("events.*"))) == 2
    assert ({p.name for p in (tmp_path / "two").iterdir()} - {"last.prev.pt"}
            == {p.name for p in (tmp_path / "one").iterdir()} - {"last.prev.pt"})


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    from pipeline.synthetic_coco import generate

    root = tmp_path_factory.mktemp("ddp_coco") / "sc"
    generate(root, train_images=22, val_images=10, size=96, seed=3, fmt="jpeg")
    return root


def _run_image(coco: Path, out: Path, procs: int) -> dict:
    ann = coco / "annotations"
    argv = ["-m", "model.train_image", "--train-ann", str(ann / "instances_train.json"), "--train-images",
            str(coco / "train"), "--val-ann", str(ann / "instances_val.json"), "--val-images", str(coco / "val"),
            "--out", str(out), "--workers", "0", "--device", "cpu", "--asge-epochs", "20", "--image-size", "48",
            "--batch-size", "8", "--epochs", "2", "--lr", "0.01", "--freeze-backbone"]
    if procs > 1:
        argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *argv,
                "--dist-timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_train_the_same_image_model_as_one(coco, tmp_path):
    """22 images, global batch 8 on 2 ranks (the last step has 3 images per rank); frozen backbone, so the heads'
    masked batch norms are the synchronized ones. Measured: 1.2e-7 largest weight difference."""
    one, two = _run_image(coco, tmp_path / "one", 1), _run_image(coco, tmp_path / "two", 2)
    for a, b in zip(one["epochs"], two["epochs"]):
        assert b["train_images"] == a["train_images"] == 22 and b["step"] == a["step"] == 3 * (a["epoch"] + 1)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        for k in ("val_map", "val_cf1", "val_of1"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), k
    wa = torch.load(tmp_path / "one/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two/last.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_synchronized_batch_norm_gives_one_process_gradients_through_a_trainable_backbone(tmp_path):
    """Float64, so that only a wrong formula could differ: EfficientNet-Lite0's backward through ~50 batch norms on
    small maps magnifies float32 rounding to ~0.3% (median, one process float32 against float64), which is why
    the end-to-end comparisons above freeze the backbone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "tests/ddp_image_grads.py")
    for procs, out in ((1, "one.pt"), (2, "two.pt")):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if procs > 1 else []
        done = subprocess.run([sys.executable, *launch, script, str(tmp_path / out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and len(one) > 100
    for k in one:
        if k.endswith("_bn2.bias") or k.endswith("norms.0.bias"):
            continue  # followed by a linear map and another batch norm: analytically zero, numerically noise
        scale = one[k].abs().max().item()
        assert (two[k] - one[k]).abs().max().item() <= 1e-6 * scale + 1e-12, k
