"""Parquet layouts for per-video frame matrices: write time, file size and read throughput, in one run.

    .venv/bin/python bench/parquet_layout.py                 # 500 videos x 100-200 frames x 1024 dims
    .venv/bin/python bench/parquet_layout.py --videos 100    # quicker

The same random float16 frames (standard normal, like whitened features) are written in each layout with the
same row-group size, then read back row group by row group into one (T, D) ndarray per video, each layout with
its own vectorized decoder (no per-value Python). Baseline: ``list<list<float16>>``, the layout
``pyarrow.Table.from_pylist`` gives a list of frames. Two read rates: into (T, D) arrays of the storage dtype
(zero-copy views where the layout allows) and into float32 (adding the cast every consumer pays). Reads run
``--repeats`` times, round-robin over the layouts, and the fastest counts; the files were just written, so they
come from the page cache (decode cost, not disk).

Rows ``library`` go through ``pipeline.shards`` itself (``ShardWriter`` rows from bytes; ``iter_batches`` +
``decode_features`` for the storage-dtype rate, ``iter_videos`` for float32), so any overhead of the public API over
the raw layout shows up. One row opens the file through an fsspec file object instead of Arrow's own reader.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import shards  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=500)
    p.add_argument("--min-frames", type=int, default=100)
    p.add_argument("--max-frames", type=int, default=200)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--row-group-size", type=int, default=shards.DEFAULT_ROW_GROUP_SIZE)
    p.add_argument("--repeats", type=int, default=3, help="reads per layout; the fastest is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    return p


# -- column builders: (frames per video, values) -> Arrow array ------------------------------------------------
def frame_offsets(frames: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(frames)]).astype(np.int32)


def nested_column(frames, values, dtype):
    """list<list<dtype>>: a list of frames per video, each frame a list of D values."""
    T, D = values.shape
    inner = pa.ListArray.from_arrays(np.arange(T + 1, dtype=np.int32) * D, pa.array(values.astype(dtype).ravel()))
    return pa.ListArray.from_arrays(frame_offsets(frames), inner)


def fixed_column(frames, values, dtype):
    """list<fixed_size_list<dtype, D>>: no inner offsets, still one definition level per value."""
    T, D = values.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.astype(dtype).ravel()), D)
    return pa.ListArray.from_arrays(frame_offsets(frames), inner)


def flat_column(frames, values, dtype):
    """list<dtype>: all T * D values of a video in one list, reshaped by num_frames on read."""
    D = values.shape[1]
    return pa.ListArray.from_arrays(frame_offsets(frames) * D, pa.array(values.astype(dtype).ravel()))


def blob_column(frames, values, dtype):
    """binary: the row-major (T, D) matrix bytes of each video (what pipeline.shards stores)."""
    data = np.ascontiguousarray(values.astype(np.dtype(dtype).newbyteorder("<"))).view(np.uint8).ravel()
    offsets = frame_offsets(frames) * (values.shape[1] * np.dtype(dtype).itemsize)
    return pa.BinaryArray.from_buffers(pa.binary(), len(frames), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


# -- decoders: one row group's column -> list of (T, D) arrays in the storage dtype -----------------------------
def decode_nested(col: pa.ChunkedArray, frames: np.ndarray, dim: int) -> list[np.ndarray]:
    out = []
    for chunk in col.chunks:
        outer = chunk.offsets.to_numpy()
        flat = chunk.values.flatten().to_numpy().reshape(-1, dim)  # (frames in chunk, D)
        rows = (outer - outer[0]).tolist()
        out += [flat[a:b] for a, b in zip(rows[:-1], rows[1:])]
    return out


def decode_flat(col: pa.ChunkedArray, frames: np.ndarray, dim: int) -> list[np.ndarray]:
    out = []
    for chunk in col.chunks:
        offs = chunk.offsets.to_numpy().tolist()
        vals = chunk.values.to_numpy()
        out += [vals[a:b].reshape(-1, dim) for a, b in zip(offs[:-1], offs[1:])]
    return out


def make_decode_blob(dtype):
    def decode(col: pa.ChunkedArray, frames: np.ndarray, dim: int) -> list[np.ndarray]:
        return shards.decode_features(col, frames, dim, dtype)
    return decode


LAYOUTS = [
    # name, dtype, compression, builder, decoder
    ("list<list<float16>>", "float16", "snappy", nested_column, decode_nested),
    ("list<list<float32>>", "float32", "snappy", nested_column, decode_nested),
    ("list<fixed_size_list<float16>>", "float16", "snappy", fixed_column, decode_nested),
    ("list<float16> flat", "float16", "snappy", flat_column, decode_flat),
    ("list<float32> flat", "float32", "snappy", flat_column, decode_flat),
    ("list<list<float16>>", "float16", "zstd", nested_column, decode_nested),
    ("binary float16", "float16", "snappy", blob_column, make_decode_blob("float16")),
    ("binary float16", "float16", "zstd", blob_column, make_decode_blob("float16")),
    ("binary float16", "float16", "none", blob_column, make_decode_blob("float16")),
    ("binary float32", "float32", "snappy", blob_column, make_decode_blob("float32")),
]


def write_layout(path: str, frames, values, ids, dtype, compression, builder, row_group_size) -> float:
    t0 = time.perf_counter()
    table = pa.table({"id": pa.array(ids), "num_frames": pa.array(frames, pa.int32()),
                      "rgb": builder(frames, values, dtype)})
    pq.write_table(table, path, compression=compression, row_group_size=row_group_size, use_dictionary=["id"])
    return time.perf_counter() - t0


def read_layout(path: str, decoder, dim: int, to_float32: bool, via_fsspec: bool = False) -> tuple[float, int]:
    """Seconds to read every row group into per-video (T, D) arrays, and the frames read."""
    t0 = time.perf_counter()
    frames_read = 0
    with (fsspec.open(path, "rb") if via_fsspec else contextlib.nullcontext(path)) as source:
        pf = pq.ParquetFile(source)
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            mats = decoder(table.column("rgb"), table.column("num_frames").to_numpy(), dim)
            if to_float32:
                mats = [m.astype(np.float32) for m in mats]
            frames_read += sum(m.shape[0] for m in mats)
    return time.perf_counter() - t0, frames_read


def write_library(path: str, frames, values, ids, dtype, compression, row_group_size) -> float:
    t0 = time.perf_counter()
    schema = shards.shard_schema({"rgb": values.shape[1]}, dtype=dtype)
    stored = values.astype(np.dtype(dtype).newbyteorder("<"))
    offsets = frame_offsets(frames)
    with shards.ShardWriter(path, schema, row_group_size=row_group_size, compression=compression,
                            frame_compression=compression) as w:
        for i, vid in enumerate(ids):
            w.write({"id": vid, "labels": [1, 2], "num_frames": int(frames[i]),
                     "rgb": stored[offsets[i]:offsets[i + 1]].tobytes()})
    return time.perf_counter() - t0


def read_library_views(path: str) -> tuple[float, int]:
    """iter_batches + decode_features: zero-copy storage-dtype views (what a data loader uses)."""
    t0 = time.perf_counter()
    n = sum(m.shape[0] for b in shards.iter_batches(path, features=("rgb",)) for m in shards.decode_features(b, "rgb"))
    return time.perf_counter() - t0, n


def read_library_videos(path: str) -> tuple[float, int]:
    """iter_videos: float32 copies wrapped in Video objects."""
    t0 = time.perf_counter()
    n = sum(v.features["rgb"].shape[0] for v in shards.iter_videos(path, features=("rgb",)))
    return time.perf_counter() - t0, n


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    rng = np.random.default_rng(args.seed)
    frames = rng.integers(args.min_frames, args.max_frames + 1, size=args.videos)
    total = int(frames.sum())
    values = rng.standard_normal((total, args.dim), dtype=np.float32).astype(np.float16)
    ids = [f"v{i:05d}" for i in range(args.videos)]
    tmp = tempfile.TemporaryDirectory(prefix="bench_parquet_layout_") if args.dir is None else None
    out = Path(args.dir or tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.videos} videos, {total} frames x {args.dim} dims ({total * args.dim * 2 / 1e6:.0f} MB as float16), "
          f"row groups of {args.row_group_size} videos, best of {args.repeats} reads; pyarrow {pa.__version__}, "
          f"{os.cpu_count()} cpus")

    # Write everything first, then read round-robin (every layout once per repeat): load from other processes
    # drifts over minutes, and interleaving spreads it over all layouts instead of favouring the last ones.
    cases = []  # (layout, codec, opened via, write s, bytes, storage-dtype reader, float32 reader)
    for k, (name, dtype, comp, builder, decoder) in enumerate(LAYOUTS):
        path = str(out / f"layout{k}.parquet")
        wt = write_layout(path, frames, values, ids, dtype, comp, builder, args.row_group_size)
        cases.append((name, comp, "arrow file", wt, os.path.getsize(path),
                      functools.partial(read_layout, path, decoder, args.dim, False),
                      functools.partial(read_layout, path, decoder, args.dim, True)))
        if name == "binary float16" and comp == "snappy":
            cases.append((name, comp, "fsspec file object", wt, os.path.getsize(path),
                          functools.partial(read_layout, path, decoder, args.dim, False, True),
                          functools.partial(read_layout, path, decoder, args.dim, True, True)))
    for comp in ("none", "snappy", "zstd"):  # "none": the shards' default frame codec
        path = str(out / f"library_{comp}.parquet")
        wt = write_library(path, frames, values, ids, "float16", comp, args.row_group_size)
        cases.append(("pipeline.shards (binary float16)", comp, "library", wt, os.path.getsize(path),
                      functools.partial(read_library_views, path), functools.partial(read_library_videos, path)))
    best = [[np.inf, np.inf] for _ in cases]
    for _ in range(args.repeats):
        for c, case in enumerate(cases):
            for j, reader in enumerate(case[5:]):
                seconds, n = reader()
                assert n == total, (case[:3], n, total)
                best[c][j] = min(best[c][j], seconds)
    results = [(*case[:5], *b) for case, b in zip(cases, best)]

    base = results[0]
    print()
    print("| layout | codec | opened via | write s | size MB | size x base | read frames/s, storage dtype | x base "
          "| read frames/s, float32 | x base |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, comp, via, wt, size, rs, rf in results:
        print(f"| {name} | {comp} | {via} | {wt:.2f} | {size / 1e6:.1f} | {size / base[4]:.3f} | {total / rs:,.0f} | "
              f"{base[5] / rs:.2f} | {total / rf:,.0f} | {base[6] / rf:.2f} |")
    print(f"\nbase = first row. Storage dtype: zero-copy (T, D) views where the layout allows; float32: plus the "
          f"cast every consumer pays. Library float32 column is iter_videos; storage column is "
          f"iter_batches + decode_features.")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
