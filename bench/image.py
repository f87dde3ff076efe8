"""Image-model throughput: frozen vs fine-tuned EfficientNet-Lite0 + CMA, cached backbone maps, and the JPEG loader.

    .venv/bin/python bench/image.py                      # 224 and 448, scales 1 and 3, loader at 0/1/2 workers
    .venv/bin/python bench/image.py --quick              # tiny sizes and few steps (the CI smoke test)
    .venv/bin/python bench/image.py --device cuda --batch-size 64 --steps 20

Model table: images/s of ``model.networks.image_model.ImageClassifier`` (CMA head, 80 classes, random ASGE
embeddings, the packaged ImageNet EfficientNet-Lite0) on random (B, 3, S, S) input, per input size and scale count:

* fine-tuned training: forward + backward + SGD step through everything;
* frozen training (the baseline of the ratio column): ``set_backbone_frozen(True)``, so the backbone runs forward
  only (no graph, BN in eval mode) and the heads (+ MS-CMA necks) train; the whole backbone still runs every step;
* cached-maps training: ``model.forward_maps`` on backbone maps computed once (what ``model.train_image
  --freeze-backbone --cache-features`` trains on), heads only; the maps come from memory here, the map-cache
  loader's own rate is in the last table;
* backbone forward only: what building the cache costs per image, once;
* inference: ``no_grad`` forward in eval mode, from pixels and from cached maps.

Each measurement runs ``--warmup`` untimed steps and then ``--steps`` timed ones (CUDA: synchronized after each)
and reports the batch over the median step time, in this process, with ``torch.set_num_threads(--threads)``
(default 1: the machine this was written on shares its 2 cores with other jobs). On CUDA the steps run under the
bfloat16 autocast that training uses.

Loader tables: a synthetic COCO set (``pipeline.synthetic_coco``, ``--loader-size`` px JPEGs, ~120 KB each at 480,
near COCO's ~160 KB 640x480 files) read by ``model.data.images.make_image_loader`` with the training transform at
the largest ``--sizes`` (decode, RandomResizedCrop, flip, normalize) at each ``--workers`` count, best of
``--loader-epochs`` passes (persistent workers: start-up is not counted), divided by the model's training rate at
that size: above 1 the loader keeps up with that step. Note that on a CPU-only host the loader's workers and the
model's threads share the same cores, so the two rates do not simply overlap there. Then the map cache
(``model.data.map_cache``: float16 Parquet) of the same images, read by ``make_map_loader``, against cached-maps
training (its workers are not persistent, so their start-up is counted, as in training).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model  # noqa: E402,F401  (before anything that may load TensorFlow, see model/__init__.py)
from model.data.coco import read_coco  # noqa: E402
from model.data.images import CocoImageDataset, eval_transform, make_image_loader, train_transform  # noqa: E402
from model.data.map_cache import MapCacheDataset, build_map_cache, make_map_loader  # noqa: E402
from model.engine.device import autocast, resolve_device  # noqa: E402
from model.networks.image_backbones import build_image_backbone  # noqa: E402
from model.networks.image_model import build_image_model  # noqa: E402
from pipeline import synthetic_coco  # noqa: E402

NUM_CLASSES = 80  # MS-COCO
QUICK = {"sizes": "64", "batch_size": 2, "steps": 2, "warmup": 1, "loader_images": 16, "loader_size": 96,
         "workers": "0,1", "loader_epochs": 2}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="224,448", help="comma-separated input sizes (square)")
    p.add_argument("--scales", default="1,3", help="comma-separated scale counts (1: CMA, 3: MS-CMA)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on CUDA")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--loader-images", type=int, default=128, help="synthetic COCO training images for the loader")
    p.add_argument("--loader-size", type=int, default=480, help="their side in pixels")
    p.add_argument("--loader-epochs", type=int, default=2, help="passes per loader configuration; fastest reported")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    return p


def _ints(text: str) -> list[int]:
    return [int(t) for t in str(text).split(",") if t.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """images/s of ``step()`` (one batch each): ``batch`` over the median time of ``steps`` calls made after
    ``warmup`` untimed ones (the median, so a step slowed by another job on a shared host does not set the rate)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def build(scales: int, device: torch.device, frozen: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_image_model({"head": "cma", "num_classes": NUM_CLASSES, "scales": scales},
                            build_image_backbone("efficientnet-lite0"), label_embeddings=torch.randn(NUM_CLASSES, 256))
    net.set_backbone_frozen(frozen)
    return net.to(device)


def model_rates(size: int, scales: int, a, device: torch.device) -> dict[str, float]:
    """images/s of every row of the model table at one input size and scale count."""
    B = a.batch_size
    g = torch.Generator().manual_seed(size * 10 + scales)
    x = torch.randn(B, 3, size, size, generator=g).to(device)
    y = (torch.rand(B, NUM_CLASSES, generator=g) < 0.05).float().to(device)
    out: dict[str, float] = {}

    def train_rate(net, forward) -> float:
        net.train()
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def step():
            with autocast(device):
                logits = forward()
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return timed(step, B, a.steps, a.warmup, device)

    def infer_rate(net, forward) -> float:
        net.eval()

        def step():
            with torch.no_grad(), autocast(device):
                forward()

        return timed(step, B, a.steps, a.warmup, device)

    net = build(scales, device, frozen=False)
    out["fine-tuned"] = train_rate(net, lambda: net(x))
    del net
    net = build(scales, device, frozen=True)
    out["frozen"] = train_rate(net, lambda: net(x))
    with torch.no_grad(), autocast(device):
        maps = [m.float() for m in net.backbone_maps(x)]  # the cache stores them (float16) outside autocast
    out["cached"] = train_rate(net, lambda: net.forward_maps(maps))
    net.eval()

    def backbone_only():
        with torch.no_grad(), autocast(device):
            net.backbone_maps(x)

    out["backbone"] = timed(backbone_only, B, a.steps, a.warmup, device)
    out["infer"] = infer_rate(net, lambda: net(x))
    out["infer-cached"] = infer_rate(net, lambda: net.forward_maps(maps))
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


MODEL_ROWS = [  # (key, row name)
    ("fine-tuned", "training, fine-tuned (all weights)"),
    ("frozen", "training, frozen backbone (heads only, backbone forward each step)"),
    ("cached", "training, cached maps (`forward_maps`, heads only)"),
    ("backbone", "backbone forward only (cache build, once per image)"),
    ("infer", "inference, pixels (`no_grad`)"),
    ("infer-cached", "inference, cached maps (`no_grad`)"),
]


def loader_rate(loader, epochs: int, set_epoch) -> float:
    """images/s of the fastest of ``epochs`` full passes through ``loader``."""
    best = None
    for epoch in range(epochs):
        set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += int(batch["maps"][0].shape[0] if "maps" in batch else batch["image"].shape[0])
        rate = n / (time.perf_counter() - t0)
        best = rate if best is None else max(best, rate)
    return best


def main(argv=None) -> None:
    p = get_args_parser()
    a = p.parse_args(argv)
    if a.quick:
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    a.batch_size = a.batch_size or (64 if device.type == "cuda" else 16)
    sizes, scale_list, workers = _ints(a.sizes), _ints(a.scales), _ints(a.workers)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{gpu}; torch {torch.__version__}, threads {torch.get_num_threads()}; batch {a.batch_size}; "
          f"{a.warmup} warm-up + {a.steps} timed steps (median); EfficientNet-Lite0 + CMA head, {NUM_CLASSES} classes"
          f"{'; bfloat16 autocast' if device.type == 'cuda' else ''}", flush=True)

    rates: dict[tuple[int, int], dict[str, float]] = {}
    for size in sizes:
        for scales in scale_list:
            t0 = time.perf_counter()
            rates[size, scales] = model_rates(size, scales, a, device)
            print(f"  measured {size} px, {scales} scale(s) in {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                  flush=True)

    print()
    print("| what | input | scales | images/s | vs frozen backbone per step |")
    print("|---|---:|---:|---:|---:|")
    for size in sizes:
        for scales in scale_list:
            r = rates[size, scales]
            for key, name in MODEL_ROWS:
                print(f"| {name} | {size} | {scales} | {r[key]:.2f} | {r[key] / r['frozen']:.2f} |")

    # -- loaders -------------------------------------------------------------------------------------------
    size = max(sizes)
    with tempfile.TemporaryDirectory(prefix="bench_image_") as tmp:
        t0 = time.perf_counter()
        synthetic_coco.generate(tmp, train_images=a.loader_images, val_images=8, size=a.loader_size, seed=0,
                                fmt="jpeg")
        manifest = read_coco(Path(tmp) / "annotations" / "instances_train.json", Path(tmp) / "train")
        jpeg_bytes = sum(f.stat().st_size for f in (Path(tmp) / "train").iterdir())
        print(f"\nloader data: {len(manifest.images)} synthetic COCO images (of {a.loader_images}; empty ones are "
              f"dropped), {a.loader_size}x{a.loader_size} JPEG, {jpeg_bytes / a.loader_images / 1e3:.0f} KB each, "
              f"generated in {time.perf_counter() - t0:.1f}s; training transform at {size}; batch {a.batch_size}; "
              f"best of {a.loader_epochs} passes", flush=True)
        backbone = build_image_backbone("efficientnet-lite0")
        mean, std = backbone.mean, backbone.std
        jpeg_rates = {}
        for w in workers:
            dataset = CocoImageDataset(manifest, train_transform(size, mean, std), seed=0)
            loader = make_image_loader(dataset, batch_size=a.batch_size, shuffle=True, workers=w, seed=0)
            jpeg_rates[w] = loader_rate(loader, a.loader_epochs, loader.set_epoch)
            del loader  # shuts its persistent workers down before the next configuration starts its own

        cols = [(scales, key) for scales in scale_list for key in ("frozen", "fine-tuned")]
        print()
        print("| loader (JPEG decode + train transform) | workers | images/s | "
              + " | ".join(f"loader / {key} training ({size}, {s} scale{'s' if s > 1 else ''})" for s, key in cols)
              + " |")
        print("|---|---:|---:|" + "---:|" * len(cols))
        for w, rate in jpeg_rates.items():
            print(f"| `make_image_loader` | {w} | {rate:.1f} | "
                  + " | ".join(f"{rate / rates[size, s][key]:.2f}" for s, key in cols) + " |")

        # the map cache the cached-maps rows train on: built once from the same images, then read back
        backbone.set_frozen(True)
        images = make_image_loader(CocoImageDataset(manifest, eval_transform(size, mean, std)),
                                   batch_size=a.batch_size, shuffle=False, workers=0)
        t0 = time.perf_counter()
        cache = build_map_cache(backbone.to(device), images, Path(tmp) / "cache", {"bench": size}, device)
        build_rate = cache.num_rows / (time.perf_counter() - t0)
        cache_mb = sum(Path(s).stat().st_size for s in cache.shards) / cache.num_rows / 1e6
        map_rates = {}
        for w in workers:
            dataset = MapCacheDataset(cache, manifest.label_map.num_classes)
            loader = make_map_loader(dataset, batch_size=a.batch_size, shuffle=True, seed=0, workers=w)
            map_rates[w] = loader_rate(loader, a.loader_epochs, loader.sampler.set_epoch)
            del loader
        print(f"\nmap cache: {cache.num_rows} images, {cache_mb:.2f} MB each (float16 {cache.shapes}), built at "
              f"{build_rate:.1f} images/s (decode + eval transform + backbone + write)")
        print()
        print("| loader (map cache, float16 Parquet) | workers | images/s | "
              + " | ".join(f"loader / cached-maps training ({size}, {s} scale{'s' if s > 1 else ''})"
                           for s in scale_list) + " |")
        print("|---|---:|---:|" + "---:|" * len(scale_list))
        for w, rate in map_rates.items():
            print(f"| `make_map_loader` | {w} | {rate:.1f} | "
                  + " | ".join(f"{rate / rates[size, s]['cached']:.2f}" for s in scale_list) + " |")
    bad = [v for r in rates.values() for v in r.values()] + list(jpeg_rates.values()) + list(map_rates.values())
    if not all(math.isfinite(v) and v > 0 for v in bad):
        raise SystemExit("a rate is not a positive finite number")


if __name__ == "__main__":
    main()
