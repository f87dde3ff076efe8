"""Synthetic MS-COCO-format images with planted structure: ``python -m pipeline.synthetic_coco --out DIR ...``.

Writes the official layout, ``DIR/annotations/instances_{train,val}.json`` (real COCO instances files: ``info``,
``licenses``, ``images``, ``annotations``, ``categories``) beside ``DIR/train/*.jpg`` and ``DIR/val/*.jpg`` (or
``.png``), so every reader of real COCO reads them unchanged. The content is made so that the paper's image claims
can be checked on a laptop:

* 14 classes, each a shape kind x colour x texture (a red disc, a blue square, teal checkers, ...), drawn at random
  positions and sizes on a cluttered background: a colour gradient, low-frequency waves, pixel noise and a few
  irregular distractor blobs, half of them in class colours, so colour statistics pooled over the whole image are
  a weak cue and a head that looks at the right places has something to gain over global average pooling.
* Host/companion pairs, the paper's dog and frisbee (section 3.2): four large, high-contrast "host" classes each
  have a small, faint "companion" (alpha-blended into the background, ~1% of the pixels) drawn touching its host.
  P(companion | host) = 0.6, P(companion | no host) = 0.03, so the companion is found mostly through its host.
  Six independent classes with uneven frequencies (0.30 down to 0.03), one of them correlated with another
  ("frame" comes with "stripes" half the time), complete the label graph.
* 3% of the images hold no object at all (no annotation: a loader drops and counts them, as for real COCO), and
  4% carry a crowd annotation (``iscrowd=1``: 4-7 small objects of one class under one box, with an uncompressed
  RLE segmentation, as COCO stores crowds).
* Boxes are exact: each object is also drawn into a mask, and its box is the bounding box of the pixels it shows
  in the final image (later objects may cover a few of an earlier one's pixels). ``render_image`` re-renders any
  image with its masks, so tests and attention scoring can check them.

Category ids are not contiguous (14 of COCO's 1..90, drawn with a fixed structural seed) and image ids are random
numbers in COCO's range (1..581929, file names ``000000123456.jpg`` as in COCO 2017); label order is category-id
order. The class table and ids do not depend on ``--seed``, so train and validation (image i drawn from
``(seed, 0, i)`` and ``(seed, 1, i)``) share them. ``DIR/labels.json`` documents the structure and
``DIR/config.json`` holds the resolved arguments and counts. Same arguments -> byte-identical files.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import Yt8mError

STRUCTURE_SEED = 20200207  # fixed: every split and every --seed share the category ids
SPLITS = ("train", "val")
SPLIT_KEYS = {"train": 0, "val": 1}  # image i of a split is drawn from np.random.default_rng([seed, key, i])
FORMATS = {"jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}
JPEG_QUALITY = 90  # with 4:4:4 chroma: the faint companions are small and keep their colour
PNG_COMPRESS_LEVEL = 3  # as small as 6 within ~7%, ~1.6x faster
MIN_SIZE, MAX_SIZE = 64, 1024
MAX_IMAGE_ID = 581929  # the largest id in COCO 2014/2017

P_EMPTY = 0.03  # images with no object at all
P_CROWD = 0.04  # non-empty images that also carry a crowd annotation
CROWD_MEMBERS = (4, 7)  # inclusive
CROWD_SIZE = (0.05, 0.08)  # member diameter as a fraction of the image side
P_SECOND_INSTANCE = 0.15  # a present host or independent class gets a second object
P_COMPANION_GIVEN_HOST = 0.6
P_COMPANION_ALONE = 0.03
PARTNERS = (("stripes", "frame", 0.5),)  # (a, b, P(b | a)): b's own prior applies when a is absent
MAX_OVERLAP = 0.1  # intersection / smaller box area allowed between two objects (a companion and its host: any)
PLACEMENT_TRIES = 30
DISTRACTORS = (2, 5)  # inclusive count of non-class blobs per image
DISTRACTOR_SIZE = (0.06, 0.2)
BACKGROUND_NOISE = 8.0  # pixel noise sd, in grey levels
OBJECT_NOISE = 6.0
COLOUR_JITTER = 12.0  # per-object shift of each channel, uniform +-


class SyntheticCocoError(Yt8mError):
    """The requested synthetic COCO data set cannot be written as asked."""


@dataclass(frozen=True)
class ClassSpec:
    """One synthetic category.

    Args:
        name: category name; companions name their host ("faint-cross (host-disc)").
        role: "host", "companion" or "independent" (also the COCO supercategory).
        shape: mask kind, see ``_shape_mask``.
        texture: "solid", "hstripes" or "checker" (a multiplicative pattern on the colour).
        colour: (r, g, b) before per-object jitter.
        size: (lo, hi) object diameter as a fraction of the image side.
        alpha: (lo, hi) opacity; companions are faint (blended into what lies under them).
        prior: P(present) for hosts and independents; P(present | host present) for companions.
        host: a companion's host class name.
    """

    name: str
    role: str
    shape: str
    texture: str
    colour: tuple[int, int, int]
    size: tuple[float, float]
    alpha: tuple[float, float]
    prior: float
    host: str | None = None


HOST_SIZE, INDEPENDENT_SIZE, COMPANION_SIZE = (0.28, 0.42), (0.14, 0.26), (0.06, 0.09)
STRONG_ALPHA, INDEPENDENT_ALPHA, FAINT_ALPHA = (1.0, 1.0), (0.85, 1.0), (0.35, 0.5)

CLASS_TABLE = (
    ClassSpec("host-disc", "host", "disc", "solid", (220, 40, 40), HOST_SIZE, STRONG_ALPHA, 0.40),
    ClassSpec("host-square", "host", "square", "solid", (40, 70, 220), HOST_SIZE, STRONG_ALPHA, 0.28),
    ClassSpec("host-triangle", "host", "triangle", "hstripes", (40, 180, 60), HOST_SIZE, STRONG_ALPHA, 0.18),
    ClassSpec("host-ring", "host", "ring", "solid", (235, 205, 40), HOST_SIZE, STRONG_ALPHA, 0.10),
    ClassSpec("faint-cross (host-disc)", "companion", "cross", "solid", (230, 60, 200), COMPANION_SIZE,
              FAINT_ALPHA, P_COMPANION_GIVEN_HOST, host="host-disc"),
    ClassSpec("faint-diamond (host-square)", "companion", "diamond", "solid", (250, 140, 20), COMPANION_SIZE,
              FAINT_ALPHA, P_COMPANION_GIVEN_HOST, host="host-square"),
    ClassSpec("faint-dot (host-triangle)", "companion", "disc", "solid", (30, 220, 230), COMPANION_SIZE,
              FAINT_ALPHA, P_COMPANION_GIVEN_HOST, host="host-triangle"),
    ClassSpec("faint-bar (host-ring)", "companion", "bar", "solid", (140, 60, 230), COMPANION_SIZE,
              FAINT_ALPHA, P_COMPANION_GIVEN_HOST, host="host-ring"),
    ClassSpec("stripes", "independent", "stripes", "solid", (25, 25, 25), INDEPENDENT_SIZE, INDEPENDENT_ALPHA, 0.30),
    ClassSpec("ellipse", "independent", "ellipse", "hstripes", (140, 85, 40), INDEPENDENT_SIZE, INDEPENDENT_ALPHA,
              0.22),
    ClassSpec("frame", "independent", "frame", "solid", (245, 245, 245), INDEPENDENT_SIZE, INDEPENDENT_ALPHA, 0.08),
    ClassSpec("x-mark", "independent", "xmark", "solid", (255, 150, 170), INDEPENDENT_SIZE, INDEPENDENT_ALPHA, 0.10),
    ClassSpec("checker", "independent", "square", "checker", (0, 128, 128), INDEPENDENT_SIZE, INDEPENDENT_ALPHA,
              0.06),
    ClassSpec("half-disc", "independent", "halfdisc", "solid", (150, 160, 20), INDEPENDENT_SIZE, INDEPENDENT_ALPHA,
              0.03),
)


@dataclass(frozen=True)
class Structure:
    """The planted class structure shared by every split and seed.

    Args:
        classes: the class table, in table order (hosts, companions, independents).
        category_ids: (K,) COCO category id of each class, aligned with ``classes``; not contiguous.
    """

    classes: tuple[ClassSpec, ...]
    category_ids: tuple[int, ...]

    def by_name(self, name: str) -> tuple[int, ClassSpec]:
        i = [c.name for c in self.classes].index(name)
        return self.category_ids[i], self.classes[i]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(host category id, companion category id) for every host/companion pair."""
        return [(self.by_name(c.host)[0], cid) for cid, c in zip(self.category_ids, self.classes)
                if c.role == "companion"]

    def categories(self) -> list[dict]:
        """The COCO ``categories`` list, in category-id order."""
        rows = [{"id": cid, "name": c.name, "supercategory": c.role} for cid, c in zip(self.category_ids,
                                                                                    self.classes)]
        return sorted(rows, key=lambda r: r["id"])

    def to_json(self) -> dict:
        return {
            "structure_seed": STRUCTURE_SEED,
            "label_order": "category id ascending (the order of 'categories')",
            "categories": [
                {"id": cid, "name": c.name, "role": c.role, "shape": c.shape, "texture": c.texture,
                 "colour": list(c.colour), "size": list(c.size), "alpha": list(c.alpha),
                 ("p_given_host" if c.role == "companion" else "prior"): c.prior,
                 **({"host": self.by_name(c.host)[0]} if c.host else {})}
                for cid, c in sorted(zip(self.category_ids, self.classes))],
            "pairs": [{"host": h, "companion": c, "p_given_host": P_COMPANION_GIVEN_HOST,
                       "p_without_host": P_COMPANION_ALONE} for h, c in self.pairs],
            "partners": [{"a": self.by_name(a)[0], "b": self.by_name(b)[0], "p_b_given_a": p}
                         for a, b, p in PARTNERS],
            "p_empty": P_EMPTY,
            "p_crowd": P_CROWD,
            "crowd": {"members": list(CROWD_MEMBERS), "size": list(CROWD_SIZE), "classes": "independent",
                      "segmentation": "uncompressed RLE (column-major, starting with a run of zeros)"},
            "p_second_instance": P_SECOND_INSTANCE,
            "boxes": "[x, y, w, h] in pixels, the bounding box of the object's visible pixels (exact)",
            "segmentation": "iscrowd=0: the box as a polygon; iscrowd=1: uncompressed RLE of the crowd's pixels",
            "area": "number of visible pixels of the object (of the crowd)",
            "splits": {s: f"image i drawn from numpy default_rng([seed, {k}, i])" for s, k in SPLIT_KEYS.items()},
            "render": "pipeline.synthetic_coco.render_image(seed, split, index, size) re-renders an image "
                      "with its masks",
        }


@functools.lru_cache(maxsize=1)
def build_structure() -> Structure:
    """The fixed class structure (same for every call and every ``--seed``)."""
    rng = np.random.default_rng(STRUCTURE_SEED)
    ids = rng.choice(np.arange(1, 91), size=len(CLASS_TABLE), replace=False)  # COCO-like ids with holes
    return Structure(classes=CLASS_TABLE, category_ids=tuple(int(i) for i in ids))


@dataclass
class RenderedObject:
    """One annotation of a rendered image.

    Args:
        category_id: its COCO category.
        iscrowd: 1 for a crowd (several small objects of one class under one box).
        mask: (H, W) bool, the pixels the object (crowd) shows in the final image.
        bbox: (x, y, w, h) floats, the bounding box of ``mask``.
        area: ``mask.sum()``.
        members: 1, or the number of objects in a crowd.
    """

    category_id: int
    iscrowd: int
    mask: np.ndarray
    bbox: tuple[float, float, float, float]
    area: int
    members: int = 1


@dataclass
class RenderedImage:
    """An image as drawn, the background it was drawn on, and its annotations.

    Args:
        pixels: (H, W, 3) uint8, what the image file holds (exactly for PNG; JPEG adds its compression loss).
        background_float: (3, H, W) float32, the image before any class object was drawn (distractors included).
        objects: annotations in drawing order; empty for an image with no object.
    """

    pixels: np.ndarray
    background_float: np.ndarray
    objects: list[RenderedObject]

    @property
    def background(self) -> np.ndarray:
        """(H, W, 3) uint8 background, rounded as ``pixels`` is: the two are equal wherever no object was drawn."""
        return _to_uint8(self.background_float.copy())

    @property
    def category_ids(self) -> list[int]:
        return sorted({o.category_id for o in self.objects})


# -- drawing -----------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of a shape of radius ``r`` centred at the origin; dx (1, w) and dy (h, 1) are pixel-centre
    offsets. Returns (h, w) bool."""
    ax, ay = np.abs(dx), np.abs(dy)
    box = (ax <= r) & (ay <= r)
    if shape == "disc":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return box
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -r) & (dy <= r) & (ax <= (dy + r) / 2)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        return box & ((ax <= 0.3 * r) | (ay <= 0.3 * r))
    if shape == "diamond":
        return ax + ay <= r
    if shape == "bar":
        return (ax <= r) & (ay <= 0.35 * r)
    if shape == "stripes":  # three vertical bars with two gaps
        return box & (np.floor((dx + r) / (0.4 * r)) % 2 == 0)
    if shape == "ellipse":
        return (dx / r) ** 2 + (dy / (0.55 * r)) ** 2 <= 1
    if shape == "frame":
        return box & ((ax >= 0.62 * r) | (ay >= 0.62 * r))
    if shape == "xmark":
        return box & ((np.abs(dx - dy) <= 0.42 * r) | (np.abs(dx + dy) <= 0.42 * r))
    if shape == "halfdisc":
        return (dx * dx + dy * dy <= r * r) & (dy <= 0)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray | float:
    if texture == "solid":
        return 1.0
    if texture == "hstripes":
        return np.where(np.floor((dy + r) / (r / 3)) % 2 == 0, 1.0, 0.55) * np.ones_like(dx)
    if texture == "checker":
        return np.where((np.floor((dx + r) / (r / 2)) + np.floor((dy + r) / (r / 2))) % 2 == 0, 1.0, 0.3)
    raise ValueError(f"unknown texture {texture!r}")


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sd: float) -> np.ndarray:
    """Uniform pixel noise of standard deviation ``sd`` (float32), from random bytes: ~4x cheaper than normal."""
    n = int(np.prod(shape))
    raw = np.frombuffer(rng.bytes(n), np.int8).reshape(shape)  # uniform on -128..127: sd sqrt((256^2 - 1) / 12)
    return raw * np.float32(sd / np.sqrt((256 ** 2 - 1) / 12))


def _window(cx: float, cy: float, r: float, size: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    x0, y0 = max(int(np.floor(cx - r)) - 1, 0), max(int(np.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(np.ceil(cx + r)) + 2, size), min(int(np.ceil(cy + r)) + 2, size)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    return x0, y0, dx, dy


def _paint(img: np.ndarray, rng: np.random.Generator, spec: ClassSpec, cx: float, cy: float, r: float) -> np.ndarray:
    """Draws one object into ``img`` ((3, H, W) float32, in place); returns its full-size (H, W) bool mask."""
    size = img.shape[1]
    x0, y0, dx, dy = _window(cx, cy, r, size)
    local = _shape_mask(spec.shape, dx, dy, r)
    colour = np.asarray(spec.colour, np.float32) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3).astype(np.float32)
    fill = colour[:, None, None] * np.asarray(_texture(spec.texture, dx, dy, r), np.float32)
    fill = fill + _noise(rng, (3, *local.shape), OBJECT_NOISE)  # (3, h, w)
    alpha = np.float32(rng.uniform(*spec.alpha))
    win = img[:, y0:y0 + local.shape[0], x0:x0 + local.shape[1]]
    np.copyto(win, (1 - alpha) * win + alpha * fill, where=local[None])
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + local.shape[0], x0:x0 + local.shape[1]] = local
    return mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(3, size, size) float32, channels first (numpy is slow on a trailing axis of 3): a colour gradient, a few
    low-frequency waves, pixel noise, then 2-5 distractor blobs."""
    c0, c1 = rng.uniform(60, 200, 3).astype(np.float32), rng.uniform(60, 200, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    gx, gy = np.float32(np.cos(theta)) * coords, np.float32(np.sin(theta)) * coords
    lo, hi = min(gx[0], gx[-1]) + min(gy[0], gy[-1]), max(gx[0], gx[-1]) + max(gy[0], gy[-1])
    d = (c1 - c0) / max(hi - lo, np.float32(1e-6))  # colour change per unit of gx + gy
    waves = np.zeros((size, size), np.float32)
    for _ in range(3):  # plane waves, evaluated separably: sin(u + v) = sin u cos v + cos u sin v
        phi, freq = rng.uniform(0, 2 * np.pi), rng.uniform(2, 10) * 2 * np.pi  # freq: cycles per image side
        u = np.float32(freq * np.cos(phi)) * coords + np.float32(rng.uniform(0, 7))
        v = np.float32(freq * np.sin(phi)) * coords
        amp = np.float32(rng.uniform(6, 18))
        waves += (amp * np.sin(u))[None, :] * np.cos(v)[:, None]
        waves += (amp * np.cos(u))[None, :] * np.sin(v)[:, None]
    # (3, H, W): the gradient c0 + d * (gx + gy - lo), separable in x and y, plus the waves, tinted per channel
    img = (c0 - d * lo)[:, None, None] + (d[:, None] * gx[None, :])[:, None, :] \
        + (d[:, None] * gy[None, :])[:, :, None]
    img += rng.uniform(0.5, 1.0, 3).astype(np.float32)[:, None, None] * waves
    img += _noise(rng, (3, size, size), BACKGROUND_NOISE)
    for _ in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))):
        r = rng.uniform(*DISTRACTOR_SIZE) * size / 2
        cx, cy = rng.uniform(0, size, 2)
        x0, y0, dx, dy = _window(cx, cy, 1.4 * r, size)
        if dx.size == 0 or dy.size == 0:
            continue
        angle = np.arctan2(dy, dx)
        k1, k2 = rng.integers(3, 7, 2)
        radius = r * (1 + rng.uniform(0.2, 0.35) * np.sin(k1 * angle + rng.uniform(0, 7))
                      + rng.uniform(0.05, 0.15) * np.sin(k2 * angle + rng.uniform(0, 7)))
        local = dx * dx + dy * dy <= radius * radius  # an irregular star-like blob: no class has this shape
        if rng.random() < 0.5:  # half the blobs take a class colour, so colour alone does not name the class
            colour = np.asarray(CLASS_TABLE[int(rng.integers(len(CLASS_TABLE)))].colour, np.float32)
        else:
            colour = rng.uniform(0, 255, 3).astype(np.float32)
        alpha = np.float32(rng.uniform(0.35, 1.0))
        win = img[:, y0:y0 + local.shape[0], x0:x0 + local.shape[1]]
        np.copyto(win, (1 - alpha) * win + alpha * colour[:, None, None], where=local[None])
    return img


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 (overwritten) -> (H, W, 3) uint8."""
    return np.ascontiguousarray(np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8).transpose(1, 2, 0))


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over the smaller area of two (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _draw_labels(rng: np.random.Generator, s: Structure) -> list[str]:
    """Class names present in one image (empty for an empty image), in table order."""
    if rng.random() < P_EMPTY:
        return []
    present: list[str] = []
    for c in s.classes:
        if c.role == "host":
            p = c.prior
        elif c.role == "companion":
            p = P_COMPANION_GIVEN_HOST if c.host in present else P_COMPANION_ALONE
        else:
            p = c.prior
            for a, b, p_b in PARTNERS:
                if c.name == b and a in present:
                    p = p_b
        if rng.random() < p:
            present.append(c.name)
    if not present:  # a non-empty image: give it one independent class, by prior
        independents = [c for c in s.classes if c.role == "independent"]
        weights = np.array([c.prior for c in independents])
        present.append(independents[int(rng.choice(len(independents), p=weights / weights.sum()))].name)
    return present


def _box(cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    return (cx - r, cy - r, cx + r, cy + r)


def _place(rng: np.random.Generator, size: int, r: float, boxes: list, skip: int | None = None,
           near: tuple[float, float, float] | None = None, within: tuple[float, float, float] | None = None):
    """A centre for an object of radius ``r`` fully inside the image and overlapping no placed box by more than
    MAX_OVERLAP (box ``skip`` excepted); ``near=(cx, cy, R)`` puts it touching a host of radius R, ``within``
    inside a crowd's disc. None when no try succeeds."""
    lo, hi = r + 1, size - r - 1
    if hi <= lo:
        return None
    limit = 0.0 if within is not None else MAX_OVERLAP
    for _ in range(PLACEMENT_TRIES):
        if near is not None:
            angle = rng.uniform(0, 2 * np.pi)
            dist = near[2] + 0.3 * r
            cx, cy = near[0] + dist * np.cos(angle), near[1] + dist * np.sin(angle)
        elif within is not None:
            angle, dist = rng.uniform(0, 2 * np.pi), within[2] * np.sqrt(rng.random())
            cx, cy = within[0] + dist * np.cos(angle), within[1] + dist * np.sin(angle)
        else:
            cx, cy = rng.uniform(lo, hi, 2)
        if not (lo <= cx <= hi and lo <= cy <= hi):
            continue
        box = _box(cx, cy, r)
        if all(_overlap(box, b) <= limit for i, b in enumerate(boxes) if i != skip):
            return float(cx), float(cy)
    return None


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def render_image(seed: int, split: str, index: int, size: int) -> RenderedImage:
    """Image ``index`` of ``split`` in the data set made with ``seed``; independent of how many images the set has.

    Objects are placed first (hosts, then independents, companions touching their host, then a crowd), then drawn
    large to small over the background, so the small faint companions lie on top.
    """
    s = build_structure()
    rng = np.random.default_rng([seed, SPLIT_KEYS[split], index])
    names = _draw_labels(rng, s)
    specs = {c.name: (cid, c) for cid, c in zip(s.category_ids, s.classes)}
    # placed: (category id, spec, cx, cy, r, crowd group or -1)
    placed: list[tuple[int, ClassSpec, float, float, float, int]] = []
    boxes: list[tuple[float, float, float, float]] = []
    host_slot: dict[str, int] = {}
    order = [n for n in names if specs[n][1].role == "host"] + \
            [n for n in names if specs[n][1].role == "independent"] + \
            [n for n in names if specs[n][1].role == "companion"]
    for name in order:
        cid, spec = specs[name]
        second = spec.role != "companion" and rng.random() < P_SECOND_INSTANCE
        for _ in range(2 if second else 1):
            r = rng.uniform(*spec.size) * size / 2
            if spec.role == "companion" and spec.host in host_slot:
                h = host_slot[spec.host]
                at = _place(rng, size, r, boxes, skip=h, near=(placed[h][2], placed[h][3], placed[h][4]))
            elif spec.role == "companion" and spec.host in names:
                at = None  # its host could not be placed: no companion either
            else:
                at = _place(rng, size, r, boxes)
            if at is None:
                continue
            if spec.role == "host":
                host_slot.setdefault(name, len(placed))
            placed.append((cid, spec, at[0], at[1], r, -1))
            boxes.append(_box(at[0], at[1], r))
    if names and rng.random() < P_CROWD:
        independents = [c for c in s.classes if c.role == "independent"]
        spec = independents[int(rng.integers(len(independents)))]
        cid = specs[spec.name][0]
        spread = 0.15 * size
        centre = _place(rng, size, spread, boxes)
        if centre is not None:
            members = []
            for _ in range(int(rng.integers(CROWD_MEMBERS[0], CROWD_MEMBERS[1] + 1))):
                r = rng.uniform(*CROWD_SIZE) * size / 2
                at = _place(rng, size, r, boxes + members, within=(centre[0], centre[1], spread - r))
                if at is not None:
                    members.append(_box(at[0], at[1], r))
                    placed.append((cid, spec, at[0], at[1], r, 1))
            if len(members) < 3:  # too few for a crowd: drop it
                placed = [p for p in placed if p[5] < 0]
    background = _background(rng, size)
    img = background.copy()
    drawing = sorted(range(len(placed)), key=lambda i: (placed[i][1].role == "companion", placed[i][5] >= 0,
                                                        -placed[i][4]))
    masks = [(_paint(img, rng, placed[i][1], placed[i][2], placed[i][3], placed[i][4]), i) for i in drawing]
    covered = np.zeros((size, size), bool)
    visible: list[tuple[np.ndarray, int]] = []
    for mask, i in reversed(masks):
        visible.append((mask & ~covered, i))
        covered |= mask
    visible.reverse()
    objects: list[RenderedObject] = []
    crowd_mask, crowd_members, crowd_cid = np.zeros((size, size), bool), 0, -1
    for mask, i in visible:
        if placed[i][5] >= 0:
            crowd_mask |= mask
            crowd_members += 1
            crowd_cid = placed[i][0]
        elif mask.any():
            objects.append(RenderedObject(placed[i][0], 0, mask, _bbox(mask), int(mask.sum())))
    if crowd_members:
        objects.append(RenderedObject(crowd_cid, 1, crowd_mask, _bbox(crowd_mask), int(crowd_mask.sum()),
                                      crowd_members))
    return RenderedImage(pixels=_to_uint8(img), background_float=background, objects=objects)


# -- files -------------------------------------------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a (H, W) bool mask: run lengths over the column-major pixels, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def make_image_ids(seed: int, counts: Sequence[int]) -> list[list[int]]:
    """Distinct random ids in [1, 581929] like COCO's, one list per split (train, val). Each split reads its own
    fixed random sequence, so the first n ids do not depend on how many are asked for; a later split skips the ids
    an earlier one took, so no id repeats across the splits."""
    if sum(counts) > MAX_IMAGE_ID // 2:
        raise SyntheticCocoError(f"at most {MAX_IMAGE_ID // 2} images in all, got {sum(counts)}")
    taken: set[int] = set()
    out = []
    for key, n in enumerate(counts):
        rng = np.random.default_rng([seed, 0x1D5, key])
        ids: list[int] = []
        while len(ids) < n:
            for candidate in rng.integers(1, MAX_IMAGE_ID + 1, size=256).tolist():
                if candidate not in taken and len(ids) < n:
                    taken.add(candidate)
                    ids.append(candidate)
        out.append(ids)
    return out


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    else:
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _check_out_dir(folder: Path, names: set[str]) -> None:
    """Refuse to leave images of an earlier run beside the new ones: a folder listing would mix them."""
    stale = sorted(p.name for p in folder.iterdir() if p.suffix in (".jpg", ".png") and p.name not in names)
    if stale:
        raise SyntheticCocoError(f"{folder} already holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} "
                                 f"from another run; remove them or write to another --out")


def _write_split(out_dir: Path, split: str, image_ids: list[int], first_ann_id: int, size: int, seed: int,
                 fmt: str, s: Structure) -> dict:
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    ext = FORMATS[fmt][1]
    names = [f"{i:012d}{ext}" for i in image_ids]
    _check_out_dir(folder, set(names))
    images, annotations = [], []
    ann_id = first_ann_id
    empty = crowds = 0
    class_images = {cid: 0 for cid in s.category_ids}
    for index, (image_id, name) in enumerate(zip(image_ids, names)):
        rendered = render_image(seed, split, index, size)
        (folder / name).write_bytes(_encode(rendered.pixels, fmt))
        images.append({"id": image_id, "file_name": name, "width": size, "height": size, "license": 1})
        empty += not rendered.objects
        for cid in rendered.category_ids:
            class_images[cid] += 1
        for o in rendered.objects:
            x, y, w, h = o.bbox
            segmentation = rle_encode(o.mask) if o.iscrowd else [[x, y, x + w, y, x + w, y + h, x, y + h]]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": o.category_id,
                                "bbox": [x, y, w, h], "area": float(o.area), "iscrowd": o.iscrowd,
                                "segmentation": segmentation})
            crowds += o.iscrowd
            ann_id += 1
    instances = {
        "info": {"description": f"yt8m-cma synthetic COCO-format images ({split}, seed {seed})",
                 "url": "", "version": "1.0", "year": 2020, "contributor": "pipeline.synthetic_coco",
                 "date_created": "2020-02-07"},  # fixed, so the files are byte-identical per seed
        "licenses": [{"id": 1, "name": "synthetic data, no rights reserved", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": s.categories(),
    }
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances) + "\n")
    n = len(image_ids)
    return {"images": n, "empty_images": empty, "annotations": len(annotations), "crowd_annotations": crowds,
            "annotations_per_image": round(len(annotations) / n, 4),
            "labels_per_image": round(sum(class_images.values()) / n, 4),
            "class_image_counts": {str(cid): class_images[cid] for cid in sorted(class_images)}}


def generate(out: str | Path, train_images: int = 400, val_images: int = 200, size: int = 160, seed: int = 0,
             fmt: str = "jpeg") -> dict:
    """Write the data set and its ``labels.json``/``config.json``; returns the summary written to config.json."""
    if seed < 0:
        raise SyntheticCocoError(f"seed must be >= 0, got {seed}")
    if train_images < 1 or val_images < 1:
        raise SyntheticCocoError(f"need at least one image per split, got train={train_images}, val={val_images}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise SyntheticCocoError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size}")
    if fmt not in FORMATS:
        raise SyntheticCocoError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SyntheticCocoError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    s = build_structure()
    train_ids, val_ids = make_image_ids(seed, [train_images, val_images])
    splits = {
        "train": _write_split(out_dir, "train", train_ids, 1, size, seed, fmt, s),
        "val": _write_split(out_dir, "val", val_ids, 5_000_001, size, seed, fmt, s),
    }
    summary = {
        "config": {"out": str(out), "train_images": train_images, "val_images": val_images, "size": size,
                   "seed": seed, "format": fmt},
        "files": {split: {"annotations": f"annotations/instances_{split}.json", "images": f"{split}/"}
                  for split in SPLITS},
        "num_classes": len(s.classes),
        "splits": splits,
    }
    (out_dir / "labels.json").write_text(json.dumps(s.to_json(), indent=1) + "\n")
    (out_dir / "config.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.synthetic_coco", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (local path)")
    p.add_argument("--train-images", type=int, default=400, help="number of training images")
    p.add_argument("--val-images", type=int, default=200, help="number of validation images")
    p.add_argument("--size", type=int, default=160, help="image side in pixels (square images)")
    p.add_argument("--seed", type=int, default=0, help="data seed; the class structure does not depend on it")
    p.add_argument("--format", choices=sorted(FORMATS), default="jpeg", help="image file format")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line entry; returns the summary. A user error prints one line and exits with status 2."""
    args = get_args_parser().parse_args(argv)
    try:
        summary = generate(args.out, args.train_images, args.val_images, args.size, args.seed, args.format)
    except Yt8mError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    t, v = summary["splits"]["train"], summary["splits"]["val"]
    print(f"wrote {t['images']} train / {v['images']} val {args.format} images of {args.size} px "
          f"({t['annotations'] + v['annotations']} annotations, {t['empty_images'] + v['empty_images']} empty "
          f"images, {t['crowd_annotations'] + v['crowd_annotations']} crowds, {summary['num_classes']} classes) "
          f"to {args.out}")
    return summary


if __name__ == "__main__":
    main()
