"""Segment tagging on the synthetic sample data: segment MAP per scorer, with and without segment fine-tuning,
and tagging throughput / peak memory at two corpus sizes.

    .venv/bin/python bench/segments.py [--work DIR] [--epochs 10] [--finetune-epochs 4] [--copies 1,4]

Data: ``pipeline.synthetic --segments`` (3000 training and 400 validate videos of 120-300 frames, like YouTube-8M's
120 s and longer videos cut at 300 frames, with rated segments), preprocessed by the real Beam job with
``--pca-dims 64``. Models: CMA-SNet (ASGE embeddings fitted on the classes seen in training, as
``model.train_video`` does), with the paper's Eq. 7 attention and with ``attention="softmax"``, and the
self-attention-SNet baseline, SNet narrowed to 128 channels for a CPU; video-level training with Adam lr 1e-3,
batch 32, then segment fine-tuning from that model (rated 5-frame windows, unrated classes ignored). Segment MAP is
computed on the rated segments of the validate split (``rated_segment_map``: every window ranked per class, the
same number ``model.evaluate --segments`` reports).

Throughput: ``python -m model.tag_segments`` (default-width CMA-SNet, 1000 tracked classes, Kaggle top lists of
``--max-per-class`` 1000, full after the first thousand windows) over 1 and 4 copies of the validate shard, in a
fresh subprocess per corpus size; peak memory is that process's ``ru_maxrss``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import model  # noqa: E402,F401  (before TensorFlow)
import torch  # noqa: E402

from model.networks import asge, segments as sg  # noqa: E402
from model.engine.checkpoint import save_checkpoint  # noqa: E402
from model.data.video import make_loader  # noqa: E402
from model.networks.losses import class_balanced_bce, label_frequencies  # noqa: E402
from model.train_video import init_classifier_bias  # noqa: E402
from model.networks.video_model import build_video_model  # noqa: E402

K = 3862
CHANNELS = (128, 128, 128, 128)


def prepare_data(root: Path, train_videos: int, val_videos: int, min_frames: int, max_frames: int) -> None:
    from beam_jobs import preprocess
    from pipeline import synthetic

    common = ["--segments", "--min-frames", str(min_frames), "--max-frames", str(max_frames)]
    synthetic.main(["--out", str(root / "raw/train"), "--videos", str(train_videos), "--shards", "2",
                    "--seed", "31", "--prefix", "train"] + common)
    synthetic.main(["--out", str(root / "raw/val"), "--videos", str(val_videos), "--shards", "1",
                    "--seed", "32", "--prefix", "validate"] + common)
    beam = ["--direct_num_workers", "1"]
    preprocess.run(["--input", str(root / "raw/train/*.tfrecord"), "--output", str(root / "train"),
                    "--pca-dims", "64"] + beam)
    preprocess.run(["--input", str(root / "raw/val/*.tfrecord"), "--output", str(root / "val"),
                    "--whitening", str(root / "train/whitening.npz")] + beam)


def loader(path: Path, shuffle: bool, segment_labels: bool = True, seed: int = 0):
    return make_loader(str(path), batch_size=32, workers=0, num_classes=K, max_frames=300, shuffle=shuffle,
                       shuffle_buffer=64, seed=seed, segment_labels=segment_labels)


def train(net, data: Path, epochs: int, segments: bool) -> float:
    """Adam lr 1e-3; video labels, or rated 5-frame windows with unrated classes ignored. Returns seconds."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    dl = loader(data, shuffle=True)
    t0 = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        dl.dataset.set_epoch(epoch)
        for batch in dl:
            if segments:
                ex = sg.segment_training_examples(batch, K)
                if ex.x.shape[0] == 0:
                    continue
                loss = class_balanced_bce(net(ex.x, ex.mask), ex.targets, ignore=ex.ignore)
            else:
                loss = class_balanced_bce(net(batch["x"], batch["mask"]), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return time.perf_counter() - t0


def segment_maps(net, val: Path) -> dict:
    return {s: sg.rated_segment_map(net, loader(val, shuffle=False), torch.device("cpu"), s).map
            for s in sg.SCORERS}


def quality_table(root: Path, epochs: int, ft_epochs: int) -> list[dict]:
    labels = asge.read_training_labels(str(root / "train"))
    graph, counts = asge.build_label_graph(labels, K)
    emb, _ = asge.fit_asge_seen(graph, counts, seed=0, epochs=asge.DEFAULT_EPOCHS)  # as model.train_video does
    freqs = label_frequencies(labels, K)
    rows = []
    models = (("CMA-SNet", "cma", {}), ("CMA-SNet, softmax attention", "cma", {"attention": "softmax"}),
              ("self-attention-SNet", "self-attn", {}), ("self-attention per class (SNet)", "self-attn-per-class", {}))
    for name, head, head_kw in models:
        torch.manual_seed(0)
        if head == "cma":
            head_kw = {"label_embeddings": emb, **head_kw}
        net = build_video_model(head, "snet", in_dim=64, num_classes=K, backbone_kw={"channels": CHANNELS},
                                **head_kw)
        init_classifier_bias(net, freqs)
        t_video = train(net, root / "train", epochs, segments=False)
        before = segment_maps(net, root / "val")
        tuned = copy.deepcopy(net)
        t_ft = train(tuned, root / "train", ft_epochs, segments=True)
        after = segment_maps(tuned, root / "val")
        rows.append({"model": name, "before": before, "after": after, "t_video": t_video, "t_ft": t_ft})
        print(f"  {name}: video {t_video:.0f}s, fine-tune {t_ft:.0f}s", file=sys.stderr)
    return rows


def throughput(root: Path, scorer: str, copies: int, max_per_class: int) -> dict:
    """tag_segments over ``copies`` copies of the validate shard, in a fresh process."""
    corpus = root / f"corpus{copies}"
    (corpus / "shards").mkdir(parents=True, exist_ok=True)
    shard = sorted((root / "val/shards").glob("*.parquet"))[0]
    for i in range(copies):
        link = corpus / "shards" / f"part-{i:05d}-of-{copies:05d}.parquet"
        if not link.exists():
            link.symlink_to(shard)
    out = root / f"tags_{scorer}_{copies}"
    code = ("import model, json, resource, sys\n"
            "from model import tag_segments\n"
            "s = tag_segments.main(tag_segments.get_args_parser().parse_args(sys.argv[1:]))\n"
            "s['maxrss_kb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print('RESULT ' + json.dumps(s))\n")
    argv = ["--checkpoint", str(root / "cma_default.pt"), "--data", str(corpus), "--out", str(out),
            "--scorer", scorer, "--classes", str(root / "classes.csv"), "--kaggle-csv", str(out / "sub.csv"),
            "--max-per-class", str(max_per_class), "--batch-size", "16", "--workers", "0", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise SystemExit(f"tag_segments failed: {proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    # the Table 4 bench's scale: with a few hundred videos no video model learns the planted evidence
    p.add_argument("--train-videos", type=int, default=3000)
    p.add_argument("--val-videos", type=int, default=400)
    p.add_argument("--min-frames", type=int, default=120, help="shortest generated video (YouTube-8M: 120 s)")
    p.add_argument("--max-frames", type=int, default=300, help="longest generated video (YouTube-8M keeps 300)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--copies", default="1,4",
                   help="corpus sizes for throughput/memory, in copies of the validate shard")
    p.add_argument("--max-per-class", type=int, default=1000,
                   help="Kaggle top-list length while measuring memory (lists fill once a corpus has this many "
                        "windows)")
    args = p.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_segments_"))
    t0 = time.perf_counter()
    if not (root / "val/shards").exists():
        prepare_data(root, args.train_videos, args.val_videos, args.min_frames, args.max_frames)
    rows = quality_table(root, args.epochs, args.finetune_epochs)

    torch.manual_seed(0)
    save_checkpoint(root / "cma_default.pt", {
        "model": build_video_model("cma", "snet", in_dim=64, num_classes=K).state_dict(),
        "args": {"head": "cma", "backbone": "snet", "feature_dim": 64, "num_classes": K, "features": "rgb",
                 "max_frames": 300}})
    (root / "classes.csv").write_text("Index\n" + "\n".join(str(c) for c in range(3, 3003, 3)) + "\n")
    sizes = [int(c) for c in args.copies.split(",")]
    perf = [(scorer, copies, throughput(root, scorer, copies, args.max_per_class)) for scorer in sg.SCORERS
            for copies in sizes]

    print(f"\nSegment MAP on the rated segments of {args.val_videos} validate videos "
          f"(train {args.train_videos} videos; video-level {args.epochs} epochs, fine-tune "
          f"{args.finetune_epochs} epochs, Adam lr 1e-3, SNet channels {CHANNELS[0]}):\n")
    print("| model | scorer | video-level | + segment fine-tuning |")
    print("|---|---|---:|---:|")
    for r in rows:
        for s in sg.SCORERS:
            print(f"| {r['model']} | {s} | {r['before'][s]:.4f} | {r['after'][s]:.4f} |")
    print("\nTagging throughput (model.tag_segments, default-width CMA-SNet, CPU, 1000 classes tracked, "
          f"top {args.max_per_class} per class):\n")
    print("| scorer | videos | segments | segments/s | peak RSS (MB) | RSS vs 1x |")
    print("|---|---:|---:|---:|---:|---:|")
    base = {}
    for scorer, copies, r in perf:
        base.setdefault(scorer, r["maxrss_kb"])
        print(f"| {scorer} | {r['videos']} | {r['segments']} | {r['segments_per_s']:.0f} | "
              f"{r['maxrss_kb'] / 1024:.0f} | {r['maxrss_kb'] / base[scorer]:.2f}x |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, work dir {root}")


if __name__ == "__main__":
    main()
