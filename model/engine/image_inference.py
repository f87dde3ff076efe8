"""Image models at inference: rebuild one from its checkpoint, run it over a loader, count what could not be read.

Shared by ``model.train_image`` (validation each epoch), ``model.evaluate --image`` and ``model.predict_image``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from model.data.coco import LabelMap
from model.engine.checkpoint import CheckpointError, load_checkpoint
from model.engine.device import autocast
from model.networks.image_backbones import build_image_backbone
from model.networks.image_model import ImageClassifier, build_image_model


_REASON_PREFIX = re.compile(r"^cannot read image .*?: ")


def reason_kind(reason: str) -> str:
    """What a broken item's reason (``str(ImageDecodeError)``: ``cannot read image PATH: MESSAGE``) says is wrong,
    without the file's own details (its path; sizes and bytes in parentheses), so that reasons group when counted."""
    message = _REASON_PREFIX.sub("", str(reason), count=1)
    return message.split(" (")[0].strip() or message


@dataclass
class BrokenImages:
    """Images a loader could not read, counted per reason with a few examples (nothing is dropped silently)."""
    count: int = 0
    by_reason: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def add(self, items: Iterable[tuple[Any, str]]) -> None:
        for key, reason in items:
            self.count += 1
            kind = reason_kind(reason)
            self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
            if len(self.examples) < 5:
                self.examples.append(reason if str(key) in reason else f"{key}: {reason}")

    def merge(self, other: "BrokenImages") -> "BrokenImages":
        """Add another loader's (another rank's) broken images; returns self."""
        self.count += other.count
        for kind, n in other.by_reason.items():
            self.by_reason[kind] = self.by_reason.get(kind, 0) + n
        self.examples = (self.examples + list(other.examples))[:5]
        return self

    def summary(self) -> dict:
        return {"count": self.count, "by_reason": dict(self.by_reason), "examples": list(self.examples)}

    def line(self, what: str) -> str:
        return (f"skipped {self.count} unreadable {what} image(s) ({', '.join(f'{k}: {v}' for k, v in self.by_reason.items())}); "
                f"e.g. {self.examples[0]}")


@dataclass
class LoadedImageModel:
    model: ImageClassifier
    args: dict
    label_map: LabelMap
    mean: tuple
    std: tuple


def load_image_model(path: str, device: torch.device) -> LoadedImageModel:
    """An ``ImageClassifier`` rebuilt from a ``model.train_image`` checkpoint (weights only: no code runs on load).

    The backbone is built with random weights and then takes the checkpoint's, so no backbone weights file is
    needed at inference."""
    ckpt = load_checkpoint(path, map_location="cpu")
    a = ckpt.get("args") or {}
    if a.get("task") != "image" or "label_map" not in ckpt:
        raise CheckpointError(f"{path} is not an image checkpoint of model.train_image (a video checkpoint? use "
                              f"model.evaluate without --image)")
    label_map = LabelMap.from_plain(ckpt["label_map"])
    backbone = build_image_backbone(a["backbone"], random_init=True)
    emb = ckpt["model"].get("heads.0.label_embeddings")
    model = build_image_model(a, backbone, label_embeddings=emb)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedImageModel(model, a, label_map, tuple(backbone.mean), tuple(backbone.std))


def forward_batch(model: ImageClassifier, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """(B, K) fused logits of a batch of images (``image``) or of cached backbone maps (``maps``)."""
    with autocast(device):
        if "maps" in batch:
            return model.forward_maps([m.to(device, non_blocking=True) for m in batch["maps"]])
        return model(batch["image"].to(device, non_blocking=True))


def batch_size_of(batch: Mapping[str, Any]) -> int:
    return int(batch["maps"][0].shape[0] if "maps" in batch else batch["image"].shape[0])


@torch.no_grad()
def predict_images(model: torch.nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device,
                   broken: BrokenImages | None = None) -> Iterator[tuple[list, np.ndarray, np.ndarray | None]]:
    """Yield (keys, probabilities (B, K), labels (B, K) or None) per batch; unreadable images go to ``broken``.

    Keys are COCO image ids for annotated data and paths for ``ImageFileDataset``."""
    model.eval()
    for batch in loader:
        if broken is not None:
            broken.add(batch.get("broken", []))
        if batch_size_of(batch) == 0:
            continue
        logits = forward_batch(model, batch, device)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        labels = batch["labels"].numpy() if "labels" in batch else None
        keys = batch["image_ids"] if "image_ids" in batch else batch["paths"]
        yield list(keys), probs, labels
