"""Train a video classifier (CMA + ASGE by default) on Parquet shards written by ``beam_jobs.preprocess``.

    python -m model.train_video --train DATA/train --val DATA/validate --out runs/cma

Defaults are the paper's (section 4.2): SGD momentum 0.9, lr 0.0002 decayed by 0.8 every 2e6 samples, batch 256,
beta 0. The run directory gets ``config.json`` (resolved flags), ``metrics.json`` (one entry per epoch),
``last.pt`` / ``best.pt`` (by validation GAP) and TensorBoard scalars under ``tb/``.

Segment fine-tuning (2019 challenge recipe: video labels first, then a few thousand steps on rated segments):

    python -m model.train_video --segment-labels --init runs/cma/best.pt --train DATA/validate_a --val DATA/validate_b ...

Each rated (video, segment) becomes a 5-frame example whose targets are its ratings (1/0); unrated classes are
ignored by the loss. Validation (and best.pt) then uses the segment MAP@100000 of --val computed by the same call
as ``model.evaluate --segments`` (``model.engine.segments.rated_segment_map``: every window ranked, ratings read from the
shards), so ``metrics.json``'s ``val_segment_map`` of the best epoch is what ``model.evaluate`` reports for best.pt
when it runs with the same --batch-size (batching can move scores by float rounding, and so break ties).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.networks import asge
from model.engine.checkpoint import (CheckpointError, capture_rng_state, check_compatible, load_checkpoint,
                                     load_latest_checkpoint,
                              restore_rng_state, save_epoch, to_plain, write_json)
from model.data.global_batches import DEFAULT_STREAMS, iter_steps, make_global_loader
from model.data.video import DataError, dataset_summary, make_loader
from model.engine import distributed
from model.engine.device import autocast
from model.networks.losses import ClassBalancedBCE, label_frequencies
from model.metrics.video import VideoMetrics
from model.engine.segments import rated_segment_map, read_segment_ratings, segment_training_examples
from model.networks.heads import CMA_ATTENTION, HEADS, init_bias_to_prior
from model.networks.video_model import CMA_FLAG_DEFAULTS, build_model, resolve_legacy_head

# Flags a checkpoint must agree on before it can be resumed or used by --init: they fix the architecture.
ARCH_KEYS = ("head", "backbone", "features", "num_classes", "feature_dim", "width", "cma_attention", "cma_scale",
             "finetune_label_emb")


def arch_keys(head: str) -> list[str]:
    """The ``ARCH_KEYS`` that shape a model with this head: the CMA flags only matter to the CMA head."""
    return [k for k in ARCH_KEYS if head == "cma" or k not in CMA_FLAG_DEFAULTS]


def with_arch_defaults(ckpt_args, model_state=None):
    """A checkpoint's args with ``CMA_FLAG_DEFAULTS`` filled in where they predate those flags and, given its
    weights, the head renamed where the name changed meaning (``video_model.resolve_legacy_head``)."""
    if not isinstance(ckpt_args, dict):
        return ckpt_args
    a = {**CMA_FLAG_DEFAULTS, **ckpt_args}
    return resolve_legacy_head(a, model_state) if model_state is not None else a


def adopt_legacy_head(args, saved_args, resolved_args, source: str) -> None:
    """``--head self-attn`` on a checkpoint that saved the per-class head under that name (before the paper's
    single-map head took it) continues with the checkpoint's head, so old runs resume and --init as before."""
    if (args.head == "self-attn" and isinstance(saved_args, dict) and saved_args.get("head") == "self-attn"
            and resolved_args.get("head") == "self-attn-per-class"):
        print(f"{source}: per-class self-attention saved as 'self-attn' (before the paper's single-map head took "
              f"the name); continuing with --head self-attn-per-class", file=sys.stderr)
        args.head = "self-attn-per-class"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    p.add_argument("--train", required=True, help="training shards: a preprocess output dir, glob or gs:// path")
    p.add_argument("--val", default=None, help="validation shards (metrics each epoch, best.pt by GAP)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--head", choices=tuple(HEADS), default="cma",
                   help="cma (the paper's); self-attn: the paper's baseline, one attention map shared by all "
                        "classes; self-attn-per-class: one map per class; mean: mean pooling")
    p.add_argument("--backbone", choices=("snet", "fc"), default="snet")
    p.add_argument("--features", default="rgb", choices=("rgb", "rgb,audio"))
    # The paper gives no width. 128 trains 4-5x faster on a CPU but cost 0.05 GAP on the real video-level shards
    # (README, "Real YouTube-8M data"), so the default stays 512.
    p.add_argument("--width", type=int, default=512, help="channels of every SNet stage / both FC layers")
    p.add_argument("--num-classes", type=int, default=3862)
    p.add_argument("--max-frames", type=int, default=300)
    p.add_argument("--label-emb", default=None,
                   help="label embeddings from `python -m model.asge`; 'random' for the embedding ablation; "
                        "default: fit ASGE on the training labels first")
    p.add_argument("--asge-epochs", type=int, default=asge.DEFAULT_EPOCHS)
    # Not the paper's Eq. 7 by default: on planted data at the default 1024 dims and width 512 (1200 videos), Eq. 7
    # lost to mean pooling (GAP 0.208 against 0.291) while the softmax beat it (0.357); README, Table 4 section.
    p.add_argument("--cma-attention", choices=CMA_ATTENTION, default="softmax",
                   help="softmax (default, not in the paper): softmax of --cma-scale x cosine over time; relu: the "
                        "paper's Eq. 7-8, weights proportional to the cosines")
    p.add_argument("--cma-scale", type=float, default=CMA_FLAG_DEFAULTS["cma_scale"],
                   help="scale of --cma-attention softmax")
    p.add_argument("--finetune-label-emb", action="store_true",
                   help="train the label embeddings with the model (the paper keeps the ASGE output fixed)")
    p.add_argument("--alpha", type=float, default=0.1, help="ASGE relaxation (paper, video: 0.1)")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the visual features entering the head")
    p.add_argument("--lr-decay", type=float, default=0.8, help="multiply the lr by this every --lr-decay-samples")
    p.add_argument("--lr-decay-samples", type=float, default=2e6)
    p.add_argument("--beta", type=float, default=0.0, help="class-balance exponent of Eq. 12 (paper, video: 0)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256,
                   help="global batch: all torchrun processes together; schedules count global samples")
    p.add_argument("--shuffle-buffer", type=int, default=2048, help="videos buffered for shuffling, all streams")
    p.add_argument("--data-streams", type=int, default=DEFAULT_STREAMS,
                   help="training data streams (model.data.global_batches): batches depend on the seed and this, "
                        "not on process or worker counts; must be >= processes x workers")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds any torchrun collective may wait before the job fails")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("segment fine-tuning (2019 challenge)")
    g.add_argument("--segment-labels", action="store_true",
                   help="train on the rated segments of --train (5-frame windows; unrated classes ignored by the "
                        "loss); validate (and pick best.pt) by the segment MAP@100000 of --val, the number "
                        "model.evaluate --segments gives")
    g.add_argument("--init", default=None, metavar="CKPT",
                   help="start from the weights of this checkpoint (e.g. a video-level run's best.pt)")
    g.add_argument("--segment-scorer", default="frames", choices=("frames", "context"),
                   help="scorer of the segment MAP validation (see model.engine.segments)")
    return p


def build_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def build_scheduler(args, optimizer):
    # The paper decays per samples seen, not per epoch; one scheduler step is one batch of --batch-size samples.
    steps_per_decay = max(1, int(args.lr_decay_samples // args.batch_size))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_decay, gamma=args.lr_decay)


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, ctx, epoch, args, writer=None, step=0):
    """One pass over the training data, one optimizer step per global batch (``model.data.global_batches``).

    Each rank's loss is the sum over its examples divided by the global example count, times the world size
    (DistributedDataParallel averages gradients over ranks), so every step is the step one process would take on
    the whole global batch. A rank with no example in a step still runs forward and backward (on nothing), because
    the gradient all-reduce and the batch norm statistics need every rank.
    """
    model.train()
    device = ctx.device
    total, count = 0.0, 0
    steps = loader.dataset.steps_in_epoch(epoch)
    if args.max_steps_per_epoch is not None:
        steps = min(steps, args.max_steps_per_epoch)
    bar = tqdm(iter_steps(loader), total=steps, desc=f"epoch {epoch}", unit="batch", leave=False,
               dynamic_ncols=True,
               disable=not ctx.is_main or (not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") is None))
    t0 = time.perf_counter()
    for i, batch in enumerate(bar):
        if i >= steps:
            break
        ignore = None
        if args.segment_labels:
            ex = segment_training_examples(batch, args.num_classes)
            x, mask = ex.x.to(device), ex.mask.to(device)
            y, ignore = ex.targets.to(device), ex.ignore.to(device)
        else:
            x = batch["x"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            y = batch["labels"].to(device, non_blocking=True)
        n_local = x.shape[0]
        n_global = distributed.all_reduce_sum(n_local, ctx)
        if n_global == 0:  # no rated segment in this step's batch, on any rank
            continue
        with autocast(device):
            logits = model(x, mask)
        local = loss_fn(logits.float(), y, ignore) if n_local else logits.float().sum() * 0.0
        loss = distributed.share_of_global_mean(local, n_local, n_global, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        total += local.item() * n_local
        count += n_local
        rate = count * ctx.world_size / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{local.item():.4f}", samples_s=f"{rate:.0f}")
        if writer is not None:
            writer.add_scalar("train/loss", local.item(), step)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
    total, count = distributed.all_reduce_sum(total, ctx), int(distributed.all_reduce_sum(count, ctx))
    if count == 0:
        raise DataError(f"the training data yielded no batch: {args.train}")
    return {"loss": total / count, "samples": count,
            "samples_per_s": count / max(time.perf_counter() - t0, 1e-9)}, step


def evaluate(model, loader, device, num_classes, ctx=None):
    """Validation metrics. Under torchrun each rank scores its part of the split and the accumulators merge
    exactly (``VideoMetrics.merge``), so every rank gets the numbers one process would."""
    from model.evaluate import predict  # local: model.evaluate is an entry point of its own

    model.eval()
    distributed_run = ctx is not None and ctx.distributed
    metrics = VideoMetrics(num_classes, exact_limit=None) if distributed_run else VideoMetrics(num_classes)
    for ids, scores, labels in predict(model, loader, device):
        metrics.update(scores, labels)
    if distributed_run:
        parts = distributed.all_gather_objects(metrics, ctx)
        metrics = VideoMetrics(num_classes)
        for part in parts:
            metrics.merge(part)
    if metrics.num_videos == 0:
        raise DataError("the evaluation data yielded no video")
    return metrics.compute()


def load_label_embeddings(args, label_lists, device, out_dir: Path, ctx=None):
    """(K, E) label embeddings: from a file, random (ablation), or fitted here with ASGE on the training labels
    (under torchrun: fitted once, by rank 0, and sent to the others)."""
    if args.label_emb == "random":
        g = torch.Generator().manual_seed(args.seed)
        return torch.randn(args.num_classes, asge.EMBED_DIM, generator=g)
    if args.label_emb:
        emb = asge.load_embeddings(args.label_emb)
    elif ctx is not None and ctx.distributed:
        emb = load_label_embeddings(args, label_lists, device, out_dir) if ctx.is_main else None
        return distributed.broadcast_object(emb.cpu() if emb is not None else None, ctx)
    else:
        graph, counts = asge.build_label_graph(label_lists, args.num_classes)
        emb, history = asge.fit_asge_seen(graph, counts, epochs=args.asge_epochs, alpha=args.alpha,
                                          seed=args.seed, device=device)
        corr = asge.embedding_graph_correlation(emb, graph, classes=np.flatnonzero(counts))
        asge.save_embeddings(out_dir / "label_emb.pt", emb, graph_correlation=corr,
                             final_loss=history[-1], alpha=args.alpha)
        print(f"ASGE: fitted the {np.count_nonzero(counts)} classes seen in training (of {args.num_classes}), "
              f"final loss {history[-1]:.4f}, corr(cos, A') over them {corr:.3f}")
    if emb.shape[0] != args.num_classes:
        raise CheckpointError(f"label embeddings have {emb.shape[0]} classes but --num-classes is "
                              f"{args.num_classes}")
    return emb


def init_classifier_bias(model, freqs, floor: float = 1e-4) -> None:
    """The head's biases at the label prior's log-odds (``heads.init_bias_to_prior``): at the paper's lr 0.0002,
    learning the prior from zero biases would take thousands of steps."""
    init_bias_to_prior(model.head.classifier, freqs, floor)


def load_init_checkpoint(args) -> dict:
    """``--init``: another run's checkpoint (same architecture), e.g. video-level training before segment
    fine-tuning. Only its weights are used; optimizer, schedule and epoch start fresh."""
    ckpt = load_checkpoint(args.init, map_location="cpu")
    a = with_arch_defaults(ckpt.get("args") or {}, ckpt.get("model") or {})
    adopt_legacy_head(args, ckpt.get("args"), a, f"--init {args.init}")
    check_compatible(a, vars(args), [k for k in arch_keys(args.head) if k in a])
    return ckpt


def init_from_checkpoint(model, args, ckpt: dict) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"--init {args.init}: {str(e).splitlines()[0]}") from None


def main(args) -> dict:
    """Train; under torchrun (``WORLD_SIZE`` > 1) as one rank of a data-parallel job (``model.engine.distributed``)."""
    return distributed.run(_train, args)


def _train(args, ctx) -> dict:
    out = Path(args.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = ctx.device
    features = tuple(args.features.split(","))
    info = dataset_summary(args.train)
    args.feature_dim = sum(info.feature_dims[f] for f in features if f in info.feature_dims)
    train_loader = make_global_loader(args.train, batch_size=args.batch_size, workers=args.workers,
                                      num_streams=args.data_streams, features=features,
                                      num_classes=args.num_classes, max_frames=args.max_frames, shuffle=True,
                                      shuffle_buffer=args.shuffle_buffer, seed=args.seed, device=device,
                                      segment_labels=args.segment_labels)
    val_loader = val_ratings = None
    if args.val and args.segment_labels:
        val_ratings = read_segment_ratings(args.val)  # all of them, also ratings past a video's last frame
    if args.val:
        # Segment MAP ranks every window of the split at once, so rank 0 scores all of it; video-level metrics
        # are computed on each rank's part and merged.
        whole = {"rank": 0, "world_size": 1} if args.segment_labels else {}
        val_loader = make_loader(args.val, batch_size=args.batch_size, workers=args.workers, features=features,
                                 num_classes=args.num_classes, max_frames=args.max_frames, shuffle=False,
                                 device=device, segment_labels=args.segment_labels, **whole)

    resume_path = out / "last.pt"
    ckpt = None
    if args.resume:
        ckpt, resume_path = load_latest_checkpoint(resume_path)
        stored = with_arch_defaults(ckpt["args"], ckpt["model"])
        adopt_legacy_head(args, ckpt["args"], stored, str(resume_path))
        check_compatible(stored, vars(args), arch_keys(args.head))
    init = load_init_checkpoint(args) if args.init and ckpt is None else None
    train_labels = asge.read_training_labels(args.train)
    label_emb = None
    if args.head == "cma":
        source = ckpt if ckpt is not None else init
        label_emb = (source["model"]["head.label_embeddings"] if source is not None
                     else load_label_embeddings(args, train_labels, device, out, ctx))
    model = build_model(args, label_embeddings=label_emb).to(device)
    optimizer = build_optimizer(args, model.parameters())
    scheduler = build_scheduler(args, optimizer)
    freqs = label_frequencies(train_labels, args.num_classes)
    if ckpt is None:
        init_classifier_bias(model, freqs)
    loss_fn = ClassBalancedBCE(beta=args.beta, label_freq=freqs if args.beta else None).to(device)
    if init is not None:
        init_from_checkpoint(model, args, init)

    start_epoch, step, best_gap, history = 0, 0, -math.inf, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, best_gap = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_metric"]
        history = json.loads((out / "metrics.json").read_text())["epochs"] if (out / "metrics.json").exists() else []
        history = [h for h in history if h["epoch"] <= ckpt["epoch"]]  # resuming from an earlier (previous) file
        restore_rng_state(ckpt["rng"])
        if ctx.is_main:
            print(f"resumed from {resume_path} at epoch {start_epoch}")
    net, model = model, distributed.wrap_model(model, ctx)  # net: the bare model (checkpoints, evaluation)
    if ctx.is_main:
        write_json(out / "config.json", {k: v for k, v in sorted(vars(args).items())})
        if ctx.distributed:
            print(f"torchrun: {ctx.world_size} processes on {device.type}, global batch {args.batch_size}")

    writer = _tensorboard(out) if ctx.is_main else None
    for epoch in range(start_epoch, args.epochs):
        train_loader.dataset.set_epoch(epoch)
        train_stats, step = train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, ctx, epoch,
                                            args, writer, step)
        record = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                  **{f"train_{k}": v for k, v in train_stats.items()}}
        if val_loader is not None and args.segment_labels:
            rep_ = None
            if ctx.is_main:
                rep_ = rated_segment_map(net, val_loader, device, args.segment_scorer, ratings=val_ratings)
            rep_ = distributed.broadcast_object(rep_, ctx)
            record.update(val_segment_map=rep_.map, val_segment_classes=rep_.scored_classes)
            if writer is not None:
                writer.add_scalar("val/segment_map", rep_.map, epoch)
        elif val_loader is not None:
            val = evaluate(net, val_loader, device, args.num_classes, ctx)
            record.update({f"val_{k}": v for k, v in val.items()})
            if writer is not None:
                for k in ("gap", "hit_at_1", "perr", "map"):
                    writer.add_scalar(f"val/{k}", val[k], epoch)
        gap = record.get("val_segment_map" if args.segment_labels else "val_gap", -train_stats["loss"])
        is_best = gap > best_gap
        best_gap = max(best_gap, gap)
        history.append(record)
        if ctx.is_main:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step, "best_metric": best_gap,
                     "args": to_plain(vars(args)), "rng": capture_rng_state()}
            save_epoch(out, state, {"epochs": history, "best_val_gap": best_gap if args.val else None}, is_best)
            print(_epoch_line(record))
        distributed.barrier(ctx)  # no rank runs ahead of rank 0's checkpoint (a resume finds it complete)
    if writer is not None:
        writer.close()
    return history[-1] if history else {}


def _epoch_line(r: dict) -> str:
    line = f"epoch {r['epoch']}: loss {r['train_loss']:.4f} ({r['train_samples_per_s']:.0f} samples/s)"
    if "val_gap" in r:
        line += (f" | val GAP {r['val_gap']:.4f} Hit@1 {r['val_hit_at_1']:.4f} PERR {r['val_perr']:.4f} "
                 f"mAP {r['val_map']:.4f}")
    if "val_segment_map" in r:
        line += f" | val segment MAP {r['val_segment_map']:.4f} ({r['val_segment_classes']} classes)"
    return line


def _tensorboard(out: Path):
    """A ``SummaryWriter`` for ``out/tb``, or None without the tensorboard package (the scalars also land in
    metrics.json).

    TensorFlow stays out of the process. ``tensorboard.compat.tf``, which torch's writer touches when imported, is
    TensorFlow itself whenever that is installed, unless a module ``tensorboard.compat.notf`` can be imported: the
    hook of tensorboard's ``//tensorboard/compat:no_tensorflow`` target, which makes it use its own TensorFlow stub
    (all the event file writer needs). The pip wheel does not ship that module, so it is registered here, empty.
    Without this, importing the writer costs seconds and prints TensorFlow's start-up lines. A process where
    ``tensorboard.compat.tf`` was already resolved keeps what it has.
    """
    import types

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time; the scalars also land in metrics.json
        return None
    return SummaryWriter(str(out / "tb"))


if __name__ == "__main__":
    from model.engine.cli import run_cli
    run_cli(main, get_args_parser())
