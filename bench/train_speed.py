"""Training speed and memory of the CMA head at 3862 classes: naive Eq. 9 (builds h, (B, K, C)) vs fused.

    .venv/bin/python bench/train_speed.py [--batch-size 16] [--frames 300] [--steps 5] [--device auto]

Each variant runs in a fresh subprocess (so peak memory is its own): CMA-SNet on random (B, T, 1024) inputs, SGD
steps, reporting training samples/s and peak memory (CUDA: max allocated; CPU: max RSS growth over the process
after model build). Then the data loader's batches/s on generated Parquet shards against the fused model's
training batches/s at the same batch size: a ratio above 1 means the loader keeps up.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_variant(fused: bool, a) -> dict:
    import torch

    from model.engine.device import resolve_device
    from model.networks.video_model import build_video_model

    device = resolve_device(a.device)
    torch.manual_seed(0)
    model = build_video_model("cma", "snet", in_dim=1024, num_classes=3862, fused=fused).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(a.batch_size, a.frames, 1024, device=device)
    mask = torch.ones(a.batch_size, a.frames, dtype=torch.bool, device=device)
    y = (torch.rand(a.batch_size, 3862, device=device) < 0.001).float()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    return {"samples_per_s": a.batch_size * len(times) / sum(times), "peak_mib": peak}


def loader_rate(a) -> float:
    sys.path.insert(0, str(REPO / "tests"))
    from shard_factory import write_random_shards

    from model.data.video import make_loader

    with tempfile.TemporaryDirectory() as d:
        write_random_shards(d, num_videos=a.batch_size * 12, num_shards=2, dims={"rgb": 1024}, seed=0,
                            with_segments=False, frames=(a.frames, a.frames))
        loader = make_loader(d, batch_size=a.batch_size, workers=0, features=("rgb",), num_classes=3862,
                             max_frames=a.frames, shuffle=True, shuffle_buffer=64)
        t0, n = time.perf_counter(), 0
        for _ in loader:
            n += 1
        return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--variant", choices=("naive", "fused"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant == "fused", a)))
        return
    base = [sys.executable, __file__, "--batch-size", str(a.batch_size), "--frames", str(a.frames),
            "--steps", str(a.steps), "--device", a.device]
    res = {v: json.loads(subprocess.run(base + ["--variant", v], check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1]) for v in ("naive", "fused")}
    load = loader_rate(a)
    train = res["fused"]["samples_per_s"] / a.batch_size
    print(f"\nCMA-SNet, 3862 classes, batch {a.batch_size}, {a.frames} frames, device {a.device}\n")
    print("| head | samples/s | x naive | peak memory MiB | x naive |")
    print("|---|---:|---:|---:|---:|")
    for v in ("naive", "fused"):
        r = res[v]
        print(f"| {v} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / res['naive']['samples_per_s']:.2f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] / max(res['naive']['peak_mib'], 1e-9):.2f} |")
    print(f"\ndata loader (0 workers): {load:.2f} batches/s; fused model trains {train:.2f} batches/s; "
          f"loader / model = {load / train:.2f}")


if __name__ == "__main__":
    main()
