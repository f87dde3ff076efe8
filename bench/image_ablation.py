"""The paper's Table 3 ablation on synthetic COCO-format data: global pooling vs self-attention vs CMA vs MS-CMA.

    .venv/bin/python bench/image_ablation.py --work W                   # 3 seeds, every head
    .venv/bin/python bench/image_ablation.py --work W --seeds 0 --quick # one seed, small data (minutes)

Data: ``pipeline.synthetic_coco`` (hosts, faint companions drawn small beside their hosts, independent classes,
clutter; exact boxes). Every model trains on the frozen, ImageNet-pretrained EfficientNet-Lite0 with cached maps
(``model.train_image --freeze-backbone --cache-features``: the maps are computed once and shared by every run),
with the same data, seed, optimizer and epochs, and is scored on the validation split: mAP, the mean AP of the
faint companion classes, the Table 1 F1s, and where its attention goes: the lift of each present class's attention
inside its ground-truth boxes (``model.metrics.box_attention``; uniform = 1; for MS-CMA the mean of the three
scales' maps, each upsampled to the finest). Runs are reused when their folder has a finished metrics.json, so a
stopped bench continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import train_image  # noqa: E402
from model.data.coco import read_coco  # noqa: E402
from model.data.map_cache import MapCacheDataset, make_map_loader, read_map_cache  # noqa: E402
from model.engine.image_inference import load_image_model  # noqa: E402
from model.metrics.box_attention import BoxAttentionLift  # noqa: E402
from model.metrics.image import ImageMetrics  # noqa: E402

VARIANTS = [  # (row name, extra model.train_image flags)
    ("global pooling", ["--head", "mean"]),
    ("self-attention (single map)", ["--head", "self-attn"]),
    ("CMA (Eq. 7)", ["--head", "cma", "--cma-attention", "relu"]),
    ("MS-CMA (Eq. 7, 3 scales)", ["--head", "cma", "--scales", "3", "--cma-attention", "relu"]),
    # not in the paper: the softmax attention that model.train_image and model.train_video use by default
    ("CMA, softmax attention", ["--head", "cma", "--cma-attention", "softmax"]),
]


def prepare(work: Path, train_images: int, val_images: int, size: int) -> Path:
    from pipeline import synthetic_coco

    data = work / f"data_{train_images}_{val_images}_{size}"
    if not (data / "config.json").exists():
        synthetic_coco.generate(data, train_images=train_images, val_images=val_images, size=size, seed=0,
                                fmt="jpeg")
    return data


def run_one(work: Path, data: Path, name: str, flags: list[str], seed: int, args) -> Path:
    run = work / "runs" / f"{name.split(' (')[0].replace(' ', '-').replace(',', '')}{'-ms' if '3 scales' in name else ''}_seed{seed}"
    metrics = run / "metrics.json"
    if metrics.exists() and len(json.loads(metrics.read_text())["epochs"]) >= args.epochs:
        return run
    argv = ["--train-ann", str(data / "annotations/instances_train.json"), "--train-images", str(data / "train"),
            "--val-ann", str(data / "annotations/instances_val.json"), "--val-images", str(data / "val"),
            "--out", str(run), "--freeze-backbone", "--cache-features", str(work / f"cache_{data.name}"),
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--workers", "0", "--seed", str(seed), *flags]
    if (run / "last.pt").exists():
        argv.append("--resume")
    train_image.main(train_image.get_args_parser().parse_args(argv))
    return run


@torch.no_grad()
def score(run: Path, data: Path, work: Path, companions: list[int]) -> dict:
    """mAP, companion AP and F1s of best.pt on the cached validation maps, and its attention lift in boxes."""
    loaded = load_image_model(str(run / "best.pt"), torch.device("cpu"))
    model, K = loaded.model, len(loaded.label_map.category_ids)
    manifest = read_coco(str(data / "annotations/instances_val.json"), str(data / "val"), label_map=loaded.label_map)
    by_id = {im.image_id: im for im in manifest.images}
    cache = read_map_cache(work / f"cache_{data.name}" / "val")
    metrics, lift = ImageMetrics(K), BoxAttentionLift(K)
    for batch in make_map_loader(MapCacheDataset(cache, K), batch_size=64, shuffle=False):
        probs = torch.sigmoid(model.forward_maps(batch["maps"]))
        metrics.update(probs.numpy(), batch["labels"].numpy())
        attn = model.attention_from_maps(batch["maps"])  # per scale (B, K, H_l, W_l)
        h, w = attn[0].shape[-2:]
        fused = torch.stack([F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False) for a in attn])
        fused = fused.mean(dim=0)  # (B, K, h, w)
        fused = fused / fused.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        for i, image_id in enumerate(batch["image_ids"]):
            im = by_id[image_id]
            lift.update(fused[i], im.boxes, im.box_labels, im.width, im.height)
    r = metrics.compute()
    comp_index = [loaded.label_map.index_of(c) for c in companions]
    comp_ap = [r["ap"][k] for k in comp_index if r["ap"][k] is not None]
    lifts = lift.compute()
    comp_lift = [lifts["per_class"][k] for k in comp_index if k in lifts["per_class"]]
    return {"map": r["map"], "companion_ap": float(np.mean(comp_ap)), "cf1": r["cf1"], "of1": r["of1"],
            "lift": lifts["lift"], "companion_lift": float(np.mean(comp_lift)) if comp_lift else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="data, cached maps and runs go here (reused on a rerun)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-images", type=int, default=1200)
    p.add_argument("--val-images", type=int, default=400)
    p.add_argument("--size", type=int, default=224, help="side of the generated images")
    p.add_argument("--image-size", type=int, default=224, help="side the model sees")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--only", default=None, help="comma-separated row numbers (1-based)")
    p.add_argument("--quick", action="store_true", help="400 / 200 images at 160 px, 8 epochs")
    args = p.parse_args()
    if args.quick:
        args.train_images, args.val_images, args.size, args.image_size, args.epochs = 400, 200, 160, 160, 8
    torch.set_num_threads(1)
    work = Path(args.work)
    data = prepare(work, args.train_images, args.val_images, args.size)
    structure = json.loads((data / "labels.json").read_text())
    companions = [c["id"] for c in structure["categories"] if c["role"] == "companion"]
    rows = [(i, v) for i, v in enumerate(VARIANTS, 1) if not args.only or str(i) in args.only.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for seed in seeds:  # seed-major, so a stopped bench has every row of the first seeds
        for i, (name, flags) in rows:
            results[(i, seed)] = score(run_one(work, data, name, flags, seed, args), data, work, companions)
    print(f"\nsynthetic COCO ({args.train_images} train / {args.val_images} val images, {args.image_size} px), frozen "
          f"EfficientNet-Lite0, SGD lr 0.01, {args.epochs} epochs, batch {args.batch_size}; mean over seeds "
          f"{args.seeds} (per-seed mAP in the last column); lift: attention mass inside a present class's boxes over "
          f"the boxes' share of the image (uniform = 1)\n")
    print("| # | model | mAP | companion AP | CF1 | OF1 | lift in boxes | companion lift | mAP per seed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for i, (name, _) in rows:
        rs = [results[(i, s)] for s in seeds]
        m = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
        print(f"| {i} | {name} | {100 * m['map']:.1f} | {100 * m['companion_ap']:.1f} | {100 * m['cf1']:.1f} | "
              f"{100 * m['of1']:.1f} | {m['lift']:.2f} | {m['companion_lift']:.2f} | "
              + " / ".join(f"{100 * r['map']:.1f}" for r in rs) + " |")


if __name__ == "__main__":
    main()
