"""Why the synthetic evidence is learnable from 64 PCA dims and not from all 1024 whitened dims.

    .venv/bin/python bench/planted_subspace.py                      # 3000 training / 400 validation videos
    .venv/bin/python bench/planted_subspace.py --train-videos 600

Generates the same splits as ``bench/default_sweep.py`` (``pipeline.synthetic``, seeds 1 and 2, 120-300 frames;
in memory, no TFRecords), fits the whitening the Beam job fits (``pipeline.whitening``, default epsilon and OAS
shrinkage) on the training frames, once keeping 64 components and once all 1024, and prints:

1. Where the planted evidence lies: the share of each class's rgb prototype inside the 64 leading principal
   components, and the size of one strong evidence frame in whitened units (its Mahalanobis length) at each width.
2. How much of the whitened input carries it: the prototypes span K dims of the 64 or 1024 unit-variance ones.
3. What that does to a learner: scikit-learn logistic regression on mean-pooled whitened frames (one per class,
   standardized), over a range of C, validation GAP and GAP on its own training videos, against the label prior.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.metrics.video import VideoMetrics  # noqa: E402
from pipeline import synthetic  # noqa: E402
from pipeline.records import RGB_DIM, dequantize  # noqa: E402
from pipeline.whitening import MomentAccumulator, fit_whitening  # noqa: E402

NUM_CLASSES = 3862


def split(seed: int, videos: int, acc: MomentAccumulator | None) -> tuple[np.ndarray, list[list[int]]]:
    """Mean-pooled dequantized rgb (N, 1024) and label lists of one generated split; frames go into ``acc``."""
    ids = synthetic.make_ids(seed, videos)
    pooled, labels = np.zeros((videos, RGB_DIM)), []
    for i in range(videos):
        record = synthetic.generate_video(seed, i, ids[i], min_frames=120, max_frames=300).record
        x = dequantize(record.rgb)  # (T, 1024)
        if acc is not None:
            acc.add(x)
        pooled[i] = x.mean(0)
        labels.append(np.asarray(record.labels).tolist())
    return pooled, labels


def gap(scores: np.ndarray, labels: list[list[int]]) -> float:
    m = VideoMetrics(NUM_CLASSES)
    m.update(scores.astype(np.float32), labels)
    return float(m.compute()["gap"])


def logistic_regression(x_train, y_train, x_val, y_val, c: float) -> tuple[float, float]:
    """(validation GAP, training GAP) of one-per-class logistic regression on standardized features; classes with
    fewer than two positives or negatives score their training frequency."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    s_train = np.zeros((len(xt), NUM_CLASSES))
    s_val = np.zeros((len(xv), NUM_CLASSES))
    for c_id in sorted(set().union(*map(set, y_train))):
        target = np.array([c_id in y for y in y_train])
        if min(target.sum(), (~target).sum()) >= 2:
            lr = LogisticRegression(C=c, max_iter=3000).fit(xt, target)
            s_train[:, c_id], s_val[:, c_id] = lr.predict_proba(xt)[:, 1], lr.predict_proba(xv)[:, 1]
        else:
            s_train[:, c_id] = s_val[:, c_id] = target.mean()
    return gap(s_val, y_val), gap(s_train, y_train)


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    s = synthetic.build_structure()
    acc = MomentAccumulator(RGB_DIM)
    x_train, y_train = split(1, args.train_videos, acc)
    x_val, y_val = split(2, args.val_videos, None)
    print(f"{args.train_videos} training / {args.val_videos} validation videos, {acc.count} training frames "
          f"({time.perf_counter() - start:.0f} s to generate)\n")
    prototypes = s.rgb_prototypes.astype(np.float64)  # (K, 1024) unit rows
    strong = np.array([int(c) not in s.faint_host for c in s.class_ids])
    whitenings = {d: fit_whitening(acc, dims=None if d == RGB_DIM else d) for d in (64, RGB_DIM)}

    print("### 1-2. Where the planted evidence lies, and how much of the whitened input carries it\n")
    print("| kept components | prototype share inside them, mean (min) | one strong evidence frame, whitened "
          "length: mean (min) | unit-variance dims | dims the K prototypes span | their share of the input |")
    print("|---:|---|---|---:|---:|---:|")
    for d, w in whitenings.items():
        proj = w.projection  # (1024, d) = principal axes scaled by 1/sqrt(variance)
        axes = proj / np.linalg.norm(proj, axis=0)  # (1024, d) unit principal axes
        share = np.sum((prototypes @ axes) ** 2, axis=1)  # (K,)
        length = synthetic.RGB_AMPLITUDE * np.linalg.norm(prototypes[strong] @ proj, axis=1)  # (K_strong,)
        rank = np.linalg.matrix_rank(prototypes @ proj)
        print(f"| {d} | {share.mean():.3f} ({share.min():.3f}) | {length.mean():.2f} ({length.min():.2f}) | {d} | "
              f"{rank} | {rank / d:.3f} |")

    prior = np.zeros(NUM_CLASSES)
    for y in y_train:
        prior[y] += 1
    prior /= len(y_train)
    prior_gap = gap(np.tile(prior, (len(y_val), 1)), y_val)
    print(f"\n### 3. Logistic regression on mean-pooled whitened frames (label prior: validation GAP "
          f"{prior_gap:.3f})\n")
    print("| kept components | C | validation GAP | x prior | GAP on its training videos |")
    print("|---:|---:|---:|---:|---:|")
    for d, w in whitenings.items():
        # the mean of whitened frames is the whitened mean: the whitening is affine
        wt, wv = w.transform(x_train, np.float64), w.transform(x_val, np.float64)
        for c in args.c:
            val, train = logistic_regression(wt, y_train, wv, y_val, c)
            print(f"| {d} | {c:g} | {val:.3f} | {val / prior_gap:.2f} | {train:.3f} |", flush=True)
    print(f"\nbench time {time.perf_counter() - start:.0f} s")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-videos", type=int, default=3000)
    p.add_argument("--val-videos", type=int, default=400)
    p.add_argument("--c", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0],
                   help="inverse regularization strengths of the logistic regression")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
