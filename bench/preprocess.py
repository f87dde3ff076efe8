"""Throughput of beam_jobs.preprocess: against a tf.data reader, against its compute bound, 1 vs 2 local workers.

    .venv/bin/python bench/preprocess.py                  # 3000 generated videos (~450k frames), 1 and 2 workers
    .venv/bin/python bench/preprocess.py --videos 300 --workers 1 --skip-memory-and-reads

Everything runs on the same generated frame-level TFRecords (rgb only, whitened to all 1024 dims, float16 shards),
in one invocation, and prints markdown tables:

1. Beam job frames/s per local worker count. Each job is two fresh processes, ``python -m beam_jobs.preprocess
   --stage fit`` then ``--stage write`` (as a launcher that allows one pipeline per job runs it; interpreter and
   Beam start-up count, as for a user; workers no longer import TensorFlow, the record codec is
   ``pipeline.records``); the whole job is the two together. The write pass (read, decode, whiten, write Parquet),
   as the job's summary times it, is set against the baseline: TFRecordDataset + parse_single_sequence_example +
   decode_raw in a parallel tf.data map (its threads may use every core), then the same float32 whitening in numpy
   with the job's fitted statistics (no Parquet written). Every worker count runs with each ``--whiten-ahead``
   value given (0: the whitening matmul on the bundle's thread, one core per worker; 1, the job's default: on a
   background thread of the worker, overlapping decoding, encoding and the Parquet write as tf.data's parallel map
   overlaps parsing). Also per CPU second: the write process's CPU time with
   its worker processes against the baseline's CPU time over all its threads. "Fixed cost" is a whole job
   (``--stage all``) on a 2-video input: process, pipeline and worker start-up.
2. The compute bound: the whitening matmul alone, ``x @ projection`` in float32 with one BLAS thread, on the same
   frames (decoded beforehand, not timed), in the batches the job forms (consecutive videos stacked to
   ``WHITEN_BATCH_FRAMES`` rows), and one video at a time as the baseline does; the write pass's frames/s per worker
   as a fraction of the first. Where
   the rest of a worker's time goes, two ways: (a) the job's own per-step timers (``stage_seconds`` of its
   summary: read, decode, whiten, encode, summed over workers and divided by the worker count here; the rest of the
   pass is Beam's Parquet write, the runner and start-up); (b) the same steps run outside Beam, one process, on the
   same records: read (TFRecord framing + CRC), decode (protobuf -> uint8), dequantize, center, matmul, encode
   (float16 + finiteness check + bytes) and write (Beam's own rows -> Arrow conversion, then Parquet, snappy).
3. Scaling: 2 workers against 1 for the fit pass, the write pass (also net of its start-up, measured on the
   2-video job: the ratio a corpus large enough to amortize start-up tends to) and the whole job, with the CPU share each job got
   (CPU seconds / wall seconds) and the load average: on a machine whose cores are taken by other work the second
   worker finds no free core, and each local pipeline starts its worker processes afresh (seconds each).
4. Peak memory of the fit path (read framing -> decode -> MomentsCombineFn -> fit), each size in a fresh
   subprocess: tracemalloc peak of Python/numpy allocations after start-up, and peak RSS (VmHWM of the child
   itself; ``ru_maxrss`` would carry over the parent's). It must not grow with the number of videos: the
   accumulator is O(D^2) and frames are added in fixed-size batches.
5. Read throughput into float32 numpy: the Parquet shards (``pipeline.shards.iter_videos``) vs the TFRecords
   (tf.data parse + dequantize, and this project's pure-Python framing + codec reader).
BLAS runs one thread per process throughout, as in the Beam workers. Times are wall-clock unless a column says CPU;
on a shared machine compare the CPU columns and the load average printed with them.
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

OUTSIDE_STEPS = ("read", "decode", "dequantize", "center", "matmul", "encode", "write")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=3000,
                   help="videos to generate (default 3000, ~450k frames: about 8 minutes on a busy 2-core machine)")
    p.add_argument("--shards", type=int, default=16, help="TFRecord files to generate (the unit of parallelism)")
    p.add_argument("--min-frames", type=int, default=30)
    p.add_argument("--max-frames", type=int, default=270, help="mean length (min + max) / 2 = 150 frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2", help="comma-separated local Beam worker counts")
    p.add_argument("--whiten-ahead", default="0,1",
                   help="comma-separated values of the job's --whiten-ahead, each run with every worker count "
                        "(0: the matmul on the bundle's thread; 1, the default: on a background thread)")
    p.add_argument("--features", default="rgb")
    p.add_argument("--skip-memory-and-reads", action="store_true", help="leave out tables 4 and 5")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    p.add_argument("--fit-memory", nargs="+", default=None, help=argparse.SUPPRESS)  # internal: child mode
    return p


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_job(raw: str, out: str, workers: int, extra: list[str]) -> dict:
    """One ``python -m beam_jobs.preprocess`` process: its wall time, CPU time (the process and its waited-for
    children, which include the local worker processes) and summary (``summary.json``, or ``fit_summary.json``)."""
    cmd = [sys.executable, "-m", "beam_jobs.preprocess", "--input", f"{raw}/*.tfrecord", "--output", out,
           "--direct_num_workers", str(workers), *extra]
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{done.stderr[-3000:]}")
    name = "fit_summary.json" if "fit" in extra else "summary.json"
    return {"wall": wall, "cpu": cpu, "summary": json.loads(Path(out, name).read_text())}


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


def tfdata_baseline(files: list[str], whitening_path: str) -> tuple[int, float, float]:
    """(frames, seconds, CPU seconds of every thread) of tf.data parsing plus numpy whitening with the given
    statistics."""
    from pipeline.whitening import WhiteningSet

    w = WhiteningSet.load(whitening_path)["rgb"]
    mean, proj = w.mean.astype(np.float32), w.projection.astype(np.float32)
    next(_tf_frames(files[:1]))  # TensorFlow warm-up outside the timing
    frames, start, cpu = 0, time.perf_counter(), time.process_time()
    for x in _tf_frames(files):
        y = (x - mean) @ proj  # (T, dims)
        frames += y.shape[0]
    return frames, time.perf_counter() - start, time.process_time() - cpu


def outside_beam_steps(files: list[str], whitening_path: str, out_path: str) -> dict:
    """The write pass's steps run one after another in this process on the same records, each timed alone, with
    the job's own code (``pipeline.tfrecord``, ``pipeline.records``, ``shards.record_to_row``, Beam's rows -> Arrow
    conversion with the job's batch sizes, ``pyarrow.parquet.ParquetWriter``), and the compute bound: per file, the
    videos' float32 frames decoded first (not timed), then ``x @ projection`` for each video timed alone.

    Returns {"frames", "dims", "seconds": {step: s}, "matmul_alone": s, "matmul_alone_cpu": s}."""
    import pyarrow.parquet as pq
    from beam_jobs.preprocess import ROW_GROUP_BYTES, WHITEN_BATCH_FRAMES, RowsToRowGroupsFn
    from pipeline import shards
    from pipeline.records import decode_record
    from pipeline.tfrecord import iter_records
    from pipeline.whitening import WhiteningSet

    w = WhiteningSet.load(whitening_path)["rgb"]
    mean, proj = w.mean.astype(np.float32), w.projection.astype(np.float32)
    schema = shards.shard_schema({"rgb": w.output_dim}, dtype="float16", has_segments=False, level="frame",
                                 whitening_sha256="0" * 64)
    to_table = RowsToRowGroupsFn(schema, ROW_GROUP_BYTES)
    to_table.start_bundle()
    writer = pq.ParquetWriter(out_path, schema, **shards.writer_options(schema))
    seconds = dict.fromkeys(OUTSIDE_STEPS, 0.0)
    clock = time.perf_counter
    frames, matmul_alone, matmul_cpu, matmul_batched = 0, 0.0, 0.0, 0.0
    for path in files:
        decoded = []
        with open(path, "rb") as f:
            records = iter_records(f, verify=True, on_error="yield", source=path)
            while True:
                marks = [clock()]
                item = next(records, None)
                marks.append(clock())
                if item is None:
                    seconds["read"] += marks[1] - marks[0]
                    break
                record = decode_record(item[1], level="frame")
                marks.append(clock())
                x = record.features("rgb")
                marks.append(clock())
                centered = x - mean
                marks.append(clock())
                white = centered @ proj
                marks.append(clock())
                row = shards.record_to_row(record, {"rgb": white}, "float16", has_segments=False)
                marks.append(clock())
                for table in to_table.process(row):
                    writer.write_table(table)
                marks.append(clock())
                for step, a, b in zip(OUTSIDE_STEPS, marks, marks[1:]):
                    seconds[step] += b - a
                frames += x.shape[0]
                decoded.append(x)
        cpu = time.process_time()
        for x in decoded:  # the compute bound: the matmul alone, nothing else between two of them
            a = clock()
            x @ proj
            matmul_alone += clock() - a
        matmul_cpu += time.process_time() - cpu
        for batch in _job_batches(decoded, WHITEN_BATCH_FRAMES):  # the same, in the batches the job's WhitenVideoFn forms
            a = clock()
            batch @ proj
            matmul_batched += clock() - a
    a = clock()
    for windowed in to_table.finish_bundle():
        writer.write_table(windowed.value)
    writer.close()
    seconds["write"] += clock() - a
    return {"frames": frames, "dims": w.output_dim, "seconds": seconds, "matmul_alone": matmul_alone,
            "matmul_alone_cpu": matmul_cpu, "matmul_batched": matmul_batched, "batch_frames": WHITEN_BATCH_FRAMES}


def _job_batches(videos: list[np.ndarray], limit: int):
    """Consecutive videos stacked until ``limit`` rows, as ``WhitenVideoFn`` stacks them (within one file: a bundle
    here is a file's records)."""
    pending, rows = [], 0
    for x in videos:
        pending.append(x)
        rows += x.shape[0]
        if rows >= limit:
            yield np.concatenate(pending)
            pending, rows = [], 0
    if pending:
        yield np.concatenate(pending)


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


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM). Not ``ru_maxrss``: Linux carries that over from the
    parent through fork and exec, so a child of this bench would report the parent's peak (TensorFlow loaded)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_memory_child(files: list[str]) -> None:
    """Child mode: run the fit path over ``files`` and print its memory use as JSON."""
    import tracemalloc

    from beam_jobs.preprocess import MomentsCombineFn
    from pipeline.records import decode_sequence_example
    from pipeline.tfrecord import read_records
    from pipeline.whitening import fit_whitening_set

    decode_sequence_example(next(read_records(files[0]))[1])  # imports and builds the protobuf codec before measuring
    rss_before = _peak_rss_mb()
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
    print(json.dumps({"videos": videos, "frames": frames, "tracemalloc_peak_mb": peak / 2**20,
                      "max_rss_mb": _peak_rss_mb(), "rss_before_mb": rss_before}))


def fit_memory(files: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fit-memory", *files]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fit memory child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main(args: argparse.Namespace) -> None:
    if args.fit_memory:
        fit_memory_child(args.fit_memory)
        return
    from pipeline import synthetic

    bench_start = time.perf_counter()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench_preprocess_")
    work = Path(args.work or tmp.name)
    raw = work / "raw"
    print(f"generating {args.videos} videos in {args.shards} files under {raw} ...", flush=True)
    gen = synthetic.generate(str(raw), videos=args.videos, shards=args.shards, seed=args.seed,
                             min_frames=args.min_frames, max_frames=args.max_frames)
    files = sorted(glob.glob(str(raw / "*.tfrecord")))
    total = gen["frames"]
    mb = sum(os.path.getsize(f) for f in files) / 2**20
    print(f"{args.videos} videos, {total} frames, {mb:.0f} MiB of TFRecords; cores: {os.cpu_count()}; "
          f"load average before: {_load()}\n", flush=True)

    tiny = work / "tiny"
    synthetic.generate(str(tiny), videos=2, shards=1, seed=args.seed + 1, min_frames=30, max_frames=30)
    jobs, fixed, startup, loads, fits = {}, {}, {}, {}, {}
    for a in [int(x) for x in args.whiten_ahead.split(",")]:
        for w in [int(x) for x in args.workers.split(",")]:
            out, ahead = str(work / f"out{w}_{a}"), ["--whiten-ahead", str(a)]
            if w not in fits:  # the fit pass does not whiten: one per worker count, its whitening reused
                print(f"beam job, {w} worker(s): --stage fit ...", flush=True)
                fits[w] = (_run_job(str(raw), out, w, ["--features", args.features, "--stage", "fit"]),
                           str(Path(out, "whitening.npz")))
            fit, fitted = fits[w]
            print(f"beam job, {w} worker(s), --whiten-ahead {a}: --stage write ...", flush=True)
            write = _run_job(str(raw), out, w, ["--features", args.features, "--stage", "write",
                                                "--whitening", fitted, *ahead])
            jobs[w, a] = {"fit": fit, "write": write, "wall": fit["wall"] + write["wall"],
                          "cpu": fit["cpu"] + write["cpu"]}
            loads[w, a] = _load()
            tiny_job = _run_job(str(tiny), str(work / f"tiny_out{w}_{a}"), w, ["--features", args.features, *ahead])
            fixed[w, a], startup[w, a] = tiny_job["wall"], tiny_job["summary"]["seconds"]["write"]
    first = min(jobs)
    out = str(work / f"out{first[0]}_{first[1]}")
    whitening = fits[first[0]][1]
    print("tf.data baseline ...", flush=True)
    base_frames, base_s, base_cpu = tfdata_baseline(files, whitening)
    assert base_frames == total, (base_frames, total)
    base_fps = base_frames / base_s
    print("the write pass's steps outside Beam ...", flush=True)
    outside = outside_beam_steps(files, whitening, str(work / "outside.parquet"))
    assert outside["frames"] == total, (outside["frames"], total)
    steps, matmul_s, batched_s = outside["seconds"], outside["matmul_alone"], outside["matmul_batched"]
    per_video_fps, bound_cpu_fps = total / matmul_s, total / outside["matmul_alone_cpu"]
    bound_fps = total / batched_s  # the job whitens in these batches: its compute bound

    print("\n### 1. Preprocessing throughput (frames/s, higher is better)\n")
    print("Each job is two processes, `--stage fit` then `--stage write` (whole job = both; the fit, which "
          "does not whiten, runs once per worker count and each --whiten-ahead's write uses its whitening). "
          "\"write pass\" is "
          "the pass as the job's summary times it (pipeline build, run and finalize, without interpreter start-up "
          "and imports); CPU s is the write process's CPU time with its worker processes; the tf.data baseline's "
          "CPU s counts all of its threads.\n")
    print("| run | fit job s | write job s | whole job s | fixed cost s (2-video job) | job frames/s | "
          "write pass s | write-pass frames/s | write pass / tf.data | write job CPU s | frames per CPU s | "
          "per CPU s / tf.data |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_per_cpu = total / base_cpu
    for (w, a), job in jobs.items():
        s = job["write"]["summary"]
        assert s["written_frames"] == total and s["invariant_holds"] and s["shards_complete"], s
        write_fps = total / s["seconds"]["write"]
        per_cpu = total / job["write"]["cpu"]
        print(f"| Beam FnApiRunner, {w} worker(s), whiten ahead {a} | {job['fit']['wall']:.1f} | "
              f"{job['write']['wall']:.1f} | {job['wall']:.1f} | {fixed[w, a]:.1f} | {total / job['wall']:,.0f} | {s['seconds']['write']:.1f} | "
              f"{write_fps:,.0f} | {write_fps / base_fps:.2f} | {job['write']['cpu']:.1f} | {per_cpu:,.0f} | "
              f"{per_cpu / base_per_cpu:.2f} |")
    print(f"| tf.data parse + numpy whitening (baseline, no write) | | | | | | {base_s:.1f} | {base_fps:,.0f} | "
          f"1.00 | {base_cpu:.1f} | {base_per_cpu:,.0f} | 1.00 |")

    print("\n### 2. Write pass per worker against the compute bound (the whitening matmul alone)\n")
    print(f"Compute bound: `x @ projection`, float32 (N, 1024) @ (1024, {outside['dims']}), one BLAS thread, "
          f"same frames, in the job's batches (videos stacked to >= {outside['batch_frames']} frames): {bound_fps:,.0f} "
          f"frames/s of wall time ({batched_s:.1f} s for {total} frames). One video per matmul (the tf.data "
          f"baseline's way): {per_video_fps:,.0f} frames/s ({matmul_s:.1f} s; {bound_cpu_fps:,.0f} frames per CPU "
          f"second).\n")
    print("Percentages of the write pass's wall time per worker. With whiten ahead 0 every step runs on the bundle's "
          "thread; with whiten ahead 1 the whitening matmul runs on the background thread, beside the "
          "others, and \"waiting\" is the bundle's thread idle until a matmul is done; rest = the bundle's thread "
          "outside the timed steps.\n")
    print("| run | write-pass frames/s per worker | / compute bound | read % | decode % | dequantize + center % | "
          "whiten % | waiting for whiten % | encode % | rest: Parquet write + runner + start-up % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (w, a), job in jobs.items():
        s = job["write"]["summary"]
        per_worker_s = s["seconds"]["write"]  # wall time of the pass; each of w workers had this much
        fps = total / (per_worker_s * w)
        own = {k: v / w for k, v in s["stage_seconds"].items()}  # per worker
        on_bundle_thread = ("read", "decode", "center", "whiten_wait" if a else "whiten", "encode")
        rest = per_worker_s - sum(own.get(k, 0.0) for k in on_bundle_thread)
        cells = " | ".join(f"{100 * own.get(k, 0.0) / per_worker_s:.0f}"
                           for k in ("read", "decode", "center", "whiten", "whiten_wait", "encode"))
        print(f"| Beam, {w} worker(s), whiten ahead {a} (the job's step timers) | {fps:,.0f} | "
              f"{fps / bound_fps:.2f} | {cells} | {100 * rest / per_worker_s:.0f} |")
    outside_total = sum(steps.values())
    print(f"| the steps outside Beam, one process (below) | {total / outside_total:,.0f} | "
          f"{total / outside_total / bound_fps:.2f} | "
          + " | ".join(f"{100 * v / outside_total:.0f}" for v in (
              steps["read"], steps["decode"], steps["dequantize"] + steps["center"], steps["matmul"], 0.0,
              steps["encode"])) + f" | {100 * steps['write'] / outside_total:.0f} (write only) |")
    print("\nThe same steps outside Beam, one process, same records (whiten = dequantize + center + matmul):\n")
    print("| step | seconds | frames/s | % of the steps |")
    print("|---|---:|---:|---:|")
    for k in OUTSIDE_STEPS:
        print(f"| {k} | {steps[k]:.2f} | {total / steps[k]:,.0f} | {100 * steps[k] / outside_total:.0f} |")
    print(f"| all steps, no Beam | {outside_total:.2f} | {total / outside_total:,.0f} | 100 |")

    if len(jobs) > 1:
        print("\n### 3. Scaling: local workers against 1 (same corpus)\n")
        print("CPU share = the job's CPU seconds (with its worker processes) / its wall seconds: how many cores it "
              "got; 2 workers can only scale where the second worker finds a free core.\n")
        print("Start-up = the write pass of the 2-video job (pipeline build, worker processes, finalize: what does "
              "not grow with the corpus); \"net of start-up\" divides what is left of the two write passes, the "
              "speed-up a corpus large enough to amortize start-up tends to.\n")
        print("Each worker count against 1 worker with the same --whiten-ahead.\n")
        print("| workers | whiten ahead | fit pass s | write pass s | write pass start-up s | whole job s | "
              "fit speed-up | write speed-up | write speed-up net of start-up | whole-job speed-up | "
              "CPU share, whole job | load average (1/5/15 min) after the job |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for (w, a), job in jobs.items():
            one = min(k for k in jobs if k[1] == a)
            base = jobs[one]
            f1, w1 = base["fit"]["summary"]["seconds"]["fit"], base["write"]["summary"]["seconds"]["write"]
            fs, ws = job["fit"]["summary"]["seconds"]["fit"], job["write"]["summary"]["seconds"]["write"]
            net = (w1 - startup[one]) / max(ws - startup[w, a], 1e-9)
            print(f"| {w} | {a} | {fs:.1f} | {ws:.1f} | {startup[w, a]:.1f} | {job['wall']:.1f} | {f1 / fs:.2f} | "
                  f"{w1 / ws:.2f} | {net:.2f} | {base['wall'] / job['wall']:.2f} | "
                  f"{job['cpu'] / job['wall']:.2f} | {loads[w, a]} |")

    if not args.skip_memory_and_reads:
        print("\n### 4. Peak memory of the fit path (read -> decode -> MomentsCombineFn -> fit)\n")
        print("| files | videos | frames | tracemalloc peak MiB | peak RSS MiB | peak RSS before the fit MiB |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n in sorted({1, len(files)}):
            m = fit_memory(files[:n])
            print(f"| {n} | {m['videos']} | {m['frames']} | {m['tracemalloc_peak_mb']:.1f} | {m['max_rss_mb']:.0f} | "
                  f"{m['rss_before_mb']:.0f} |")

        print("\n### 5. Reading frames into float32 numpy (frames/s)\n")
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
    print(f"\nbench time {time.perf_counter() - bench_start:.0f} s; load average at the end: {_load()}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
