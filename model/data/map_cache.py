"""Backbone feature maps cached once to Parquet shards, so heads on a frozen backbone train without re-running it.

    cache = build_map_cache(backbone, manifest, "cache/train", image_size=448, key={...})
    loader = make_map_loader(MapCacheDataset(cache), batch_size=64, shuffle=True, seed=0)

A frozen backbone turns the same pixels into the same maps every epoch, so they are computed once (with the
evaluation transform: no random crop or flip, which a cache cannot replay) and the heads then train at the speed
of the heads alone. One row per image, in the ``pipeline.shards`` manner: each map is one ``binary`` cell holding
the (C, H, W) array as row-major little-endian float16, every page with a CRC checked on read; ``image_id`` and ``labels`` (class indices) are plain
columns. The schema metadata key ``yt8m_cma_image_maps`` holds JSON: format version, the map shapes, and the
``key`` that says what produced the maps (backbone, its weights, image size, annotation file, label map). A
cache directory whose key differs from the one asked for is an error, never silently reused or overwritten.

Shards are written under a temporary name and renamed into place when complete, so an interrupted job leaves no
shard that looks finished. Reading goes row group by row group (``ROW_GROUP_ROWS`` images each): the loader's
shuffle permutes row groups, then rows within each, so reads stay sequential inside a group.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import Yt8mError

METADATA_KEY = b"yt8m_cma_image_maps"
VERSION = 1
MAP_NAMES = ("s16", "s32")
ROW_GROUP_ROWS = 32  # images; 32 x (112 x 28 x 28 + 1280 x 14 x 14) float16 = 22 MB for EfficientNet-Lite0 at 448
ROWS_PER_SHARD = 1024


class MapCacheError(Yt8mError):
    """A map cache is unreadable, incomplete, or was made by another backbone, image size or annotation file."""


@dataclass(frozen=True)
class MapCache:
    """A cache directory's shards and what its footer metadata says."""
    directory: str
    shards: tuple
    shapes: dict  # map name -> (C, H, W)
    key: dict
    num_rows: int


def _schema(shapes: Mapping[str, tuple], key: Mapping[str, Any]) -> pa.Schema:
    fields = [pa.field("image_id", pa.int64(), nullable=False),
              pa.field("labels", pa.list_(pa.int32()), nullable=False)]
    fields += [pa.field(name, pa.binary(), nullable=False) for name in MAP_NAMES]
    meta = {"version": VERSION, "shapes": {k: list(v) for k, v in shapes.items()}, "key": dict(key)}
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def read_map_cache(directory: str | os.PathLike) -> MapCache:
    """The finished cache in ``directory``; ``MapCacheError`` when it has no shard or shards that disagree."""
    d = Path(directory)
    shards = tuple(sorted(str(p) for p in d.glob("maps-*.parquet")))
    if not shards:
        raise MapCacheError(f"{d} holds no cached maps (maps-*.parquet)")
    metas, rows = [], 0
    for s in shards:
        try:
            pf = pq.ParquetFile(s)
            metas.append(json.loads(pf.schema_arrow.metadata[METADATA_KEY]))
        except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as e:
            raise MapCacheError(f"{s} is not a readable map-cache shard ({e})") from None
        rows += pf.metadata.num_rows
    if any(m != metas[0] for m in metas[1:]) or metas[0].get("version") != VERSION:
        raise MapCacheError(f"{d}: shards of different caches (or format versions) are mixed")
    shapes = {k: tuple(v) for k, v in metas[0]["shapes"].items()}
    return MapCache(str(d), shards, shapes, metas[0]["key"], rows)


def key_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f"{k}: cached {a.get(k)!r}, asked {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@torch.no_grad()
def build_map_cache(backbone: torch.nn.Module, loader, directory: str | os.PathLike, key: Mapping[str, Any],
                    device: torch.device, broken=None) -> MapCache:
    """Run ``backbone`` once over ``loader``'s images (``collate_images`` batches, evaluation transform) and write
    the two maps per image; reuse the directory's cache when its ``key`` matches.

    Args:
        backbone: frozen image backbone (``forward`` -> [stride-16 map, stride-32 map]).
        loader: batches with ``image`` (B, 3, S, S), ``labels`` (B, K), ``image_ids`` and ``broken``.
        directory: where the shards go (created).
        key: what produced the maps; compared with an existing cache's.
        device: where the backbone runs.
        broken: a ``BrokenImages`` that counts unreadable images (they are not cached).
    """
    d = Path(directory)
    if any(d.glob("maps-*.parquet")):
        cache = read_map_cache(d)
        diff = key_differences(cache.key, key)
        if diff:
            raise MapCacheError(f"{d} caches maps of another setup ({'; '.join(diff)}); give another directory")
        return cache
    d.mkdir(parents=True, exist_ok=True)
    backbone.eval()
    writer = _ShardSequence(d, key)
    try:
        for batch in loader:
            if broken is not None:
                broken.add(batch.get("broken", []))
            if batch["image"].shape[0] == 0:
                continue
            maps = [m.float().cpu().numpy().astype("<f2") for m in backbone(batch["image"].to(device))]
            labels = batch["labels"].numpy()
            for i, image_id in enumerate(batch["image_ids"]):
                writer.write(int(image_id), np.flatnonzero(labels[i] > 0.5).astype(np.int32),
                             [np.ascontiguousarray(m[i]) for m in maps])
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return read_map_cache(d)


class _ShardSequence:
    """Rows to ``maps-00000.parquet``, ``maps-00001.parquet``, ... (``ROWS_PER_SHARD`` each), each written under a
    temporary name and renamed when complete."""

    def __init__(self, directory: Path, key: Mapping[str, Any]):
        self.directory, self.key = directory, dict(key)
        self.shapes: dict | None = None
        self.rows: list[dict] = []
        self.shard_rows = 0
        self.index = 0
        self._writer = None
        self._tmp = None

    def write(self, image_id: int, labels: np.ndarray, maps: list[np.ndarray]) -> None:
        shapes = {n: tuple(int(s) for s in m.shape) for n, m in zip(MAP_NAMES, maps)}
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise MapCacheError(f"image {image_id}: maps of shape {shapes}, the cache holds {self.shapes} (images "
                                f"must reach the backbone at one size)")
        self.rows.append({"image_id": image_id, "labels": labels.tolist(),
                          **{n: m.tobytes() for n, m in zip(MAP_NAMES, maps)}})
        if len(self.rows) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self._writer is None:
            self._tmp = self.directory / f".maps-{self.index:05d}.parquet.tmp-{uuid.uuid4().hex}"
            self._writer = pq.ParquetWriter(str(self._tmp), _schema(self.shapes, self.key), compression="none",
                                           write_page_checksum=True)
        schema = self._writer.schema_arrow if hasattr(self._writer, "schema_arrow") else self._writer.schema
        self._writer.write_batch(pa.RecordBatch.from_pylist(self.rows, schema=schema))
        self.shard_rows += len(self.rows)
        self.rows = []
        if self.shard_rows >= ROWS_PER_SHARD:
            self._publish()

    def _publish(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.directory / f"maps-{self.index:05d}.parquet")
        self._writer, self._tmp, self.shard_rows = None, None, 0
        self.index += 1

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._publish()
        if self.index == 0:
            raise MapCacheError(f"no readable image to cache in {self.directory}")

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                if self._tmp is not None and self._tmp.exists():
                    self._tmp.unlink()


class MapCacheDataset(torch.utils.data.Dataset):
    """Items ``{"maps": [s16 (C, H, W), s32 (C, H, W)] float32, "labels": (K,) float32, "image_id": int}`` from a
    ``MapCache``; keeps the last row group it read (per DataLoader worker)."""

    def __init__(self, cache: MapCache, num_classes: int):
        self.cache, self.num_classes = cache, num_classes
        self.index: list[tuple[int, int, int]] = []  # (shard, row group, row in group)
        self.groups: list[list[int]] = []
        for s, path in enumerate(cache.shards):
            md = pq.ParquetFile(path).metadata
            for g in range(md.num_row_groups):
                start = len(self.index)
                self.index += [(s, g, r) for r in range(md.row_group(g).num_rows)]
                self.groups.append(list(range(start, len(self.index))))
        self._loaded: tuple | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _group(self, s: int, g: int) -> pa.Table:
        if self._loaded is None or self._loaded[0] != (s, g):
            path = self.cache.shards[s]
            try:
                table = pq.ParquetFile(path, page_checksum_verification=True).read_row_group(g)
            except (OSError, pa.ArrowException) as e:
                raise MapCacheError(f"{path} is corrupt ({str(e).splitlines()[0]}); delete the cache directory "
                                    f"to rebuild it") from None
            self._loaded = ((s, g), table)
        return self._loaded[1]

    def __getitem__(self, i: int) -> dict:
        s, g, r = self.index[i]
        table = self._group(s, g)
        maps = []
        for name in MAP_NAMES:
            blob = table.column(name)[r].as_py()
            maps.append(torch.from_numpy(np.frombuffer(blob, dtype="<f2").astype(np.float32)
                                         .reshape(self.cache.shapes[name])))
        labels = torch.zeros(self.num_classes)
        labels[torch.as_tensor(table.column("labels")[r].as_py(), dtype=torch.long)] = 1.0
        return {"maps": maps, "labels": labels, "image_id": int(table.column("image_id")[r].as_py())}


def collate_maps(items: list[dict]) -> dict:
    return {"maps": [torch.stack([it["maps"][j] for it in items]) for j in range(len(MAP_NAMES))],
            "labels": torch.stack([it["labels"] for it in items]), "image_ids": [it["image_id"] for it in items],
            "broken": []}


class RowGroupShuffleSampler(torch.utils.data.Sampler):
    """Row groups in a seeded random order, rows in a seeded random order within each; ``set_epoch`` reshuffles."""

    def __init__(self, groups: list[list[int]], seed: int = 0):
        self.groups, self.seed, self.epoch = groups, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for gi in rng.permutation(len(self.groups)):
            group = self.groups[gi]
            yield from (group[j] for j in rng.permutation(len(group)))


def make_map_loader(dataset: MapCacheDataset, batch_size: int, shuffle: bool, seed: int = 0,
                    workers: int = 0) -> torch.utils.data.DataLoader:
    sampler = RowGroupShuffleSampler(dataset.groups, seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate_maps, persistent_workers=False)
