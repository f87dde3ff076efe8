"""First run on a GPU machine: throughput, memory and CPU/CUDA agreement in one table (``bench/gpu_check.sh``).

    bash bench/gpu_check.sh            # full sizes on CUDA (sized for under 8 minutes; not yet run on a GPU); small on CPU
    bash bench/gpu_check.sh --small    # CI: every step at toy sizes, on CPU

Steps, each a row of the printed table:
1. CMA-SNet training samples/s (3862 classes, batch 256, 300 frames, 1024 dims, width 512) under bf16 autocast;
2. the image model (EfficientNet-Lite0 + CMA, 448 x 448) training images/s under bf16 autocast;
3. the CMA head's peak memory at batch 256, fused aggregation against the literal per-class form (and that both
   give the same logits);
4. the training loader's videos/s over preprocessed shards with 0 and several DataLoader workers;
5. ``model.train_video`` for one epoch in 1 process and under ``torchrun`` on every GPU (2 processes on CPU);
6. ``model.evaluate`` of that checkpoint on CPU and on CUDA: the metrics must agree (bf16 moves scores a little).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "full": dict(batch=256, frames=300, dim=1024, classes=3862, width=512, image=448, image_batch=32, steps=20,
                 videos=512, video_frames=300, loader_workers=(0, 4, 8)),
    "small": dict(batch=8, frames=30, dim=64, classes=100, width=32, image=64, image_batch=2, steps=2,
                  videos=32, video_frames=40, loader_workers=(0, 2)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def video_train_rate(s: dict, device: torch.device) -> float:
    """Samples/s of SGD steps of CMA-SNet on random frames (``model.train_video``'s step, bf16 autocast on CUDA)."""
    from model.engine.device import autocast
    from model.networks.video_model import build_model

    args = {"head": "cma", "backbone": "snet", "feature_dim": s["dim"], "num_classes": s["classes"],
            "width": s["width"], "cma_attention": "softmax"}
    model = build_model(args, label_embeddings=torch.randn(s["classes"], 256)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(s["batch"], s["frames"], s["dim"], device=device)
    mask = torch.ones(s["batch"], s["frames"], dtype=torch.bool, device=device)
    y = (torch.rand(s["batch"], s["classes"], device=device) < 0.002).float()

    def step():
        with autocast(device):
            logits = model(x, mask)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: kernels, allocator
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    _sync(device)
    return s["batch"] * s["steps"] / (time.perf_counter() - t0)


def image_train_rate(s: dict, device: torch.device) -> float:
    """Images/s of SGD steps of the default image model (EfficientNet-Lite0 + CMA) at ``image`` x ``image``."""
    from model.engine.device import autocast
    from model.networks.image_backbones import build_image_backbone
    from model.networks.image_model import build_image_model

    args = {"head": "cma", "num_classes": 80, "scales": 1, "cma_attention": "softmax"}
    model = build_image_model(args, build_image_backbone("efficientnet-lite0"),
                              label_embeddings=torch.randn(80, 256)).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(s["image_batch"], 3, s["image"], s["image"], device=device)
    y = (torch.rand(s["image_batch"], 80, device=device) < 0.05).float()

    def step():
        with autocast(device):
            logits = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    _sync(device)
    return s["image_batch"] * s["steps"] / (time.perf_counter() - t0)


def head_memory(s: dict, device: torch.device) -> dict:
    """Peak memory (MiB, CUDA only) of forward + backward of the CMA head alone, fused and literal; and the largest
    logit difference between the two forms."""
    from model.networks.heads import CMAHead

    torch.manual_seed(0)
    emb = torch.randn(s["classes"], 256)
    feats = torch.randn(s["batch"], s["frames"] // 8, s["width"], device=device)  # SNet's 3 poolings: T / 8 steps
    mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=device)
    out = {}
    for fused in (True, False):
        torch.manual_seed(1)
        head = CMAHead(s["width"], s["classes"], label_embeddings=emb, attention="softmax", fused=fused).to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        logits = head(feats, mask)
        logits.float().sum().backward()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
        out["fused" if fused else "literal"] = (peak, logits.detach().float().cpu())
    diff = (out["fused"][1] - out["literal"][1]).abs().max().item()
    return {"fused_mib": out["fused"][0], "literal_mib": out["literal"][0], "max_logit_diff": diff}


def prepare_data(s: dict, root: Path) -> Path:
    """Synthetic frame-level videos through the project's Beam job (default flags: all dims kept)."""
    from beam_jobs import preprocess
    from pipeline import synthetic

    synthetic.generate(str(root / "raw/train"), videos=s["videos"], shards=4, seed=1, max_frames=s["video_frames"],
                       min_frames=s["video_frames"] // 2)
    synthetic.generate(str(root / "raw/val"), videos=max(16, s["videos"] // 8), shards=1, seed=2, prefix="validate",
                       max_frames=s["video_frames"], min_frames=s["video_frames"] // 2)
    beam = ["--direct_num_workers", "1"]
    preprocess.run(["--input", str(root / "raw/train/*.tfrecord"), "--output", str(root / "train")] + beam)
    preprocess.run(["--input", str(root / "raw/val/*.tfrecord"), "--output", str(root / "val"), "--whitening",
                    str(root / "train/whitening.npz")] + beam)
    return root


def loader_rate(data: Path, s: dict, workers: int) -> float:
    """Videos/s of one epoch of the training loader (``model.data.global_batches``)."""
    from model.data.global_batches import iter_steps, make_global_loader

    loader = make_global_loader(str(data / "train"), batch_size=s["batch"], workers=workers, features=("rgb",),
                                num_classes=3862, shuffle_buffer=256)
    t0, n = time.perf_counter(), 0
    for batch in iter_steps(loader):
        n += len(batch["ids"])
    return n / (time.perf_counter() - t0)


def train_epoch(data: Path, out: Path, s: dict, procs: int, device: str) -> dict:
    """One epoch of ``model.train_video`` (1 process, or ``procs`` under torchrun); its metrics.json record."""
    argv = ["-m", "model.train_video", "--train", str(data / "train"), "--val", str(data / "val"), "--out",
            str(out), "--epochs", "1", "--batch-size", str(s["batch"]), "--width", str(s["width"]), "--workers",
            "2", "--device", device, "--asge-epochs", "50"]
    if procs > 1:
        argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *argv,
                "--dist-timeout", "300"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"training with {procs} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())["epochs"][-1]


def evaluate_on(ckpt: Path, data: Path, device: str, out: Path) -> dict:
    from model import evaluate

    argv = ["--checkpoint", str(ckpt), "--data", str(data / "val"), "--device", device, "--out", str(out),
            "--workers", "0"]
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="toy sizes (the default without CUDA)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    size = "small" if a.small or not cuda else "full"
    s = SIZES[size]
    device = torch.device("cuda" if cuda else "cpu")
    gpus = torch.cuda.device_count() if cuda else 0
    rows = []

    def row(check: str, setting: str, result: str) -> None:
        rows.append((check, setting, result))
        print(f"  {check}: {result}", file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"gpu_check ({size} sizes) on {name}, torch {torch.__version__}", file=sys.stderr)
    shape = f"batch {s['batch']}, {s['frames']} frames x {s['dim']}, {s['classes']} classes, width {s['width']}"
    row("CMA-SNet training", shape + (", bf16" if cuda else ""), f"{video_train_rate(s, device):.0f} samples/s")
    row("image model training", f"EfficientNet-Lite0 + CMA, {s['image']}px, batch {s['image_batch']}"
        + (", bf16" if cuda else ""), f"{image_train_rate(s, device):.1f} images/s")
    mem = head_memory(s, device)
    mib = (f"fused {mem['fused_mib']:.0f} MiB, literal {mem['literal_mib']:.0f} MiB "
           f"({mem['literal_mib'] / mem['fused_mib']:.1f}x)" if cuda else "memory: CUDA only")
    row("CMA head memory", f"batch {s['batch']}, {s['frames'] // 8} steps",
        f"{mib}; logits differ by {mem['max_logit_diff']:.1e}")
    if mem["max_logit_diff"] > 1e-3:
        raise SystemExit(f"fused and literal CMA heads disagree by {mem['max_logit_diff']}")

    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        data = prepare_data(s, Path(tmp) / "data")
        for w in s["loader_workers"]:
            row("training loader", f"{s['videos']} videos, {w} workers", f"{loader_rate(data, s, w):.0f} videos/s")
        procs = gpus if gpus else 2
        one = train_epoch(data, Path(tmp) / "run1", s, 1, "auto")
        many = train_epoch(data, Path(tmp) / "runN", s, procs, "auto")
        row("model.train_video, 1 epoch", f"1 process ({device.type})", f"{one['train_samples_per_s']:.0f} samples/s")
        row("model.train_video, 1 epoch", f"torchrun, {procs} processes ({device.type})",
            f"{many['train_samples_per_s']:.0f} samples/s "
            f"({many['train_samples_per_s'] / one['train_samples_per_s']:.2f}x); val GAP {many['val_gap']:.4f} "
            f"vs {one['val_gap']:.4f}")
        ckpt = Path(tmp) / "run1/last.pt"
        cpu = evaluate_on(ckpt, data, "cpu", Path(tmp) / "eval_cpu.json")
        if cuda:
            gpu = evaluate_on(ckpt, data, "cuda", Path(tmp) / "eval_cuda.json")
            worst = max(abs(cpu[k] - gpu[k]) for k in ("gap", "map", "hit_at_1", "perr"))
            row("model.evaluate CPU vs CUDA", "same checkpoint, bf16 on CUDA",
                f"GAP {cpu['gap']:.4f} / {gpu['gap']:.4f}, largest metric difference {worst:.4f}")
            if worst > 0.01:
                raise SystemExit(f"CPU and CUDA evaluations differ by {worst}")
        else:
            row("model.evaluate CPU vs CUDA", "no CUDA here", f"CPU GAP {cpu['gap']:.4f}")

    print("\n| check | setting | result |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
