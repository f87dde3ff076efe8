"""Turn a COCO-format annotation file into a manifest: a fixed label map plus, per image, its file and labels.

The label order is pinned here and only here: class index ``k`` is the ``k``-th category in ascending category-id
order (COCO's ids are not contiguous: 80 classes with ids 1..90). ML-GCN's released graph and word-vector files use
alphabetical order instead; anything built from such files must be re-indexed through ``LabelMap`` first.

``read_coco`` reads any COCO-format instances file (official 2014/2017 ones, custom label sets), local or through
any fsspec URL, validates it, and returns a ``CocoManifest``; ``model.data.images`` turns a manifest into tensors.
Images without any annotation are dropped by default and counted (that is how the paper's 82,081 / 40,137 image
splits arise from COCO 2014's 82,783 / 40,504). Crowd annotations (``iscrowd=1``) count like any other: their
category is a label of the image and their box is kept. Whether the image files exist is not checked here (that is
thousands of round trips on an object store): the dataset skips and counts missing ones.

Every problem with the file raises a ``CocoFormatError`` whose one-line message names the file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np

from pipeline.errors import Yt8mError


class CocoFormatError(Yt8mError, ValueError):
    """A COCO annotation file is missing, unreadable, not JSON, or not laid out as COCO's instances format."""


class CocoFileNotFound(CocoFormatError):
    """The annotation file does not exist."""


class LabelMapError(Yt8mError, ValueError):
    """A label map is malformed (unsorted or duplicate ids, wrong types, a stored hash that does not match)."""


class LabelMapMismatch(LabelMapError):
    """Two label maps that must be identical (a checkpoint's and an annotation file's) are not."""


def _is_int(x: Any) -> bool:
    return type(x) is int or (isinstance(x, (int, np.integer)) and not isinstance(x, bool))


# -- label map -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelMap:
    """The classes of a data set, in category-id order: class index ``k`` is ``category_ids[k]`` named ``names[k]``.

    Stored in checkpoints through ``to_plain`` (plain lists and a string, so ``torch.load(weights_only=True)``
    reads it back) and compared against an annotation file's categories with ``check_same``.
    """
    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        ids, names = tuple(self.category_ids), tuple(self.names)
        if len(ids) != len(names):
            raise LabelMapError(f"a label map needs one name per category id; got {len(ids)} ids and "
                                f"{len(names)} names")
        if not ids:
            raise LabelMapError("a label map needs at least one class")
        bad = next((i for i in ids if not _is_int(i)), None)
        if bad is not None:
            raise LabelMapError(f"category ids must be integers; got {bad!r}")
        bad = next((n for n in names if not isinstance(n, str)), None)
        if bad is not None:
            raise LabelMapError(f"class names must be strings; got {bad!r}")
        ids = tuple(int(i) for i in ids)
        for a, b in zip(ids, ids[1:]):
            if b <= a:
                raise LabelMapError(f"category ids must be unique and ascending (the pinned label order); "
                                    f"{b} follows {a}")
        object.__setattr__(self, "category_ids", ids)
        object.__setattr__(self, "names", names)

    def __len__(self) -> int:
        return len(self.category_ids)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @functools.cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the canonical text ``"<id>\\t<name>\\n"`` per class, in class order."""
        text = "".join(f"{i}\t{n}\n" for i, n in zip(self.category_ids, self.names))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @functools.cached_property
    def _index(self) -> dict[int, int]:
        return {cid: k for k, cid in enumerate(self.category_ids)}

    def index_of(self, category_id: int) -> int:
        """Class index of a COCO category id; ``LabelMapError`` for an id outside the map."""
        try:
            return self._index[int(category_id)]
        except (KeyError, TypeError, ValueError):
            raise LabelMapError(f"category id {category_id!r} is not in this label map of {len(self)} classes "
                                f"(ids {self.category_ids[0]}..{self.category_ids[-1]})") from None

    def to_plain(self) -> dict:
        """``{"category_ids": [int], "names": [str], "sha256": str}``: plain types only."""
        return {"category_ids": list(self.category_ids), "names": list(self.names), "sha256": self.sha256}

    @classmethod
    def from_plain(cls, d: Mapping[str, Any]) -> "LabelMap":
        """Inverse of ``to_plain``; checks the stored hash when there is one."""
        if not isinstance(d, Mapping) or "category_ids" not in d or "names" not in d:
            raise LabelMapError(f"a stored label map is a dict with 'category_ids' and 'names'; got "
                                f"{type(d).__name__} {sorted(d) if isinstance(d, Mapping) else ''}".rstrip())
        ids, names = d["category_ids"], d["names"]
        if not isinstance(ids, (list, tuple)) or not isinstance(names, (list, tuple)):
            raise LabelMapError("a stored label map's 'category_ids' and 'names' must be lists")
        label_map = cls(tuple(ids), tuple(names))
        stored = d.get("sha256")
        if stored is not None and stored != label_map.sha256:
            raise LabelMapError(f"stored label map hash {str(stored)[:12]}... does not match its classes "
                                f"({label_map.sha256[:12]}...); the label map was edited or corrupted")
        return label_map

    def check_same(self, other: "LabelMap", what: str) -> None:
        """Raise ``LabelMapMismatch`` unless ``other`` has the same ids and names in the same order.

        ``what`` names the two sides, ``self`` first, e.g. ``"checkpoint best.pt vs annotations val.json"``; the
        message adds the class counts, the first index where they differ and the two hashes.
        """
        if self.category_ids == other.category_ids and self.names == other.names:
            return
        parts = []
        if len(self) != len(other):
            parts.append(f"{len(self)} classes vs {len(other)}")
        pairs_a = list(zip(self.category_ids, self.names))
        pairs_b = list(zip(other.category_ids, other.names))
        for k, (a, b) in enumerate(zip(pairs_a, pairs_b)):
            if a != b:
                parts.append(f"first difference at class {k}: id {a[0]} {a[1]!r} vs id {b[0]} {b[1]!r}")
                break
        else:
            k = min(len(pairs_a), len(pairs_b))
            extra, side = (pairs_a, "first") if len(pairs_a) > k else (pairs_b, "second")
            parts.append(f"the {side} has extra classes from class {k} on: id {extra[k][0]} {extra[k][1]!r}")
        raise LabelMapMismatch(f"label maps differ ({what}): {'; '.join(parts)}; sha256 {self.sha256[:12]} vs "
                               f"{other.sha256[:12]}")


def label_map_from_categories(categories: Sequence[Mapping[str, Any]], source: str = "categories") -> LabelMap:
    """The ``LabelMap`` of a COCO ``categories`` list (sorted by id; the list's own order does not matter).

    Raises ``CocoFormatError`` (message starting with ``source``) when the list is empty, an entry is not an object,
    an id is not an integer, an id repeats, or a name is missing or not a string.
    """
    if not isinstance(categories, (list, tuple)):
        raise CocoFormatError(f"{source}: 'categories' is a {type(categories).__name__}, not a list")
    if not categories:
        raise CocoFormatError(f"{source}: 'categories' is empty; a label set needs at least one category")
    seen: dict[int, str] = {}
    for n, cat in enumerate(categories):
        if not isinstance(cat, Mapping):
            raise CocoFormatError(f"{source}: categories[{n}] is a {type(cat).__name__}, not an object")
        cid, name = cat.get("id"), cat.get("name")
        if not _is_int(cid):
            raise CocoFormatError(f"{source}: categories[{n}] has id {cid!r}; category ids must be integers")
        if not isinstance(name, str):
            raise CocoFormatError(f"{source}: category {cid} has name {name!r}; names must be strings")
        if int(cid) in seen:
            raise CocoFormatError(f"{source}: category id {cid} appears twice ({seen[int(cid)]!r} and {name!r})")
        seen[int(cid)] = name
    ids = tuple(sorted(seen))
    return LabelMap(ids, tuple(seen[i] for i in ids))


# -- manifest --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CocoImage:
    """One image: its id, file (relative to the manifest's ``images_dir``), size in pixels as annotated, class
    indices ``labels`` (sorted, unique, int64), and boxes ``boxes`` ((N, 4) float32, x, y, width, height in pixels
    of the stored image) with their class indices ``box_labels`` ((N,) int64). Annotations without a ``bbox``
    contribute a label but no box."""
    image_id: int
    file_name: str
    width: int
    height: int
    labels: np.ndarray
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(eq=False)
class CocoManifest:
    """What ``read_coco`` returns: the label map, the kept images (ascending image id), where their files live, how
    many images without annotations were dropped, the annotation file it came from, and annotation counts
    (``num_annotations`` includes the ``num_crowd`` crowd ones)."""
    label_map: LabelMap
    images: list[CocoImage]
    images_dir: str
    dropped_empty: int = 0
    source: str = ""
    num_annotations: int = 0
    num_crowd: int = 0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    def multi_hot(self) -> np.ndarray:
        """(N, K) float32 with 1 where image n has class k."""
        y = np.zeros((len(self.images), self.label_map.num_classes), np.float32)
        for n, image in enumerate(self.images):
            y[n, image.labels] = 1.0
        return y

    def label_lists(self) -> list[np.ndarray]:
        """Per image, its sorted class indices (int64): the input of label frequencies and ASGE's co-occurrences."""
        return [image.labels for image in self.images]


def image_path(manifest: CocoManifest, image: CocoImage) -> str:
    """The image's file: ``images_dir`` joined with ``file_name`` (``/`` for URLs such as ``gs://bucket/dir``)."""
    root = str(manifest.images_dir)
    if "://" in root:
        return posixpath.join(root.rstrip("/") + "/", image.file_name)
    return os.path.join(root, image.file_name)


# -- reading ---------------------------------------------------------------------------------------------------
def _load_json(source: str) -> Any:
    try:
        with fsspec.open(source, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CocoFileNotFound(f"annotation file {source} does not exist") from None
    except IsADirectoryError:
        raise CocoFormatError(f"{source} is a directory, not a COCO annotation file") from None
    except OSError as e:
        raise CocoFormatError(f"cannot read annotation file {source}: {type(e).__name__}: {e}") from None
    if not raw.strip():
        raise CocoFormatError(f"annotation file {source} is empty")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{source} is not UTF-8 text, so not a COCO JSON file ({e.reason} at byte "
                              f"{e.start})") from None
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(raw.rstrip()) or e.msg.startswith("Unterminated")
        hint = "; the file looks truncated (an interrupted download or copy?)" if truncated else ""
        raise CocoFormatError(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                              f"{hint}") from None


def _positive_int(x: Any) -> int | None:
    if _is_int(x) and x > 0:
        return int(x)
    if isinstance(x, float) and x.is_integer() and x > 0:  # some tools write 640.0
        return int(x)
    return None


def _parse_images(images: list, source: str) -> dict[int, tuple[str, int, int]]:
    out: dict[int, tuple[str, int, int]] = {}
    for n, img in enumerate(images):
        if type(img) is not dict and not isinstance(img, Mapping):
            raise CocoFormatError(f"{source}: images[{n}] is a {type(img).__name__}, not an object")
        iid, name = img.get("id"), img.get("file_name")
        if not _is_int(iid):
            raise CocoFormatError(f"{source}: images[{n}] has id {iid!r}; image ids must be integers")
        iid = int(iid)
        if not isinstance(name, str) or not name:
            raise CocoFormatError(f"{source}: image {iid} has file_name {name!r}; it must be a non-empty string")
        w, h = _positive_int(img.get("width")), _positive_int(img.get("height"))
        if w is None or h is None:
            raise CocoFormatError(f"{source}: image {iid} has width {img.get('width')!r} and height "
                                  f"{img.get('height')!r}; both must be positive integers")
        if iid in out:
            raise CocoFormatError(f"{source}: image id {iid} appears more than once (files {out[iid][0]!r} and "
                                  f"{name!r}); image ids must be unique")
        out[iid] = (name, w, h)
    return out


_NUMBER_TYPES = {int, float}
_NO_BOX = (0.0, 0.0, 0.0, 0.0)


def _bad_bbox(ann: Mapping, n: int, source: str) -> CocoFormatError:
    return CocoFormatError(f"{source}: annotation {ann.get('id', f'#{n}')} (image {ann.get('image_id')}) has "
                           f"bbox {ann.get('bbox')!r}; a bbox is 4 finite numbers [x, y, width, height]")


def _bbox(ann: Mapping, n: int, source: str) -> Any:
    """The annotation's bbox list (its finiteness is the caller's check), or None when it has none."""
    bbox = ann.get("bbox")
    if bbox is None:
        return None
    if type(bbox) is list and len(bbox) == 4 and {type(bbox[0]), type(bbox[1]), type(bbox[2]),
                                                    type(bbox[3])} <= _NUMBER_TYPES:
        return bbox
    raise _bad_bbox(ann, n, source)


def _count_text(counter: Counter, noun: str, limit: int = 5) -> str:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    text = ", ".join(f"{noun} {k!r} ({c} annotation{'s' if c != 1 else ''})" for k, c in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_coco(ann_path: str | os.PathLike, images_dir: str | os.PathLike, keep_empty: bool = False,
              label_map: LabelMap | None = None) -> CocoManifest:
    """Read a COCO-format annotation file into a ``CocoManifest``.

    Args:
        ann_path: the JSON file (``images``, ``annotations``, ``categories``); a local path or any fsspec URL.
        images_dir: the folder the ``file_name`` of each image is relative to (local or a URL); not checked here.
        keep_empty: keep images without any annotation (with no labels) instead of dropping and counting them.
        label_map: the label map the caller's model was trained with (e.g. from a checkpoint); the file's
            categories must be identical, else ``LabelMapMismatch``.

    Images come out in ascending image id, whatever the file's order. Annotations without ``bbox`` are allowed
    (label-only files) and add a label without a box. Raises ``CocoFormatError`` (or ``CocoFileNotFound``), one line
    naming the file, for: a missing or unreadable file, invalid or truncated JSON, missing or non-list ``images``
    / ``annotations`` / ``categories``, malformed entries, duplicate image ids, annotations whose ``category_id`` is
    not among the categories or whose ``image_id`` is not among the images, and bboxes that are not 4 numbers.
    """
    source = str(ann_path)
    data = _load_json(source)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{source}: the top level is a JSON {type(data).__name__}, not an object with "
                              f"'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{source} has no {key!r} list; a COCO instances file has 'images', "
                                  f"'annotations' and 'categories' (found keys: {', '.join(sorted(data)) or 'none'})")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{source}: {key!r} is a JSON {type(data[key]).__name__}, not a list")

    file_map = label_map_from_categories(data["categories"], source)
    if label_map is not None:
        label_map.check_same(file_map, f"expected label map vs the categories of {source}")
        file_map = label_map
    class_of = {cid: k for k, cid in enumerate(file_map.category_ids)}
    images = _parse_images(data["images"], source)

    order = sorted(images)
    position = {iid: p for p, iid in enumerate(order)}
    ann_pos: list[int] = []
    ann_class: list[int] = []
    ann_box: list[list | None] = []  # [x, y, w, h] as in the file
    unknown_category: Counter = Counter()
    unknown_image: Counter = Counter()
    crowd = 0
    for n, ann in enumerate(data["annotations"]):
        if type(ann) is not dict and not isinstance(ann, Mapping):
            raise CocoFormatError(f"{source}: annotations[{n}] is a {type(ann).__name__}, not an object")
        iid, cid = ann.get("image_id"), ann.get("category_id")
        if not _is_int(iid) or not _is_int(cid):
            raise CocoFormatError(f"{source}: annotation {ann.get('id', f'#{n}')} has image_id {iid!r} and "
                                  f"category_id {cid!r}; both must be integers")
        k = class_of.get(int(cid))
        if k is None:
            unknown_category[int(cid)] += 1
            continue
        p = position.get(int(iid))
        if p is None:
            unknown_image[int(iid)] += 1
            continue
        box = _bbox(ann, n, source)
        crowd += bool(ann.get("iscrowd", 0))
        ann_pos.append(p)
        ann_class.append(k)
        ann_box.append(box)
        if box is not None and not math.isfinite(sum(box)):  # NaN or Infinity (Python's json accepts both)
            raise _bad_bbox(ann, n, source)
    if unknown_category:
        total = sum(unknown_category.values())
        raise CocoFormatError(f"{source}: {total} annotation{'s use' if total != 1 else ' uses'} category ids "
                              f"that are not in 'categories': {_count_text(unknown_category, 'id')}")
    if unknown_image:
        total = sum(unknown_image.values())
        raise CocoFormatError(f"{source}: {total} annotation{'s refer' if total != 1 else ' refers'} to images "
                              f"that are not in 'images': {_count_text(unknown_image, 'image_id')}")

    pos = np.asarray(ann_pos, np.int64)
    cls = np.asarray(ann_class, np.int64)
    has_box = np.asarray([b is not None for b in ann_box], bool)
    boxes = np.asarray([_NO_BOX if b is None else b for b in ann_box], np.float32).reshape(-1, 4)
    sort = np.argsort(pos, kind="stable")  # boxes stay in file order within an image
    pos, cls, has_box, boxes = pos[sort], cls[sort], has_box[sort], boxes[sort]
    bounds = np.searchsorted(pos, np.arange(len(order) + 1))
    num_classes = file_map.num_classes
    pairs = np.unique(pos * num_classes + cls)  # (image, class) once each, ascending
    label_pos, label_cls = pairs // num_classes, pairs % num_classes
    label_bounds = np.searchsorted(label_pos, np.arange(len(order) + 1))

    kept: list[CocoImage] = []
    dropped = 0
    for p, iid in enumerate(order):
        lo, hi = bounds[p], bounds[p + 1]
        if lo == hi and not keep_empty:
            dropped += 1
            continue
        name, w, h = images[iid]
        sel = has_box[lo:hi]
        labels = label_cls[label_bounds[p]:label_bounds[p + 1]]
        kept.append(CocoImage(image_id=iid, file_name=name, width=w, height=h, labels=labels,
                              boxes=np.ascontiguousarray(boxes[lo:hi][sel]),
                              box_labels=np.ascontiguousarray(cls[lo:hi][sel])))
    return CocoManifest(label_map=file_map, images=kept, images_dir=str(images_dir), dropped_empty=dropped,
                        source=source, num_annotations=len(ann_pos), num_crowd=crowd)
