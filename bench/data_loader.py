"""Throughput of model.data.video's loader against a naive row-by-row reader, measured in the same run.

    .venv/bin/python bench/data_loader.py                       # writes random shards to a temp dir first
    .venv/bin/python bench/data_loader.py --data DATA/train     # any preprocess output (dir, glob, gs://)

Prints one markdown row per DataLoader worker count (0, 1, 2 by default): batches/s, videos/s, float32 MB/s of
padded frames delivered, and the speed-up over the naive baseline. The baseline is what a first attempt looks like:
``pyarrow.Table.to_pylist()`` per shard, one ``np.frombuffer`` + float32 cast per video, every video padded to
``--max-frames``, multi-hot labels built in a Python loop, ``torch.stack`` per batch, in the main process.
Each loader configuration runs ``--epochs`` passes with persistent workers and reports the fastest, so worker start
up is not counted against steady-state throughput. With CUDA present, batches are also copied to the GPU (pinned
memory, non-blocking), which is what a training step waits on.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from model.data.video import dataset_summary, make_loader  # noqa: E402
from model.engine.device import resolve_device  # noqa: E402
from pipeline import shards as shard_io  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="existing shards; default: generate random ones")
    p.add_argument("--videos", type=int, default=768, help="videos to generate")
    p.add_argument("--shards", type=int, default=4, help="shards to generate")
    p.add_argument("--dim", type=int, default=1024, help="rgb dims to generate (1024 = YouTube-8M, no PCA cut)")
    p.add_argument("--min-frames", type=int, default=120)
    p.add_argument("--max-gen-frames", type=int, default=300)
    p.add_argument("--num-classes", type=int, default=3862)
    p.add_argument("--max-frames", type=int, default=300)
    p.add_argument("--features", default="rgb")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256, or 64 below 2048 videos")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help="passes per configuration; the fastest is reported")
    p.add_argument("--device", default="auto")
    return p


def naive_epoch(paths: list[str], features: tuple[str, ...], batch_size: int, num_classes: int, max_frames: int,
                device: torch.device) -> tuple[int, int]:
    """(batches, videos) of one pass with the naive reader."""
    batches = videos = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        nonlocal batches, videos
        x = torch.stack([torch.from_numpy(a) for a, _ in pending])
        y = torch.stack([torch.from_numpy(b) for _, b in pending])
        mask = (x.abs().sum(-1) > 0)
        x.to(device), y.to(device), mask.to(device)
        batches, videos = batches + 1, videos + len(pending)
        pending.clear()

    for path in paths:
        info = shard_io.read_shard_info(path)
        dtype = np.dtype(info.dtype).newbyteorder("<")
        for row in pq.read_table(path, columns=["id", "labels", "num_frames", *features]).to_pylist():
            t = min(row["num_frames"], max_frames)
            mats = [np.frombuffer(row[f], dtype=dtype).reshape(row["num_frames"], -1)[:t].astype(np.float32)
                    for f in features]
            x = np.zeros((max_frames, sum(m.shape[1] for m in mats)), np.float32)
            x[:t] = np.concatenate(mats, axis=1)
            y = np.zeros(num_classes, np.float32)
            for label in row["labels"]:
                y[label] = 1.0
            pending.append((x, y))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return batches, videos


def loader_epoch(loader, device: torch.device) -> tuple[int, int, int]:
    """(batches, videos, float32 bytes of x) of one pass through a model.data.video loader."""
    batches = videos = nbytes = 0
    for batch in loader:
        x = batch["x"].to(device, non_blocking=True)
        batch["mask"].to(device, non_blocking=True)
        batch["labels"].to(device, non_blocking=True)
        batches, videos, nbytes = batches + 1, videos + x.shape[0], nbytes + x.numel() * 4
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches, videos, nbytes


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    features = tuple(args.features.split(","))
    tmp = None
    data = args.data
    if data is None:
        from shard_factory import write_random_shards
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_loader_")
        t0 = time.perf_counter()
        write_random_shards(tmp.name, num_videos=args.videos, num_shards=args.shards, dims={"rgb": args.dim},
                            seed=0, num_classes=args.num_classes, frames=(args.min_frames, args.max_gen_frames),
                            max_labels=6, row_group_size=64)
        print(f"generated {args.videos} random videos in {args.shards} shards ({args.dim} dims, "
              f"{args.min_frames}-{args.max_gen_frames} frames) in {time.perf_counter() - t0:.1f}s")
        data = tmp.name
    summary = dataset_summary(data)
    paths = shard_io.list_shards(str(data))
    batch_size = args.batch_size or (256 if summary.num_videos >= 2048 else 64)
    print(f"data: {summary.num_videos} videos, {len(paths)} shards, {summary.feature_dims}, "
          f"{shard_io.read_shard_info(paths[0]).dtype}; batch {batch_size}; features {','.join(features)}; device {device}; "
          f"torch threads {torch.get_num_threads()}")

    rows = []
    best = None
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        nb, nv = naive_epoch(paths, features, batch_size, args.num_classes, args.max_frames, device)
        dt = time.perf_counter() - t0
        best = min(best or dt, dt)
    naive_rate = nv / best
    rows.append(("naive (to_pylist, pad to max)", nb / best, naive_rate, nv * args.max_frames *
                 sum(summary.feature_dims[f] for f in features) * 4 / best / 1e6, 1.0))

    for workers in (int(w) for w in args.workers.split(",")):
        loader = make_loader(data, batch_size=batch_size, workers=workers, features=features,
                             num_classes=args.num_classes, max_frames=args.max_frames, shuffle=True,
                             shuffle_buffer=args.shuffle_buffer, seed=0, device=device)
        best = None
        for epoch in range(args.epochs):
            loader.dataset.set_epoch(epoch)
            t0 = time.perf_counter()
            nb, nv, nbytes = loader_epoch(loader, device)
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, nb, nv, nbytes)
        dt, nb, nv, nbytes = best
        rows.append((f"model.data.video, {workers} worker(s)", nb / dt, nv / dt, nbytes / dt / 1e6, nv / dt / naive_rate))
        del loader  # shuts its persistent workers down before the next configuration starts its own

    print()
    print("| loader | batches/s | videos/s | MB/s (float32 x) | x naive |")
    print("|---|---:|---:|---:|---:|")
    for name, bps, vps, mbs, ratio in rows:
        print(f"| {name} | {bps:.2f} | {vps:.0f} | {mbs:.0f} | {ratio:.2f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
