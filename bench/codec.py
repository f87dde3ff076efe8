"""Record codec throughput: pipeline.records (own protobuf schema, no TensorFlow) against TensorFlow's parsers.

    .venv/bin/python bench/codec.py                          # 500 frame-level records of 300 frames + real shards
    .venv/bin/python bench/codec.py --records 100 --repeats 5

Everything runs in one invocation on the same serialized bytes, held in memory (no file reads in the timings),
one thread; each timing is the best of ``--repeats`` passes over all records. Decoders compared:

* this codec: ``pipeline.records.decode_sequence_example`` / ``decode_example`` -> ``VideoRecord`` (uint8 frame
  codes, float32 means), on ``pipeline.example_proto``; frames and means read in bulk with numpy;
* the same codec on its per-value path (bulk reads switched off: one Python step per frame / per float), to
  separate the gain of the bulk reads from that of the schema;
* the old codec path: ``tf.train.SequenceExample.FromString`` / ``tf.train.Example.FromString`` and the per-value
  reads (this module as it was before it left TensorFlow) -- the baseline, ratio 1.00;
* ``tf.io.parse_single_sequence_example`` / ``parse_single_example`` (eager, one record per call), frames through
  ``tf.io.decode_raw``, converted to numpy (``.numpy()``), as TensorFlow readers do.

Frame-level records: ``--distinct`` videos of ``pipeline.synthetic`` (with segment ratings) cycled to ``--records``
records of ``--frames`` frames, each with its own id. Video-level: the real shards in ``tests/data/yt8m_real``.
A second table times the encoder against ``tf.train`` messages built one per frame (the old encoder), and a
third the start-up cost: a fresh interpreter importing the codec and decoding one record.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import records  # noqa: E402
from pipeline.tfrecord import read_records  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=500, help="frame-level records")
    p.add_argument("--frames", type=int, default=300, help="frames per frame-level record")
    p.add_argument("--distinct", type=int, default=50, help="distinct generated videos the records cycle through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="passes per timing; the best one counts")
    p.add_argument("--real", default=str(ROOT / "tests" / "data" / "yt8m_real" / "*.tfrecord"),
                   help="video-level TFRecord files (glob)")
    return p


def frame_level_payloads(n: int, frames: int, distinct: int, seed: int) -> list[bytes]:
    from pipeline import synthetic

    ids = synthetic.make_ids(seed, n)
    videos = [synthetic.generate_video(seed, i, ids[i], segments=True, min_frames=frames, max_frames=frames).record
              for i in range(min(distinct, n))]
    out = []
    for i in range(n):
        rec = videos[i % len(videos)]
        rec = records.VideoRecord(id=ids[i], labels=rec.labels, rgb=rec.rgb, audio=rec.audio,
                                  segment_start_times=rec.segment_start_times, segment_labels=rec.segment_labels,
                                  segment_scores=rec.segment_scores)
        out.append(records.encode_sequence_example(rec))
    return out


@contextlib.contextmanager
def codec_path(protos=None, bulk: bool = True):
    """Run ``pipeline.records`` on other protobuf classes (``tf.train``) and/or without its bulk reads."""
    saved = records._protos, records._frames_in_bulk, records._float_values
    if protos is not None:
        records._protos = lambda: protos
    if not bulk:
        records._frames_in_bulk = lambda *args: None
        records._float_values = lambda float_list: np.asarray(float_list.value, dtype=np.float32)
    try:
        yield
    finally:
        records._protos, records._frames_in_bulk, records._float_values = saved


def tf_parse_frame_level(tf):
    context = {"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64),
               "segment_start_times": tf.io.VarLenFeature(tf.int64),
               "segment_labels": tf.io.VarLenFeature(tf.int64), "segment_scores": tf.io.VarLenFeature(tf.float32)}
    sequence = {"rgb": tf.io.FixedLenSequenceFeature([], tf.string),
                "audio": tf.io.FixedLenSequenceFeature([], tf.string)}

    def parse(payload: bytes):
        ctx, lists = tf.io.parse_single_sequence_example(payload, context_features=context,
                                                         sequence_features=sequence)
        return (ctx["id"].numpy(), ctx["labels"].values.numpy(), ctx["segment_start_times"].values.numpy(),
                ctx["segment_labels"].values.numpy(), ctx["segment_scores"].values.numpy(),
                tf.io.decode_raw(lists["rgb"], tf.uint8).numpy(), tf.io.decode_raw(lists["audio"], tf.uint8).numpy())
    return parse


def tf_parse_video_level(tf):
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64),
            "mean_rgb": tf.io.FixedLenFeature([1024], tf.float32),
            "mean_audio": tf.io.FixedLenFeature([128], tf.float32)}

    def parse(payload: bytes):
        p = tf.io.parse_single_example(payload, spec)
        return p["id"].numpy(), p["labels"].values.numpy(), p["mean_rgb"].numpy(), p["mean_audio"].numpy()
    return parse


def best_of(fn, payloads: list, repeats: int, path=contextlib.nullcontext) -> float:
    """Best wall seconds of ``repeats`` passes of ``fn`` over ``payloads``, each pass inside ``path()``."""
    best = float("inf")
    for _ in range(repeats):
        with path():
            start = time.perf_counter()
            for payload in payloads:
                fn(payload)
            best = min(best, time.perf_counter() - start)
    return best


def check_agreement(tf, frame_payloads: list[bytes], video_payloads: list[bytes]) -> None:
    """Every decoder must give the same arrays before any of them is timed."""
    parse_frames, parse_video = tf_parse_frame_level(tf), tf_parse_video_level(tf)
    for payload in frame_payloads[:50]:
        rec = records.decode_sequence_example(payload)
        with codec_path(tf.train, bulk=False):
            old = records.decode_sequence_example(payload)
        vid, labels, starts, seg_labels, scores, rgb, audio = parse_frames(payload)
        assert rec.id == old.id == vid.decode()
        for mine, theirs in ((rec.labels, labels), (rec.segment_start_times, starts),
                             (rec.segment_labels, seg_labels), (rec.segment_scores, scores), (rec.rgb, rgb),
                             (rec.audio, audio), (rec.rgb, old.rgb), (rec.audio, old.audio)):
            np.testing.assert_array_equal(mine, theirs)
    for payload in video_payloads:
        rec = records.decode_example(payload)
        with codec_path(tf.train, bulk=False):
            old = records.decode_example(payload)
        vid, labels, rgb, audio = parse_video(payload)
        assert rec.id == old.id == vid.decode()
        for mine, theirs in ((rec.labels, labels), (rec.rgb[0], rgb), (rec.audio[0], audio), (rec.rgb, old.rgb)):
            np.testing.assert_array_equal(mine, theirs)


def tf_encode_sequence_example(tf, rec: records.VideoRecord) -> bytes:
    """The old encoder: ``tf.train`` messages, one Feature per frame."""
    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(values, np.int64).tolist()))

    ctx = {"id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec.id.encode()])), "labels": ints(rec.labels)}
    if rec.has_segments:
        ctx.update(segment_start_times=ints(rec.segment_start_times),
                   segment_end_times=ints(np.asarray(rec.segment_start_times) + 5),
                   segment_labels=ints(rec.segment_labels),
                   segment_scores=tf.train.Feature(float_list=tf.train.FloatList(value=rec.segment_scores.tolist())))
    lists = {name: tf.train.FeatureList(feature=[tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[row.tobytes()])) for row in getattr(rec, name)]) for name in ("rgb", "audio")}
    return tf.train.SequenceExample(context=tf.train.Features(feature=ctx),
                                    feature_lists=tf.train.FeatureLists(feature_list=lists)
                                    ).SerializeToString(deterministic=True)


_FIRST_RECORD = {
    "pipeline.records": "from pipeline.records import decode_example; decode_example(payload)",
    "tensorflow (tf.train.Example.FromString)": "import tensorflow as tf; tf.train.Example.FromString(payload)",
}


def first_record_seconds(path: str, how: str) -> float:
    """Wall seconds of a fresh interpreter from start to one record decoded (interpreter start-up included)."""
    code = ("from pipeline.tfrecord import read_records\n"
            f"payload = next(read_records({path!r}))[1]\n{_FIRST_RECORD[how]}\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    print("$ " + " ".join([os.path.relpath(sys.executable, ROOT), "bench/codec.py", *sys.argv[1:]]), flush=True)
    print(f"generating {args.records} frame-level records of {args.frames} frames "
          f"({min(args.distinct, args.records)} distinct videos) ...", flush=True)
    frame_payloads = frame_level_payloads(args.records, args.frames, args.distinct, args.seed)
    files = sorted(glob.glob(args.real))
    video_payloads = [payload for path in files for _, payload in read_records(path)]
    if not video_payloads:
        raise SystemExit(f"no video-level records in {args.real}")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    print(f"{len(frame_payloads)} frame-level records ({sum(map(len, frame_payloads)) / 2**20:.0f} MiB), "
          f"{len(video_payloads)} real video-level records from {len(files)} files; tensorflow {tf.__version__}; "
          f"checking that every decoder agrees ...", flush=True)
    check_agreement(tf, frame_payloads, video_payloads)

    parse_frames, parse_video = tf_parse_frame_level(tf), tf_parse_video_level(tf)
    parse_frames(frame_payloads[0]), parse_video(video_payloads[0])  # TensorFlow's first-call cost, untimed

    def new():
        return contextlib.nullcontext()

    def per_value():
        return codec_path(None, bulk=False)

    def old():
        return codec_path(tf.train, bulk=False)

    rows = {
        "frame": [("pipeline.records (example_proto, bulk numpy reads)", records.decode_sequence_example, new),
                  ("pipeline.records, per-frame path (example_proto)", records.decode_sequence_example, per_value),
                  ("old path: tf.train.SequenceExample.FromString + per-frame reads",
                   records.decode_sequence_example, old),
                  ("tf.io.parse_single_sequence_example + decode_raw + .numpy()", parse_frames, new)],
        "video": [("pipeline.records (example_proto, bulk numpy reads)", records.decode_example, new),
                  ("pipeline.records, per-float path (example_proto)", records.decode_example, per_value),
                  ("old path: tf.train.Example.FromString + per-float reads", records.decode_example, old),
                  ("tf.io.parse_single_example + .numpy()", parse_video, new)],
    }
    frames_per = {"frame": args.frames, "video": 1}
    payloads = {"frame": frame_payloads, "video": video_payloads}
    titles = {"frame": f"frame-level SequenceExample, {len(frame_payloads)} synthetic records x {args.frames} frames "
                       f"(rgb + audio, segment ratings)",
              "video": f"video-level Example, {len(video_payloads)} real records (mean_rgb + mean_audio)"}
    for level in ("frame", "video"):
        print(f"timing {level} level ...", flush=True)
        times = [(name, best_of(fn, payloads[level], args.repeats, path)) for name, fn, path in rows[level]]
        baseline = times[2][1]
        n = len(payloads[level])
        print(f"\n### Decoding: {titles[level]}\n")
        print("| decoder | seconds | records/s | frames/s | speed vs old path |")
        print("|---|---:|---:|---:|---:|")
        for name, secs in times:
            print(f"| {name} | {secs:.3f} | {n / secs:,.0f} | {n * frames_per[level] / secs:,.0f} | "
                  f"{baseline / secs:.2f} |")

    print("\ntiming the encoder ...", flush=True)
    sample = [records.decode_sequence_example(p) for p in frame_payloads[:100]]
    assert all(records.encode_sequence_example(r) == tf_encode_sequence_example(tf, r) for r in sample[:20])
    enc = [("pipeline.records.encode_sequence_example (numpy-built frame lists)",
            lambda r: records.encode_sequence_example(r)),
           ("old: tf.train messages, one Feature per frame, SerializeToString(deterministic=True)",
            lambda r: tf_encode_sequence_example(tf, r))]
    enc_times = [(name, best_of(fn, sample, args.repeats)) for name, fn in enc]
    print(f"\n### Encoding: {len(sample)} frame-level records x {args.frames} frames (bytes identical)\n")
    print("| encoder | seconds | records/s | speed vs old |")
    print("|---|---:|---:|---:|")
    for name, secs in enc_times:
        print(f"| {name} | {secs:.3f} | {len(sample) / secs:,.0f} | {enc_times[1][1] / secs:.2f} |")

    print("\ntiming start-up ...", flush=True)
    startup = [(how, min(first_record_seconds(files[0], how) for _ in range(2))) for how in _FIRST_RECORD]
    print("\n### Start-up: fresh interpreter -> first video-level record decoded (best of 2)\n")
    print("| imports | seconds |")
    print("|---|---:|")
    for how, secs in startup:
        print(f"| {how} | {secs:.2f} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
