"""Training samples/s in one process and under torchrun, same data and global batch (issue 11).

    .venv/bin/python bench/train_scaling.py --data W/data_n600_d64      # a preprocess output with train/ validate/
    .venv/bin/python bench/train_scaling.py                             # generates 600 videos first (~1 min)

Runs ``model.train_video`` (default model, SGD, ``--epochs 2``, ``--workers 0``) as: one process with one thread,
one process with N threads, and ``torchrun`` with N processes of one thread each (N = ``--procs``, default: the
CUDA device count, else 2). Reports the second epoch's samples/s (the first pays start-up) and the ratio to one
process with one thread, and checks that every setting trained the same model (its validation GAP).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(root: Path) -> Path:
    from beam_jobs import preprocess
    from pipeline import synthetic

    synthetic.generate(str(root / "raw/train"), videos=600, shards=4, seed=1, min_frames=120, max_frames=300)
    synthetic.generate(str(root / "raw/validate"), videos=200, shards=1, seed=2, prefix="validate",
                       min_frames=120, max_frames=300)
    beam = ["--direct_num_workers", "1"]
    preprocess.run(["--input", str(root / "raw/train/*.tfrecord"), "--output", str(root / "train"),
                    "--pca-dims", "64"] + beam)
    preprocess.run(["--input", str(root / "raw/validate/*.tfrecord"), "--output", str(root / "validate"),
                    "--whitening", str(root / "train/whitening.npz")] + beam)
    return root


def train(data: Path, out: Path, procs: int, threads: int, batch: int) -> dict:
    argv = ["-m", "model.train_video", "--train", str(data / "train"), "--val", str(data / "validate"), "--out",
            str(out), "--epochs", "2", "--batch-size", str(batch), "--workers", "0", "--optimizer", "sgd",
            "--lr", "0.01"]
    if procs > 1:
        argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{procs} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())["epochs"][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="preprocess output with train/ and validate/ (default: generate)")
    p.add_argument("--procs", type=int, default=torch.cuda.device_count() or 2)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else prepare(Path(tmp) / "data")
        settings = [(1, 1), (1, a.procs), (a.procs, 1)]
        rows = []
        for procs, threads in settings:
            r = train(data, Path(tmp) / f"run_{procs}x{threads}", procs, threads, a.batch_size)
            rows.append((procs, threads, r["train_samples_per_s"], r["val_gap"]))
            print(f"  {procs} process(es) x {threads} thread(s): {r['train_samples_per_s']:.1f} samples/s",
                  file=sys.stderr)
    base = rows[0][2]
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    print(f"\nmodel.train_video, default CMA-SNet, batch {a.batch_size}, epoch 2 of 2, {device}")
    print("| processes x threads | samples/s | vs 1 x 1 | val GAP |\n|---|---:|---:|---:|")
    for procs, threads, rate, gap in rows:
        print(f"| {procs} x {threads} | {rate:.1f} | {rate / base:.2f}x | {gap:.4f} |")


if __name__ == "__main__":
    main()
