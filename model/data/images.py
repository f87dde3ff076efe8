"""Decode images into normalized tensors for training, evaluation and prediction.

``load_rgb`` turns any file PIL reads (local path, fsspec URL or bytes) into an 8-bit RGB ``PIL.Image``, whatever
its mode, and raises ``ImageDecodeError`` naming the file for anything it cannot decode completely: truncated files
are errors, never silently grey-filled (``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left False, and every image is
fully decoded with ``load()``). ``CocoImageDataset`` (a ``CocoManifest``) and ``ImageFileDataset`` (files, folders,
globs) return such a failure as a ``broken`` item instead of raising, so a training or prediction loop counts and
skips broken images rather than dying on image 61,234; ``collate_images`` separates the two kinds.

Augmentations are reproducible: with a ``seed``, the random transform of item ``i`` in epoch ``e`` is drawn from a
torch generator seeded with (seed, e, i), so it does not depend on the worker count or the order items are read
in. ``SeededShuffleSampler`` does the same for the order: epoch ``e`` is the permutation of ``np.random.default_rng
([seed, e])``. ``ImageLoader.set_epoch(e)`` sets both (workers see it too when they persist).
"""
from __future__ import annotations

import io
import os
import posixpath
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from model.data.coco import CocoManifest, image_path
from model.data.shared_epoch import SharedEpoch
from pipeline.errors import Yt8mError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_KINDS = ("missing", "unreadable", "empty", "truncated", "undecodable", "unsupported_mode")
_GLOB_CHARS = set("*?[")
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(Yt8mError):
    """An image file is missing, empty, truncated or otherwise not decodable.

    Args:
        path: the file (or a name for in-memory bytes).
        message: what is wrong, for a human.
        kind: one of ``DECODE_KINDS``; stable, for counting.
    """

    def __init__(self, path: str, message: str, kind: str = "undecodable"):
        if kind not in DECODE_KINDS:
            raise ValueError(f"unknown ImageDecodeError kind {kind!r}; expected one of {DECODE_KINDS}")
        super().__init__(f"cannot read image {path}: {message}")
        self.path, self.message, self.kind = path, message, kind

    def __reduce__(self):
        return (type(self), (self.path, self.message, self.kind))


class NoImagesFound(Yt8mError):
    """A prediction input (file, folder, glob or URL) matches no image file."""


# -- decoding --------------------------------------------------------------------------------------------------
def _read_bytes(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageDecodeError(path, "no such file", "missing") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "it is a directory", "unreadable") from None
    except OSError as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}", "unreadable") from None


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # a broken EXIF block must not cost the image
        return 1


def _oriented(img: Image.Image, exif_transpose: bool, expect_size: tuple[int, int] | None) -> Image.Image:
    orientation = _orientation(img)
    if orientation == 1:
        return img
    if expect_size is not None:
        expect = (int(expect_size[0]), int(expect_size[1]))
        turned = img.size[::-1] if orientation in (5, 6, 7, 8) else img.size
        if img.size == expect:  # the annotation is in stored-pixel coordinates (also the answer when ambiguous)
            return img
        if turned == expect:
            exif_transpose = True
    if not exif_transpose:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        u8 = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    else:  # I;16*, and I read as 16-bit samples (how older Pillow opens 16-bit PNGs)
        wide = np.clip(arr.astype(np.int64), 0, 65535)
        u8 = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(u8)).convert("RGB")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _sixteen_bit_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:
        raise ImageDecodeError(name, f"PIL cannot convert mode {mode} to RGB ({e})", "unsupported_mode") from None


def load_rgb(source: str | os.PathLike | bytes | bytearray | memoryview, name: str | None = None,
             exif_transpose: bool = True, expect_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image completely into an 8-bit RGB ``PIL.Image``.

    Args:
        source: a local path, an fsspec URL, or the file's bytes.
        name: the name errors use (default: the path; ``<bytes>`` for bytes).
        exif_transpose: turn the image upright as its EXIF orientation tag says (what viewers show).
        expect_size: (width, height) the caller's annotations were made on. When given and the stored pixels
            already have that size, they are kept as stored, whatever the tag says (COCO's boxes and sizes are in
            stored-pixel coordinates); when only the turned image has that size, it is turned.

    Modes: 1/L/P/CMYK/YCbCr convert with PIL; anything with transparency (RGBA, LA, PA, a palette or colour key
    with ``transparency``) is composited onto white, because fully transparent pixels often hold arbitrary colour
    (usually black) that dropping the alpha channel would expose. 16-bit modes (I;16, I;16B, I;16L, and I read as
    16-bit) map 0..65535 linearly onto 0..255; F maps [0, 1] onto 0..255 when its maximum is at most 1, else clips.
    Multi-frame files (GIF, TIFF) give their first frame.

    Raises ``ImageDecodeError`` (kind ``missing``, ``unreadable``, ``empty``, ``truncated``, ``undecodable`` or
    ``unsupported_mode``) with a one-line message naming the file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        data = bytes(source)
    else:
        name = name or os.fspath(source)
        data = _read_bytes(os.fspath(source))
    if not data:
        raise ImageDecodeError(name, "the file is empty (0 bytes)", "empty")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated file fails here, not later inside a transform
        img = _oriented(img, exif_transpose, expect_size)
        return _to_rgb(img, name)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(name, f"not an image format PIL can identify ({len(data)} bytes starting "
                                     f"{data[:8]!r})", "undecodable") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(name, str(e), "undecodable") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, EOFError, ValueError, struct.error, ...
        text = str(e).splitlines()[0] if str(e) else ""
        kind = "truncated" if "truncat" in text.lower() or isinstance(e, EOFError) else "undecodable"
        raise ImageDecodeError(name, f"{type(e).__name__}: {text}" if text else type(e).__name__, kind) from None


# -- transforms ------------------------------------------------------------------------------------------------
def train_transform(size: int = 448, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    scale: tuple[float, float] = (0.3, 1.0)) -> Callable[[Image.Image], torch.Tensor]:
    """The paper's augmentation, "randomly cropped and resized to 448x448 with random horizontal flip":
    ``RandomResizedCrop(size, scale=scale)`` (bilinear, aspect ratio 3/4..4/3) + ``RandomHorizontalFlip`` +
    ``ToTensor`` + ``Normalize(mean, std)``. The crop scale (0.3, 1.0) is our choice: the paper gives none.
    Randomness comes from torch's default CPU generator (see ``CocoImageDataset``'s ``seed``)."""
    return T.Compose([T.RandomResizedCrop(size, scale=tuple(scale)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(list(mean), list(std))])


def eval_transform(size: int = 448, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to exactly (size, size) (bilinear, antialiased; aspect ratio not kept, nothing cropped) + ``ToTensor``
    + ``Normalize``. Without a crop, boxes map linearly: x' = x * size / width, y' = y * size / height."""
    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(list(mean), list(std))])


# -- datasets --------------------------------------------------------------------------------------------------
def _item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class CocoImageDataset(SharedEpoch, Dataset):
    """The images of a ``CocoManifest`` as dicts ``image`` ((3, S, S) float32), ``labels`` ((K,) float32
    multi-hot), ``image_id`` and ``index``; an image that is missing or cannot be decoded gives
    ``{"broken": image_id, "reason": one-line message, "kind": ImageDecodeError kind, "index": i}`` instead.

    Args:
        manifest: from ``read_coco``.
        transform: PIL RGB image -> tensor, e.g. ``train_transform(448)`` or ``eval_transform(448)``.
        seed: with an int, item ``i`` of epoch ``e`` is transformed under torch's CPU generator seeded with
            (seed, e, i) (the caller's generator state is restored afterwards): reproducible whatever the workers.
            ``None`` leaves the transform to the ambient generator (DataLoader seeds each worker's).

    Images keep their stored pixel orientation when it matches the annotated width and height (COCO's boxes are in
    stored-pixel coordinates); see ``load_rgb``'s ``expect_size``.
    """

    def __init__(self, manifest: CocoManifest, transform: Callable[[Image.Image], torch.Tensor],
                 seed: int | None = 0):
        self.manifest = manifest
        self.transform = transform
        self.seed = None if seed is None else int(seed)
        self.num_classes = manifest.label_map.num_classes
        self._init_epoch()

    def __len__(self) -> int:
        return len(self.manifest.images)

    def _transform(self, img: Image.Image, index: int) -> torch.Tensor:
        if self.seed is None:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_item_seed(self.seed, self.epoch, index))
            return self.transform(img)

    def __getitem__(self, index: int) -> dict:
        image = self.manifest.images[index]
        try:
            pil = load_rgb(image_path(self.manifest, image), expect_size=(image.width, image.height))
        except ImageDecodeError as e:
            return {"broken": image.image_id, "reason": str(e), "kind": e.kind, "index": int(index)}
        labels = torch.zeros(self.num_classes, dtype=torch.float32)
        labels[torch.from_numpy(image.labels)] = 1.0
        return {"image": self._transform(pil, index), "labels": labels, "image_id": image.image_id,
                "index": int(index)}


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Sorted, de-duplicated image files from files, folders, globs and fsspec URLs.

    A file named directly is taken whatever its extension. A folder contributes every file below it (recursively)
    whose extension is one of ``IMAGE_EXTENSIONS`` (any case); so does each folder a glob matches, and a glob's
    file matches are filtered the same way. Local results are absolute paths, remote ones full URLs. Raises
    ``NoImagesFound`` for an input that matches no image.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: set[str] = set()
    for raw in inputs:
        text = os.fspath(raw)
        fs, fs_path = fsspec.core.url_to_fs(text)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        local = "file" in protocols or "local" in protocols
        mine: list[str] = []
        if _GLOB_CHARS & set(fs_path):
            for match in fs.glob(fs_path):
                if fs.isdir(match):
                    mine += _images_below(fs, match)
                elif _is_image_name(match):
                    mine.append(match)
        elif fs.isdir(fs_path):
            mine = _images_below(fs, fs_path)
        elif fs.isfile(fs_path):
            mine = [fs_path]
        else:
            raise NoImagesFound(f"no such file or directory: {text}")
        if not mine:
            raise NoImagesFound(f"{text} matches no image files (looked for "
                                f"{', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}, any case)")
        found.update(p if local else fs.unstrip_protocol(p) for p in mine)
    return sorted(found)


def _is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _images_below(fs, folder: str) -> list[str]:
    return [p for p in fs.find(folder) if _is_image_name(p)]


class ImageFileDataset(Dataset):
    """Image files for prediction, as dicts ``image`` ((3, S, S) float32), ``path``, ``index`` and ``orig_size``
    ((width, height) after EXIF orientation); a file that cannot be decoded gives ``{"broken": path, "reason":
    message, "kind": kind, "index": i}``.

    Args:
        inputs: files, folders, globs or URLs (see ``expand_inputs``; ``NoImagesFound`` when one matches nothing).
        transform: PIL RGB image -> tensor, normally ``eval_transform(size)``.
    """

    def __init__(self, inputs: str | os.PathLike | Sequence[str | os.PathLike],
                 transform: Callable[[Image.Image], torch.Tensor]):
        self.paths = expand_inputs(inputs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            pil = load_rgb(path)
        except ImageDecodeError as e:
            return {"broken": path, "reason": str(e), "kind": e.kind, "index": int(index)}
        return {"image": self.transform(pil), "path": path, "index": int(index), "orig_size": pil.size}


def collate_images(items: Sequence[dict]) -> dict:
    """Stack the decoded items of a batch and list the broken ones.

    Returns ``image`` (B, 3, S, S) float32, ``indices`` (B,) int64, ``broken`` (list of (image id or path,
    reason)) and, as the items carry them, ``labels`` (B, K) float32, ``image_ids`` (list[int]), ``paths``
    (list[str]) and ``orig_sizes`` (list of (width, height)). B counts decoded items only and may be 0: then
    ``image`` is an empty (0, 3, 0, 0) tensor (and ``labels`` (0, 0)), since no item says the sizes; skip the batch.
    """
    good = [it for it in items if "broken" not in it]
    broken = [(it["broken"], it["reason"]) for it in items if "broken" in it]
    batch: dict[str, Any] = {"broken": broken}
    if good:
        batch["image"] = torch.stack([it["image"] for it in good])
    else:
        batch["image"] = torch.zeros((0, 3, 0, 0), dtype=torch.float32)
    batch["indices"] = torch.tensor([it["index"] for it in good], dtype=torch.int64)
    has_labels = any("labels" in it for it in good) or any(isinstance(b[0], int) for b in broken)
    if has_labels:
        batch["labels"] = (torch.stack([it["labels"] for it in good]) if good
                           else torch.zeros((0, 0), dtype=torch.float32))
        batch["image_ids"] = [int(it["image_id"]) for it in good]
    if any("path" in it for it in good) or any(isinstance(b[0], str) for b in broken):
        batch["paths"] = [it["path"] for it in good]
        batch["orig_sizes"] = [tuple(it["orig_size"]) for it in good]
    return batch


# -- sampling and loading --------------------------------------------------------------------------------------
def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SeededShuffleSampler(Sampler[int]):
    """Every index of ``range(n)`` exactly once per epoch, in an order that is a function of (seed, epoch) only.

    Epoch ``e`` (set with ``set_epoch(e)`` before iterating; 0 by default) uses the permutation of
    ``np.random.default_rng([seed, e])``; ``shuffle=False`` keeps 0..n-1. With several ranks (``rank`` and
    ``world_size``, by default from an initialized ``torch.distributed``) rank r takes positions r, r + world_size,
    ... of that order: disjoint, together every index once; rank counts differ by at most one, so a
    DistributedDataParallel loop should stop every rank at the same step (``drop_last`` plus a step limit).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, world_size {self.world_size})")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        full = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                else np.arange(self.n))
        return full[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class ImageLoader(DataLoader):
    """A DataLoader over an image dataset with ``SeededShuffleSampler``; ``set_epoch(e)`` selects epoch e's order
    and (for ``CocoImageDataset``) its augmentations."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def make_image_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                      drop_last: bool = False, pin_memory: bool = False, prefetch_factor: int = 2,
                      rank: int | None = None, world_size: int | None = None) -> ImageLoader:
    """An ``ImageLoader`` yielding ``collate_images`` batches in ``SeededShuffleSampler(len(dataset), seed,
    shuffle)`` order. Call ``loader.set_epoch(e)`` before each epoch for a new (reproducible) order; with
    ``shuffle=False`` the order is the dataset's. Persistent workers with ``prefetch_factor`` batches each in flight
    when ``workers > 0``; the DataLoader's own generator is seeded with ``seed`` too, so per-worker seeds (used by a
    dataset with ``seed=None``) are reproducible. A batch's broken items are in ``batch["broken"]``; ``drop_last``
    drops a short last batch of indices, before decoding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = SeededShuffleSampler(len(dataset), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
    return ImageLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                       collate_fn=collate_images, drop_last=drop_last, pin_memory=pin_memory, generator=generator,
                       **extra)
