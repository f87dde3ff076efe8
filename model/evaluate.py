"""Evaluate a checkpoint with the YouTube-8M metrics.

    python -m model.evaluate --checkpoint runs/cma/best.pt --data DATA/validate [--out metrics.json]
        [--write-predictions predictions.csv]

Prints Hit@1, PERR, GAP@20 and the YouTube-8M mAP (plus the full-ranking mAP that scikit-learn computes, named
apart), writes them as JSON, and optionally the official video-level submission (``VideoId,LabelConfidencePairs``,
top 20 classes per video) from which anyone can recompute GAP.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, load_checkpoint
from model.data import DataError, dataset_summary, make_loader
from model.device import autocast, resolve_device
from model.metrics import VideoMetrics
from model.submission import VideoPredictionWriter
from model.video_model import build_video_model


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a model.train_video run")
    p.add_argument("--data", required=True, help="shards to evaluate: a preprocess output dir, glob or gs:// path")
    p.add_argument("--out", default=None, help="metrics JSON (default: beside the checkpoint, eval_<data>.json)")
    p.add_argument("--write-predictions", default=None, metavar="FILE.csv",
                   help="also write the top-20 video-level submission CSV")
    p.add_argument("--full-ranking-map", action="store_true",
                   help="also compute scikit-learn's full-ranking mAP (keeps all N x K scores in memory)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    return p


def load_model(checkpoint: str, device: torch.device):
    """Rebuild the model a checkpoint was trained with; returns (model, its training args)."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    a = ckpt.get("args")
    if not isinstance(a, dict) or "head" not in a:
        raise CheckpointError(f"{checkpoint} is not a model.train_video checkpoint (no training args)")
    emb = ckpt["model"].get("head.label_embeddings") if a["head"] == "cma" else None
    model = build_video_model(a["head"], a["backbone"], in_dim=a["feature_dim"], num_classes=a["num_classes"],
                              label_embeddings=emb)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not match a {a['head']}/{a['backbone']} model: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), a


@torch.no_grad()
def predict(model, loader, device):
    """Yields (ids, scores (B, K) float32 numpy, labels (B, K) numpy) per batch."""
    for batch in loader:
        x = batch["x"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        with autocast(device):
            scores = torch.sigmoid(model(x, mask).float())
        yield batch["ids"], scores.cpu().numpy(), batch["labels"].numpy()


def main(args) -> dict:
    device = resolve_device(args.device)
    model, train_args = load_model(args.checkpoint, device)
    features = tuple(train_args["features"].split(","))
    info = dataset_summary(args.data)
    dim = sum(info.feature_dims.get(f, 0) for f in features)
    if dim != train_args["feature_dim"]:
        raise DataError(f"{args.data} has {dict(info.feature_dims)} but the checkpoint was trained on "
                        f"{train_args['features']} with {train_args['feature_dim']} dims")
    loader = make_loader(args.data, batch_size=args.batch_size, workers=args.workers, features=features,
                         num_classes=train_args["num_classes"], max_frames=train_args["max_frames"],
                         shuffle=False, device=device)
    metrics = VideoMetrics(train_args["num_classes"], full_ranking=args.full_ranking_map)
    writer = VideoPredictionWriter(args.write_predictions) if args.write_predictions else None
    n = 0
    for ids, scores, labels in predict(model, loader, device):
        metrics.update(scores, labels)
        if writer is not None:
            writer.write(ids, scores)
        n += len(ids)
    if writer is not None:
        writer.close()
    if n == 0:
        raise DataError(f"no video in {args.data}")
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "videos": n, **metrics.compute()}
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_{Path(args.data).name}.json")
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(format_table(result))
    print(f"wrote {out}" + (f" and {args.write_predictions}" if writer else ""))
    return result


def format_table(r: dict) -> str:
    rows = [("videos", f"{r['videos']}"), ("Hit@1", f"{r['hit_at_1']:.4f}"), ("PERR", f"{r['perr']:.4f}"),
            ("GAP@20", f"{r['gap']:.4f}"), ("mAP (YouTube-8M, top-20)", f"{r['map']:.4f}")]
    if r.get("map_full_ranking") is not None:
        rows.append(("mAP (full ranking, sklearn)", f"{r['map_full_ranking']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v:>8} |" for k, v in rows)


if __name__ == "__main__":
    from model.cli import run_cli
    run_cli(main, get_args_parser())
