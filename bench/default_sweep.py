"""Does CMA-SNet with default flags beat SNet mean pooling across data sizes and feature dims? (issue 8, part 6)

    .venv/bin/python bench/default_sweep.py --work W                      # sizes 600,1200,3000 x dims 64,1024
    .venv/bin/python bench/default_sweep.py --work W --sizes 1200 --dims 1024 --widths 128,512 --seeds 0

Generates planted frame-level data once (3000 training videos of 120-300 frames in 5 nested shards, so the first
600 and 1200 videos are the smaller sizes; 400 validation videos with segment ratings), preprocesses every size
with default flags (all 1024 rgb dims) and with ``--pca-dims 64``, and trains each head with
``model.train_video --optimizer adam --lr 0.001 --epochs 12 --batch-size 64`` and every other flag at its default
(``--width`` only where ``--widths`` names one), ``--jobs`` runs at a time with one thread each. Prints, per point,
the label prior's GAP, scikit-learn logistic regression's on mean-pooled frames, and the mean over seeds of each
head's best validation GAP, then the ratio CMA / mean pooling.
Finished runs are reused and interrupted ones resumed, so a stopped sweep continues where it stopped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from table4 import where_attention_goes  # noqa: E402  (bench/ is on sys.path as the script's folder)

EPOCHS = 12
TRAIN_FLAGS = ["--optimizer", "adam", "--lr", "0.001", "--epochs", str(EPOCHS), "--batch-size", "64", "--workers",
               "0"]
SHARD_VIDEOS = 600  # training videos per generated shard: sizes are multiples of it


def prepare(work: Path, sizes: list[int], dims: list[int], val_videos: int) -> None:
    """Raw splits once, then one preprocess per (size, dims): training fit + write, validation with its whitening."""
    from beam_jobs import preprocess
    from pipeline import synthetic

    frames = ["--min-frames", "120", "--max-frames", "300"]
    total = max(sizes)
    if not (work / f"raw/train/train{total // SHARD_VIDEOS - 1:04d}.tfrecord").exists():
        synthetic.main(["--out", str(work / "raw/train"), "--videos", str(total), "--shards",
                        str(total // SHARD_VIDEOS), "--seed", "1", "--prefix", "train"] + frames)
    if not (work / "raw/validate").exists():
        synthetic.main(["--out", str(work / "raw/validate"), "--videos", str(val_videos), "--shards", "1",
                        "--seed", "2", "--prefix", "validate", "--segments"] + frames)
    for n, d in itertools.product(sizes, dims):
        out = work / f"data_n{n}_d{d}"
        if (out / "validate/summary.json").exists():
            continue
        files = str(work / f"raw/train/train000[0-{n // SHARD_VIDEOS - 1}].tfrecord")  # the first n videos
        pca = [] if d == 1024 else ["--pca-dims", str(d)]
        preprocess.run(["--input", files, "--output", str(out / "train"), "--direct_num_workers", "1"] + pca)
        preprocess.run(["--input", str(work / "raw/validate/*.tfrecord"), "--output", str(out / "validate"),
                        "--whitening", str(out / "train/whitening.npz"), "--direct_num_workers", "1"])


def train(run: Path, data: Path, head: str, width: int | None, seed: int) -> dict:
    """Best validation GAP of one run and, from its last model, the attention lift on the planted (rated positive)
    segments (``bench/table4.where_attention_goes``); both reused when the run's files exist."""
    metrics, lift = run / "metrics.json", run / "attention.json"
    if not metrics.exists() or len(json.loads(metrics.read_text())["epochs"]) < EPOCHS:
        argv = [sys.executable, "-m", "model.train_video", "--train", str(data / "train"), "--val",
                str(data / "validate"), "--out", str(run), "--head", head, "--seed", str(seed), *TRAIN_FLAGS]
        argv += ["--width", str(width)] if width else []
        argv += ["--resume"] if (run / "last.pt").exists() else []  # an interrupted run continues
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(run.with_suffix(".log"), "w") as log:
            subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    if not lift.exists():
        stats, _ = where_attention_goes(run, data / "validate")
        lift.write_text(json.dumps({"positive_lift": stats.positive_lift, "negative_lift": stats.negative_lift}))
    return {"gap": float(json.loads(metrics.read_text())["best_val_gap"]),
            "lift": json.loads(lift.read_text())["positive_lift"]}


def prior_gap(data: Path) -> float:
    """GAP of the training label prior (``model.networks.prior``) on the validation split."""
    from model.metrics.video import VideoMetrics
    from model.networks.prior import label_prior, predict_prior

    m = VideoMetrics(3862)
    for _, scores, labels in predict_prior(label_prior(str(data / "train"), 3862), str(data / "validate")):
        m.update(scores, labels)
    return m.compute()["gap"]


def logistic_regression_gap(data: Path) -> float:
    """GAP of scikit-learn logistic regression on mean-pooled frames (standardized, C=1, one per class with at least
    two training positives and two negatives; other classes score their training frequency): the simplest model
    that uses the frames, the baseline under which a head has learned nothing from them. Cached in ``data``."""
    cache = data / "logistic_regression.json"
    if cache.exists():
        return json.loads(cache.read_text())["gap"]
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from model.metrics.video import VideoMetrics
    from pipeline.shards import iter_videos

    def pooled(split: str):
        videos = list(iter_videos(str(data / split), ("rgb",)))
        return np.stack([v.features["rgb"].mean(0) for v in videos]), [set(np.asarray(v.labels).tolist())
                                                                         for v in videos]

    (x_train, y_train), (x_val, y_val) = pooled("train"), pooled("validate")
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    scores = np.zeros((len(x_val), 3862), np.float32)
    for c in sorted(set().union(*y_train)):
        target = np.array([c in y for y in y_train])
        if min(target.sum(), (~target).sum()) >= 2:
            scores[:, c] = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, target).predict_proba(x_val)[:, 1]
        else:
            scores[:, c] = target.mean()
    metrics = VideoMetrics(3862)
    metrics.update(scores, [sorted(y) for y in y_val])
    gap = float(metrics.compute()["gap"])
    cache.write_text(json.dumps({"gap": gap}))
    return gap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="data and runs go here (reused on a rerun)")
    p.add_argument("--sizes", default="600,1200,3000",
                   help=f"training videos, multiples of {SHARD_VIDEOS} up to {10 * SHARD_VIDEOS}")
    p.add_argument("--dims", default="64,1024", help="rgb dims kept by preprocessing (1024: the default, all)")
    p.add_argument("--widths", default="default", help="'default' and/or numbers, e.g. 128,512")
    p.add_argument("--heads", default="mean,cma")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--val-videos", type=int, default=400)
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, one thread each")
    p.add_argument("--prepare-only", action="store_true", help="generate and preprocess, train nothing")
    a = p.parse_args()
    sizes, dims = [int(x) for x in a.sizes.split(",")], [int(x) for x in a.dims.split(",")]
    if any(n % SHARD_VIDEOS or n > 10 * SHARD_VIDEOS for n in sizes):
        p.error(f"--sizes must be multiples of {SHARD_VIDEOS} up to {10 * SHARD_VIDEOS}")
    widths = [None if w == "default" else int(w) for w in a.widths.split(",")]
    heads, seeds = a.heads.split(","), [int(s) for s in a.seeds.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # attention statistics run here beside the --jobs training processes
    prepare(work, sizes, dims, a.val_videos)
    if a.prepare_only:
        return

    # seed-major, so a sweep stopped early has every head of the first seeds
    jobs = [(n, d, w, h, s) for s, n, d, w, h in itertools.product(seeds, sizes, dims, widths, heads)]
    from model.train_video import get_args_parser

    default_width = get_args_parser().get_default("width")  # run folders name the width a run really had
    name = lambda n, d, w, h, s: f"n{n}_d{d}_w{w or default_width}_{h}_seed{s}"  # noqa: E731
    (work / "runs").mkdir(exist_ok=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        gaps = dict(zip(jobs, pool.map(lambda j: train(work / "runs" / name(*j), work / f"data_n{j[0]}_d{j[1]}",
                                                       j[3], j[2], j[4]), jobs)))

    print(f"\nbest validation GAP, mean over seeds {a.seeds} (Adam 1e-3, 12 epochs, batch 64, other flags default); "
          f"lift: attention mass on the planted segments over their share of the video (uniform = 1)\n")
    print("| train videos | rgb dims | width | label prior | logistic regression | " + " | ".join(heads) + " | "
          + " | ".join(f"{h} / {heads[0]}" for h in heads[1:]) + " | " + " | ".join(f"{h} lift" for h in heads)
          + " | GAP per seed |")
    print("|" + "---:|" * (5 + 3 * len(heads) - 1) + "---|")
    for n, d, w in itertools.product(sizes, dims, widths):
        mean = {h: sum(gaps[(n, d, w, h, s)]["gap"] for s in seeds) / len(seeds) for h in heads}
        lift = {h: sum(gaps[(n, d, w, h, s)]["lift"] for s in seeds) / len(seeds) for h in heads}
        per_seed = "; ".join(f"{h} " + " / ".join(f"{gaps[(n, d, w, h, s)]['gap']:.3f}" for s in seeds)
                             for h in heads)
        data = work / f"data_n{n}_d{d}"
        print(f"| {n} | {d} | {w or f'{default_width} (default)'} | {prior_gap(data):.3f} | "
              f"{logistic_regression_gap(data):.3f} | "
              + " | ".join(f"{mean[h]:.3f}" for h in heads) + " | "
              + " | ".join(f"{mean[h] / mean[heads[0]]:.2f}" for h in heads[1:]) + " | "
              + " | ".join(f"{lift[h]:.2f}" for h in heads) + f" | {per_seed} |")


if __name__ == "__main__":
    main()
