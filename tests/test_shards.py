"""pipeline.shards: schema and metadata, write/read round trips, byte layout, errors, fsspec (memory://) paths."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shards
from pipeline.records import VideoRecord
from pipeline.shards import (NoShardsFound, ShardError, ShardSchemaError, ShardWriter, decode_features, iter_batches,
                             iter_videos, list_shards, read_shard_info, record_to_row, shard_schema)

DIMS = {"rgb": 12, "audio": 4}
SHA = "ab" * 32


def make_videos(n: int, seed: int = 0, segments: bool = False, level: str = "frame"):
    """(VideoRecord, whitened features) pairs: uint8 raw frames (only their count matters to the shard) and
    float64 'whitened' matrices of 1..9 frames."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = 1 if level == "video" else int(rng.integers(1, 10))
        rec = VideoRecord(id=f"vid{i:03d}", labels=rng.choice(50, size=int(rng.integers(1, 5)), replace=False)
                          .astype(np.int32), rgb=rng.integers(0, 256, size=(t, 1024), dtype=np.uint8),
                          audio=rng.integers(0, 256, size=(t, 128), dtype=np.uint8), level=level)
        if segments and i % 3:  # every third video has no rated segment
            k = int(rng.integers(1, 4))
            rec.segment_start_times = (rng.integers(0, t, size=k) // 5 * 5).astype(np.int32)
            rec.segment_labels = rng.integers(0, 50, size=k).astype(np.int32)
            rec.segment_scores = rng.integers(0, 2, size=k).astype(np.float32)
        out.append((rec, {name: rng.normal(0, 2, size=(t, d)) for name, d in DIMS.items()}))
    return out


def write_shard(path, videos, dtype="float16", segments=False, level="frame", row_group_size=3):
    schema = shard_schema(DIMS, dtype=dtype, has_segments=segments, level=level, whitening_sha256=SHA)
    with ShardWriter(path, schema, row_group_size=row_group_size) as w:
        for rec, white in videos:
            w.write(record_to_row(rec, white, dtype, has_segments=segments))
    return str(path)


# -- round trip ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_write_read_round_trip(tmp_path, dtype, segments):
    videos = make_videos(10, seed=1, segments=segments)
    path = write_shard(tmp_path / "s.parquet", videos, dtype=dtype, segments=segments)
    got = list(iter_videos(path, features=("rgb", "audio")))
    assert [v.id for v in got] == [r.id for r, _ in videos]
    for v, (rec, white) in zip(got, videos):
        assert v.num_frames == rec.num_frames
        assert v.labels.dtype == np.int32 and np.array_equal(v.labels, rec.labels)
        for name, mat in white.items():
            assert v.features[name].dtype == np.float32 and v.features[name].shape == mat.shape
            # Exactly the stored values, and within the storage precision of the originals.
            np.testing.assert_array_equal(v.features[name], mat.astype(dtype).astype(np.float32))
            rtol = 1e-3 if dtype == "float16" else 1e-7
            np.testing.assert_allclose(v.features[name], mat, rtol=rtol, atol=rtol * 1e-2)
        if not segments:
            assert v.segment_start_times is None and v.segment_labels is None and v.segment_scores is None
        elif rec.segment_start_times is None:  # a segment shard: videos without ratings get empty arrays
            assert v.segment_start_times.size == v.segment_labels.size == v.segment_scores.size == 0
        else:
            assert v.segment_start_times.dtype == np.int32 and v.segment_scores.dtype == np.float32
            np.testing.assert_array_equal(v.segment_start_times, rec.segment_start_times)
            np.testing.assert_array_equal(v.segment_labels, rec.segment_labels)
            np.testing.assert_array_equal(v.segment_scores, rec.segment_scores)


@pytest.mark.parametrize("frame_codec", [None, "snappy", "zstd"])
def test_frame_blobs_uncompressed_by_default_small_columns_snappy(tmp_path, frame_codec):
    """Whitened frames are noise to a codec (snappy saved nothing on them), so their blobs are stored as they are
    unless a frame codec is asked for; the small columns keep snappy; the frames read back the same either way."""
    videos = make_videos(6, seed=2, segments=True)
    schema = shard_schema(DIMS, dtype="float16", has_segments=True, whitening_sha256=SHA)
    kwargs = {} if frame_codec is None else {"frame_compression": frame_codec}
    path = tmp_path / "s.parquet"
    with ShardWriter(path, schema, row_group_size=4, **kwargs) as w:
        for rec, white in videos:
            w.write(record_to_row(rec, white, "float16", has_segments=True))
    md = pq.ParquetFile(path).metadata
    codecs = {md.row_group(g).column(c).path_in_schema.split(".")[0]: md.row_group(g).column(c).compression
              for g in range(md.num_row_groups) for c in range(md.num_columns)}
    expected = (frame_codec or "uncompressed").upper()
    assert {codecs["rgb"], codecs["audio"]} == {expected}
    assert {codecs[name] for name in codecs if name not in DIMS} == {"SNAPPY"}
    for v, (rec, white) in zip(iter_videos(str(path), features=("rgb", "audio")), videos):
        for name, mat in white.items():
            np.testing.assert_array_equal(v.features[name], mat.astype(np.float16).astype(np.float32))


def test_ratings_past_the_last_frame_are_kept_and_told_apart_by_num_frames(tmp_path):
    from pipeline.records import segment_outside_frames

    videos = make_videos(1, seed=4)
    rec, white = videos[0]
    T = rec.num_frames
    rec.segment_start_times = np.array([0, T // 5 * 5 + 5, T + 40], np.int32)  # the last two start past frame T-1
    rec.segment_labels = np.array([1, 2, 2], np.int32)
    rec.segment_scores = np.array([1, 1, 0], np.float32)
    assert rec.segments_past_end == 2
    path = write_shard(tmp_path / "s.parquet", videos, segments=True)
    (v,) = iter_videos(path)
    np.testing.assert_array_equal(v.segment_start_times, rec.segment_start_times)
    np.testing.assert_array_equal(v.segment_scores, [1, 1, 0])
    assert segment_outside_frames(v.segment_start_times, v.num_frames).tolist() == [False, True, True]


def test_video_level_and_full_size_frames(tmp_path):
    rng = np.random.default_rng(2)
    rec = VideoRecord(id="big", labels=np.array([3], np.int32), rgb=np.zeros((300, 1024), np.uint8))
    white = {"rgb": rng.normal(size=(300, 1024))}
    schema = shard_schema({"rgb": 1024}, level="video")
    means = make_videos(2, seed=3, level="video")
    with ShardWriter(tmp_path / "v.parquet", schema) as w:
        w.write(record_to_row(rec, white))
        for r, wh in means:
            w.write(record_to_row(r, {"rgb": np.resize(wh["rgb"], (1, 1024))}))
    got = list(iter_videos(tmp_path / "v.parquet"))
    assert [v.num_frames for v in got] == [300, 1, 1] and read_shard_info(tmp_path / "v.parquet").level == "video"
    np.testing.assert_array_equal(got[0].features["rgb"], white["rgb"].astype(np.float16).astype(np.float32))


def test_cells_are_little_endian_row_major_bytes(tmp_path):
    videos = make_videos(3, seed=4)
    path = write_shard(tmp_path / "s.parquet", videos, dtype="float32")
    table = pq.read_table(path)
    for cell, (rec, white) in zip(table.column("audio").to_pylist(), videos):
        assert len(cell) == rec.num_frames * 4 * 4
        np.testing.assert_array_equal(np.frombuffer(cell, "<f4").reshape(rec.num_frames, 4),
                                      white["audio"].astype(np.float32))


# -- schema and metadata ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("segments", [False, True])
def test_schema_types_and_metadata(tmp_path, segments):
    path = write_shard(tmp_path / "s.parquet", make_videos(7, seed=5, segments=segments), segments=segments)
    schema = pq.read_schema(path)
    assert schema.field("id").type == pa.string() and schema.field("num_frames").type == pa.int32()
    assert schema.field("labels").type == pa.list_(pa.int32())
    assert schema.field("rgb").type == pa.binary() and schema.field("audio").type == pa.binary()
    if segments:
        assert schema.field("segment_start_times").type == pa.list_(pa.int32())
        assert schema.field("segment_labels").type == pa.list_(pa.int32())
        assert schema.field("segment_scores").type == pa.list_(pa.float32())
    else:
        assert not set(shards.SEGMENT_COLUMNS) & set(schema.names)
    meta = json.loads(schema.metadata[b"yt8m_cma"])
    assert meta == {"version": 1, "level": "frame", "dtype": "float16", "features": {"rgb": 12, "audio": 4},
                    "whitening_sha256": SHA, "has_segments": segments}
    info = read_shard_info(path)
    assert (info.level, info.dtype, info.features, info.whitening_sha256, info.has_segments) == \
           ("frame", "float16", {"rgb": 12, "audio": 4}, SHA, segments)
    assert list(info.features) == ["rgb", "audio"]  # column order kept
    assert info.num_rows == 7 and info.num_row_groups == math.ceil(7 / 3)


@pytest.mark.parametrize("kwargs", [{"dtype": "float64"}, {"level": "clip"}, {"features": {}},
                                    {"features": {"labels": 3}}, {"features": {"rgb": 0}}])
def test_shard_schema_rejects_bad_arguments(kwargs):
    args = {"features": {"rgb": 4}, **kwargs}
    with pytest.raises(ShardSchemaError):
        shard_schema(**args)


def test_foreign_or_future_parquet_is_rejected(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(ShardSchemaError, match="not a yt8m-cma shard"):
        read_shard_info(tmp_path / "plain.parquet")
    schema = shard_schema({"rgb": 2})
    meta = json.loads(schema.metadata[b"yt8m_cma"])
    meta["version"] = 2
    future = schema.with_metadata({b"yt8m_cma": json.dumps(meta).encode()})
    pq.write_table(pa.Table.from_pylist([{"id": "a", "labels": [], "num_frames": 0, "rgb": b""}], schema=future),
                   tmp_path / "future.parquet")
    with pytest.raises(ShardSchemaError, match="version 2"):
        read_shard_info(tmp_path / "future.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 no footer")
    with pytest.raises(ShardError):
        read_shard_info(tmp_path / "junk.parquet")


# -- errors ----------------------------------------------------------------------------------------------------
def test_missing_feature_names_the_available_ones(tmp_path):
    path = write_shard(tmp_path / "s.parquet", make_videos(2, seed=6))
    with pytest.raises(ShardSchemaError, match=r"no feature 'mfcc'; available: rgb, audio"):
        list(iter_videos(path, features=("rgb", "mfcc")))
    with pytest.raises(ShardSchemaError, match="available: rgb, audio"):
        next(iter_batches(path, features=["mfcc"]))
    with pytest.raises(ShardSchemaError, match="no column 'segment_labels'"):
        list(iter_videos(path, columns=["labels", "segment_labels"]))


def test_writer_validates_rows(tmp_path):
    rec, white = make_videos(1, seed=7)[0]
    schema = shard_schema(DIMS)
    with ShardWriter(tmp_path / "a.parquet", schema) as w:
        row = record_to_row(rec, white)
        with pytest.raises(ShardSchemaError, match="missing columns"):
            w.write({k: v for k, v in row.items() if k != "audio"})
        with pytest.raises(ShardSchemaError, match="bytes"):
            w.write({**row, "rgb": row["rgb"][:-2]})
        with pytest.raises(ShardSchemaError, match="unexpected columns"):
            w.write({**row, "segment_labels": []})
        w.write(row)
    assert read_shard_info(tmp_path / "a.parquet").num_rows == 1


def test_record_to_row_checks_frames_and_range():
    rec, white = make_videos(1, seed=8, segments=True)[0]
    with pytest.raises(ShardSchemaError, match="shape"):
        record_to_row(rec, {"rgb": white["rgb"][:-1] if rec.num_frames > 1 else np.zeros((2, 12))})
    with pytest.raises(ShardSchemaError, match="not finite"):
        record_to_row(rec, {"rgb": np.full((rec.num_frames, 12), 7e4)}, "float16")  # float16 max is 65504
    assert np.isfinite(np.frombuffer(record_to_row(rec, {"rgb": np.full((rec.num_frames, 12), 7e4)},
                                                   "float32")["rgb"], "<f4")).all()
    rec.segment_start_times = rec.segment_labels = rec.segment_scores = None
    row = record_to_row(rec, white, has_segments=True)
    assert row["segment_start_times"] == row["segment_labels"] == row["segment_scores"] == []
    assert "segment_labels" not in record_to_row(rec, white)


def test_failed_write_leaves_no_file(tmp_path):
    videos = make_videos(5, seed=9)
    target = tmp_path / "out" / "s.parquet"
    with pytest.raises(RuntimeError):
        with ShardWriter(target, shard_schema(DIMS), row_group_size=2) as w:
            for rec, white in videos:
                w.write(record_to_row(rec, white))
            assert not target.exists()  # two row groups written so far, all under a temporary name
            raise RuntimeError("worker died")
    assert list((tmp_path / "out").iterdir()) == []


# -- listing and fsspec ----------------------------------------------------------------------------------------
def test_list_shards_forms(tmp_path):
    out = tmp_path / "run"
    paths = [write_shard(out / "shards" / f"part-{i:05d}-of-00003.parquet", make_videos(2, seed=i))
             for i in (2, 0, 1)]
    (out / "whitening.npz").write_bytes(b"")
    expected = sorted(paths)
    assert list_shards(out) == expected  # a preprocess output directory
    assert list_shards(out / "shards") == expected  # a directory of shards
    assert list_shards(str(out / "shards" / "part-0000[01]-*.parquet")) == expected[:2]  # a glob
    assert list_shards(paths[0]) == [paths[0]]  # one file
    (tmp_path / "empty").mkdir()
    for nothing in (tmp_path / "empty", tmp_path / "nope", str(out / "shards" / "*.csv")):
        with pytest.raises(NoShardsFound):
            list_shards(nothing)
    with pytest.raises(NoShardsFound):
        read_shard_info(tmp_path / "nope.parquet")
    assert [v.id for v in iter_videos(out)][:2] == [r.id for r, _ in make_videos(2, seed=0)]


def test_memory_filesystem_write_list_read():
    root = "memory://bucket/yt8m-run"
    videos = make_videos(8, seed=10, segments=True)
    for i in range(2):
        write_shard(f"{root}/shards/part-{i:05d}-of-00002.parquet", videos[i::2], segments=True)
    found = list_shards(root)
    assert all(f.startswith("memory://") for f in found)  # URLs, not paths stripped of their filesystem
    assert [f.split("/yt8m-run/")[1] for f in found] == ["shards/part-00000-of-00002.parquet",
                                                         "shards/part-00001-of-00002.parquet"]
    assert read_shard_info(found[1]).num_rows == 4 and read_shard_info(found[1]).whitening_sha256 == SHA
    got = {v.id: v for v in iter_videos(root, features=["audio"])}
    assert sorted(got) == sorted(r.id for r, _ in videos)
    for rec, white in videos:
        np.testing.assert_array_equal(got[rec.id].features["audio"], white["audio"].astype(np.float16))
        assert set(got[rec.id].features) == {"audio"}
    with pytest.raises(NoShardsFound):
        list_shards("memory://bucket/elsewhere")


# -- batch-level reading ---------------------------------------------------------------------------------------
def test_iter_batches_row_groups_and_batch_rows(tmp_path):
    videos = make_videos(8, seed=11)
    path = write_shard(tmp_path / "s.parquet", videos, row_group_size=3)  # row groups of 3, 3, 2
    sizes = [b.num_rows for b in iter_batches(path, features=["rgb"], batch_rows=2)]
    assert sizes == [2, 1, 2, 1, 2]
    ids = [i for b in iter_batches(path, row_groups=(2, 0)) for i in b.column("id").to_pylist()]
    assert ids == ["vid006", "vid007", "vid000", "vid001", "vid002"]
    batch = next(iter_batches(path, columns=["id", "num_frames"], features=["audio"]))
    assert batch.schema.names == ["id", "num_frames", "audio"]
    with pytest.raises(ShardError, match="row group 5"):
        list(iter_batches(path, row_groups=[5]))


def test_decode_features_forms_views_and_slices(tmp_path):
    videos = make_videos(6, seed=12)
    path = write_shard(tmp_path / "s.parquet", videos, row_group_size=6)
    batch = next(iter_batches(path))
    from_batch = decode_features(batch, "rgb")  # dim and dtype from the schema metadata
    frames = batch.column("num_frames").to_numpy()
    from_column = decode_features(batch.column("rgb"), frames, 12, "float16")
    inferred = decode_features(batch.column("rgb"), None, 12, "float16")  # T from the byte length
    for i, (rec, white) in enumerate(videos):
        want = white["rgb"].astype(np.float16)
        for got in (from_batch[i], from_column[i], inferred[i]):
            assert got.dtype == np.float16 and not got.flags.writeable  # a view into the Arrow buffer
            np.testing.assert_array_equal(got, want)
    part = batch.slice(2, 3)  # offsets into the middle of the shared buffers
    for got, (rec, white) in zip(decode_features(part, "audio"), videos[2:5]):
        np.testing.assert_array_equal(got, white["audio"].astype(np.float16))
    chunked = pa.chunked_array([batch.column("rgb").slice(0, 2), batch.column("rgb").slice(2)])
    assert all(np.array_equal(a, b) for a, b in zip(decode_features(chunked, frames, 12, "float16"), from_batch))
    with pytest.raises(ShardSchemaError, match="row 0"):
        decode_features(batch.column("rgb"), frames + 1, 12, "float16")
    with pytest.raises(ShardSchemaError, match="whole number"):
        decode_features(batch.column("rgb"), None, 5, "float16")


def test_shard_factory_and_model_data_contract(tmp_path):
    """The helper other tests use writes rows by hand; the reader must agree with what it expects."""
    from shard_factory import write_random_shards
    written = write_random_shards(tmp_path, num_videos=9, num_shards=2, dims={"rgb": 8, "audio": 4},
                                  with_segments=True)
    got = {v.id: v for v in iter_videos(tmp_path, features=("rgb", "audio"))}
    assert sorted(got) == sorted(written.videos)
    for vid, exp in written.videos.items():
        for name in ("rgb", "audio"):
            np.testing.assert_array_equal(got[vid].features[name], exp.features[name])
        np.testing.assert_array_equal(got[vid].segment_labels, exp.segment_labels)


def test_a_flipped_byte_anywhere_in_the_data_is_an_error_naming_the_shard(tmp_path):
    """Page checksums are written and verified: corruption inside a shard never yields different frames silently."""
    from shard_factory import write_random_shards

    written = write_random_shards(tmp_path, num_videos=24, num_shards=1, dims={"rgb": 64}, frames=(20, 40),
                                  row_group_size=8)
    path = written.paths[0]
    clean = open(path, "rb").read()
    md = pq.ParquetFile(path).metadata
    data_start = min(md.row_group(g).column(c).data_page_offset if md.row_group(g).column(c).dictionary_page_offset
                     is None else md.row_group(g).column(c).dictionary_page_offset
                     for g in range(md.num_row_groups) for c in range(md.num_columns))
    data_end = len(clean) - 8 - int.from_bytes(clean[-8:-4], "little")  # the footer starts here
    reference = [(v.id, v.labels, v.features["rgb"]) for v in shards.iter_videos(path)]
    positions = np.random.default_rng(0).integers(data_start, data_end, size=40)
    for pos in positions:
        corrupt = bytearray(clean)
        corrupt[pos] ^= 0x5A
        bad = tmp_path / "bad.parquet"
        bad.write_bytes(bytes(corrupt))
        try:
            got = [(v.id, v.labels, v.features["rgb"]) for v in shards.iter_videos(str(bad))]
        except ShardError as e:
            assert "bad.parquet" in str(e)
            continue
        # the only acceptable way through is a flip that changed nothing decoded (none expected with checksums)
        assert len(got) == len(reference) and all(
            a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
            for a, b in zip(reference, got)), f"byte {pos} changed the data silently"


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e4])
def test_float16_cells_equal_numpy_rounding_and_the_overflow_edge(scale):
    """Cells are converted by Arrow's cast (faster): the bits must be numpy's round-to-nearest-even, subnormals and
    the largest finite values included, and the finiteness check must flip exactly where float16 reaches inf."""
    rng = np.random.default_rng(int(scale * 10) + 1)
    rec, _ = make_videos(1, seed=8)[0]
    mat = np.clip(rng.standard_normal((rec.num_frames, 12)) * scale, -6e4, 6e4).astype(np.float32)
    mat[0, :6] = [0.0, -0.0, 6e-8, -3e-5, 65519.0, -65504.0]
    row = record_to_row(rec, {"rgb": mat}, "float16")
    assert row["rgb"] == mat.astype("<f2").tobytes()
    assert record_to_row(rec, {"rgb": mat[:, 1:3]}, "float16")["rgb"] == mat[:, 1:3].astype("<f2").tobytes()
    for edge, storable in [(65519.996, True), (65520.0, False), (np.nan, False), (np.inf, False)]:
        bad = mat.copy()
        bad[-1, -1] = edge
        if storable:
            assert np.isfinite(np.frombuffer(record_to_row(rec, {"rgb": bad}, "float16")["rgb"], "<f2")).all()
        else:
            with pytest.raises(ShardSchemaError, match="not finite"):
                record_to_row(rec, {"rgb": bad}, "float16")
