"""beam_jobs.preprocess end to end on generated and real data, checked against TensorFlow's parse and numpy.

The Beam runs use the local FnApiRunner: one in-process worker where the test is about results, two worker
processes for the training split and the fanout fit, so the multi-process path and its metrics are exercised too.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_jobs import options as job_options
from beam_jobs import preprocess
from pipeline import shards, synthetic
from pipeline.records import VideoRecord, decode_sequence_example, dequantize, encode_sequence_example
from pipeline.tfrecord import frame_record, read_records
from pipeline.whitening import MomentAccumulator, WhiteningSet, fit_whitening_set

from conftest import REAL_DATA
ONE_WORKER = ["--direct_num_workers", "1"]
TWO_WORKERS = ["--direct_num_workers", "2"]


# -- independent readers: TensorFlow's own parse and the official dequantization -------------------------------
def tf_frame_records(pattern: str) -> dict:
    """id -> dict(labels, rgb, audio (T, D) float32, segment arrays) parsed by TensorFlow."""
    import tensorflow as tf

    out = {}
    for path in sorted(glob.glob(pattern)):
        for raw in tf.data.TFRecordDataset(path):
            ctx, seq = tf.io.parse_single_sequence_example(
                raw, context_features={"id": tf.io.FixedLenFeature([], tf.string),
                                       "labels": tf.io.VarLenFeature(tf.int64),
                                       "segment_start_times": tf.io.VarLenFeature(tf.int64),
                                       "segment_labels": tf.io.VarLenFeature(tf.int64),
                                       "segment_scores": tf.io.VarLenFeature(tf.float32)},
                sequence_features={"rgb": tf.io.FixedLenSequenceFeature([], tf.string),
                                   "audio": tf.io.FixedLenSequenceFeature([], tf.string)})
            feats = {k: tf.cast(tf.io.decode_raw(seq[k], tf.uint8), tf.float32).numpy() * (4 / 255) + (4 / 512 - 2)
                     for k in ("rgb", "audio")}
            out[ctx["id"].numpy().decode()] = dict(
                labels=tf.sparse.to_dense(ctx["labels"]).numpy(), **feats,
                **{k: tf.sparse.to_dense(ctx[k]).numpy() for k in
                   ("segment_start_times", "segment_labels", "segment_scores")})
    return out


def numpy_whitening(frames: np.ndarray, dims: int, epsilon: float = 1e-4):
    """(mean, eigenvalues, components) of the top ``dims`` principal axes, straight from np.cov + eigh."""
    mean = frames.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(frames, rowvar=False))
    order = np.argsort(values)[::-1][:dims]
    return mean, values[order], vectors[:, order].T


def shard_rows(out: Path, features=("rgb",)) -> dict:
    return {v.id: v for v in shards.iter_videos(str(out), features=features)}


def dead_letters(out: Path) -> list[dict]:
    lines = []
    for path in sorted((out / "dead_letter").glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def counts_from_outputs(out: Path) -> dict:
    """read / written / written_frames / dead-lettered by reason, counted here from the files the job wrote, with
    pyarrow and json only (not with the job's own output_counts)."""
    shard_files = sorted((out / "shards").glob("*.parquet"))
    written = sum(pq.read_metadata(p).num_rows for p in shard_files)
    frames = sum(int(pq.read_table(p, columns=["num_frames"]).column(0).to_numpy().sum()) for p in shard_files)
    reasons: dict = {}
    for d in dead_letters(out):
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    lines = [json.loads(line) for p in sorted((out / "counts").glob("*.jsonl"))
             for line in p.read_text().splitlines() if line.strip()]
    read = sum(line.get("read_records", 0) for line in lines if line["step"] == "read")
    return {"read": read, "written": written, "written_frames": frames, "dead_lettered": reasons}


class _NoMetricsResult:
    """A pipeline result as from a runner that reports no Beam metrics."""

    def __init__(self, result):
        self._result = result

    def wait_until_finish(self, duration=None):
        return self._result.wait_until_finish(duration)

    def metrics(self):
        raise NotImplementedError("this runner reports no metrics")


def no_metrics_pipeline(options):
    import apache_beam as beam

    class NoMetricsPipeline(beam.Pipeline):
        def run(self, test_runner_api="AUTO"):
            return _NoMetricsResult(super().run(test_runner_api))

    return NoMetricsPipeline(runner=job_options.make_runner(options), options=options)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    synthetic.generate(str(root / "train"), videos=24, shards=2, seed=5, min_frames=30, max_frames=70)
    synthetic.generate(str(root / "val"), videos=8, shards=1, seed=6, segments=True, prefix="validate",
                       min_frames=30, max_frames=70)
    return root


# -- end to end: fit, write, reuse, rerun ----------------------------------------------------------------------
def test_train_and_validation_splits_end_to_end(raw, tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    summary = preprocess.run(["--input", str(raw / "train/*.tfrecord"), "--output", str(train),
                              "--features", "rgb,audio", "--pca-dims", "rgb=32,audio=16", "--num-shards", "3"]
                             + TWO_WORKERS, save_main_session=False)
    expected = tf_frame_records(str(raw / "train/*.tfrecord"))
    assert len(expected) == 24
    assert (summary["read"], summary["written"], summary["dead_lettered_total"]) == (24, 24, 0)
    assert summary["written_frames"] == sum(v["rgb"].shape[0] for v in expected.values())
    assert json.loads((train / "summary.json").read_text()) == summary
    assert summary["metrics_agree"] and summary["shards_complete"] and summary["invariant_holds"]
    assert {k: summary[k] for k in ("read", "written", "written_frames", "dead_lettered")} == counts_from_outputs(
        train)
    assert json.loads((train / "config.json").read_text())["pca_dims"] == {"rgb": 32, "audio": 16}
    assert dead_letters(train) == [] and len(list((train / "dead_letter").glob("*.jsonl"))) == 1

    # whitening.npz is the numpy fit of the same (TensorFlow-parsed) frames
    ws = WhiteningSet.load(train / "whitening.npz")
    for name, dims in (("rgb", 32), ("audio", 16)):
        frames = np.concatenate([v[name] for v in expected.values()]).astype(np.float64)
        mean, values, vectors = numpy_whitening(frames, dims)
        w = ws[name]
        assert w.count == frames.shape[0]
        np.testing.assert_allclose(w.mean, mean, atol=1e-9)
        np.testing.assert_allclose(w.eigenvalues, values, rtol=1e-8)
        np.testing.assert_allclose(np.abs(np.sum(w.components * vectors, axis=1)), 1.0, atol=1e-8)

    # the written training features are decorrelated, with variance eigenvalue / regularized variance along each
    # axis (identity without shrinkage and epsilon; up to float16)
    written = shard_rows(train, ("rgb", "audio"))
    assert set(written) == set(expected)
    for name, dims in (("rgb", 32), ("audio", 16)):
        x = np.concatenate([written[i].features[name] for i in sorted(written)]).astype(np.float64)
        assert x.shape[1] == dims
        assert np.abs(x.mean(axis=0)).max() < 5e-3
        white = np.diag(ws[name].eigenvalues / ws[name].variances)
        np.testing.assert_allclose(np.cov(x, rowvar=False), white, atol=5e-3 * white.max())
    for vid, v in written.items():
        np.testing.assert_array_equal(np.sort(v.labels), np.sort(expected[vid]["labels"]))
        assert v.num_frames == expected[vid]["rgb"].shape[0]
    names = sorted(p.name for p in (train / "shards").iterdir())
    assert names == [f"part-0000{i}-of-00003.parquet" for i in range(3)]
    train_sha = sha256(train / "whitening.npz")
    assert {shards.read_shard_info(str(p)).whitening_sha256 for p in (train / "shards").iterdir()} == {train_sha}
    # the job's sink writes the shards' codecs (pipeline.shards.writer_options): frame blobs as they are, the rest snappy
    # (Beam spreads 24 records over 3 shards at random, so a shard may hold no row group at all)
    groups = [md.row_group(g) for md in (pq.ParquetFile(train / "shards" / n).metadata for n in names)
              for g in range(md.num_row_groups)]
    assert groups
    for group in groups:
        codecs = {group.column(c).path_in_schema.split(".")[0]: group.column(c).compression
                  for c in range(group.num_columns)}
        assert codecs == {"id": "SNAPPY", "labels": "SNAPPY", "num_frames": "SNAPPY", "rgb": "UNCOMPRESSED",
                          "audio": "UNCOMPRESSED"}

    # validation split: reuses the training statistics byte for byte, keeps its segment ratings
    preprocess.run(["--input", str(raw / "val/*.tfrecord"), "--output", str(val), "--features", "rgb,audio",
                    "--whitening", str(train / "whitening.npz")] + ONE_WORKER, save_main_session=False)
    assert sha256(val / "whitening.npz") == train_sha
    info = shards.read_shard_info(shards.list_shards(str(val))[0])
    assert info.whitening_sha256 == train_sha and info.has_segments and info.features == {"rgb": 32, "audio": 16}
    val_expected = tf_frame_records(str(raw / "val/*.tfrecord"))
    val_written = shard_rows(val)
    assert set(val_written) == set(val_expected)
    for vid, v in val_written.items():
        np.testing.assert_array_equal(v.segment_start_times, val_expected[vid]["segment_start_times"])
        np.testing.assert_array_equal(v.segment_labels, val_expected[vid]["segment_labels"])
        np.testing.assert_array_equal(v.segment_scores, val_expected[vid]["segment_scores"])
        want = ws["rgb"].transform(val_expected[vid]["rgb"], dtype=np.float64)
        np.testing.assert_allclose(v.features["rgb"], want, rtol=2e-3, atol=2e-3)

    # a rerun into the same directory replaces the shards: 3 before, exactly 2 after
    again = preprocess.run(["--input", str(raw / "train/*.tfrecord"), "--output", str(train), "--features",
                            "rgb,audio", "--whitening", str(train / "whitening.npz"), "--num-shards", "2"]
                           + ONE_WORKER, save_main_session=False)
    names = sorted(p.name for p in (train / "shards").iterdir())
    assert names == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    assert again["written"] == 24 and sha256(train / "whitening.npz") == train_sha
    assert len(shard_rows(train)) == 24


# -- the fit: fanout of the moments combine, and the fit and write stages as separate invocations ---------------
# Tolerances of a Beam fit against one MomentAccumulator fed every frame in this process. Both sum the same float64
# values in a different order (Chan merges per bundle, per fanout key, then on the final key), so they agree up to
# rounding: means within a few ulp of the frame values (|x| <= 2), eigenvalues within about D * eps relative to the
# largest, components (compared up to sign, |<a, b>|) within eps * largest eigenvalue / eigengap; the top 8
# eigengaps of this data are at least 0.9% of the largest eigenvalue. Measured: at most 2e-16 (mean), 1.2e-15
# (eigenvalues, relative), 1.8e-15 (1 - |<a, b>|) for all three runs; the bounds leave three or more orders of margin
# and would still catch a lost or double-counted bundle (a change of order 1 / number of bundles).
FIT_ATOL_MEAN = 1e-12
FIT_RTOL_EIGENVALUES = 1e-9
FIT_COMPONENT_DOT = 1 - 1e-9


@pytest.fixture(scope="module")
def many_files(tmp_path_factory) -> Path:
    """32 short videos in 8 files: several bundles and keys for the combine, still a quick job."""
    root = tmp_path_factory.mktemp("many")
    synthetic.generate(str(root), videos=32, shards=8, seed=9, min_frames=30, max_frames=45)
    return root


@pytest.mark.parametrize("fanout, workers", [(1, ONE_WORKER), (16, ONE_WORKER), (16, TWO_WORKERS)])
def test_fit_with_and_without_combine_fanout_equals_one_process_fit(many_files, tmp_path, fanout, workers):
    dims = {"rgb": 8, "audio": 8}
    out = tmp_path / "fit"
    fit = preprocess.run(["--input", str(many_files / "*.tfrecord"), "--output", str(out), "--stage", "fit",
                          "--features", "rgb,audio", "--pca-dims", "rgb=8,audio=8", "--combine-fanout", str(fanout)]
                         + workers, save_main_session=False)
    assert fit["stage"] == "fit" and json.loads((out / "fit_summary.json").read_text()) == fit
    assert not (out / "shards").exists() and not (out / "summary.json").exists()  # pass 1 only
    assert json.loads((out / "config.json").read_text())["combine_fanout"] == fanout

    # the reference: every frame of every record, decoded and added in this process, one accumulator per feature
    acc = {name: MomentAccumulator(d) for name, d in (("rgb", 1024), ("audio", 128))}
    for path in sorted(many_files.glob("*.tfrecord")):
        for _, payload in read_records(str(path)):
            record = decode_sequence_example(payload)
            for name in acc:
                acc[name].add(record.features(name))
    want = fit_whitening_set(acc, dims=dims)
    got = WhiteningSet.load(out / "whitening.npz")
    assert fit["whitening"]["frames"] == {name: a.count for name, a in acc.items()}
    for name, k in dims.items():
        g, w = got[name], want[name]
        assert g.count == w.count and g.dims == w.dims == k
        np.testing.assert_allclose(g.mean, w.mean, rtol=0, atol=FIT_ATOL_MEAN)
        np.testing.assert_allclose(g.eigenvalues, w.eigenvalues, rtol=FIT_RTOL_EIGENVALUES)
        np.testing.assert_allclose(g.shrinkage, w.shrinkage, rtol=FIT_RTOL_EIGENVALUES)
        dots = np.abs(np.sum(g.components * w.components, axis=1))
        assert dots.min() >= FIT_COMPONENT_DOT, dots


def test_fit_then_write_stages_equal_stage_all(raw, tmp_path):
    common = ["--input", str(raw / "val/*.tfrecord"), "--features", "rgb,audio", "--pca-dims", "rgb=16,audio=8"]
    whole, staged = tmp_path / "all", tmp_path / "staged"
    summary = preprocess.run(common + ["--output", str(whole)] + ONE_WORKER, save_main_session=False)
    fit = preprocess.run(common + ["--output", str(staged), "--stage", "fit"] + ONE_WORKER, save_main_session=False)
    assert not (staged / "shards").exists()
    staged_summary = preprocess.run(common + ["--output", str(staged), "--stage", "write"] + ONE_WORKER,
                                    save_main_session=False)

    assert sha256(staged / "whitening.npz") == sha256(whole / "whitening.npz")
    assert fit["whitening"] == summary["whitening"] == staged_summary["whitening"]  # the fit facts carried over
    assert summary["whitening"]["fitted"] is True
    ignore = ("seconds", "stage", "stage_seconds", "output")
    assert {k: v for k, v in summary.items() if k not in ignore} == {
        k: v for k, v in staged_summary.items() if k not in ignore}
    assert (summary["stage"], staged_summary["stage"]) == ("all", "write")

    rows, staged_rows = shard_rows(whole, ("rgb", "audio")), shard_rows(staged, ("rgb", "audio"))
    assert len(rows) == 8 and set(rows) == set(staged_rows)
    for vid, v in rows.items():
        s = staged_rows[vid]
        assert v.num_frames == s.num_frames
        for field in ("labels", "segment_start_times", "segment_labels", "segment_scores"):
            np.testing.assert_array_equal(getattr(v, field), getattr(s, field))
        for name in ("rgb", "audio"):
            np.testing.assert_array_equal(v.features[name], s.features[name])

    # a repeated write stage replaces the shards and keeps the whitening; the fit stage clears stale pass-2 outputs
    again = preprocess.run(common + ["--output", str(staged), "--stage", "write", "--num-shards", "2"] + ONE_WORKER,
                           save_main_session=False)
    assert again["written"] == 8 and len(list((staged / "shards").glob("*.parquet"))) == 2
    preprocess.run(common + ["--output", str(staged), "--stage", "fit"] + ONE_WORKER, save_main_session=False)
    assert not any((staged / part).exists() for part in ("shards", "dead_letter", "counts", "summary.json"))


# -- every kind of bad input reaches the dead letter -----------------------------------------------------------
def _sequence_example(video_id="bad0", labels=(1,), rgb_frames=3, audio_frames=None, rgb_bytes=1024,
                      context=None, id_key="id") -> bytes:
    import tensorflow as tf

    audio_frames = rgb_frames if audio_frames is None else audio_frames

    def frames(n, size):
        return tf.train.FeatureList(feature=[tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(size)]))
                                             for _ in range(n)])

    ctx = {id_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[video_id.encode()])),
           "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels)))}
    ctx.update(context or {})
    return tf.train.SequenceExample(
        context=tf.train.Features(feature=ctx),
        feature_lists=tf.train.FeatureLists(feature_list={"rgb": frames(rgb_frames, rgb_bytes),
                                                          "audio": frames(audio_frames, 128)})).SerializeToString()


def _good(index: int, frames: int = 20, segments=None, audio=True) -> bytes:
    rng = np.random.default_rng(index)
    rec = VideoRecord(id=f"ok{index:02d}", labels=np.array([index % 7, 10 + index], np.int32),
                      rgb=rng.integers(0, 256, (frames, 1024), dtype=np.uint8),
                      audio=rng.integers(0, 256, (frames, 128), dtype=np.uint8) if audio else None)
    if segments is not None:
        rec.segment_start_times = np.asarray(segments, np.int32)
        rec.segment_labels = np.full(len(segments), 3, np.int32)
        rec.segment_scores = np.ones(len(segments), np.float32)
    return encode_sequence_example(rec)


def _write(path: Path, payloads: list[bytes]) -> list[int]:
    """Write TFRecord frames; returns each record's byte offset (8 + 4 + payload + 4 bytes per record)."""
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for p in payloads:
            offsets.append(pos)
            f.write(frame_record(p))
            pos += 16 + len(p)
    return offsets


def test_every_bad_input_kind_is_dead_lettered_and_counted(tmp_path):
    import tensorflow as tf

    def int_feature(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    src = tmp_path / "in"
    src.mkdir()
    mixed = [
        ("ok", _good(0, segments=[0, 10, 40])),  # first record: the shards get segment columns; 1 rating past the end
        ("bad_frame_length", _sequence_example(rgb_bytes=1000)),
        ("frame_count_mismatch", _sequence_example(rgb_frames=5, audio_frames=4)),
        ("zero_frames", _sequence_example(rgb_frames=0)),
        ("label_out_of_range", _sequence_example(labels=(3, 5000))),
        ("segment_length_mismatch", _sequence_example(context={"segment_start_times": int_feature([0, 5]),
                                                               "segment_labels": int_feature([1])})),
        ("unparsable", b"\xff\x00 not a protocol buffer \x01"),
        ("legacy_2017_format", _sequence_example(id_key="video_id")),
        ("missing_feature", _good(1, audio=False)),
        ("ok", _good(2, frames=305)),  # cut to 300 frames, counted, written
        ("ok", _good(3)),
    ]
    mixed_offsets = _write(src / "a_mixed.tfrecord", [p for _, p in mixed])

    crc_payloads = [_good(10), _good(11), _good(12)]
    crc_offsets = _write(src / "b_bad_crc.tfrecord", crc_payloads)
    data = bytearray((src / "b_bad_crc.tfrecord").read_bytes())
    data[crc_offsets[1] + 12 + 100] ^= 0xFF  # damage the second payload: its data CRC fails, the third is intact
    (src / "b_bad_crc.tfrecord").write_bytes(bytes(data))

    trunc_offsets = _write(src / "c_truncated.tfrecord", [_good(20), _good(21), _good(22)])
    data = (src / "c_truncated.tfrecord").read_bytes()
    (src / "c_truncated.tfrecord").write_bytes(data[:trunc_offsets[2] + 500])

    # on a runner that reports no Beam metrics: every number below comes from the job's output files
    out = tmp_path / "out"
    summary = preprocess.run(["--input", str(src / "*.tfrecord"), "--output", str(out), "--features", "rgb,audio",
                              "--pca-dims", "8"] + ONE_WORKER, save_main_session=False,
                             test_pipeline=no_metrics_pipeline)
    assert summary["metrics"] is None and summary["metrics_agree"] is None
    assert {k: summary[k] for k in ("read", "written", "written_frames", "dead_lettered")} == counts_from_outputs(
        out)
    assert summary["shards_complete"] and set(summary["sources"]) >= {"read", "written", "dead_lettered"}

    good_ids = {"ok00", "ok02", "ok03", "ok10", "ok12", "ok20", "ok21"}
    reasons = [r for r, _ in mixed if r != "ok"] + ["bad_data_crc", "truncated"]
    assert summary["written"] == len(good_ids)
    assert summary["dead_lettered"] == {r: 1 for r in reasons}
    assert summary["read"] == len(mixed) + 3 + 3 == summary["written"] + summary["dead_lettered_total"]
    assert summary["invariant_holds"]
    assert (summary["truncated_records"], summary["truncated_frames"], summary["segments_past_end"]) == (1, 5, 1)

    expected = {(str(src / "a_mixed.tfrecord"), off, r) for (r, _), off in zip(mixed, mixed_offsets) if r != "ok"}
    expected |= {(str(src / "b_bad_crc.tfrecord"), crc_offsets[1], "bad_data_crc"),
                 (str(src / "c_truncated.tfrecord"), trunc_offsets[2], "truncated")}
    letters = dead_letters(out)
    assert {(d["source"], d["position"], d["reason"]) for d in letters} == expected
    assert all(d["message"] for d in letters)
    ids = {d["reason"]: d["id"] for d in letters}
    assert ids["label_out_of_range"] == "bad0" and ids["missing_feature"] == "ok01" and ids["unparsable"] is None

    written = shard_rows(out)
    assert set(written) == good_ids
    assert written["ok02"].num_frames == 300
    # the rating at 40 starts past the last of 20 frames: kept in the shard (the segment MAP counts it)
    np.testing.assert_array_equal(written["ok00"].segment_start_times, [0, 10, 40])
    np.testing.assert_array_equal(written["ok00"].segment_scores, [1, 1, 1])
    assert written["ok03"].segment_start_times.size == 0  # schema has segment columns; this video has none

    # the same job where the runner reports metrics: same summary numbers, and the metrics agree with them
    again = preprocess.run(["--input", str(src / "*.tfrecord"), "--output", str(tmp_path / "again"), "--features",
                            "rgb,audio", "--pca-dims", "8"] + ONE_WORKER, save_main_session=False)
    assert again["metrics_agree"] is True
    assert again["metrics"]["read_records"] == 17 and again["metrics"]["dead_lettered_truncated"] == 1
    numbers = ("read", "written", "written_frames", "dead_lettered", "truncated_records", "truncated_frames",
               "segments_past_end", "unwritten_segment_records", "invariant_holds", "shards_complete")
    assert {k: again[k] for k in numbers} == {k: summary[k] for k in numbers}


# -- the real 2018 video-level shards --------------------------------------------------------------------------

def test_real_video_level_shards_have_no_dead_letter(tmp_path):
    import tensorflow as tf

    out = tmp_path / "real"
    summary = preprocess.run(["--input", str(REAL_DATA / "*.tfrecord"), "--output", str(out), "--level", "video",
                              "--features", "rgb,audio"] + ONE_WORKER, save_main_session=False)
    assert (summary["read"], summary["written"], summary["dead_lettered_total"]) == (494, 494, 0)
    assert dead_letters(out) == []

    expected = {}
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64),
            "mean_rgb": tf.io.FixedLenFeature([1024], tf.float32),
            "mean_audio": tf.io.FixedLenFeature([128], tf.float32)}
    for raw in tf.data.TFRecordDataset(sorted(glob.glob(str(REAL_DATA / "*.tfrecord")))):
        ex = tf.io.parse_single_example(raw, spec)
        expected[ex["id"].numpy().decode()] = (tf.sparse.to_dense(ex["labels"]).numpy(), ex["mean_rgb"].numpy())
    ws = WhiteningSet.load(out / "whitening.npz")
    written = shard_rows(out, ("rgb", "audio"))
    assert len(written) == 494 and set(written) == set(expected)
    for vid, v in written.items():
        labels, mean_rgb = expected[vid]
        np.testing.assert_array_equal(v.labels, labels)
        # 494 videos span 493 rgb directions; audio keeps all 128
        assert v.num_frames == 1 and v.features["rgb"].shape == (1, 493) and v.features["audio"].shape == (1, 128)
        want = ws["rgb"].transform(mean_rgb[None], dtype=np.float64)
        np.testing.assert_allclose(v.features["rgb"], want, rtol=2e-3, atol=2e-2)
    assert shards.read_shard_info(shards.list_shards(str(out))[0]).level == "video"
    assert summary["whitening"]["warnings"]  # 494 frames < 1024 dims: the rank-deficient fit is reported


# -- pieces: the combiner, flag parsing, runner choice, error lines --------------------------------------------
@pytest.mark.parametrize("batch_frames", [1, 7, 10_000])
@pytest.mark.parametrize("split", [1, 3])
def test_moments_combiner_matches_numpy(batch_frames, split):
    rng = np.random.default_rng(batch_frames + split)
    videos = [VideoRecord(id=str(i), labels=np.zeros(0, np.int32),
                          rgb=rng.integers(0, 256, (int(rng.integers(1, 9)), 1024), dtype=np.uint8),
                          audio=rng.integers(0, 256, (1, 128), dtype=np.uint8)) for i in range(12)]
    videos = [v if v.audio.shape[0] == v.num_frames else VideoRecord(
        id=v.id, labels=v.labels, rgb=v.rgb, audio=np.repeat(v.audio, v.num_frames, 0)) for v in videos]
    fn = preprocess.MomentsCombineFn(("rgb", "audio"), batch_frames=batch_frames, blas_threads=None)
    import pickle

    parts = []
    for chunk in np.array_split(np.arange(len(videos)), split):
        acc = fn.create_accumulator()
        for i in chunk:
            acc = fn.add_input(acc, ("src", 0, videos[i]))
        parts.append(pickle.loads(pickle.dumps(fn.compact(acc))))  # as between workers
    moments = fn.extract_output(fn.merge_accumulators(parts))
    for name in ("rgb", "audio"):
        x = np.concatenate([v.features(name) for v in videos]).astype(np.float64)
        assert moments[name].count == x.shape[0]
        np.testing.assert_allclose(moments[name].mean, x.mean(0), atol=1e-12)
        np.testing.assert_allclose(moments[name].covariance(), np.cov(x, rowvar=False), atol=1e-10)


@pytest.mark.parametrize("text, features, expected", [
    (None, ("rgb",), None),
    ("512", ("rgb", "audio"), {"rgb": 512, "audio": 128}),
    ("64", ("rgb", "audio"), {"rgb": 64, "audio": 64}),
    ("rgb=256,audio=32", ("rgb", "audio"), {"rgb": 256, "audio": 32}),
    ("audio=32", ("rgb", "audio"), {"audio": 32}),
])
def test_pca_dims_flag(text, features, expected):
    assert preprocess.parse_pca_dims(text, features) == expected


@pytest.mark.parametrize("text, features", [("0", ("rgb",)), ("rgb=2000", ("rgb",)), ("audio=8", ("rgb",)),
                                            ("rgb=x", ("rgb",))])
def test_bad_pca_dims_flag(text, features):
    with pytest.raises(preprocess.FlagError):
        preprocess.parse_pca_dims(text, features)


@pytest.mark.parametrize("value, expected", [(None, "oas"), ("oas", "oas"), ("0", 0.0), ("0.25", 0.25),
                                             ("1.5", None), ("-0.1", None), ("ledoit", None)])
def test_shrinkage_flag(value, expected):
    argv = ["--input", "x.tfrecord", "--output", "out"] + ([] if value is None else ["--shrinkage", value])
    args, _ = preprocess.get_args_parser().parse_known_args(argv)
    if expected is None:
        with pytest.raises(preprocess.FlagError, match="--shrinkage"):
            preprocess.resolve_config(args)
    else:
        assert preprocess.resolve_config(args).shrinkage == expected


def test_default_runner_is_local_fnapi_and_dataflow_passes_through():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    local = job_options.make_pipeline_options([])
    assert isinstance(job_options.make_runner(local), FnApiRunner)  # never the Prism download
    direct = local.get_all_options()
    assert direct["direct_num_workers"] == (os.cpu_count() or 1)
    assert direct["direct_running_mode"] == ("multi_processing" if (os.cpu_count() or 1) > 1 else "in_memory")
    dataflow = job_options.make_pipeline_options(["--runner=DataflowRunner", "--project=p", "--region=r"])
    assert job_options.make_runner(dataflow) is None
    assert dataflow.get_all_options()["setup_file"] == str(job_options.REPO_ROOT / "setup.py")


def test_worker_environment_is_set_for_local_runs_and_restored(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own choice is kept
    with job_options.worker_environment(job_options.make_pipeline_options([])):
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1" and os.environ["OMP_NUM_THREADS"] == "3"
        assert str(job_options.REPO_ROOT) in os.environ["PYTHONPATH"].split(os.pathsep)
    assert "OPENBLAS_NUM_THREADS" not in os.environ and os.environ["OMP_NUM_THREADS"] == "3"
    with job_options.worker_environment(job_options.make_pipeline_options(["--runner=DataflowRunner"])):
        assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_entry_point_errors_are_one_line(raw, tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert preprocess.main(list(argv) + ONE_WORKER) != 0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        return err

    assert "matches no file" in fails("--input", str(tmp_path / "none/*.tfrecord"), "--output", str(tmp_path / "o"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "junk.npz" in fails("--input", str(raw / "val/*.tfrecord"), "--output", str(tmp_path / "o"),
                               "--whitening", str(tmp_path / "junk.npz"))
    from pipeline.whitening import fit_whitening_set

    rgb_only = fit_whitening_set({"rgb": MomentAccumulator.of(np.random.default_rng(0).normal(size=(50, 1024)))},
                                 dims=4)
    rgb_only.save(tmp_path / "rgb.npz")
    assert "'audio'" in fails("--input", str(raw / "val/*.tfrecord"), "--output", str(tmp_path / "o"),
                              "--features", "rgb,audio", "--whitening", str(tmp_path / "rgb.npz"))
    assert "--pca-dims" in fails("--input", str(raw / "val/*.tfrecord"), "--output", str(tmp_path / "o"),
                                 "--pca-dims", "8", "--whitening", str(tmp_path / "rgb.npz"))
    assert not (tmp_path / "o").exists()  # refused before touching the output directory
    junk = tmp_path / "junk.tfrecord"
    _write(junk, [b"\xff\x00 junk", b"\xff\xff"])
    err = fails("--input", str(junk), "--output", str(tmp_path / "o"))
    assert "usable frames" in err and "unparsable 2" in err
    # stages: write needs statistics, fit must not be given any
    assert "--stage write needs --whitening" in fails("--input", str(raw / "val/*.tfrecord"), "--output",
                                                      str(tmp_path / "empty"), "--stage", "write")
    assert "--stage fit" in fails("--input", str(raw / "val/*.tfrecord"), "--output", str(tmp_path / "o"),
                                  "--stage", "fit", "--whitening", str(tmp_path / "rgb.npz"))
    assert "--combine-fanout" in fails("--input", str(raw / "val/*.tfrecord"), "--output", str(tmp_path / "o"),
                                       "--combine-fanout", "-1")
    assert not (tmp_path / "empty").exists()


def test_duplicate_video_ids_are_reported_with_examples(raw, tmp_path, capsys):
    """The same input file given twice: every record is written (which copy is right is the user's call), and the
    summary counts the repeated ids with examples and says so."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    first = sorted((raw / "train").glob("*.tfrecord"))[0]
    shutil.copy(first, src / "a.tfrecord")
    shutil.copy(first, src / "b.tfrecord")
    ids = [decode_sequence_example(r).id for _, r in read_records(str(first))]
    summary = preprocess.run(["--input", str(src / "*.tfrecord"), "--output", str(tmp_path / "out"),
                              "--pca-dims", "8"] + ONE_WORKER, save_main_session=False)
    assert summary["written"] == 2 * len(ids)
    dup = summary["duplicate_ids"]
    assert dup["ids"] == len(set(ids)) and dup["extra_rows"] == len(ids)
    assert set(dup["examples"]) <= set(ids) and all(n == 2 for n in dup["examples"].values())
    assert len(dup["examples"]) == min(5, len(set(ids)))
    printed = preprocess.format_summary(summary)
    assert f"{len(set(ids))} video ids occur in more than one record" in printed
    clean = preprocess.run(["--input", str(first), "--output", str(tmp_path / "clean"), "--pca-dims", "8"]
                           + ONE_WORKER, save_main_session=False)
    assert clean["duplicate_ids"] == {"ids": 0, "extra_rows": 0, "examples": {}}


# -- the write pass whitens several videos per matmul ------------------------------------------------------------
def _whiten_bundle(fn: "preprocess.WhitenVideoFn", elements: list) -> tuple[list, list, dict]:
    """One bundle through the DoFn by hand: rows, dead letters and the summed counts, finish_bundle included."""
    from apache_beam.pvalue import TaggedOutput
    from apache_beam.utils.windowed_value import WindowedValue

    rows, dead, counts = [], [], {}
    fn.start_bundle()
    outputs = [out for element in elements for out in fn.process(element) or []]
    outputs += list(fn.finish_bundle())
    for out in outputs:
        tag = out.tag if isinstance(out, TaggedOutput) else None
        value = out.value if isinstance(out, TaggedOutput) else out
        if isinstance(value, WindowedValue):
            value = value.value
        if tag == preprocess.DEAD_LETTER:
            dead.append(value)
        elif tag == preprocess.COUNTS:
            counts.update({k: v for k, v in value.items() if k != "step"})
        else:
            rows.append(value)
    return rows, dead, counts


@pytest.mark.parametrize("batch_frames,ahead", [(1, 0), (25, 0), (10**6, 0), (1, 1), (25, 1), (25, 3)])
def test_batched_whitening_equals_one_video_at_a_time_and_keeps_dead_letters(tmp_path, batch_frames, ahead):
    """Batches of videos per matmul, whitened inline or on the background thread ``ahead`` batches ahead: the same
    rows, bit for bit, in input order, and the same dead letters as one video at a time inline."""
    rng = np.random.default_rng(3)
    codes = {"small": 140, "large": 200, "overflows": 255}  # dequantized: ~0.2, ~1.1, ~2.0
    elements = []
    for i in range(9):
        kind = ("small", "large", "overflows")[i % 3]
        frames = int(rng.integers(5, 40))
        rgb = np.full((frames, 1024), codes[kind], np.uint8)
        rgb[:, :3] = rng.integers(100, 150, (frames, 3))  # videos differ inside the frames too
        elements.append(("in.tfrecord", i, VideoRecord(id=f"{kind}{i}", labels=np.array([i], np.int32), rgb=rgb)))
    path = tmp_path / "whitening.npz"
    fit_whitening_set({"rgb": MomentAccumulator.of(rng.standard_normal((2000, 1024)))}, dims=None).save(path)

    def run(batch, ahead):
        fn = preprocess.WhitenVideoFn(str(path), ("rgb",), "float16", False, batch_frames=batch, ahead=ahead)
        fn.setup()
        # |x| * 4e4 passes float16 (65504) below ~1.6 and overflows at 2.0
        fn.use_affine({"rgb": (np.zeros(1024), np.eye(1024) * 4e4)})
        try:
            return _whiten_bundle(fn, elements)
        finally:
            fn.teardown()

    rows, dead, counts = run(batch_frames, ahead)
    want_rows, want_dead, want_counts = run(1, 0)
    assert [r["id"] for r in rows] == [f"{k}{i}" for i, k in enumerate(["small", "large", "overflows"] * 3)
                                      if k != "overflows"]
    assert [r["id"] for r in rows] == [r["id"] for r in want_rows]
    for got, want in zip(rows, want_rows):
        assert got["rgb"] == want["rgb"] and got["num_frames"] == want["num_frames"]
        frames = np.frombuffer(got["rgb"], "<f2").reshape(got["num_frames"], 1024)
        record = elements[int(got["id"][-1])][2]
        np.testing.assert_allclose(frames, record.features("rgb") * 4e4, rtol=1e-3)
    assert [(d["id"], d["reason"], d["position"]) for d in dead] == [
        (f"overflows{i}", preprocess.NOT_STORABLE, i) for i in (2, 5, 8)] == [
        (d["id"], d["reason"], d["position"]) for d in want_dead]
    assert counts["written_records"] == 6 and counts["written_frames"] == sum(r["num_frames"] for r in rows)
    assert counts["written_frames"] == want_counts["written_frames"]
    assert (counts.get("whiten_wait_seconds", 0.0) > 0) == (ahead > 0)


def test_a_failed_background_matmul_fails_its_bundle_and_the_next_bundle_runs(tmp_path):
    path = tmp_path / "whitening.npz"
    rng = np.random.default_rng(0)
    fit_whitening_set({"rgb": MomentAccumulator.of(rng.standard_normal((2000, 1024)))}, dims=8).save(path)
    fn = preprocess.WhitenVideoFn(str(path), ("rgb",), "float32", False, batch_frames=10, ahead=2)
    fn.setup()
    videos = [("in.tfrecord", i, VideoRecord(id=f"v{i}", labels=np.array([0], np.int32),
                                              rgb=rng.integers(0, 256, (12, 1024), dtype=np.uint8)))
              for i in range(5)]
    try:
        good = WhiteningSet.load(path)["rgb"]
        fn.use_affine({"rgb": (good.mean, good.projection[:512])})  # (T, 1024) @ (512, 8) cannot multiply
        with pytest.raises(ValueError, match="matmul"):
            _whiten_bundle(fn, videos)
        fn.use_affine({"rgb": (good.mean, good.projection)})
        rows, dead, counts = _whiten_bundle(fn, videos)
    finally:
        fn.teardown()
    assert [r["id"] for r in rows] == [f"v{i}" for i in range(5)] and not dead
    assert counts["written_records"] == 5
    assert fn.executor is None  # teardown stopped the background thread


@pytest.mark.parametrize("level", ["frame", "video"])
def test_whitened_rows_match_the_float64_whitening_of_the_dequantized_frames(tmp_path, level):
    """The write pass whitens uint8 codes in the codes' domain (dequantize and center in one pass, the scale folded
    into the projection) and float features as they are: both agree with ``Whitening.transform`` in float64 on
    the dequantized values to float32 accuracy."""
    rng = np.random.default_rng(5)
    codes = rng.normal(128, 30, (3000, 1024)).clip(0, 255).astype(np.uint8)
    frames = dequantize(codes)
    path = tmp_path / "whitening.npz"
    fit_whitening_set({"rgb": MomentAccumulator.of(frames)}, dims=100).save(path)
    videos = []
    for i, (a, b) in enumerate([(0, 700), (700, 1500), (1500, 3000)]):
        rgb = codes[a:b] if level == "frame" else frames[a:b].mean(0, keepdims=True)
        videos.append(("in.tfrecord", i, VideoRecord(id=f"v{i}", labels=np.array([i], np.int32), rgb=rgb)))
    fn = preprocess.WhitenVideoFn(str(path), ("rgb",), "float32", False, batch_frames=2048, ahead=1)
    fn.setup()
    try:
        rows, dead, _ = _whiten_bundle(fn, videos)
    finally:
        fn.teardown()
    whitening = WhiteningSet.load(path)["rgb"]
    assert not dead and [r["id"] for r in rows] == ["v0", "v1", "v2"]
    for row, (_, _, record) in zip(rows, videos):
        got = np.frombuffer(row["rgb"], np.float32).reshape(row["num_frames"], 100)
        want = whitening.transform(record.features("rgb"), np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("batch_rows", [2, 8])  # 2: row groups made of several record batches
def test_row_groups_hold_whole_rows_of_at_least_the_target_bytes_and_lose_nothing(batch_rows):
    """RowsToRowGroupsFn: every table but a bundle's last holds >= row_group_bytes of feature blobs, no table
    holds a row more than it needs, and the rows come out whole, in order, under the shards' schema."""
    schema = shards.shard_schema({"rgb": 4, "audio": 2}, dtype="float16", has_segments=False, level="frame",
                                 whitening_sha256="0" * 64)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        t = int(rng.integers(1, 30))
        rows.append({"id": f"v{i}", "labels": [i % 5], "num_frames": t,
                     "rgb": rng.standard_normal((t, 4)).astype(np.float16).tobytes(),
                     "audio": rng.standard_normal((t, 2)).astype(np.float16).tobytes()})
    blob = [len(r["rgb"]) + len(r["audio"]) for r in rows]
    target = 1000
    fn = preprocess.RowsToRowGroupsFn(schema, target, batch_rows)
    fn.start_bundle()
    tables = [t for r in rows for t in fn.process(r)]
    (last,) = [w.value for w in fn.finish_bundle()]
    assert len(tables) >= 2 and all(t.schema.equals(schema) for t in tables + [last])
    start = 0
    for t in tables:
        sizes = blob[start:start + t.num_rows]
        assert sum(sizes) >= target and sum(sizes[:-1]) < target
        start += t.num_rows
    assert 0 < sum(blob[start:]) < target and last.num_rows == len(rows) - start
    out = [row for t in tables + [last] for row in t.to_pylist()]
    assert out == rows


@pytest.mark.parametrize("beam_args,flag,cores,want", [
    (["--direct_num_workers", "1"], None, 2, 1),  # a spare core: the matmul runs on a background thread
    (["--direct_num_workers", "2"], None, 2, 0),  # the other worker has it
    (["--direct_num_workers", "2"], None, 4, 1),
    ([], None, 2, 0),  # local default: one worker per core
    (["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/t"], None, 64, 0),
    (["--direct_num_workers", "2"], 3, 2, 3),  # given: kept
])
def test_whiten_ahead_is_on_only_where_each_worker_has_a_spare_core(monkeypatch, beam_args, flag, cores, want):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    argv = ["--input", "x.tfrecord", "--output", "out"] + ([] if flag is None else ["--whiten-ahead", str(flag)])
    args, rest = preprocess.get_args_parser().parse_known_args(argv + beam_args)
    opts = job_options.make_pipeline_options(rest)
    assert preprocess.resolve_whiten_ahead(preprocess.resolve_config(args), opts).whiten_ahead == want


def test_one_video_per_matmul_makes_a_videos_rows_independent_of_its_bundle(tmp_path):
    """--whiten-batch-frames 1: a video's stored bytes are the same whatever videos share its bundle (how a
    multi-worker runner cuts bundles changes from run to run), which makes the shards reproducible bit for bit."""
    rng = np.random.default_rng(11)
    codes = rng.normal(128, 30, (4000, 1024)).clip(0, 255).astype(np.uint8)
    path = tmp_path / "whitening.npz"
    fit_whitening_set({"rgb": MomentAccumulator.of(dequantize(codes))}, dims=None).save(path)

    def video(i, frames):
        return ("in.tfrecord", i, VideoRecord(id=f"v{i}", labels=np.array([0], np.int32),
                                              rgb=rng.integers(0, 256, (frames, 1024), dtype=np.uint8)))

    target = video(0, 157)
    neighbours = [[], [video(1, 300), video(2, 41)], [video(3, 2000), video(4, 7), video(5, 222)]]
    fn = preprocess.WhitenVideoFn(str(path), ("rgb",), "float16", False, batch_frames=1, ahead=1)
    fn.setup()
    try:
        stored = set()
        for others in neighbours:
            for order in (others + [target], [target] + others):
                rows, _, _ = _whiten_bundle(fn, order)
                stored.add(next(r["rgb"] for r in rows if r["id"] == "v0"))
    finally:
        fn.teardown()
    assert len(stored) == 1
