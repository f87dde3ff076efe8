"""Parquet video shards: schema, atomic writer, row-group-wise reader (local paths or any fsspec URL).

One row per video. Each feature is one ``binary`` cell holding the whitened (num_frames, dim) matrix as row-major
little-endian float16 (default) or float32 bytes. bench/parquet_layout.py measures this against nested
``list<list<float>>`` and flat ``list<float>`` columns: a blob is decoded with a single ``np.frombuffer`` over the
row group's data buffer, without Parquet's repetition/definition levels, and reads many times faster.
The small columns are snappy-compressed; the frame blobs are stored uncompressed by default. Whitened float16
frames are close to incompressible: snappy saved nothing on them (compressed/uncompressed 1.0000 on 64- and
1024-dim shards) and only cost the writer and every reader time, zstd saves about 8% of the bytes but cuts the
Arrow-level read rate of the blob column 2.5-3.5x and the float32 rate of ``iter_videos`` about 1.5x. Pass
``frame_compression="zstd"`` where storage or network bytes matter more.
Local shards are opened with Arrow's own file reader, remote ones through fsspec file objects.

The schema metadata key ``yt8m_cma`` holds JSON: format version, level, storage dtype, feature dims (in column
order), the sha256 of the whitening file that produced the frames, and whether segment columns exist.

Reading goes row group by row group, so memory is bounded by one row group (``row_group_size`` videos) per open
shard. ``iter_videos`` yields ready float32 ``Video`` objects; data loaders that want fewer copies use
``iter_batches`` + ``decode_features``, which returns zero-copy views of the Arrow buffers.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import Yt8mError

METADATA_KEY = b"yt8m_cma"
SCHEMA_VERSION = 1
DTYPES = ("float16", "float32")
LEVELS = ("frame", "video")
BASE_COLUMNS = ("id", "labels", "num_frames")
SEGMENT_COLUMNS = ("segment_start_times", "segment_labels", "segment_scores")
DEFAULT_ROW_GROUP_SIZE = 128  # videos; at 300 frames x 1024 float16 that is at most 79 MB of rgb per row group
DEFAULT_COMPRESSION = "snappy"  # the small columns (id, labels, segments)
DEFAULT_FRAME_COMPRESSION = "none"  # the feature blobs: see the module docstring
_GLOB_CHARS = set("*?[")


class ShardError(Yt8mError):
    """Parquet shards cannot be written or read as asked."""


class ShardSchemaError(ShardError):
    """A shard lacks a requested feature or column, carries no or unknown yt8m-cma metadata, or a row does not fit
    the schema."""


class NoShardsFound(ShardError):
    """A path, directory or glob matched no Parquet shard."""


# -- schema ----------------------------------------------------------------------------------------------------
def shard_schema(features: Mapping[str, int], dtype: str = "float16", has_segments: bool = False,
                 level: str = "frame", whitening_sha256: str = "") -> pa.Schema:
    """The Arrow schema of a shard, with the ``yt8m_cma`` metadata.

    Args:
        features: feature name -> per-frame dims of the stored (whitened) matrix, in column order.
        dtype: storage dtype of the frames, ``float16`` or ``float32``.
        has_segments: add the three segment columns.
        level: ``frame`` (T frames per video) or ``video`` (T = 1, the video mean).
        whitening_sha256: hex sha256 of the whitening file the frames went through ("" when none).
    """
    dtype = _check_dtype(dtype)
    if level not in LEVELS:
        raise ShardSchemaError(f"unknown level {level!r}; expected one of {LEVELS}")
    if not features:
        raise ShardSchemaError("a shard needs at least one feature column")
    for name, dim in features.items():
        if name in BASE_COLUMNS or name in SEGMENT_COLUMNS or not name:
            raise ShardSchemaError(f"feature name {name!r} is empty or collides with a fixed column")
        if int(dim) < 1:
            raise ShardSchemaError(f"feature {name!r} has non-positive dims {dim}")
    fields = [pa.field("id", pa.string(), nullable=False),
              pa.field("labels", pa.list_(pa.int32()), nullable=False),
              pa.field("num_frames", pa.int32(), nullable=False)]
    fields += [pa.field(name, pa.binary(), nullable=False) for name in features]
    if has_segments:
        fields += [pa.field("segment_start_times", pa.list_(pa.int32()), nullable=False),
                   pa.field("segment_labels", pa.list_(pa.int32()), nullable=False),
                   pa.field("segment_scores", pa.list_(pa.float32()), nullable=False)]
    meta = {"version": SCHEMA_VERSION, "level": level, "dtype": dtype,
            "features": {name: int(dim) for name, dim in features.items()},
            "whitening_sha256": str(whitening_sha256 or ""), "has_segments": bool(has_segments)}
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's footer says about it (no row data is read)."""
    path: str
    version: int
    level: str
    dtype: str
    features: dict  # name -> dims, in column order
    whitening_sha256: str
    has_segments: bool
    num_rows: int
    num_row_groups: int


def parse_schema_metadata(schema: pa.Schema, source: str = "schema") -> dict:
    """The ``yt8m_cma`` metadata of ``schema`` as a dict; ``ShardSchemaError`` when absent, unreadable, of an
    unknown version, or naming columns the schema lacks."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardSchemaError(f"{source} has no {METADATA_KEY.decode()} metadata: not a yt8m-cma shard")
    try:
        meta = json.loads(raw)
        version = int(meta["version"])
        if version != SCHEMA_VERSION:
            raise ShardSchemaError(f"{source} has shard format version {version}; this code reads "
                                   f"{SCHEMA_VERSION}")
        meta = {"version": version, "level": str(meta["level"]), "dtype": _check_dtype(meta["dtype"]),
                "features": {str(k): int(v) for k, v in meta["features"].items()},
                "whitening_sha256": str(meta.get("whitening_sha256", "")),
                "has_segments": bool(meta["has_segments"])}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardSchemaError(f"{source} has unreadable {METADATA_KEY.decode()} metadata ({e!r})") from None
    wanted = [*BASE_COLUMNS, *meta["features"], *(SEGMENT_COLUMNS if meta["has_segments"] else ())]
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise ShardSchemaError(f"{source} metadata promises columns {missing} that the file lacks")
    return meta


def _check_dtype(dtype: Any) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ShardSchemaError(f"storage dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _storage_dtype(dtype: Any) -> np.dtype:
    return np.dtype(_check_dtype(dtype)).newbyteorder("<")


# -- rows ------------------------------------------------------------------------------------------------------
def _stored_bytes(mat: np.ndarray, dt: np.dtype) -> bytes:
    """The cell bytes of ``mat`` in the storage dtype. float32 -> float16 goes through Arrow's cast: the same
    round-to-nearest-even bits as numpy's ``astype``, about 1.4x faster (numpy converts value by value in software
    here), and it is the largest step of encoding a row (bench/preprocess.py)."""
    if dt == np.float16 and mat.dtype == np.float32 and sys.byteorder == "little" and mat.size:
        flat = pa.array(np.ascontiguousarray(mat).reshape(-1))  # zero copy
        half = pc.cast(flat, pa.float16())
        return np.frombuffer(half.buffers()[1], dtype=dt, count=mat.size, offset=half.offset * 2).tobytes()
    return np.ascontiguousarray(mat, dtype=dt).tobytes()


# float32 values from this magnitude on round to inf in float16 (65504 is its largest finite value, 65520 the
# halfway point to the next power of two, and ties round to even: 65536, i.e. inf).
_FLOAT16_OVERFLOW = 65520.0


def _storable(mat: np.ndarray, dt: np.dtype) -> bool:
    """Whether every value of ``mat`` is finite once stored as ``dt``. For float16 from float32 this is decided on
    the float32 values (one max over |x|, NaN propagating), about 10x cheaper than checking the converted copy."""
    if mat.size == 0:
        return True
    if dt == np.float16 and mat.dtype in (np.float32, np.float64):
        peak = max(float(mat.max()), -float(mat.min()))  # NaN anywhere -> NaN, and NaN < x is False
        return peak < _FLOAT16_OVERFLOW
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.asarray(mat, dtype=dt)).all())


def record_to_row(record, whitened: Mapping[str, np.ndarray], dtype: str = "float16",
                  has_segments: bool | None = None) -> dict:
    """A shard row from a ``pipeline.records.VideoRecord`` and its whitened feature matrices.

    Args:
        record: supplies ``id``, ``labels``, ``num_frames`` and the segment arrays.
        whitened: feature name -> (num_frames, dims) float matrix, stored in ``dtype``.
        dtype: storage dtype, ``float16`` or ``float32``.
        has_segments: None: segment columns when the record has segments; True: always (empty lists for a record
            without segments); False: never.

    Raises ``ShardSchemaError`` when a matrix has the wrong number of frames or is not finite in ``dtype``
    (float16 overflows past 65504).
    """
    dt = _storage_dtype(dtype)
    num_frames = int(record.num_frames)
    row: dict[str, Any] = {"id": str(record.id), "labels": np.asarray(record.labels, np.int32).tolist(),
                           "num_frames": num_frames}
    for name, mat in whitened.items():
        mat = np.asarray(mat)
        if mat.ndim != 2 or mat.shape[0] != num_frames:
            raise ShardSchemaError(f"video {record.id!r}: feature {name!r} has shape {mat.shape}, expected "
                                   f"({num_frames}, dims)")
        if not _storable(mat, dt):
            raise ShardSchemaError(f"video {record.id!r}: feature {name!r} has values that are not finite as "
                                   f"{dt.name} (NaN input or |x| beyond the {dt.name} range)")
        row[name] = _stored_bytes(mat, dt)
    present = record.segment_start_times is not None
    if has_segments if has_segments is not None else present:
        empty = np.zeros(0)
        row["segment_start_times"] = np.asarray(record.segment_start_times if present else empty, np.int32).tolist()
        row["segment_labels"] = np.asarray(record.segment_labels if present else empty, np.int32).tolist()
        row["segment_scores"] = np.asarray(record.segment_scores if present else empty, np.float32).tolist()
    return row


# -- writing ---------------------------------------------------------------------------------------------------
def writer_options(schema: pa.Schema, compression: str = DEFAULT_COMPRESSION,
                   frame_compression: str = DEFAULT_FRAME_COMPRESSION) -> dict:
    """``pq.ParquetWriter`` keyword arguments for a shard of ``schema``; every writer of shards uses them
    (``ShardWriter``, and ``beam_jobs.preprocess``'s Beam sink). CRC32 of every data page, verified on read
    (``_open_parquet``): a flipped byte inside a shard is an error naming the file, never silently different frames.
    Dictionaries and statistics only for the small columns, not the frame blobs; ``compression`` for the small
    columns, ``frame_compression`` for the blobs."""
    features = parse_schema_metadata(schema, "shard schema")["features"]
    plain = [c for c in schema.names if c not in features]
    codecs = {path: frame_compression if field.name in features else compression
              for field in schema for path in _leaf_paths(field)}
    return dict(compression=codecs, use_dictionary=plain, write_statistics=plain, write_page_checksum=True)


def _leaf_paths(field: pa.Field) -> tuple[str, ...]:
    """Parquet column paths of a top-level field, as a per-column codec needs them: a column left out of that dict
    is written uncompressed. A list's leaf is ``element`` in Parquet's compliant nesting (pyarrow's default) and
    ``item`` in the legacy one (Beam's Parquet sink); naming both fits either, and pyarrow ignores the other."""
    if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
        return f"{field.name}.list.element", f"{field.name}.list.item"
    return (field.name,)


class ShardWriter:
    """Write rows (dicts from ``record_to_row``) to one Parquet shard, ``row_group_size`` rows per row group.

    Local files are written under a temporary name in the target directory and renamed into place on a clean
    close, so readers never see a half-written shard; on an exception the temporary file is removed. Object stores
    (``gs://``) publish an object only when its upload completes, which is atomic already.

    Args:
        path: local path or fsspec URL of the shard.
        schema: from ``shard_schema``.
        row_group_size: rows (videos) per row group; bounds a reader's memory.
        compression: Parquet codec of the small columns (``zstd``, ``snappy``, ``none``, ...).
        frame_compression: Parquet codec of the feature blobs.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                 compression: str = DEFAULT_COMPRESSION, frame_compression: str = DEFAULT_FRAME_COMPRESSION):
        if row_group_size < 1:
            raise ShardError(f"row_group_size must be positive, got {row_group_size}")
        self.path = str(path)
        self.schema = schema
        self.meta = parse_schema_metadata(schema, "schema given to ShardWriter")
        self.row_group_size = int(row_group_size)
        self.rows_written = 0
        self._row_bytes = {name: dim * np.dtype(self.meta["dtype"]).itemsize
                           for name, dim in self.meta["features"].items()}
        self._names = set(schema.names)
        self._pending: list[dict] = []
        self._fs, self._fs_path = fsspec.core.url_to_fs(self.path)
        self._local = "file" in _protocols(self._fs)
        parent = posixpath.dirname(self._fs_path)
        if parent:
            self._fs.makedirs(parent, exist_ok=True)
        options = writer_options(schema, compression, frame_compression)
        if self._local:
            self._tmp: str | None = f"{self._fs_path}.tmp-{uuid.uuid4().hex}"
            self._file = None
            self._writer = pq.ParquetWriter(self._tmp, schema, **options)
        else:
            self._tmp = None
            self._file = self._fs.open(self._fs_path, "wb")
            self._writer = pq.ParquetWriter(self._file, schema, **options)
        self._closed = False

    def write(self, row: Mapping[str, Any]) -> None:
        """Queue one row; a full row group is written out."""
        if self._closed:
            raise ShardError(f"{self.path} is closed")
        keys = set(row)
        if keys != self._names:
            raise ShardSchemaError(f"row {row.get('id')!r} for {self.path}: missing columns "
                                   f"{sorted(self._names - keys)}, unexpected columns {sorted(keys - self._names)}")
        frames = int(row["num_frames"])
        for name, row_bytes in self._row_bytes.items():
            if len(row[name]) != frames * row_bytes:
                raise ShardSchemaError(f"row {row['id']!r}: feature {name!r} has {len(row[name])} bytes, expected "
                                       f"{frames} frames x {row_bytes} bytes")
        self._pending.append(row)
        if len(self._pending) >= self.row_group_size:
            self._flush()

    def write_rows(self, rows) -> None:
        for row in rows:
            self.write(row)

    def _flush(self) -> None:
        if self._pending:
            batch = pa.RecordBatch.from_pylist(self._pending, schema=self.schema)
            self._writer.write_batch(batch)  # one batch = one row group
            self.rows_written += len(self._pending)
            self._pending = []

    def close(self) -> None:
        """Write the last row group and the footer, then publish the file."""
        if self._closed:
            return
        try:
            self._flush()
            self._writer.close()
            if self._file is not None:
                self._file.close()
            if self._tmp is not None:
                os.replace(self._tmp, self._fs_path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; no shard appears at ``path``."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._writer.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
        elif self._file is not None:
            if hasattr(self._file, "discard"):  # fsspec buffered uploads (gcsfs): cancel the upload
                with contextlib.suppress(Exception):
                    self._file.discard()
            else:
                with contextlib.suppress(Exception):
                    self._file.close()
                with contextlib.suppress(Exception):
                    self._fs.rm(self._fs_path)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- finding and describing shards -----------------------------------------------------------------------------
def list_shards(path: str | os.PathLike) -> list[str]:
    """Sorted shard paths for: a preprocess output directory (its ``shards/*.parquet``), a directory of
    ``*.parquet``, a glob, or a single file; any fsspec URL. Raises ``NoShardsFound`` when nothing matches."""
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if _GLOB_CHARS & set(fs_path):
        found = [p for p in fs.glob(fs_path) if fs.isfile(p)]
    elif fs.isdir(fs_path):
        found = fs.glob(posixpath.join(fs_path, "shards", "*.parquet"))
        if not found:
            found = fs.glob(posixpath.join(fs_path, "*.parquet"))
    elif fs.isfile(fs_path):
        found = [fs_path]
    else:
        raise NoShardsFound(f"no shard at {path}: no such file or directory")
    if not found:
        raise NoShardsFound(f"no Parquet shards at {path} (looked for shards/*.parquet and *.parquet)")
    local = "file" in _protocols(fs)
    return sorted(p if local else fs.unstrip_protocol(p) for p in found)


@contextlib.contextmanager
def _open_parquet(path: str | os.PathLike) -> Iterator[tuple[pq.ParquetFile, bool]]:
    """(the shard's ParquetFile, whether its row groups may be decoded on Arrow's thread pool)."""
    path = str(path)
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
        if "file" in _protocols(fs):
            # Arrow's own file reader: a Python file object costs each read a trip through the interpreter, which
            # halves the local read throughput of an uncompressed blob column (bench/parquet_layout.py).
            pf = pq.ParquetFile(fs_path, page_checksum_verification=True)
            try:
                yield pf, True
            finally:
                pf.close()
            return
        # Through a Python file object (gs:// and other fsspec stores) every read buffer is a Python object. A pool
        # thread can still be releasing one, which takes the GIL, when the interpreter exits, and the process then
        # aborts (std::terminate) after a run that succeeded: such shards are decoded on the calling thread.
        with fs.open(fs_path, "rb") as f:
            yield pq.ParquetFile(f, page_checksum_verification=True), False
    except FileNotFoundError:
        raise NoShardsFound(f"shard {path} does not exist") from None
    except (pa.ArrowInvalid, OSError) as e:  # OSError: a page whose CRC does not match, a truncated file
        raise ShardError(f"{path} is corrupt or not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _info(pf: pq.ParquetFile, path: str) -> ShardInfo:
    meta = parse_schema_metadata(pf.schema_arrow, path)
    return ShardInfo(path=path, num_rows=pf.metadata.num_rows, num_row_groups=pf.num_row_groups, **meta)


def read_shard_info(path: str | os.PathLike) -> ShardInfo:
    """Parse a shard's footer: features, dtype, level, whitening hash, segment columns, row counts."""
    with _open_parquet(path) as (pf, _):
        return _info(pf, str(path))


def row_group_rows(path: str | os.PathLike) -> list[int]:
    """Rows in each row group of a shard, from its footer alone."""
    with _open_parquet(path) as (pf, _):
        return [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]


# -- reading ---------------------------------------------------------------------------------------------------
def _resolve_columns(info: ShardInfo, names: Sequence[str], features: Sequence[str] | None,
                     columns: Sequence[str] | None) -> list[str]:
    if isinstance(features, str):
        features = (features,)
    if features is not None:
        missing = [f for f in features if f not in info.features]
        if missing:
            raise ShardSchemaError(f"{info.path} has no feature {', '.join(map(repr, missing))}; available: "
                                   f"{', '.join(info.features) or 'none'}")
    if columns is None:
        cols = [*BASE_COLUMNS, *(info.features if features is None else features)]
        if info.has_segments:
            cols += SEGMENT_COLUMNS
        return cols
    cols = list(dict.fromkeys([*columns, *(features or ())]))
    unknown = [c for c in cols if c not in names]
    if unknown:
        raise ShardSchemaError(f"{info.path} has no column {', '.join(map(repr, unknown))}; available: "
                               f"{', '.join(names)}")
    return cols


def iter_batches(path: str | os.PathLike, features: Sequence[str] | None = None,
                 columns: Sequence[str] | None = None, row_groups: Sequence[int] | None = None,
                 batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one shard, read one row group at a time.

    Args:
        path: one shard (local path or fsspec URL).
        features: feature columns to read (default: all when ``columns`` is None); each must exist, else
            ``ShardSchemaError`` naming the available ones.
        columns: exact columns to read (``features`` are added); default: id, labels, num_frames, the features
            and the segment columns when present.
        row_groups: row-group indices to read, in this order (default: all).
        batch_rows: split row groups into batches of at most this many rows (default: one batch per row group).
    """
    path = str(path)
    with _open_parquet(path) as (pf, threads):
        info = _info(pf, path)
        cols = _resolve_columns(info, pf.schema_arrow.names, features, columns)
        groups = range(info.num_row_groups) if row_groups is None else list(row_groups)
        for g in groups:
            if not 0 <= g < info.num_row_groups:
                raise ShardError(f"{path} has {info.num_row_groups} row groups, asked for row group {g}")
            table = pf.read_row_group(g, columns=cols, use_threads=threads)
            yield from table.to_batches(max_chunksize=batch_rows)


def decode_features(data, key=None, dim: int | None = None, dtype: str | None = None) -> list[np.ndarray]:
    """Per-row (T, dim) matrices of a binary feature column, as zero-copy read-only views in the storage dtype.

    Two forms: ``decode_features(batch, "rgb")`` with a RecordBatch or Table read from a shard (dim and dtype
    default to the schema metadata, T comes from its ``num_frames`` column when present), or
    ``decode_features(column, num_frames, dim, dtype)`` with the binary Array/ChunkedArray itself and optional
    per-row frame counts. A cell whose byte length disagrees with T, dim and dtype raises ``ShardSchemaError``.
    """
    num_frames = None
    if isinstance(data, (pa.RecordBatch, pa.Table)):
        if key not in data.schema.names:
            raise ShardSchemaError(f"no column {key!r} in this batch; it has {data.schema.names}")
        if dim is None or dtype is None:
            meta = parse_schema_metadata(data.schema, "record batch") if (data.schema.metadata or {}).get(
                METADATA_KEY) else None
            if meta is None or key not in meta["features"]:
                raise ShardSchemaError(f"pass dim and dtype: the batch carries no shard metadata for {key!r}")
            dim = meta["features"][key] if dim is None else dim
            dtype = meta["dtype"] if dtype is None else dtype
        if "num_frames" in data.schema.names:
            num_frames = data.column("num_frames")
        column = data.column(key)
    else:
        column, num_frames = data, key
        if dim is None or dtype is None:
            raise ShardSchemaError("decode_features(column, ...) needs dim and dtype")
    dt = _storage_dtype(dtype)
    if num_frames is not None:
        if isinstance(num_frames, (pa.Array, pa.ChunkedArray)):
            num_frames = num_frames.to_numpy()
        num_frames = np.asarray(num_frames, np.int64)
        if num_frames.shape != (len(column),):
            raise ShardSchemaError(f"{len(column)} feature cells but {num_frames.shape} frame counts")
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    start = 0
    for chunk in chunks:
        frames = None if num_frames is None else num_frames[start:start + len(chunk)]
        out += _decode_chunk(chunk, frames, int(dim), dt, start)
        start += len(chunk)
    return out


def _decode_chunk(arr: pa.Array, frames: np.ndarray | None, dim: int, dt: np.dtype, row0: int) -> list[np.ndarray]:
    if pa.types.is_binary(arr.type):
        offset_type = np.int32
    elif pa.types.is_large_binary(arr.type):
        offset_type = np.int64
    else:
        raise ShardSchemaError(f"feature column must be binary, got {arr.type}")
    n = len(arr)
    if n == 0:
        return []
    if arr.null_count:
        raise ShardSchemaError(f"feature column has {arr.null_count} null cells")
    _, offset_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offset_buf, offset_type, count=n + 1, offset=arr.offset * np.dtype(offset_type).itemsize)
    lengths = np.diff(offsets)
    row_bytes = dim * dt.itemsize
    if frames is None:
        if np.any(lengths % row_bytes):
            bad = int(np.flatnonzero(lengths % row_bytes)[0])
            raise ShardSchemaError(f"row {row0 + bad}: {lengths[bad]} bytes is not a whole number of "
                                   f"{dim}-value {dt.name} frames")
        frames = lengths // row_bytes
    elif np.any(lengths != frames * row_bytes):
        bad = int(np.flatnonzero(lengths != frames * row_bytes)[0])
        raise ShardSchemaError(f"row {row0 + bad}: feature cell has {lengths[bad]} bytes, expected "
                               f"{frames[bad]} frames x {dim} x {dt.itemsize} bytes")
    first, last = int(offsets[0]), int(offsets[-1])
    if last == first:
        return [np.zeros((0, dim), dt) for _ in range(n)]
    if first % dt.itemsize:  # unaligned slice of the data buffer: one copy re-aligns it
        raw = np.frombuffer(data_buf, np.uint8, count=last - first, offset=first).copy()
        values, starts = raw.view(dt), (offsets[:-1] - first) // dt.itemsize
    else:
        values, starts = np.frombuffer(data_buf, dt, count=last // dt.itemsize), offsets[:-1] // dt.itemsize
    values.flags.writeable = False  # views share the Arrow buffer, which other readers of the batch also see
    sizes = frames * dim
    return [values[s:s + k].reshape(t, dim) for s, k, t in zip(starts.tolist(), sizes.tolist(), frames.tolist())]


def _list_column(col: pa.Array, dtype) -> list[np.ndarray | None]:
    """Per-row numpy arrays of a list column (one vectorized conversion for the whole batch)."""
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(dtype)  # a copy
    parts = np.split(values, offsets[1:-1] - offsets[0])
    if col.null_count:
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        return [p if ok else None for p, ok in zip(parts, valid)]
    return parts


@dataclass
class Video:
    """One video read back from a shard. Features are float32 (T, D) copies; fields not read are None."""
    id: str
    labels: np.ndarray | None
    num_frames: int
    features: dict = field(default_factory=dict)
    segment_start_times: np.ndarray | None = None
    segment_labels: np.ndarray | None = None
    segment_scores: np.ndarray | None = None


_LIST_DTYPES = {"labels": np.int32, "segment_start_times": np.int32, "segment_labels": np.int32,
                "segment_scores": np.float32}


def iter_videos(path: str | os.PathLike, features: Sequence[str] = ("rgb",), columns: Sequence[str] | None = None,
                batch_rows: int | None = None) -> Iterator[Video]:
    """Videos of every shard ``list_shards(path)`` finds, in file and row order, one row group in memory at a time.

    Args:
        path: a shard, a directory, a glob or an fsspec URL (see ``list_shards``).
        features: features to decode to float32 (T, D); a missing one raises ``ShardSchemaError``.
        columns: non-feature columns to read besides id and num_frames; default: labels, plus the segment columns
            when the shard has them.
        batch_rows: rows decoded at a time (default: a whole row group).
    """
    if isinstance(features, str):
        features = (features,)
    for shard in list_shards(path):
        with _open_parquet(shard) as (pf, threads):
            info = _info(pf, shard)
            wanted = ["labels", *(SEGMENT_COLUMNS if info.has_segments else ())] if columns is None else columns
            extra = [c for c in wanted if c not in ("id", "num_frames")]
            cols = _resolve_columns(info, pf.schema_arrow.names, features, ["id", "num_frames", *extra])
            for g in range(info.num_row_groups):
                for batch in pf.read_row_group(g, columns=cols, use_threads=threads).to_batches(
                        max_chunksize=batch_rows):
                    yield from _videos_of(batch, info, features, extra)


def _videos_of(batch: pa.RecordBatch, info: ShardInfo, features: Sequence[str], extra: Sequence[str]):
    ids = batch.column("id").to_pylist()
    frames = batch.column("num_frames").to_numpy().astype(np.int64)
    decoded = {f: decode_features(batch.column(f), frames, info.features[f], info.dtype) for f in features}
    lists = {c: _list_column(batch.column(c), _LIST_DTYPES[c]) for c in extra if c in _LIST_DTYPES}
    for i, vid in enumerate(ids):
        yield Video(id=vid, labels=lists["labels"][i] if "labels" in lists else None, num_frames=int(frames[i]),
                    features={f: m[i].astype(np.float32) for f, m in decoded.items()},
                    segment_start_times=lists["segment_start_times"][i] if "segment_start_times" in lists else None,
                    segment_labels=lists["segment_labels"][i] if "segment_labels" in lists else None,
                    segment_scores=lists["segment_scores"][i] if "segment_scores" in lists else None)


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
