"""Random Parquet shards written with ``pipeline.shards.ShardWriter`` (no Beam job), plus the values a reader
must return for them. Tests import it as ``from shard_factory import write_random_shards`` (pytest puts tests/ on
sys.path); bench scripts add tests/ to sys.path themselves."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import shards


@dataclass
class ExpectedVideo:
    """What a reader must yield for one written video: features as float32 after the storage round trip."""
    id: str
    labels: np.ndarray  # int32, as written (unsorted, no duplicates)
    features: dict  # name -> (T, D) float32
    segment_start_times: np.ndarray | None = None
    segment_labels: np.ndarray | None = None
    segment_scores: np.ndarray | None = None
    shard: str = ""

    @property
    def num_frames(self) -> int:
        return next(iter(self.features.values())).shape[0]


@dataclass
class WrittenShards:
    root: Path
    paths: list[str]
    videos: dict[str, ExpectedVideo] = field(default_factory=dict)  # id -> expected, in write order
    dims: dict[str, int] = field(default_factory=dict)


def write_random_shards(root: str | Path, num_videos: int, num_shards: int, dims: dict[str, int] | None = None,
                        seed: int = 0, with_segments: bool = False, num_classes: int = 20,
                        frames: tuple[int, int] = (1, 12), max_labels: int = 4, row_group_size: int = 4,
                        dtype: str = "float16", level: str = "frame", label_override: dict | None = None,
                        ratings_past_end: bool = False) -> WrittenShards:
    """Write ``num_videos`` random videos round-robin into ``num_shards`` shards under ``root/shards/``.

    Frame counts are uniform in ``frames`` (inclusive), labels are 1..``max_labels`` distinct ids below
    ``num_classes``; ``label_override`` {video index: labels} plants specific (e.g. out-of-range) labels.
    ``ratings_past_end``: every video with ratings also gets a positive rating of its first rated class on the
    segment after its last window (start >= num_frames), as some released records have (no extra random draw).
    """
    dims = dict(dims or {"rgb": 8})
    rng = np.random.default_rng(seed)
    out = Path(root) / "shards"
    out.mkdir(parents=True, exist_ok=True)
    schema = shards.shard_schema(dims, dtype=dtype, has_segments=with_segments, level=level,
                                 whitening_sha256="0" * 64)
    written = WrittenShards(root=Path(root), paths=[], dims=dims)
    rows_per_shard: list[list[dict]] = [[] for _ in range(num_shards)]
    for v in range(num_videos):
        t = 1 if level == "video" else int(rng.integers(frames[0], frames[1] + 1))
        labels = rng.choice(num_classes, size=int(rng.integers(1, max_labels + 1)), replace=False).astype(np.int32)
        if label_override and v in label_override:
            labels = np.asarray(label_override[v], np.int32)
        stored = {name: rng.normal(0, 1, size=(t, d)).astype(dtype) for name, d in dims.items()}
        vid = f"v{v:04d}"
        row = {"id": vid, "labels": labels.tolist(), "num_frames": t}
        for name, mat in stored.items():
            row[name] = np.ascontiguousarray(mat, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        exp = ExpectedVideo(vid, labels, {n: m.astype(np.float32) for n, m in stored.items()})
        if with_segments:
            k = int(rng.integers(0, 4))
            exp.segment_start_times = (rng.choice(max(t // 5, 1), size=k) * 5).astype(np.int32)
            exp.segment_labels = rng.choice(num_classes, size=k).astype(np.int32)
            exp.segment_scores = rng.integers(0, 2, size=k).astype(np.float32)
            if ratings_past_end and k:
                past = np.int32(-(-t // 5) * 5)  # the first window start at or past frame t
                exp.segment_start_times = np.append(exp.segment_start_times, past).astype(np.int32)
                exp.segment_labels = np.append(exp.segment_labels, exp.segment_labels[0]).astype(np.int32)
                exp.segment_scores = np.append(exp.segment_scores, 1.0).astype(np.float32)
            row.update(segment_start_times=exp.segment_start_times.tolist(),
                       segment_labels=exp.segment_labels.tolist(),
                       segment_scores=exp.segment_scores.tolist())
        rows_per_shard[v % num_shards].append(row)
        written.videos[vid] = exp
    for s, rows in enumerate(rows_per_shard):
        path = out / f"part-{s:05d}-of-{num_shards:05d}.parquet"
        with shards.ShardWriter(str(path), schema, row_group_size=row_group_size) as w:
            for row in rows:
                w.write(row)
                written.videos[row["id"]].shard = str(path)
        written.paths.append(str(path))
    return written
