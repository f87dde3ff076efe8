"""Stream Parquet video shards into padded, masked training batches.

``ParquetVideoDataset`` is an ``IterableDataset`` over the shards ``beam_jobs.preprocess`` writes (local paths or
any fsspec URL such as ``gs://``). Every (rank, DataLoader worker) pair reads a disjoint part of the data, so each
video is yielded exactly once per epoch across all of them: whole shards when there are at least as many shards as
readers, single Parquet row groups otherwise. Videos pass through a seeded shuffle buffer, are truncated to the
first ``max_frames`` frames (as the official YouTube-8M reader does) and carry multi-hot labels.
``collate_videos`` pads a batch to its longest video only and returns the mask of real frames.

Frames stay in the shard's storage dtype (float16 by default) until collation, which halves the memory a large
shuffle buffer holds; the float32 cast happens in the copy into the padded batch, in the worker process.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.data.shared_epoch import SharedEpoch
from pipeline import shards as shard_io
from pipeline.errors import Yt8mError

SEGMENT_KEYS = ("segment_start_times", "segment_labels", "segment_scores")


class DataError(Yt8mError):
    """The training or evaluation data cannot be read as asked (no shards, mismatched shards, bad rows)."""


class LabelOutOfRange(DataError):
    """A video carries a class id outside ``[0, num_classes)``."""

    def __init__(self, video_id: str, label: int, num_classes: int, source: str = ""):
        self.video_id, self.label, self.num_classes = video_id, int(label), int(num_classes)
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"video {video_id!r}{where} has label {label}, outside [0, {num_classes}) set by "
                         f"--num-classes {num_classes}; raise --num-classes or fix the data")

    def __reduce__(self):  # rebuilt from its fields when it crosses from a DataLoader worker
        return (type(self), (self.video_id, self.label, self.num_classes, self.source))


class MissingFeature(DataError):
    """A shard lacks a feature (or the segment columns) the loader was asked for."""


class RaisedInWorker:
    """A project error raised inside a DataLoader worker, sent to the main process as if it were a batch.

    DataLoader re-raises worker exceptions by calling ``type(msg)`` with the formatted worker traceback as the
    message, which turns a one-line ``DataError`` into a traceback dump (and ``LabelOutOfRange`` into a bare
    ``RuntimeError``). Shipping the pickled error object instead keeps its type, fields and message; ``VideoLoader``
    raises it, and any other consumer raises it on first use of the "batch".
    """

    def __init__(self, error: Yt8mError):
        self.error = error

    def __getitem__(self, key):
        raise self.error


class VideoLoader(DataLoader):
    """DataLoader that re-raises project errors from its workers unchanged (see ``RaisedInWorker``)."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, RaisedInWorker):
                raise batch.error
            yield batch


class DatasetSummary(NamedTuple):
    num_videos: int
    feature_dims: dict  # feature name -> per-frame dimension, in shard order
    level: str  # "frame" or "video"


def _shard_paths(path: str | Sequence[str]) -> list[str]:
    if isinstance(path, (list, tuple)):
        paths = [p for item in path for p in shard_io.list_shards(str(item))]
    else:
        paths = shard_io.list_shards(str(path))
    if not paths:
        raise DataError(f"no Parquet shards found at {path}")
    return list(paths)


def dataset_summary(path: str | Sequence[str]) -> DatasetSummary:
    """Video count, feature dims and level from the shard footers alone (no feature data is read).
    Raises ``DataError`` when the shards disagree on features, dims, level or dtype."""
    paths = _shard_paths(path)
    infos = [shard_io.read_shard_info(p) for p in paths]
    first = infos[0]
    for p, info in zip(paths[1:], infos[1:]):
        if (dict(info.features), info.level, info.dtype) != (dict(first.features), first.level, first.dtype):
            raise DataError(f"{p} has features {dict(info.features)} ({info.level}, {info.dtype}) but {paths[0]} "
                            f"has {dict(first.features)} ({first.level}, {first.dtype}); shards of one data set "
                            f"must agree")
    return DatasetSummary(num_videos=sum(i.num_rows for i in infos), feature_dims=dict(first.features),
                          level=first.level)


@dataclass(frozen=True)
class ReadUnit:
    """A piece of the data one reader owns: a shard, or some of its row groups (``None``: all of them)."""
    shard: str
    row_groups: tuple[int, ...] | None = None


def plan_reads(shards: Sequence[str], num_row_groups: Sequence[int], part: int, num_parts: int,
               order_rng: np.random.Generator | None) -> list[ReadUnit]:
    """The units reader ``part`` of ``num_parts`` owns. ``order_rng`` (seeded identically in every reader, so all
    readers agree on the permutation) shuffles the shard or row-group order; ``None`` keeps file order.

    With at least ``num_parts`` shards, shards are dealt round-robin: each reader opens only its own files. With
    fewer, individual row groups are dealt instead, so no reader idles while another reads a whole shard.
    """
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} outside [0, {num_parts})")
    if len(shards) >= num_parts:
        order = order_rng.permutation(len(shards)) if order_rng is not None else np.arange(len(shards))
        return [ReadUnit(shards[i]) for i in order[part::num_parts]]
    pieces = [(s, g) for s, n in zip(shards, num_row_groups) for g in range(n)]
    order = order_rng.permutation(len(pieces)) if order_rng is not None else np.arange(len(pieces))
    mine = [pieces[i] for i in order[part::num_parts]]
    return [ReadUnit(s, (g,)) for s, g in mine]


def shuffle_buffer(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Approximate shuffle of a stream in O(size) memory: fill a buffer of ``size`` items, then for every new item
    emit a uniformly chosen buffered one and put the new item in its place; drain the rest in random order."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _reader_index(rank: int | None, world_size: int | None) -> tuple[int, int, int, int]:
    """(rank, world_size, worker_id, num_workers) of the calling process."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world_size, worker, workers


class ParquetVideoDataset(SharedEpoch, IterableDataset):
    """Videos from Parquet shards as dicts ``x`` ((T, D) ndarray, storage dtype, T <= max_frames), ``labels``
    ((K,) float32 multi-hot), ``id``, ``num_frames`` (T), and the segment arrays when ``segment_labels``.

    Args:
        path: a preprocess output directory, a shard, a glob, an fsspec URL, or a list of any of those.
        features: feature names to read; concatenated per frame along D in this order (``("rgb", "audio")``).
        num_classes: K of the multi-hot labels; a label >= K raises ``LabelOutOfRange``.
        max_frames: keep the first ``max_frames`` frames of longer videos.
        shuffle_buffer: videos held for shuffling per reader; 0 or 1 keeps file order.
        seed: base seed; the read order is a function of (seed, epoch, rank, worker) only.
        shuffle_shards: permute the shard (or row-group) order each epoch.
        segment_labels: also yield ``segment_start_times``, ``segment_labels``, ``segment_scores``; every shard
            must have them. All ratings come through, also those starting at or past the video's (kept) frames.
        infinite: loop over epochs forever (epoch, epoch + 1, ...) instead of stopping after one.
        rank, world_size: this process's place among distributed readers; default: from ``torch.distributed`` when
            it is initialized, else a single process. Readers get whole shards or row groups, so their video counts
            can differ by up to one shard (or row group): a DistributedDataParallel loop should stop every rank
            at the same step (e.g. ``drop_last`` plus a step limit) rather than rely on equal batch counts.
    """

    def __init__(self, path: str | Sequence[str], features: Sequence[str] = ("rgb",), num_classes: int = 3862,
                 max_frames: int = 300, shuffle_buffer: int = 1024, seed: int = 0, shuffle_shards: bool = True,
                 segment_labels: bool = False, infinite: bool = False, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        if isinstance(features, str):
            features = tuple(f for f in features.split(",") if f)
        if not features:
            raise DataError("no feature requested (use e.g. features=('rgb',))")
        if num_classes < 1 or max_frames < 1:
            raise DataError(f"num_classes ({num_classes}) and max_frames ({max_frames}) must be positive")
        if (rank is None) != (world_size is None):
            raise DataError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside [0, world_size {world_size})")
        self.path = path
        self.shards = _shard_paths(path)
        self.features = tuple(features)
        self.num_classes = int(num_classes)
        self.max_frames = int(max_frames)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.shuffle_shards = bool(shuffle_shards)
        self.segment_labels = bool(segment_labels)
        self.infinite = bool(infinite)
        self.rank, self.world_size = rank, world_size
        # Fail now, in the main process, rather than inside a worker: the first shard must have what we read.
        info = shard_io.read_shard_info(self.shards[0])
        self._check_shard(self.shards[0], info)
        self.feature_dims = {f: int(info.features[f]) for f in self.features}
        self.feature_dim = sum(self.feature_dims.values())
        self._init_epoch()  # shared memory: set_epoch() in the main process reaches persistent workers

    # -- reading -----------------------------------------------------------------------------------------------
    def _check_shard(self, path: str, info) -> None:
        missing = [f for f in self.features if f not in info.features]
        if missing:
            raise MissingFeature(f"{path} has no {', '.join(missing)} feature (it has "
                                 f"{', '.join(info.features) or 'none'}); use --features "
                                 f"{','.join(f for f in self.features if f in info.features) or 'rgb'} or "
                                 f"preprocess with --features {','.join(self.features)}")
        if self.segment_labels and not info.has_segments:
            raise MissingFeature(f"{path} has no segment columns, but segment labels were requested "
                                 f"(preprocess segment-rated data such as the 2019 validate split)")

    def reader_plan(self, epoch: int | None = None, part: int | None = None,
                    num_parts: int | None = None) -> list[ReadUnit]:
        """The units the calling reader owns in ``epoch`` (defaults: current epoch, this process's place)."""
        epoch = self.epoch if epoch is None else epoch
        if part is None or num_parts is None:
            rank, world, worker, workers = _reader_index(self.rank, self.world_size)
            part, num_parts = rank * workers + worker, world * workers
        order_rng = np.random.default_rng([self.seed, epoch]) if self.shuffle_shards else None
        if len(self.shards) >= num_parts:
            counts: list[int] = []
        else:
            counts = [shard_io.read_shard_info(s).num_row_groups for s in self.shards]
        return plan_reads(self.shards, counts, part, num_parts, order_rng)

    def _iter_epoch(self, epoch: int) -> Iterator[dict]:
        rank, world, worker, workers = _reader_index(self.rank, self.world_size)
        part = rank * workers + worker
        units = self.reader_plan(epoch, part, world * workers)
        videos = (v for unit in units for v in self._read_unit(unit))
        rng = np.random.default_rng([self.seed, epoch, rank, worker, 1])
        yield from shuffle_buffer(videos, self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict]:
        start = self.epoch
        try:
            for epoch in (itertools.count(start) if self.infinite else (start,)):
                yield from self._iter_epoch(epoch)
        except Yt8mError as e:
            if get_worker_info() is None:
                raise
            yield RaisedInWorker(e)

    def _read_unit(self, unit: ReadUnit) -> Iterator[dict]:
        try:
            info = shard_io.read_shard_info(unit.shard)
            self._check_shard(unit.shard, info)
            dims = {f: int(info.features[f]) for f in self.features}
            if dims != self.feature_dims:
                raise DataError(f"{unit.shard} has feature dims {dims}, {self.shards[0]} has {self.feature_dims}")
            columns = ["id", "labels", "num_frames", *self.features]
            if self.segment_labels:
                columns += list(SEGMENT_KEYS)
            for batch in shard_io.iter_batches(unit.shard, columns=columns, row_groups=unit.row_groups):
                yield from self._videos_from_batch(batch, info, unit.shard)
        except (OSError, pa.ArrowException) as e:  # a vanished, truncated or corrupt shard
            raise DataError(f"cannot read {unit.shard}: {type(e).__name__}: {e}") from e

    def _videos_from_batch(self, batch, info, source: str) -> Iterator[dict]:
        ids = batch.column("id").to_pylist()
        num_frames = batch.column("num_frames").to_numpy(zero_copy_only=False).astype(np.int64)
        label_col = batch.column("labels")
        label_offsets = label_col.offsets.to_numpy()  # index .values, which a sliced batch shares with its table
        label_values = label_col.values.to_numpy(zero_copy_only=False)[label_offsets[0]:label_offsets[-1]]
        label_offsets = label_offsets - label_offsets[0]
        if label_values.size and (label_values.min() < 0 or label_values.max() >= self.num_classes):
            bad = int(np.flatnonzero((label_values < 0) | (label_values >= self.num_classes))[0])
            row = int(np.searchsorted(label_offsets, bad, side="right") - 1)
            raise LabelOutOfRange(ids[row], int(label_values[bad]), self.num_classes, source)
        feats = [shard_io.decode_features(batch.column(f), num_frames, info.features[f], info.dtype)
                 for f in self.features]
        segments = None
        if self.segment_labels:
            segments = {k: batch.column(k).to_pylist() for k in SEGMENT_KEYS}
        for i, vid in enumerate(ids):
            t = min(int(num_frames[i]), self.max_frames)
            if t == 0:
                raise DataError(f"video {vid!r} in {source} has no frames")
            item = {"id": vid, "x": self._frames(feats, i, t), "num_frames": t,
                    "labels": self._multi_hot(label_values[label_offsets[i]:label_offsets[i + 1]])}
            if segments is not None:
                item["segment_start_times"] = np.asarray(segments["segment_start_times"][i], np.int32)
                item["segment_labels"] = np.asarray(segments["segment_labels"][i], np.int32)
                item["segment_scores"] = np.asarray(segments["segment_scores"][i], np.float32)
            yield item

    def _frames(self, feats: list, i: int, t: int) -> np.ndarray:
        # One copy out of the Arrow buffer: detaches the video from its row group (so the shuffle buffer does not
        # pin whole row groups in memory) and concatenates the features along D at the same time.
        if len(feats) == 1:
            return np.array(feats[0][i][:t], copy=True)
        x = np.empty((t, self.feature_dim), dtype=feats[0][i].dtype)
        d0 = 0
        for f in feats:
            d = f[i].shape[1]
            x[:, d0:d0 + d] = f[i][:t]
            d0 += d
        return x

    def _multi_hot(self, labels: np.ndarray) -> np.ndarray:
        y = np.zeros(self.num_classes, np.float32)
        y[labels] = 1.0
        return y


def collate_videos(items: Sequence[dict], max_frames: int | None = None) -> dict:
    """Stack dataset items into a batch padded to the longest video in it (capped at ``max_frames``):
    ``x`` (B, T, D) float32 with zeros after each video's end, ``mask`` (B, T) bool (True on real frames),
    ``labels`` (B, K) float32, ``ids`` list[str], ``num_frames`` (B,) int64 (real frames kept), and when the
    items carry them the segment fields as lists of arrays."""
    if not items:
        raise DataError("cannot collate an empty batch")
    for it in items:
        if isinstance(it, RaisedInWorker):
            return it
    lengths = [min(len(it["x"]), max_frames) if max_frames else len(it["x"]) for it in items]
    B, T, D = len(items), max(lengths), items[0]["x"].shape[1]
    x, x_np = _batch_array((B, T, D), torch.float32)
    mask, mask_np = _batch_array((B, T), torch.bool)
    labels, labels_np = _batch_array((B, len(items[0]["labels"])), torch.float32)
    mask_np.fill(False)
    for i, (it, t) in enumerate(zip(items, lengths)):
        if it["x"].shape[1] != D:
            raise DataError(f"video {it['id']!r} has {it['x'].shape[1]} dims, the batch has {D}")
        # NumPy casts storage dtype -> float32 during the copy: torch's copy_ fans every per-video copy out to its
        # intra-op thread pool, which stalls badly in the main process (workers=0) when the host's cores are busy.
        x_np[i, :t] = it["x"][:t]
        x_np[i, t:] = 0.0
        mask_np[i, :t] = True
        labels_np[i] = it["labels"]
    batch = {"x": x, "mask": mask, "labels": labels, "ids": [it["id"] for it in items],
             "num_frames": torch.tensor(lengths, dtype=torch.int64)}
    for key in SEGMENT_KEYS:
        if key in items[0]:
            batch[key] = [it[key] for it in items]
    return batch


def _batch_array(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialized tensor and a NumPy view of it. Inside a DataLoader worker its storage is allocated in shared
    memory up front (as torch's default_collate does), so handing the batch to the main process passes a file
    descriptor instead of copying a (B, T, D) float32 tensor into shared memory first."""
    if get_worker_info() is None:
        t = torch.empty(shape, dtype=dtype)
    else:
        numel = math.prod(shape)
        storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
        t = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    return t, t.numpy()


def make_loader(path: str | Sequence[str], batch_size: int, workers: int = 2, features: Sequence[str] = ("rgb",),
                num_classes: int = 3862, max_frames: int = 300, shuffle: bool = True, shuffle_buffer: int = 2048,
                seed: int = 0, segment_labels: bool = False, device: torch.device | str | None = None,
                prefetch_factor: int = 4, infinite: bool = False, rank: int | None = None,
                world_size: int | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader over ``ParquetVideoDataset`` yielding ``collate_videos`` batches. ``shuffle=False`` reads in
    file order (evaluation). Pinned memory when ``device`` is CUDA; persistent workers with ``prefetch_factor``
    batches each in flight when ``workers > 0``. Call ``loader.dataset.set_epoch(e)`` before each epoch."""
    dataset = ParquetVideoDataset(path, features=features, num_classes=num_classes, max_frames=max_frames,
                                  shuffle_buffer=shuffle_buffer if shuffle else 0, seed=seed, shuffle_shards=shuffle,
                                  segment_labels=segment_labels, infinite=infinite, rank=rank,
                                  world_size=world_size)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
    return VideoLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_videos,
                       pin_memory=on_cuda, drop_last=drop_last, **extra)
