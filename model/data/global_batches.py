"""Training batches whose contents depend on (seed, epoch, data streams) only, never on how many processes or
DataLoader workers read them.

The shards (or, with fewer shards than streams, their row groups) are dealt to ``num_streams`` streams in an order
drawn from (seed, epoch); each stream reads its units through its own seeded shuffle buffer. The epoch is the
round-robin interleave of the streams (one video from each non-exhausted stream in turn), cut into global batches
of ``batch_size``. Row counts come from the shard footers, so every reader knows, for every step, how many videos
each stream puts into the batch (``batch_counts``) without reading anything else.

A reader (one DataLoader worker of one rank) owns the streams ``reader, reader + readers, ...`` and yields, for
every step of the epoch, its part of that step's global batch: possibly empty, so all readers yield the same
number of items and DataLoader's round-robin over workers stays aligned. The training loop joins its workers' parts
into the rank's micro-batch (``join_batches``). Consequences:

* one process and N processes (any worker count) see the same global batches, step for step;
* every video is in exactly one batch per epoch, whatever the shard counts (uneven shards neither hang a rank
  nor drop or repeat a video: every rank runs the same number of steps, some with an empty share at the end);
* readers must not outnumber streams (``--data-streams``); a multiple of ranks x workers balances the work.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from model.data.video import (DataError, ParquetVideoDataset, RaisedInWorker, ReadUnit, VideoLoader,
                              _reader_index, collate_videos, plan_reads, shuffle_buffer)
from pipeline import shards as shard_io
from pipeline.errors import Yt8mError

DEFAULT_STREAMS = 16


def interleave_streams(lengths: Sequence[int]) -> np.ndarray:
    """Stream id of every position of the round-robin interleave of streams with these lengths: one item from
    each stream that still has one, in stream order, round after round. (sum(lengths),) int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sid = np.repeat(np.arange(lengths.size), lengths)  # (N,)
    rnd = np.concatenate([np.arange(n) for n in lengths]) if lengths.size else np.zeros(0, np.int64)
    return sid[np.lexsort((sid, rnd))]


def batch_counts(lengths: Sequence[int], batch_size: int) -> np.ndarray:
    """(steps, streams) int64: how many videos each stream puts into each global batch of ``batch_size``
    consecutive positions of ``interleave_streams(lengths)``; the last batch may be smaller."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    order = interleave_streams(lengths)
    steps = math.ceil(order.size / batch_size)
    step = np.arange(order.size) // batch_size
    counts = np.zeros((steps, len(lengths)), dtype=np.int64)
    np.add.at(counts, (step, order), 1)
    return counts


def empty_batch(feature_dim: int, num_classes: int, segment_labels: bool = False) -> dict:
    """A batch of no video, shaped like ``collate_videos``'s: a reader's share of a step it has nothing for."""
    batch = {"x": torch.zeros(0, 1, feature_dim), "mask": torch.zeros(0, 1, dtype=torch.bool),
             "labels": torch.zeros(0, num_classes), "ids": [], "num_frames": torch.zeros(0, dtype=torch.int64)}
    if segment_labels:
        batch.update(segment_start_times=[], segment_labels=[], segment_scores=[])
    return batch


def join_batches(parts: Sequence[dict]) -> dict:
    """One batch from several ``collate_videos`` batches (a rank's workers' shares of a step), padded to the
    longest; empty parts add nothing."""
    full = [p for p in parts if len(p["ids"])]
    if len(full) <= 1:
        return full[0] if full else parts[0]
    T = max(p["x"].shape[1] for p in full)

    def pad(t: torch.Tensor) -> torch.Tensor:  # (B, T', ...) -> (B, T, ...), zeros / False after the end
        extra = T - t.shape[1]
        return t if extra == 0 else torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)

    out = {"x": torch.cat([pad(p["x"]) for p in full]), "mask": torch.cat([pad(p["mask"]) for p in full]),
           "labels": torch.cat([p["labels"] for p in full]), "ids": [i for p in full for i in p["ids"]],
           "num_frames": torch.cat([p["num_frames"] for p in full])}
    for key in full[0]:
        if key not in out:
            out[key] = [v for p in full for v in p[key]]
    return out


class GlobalBatchVideos(ParquetVideoDataset):
    """Per step of an epoch, this reader's share of the global batch, collated (``collate_videos`` dicts; empty
    shares as ``empty_batch``). Use with ``batch_size=None`` (``make_global_loader``).

    Args:
        path, features, num_classes, max_frames, seed, segment_labels, rank, world_size: as
            ``ParquetVideoDataset``.
        batch_size: the global batch (all ranks together).
        num_streams: data streams; the batches depend on it (and seed, epoch), not on ranks or workers.
        shuffle_buffer: videos buffered for shuffling over all streams together, split evenly between the streams
            that have data; 0 or 1 reads in (permuted) unit order.
        shuffle: permute the shard (or row-group) order each epoch; False deals them in file order.
    """

    def __init__(self, path: str | Sequence[str], batch_size: int, num_streams: int = DEFAULT_STREAMS,
                 shuffle_buffer: int = 2048, shuffle: bool = True, **kwargs):
        super().__init__(path, shuffle_buffer=shuffle_buffer, shuffle_shards=shuffle, **kwargs)
        if batch_size < 1 or num_streams < 1:
            raise DataError(f"batch size ({batch_size}) and data streams ({num_streams}) must be >= 1")
        self.batch_size, self.num_streams = int(batch_size), int(num_streams)
        # Rows of every shard's row groups, read once here (in the main process, so DataLoader workers inherit
        # them) and in parallel: on an object store each footer is a round trip, and there can be thousands.
        with ThreadPoolExecutor(max_workers=min(16, len(self.shards))) as pool:
            self._row_groups = dict(zip(self.shards, pool.map(shard_io.row_group_rows, self.shards)))
        self._plans: dict[int, tuple[list[list[ReadUnit]], np.ndarray]] = {}

    def epoch_plan(self, epoch: int | None = None) -> tuple[list[list[ReadUnit]], np.ndarray]:
        """(units of each stream, ``batch_counts`` of the epoch), from the shard footers."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            order_rng = (lambda: np.random.default_rng([self.seed, epoch])) if self.shuffle_shards else (lambda: None)
            S, rows = self.num_streams, self._row_groups
            counts = [len(rows[s]) for s in self.shards]
            units = [plan_reads(self.shards, counts, k, S, order_rng()) for k in range(S)]
            lengths = [sum(sum(rows[u.shard]) if u.row_groups is None else sum(rows[u.shard][g] for g in u.row_groups)
                           for u in us) for us in units]
            self._plans = {epoch: (units, batch_counts(lengths, self.batch_size))}  # keep one epoch's plan
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int | None = None) -> int:
        return int(self.epoch_plan(epoch)[1].shape[0])

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._iter_steps(self.epoch)
        except Yt8mError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            yield RaisedInWorker(e)

    def _iter_steps(self, epoch: int) -> Iterator[dict]:
        rank, world, worker, workers = _reader_index(self.rank, self.world_size)
        reader, readers = rank * workers + worker, world * workers
        if readers > self.num_streams:
            raise DataError(f"{readers} readers ({world} processes x {workers} DataLoader workers) but only "
                            f"{self.num_streams} data streams; raise --data-streams to at least {readers}")
        units, counts = self.epoch_plan(epoch)
        with_data = max(1, int(np.count_nonzero(counts.sum(axis=0))))
        buffer = math.ceil(self.shuffle_buffer / with_data) if self.shuffle_buffer > 1 else 0
        mine = list(range(reader, self.num_streams, readers))
        streams = {s: self._stream(units[s], buffer, np.random.default_rng([self.seed, epoch, s, 1])) for s in mine}
        for k in range(counts.shape[0]):
            items = []
            for s in mine:
                for _ in range(int(counts[k, s])):
                    item = next(streams[s], None)
                    if item is None:
                        raise DataError(f"stream {s} of epoch {epoch} ran out of videos before its footers' row "
                                        f"count (a shard of {self.path} changed while training?)")
                    items.append(item)
            yield (collate_videos(items, self.max_frames) if items
                   else empty_batch(self.feature_dim, self.num_classes, self.segment_labels))

    def _stream(self, units: list[ReadUnit], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
        videos = (v for unit in units for v in self._read_unit(unit))
        return iter(shuffle_buffer(videos, buffer, rng))


def _as_is(item):
    return item


def make_global_loader(path: str | Sequence[str], batch_size: int, workers: int = 2,
                       num_streams: int = DEFAULT_STREAMS, device: torch.device | str | None = None,
                       prefetch_factor: int = 4, **kwargs) -> VideoLoader:
    """A DataLoader over ``GlobalBatchVideos``: each item is one worker's share of one step. Group every
    ``max(workers, 1)`` consecutive items (``iter_steps``) to get this rank's batch of a step."""
    dataset = GlobalBatchVideos(path, batch_size=batch_size, num_streams=num_streams, **kwargs)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
    return VideoLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, pin_memory=on_cuda,
                       **extra)


def iter_steps(loader: VideoLoader) -> Iterator[dict]:
    """This rank's batch of each step: its workers' shares joined (DataLoader hands them out worker by worker,
    and every worker yields one share per step)."""
    workers = max(1, loader.num_workers)
    parts: list[dict] = []
    for part in loader:
        parts.append(part)
        if len(parts) == workers:
            yield join_batches(parts)
            parts = []
    if parts:
        raise DataError(f"the data workers yielded {len(parts)} share(s) of a step beyond the last full step")
