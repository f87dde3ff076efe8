"""Faults from outside the code: a process killed with SIGKILL, bytes flipped or cut off on disk. Each test checks
with numbers that nothing was lost or silently changed: a killed run resumes to the uninterrupted run's metrics and
weights, a killed preprocessing job re-run leaves every input video exactly once with the frames a clean whitening
gives, and a corrupt shard or checkpoint stops every entry point with one line naming the file (no traceback, no
hang, no silently different numbers).

The killed jobs are real ``python -m`` subprocesses (SIGKILL to their whole process group); the damaged-input cases
run through a driver that forks one ``python -m``-equivalent child per case (tests/entry_point_driver.py). OMP_NUM_THREADS=1, tiny
synthetic data.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import shards as shard_io
from pipeline.records import decode_sequence_example
from pipeline.tfrecord import read_records
from pipeline.whitening import MomentAccumulator, fit_whitening_set

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
TIMEOUT = 240  # seconds any one command may take before the test calls it a hang


def train_flags(workers: str = "0") -> list[str]:
    """The model every training run here builds: small, but the real CMA head over all 3862 classes."""
    return ["--head", "cma", "--label-emb", "random", "--width", "16", "--batch-size", "2", "--workers", workers,
            "--seed", "3", "--optimizer", "adam", "--lr", "3e-3", "--device", "cpu", "--shuffle-buffer", "16",
            "--num-classes", "3862"]


TRAIN_FLAGS = train_flags()
PART = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")


def _run(module: str, *argv: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _preprocess(*argv: str) -> dict:
    from beam_jobs import preprocess

    return preprocess.run(list(argv) + ["--direct_num_workers", "1"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Raw synthetic TFRecords and their preprocessed splits: train (48 videos, 2 shards, 16 PCA dims) and val (16
    segment-rated videos, 2 shards), both through the real Beam job."""
    from pipeline import synthetic

    root = tmp_path_factory.mktemp("faults")
    synthetic.generate(str(root / "raw/train"), videos=48, shards=2, seed=11, max_frames=60)
    synthetic.generate(str(root / "raw/val"), videos=16, shards=1, seed=12, segments=True, prefix="validate",
                       max_frames=60)
    _preprocess("--input", str(root / "raw/train/*.tfrecord"), "--output", str(root / "train"), "--pca-dims", "16",
                "--num-shards", "2")
    _preprocess("--input", str(root / "raw/val/*.tfrecord"), "--output", str(root / "val"), "--whitening",
                str(root / "train/whitening.npz"), "--num-shards", "2")
    return root


@pytest.fixture(scope="module")
def checkpoint(data) -> Path:
    """A tiny trained checkpoint (a few steps, in process) for the evaluation and tagging entry points."""
    from model import train_video

    out = data / "ckpt_run"
    train_video.main(train_video.get_args_parser().parse_args(
        ["--train", str(data / "train"), "--out", str(out), "--epochs", "1", "--max-steps-per-epoch", "3",
         *TRAIN_FLAGS]))
    return out / "last.pt"


# -- 1. training killed with SIGKILL mid-epoch, then --resume ----------------------------------------------------
class _StreamReader(threading.Thread):
    """Collects a pipe's output (tqdm redraws with \\r, so it is read as raw chunks, not lines)."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text, self.lock = pipe, "", threading.Lock()

    def run(self):
        for chunk in iter(lambda: os.read(self.pipe.fileno(), 65536), b""):
            with self.lock:
                self.text += chunk.decode(errors="replace")

    def get(self) -> str:
        with self.lock:
            return self.text


def _batches_done(stderr: str, epoch: int) -> int:
    """Batches of ``epoch`` the tqdm bar (forced on with TQDM_FORCE) has reported so far."""
    done = [int(n) for n in re.findall(rf"epoch {epoch}:\s+\d+%\|[^|]*\|\s*(\d+)/", stderr)]
    return max(done, default=0)


def _deterministic(history: list[dict]) -> list[dict]:
    """metrics.json entries without the wall-clock rate."""
    return [{k: v for k, v in h.items() if k != "train_samples_per_s"} for h in history]


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(data, tmp_path):
    common = ["--train", str(data / "train"), "--val", str(data / "val"), "--epochs", "3", *TRAIN_FLAGS]
    full = _run("model.train_video", *common, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "model.train_video", *common, "--out", str(run)], cwd=REPO,
                            env={**ENV, "TQDM_FORCE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out, err = _StreamReader(proc.stdout), _StreamReader(proc.stderr)
    out.start()
    err.start()
    deadline = time.monotonic() + TIMEOUT
    try:
        # epoch 0 is complete (last.pt, metrics.json written, its line printed) and epoch 1 has run 3 batches
        while not ("epoch 0: loss" in out.get() and _batches_done(err.get(), 1) >= 3):
            assert proc.poll() is None, f"training ended before it could be killed:\n{err.get()[-2000:]}"
            assert time.monotonic() < deadline, "training never reached epoch 1"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    seen = _batches_done(err.get(), 1)
    steps_per_epoch = 48 // 2
    assert 3 <= seen < steps_per_epoch  # killed inside epoch 1's training loop
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())["epochs"]] == [0]

    resumed = _run("model.train_video", *common, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'last.pt'} at epoch 1" in resumed.stdout

    want = json.loads((tmp_path / "full/metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in got["epochs"]] == [0, 1, 2]
    # every epoch's train loss, step count, lr and every validation number: exactly equal
    assert _deterministic(got["epochs"]) == _deterministic(want["epochs"])
    assert got["best_val_gap"] == want["best_val_gap"]
    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(run / name, weights_only=True)
        assert (a["epoch"], a["step"], a["best_metric"]) == (b["epoch"], b["step"], b["best_metric"])
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:  # bit-identical weights, not merely close
            assert torch.equal(a["model"][k], b["model"][k]), f"{name}: {k} differs"
        for pid, state in a["optimizer"]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b["optimizer"]["state"][pid][k]), f"{name}: optimizer state {pid}.{k}"
    # the kill left no temp file behind (it came mid-epoch, not mid-save)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_kill_between_the_metrics_and_the_checkpoint_write_loses_no_epoch(data, tmp_path):
    """The training loops write metrics.json (and best.pt) before last.pt. A SIGKILL between the two leaves
    metrics.json with epoch 1 and last.pt at epoch 0: --resume reruns epoch 1 to the same numbers, and ends with
    every epoch once."""
    import shutil

    from model import train_video

    def train(*extra):
        return train_video.main(train_video.get_args_parser().parse_args(
            ["--train", str(data / "train"), "--out", str(tmp_path / "run"), "--max-steps-per-epoch", "2",
             *TRAIN_FLAGS, *extra]))

    train("--epochs", "1")
    shutil.copy(tmp_path / "run/last.pt", tmp_path / "epoch0.pt")
    train("--epochs", "2", "--resume")
    first = json.loads((tmp_path / "run/metrics.json").read_text())["epochs"]
    shutil.copy(tmp_path / "epoch0.pt", tmp_path / "run/last.pt")  # the epoch-1 last.pt write never happened
    train("--epochs", "3", "--resume")
    epochs = json.loads((tmp_path / "run/metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in epochs] == [0, 1, 2]
    drop = {"train_samples_per_s"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in epochs[:2]] == [
        {k: v for k, v in h.items() if k not in drop} for h in first]


# -- 2. preprocessing killed with SIGKILL mid-write, then re-run into the same --output ----------------------------
def _input_frames(pattern_dir: Path) -> dict[str, np.ndarray]:
    """id -> (T, 1024) float32 rgb of every record in the raw TFRecords."""
    videos = {}
    for path in sorted(pattern_dir.glob("*.tfrecord")):
        for _, payload in read_records(str(path)):
            rec = decode_sequence_example(payload)
            assert rec.id not in videos
            videos[rec.id] = rec.features("rgb")
    return videos


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_preprocessing_killed_mid_write_then_rerun_loses_and_duplicates_nothing(tmp_path):
    from pipeline import synthetic

    raw = tmp_path / "raw"
    synthetic.generate(str(raw), videos=64, shards=4, seed=21, prefix="big", min_frames=100, max_frames=200)
    frames = _input_frames(raw)
    # all 1024 whitened dims (fitted here, outside Beam), so the write pass has ~20 MB to write
    acc = MomentAccumulator(1024)
    for x in list(frames.values())[:24]:
        acc.add(x)
    whitening = fit_whitening_set({"rgb": acc})
    whitening.save(tmp_path / "whitening.npz")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "beam_jobs.preprocess", "--input", str(raw / "*.tfrecord"), "--output", str(out),
            "--whitening", str(tmp_path / "whitening.npz"), "--direct_num_workers", "2"]

    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (out / "shards").is_dir() or not any(p.is_file() for p in (out / "shards").rglob("*")):
            assert proc.poll() is None, "preprocessing ended before it could be killed"
            assert time.monotonic() < deadline, "preprocessing never started writing"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its Beam worker processes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for _ in range(100):  # every process of the group is gone
        if not _group_alive(proc.pid):
            break
        time.sleep(0.05)
    assert not _group_alive(proc.pid)
    assert not (out / "summary.json").exists()  # it died mid-write
    left = sorted(str(p.relative_to(out / "shards")) for p in (out / "shards").rglob("*") if p.is_file())
    assert left, "the kill left nothing to clean up: it did not hit the write"
    print("left by the kill under shards/:", left)

    # the same command into the same --output (one local worker: cheaper, and what a rerun cleans up does not
    # depend on the worker count)
    rerun = subprocess.run(argv[:-1] + ["1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr

    # only final shards, numbered 0..N-1 of N; no temp file or directory anywhere under OUT
    names = sorted(p.name for p in (out / "shards").iterdir())
    parsed = [PART.match(n) for n in names]
    assert all(parsed), names
    total = int(parsed[0].group(2))
    assert sorted(int(m.group(1)) for m in parsed) == list(range(total))
    assert {int(m.group(2)) for m in parsed} == {total}
    stray = [str(p.relative_to(out)) for p in out.rglob("*")
             if p.name.startswith(".") or "tmp" in p.name or "temp" in p.name]
    assert not stray, stray

    # every input video exactly once, with the frames a clean whitening of its record gives
    seen: dict[str, int] = {}
    shard_rows = 0
    for path in sorted((out / "shards").glob("*.parquet")):
        info = shard_io.read_shard_info(path)
        shard_rows += info.num_rows
        for v in shard_io.iter_videos(path):  # page checksums verified on read
            seen[v.id] = seen.get(v.id, 0) + 1
            want = (frames[v.id] - whitening["rgb"].mean.astype(np.float32)) @ \
                whitening["rgb"].projection.astype(np.float32)
            # float16 rounding (2^-11 relative) of the float32 whitening, doubled, plus 1e-5 absolute for the
            # summation order of 1024 float32 products near zero (values are O(1): another video is off by O(1))
            np.testing.assert_allclose(v.features["rgb"], want, rtol=2 ** -10, atol=1e-5, err_msg=v.id)
    assert set(seen) == set(frames) and set(seen.values()) == {1}
    assert shard_rows == len(frames) == 64

    summary = json.loads((out / "summary.json").read_text())
    assert summary["read"] == summary["written"] == 64 and summary["dead_lettered_total"] == 0
    assert summary["written_frames"] == sum(len(x) for x in frames.values())
    assert summary["invariant_holds"] and summary["shards_complete"]
    assert summary["duplicate_ids"]["ids"] == 0 and summary["duplicate_ids"]["extra_rows"] == 0

    # the shards carry page checksums: a flipped byte in one is an error naming it, not different frames
    largest = max((out / "shards").glob("*.parquet"), key=lambda p: shard_io.read_shard_info(p).num_rows)
    bad = tmp_path / "flipped.parquet"
    bad.write_bytes(_flipped(largest.read_bytes(), largest))
    with pytest.raises(shard_io.ShardError, match="flipped.parquet"):
        list(shard_io.iter_videos(bad))


# -- 3 and 4: damaged shards and checkpoints given to the model entry points -------------------------------------
# The entry points are started 12 times below; a fresh interpreter spends ~6 CPU seconds importing torch before it
# reads an argument, so tests/entry_point_driver.py imports them once and forks a child per case that runs the
# module as ``python -m`` would (its own process group, stderr to a file). The cases in REAL_SUBPROCESS run as
# genuine ``python -m`` subprocesses instead and meet the same assertions.
DRIVER = REPO / "tests" / "entry_point_driver.py"
CASE_TIMEOUT = 120  # seconds: a case still running then is a hang


def _flipped(data: bytes, path: Path) -> bytes:
    """``data`` (the bytes of shard ``path``) with 8 bytes inverted in the middle of the first row group's rgb
    column chunk: inside a data page, past its header."""
    md = pq.ParquetFile(path).metadata
    names = [md.row_group(0).column(c).path_in_schema for c in range(md.num_columns)]
    col = md.row_group(0).column(names.index("rgb"))
    start = col.dictionary_page_offset or col.data_page_offset
    mid = start + col.total_compressed_size // 2
    b = bytearray(data)
    for i in range(mid, mid + 8):
        b[i] ^= 0xFF
    return bytes(b)


def _damaged_copy(split: Path, dest: Path, how: str) -> tuple[Path, str]:
    """A copy of the preprocessed ``split`` whose largest shard is byte-flipped or cut in half; (root, that shard).
    (With few videos Beam may put them all in one of the --num-shards files and leave the others empty.)"""
    shutil.copytree(split, dest)
    path = max(sorted((dest / "shards").glob("*.parquet")), key=lambda p: pq.ParquetFile(p).metadata.num_rows)
    raw = path.read_bytes()
    path.write_bytes(_flipped(raw, path) if how == "flipped" else raw[: len(raw) // 2])
    return dest, str(path)


def _tensor_flipped(raw: bytes, ckpt: Path) -> bytes:
    """``raw`` with one byte flipped in the middle of the checkpoint's largest tensor record."""
    import struct
    import zipfile

    with zipfile.ZipFile(ckpt) as z:
        big = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[big.header_offset + 26:big.header_offset + 30])
    pos = big.header_offset + 30 + name_len + extra_len + big.file_size // 2
    b = bytearray(raw)
    b[pos] ^= 0x5A
    return bytes(b)


# A truncated shard has no footer: every entry point reads all footers in the main process (dataset_summary) before
# it starts a DataLoader worker, so --workers 2 would run the workers-0 path again; a flip is found by a worker.
SHARD_DAMAGE = [("flipped", "0"), ("flipped", "2"), ("truncated", "0")]
REAL_SUBPROCESS = ("evaluate-flipped-2",)  # run as a genuine ``python -m`` subprocess, not through the driver
CKPT_DAMAGE = ["truncated", "tensor byte flipped"]


@pytest.fixture(scope="module")
def damaged(data, checkpoint, tmp_path_factory) -> dict:
    """Every damaged-input case run through the driver: name -> (returncode, stderr, the damaged file, out dir)."""
    root = tmp_path_factory.mktemp("damaged")
    cases, expect, outs = {}, {}, {}
    for how in ("flipped", "truncated"):
        train, bad_train = _damaged_copy(data / "train", root / f"train_{how}", how)
        val, bad_val = _damaged_copy(data / "val", root / f"val_{how}", how)
        for _, workers in [d for d in SHARD_DAMAGE if d[0] == how]:
            name = f"train-{how}-{workers}"
            cases[name] = ("model.train_video", ["--train", str(train), "--val", str(data / "val"), "--out",
                                                 str(root / name), "--epochs", "1", *train_flags(workers)])
            expect[name], outs[name] = bad_train, root / name
            name = f"evaluate-{how}-{workers}"
            cases[name] = ("model.evaluate", ["--checkpoint", str(checkpoint), "--data", str(val), "--out",
                                              str(root / name / "eval.json"), "--workers", workers, "--device",
                                              "cpu", "--batch-size", "4"])
            expect[name], outs[name] = bad_val, root / name
        name = f"tag-{how}"
        cases[name] = ("model.tag_segments", ["--checkpoint", str(checkpoint), "--data", str(val), "--out",
                                              str(root / name), "--workers", "0", "--device", "cpu",
                                              "--batch-size", "4"])
        expect[name], outs[name] = bad_val, root / name
    raw = checkpoint.read_bytes()
    for how in CKPT_DAMAGE:
        bad = root / f"{how.replace(' ', '_')}.pt"
        bad.write_bytes(raw[: len(raw) // 2] if how == "truncated" else _tensor_flipped(raw, checkpoint))
        for module in ("model.evaluate", "model.tag_segments"):
            name = f"{module}-checkpoint-{how}"
            outs[name] = root / name.replace(" ", "_")
            cases[name] = (module, ["--checkpoint", str(bad), "--data", str(data / "val"), "--out",
                                    str(outs[name] / "out.json" if module == "model.evaluate" else outs[name]),
                                    "--workers", "0", "--device", "cpu"])
            expect[name] = str(bad)
    real = {name: cases.pop(name) for name in REAL_SUBPROCESS}
    logs = {name: root / f"{name.replace(' ', '_')}.stderr" for name in cases}
    spec = {name: [module, argv, f"{logs[name]}.out", str(logs[name])] for name, (module, argv) in cases.items()}
    r = subprocess.run([sys.executable, str(DRIVER), json.dumps(spec), str(CASE_TIMEOUT), "model.train_video",
                        "model.evaluate", "model.tag_segments"], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=CASE_TIMEOUT * len(cases) + 60)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    got = {name: (results[name]["returncode"], logs[name].read_text(), expect[name], outs[name]) for name in cases}
    for name, (module, argv) in real.items():
        try:
            p = _run(module, *argv, timeout=CASE_TIMEOUT)
            got[name] = (p.returncode, p.stderr, expect[name], outs[name])
        except subprocess.TimeoutExpired:
            got[name] = ("timeout", "", expect[name], outs[name])
    return got


def _assert_one_line_naming(returncode, stderr: str, path: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode != "timeout", "hung"
    assert returncode == 2, (returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert path in lines[0] and lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("how,workers", SHARD_DAMAGE)
def test_a_damaged_training_shard_stops_training_with_one_line(damaged, how, workers):
    code, err, bad, out = damaged[f"train-{how}-{workers}"]
    _assert_one_line_naming(code, err, bad)
    assert not (out / "last.pt").exists()  # no checkpoint of an epoch that did not see all its data


@pytest.mark.parametrize("how,workers", SHARD_DAMAGE)
def test_a_damaged_shard_stops_evaluation_with_one_line(damaged, how, workers):
    code, err, bad, out = damaged[f"evaluate-{how}-{workers}"]
    _assert_one_line_naming(code, err, bad)
    assert not out.exists()  # no metrics over part of the data


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_shard_stops_tagging_with_one_line(damaged, how):
    code, err, bad, out = damaged[f"tag-{how}"]
    _assert_one_line_naming(code, err, bad)
    assert not (out / "summary.json").exists()
    assert not [p.name for p in out.glob("*") if p.name.endswith(".tmp")]


# -- 4. a checkpoint truncated or corrupted on disk (the last.prev.pt fallback of --resume is tested in
#       test_train_video.test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one) ---------------------------
@pytest.mark.parametrize("how", CKPT_DAMAGE)
@pytest.mark.parametrize("module", ["model.evaluate", "model.tag_segments"])
def test_a_damaged_checkpoint_is_one_line_naming_it(damaged, module, how):
    code, err, bad, out = damaged[f"{module}-checkpoint-{how}"]
    assert "corrupt" in _assert_one_line_naming(code, err, bad)
    assert not out.exists()


def test_resume_does_not_continue_from_a_last_pt_with_a_flipped_tensor_byte(checkpoint, tmp_path):
    """A flipped byte inside a tensor of last.pt: --resume (``load_latest_checkpoint``) should take last.prev.pt, as
    it does for a truncated last.pt, instead of continuing from silently different weights."""
    from model.engine.checkpoint import load_latest_checkpoint

    shutil.copy(checkpoint, tmp_path / "last.prev.pt")
    (tmp_path / "last.pt").write_bytes(_tensor_flipped(checkpoint.read_bytes(), checkpoint))
    state, source = load_latest_checkpoint(tmp_path / "last.pt")
    assert source == str(tmp_path / "last.prev.pt")
