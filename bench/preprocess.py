"""Throughput of beam_jobs.preprocess against a plain tf.data reader, fit memory, Parquet vs TFRecord reads.

    .venv/bin/python bench/preprocess.py                  # 400 generated videos (~60k frames), 1 and 2 workers
    .venv/bin/python bench/preprocess.py --videos 200 --workers 1

Everything runs on the same generated frame-level TFRecords, in one invocation, and prints markdown tables:

1. Beam job frames/s per local worker count, each job a fresh ``python -m beam_jobs.preprocess`` process (so
   interpreter, Beam and TensorFlow start-up count, as for a user): the whole job (fit + write) and its write pass
   alone (read, decode, whiten, write Parquet); against the baseline: TFRecordDataset + parse_single_sequence_example
   + decode_raw in a parallel tf.data map, then the same float32 whitening in numpy with the job's fitted statistics
   (no Parquet written). Ratio = Beam write pass / baseline. "Fixed cost" is the same job on a 2-video input:
   process, pipeline and worker start-up (each worker process imports TensorFlow for the record protos); the
   "net" column divides the frames by the job's time minus that cost, which is noisy when the two are close.
2. Peak memory of the fit path (read framing -> decode -> MomentsCombineFn -> fit), each size in a fresh
   subprocess: tracemalloc peak of Python/numpy allocations after start-up, and max RSS. It must not grow with the
   number of videos: the accumulator is O(D^2) and frames are added in fixed-size batches.
3. Read throughput into float32 numpy: the Parquet shards (``pipeline.shards.iter_videos``) vs the TFRecords
   (tf.data parse + dequantize, and this project's pure-Python framing + codec reader).
BLAS runs one thread per process throughout, as in the Beam workers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=400, help="videos to generate")
    p.add_argument("--shards", type=int, default=4, help="TFRecord files to generate")
    p.add_argument("--min-frames", type=int, default=30)
    p.add_argument("--max-frames", type=int, default=270, help="mean length (min + max) / 2 = 150 frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2", help="comma-separated local Beam worker counts")
    p.add_argument("--features", default="rgb")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    p.add_argument("--fit-memory", nargs="+", default=None, help=argparse.SUPPRESS)  # internal: child mode
    return p


def _run_job(raw: str, out: str, workers: int, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "beam_jobs.preprocess", "--input", f"{raw}/*.tfrecord", "--output", out,
           "--direct_num_workers", str(workers), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(Path(out, "summary.json").read_text())


def _tf_frames(files: list[str]):
    """Yield (T, 1024) float32 rgb matrices parsed by a parallel tf.data pipeline."""
    import tensorflow as tf

    def parse(raw):
        _, seq = tf.io.parse_single_sequence_example(
            raw, context_features={"id": tf.io.FixedLenFeature([], tf.string)},
            sequence_features={"rgb": tf.io.FixedLenSequenceFeature([], tf.string)})
        return tf.cast(tf.io.decode_raw(seq["rgb"], tf.uint8), tf.float32) * (4 / 255) + (4 / 512 - 2)

    ds = tf.data.TFRecordDataset(files, num_parallel_reads=len(files)).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    for x in ds.as_numpy_iterator():
        yield x


def tfdata_baseline(files: list[str], whitening_path: str) -> tuple[int, float]:
    """(frames, seconds) of tf.data parsing plus numpy whitening with the given statistics."""
    from pipeline.whitening import WhiteningSet

    w = WhiteningSet.load(whitening_path)["rgb"]
    mean, proj = w.mean.astype(np.float32), w.projection.astype(np.float32)
    next(_tf_frames(files[:1]))  # TensorFlow warm-up outside the timing
    frames, start = 0, time.perf_counter()
    for x in _tf_frames(files):
        y = (x - mean) @ proj  # (T, dims)
        frames += y.shape[0]
    return frames, time.perf_counter() - start


def read_parquet(out: str) -> tuple[int, float]:
    from pipeline.shards import iter_videos

    frames, start = 0, time.perf_counter()
    for v in iter_videos(out, features=("rgb",)):
        frames += v.features["rgb"].shape[0]
    return frames, time.perf_counter() - start


def read_tfrecord_tf(files: list[str]) -> tuple[int, float]:
    next(_tf_frames(files[:1]))
    frames, start = 0, time.perf_counter()
    for x in _tf_frames(files):
        frames += x.shape[0]
    return frames, time.perf_counter() - start


def read_tfrecord_python(files: list[str]) -> tuple[int, float]:
    from pipeline.records import decode_sequence_example
    from pipeline.tfrecord import read_records

    frames, start = 0, time.perf_counter()
    for path in files:
        for _, payload in read_records(path):
            frames += decode_sequence_example(payload).features("rgb").shape[0]
    return frames, time.perf_counter() - start


def fit_memory_child(files: list[str]) -> None:
    """Child mode: run the fit path over ``files`` and print its memory use as JSON."""
    import tracemalloc

    from beam_jobs.preprocess import MomentsCombineFn
    from pipeline.records import decode_sequence_example
    from pipeline.tfrecord import read_records
    from pipeline.whitening import fit_whitening_set

    decode_sequence_example(next(read_records(files[0]))[1])  # imports TensorFlow's protos before measuring
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    fn = MomentsCombineFn(("rgb",))
    acc, videos, frames = fn.create_accumulator(), 0, 0
    for path in files:
        for position, payload in read_records(path):
            record = decode_sequence_example(payload)
            acc = fn.add_input(acc, (path, position, record))
            videos, frames = videos + 1, frames + record.num_frames
    fit_whitening_set(fn.extract_output(acc))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"videos": videos, "frames": frames, "tracemalloc_peak_mb": peak / 2**20,
                      "max_rss_mb": rss / 1024, "rss_before_mb": rss_before / 1024}))


def fit_memory(files: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fit-memory", *files]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fit memory child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> None:
    if args.fit_memory:
        fit_memory_child(args.fit_memory)
        return
    from pipeline import synthetic

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench_preprocess_")
    work = Path(args.work or tmp.name)
    raw = work / "raw"
    print(f"generating {args.videos} videos in {args.shards} files under {raw} ...", flush=True)
    gen = synthetic.generate(str(raw), videos=args.videos, shards=args.shards, seed=args.seed,
                             min_frames=args.min_frames, max_frames=args.max_frames)
    files = sorted(glob.glob(str(raw / "*.tfrecord")))
    total = gen["frames"]
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    print(f"{args.videos} videos, {total} frames, {mb:.0f} MiB of TFRecords; cores: {os.cpu_count()}\n", flush=True)

    tiny = work / "tiny"
    synthetic.generate(str(tiny), videos=2, shards=1, seed=args.seed + 1, min_frames=30, max_frames=30)
    jobs, fixed = {}, {}
    for w in [int(x) for x in args.workers.split(",")]:
        print(f"beam job, {w} worker(s) ...", flush=True)
        jobs[w] = _run_job(str(raw), str(work / f"out{w}"), w, ["--features", args.features])
        fixed[w] = _run_job(str(tiny), str(work / f"tiny_out{w}"), w, ["--features", args.features])[0]
    first = min(jobs)
    out = str(work / f"out{first}")
    print("tf.data baseline ...", flush=True)
    base_frames, base_s = tfdata_baseline(files, str(Path(out, "whitening.npz")))
    assert base_frames == total, (base_frames, total)
    base_fps = base_frames / base_s

    print("\n### Preprocessing throughput (frames/s, higher is better)\n")
    print("| run | whole job s | fit pass s | write pass s | fixed cost s (2-video job) | job frames/s | "
          "job frames/s net of fixed cost | write-pass frames/s | write pass / tf.data |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, (wall, s) in jobs.items():
        assert s["written_frames"] == total and s["invariant_holds"], s
        write_fps = total / s["seconds"]["write"]
        net = f"{total / (wall - fixed[w]):,.0f}" if wall > fixed[w] else "n/a"
        print(f"| Beam FnApiRunner, {w} worker(s) | {wall:.1f} | {s['seconds']['fit']:.1f} | "
              f"{s['seconds']['write']:.1f} | {fixed[w]:.1f} | {total / wall:,.0f} | {net} | {write_fps:,.0f} | "
              f"{write_fps / base_fps:.2f} |")
    print(f"| tf.data parse + numpy whitening (baseline, no write) | | | {base_s:.1f} | | | | {base_fps:,.0f} | "
          f"1.00 |")

    print("\n### Peak memory of the fit path (read -> decode -> MomentsCombineFn -> fit)\n")
    print("| files | videos | frames | tracemalloc peak MiB | max RSS MiB | RSS before fit MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sorted({1, len(files)}):
        m = fit_memory(files[:n])
        print(f"| {n} | {m['videos']} | {m['frames']} | {m['tracemalloc_peak_mb']:.1f} | {m['max_rss_mb']:.0f} | "
              f"{m['rss_before_mb']:.0f} |")

    print("\n### Reading frames into float32 numpy (frames/s)\n")
    rows = [("Parquet shards (pipeline.shards.iter_videos, float16 -> float32)", read_parquet(out)),
            ("TFRecords, tf.data parse + decode_raw + dequantize", read_tfrecord_tf(files)),
            ("TFRecords, pipeline.tfrecord + pipeline.records (Python)", read_tfrecord_python(files))]
    parquet_fps = rows[0][1][0] / rows[0][1][1]
    sizes = [sum(os.path.getsize(f) for f in glob.glob(f"{out}/shards/*.parquet")) / 2**20, mb, mb]
    print("| reader | MiB on disk | frames | seconds | frames/s | Parquet / this |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, (frames, secs)), size in zip(rows, sizes):
        assert frames == total, (name, frames, total)
        print(f"| {name} | {size:.0f} | {frames} | {secs:.2f} | {frames / secs:,.0f} | "
              f"{parquet_fps / (frames / secs):.2f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
