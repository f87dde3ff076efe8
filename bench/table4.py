"""Reproduce the shape of the paper's Table 4 on the built-in synthetic sample data (CPU, fixed seeds).

    .venv/bin/python bench/table4.py                # generates and preprocesses its own data
    .venv/bin/python bench/table4.py --data DIR     # DIR/train and DIR/validate from beam_jobs.preprocess

Data: 3000 training and 400 validation videos of 120-300 frames (YouTube-8M's range), 64 PCA dims. Trains every
head/backbone pair the paper compares, plus mean pooling, CMA-SNet with random instead of ASGE label embeddings (the
paper's embedding ablation), CMA-SNet with a softmax over scaled cosines in place of Eq. 7 and self-attention with
one map per class instead of the paper's single map shared by all classes (both not in the paper), each with the
same data, seed, optimizer and epochs, and prints
Hit@1, PERR, mAP and GAP on the validation split as a markdown table, with where each model's attention goes
(``model.metrics.attention`` on the rated segments of the validation split, which are the planted evidence): lift on
positive and on negative ratings, and the attention overlap of the strong labels of a video, whose evidence the
generator plants on disjoint segments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import train_video  # noqa: E402
from model.engine.device import resolve_device  # noqa: E402

SOFTMAX = ["--cma-attention", "softmax"]
EQ7 = ["--cma-attention", "relu"]  # the paper's Eq. 7-8 (model.train_video's default is the softmax)
VARIANTS = [  # (row name, head, backbone, extra model.train_video flags)
    ("mean pooling (FC)", "mean", "fc", []),
    ("mean pooling (SNet)", "mean", "snet", []),
    ("self-attention-FC", "self-attn", "fc", []),
    ("self-attention-SNet", "self-attn", "snet", []),
    ("CMA-FC", "cma", "fc", EQ7),
    ("CMA-SNet", "cma", "snet", EQ7),
    ("CMA-SNet, random label embeddings", "cma", "snet", EQ7 + ["--label-emb", "random"]),
    # not in the paper: Eq. 7 replaced by a softmax over 10 x cosine (model/networks/heads.py), with each embedding kind
    ("CMA-SNet, softmax attention", "cma", "snet", SOFTMAX),
    ("CMA-SNet, softmax attention, random label embeddings", "cma", "snet", SOFTMAX + ["--label-emb", "random"]),
    # not in the paper: one self-attention map per class instead of the paper's one map shared by all classes
    # (rows 3-4). Appended, so the row numbers of --only and the run folders of --reuse keep their meaning.
    ("self-attention per class (FC)", "self-attn-per-class", "fc", []),
    ("self-attention per class (SNet)", "self-attn-per-class", "snet", []),
]


def prepare_data(root: Path, train_videos: int, val_videos: int, pca_dims: int, min_frames: int,
                 max_frames: int) -> Path:
    """Synthetic train/validate splits, preprocessed by the real Beam job."""
    from beam_jobs import preprocess
    from pipeline import synthetic

    synthetic.main(["--out", str(root / "raw/train"), "--videos", str(train_videos), "--shards", "4",
                    "--seed", "1", "--prefix", "train", "--min-frames", str(min_frames),
                    "--max-frames", str(max_frames)])
    synthetic.main(["--out", str(root / "raw/validate"), "--videos", str(val_videos), "--shards", "2",
                    "--seed", "2", "--prefix", "validate", "--segments", "--min-frames", str(min_frames),
                    "--max-frames", str(max_frames)])
    preprocess.run(["--input", str(root / "raw/train/*.tfrecord"), "--output", str(root / "data/train"),
                    "--pca-dims", str(pca_dims)])
    preprocess.run(["--input", str(root / "raw/validate/*.tfrecord"), "--output", str(root / "data/validate"),
                    "--whitening", str(root / "data/train/whitening.npz")])
    return root / "data"


def where_attention_goes(run: Path, val: Path):
    """(``AttentionStats`` of a run's last model on the rated validation segments, overlap over strong labels;
    {"strong": mean AP, "faint": mean AP} over the classes of each kind, full-ranking AP per class), from one pass
    over the validation split."""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score

    from model.metrics.attention import AttentionStatsAccumulator
    from model.data.video import make_loader
    from model.evaluate import load_model
    from model.engine.segments import time_stride
    from pipeline.synthetic import build_structure

    model, a = load_model(str(run / "last.pt"), torch.device("cpu"))
    structure = build_structure()
    loader = make_loader(str(val), 64, workers=0, num_classes=a["num_classes"], max_frames=a["max_frames"],
                         shuffle=False, segment_labels=True, features=a["features"].split(","))
    acc = AttentionStatsAccumulator(overlap_classes=structure.strong_ids)
    stride = time_stride(model.backbone)
    scores, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats, fmask = model.forward_features(batch["x"], batch["mask"])  # (B, T', C), (B, T')
            acc.update(model.head.attention(feats, fmask), batch["mask"].sum(dim=1), batch["x"].shape[1], stride,
                       batch)
            scores.append(torch.sigmoid(model.forward_head(feats, fmask)).numpy())
            labels.append(batch["labels"].numpy())
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    faint = set(structure.faint_host)
    ap = {"strong": [], "faint": []}
    for c in structure.class_ids.tolist():
        if labels[:, c].any():
            ap["faint" if c in faint else "strong"].append(average_precision_score(labels[:, c], scores[:, c]))
    return acc.compute(), {kind: float(np.mean(v)) for kind, v in ap.items()}


def reusable(run: Path, head: str, backbone: str) -> bool:
    """Whether ``run/last.pt`` holds this row's head and backbone (runs made before the single-map self-attention
    head hold the per-class one under the name ``self-attn``)."""
    from model.engine.checkpoint import load_checkpoint
    from model.networks.video_model import resolve_legacy_head

    if not (run / "last.pt").exists():
        return False
    ckpt = load_checkpoint(run / "last.pt")
    a = resolve_legacy_head(ckpt["args"], ckpt["model"])
    return (a["head"], a["backbone"]) == (head, backbone)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="folder with train/ and validate/ preprocess outputs")
    p.add_argument("--work", default=None, help="where runs (and generated data) go; default: a temp dir")
    # Below ~3000 training videos no model here learns the planted evidence (600 videos stayed at chance GAP).
    p.add_argument("--train-videos", type=int, default=3000)
    p.add_argument("--val-videos", type=int, default=400)
    p.add_argument("--pca-dims", type=int, default=64)
    # YouTube-8M keeps videos of 120 s and longer, cut at 300 frames; shorter videos leave SNet (16 frames per
    # step) so few steps that no head has much to attend among (30-120 frames: all heads within 5 GAP)
    p.add_argument("--video-min-frames", type=int, default=120)
    p.add_argument("--video-max-frames", type=int, default=300)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    # single runs of one row differ by up to 8 GAP between seeds here, so every row is trained with each seed
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; the table shows their mean")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) or cpu")
    p.add_argument("--only", default=None, help="comma-separated row numbers to run (1-based)")
    p.add_argument("--reuse", action="store_true",
                   help="runs whose WORK/runN_seedS/last.pt exists (same settings) are measured, not retrained")
    a = p.parse_args()

    work = Path(a.work or tempfile.mkdtemp(prefix="table4-"))
    data = Path(a.data) if a.data else prepare_data(work, a.train_videos, a.val_videos, a.pca_dims,
                                                          a.video_min_frames, a.video_max_frames)
    seeds = [int(x) for x in a.seeds.split(",")]
    chosen = {int(i) for i in a.only.split(",")} if a.only else None
    if chosen is None and resolve_device(a.device).type == "cpu":
        # per-class attention over every frame is what is slow; one shared map costs about what mean pooling does
        chosen = {i for i, v in enumerate(VARIANTS, 1) if v[1] in ("mean", "self-attn") or v[2] != "fc"}
        print("CPU: skipping the FC-backbone rows with per-class attention (attention over every frame for 3862 "
              "classes runs at ~10 samples/s on a 2-core CPU, about 50 min per row and seed); --only 5,10 runs them",
              flush=True)
    rows = []
    for i, (name, head, backbone, extra) in enumerate(VARIANTS, 1):
        if chosen and i not in chosen:
            continue
        runs = []
        for seed in seeds:
            run = work / f"run{i}_seed{seed}"
            argv = ["--train", str(data / "train"), "--val", str(data / "validate"), "--out", str(run),
                    "--head", head, "--backbone", backbone, "--optimizer", a.optimizer, "--lr", str(a.lr),
                    "--epochs", str(a.epochs), "--width", str(a.width), "--batch-size", str(a.batch_size),
                    "--workers", "0", "--seed", str(seed), "--device", a.device, "--num-classes", "3862", *extra]
            t0 = time.perf_counter()
            if a.reuse and reusable(run, head, backbone):
                final, secs = json.loads((run / "metrics.json").read_text())["epochs"][-1], float("nan")
            else:
                final = train_video.main(train_video.get_args_parser().parse_args(argv))
                secs = time.perf_counter() - t0
            att, ap = where_attention_goes(run, data / "validate")
            runs.append((final, secs, att, ap))
            print(f"{name}, seed {seed}: GAP {final['val_gap']:.4f} ({secs:.0f} s), attention {att}, AP {ap}",
                  flush=True)
        rows.append((name, runs))

    def mean(values):
        return sum(values) / len(values)

    print(f"\nTable 4 shape on synthetic data (width {a.width}, {a.epochs} epochs, {a.optimizer} lr {a.lr}, "
          f"batch {a.batch_size}; validation split, last epoch; mean over seeds {a.seeds})\n")
    print("| model | Hit@1 | PERR | mAP | GAP | GAP per seed | AP strong | AP faint | lift + | lift - | overlap "
          "| train s |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in rows:
        m = {k: 100 * mean([r[0][k] for r in runs]) for k in ("val_hit_at_1", "val_perr", "val_map", "val_gap")}
        per_seed = " / ".join(f"{100 * r[0]['val_gap']:.1f}" for r in runs)
        secs = mean([r[1] for r in runs])
        print(f"| {name} | {m['val_hit_at_1']:.1f} | {m['val_perr']:.1f} | {m['val_map']:.1f} | {m['val_gap']:.1f} "
              f"| {per_seed} | {100 * mean([r[3]['strong'] for r in runs]):.1f} "
              f"| {100 * mean([r[3]['faint'] for r in runs]):.1f} | {mean([r[2].positive_lift for r in runs]):.2f} "
              f"| {mean([r[2].negative_lift for r in runs]):.2f} | {mean([r[2].overlap for r in runs]):.2f} "
              f"| {'reused' if secs != secs else f'{secs:.0f}'} |")
    print("\nAP strong/faint: mean full-ranking AP of the 38 strong and the 9 faint classes (faint ones show weakly, "
          "inside their host's segments);")
    print("lift +/-: attention mass on the segments rated positive/negative for a class over their share of the "
          "video (uniform = 1);\noverlap: shared attention of two strong labels of one video (evidence on disjoint "
          "segments; identical = 1)")
    print(f"\nruns under {work}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
