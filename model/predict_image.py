"""Tag images with a trained image checkpoint: one line per image with its class names and probabilities.

    python -m model.predict_image --checkpoint runs/img/best.pt photos/ more/*.jpg gs://bucket/img.png
        [--threshold 0.5] [--top-k K] [--out tags.jsonl|tags.csv] [--explain DIR]

INPUT is any mix of image files, folders (searched recursively), globs and fsspec URLs. A line lists the classes
whose probability is at least --threshold, highest first, at most --top-k of them (``--threshold 0 --top-k 5``: the
five most likely, whatever their probability). Without --out the lines go to stdout. Images that cannot be read
(truncated, not an image) are skipped and counted on stderr; grayscale, CMYK, palette and 16-bit images are
converted to RGB. ``--explain DIR`` writes one PNG per image in the manner of the paper's Fig. 4: the image, then
each predicted class's attention over it (with MS-CMA, the mean of the three scales' maps, each upsampled to the
image: Eq. 11 weighs the scales equally).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.data.images import ImageFileDataset, eval_transform, load_rgb, make_image_loader
from model.engine.device import resolve_device
from model.engine.image_inference import BrokenImages, load_image_model, predict_images
from pipeline.errors import Yt8mError


class PredictError(Yt8mError):
    """Bad prediction options (an unknown output format, a threshold outside [0, 1])."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a model.train_image run")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or fsspec URLs")
    p.add_argument("--threshold", type=float, default=0.5, help="list classes with at least this probability")
    p.add_argument("--top-k", type=int, default=None, help="at most this many classes per image")
    p.add_argument("--out", default=None, help="F.jsonl or F.csv (default: lines on stdout)")
    p.add_argument("--explain", default=None, metavar="DIR", help="write per-class attention figures (Fig. 4) here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    return p


def select_labels(probs: np.ndarray, threshold: float, top_k: int | None) -> list[int]:
    """Class indices with probability >= threshold, highest first (ties: lower index first), at most top_k."""
    order = np.lexsort((np.arange(probs.shape[0]), -probs))
    keep = [int(k) for k in order if probs[k] >= threshold]
    return keep[:top_k] if top_k is not None else keep


class TagWriter:
    """One line per image, as JSON lines, CSV (``path,labels`` with ``name:probability`` joined by ``;``) or text."""

    def __init__(self, out: str | None, names: tuple, category_ids: tuple):
        self.names, self.category_ids = names, category_ids
        self.kind = "text" if out is None else Path(out).suffix.lower().lstrip(".")
        if self.kind not in ("text", "jsonl", "csv"):
            raise PredictError(f"--out must end in .jsonl or .csv, got {out}")
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        self._file = sys.stdout if out is None else open(out, "w", newline="")
        self._csv = csv.writer(self._file) if self.kind == "csv" else None
        if self._csv is not None:
            self._csv.writerow(["path", "labels"])
        self.lines = 0

    def write(self, path: str, labels: list[int], probs: np.ndarray) -> None:
        if self.kind == "jsonl":
            tags = [{"name": self.names[k], "category_id": int(self.category_ids[k]),
                     "probability": round(float(probs[k]), 6)} for k in labels]
            self._file.write(json.dumps({"path": path, "labels": tags}) + "\n")
        elif self.kind == "csv":
            self._csv.writerow([path, ";".join(f"{self.names[k]}:{probs[k]:.6f}" for k in labels)])
        else:
            self._file.write(f"{path}: " + ", ".join(f"{self.names[k]} {probs[k]:.3f}" for k in labels) + "\n")
        self.lines += 1

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()


def write_attention_figure(path: Path, image, attention: list[torch.Tensor], labels: list[int], names: tuple,
                           probs: np.ndarray) -> None:
    """The image and, per listed class, its attention (the mean over scales, each bilinearly upsampled)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: figures go to files only
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    img = np.asarray(image.convert("RGB"))
    H, W = img.shape[:2]
    shown = labels[:6] if labels else []
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(3 * (1 + len(shown)), 3.2), squeeze=False)
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, k in zip(axes[0, 1:], shown):
        maps = [F.interpolate(a[k][None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
                for a in attention]  # each (H, W)
        heat = torch.stack(maps).mean(dim=0).numpy()
        ax.imshow(img)
        ax.imshow(heat, cmap="jet", alpha=0.5)
        ax.set_title(f"{names[k]} {probs[k]:.2f}", fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args) -> dict:
    if not 0.0 <= args.threshold <= 1.0:
        raise PredictError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.top_k is not None and args.top_k < 1:
        raise PredictError(f"--top-k must be >= 1, got {args.top_k}")
    device = resolve_device(args.device)
    loaded = load_image_model(args.checkpoint, device)
    size = int(loaded.args["image_size"])
    transform = eval_transform(size, loaded.mean, loaded.std)
    dataset = ImageFileDataset(args.inputs, transform)
    loader = make_image_loader(dataset, batch_size=args.batch_size, shuffle=False, workers=args.workers)
    names, cat_ids = loaded.label_map.names, loaded.label_map.category_ids
    writer = TagWriter(args.out, names, cat_ids)
    broken = BrokenImages()
    tagged = figures = 0
    bar = tqdm(total=len(dataset), unit="img", desc="predict", leave=False, dynamic_ncols=True,
               disable=not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") is None)
    try:
        for paths, probs, _ in predict_images(loaded.model, loader, device, broken):
            for path, p in zip(paths, probs):
                labels = select_labels(p, args.threshold, args.top_k)
                writer.write(path, labels, p)
                if args.explain:
                    image = load_rgb(path)
                    x = transform(image)[None].to(device)
                    attention = [a[0].cpu() for a in loaded.model.attention(x)]
                    write_attention_figure(Path(args.explain) / f"{figures:05d}_{Path(path).stem}.png", image,
                                           attention, labels, names, p)
                    figures += 1
            tagged += len(paths)
            bar.update(len(paths))
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
        writer.close()
    if broken.count:
        print(broken.line("input"), file=sys.stderr)
    print(f"tagged {tagged} image(s)" + (f" -> {args.out}" if args.out else "")
          + (f"; {figures} attention figure(s) in {args.explain}" if args.explain else ""), file=sys.stderr)
    return {"tagged": tagged, "broken": broken.count, "figures": figures}


if __name__ == "__main__":
    from model.engine.cli import run_cli
    run_cli(main, get_args_parser())
