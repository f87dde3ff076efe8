"""Evaluate a checkpoint with the YouTube-8M metrics.

    python -m model.evaluate --checkpoint runs/cma/best.pt --data DATA/validate [--out metrics.json]
        [--write-predictions predictions.csv]

Prints Hit@1, PERR, GAP@20 and the YouTube-8M mAP (plus the full-ranking mAP that scikit-learn computes, named
apart), writes them as JSON, and optionally the official video-level submission (``VideoId,LabelConfidencePairs``,
top 20 classes per video) from which anyone can recompute GAP.

The label-prior baseline (every video scored with the training label frequencies; ``model.networks.prior``), the number a
model must beat to show it learned from the frames:

    python -m model.evaluate --prior-from DATA/train --data DATA/validate [--out metrics.json]

Segment level (2019 challenge), on data with segment ratings:

    python -m model.evaluate --segments --checkpoint CKPT --data DATA/validate [--scorer frames|context]
        [--classes segment_label_ids.csv] [--k 100000]
    python -m model.evaluate --segments --submission submission.csv --data DATA/validate

The first ranks every 5-second window of every video per class (bounded top lists of ``--k``) and scores the
ranking (``model.engine.segments.rated_segment_map``, the same call that validates ``model.train_video
--segment-labels``); the second scores an existing ``Class,Segments`` file, ours or anyone's (no checkpoint
needed). Both report segment MAP@K exactly as ``model.metrics.video.segment_map_report`` defines it (positive ratings
past a video's last frame count as misses; submitted classes without a positive rating are left out of the mean),
with per-class AP in the JSON.

Images (a ``model.train_image`` checkpoint on COCO-format data), the paper's Table 1 block (mAP, CP, CR, CF1, OP,
OR, OF1, and the same six on each image's top-3 labels; ``model.metrics.image``):

    python -m model.evaluate --image --checkpoint CKPT --ann B.json --images DIR [--write-predictions P.csv]

``P.csv`` has the header ``ImageId,LabelConfidencePairs`` and one row per evaluated image: its COCO image id, then
``category_id probability`` pairs for every class.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from model.engine.checkpoint import CheckpointError, load_checkpoint
from model.data.video import DataError, dataset_summary, make_loader
from model.engine.device import autocast, resolve_device
from model.metrics.video import SEGMENT_TOP_K, VideoMetrics, segment_map_report
from model.engine.submission import VideoPredictionWriter
from model.engine.segments import read_segment_ratings  # noqa: F401  (also model.evaluate's public name)
from model.networks.video_model import build_model, resolve_legacy_head


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="best.pt or last.pt of a model.train_video run (not needed with --submission)")
    p.add_argument("--data", default=None, help="shards to evaluate: a preprocess output dir, glob or gs:// path")
    p.add_argument("--out", default=None, help="metrics JSON (default: beside the checkpoint, eval_<data>.json; with --prior-from: "
                        "./eval_prior_<data>.json)")
    p.add_argument("--write-predictions", default=None, metavar="FILE.csv",
                   help="also write the top-20 video-level submission CSV")
    p.add_argument("--full-ranking-map", action="store_true",
                   help="also compute scikit-learn's full-ranking mAP (keeps all N x K scores in memory)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--prior-from", default=None, metavar="TRAIN_DATA",
                   help="instead of a checkpoint: score every video with the label frequencies of these training "
                        "shards (the label-prior baseline)")
    p.add_argument("--num-classes", type=int, default=3862, help="K of --prior-from's scores")
    g = p.add_argument_group("segment level (2019 challenge)")
    g.add_argument("--segments", action="store_true", help="segment MAP@K on the rated segments of --data")
    g.add_argument("--submission", default=None, metavar="FILE.csv",
                   help="score this Class,Segments file instead of a checkpoint's predictions")
    g.add_argument("--scorer", default=None, help="segment scorer: frames or context (default: model.engine.segments')")
    g.add_argument("--classes", default=None, metavar="FILE",
                   help="classes to rank (segment_label_ids.csv format); default: the rated classes of --data")
    g.add_argument("--k", type=int, default=SEGMENT_TOP_K, help="MAP@K cut per class")
    g = p.add_argument_group("images (model.train_image checkpoints)")
    g.add_argument("--image", action="store_true", help="evaluate an image checkpoint on COCO-format data")
    g.add_argument("--ann", default=None, help="COCO instances JSON")
    g.add_argument("--images", default=None, help="folder of the images --ann names")
    g.add_argument("--keep-empty", action="store_true", help="also score images without annotations")
    return p


def load_model(checkpoint: str, device: torch.device):
    """Rebuild the model a checkpoint was trained with; returns (model, its training args)."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu")  # also checks the archive's CRC-32s
    a = ckpt.get("args")
    if not isinstance(a, dict) or "head" not in a:
        raise CheckpointError(f"{checkpoint} is not a model.train_video checkpoint (no training args)")
    if a.get("task") == "image":
        raise CheckpointError(f"{checkpoint} is an image checkpoint (model.train_image): evaluate it with --image "
                              f"--ann FILE --images DIR")
    a = resolve_legacy_head(a, ckpt["model"])  # per-class self-attention saved as "self-attn" before
    emb = ckpt["model"].get("head.label_embeddings") if a["head"] == "cma" else None
    model = build_model(a, label_embeddings=emb)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not match a {a['head']}/{a['backbone']} model: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), a


def check_feature_dims(data: str, train_args: dict):
    """(the checkpoint's feature names, the shards' summary), after checking that the shards at ``data`` carry
    those features at the dims the checkpoint was trained on."""
    features = tuple(train_args["features"].split(","))
    info = dataset_summary(data)
    dim = sum(info.feature_dims.get(f, 0) for f in features)
    if dim != train_args["feature_dim"]:
        raise DataError(f"{data} has {dict(info.feature_dims)} but the checkpoint was trained on "
                        f"{train_args['features']} with {train_args['feature_dim']} dims")
    return features, info


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
    if args.image:
        return main_image(args)
    if args.data is None:
        raise DataError("--data is required (or --image with --ann and --images)")
    if args.segments or args.submission:
        return main_segments(args)
    if args.prior_from:
        if args.checkpoint:
            raise CheckpointError("give --checkpoint or --prior-from, not both")
        from model.networks.prior import label_prior, predict_prior

        num_classes, source = args.num_classes, {"prior_from": str(args.prior_from)}
        predictions = predict_prior(label_prior(args.prior_from, num_classes), args.data)
        default_out = Path(f"eval_prior_{Path(args.data).name}.json")
    else:
        if not args.checkpoint:
            raise CheckpointError("--checkpoint is required (except with --prior-from or --segments --submission)")
        device = resolve_device(args.device)
        model, train_args = load_model(args.checkpoint, device)
        features, _ = check_feature_dims(args.data, train_args)
        loader = make_loader(args.data, batch_size=args.batch_size, workers=args.workers, features=features,
                             num_classes=train_args["num_classes"], max_frames=train_args["max_frames"],
                             shuffle=False, device=device)
        num_classes, source = train_args["num_classes"], {"checkpoint": str(args.checkpoint)}
        predictions = predict(model, loader, device)
        default_out = Path(args.checkpoint).with_name(f"eval_{Path(args.data).name}.json")
    metrics = VideoMetrics(num_classes, full_ranking=args.full_ranking_map)
    writer = VideoPredictionWriter(args.write_predictions) if args.write_predictions else None
    n = 0
    for ids, scores, labels in predictions:
        metrics.update(scores, labels)
        if writer is not None:
            writer.write(ids, scores)
        n += len(ids)
    if writer is not None:
        writer.close()
    if n == 0:
        raise DataError(f"no video in {args.data}")
    result = {**source, "data": str(args.data), "videos": n, **metrics.compute()}
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
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


def main_image(args) -> dict:
    """The Table 1 block of an image checkpoint on a COCO-format split."""
    from model.data.coco import read_coco
    from model.data.images import CocoImageDataset, eval_transform, make_image_loader
    from model.engine.image_inference import BrokenImages, load_image_model, predict_images
    from model.engine.submission import ImagePredictionWriter
    from model.metrics.image import ImageMetrics, format_table1

    if not (args.checkpoint and args.ann and args.images):
        raise DataError("--image needs --checkpoint, --ann and --images")
    device = resolve_device(args.device)
    loaded = load_image_model(args.checkpoint, device)
    manifest = read_coco(args.ann, args.images, keep_empty=args.keep_empty, label_map=loaded.label_map)
    size = int(loaded.args["image_size"])
    loader = make_image_loader(CocoImageDataset(manifest, eval_transform(size, loaded.mean, loaded.std)),
                               batch_size=args.batch_size, shuffle=False, workers=args.workers)
    metrics, broken = ImageMetrics(len(loaded.label_map.category_ids)), BrokenImages()
    writer = (ImagePredictionWriter(args.write_predictions, loaded.label_map.category_ids)
              if args.write_predictions else None)
    n = 0
    for image_ids, probs, labels in predict_images(loaded.model, loader, device, broken):
        metrics.update(probs, labels)
        if writer is not None:
            writer.write(image_ids, probs)
        n += len(image_ids)
    if writer is not None:
        writer.close()
    if n == 0:
        raise DataError(f"no readable image in {args.images} for {args.ann}")
    result = {"checkpoint": str(args.checkpoint), "ann": str(args.ann), "images": n,
              "dropped_empty": manifest.dropped_empty, "broken_images": broken.summary(), **metrics.compute()}
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_{Path(args.ann).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if broken.count:
        print(broken.line("evaluation"))
    print(f"{n} images ({manifest.dropped_empty} without annotations dropped)")
    print(format_table1(result))
    print(f"wrote {out}" + (f" and {args.write_predictions}" if writer else ""))
    return result


def main_segments(args) -> dict:
    """Segment MAP@K of a checkpoint (every window ranked) or of an existing submission CSV."""
    from model.engine.segments import DEFAULT_SCORER, SCORERS, SegmentError, rated_segment_map, read_class_ids
    from model.engine.submission import read_segment_submission

    if args.k < 1:
        raise SegmentError(f"--k must be >= 1, got {args.k}")
    ratings = read_segment_ratings(args.data)
    if ratings.num_ratings == 0:
        raise DataError(f"{args.data} holds no segment rating")
    result = {"data": str(args.data), "k": args.k, "ratings": ratings.num_ratings,
              "rated_classes": len(ratings)}
    if args.submission:
        if args.checkpoint:
            raise SegmentError("give --checkpoint or --submission, not both")
        rep = segment_map_report(read_segment_submission(args.submission), ratings, args.k)
        result["submission"] = str(args.submission)
        default_out = Path(args.submission).with_name(f"eval_segments_{Path(args.data).name}.json")
    else:
        if not args.checkpoint:
            raise CheckpointError("--segments needs --checkpoint (or --submission FILE.csv)")
        scorer = args.scorer or DEFAULT_SCORER
        if scorer not in SCORERS:
            raise SegmentError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        device = resolve_device(args.device)
        model, train_args = load_model(args.checkpoint, device)
        features = tuple(train_args["features"].split(","))
        num_classes = int(train_args["num_classes"])
        classes = read_class_ids(args.classes) if args.classes else np.array(sorted(ratings), dtype=np.int64)
        if classes.max() >= num_classes:
            raise SegmentError(f"class {int(classes.max())} is outside the model's {num_classes} classes")
        loader = make_loader(args.data, batch_size=args.batch_size, workers=args.workers, features=features,
                             num_classes=num_classes, max_frames=train_args["max_frames"], shuffle=False,
                             device=device)
        # the same call model.train_video --segment-labels validates (and picks best.pt) with
        rep = rated_segment_map(model, loader, device, scorer, args.k, ratings=ratings, classes=classes)
        result.update(checkpoint=str(args.checkpoint), scorer=scorer, windows=rep.windows)
        default_out = Path(args.checkpoint).with_name(f"eval_segments_{Path(args.data).name}.json")
    result.update(segment_map=rep.map, classes=rep.classes, scored_classes=rep.scored_classes,
                  positives=rep.positives, predictions=rep.predictions, hits=rep.hits,
                  unrated=rep.unrated, truncated=rep.truncated, duplicates=rep.duplicates,
                  rated_classes_not_submitted=rep.rated_classes_not_submitted,
                  classes_without_positives=len(rep.classes_without_positives),
                  per_class_ap={str(c): ap for c, ap in sorted(rep.per_class_ap.items())})
    out = Path(args.out) if args.out else default_out
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"| segment MAP@{args.k} | {rep.map:.4f} |\n| classes (with a positive) | {rep.classes} "
          f"({rep.scored_classes}) |\n| rated predictions | "
          f"{rep.predictions - rep.unrated - rep.duplicates} |\n| hits | {rep.hits} |")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    from model.engine.cli import run_cli
    run_cli(main, get_args_parser())
