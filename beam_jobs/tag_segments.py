"""Segment tagging over a whole corpus with Beam's RunInference: the rows of ``model.tag_segments``, at scale.

    python -m beam_jobs.tag_segments --checkpoint runs/cma/best.pt --data 'DATA/test' --out tags/
        [--top-k 20] [--classes segment_label_ids.csv] [--scorer frames|context]
        [--min-batch-size 1] [--max-batch-size 32] [--share-model | --no-share-model] [--model-copies 1]
        [Beam options]

Steps: match the Parquet shards (in this process, so a bad ``--data`` fails before any worker starts) ->
``Reshuffle`` (spread the shards over workers) -> ``ReadVideos`` (one shard in, ``(id, frames (T, D))`` out,
truncated to the checkpoint's ``max_frames`` like the training loader) -> ``RunInference`` with a keyed
``SegmentTaggerModelHandler`` (loads the training checkpoint with ``model.evaluate.load_model``, CUDA when the
worker has it, and scores each batch with ``model.engine.segments.score_video_segments``) -> one row per
(segment, class) -> ``OUT/part-SSSSS-of-NNNNN.parquet`` with ``model.tag_segments.TAG_SCHEMA``
``(id string, start_time int32, class int32, score float32)``.

One model per worker VM: a Dataflow worker runs one SDK process per vCPU, and by default each would load its own
copy of the model (and, on a GPU worker, its own CUDA context). ``--share-model`` (the default on every runner but
the local single-process one) makes the handler a Beam "large model" (``share_model_across_processes()``): the
first SDK process that needs the model loads it (``model_copies()`` copies, 1 by default) into a
``apache_beam.utils.multi_process_shared.MultiProcessShared`` server that lives in that process, and every process
of the VM sends its batches there through a proxy (``SegmentTagger.tag``: the frames go in, plain
``(start_time, class, score)`` tuples come back). Locally the FnApiRunner's worker processes share a machine, so
a ``--direct_num_workers=N`` run loads the model once; ``--no-share-model`` loads it once per SDK process. The
price of sharing is one pickled copy of each batch's frames (B x T x D float32) per call and one process doing all
the VM's inference: right for a GPU (or a model too big for one copy per vCPU), while CPU workers with a small
model may tag faster with ``--no-share-model``. Batches are ``--min-batch-size``..``--max-batch-size`` videos
(Beam's ``BatchElements`` bounds).

Workers need torch (the ``tagging`` extra, setup.cfg): use the custom SDK container of ``Dockerfile``
(``--sdk_container_image``); ``--setup_file`` alone installs the core requirements only (README, "Dataflow").

The local CLI and this job produce the same rows on the same data (tests/test_tag_segments_beam.py): batching
differs, but the model runs in eval mode and every video (every window, for the ``frames`` scorer) is scored
independently of the others in its batch.

A shard that cannot be read is not fatal: it goes to ``OUT/dead_letter/dead-00000-of-00001.jsonl`` (source,
reason, message, and how many of its videos were tagged before the failure) and is counted. ``OUT/config.json``
holds the resolved flags, ``OUT/summary.json`` the counters (shards, videos, segments, rows, dead letters).
A rerun into the same ``OUT`` first deletes the previous tag files, dead letters and summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from beam_jobs import options as job_options
from beam_jobs.preprocess import FormatDeadLetterFn, counter_values, dead_letter
from pipeline import shards
from pipeline.errors import Yt8mError

METRICS_NAMESPACE = "yt8m_tag_segments"
DEAD_LETTER = "dead_letter"
UNREADABLE_SHARD = "unreadable_shard"
TAG_FILE_PREFIX = "part"

_LOGGER = logging.getLogger(__name__)


class TagJobError(Yt8mError):
    """The tagging job cannot run as asked (flags, checkpoint, data); ``main`` prints it as one line."""


# -- model handler ---------------------------------------------------------------------------------------------
class SegmentTagger:
    """What ``SegmentTaggerModelHandler.load_model`` returns: the eval-mode model on its device and the scoring
    settings, behind one method. When the model is shared across processes, RunInference hands the handler a
    proxy of this object and ``tag`` runs in the process that loaded it; its argument (the batch's frames) and
    result (plain ints and floats) are what crosses the process boundary, never the model or a tensor.

    Args:
        model: a ``model.networks.video_model`` module in eval mode, on ``device``.
        scorer, top_k, classes: as in ``model.engine.segments.score_video_segments``.
    """

    def __init__(self, model, scorer: str, top_k: int, classes: Sequence[int] | None):
        self.model = model
        self.scorer = scorer
        self.top_k = int(top_k)
        self.classes = classes

    def tag(self, batch: Sequence[np.ndarray]) -> list[list[tuple[int, int, float]]]:
        """Per video of ``batch`` (each (T_b, D) float32): ``[(start_time, class, score), ...]``."""
        import torch

        from model.engine.device import autocast
        from model.engine.segments import score_video_segments

        device = next(self.model.parameters()).device
        B, D = len(batch), batch[0].shape[1]
        T = max(len(frames) for frames in batch)
        x = np.zeros((B, T, D), np.float32)  # padded to the longest video of the batch, as the local loader does
        mask = np.zeros((B, T), bool)
        for b, frames in enumerate(batch):
            x[b, :len(frames)] = frames
            mask[b, :len(frames)] = True
        x_t = torch.from_numpy(x).to(device)  # (B, T, D)
        mask_t = torch.from_numpy(mask).to(device)  # (B, T)
        with autocast(device):
            return score_video_segments(self.model, x_t, mask_t, scorer=self.scorer, top_k=self.top_k,
                                        classes=self.classes)


class SegmentTaggerModelHandler(ModelHandler):
    """RunInference handler: frames (T, D) float32 -> ``PredictionResult(frames, [(start_time, class, score)])``.

    Wrap it in ``KeyedModelHandler`` to carry video ids through. The model is the one a ``model.train_video``
    checkpoint describes (its ``args`` say which head and backbone), rebuilt on the worker by
    ``model.evaluate.load_model`` on the first CUDA device when there is one (``device="auto"``).

    Args:
        checkpoint: path or fsspec URL (``gs://``) of a training checkpoint.
        scorer: a ``model.engine.segments.SCORERS`` name.
        top_k: classes kept per segment.
        classes: class ids the top-k is chosen among (None: all classes).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        min_batch_size, max_batch_size: videos per inference batch (Beam's ``BatchElements`` bounds).
        share_model: load the model once per worker VM and share it across the VM's SDK processes
            (``share_model_across_processes()``; Beam's ``large_model``) instead of once per process.
        model_copies: copies loaded per VM when shared (e.g. one per GPU); ignored without ``share_model``.
    """

    def __init__(self, checkpoint: str, scorer: str, top_k: int, classes: Sequence[int] | None = None,
                 device: str = "auto", min_batch_size: int = 1, max_batch_size: int = 32,
                 share_model: bool = True, model_copies: int = 1):
        if not 1 <= min_batch_size <= max_batch_size:
            raise ValueError(f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size}, {max_batch_size}")
        if model_copies < 1:
            raise ValueError(f"model_copies must be >= 1, got {model_copies}")
        # Beam shares a model across processes when large_model is set or model_copies is given.
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         large_model=bool(share_model), model_copies=int(model_copies) if share_model else None)
        self.checkpoint = str(checkpoint)
        self.scorer = scorer
        self.top_k = int(top_k)
        self.classes = None if classes is None else [int(c) for c in classes]
        self.device = device

    def load_model(self) -> SegmentTagger:
        from model.engine.device import resolve_device
        from model.evaluate import load_model

        model, _ = load_model(self.checkpoint, resolve_device(self.device))
        return SegmentTagger(model, self.scorer, self.top_k, self.classes)

    def run_inference(self, batch: Sequence[np.ndarray], model: SegmentTagger,
                      inference_args: Optional[dict] = None) -> Iterable[PredictionResult]:
        # ``model`` is the SegmentTagger itself, or (shared across processes) a proxy of it: one call either way.
        tags = model.tag(list(batch))
        return [PredictionResult(frames, video_tags) for frames, video_tags in zip(batch, tags)]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(int(frames.nbytes) for frames in batch)  # the default pickles the whole batch to measure it

    def get_metrics_namespace(self) -> str:
        return f"{METRICS_NAMESPACE}_inference"


# -- DoFns -----------------------------------------------------------------------------------------------------
class ReadVideosFn(beam.DoFn):
    """Shard path (str) -> ``(video id, frames (T, D) float32)`` per video, the features concatenated per frame in
    ``features`` order and cut to the first ``max_frames``; tagged ``dead_letter``: a dict for a video without
    frames, and for a shard (or the rest of one) that cannot be read or has other feature dims than the model.
    Counts ``shards_read``, ``videos_read``, ``frames_truncated``.

    Args:
        features: feature columns, e.g. ("rgb",) or ("rgb", "audio").
        feature_dim: D the model takes (the checkpoint's ``feature_dim``).
        max_frames: frames kept per video (the checkpoint's training value).
    """

    def __init__(self, features: Sequence[str], feature_dim: int, max_frames: int):
        self.features = tuple(features)
        self.feature_dim = int(feature_dim)
        self.max_frames = int(max_frames)

    def setup(self):
        self.shards_read = Metrics.counter(METRICS_NAMESPACE, "shards_read")
        self.videos_read = Metrics.counter(METRICS_NAMESPACE, "videos_read")
        self.frames_truncated = Metrics.counter(METRICS_NAMESPACE, "frames_truncated")

    def process(self, path: str) -> Iterator:
        row = 0  # index of the next video in this shard
        try:
            for video in shards.iter_videos(path, features=self.features, columns=[]):
                frames = np.concatenate([video.features[f] for f in self.features], axis=1)  # (T, D)
                if frames.shape[1] != self.feature_dim:
                    raise shards.ShardSchemaError(f"{path} has {frames.shape[1]}-dim frames of "
                                                  f"{'+'.join(self.features)}; the model takes {self.feature_dim}")
                row += 1
                if len(frames) == 0:
                    yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                        path, row - 1, "zero_frames", "a video without frames has no segment", video.id))
                    continue
                if len(frames) > self.max_frames:
                    self.frames_truncated.inc(len(frames) - self.max_frames)
                    frames = frames[:self.max_frames]
                self.videos_read.inc()
                yield video.id, frames
        except (Yt8mError, OSError, pa.ArrowException) as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                path, row, UNREADABLE_SHARD, f"{type(e).__name__}: {e} (its first {row} videos were read)"))
            return
        self.shards_read.inc()


class TagRowsFn(beam.DoFn):
    """``(video id, PredictionResult(frames, [(start_time, class, score), ...]))`` -> one row dict per entry, in
    ``TAG_SCHEMA`` order. Counts ``videos_tagged``, ``segments_tagged``, ``rows``."""

    def setup(self):
        self.videos = Metrics.counter(METRICS_NAMESPACE, "videos_tagged")
        self.segments = Metrics.counter(METRICS_NAMESPACE, "segments_tagged")
        self.rows = Metrics.counter(METRICS_NAMESPACE, "rows")

    def process(self, element) -> Iterator[dict]:
        video_id, result = element
        tags = result.inference
        self.videos.inc()
        self.segments.inc(len({start for start, _, _ in tags}))
        self.rows.inc(len(tags))
        for start, cls, score in tags:
            yield {"id": video_id, "start_time": int(start), "class": int(cls), "score": float(score)}


# -- pipeline --------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    from model.engine.segments import DEFAULT_SCORER, SCORERS

    p = argparse.ArgumentParser(
        prog="python -m beam_jobs.tag_segments", description=__doc__.splitlines()[0],
        epilog="Any other --flag is a Beam pipeline option (e.g. --runner=DataflowRunner --project=P --region=R "
               "--temp_location=gs://B/tmp --sdk_container_image=IMAGE (built from Dockerfile, EXTRA=tagging), "
               "GPU workers with --dataflow_service_options="
               "'worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver', or "
               "--direct_num_workers=4 for the local runner).")
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a model.train_video run (or gs://)")
    p.add_argument("--data", required=True, help="shards to tag: a preprocess output dir, glob or gs:// path")
    p.add_argument("--out", required=True, help="output directory for the Parquet tag files (local or gs://)")
    p.add_argument("--top-k", type=int, default=20, help="classes kept per segment")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class ids to tag (segment_label_ids.csv format); default: all model classes, as "
                        "model.tag_segments does for its Parquet rows (this job writes no Class,Segments CSV)")
    p.add_argument("--scorer", choices=SCORERS, default=DEFAULT_SCORER, help="see model.engine.segments")
    p.add_argument("--min-batch-size", type=int, default=1,
                   help="fewest videos per inference batch (Beam's BatchElements lower bound)")
    p.add_argument("--max-batch-size", "--batch-size", dest="max_batch_size", type=int, default=32,
                   help="most videos per inference batch (Beam's BatchElements upper bound; --batch-size is an "
                        "alias)")
    p.add_argument("--share-model", action=argparse.BooleanOptionalAction, default=None,
                   help="one model per worker VM, shared by its SDK processes (Beam's large_model); default: on, "
                        "except on the local runner with a single in-process worker, which has nothing to share")
    p.add_argument("--model-copies", type=int, default=1,
                   help="copies of the shared model per worker VM (e.g. the GPUs per worker); needs --share-model")
    p.add_argument("--device", default="auto", help="auto (CUDA on GPU workers), cpu, cuda, cuda:N")
    p.add_argument("--num-shards", type=int, default=0, help="tag files to write; 0: the runner decides")
    return p


def check_inputs(args: argparse.Namespace) -> tuple[list[str], dict, list[int] | None]:
    """Validate flags, checkpoint and shards here, before any worker starts: (shard paths, training args, class
    restriction or None). The checkpoint is read once, on CPU, for its args and shapes."""
    import torch

    from model.engine.checkpoint import CheckpointError
    from model.evaluate import load_model
    from model.engine.segments import read_class_ids

    if args.top_k < 1:
        raise TagJobError(f"--top-k must be >= 1, got {args.top_k}")
    if not 1 <= args.min_batch_size <= args.max_batch_size:
        raise TagJobError(f"need 1 <= --min-batch-size <= --max-batch-size, got {args.min_batch_size} and "
                          f"{args.max_batch_size}")
    if args.model_copies < 1:
        raise TagJobError(f"--model-copies must be >= 1, got {args.model_copies}")
    if args.model_copies > 1 and args.share_model is False:
        raise TagJobError("--model-copies needs --share-model: without it every SDK process loads its own model")
    try:
        _, train_args = load_model(args.checkpoint, torch.device("cpu"))
    except CheckpointError as e:
        raise TagJobError(str(e)) from None
    paths = shards.list_shards(args.data)
    features = tuple(train_args["features"].split(","))
    # Only the first footer is read here (a corpus has thousands of shards); ReadVideosFn checks every shard.
    info = shards.read_shard_info(paths[0])
    dim = sum(info.features.get(f, 0) for f in features)
    if dim != train_args["feature_dim"] or any(f not in info.features for f in features):
        raise TagJobError(f"{paths[0]} has {dict(info.features)} but the checkpoint was trained on "
                          f"{train_args['features']} with {train_args['feature_dim']} dims")
    classes = None
    if args.classes:
        classes = [int(c) for c in read_class_ids(args.classes)]
        if max(classes) >= int(train_args["num_classes"]):
            raise TagJobError(f"{args.classes} lists class {max(classes)}, but the model has "
                              f"{train_args['num_classes']}")
    return paths, train_args, classes


def build_pipeline(p: beam.Pipeline, paths: Sequence[str], handler: ModelHandler, features: Sequence[str],
                   feature_dim: int, max_frames: int, out: str, num_shards: int = 0) -> None:
    """Shards -> videos -> RunInference -> tag rows -> ``OUT/part-*.parquet``; unreadable shards ->
    ``OUT/dead_letter/``."""
    from model.tag_segments import TAG_SCHEMA

    read = (p
            | "ShardPaths" >> beam.Create(list(paths))
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadVideos" >> beam.ParDo(ReadVideosFn(features, feature_dim, max_frames)).with_outputs(
                DEAD_LETTER, main="videos"))
    _ = (read.videos
         | "ScoreSegments" >> RunInference(KeyedModelHandler(handler))
         | "ToTagRows" >> beam.ParDo(TagRowsFn())
         | "WriteTags" >> beam.io.WriteToParquet(
             _join(out, TAG_FILE_PREFIX), TAG_SCHEMA, file_name_suffix=".parquet", num_shards=num_shards,
             shard_name_template="-SSSSS-of-NNNNN", codec="snappy"))
    _ = (read[DEAD_LETTER]
         | "DeadLetterJson" >> beam.ParDo(FormatDeadLetterFn(METRICS_NAMESPACE))
         | "WriteDeadLetters" >> beam.io.WriteToText(
             _join(out, "dead_letter", "dead"), file_name_suffix=".jsonl", num_shards=1,
             shard_name_template="-SSSSS-of-NNNNN"))


def share_model_by_default(options: PipelineOptions) -> bool:
    """``--share-model``'s default: on, except on the local runner when its single worker runs in this process
    (``direct_running_mode=in_memory``), where a cross-process server would only add a proxy hop."""
    from apache_beam.options.pipeline_options import DirectOptions

    if not job_options.is_local(options):
        return True
    return options.view_as(DirectOptions).direct_running_mode != "in_memory"


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


def _prepare_output(out: str) -> None:
    """Remove the tag files, dead letters and summary of a previous run into ``out``."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    stale = fs.glob(posixpath.join(root, f"{TAG_FILE_PREFIX}-*.parquet"))
    stale += [posixpath.join(root, name) for name in ("dead_letter", "summary.json")
              if fs.exists(posixpath.join(root, name))]
    for path in stale:
        fs.rm(path, recursive=True)


def _write_json(path: str, value: dict) -> None:
    with fsspec.open(path, "w") as f:
        f.write(json.dumps(value, indent=1, sort_keys=True, default=str) + "\n")


def run(argv: Sequence[str] | None = None, save_main_session: bool = True,
        test_pipeline: Callable[[PipelineOptions], beam.Pipeline] | None = None) -> dict:
    """Run the job; returns the summary (also written to ``OUT/summary.json``).

    Args:
        argv: our flags and Beam options; default ``sys.argv[1:]``.
        save_main_session: pickle ``__main__``'s globals for the workers (Beam examples' convention).
        test_pipeline: a factory ``options -> beam.Pipeline`` instead of ``beam_jobs.options.new_pipeline``.
    """
    args, beam_args = get_args_parser().parse_known_args(argv)
    opts = job_options.make_pipeline_options(beam_args, save_main_session)
    paths, train_args, classes = check_inputs(args)
    if args.share_model is None:
        args.share_model = share_model_by_default(opts)
    features = tuple(train_args["features"].split(","))
    _prepare_output(args.out)
    config: dict[str, Any] = {**vars(args), "runner": job_options.runner_name(opts),
                              "beam_version": beam.__version__, "shards": len(paths), "features": features,
                              "max_frames": int(train_args["max_frames"]),
                              "num_classes": int(train_args["num_classes"]),
                              "tracked_classes": len(classes) if classes else int(train_args["num_classes"]),
                              "beam_options": opts.get_all_options(drop_default=True)}
    _write_json(_join(args.out, "config.json"), config)

    handler = SegmentTaggerModelHandler(args.checkpoint, args.scorer, args.top_k, classes, args.device,
                                        min_batch_size=args.min_batch_size, max_batch_size=args.max_batch_size,
                                        share_model=args.share_model, model_copies=args.model_copies)
    start = time.perf_counter()
    p = (test_pipeline or job_options.new_pipeline)(opts)
    build_pipeline(p, paths, handler, features, int(train_args["feature_dim"]), int(train_args["max_frames"]),
                   args.out, args.num_shards)
    result = p.run()
    state = result.wait_until_finish()
    if state is not None and state != PipelineState.DONE:
        raise TagJobError(f"the tagging pipeline ended in state {state}")
    counts = counter_values(result, METRICS_NAMESPACE) or {}  # None: the runner reports no metrics
    seconds = time.perf_counter() - start
    dead = {k[len("dead_lettered_"):]: v for k, v in sorted(counts.items()) if k.startswith("dead_lettered_")}
    summary = {"data": args.data, "out": args.out, "shards": len(paths),
               "shards_read": counts.get("shards_read", 0), "videos_read": counts.get("videos_read", 0),
               "videos_tagged": counts.get("videos_tagged", 0), "segments": counts.get("segments_tagged", 0),
               "rows": counts.get("rows", 0), "frames_truncated": counts.get("frames_truncated", 0),
               "dead_lettered": dead, "seconds": round(seconds, 3), "scorer": args.scorer}
    _write_json(_join(args.out, "summary.json"), summary)
    dead_text = ", ".join(f"{k} {v}" for k, v in dead.items()) or "none"
    print(f"tagged {summary['segments']} segments of {summary['videos_tagged']} videos from "
          f"{summary['shards_read']}/{len(paths)} shards: {summary['rows']} rows under {args.out}; "
          f"dead-lettered: {dead_text}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return job_options.run_job(run, argv)


if __name__ == "__main__":
    # Re-import under the package name so DoFns pickle as beam_jobs.tag_segments.X, importable on every worker.
    from beam_jobs.tag_segments import main as _package_main

    sys.exit(_package_main())
