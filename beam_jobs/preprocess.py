"""YouTube-8M TFRecords -> PCA-whitened Parquet shards, with a dead letter for every unusable record.

    python -m beam_jobs.preprocess --input 'raw/train/*.tfrecord' --output data/train [--pca-dims 512]
    python -m beam_jobs.preprocess --input 'raw/validate/*.tfrecord' --output data/validate \\
        --whitening data/train/whitening.npz
    # one pipeline per invocation (template launchers): the same two passes as two jobs
    python -m beam_jobs.preprocess --stage fit --input 'raw/train/*.tfrecord' --output data/train
    python -m beam_jobs.preprocess --stage write --input 'raw/train/*.tfrecord' --output data/train

Two passes, run as two Beam pipelines one after the other from this process (``--stage all``, the default), or
one of them per invocation (``--stage fit`` / ``--stage write``):

* pass 1 ("fit", skipped with ``--whitening``): read -> decode -> per-feature ``MomentAccumulator`` combined
  globally -> ``OUT/moments.npz``; this process then fits the whitening and writes ``OUT/whitening.npz`` and
  ``OUT/fit_summary.json`` (the fit's part of the summary). The combine runs with ``--combine-fanout N``
  intermediate keys (default 16): each bundle pre-combines its frames, the partial accumulators (8 MB each for rgb)
  are merged on N keys first and only N of them on the final one, so no single worker merges one accumulator per
  bundle of a large corpus. Chan's merge is exact up to rounding in any order or tree shape.
* pass 2 ("write"): read -> decode -> whiten (statistics loaded once per worker in ``DoFn.setup``) -> Parquet
  shards under ``OUT/shards/``; unusable records -> ``OUT/dead_letter/``; per-bundle counts -> ``OUT/counts/``.
  ``--stage write`` takes the statistics from ``--whitening FILE`` or else from ``OUT/whitening.npz`` of an earlier
  ``--stage fit``, whose ``fit_summary.json`` it then folds into the summary. Where each worker has a spare
  core (a local run with at most half as many workers as cores; ``--whiten-ahead`` overrides), the whitening
  matmul runs on a background thread of the worker, overlapping the rest of the pass (``WhitenVideoFn``).

Why two pipelines rather than one with the fitted statistics as a side input: every shard's schema records the
SHA-256 of the whitening file and the whitened dims, and the shard sink (``ShardSink``) fixes its schema when the
pipeline is built, so the statistics must exist before pass 2 is built. Fitting in this process also turns a fit
that cannot be done (no valid frames) into a plain error message rather than a failed worker. The input is decoded
once per pass either way, which is cheaper than materializing decoded frames between the passes. On Dataflow this
means two jobs for a training split (``--stage fit``, then ``--stage write``) and one for validation/test splits.

Reading does not use ``ReadFromTFRecord``, which fails the whole job on one corrupt record: matched files are read
with ``pipeline.tfrecord`` (CRC32C-checked framing). Nothing is dropped silently; the invariant, checked in the
summary, is ``read = written + dead_lettered + excluded`` where "read" counts every intact TFRecord payload plus
every framing corruption found: a payload with a bad data CRC is one record, and a broken length field or a
truncation, which ends the readable part of its file, counts as one record too. Frames past 300 are cut and counted
(``truncated_frames``); rated segments that start past a video's last frame are kept in the shards (the official
segment MAP counts them) and counted (``segments_past_end``); neither is dead-lettered.

``--exclude-ids FILE`` (one video id per line, e.g. the ``--ids-out`` of ``python -m pipeline.split_overlap``) leaves
those videos out of both passes, right after decoding: they shape neither the whitening nor the shards. The launcher
copies the list to ``OUT/exclude_ids.txt`` (distinct ids, sorted), which the workers read as a side input
(``ExcludeVideos`` says why not in the DoFn); pass 2 writes one line per video left out to ``OUT/excluded/``, from
which the summary counts them ("excluded") and the listed ids no video had ("exclude_ids.never_seen").

The summary is computed from the job's own outputs, not from Beam metrics (Dataflow reports them eventually
consistently, other runners not at all): "written" and "written_frames" from the Parquet shards (footer row counts
and the ``num_frames`` column), "dead_lettered" from the lines of the dead-letter file, and "read" and the other
counts from ``OUT/counts/``, where every step writes one JSON line per bundle it processed (committed with the
bundle like any other output, so a retried bundle counts once). The same counts also go to Beam metrics; the
summary lists those beside, says where each number came from (``sources``) and whether the two agree. The count
lines carry each step's own time too (``stage_seconds``: read, decode, center, whiten, whiten_wait, encode; summed
over workers; with ``--whiten-ahead`` the whitening matmul runs on a background thread, beside the other steps, and
whiten_wait is the time the bundle's thread waited for it).

Outputs: ``OUT/whitening.npz``, ``OUT/fit_summary.json``, ``OUT/shards/part-SSSSS-of-NNNNN.parquet``,
``OUT/dead_letter/dead-00000-of-00001.jsonl`` (always written, empty when every record was usable; one JSON object
per line: source, position = byte offset of the record in its file, reason, message, id when known),
``OUT/counts/counts-00000-of-00001.jsonl``, with ``--exclude-ids`` ``OUT/exclude_ids.txt`` and
``OUT/excluded/excluded-00000-of-00001.jsonl`` (source, position, id per line), ``OUT/config.json`` (resolved flags
of the latest run, written first; ``fit_summary.json`` keeps those of the fit) and ``OUT/summary.json`` (counts,
written last). A rerun into the same ``OUT`` first deletes ``shards/``, ``dead_letter/``, ``counts/``,
``excluded/``, ``exclude_ids.txt`` and ``summary.json`` (a fitting run also the old whitening and its fit summary),
so old and new outputs never mix.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Sequence

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.window import GlobalWindows

from beam_jobs import options as job_options
from pipeline import shards
from pipeline.errors import RecordError, TFRecordCorruption, Yt8mError
from pipeline.records import (DEQUANT_BIAS, DEQUANT_SCALE, FEATURE_DIMS, VideoRecord, decode_record,
                              decode_sequence_example)
from pipeline.split_overlap import IdListError, read_id_list, write_id_list
from pipeline.tfrecord import iter_records, read_records
from pipeline.whitening import (RANK_RTOL, MomentAccumulator, WhiteningError, WhiteningSet, file_sha256,
                                fit_whitening_set, parse_shrinkage)

METRICS_NAMESPACE = "yt8m_preprocess"  # pass 2: the counts the summary reports
FIT_METRICS_NAMESPACE = "yt8m_preprocess_fit"  # pass 1 decodes the same records; kept apart so nothing counts twice
DEAD_LETTER = "dead_letter"
COUNTS = "counts"  # tag of the per-bundle count dicts (``BundleCounts``)
EXCLUDED = "excluded"  # tag of the videos left out by --exclude-ids, and their directory under OUT
EXCLUDE_IDS_FILE = "exclude_ids.txt"  # OUT's copy of the --exclude-ids list: distinct ids, sorted, one per line
STAGES = ("all", "fit", "write")
DEFAULT_COMBINE_FANOUT = 16
# Our own dead-letter reasons on top of RecordError's: video-level means are floats and may hold NaN or inf;
# a whitened value may overflow float16.
NON_FINITE = "non_finite"
NOT_STORABLE = "not_storable"
# Frames gathered before one MomentAccumulator.add: big enough for an efficient syrk, 16 MB of float32 at D = 1024.
FIT_BATCH_FRAMES = 4096
# Frames whitened by one matmul in pass 2: 8 MB of float32 at D = 1024; past ~1000 rows the kernel runs at full
# speed (bench/preprocess.py's "whitening matmul" rows).
WHITEN_BATCH_FRAMES = 2048
# Batches whose matmul runs on a background thread while the rows of earlier ones are encoded and written, where a
# worker has a spare core: one keeps the BLAS kernel busy (bench/preprocess.py, "whiten ahead"); more only holds
# more frames in memory.
SPARE_CORE_WHITEN_AHEAD = 1
# Parquet row groups of about 8 MiB uncompressed (~14 full-length float16 rgb videos): the unit model.data.video can
# hand to separate readers when there are fewer shards than readers.
ROW_GROUP_BYTES = 8 << 20

_LOGGER = logging.getLogger(__name__)


# -- errors ----------------------------------------------------------------------------------------------------
class PreprocessError(Yt8mError):
    """The preprocessing job cannot run as asked; ``main`` prints it as one line."""


class FlagError(PreprocessError):
    """Flags that contradict each other or name unknown features."""


class NoInputError(PreprocessError):
    """``--input`` matches no file."""


class WhiteningFileError(PreprocessError):
    """The ``--whitening`` file cannot be read."""


class DimsMismatchError(PreprocessError):
    """The whitening statistics do not fit the selected features."""


class FitError(PreprocessError):
    """Pass 1 found too little valid data to fit a whitening."""


class ExcludeIdsError(PreprocessError):
    """The ``--exclude-ids`` file cannot be read or holds a line that is not one video id."""


# -- configuration ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobConfig:
    """Resolved flags of one preprocessing run (written to ``OUT/config.json``).

    Args:
        input: file pattern of the TFRecords (local path, glob or gs:// URL).
        output: output directory.
        level: "frame" (SequenceExample per video) or "video" (Example with mean features, one time step).
        features: feature names, e.g. ("rgb",) or ("rgb", "audio").
        pca_dims: feature -> kept components; a feature not in it keeps all of its dims.
        whitening: path of existing statistics to reuse, or None to fit them (pass 1).
        dtype: storage dtype of whitened frames, "float16" or "float32".
        epsilon: variance floor, as a fraction of the mean eigenvalue (``pipeline.whitening``).
        mode: "pca" or "zca".
        shrinkage: "oas" or a fixed covariance shrinkage in [0, 1] (``pipeline.whitening``).
        num_shards: Parquet files to write; 0 lets the runner choose (no extra shuffle).
        stage: "all" (fit, then write), "fit" (pass 1 only) or "write" (pass 2 only).
        combine_fanout: intermediate keys of the moments combine; 0 or 1: none (one key merges everything).
        exclude_ids: text file of video ids (one per line) whose videos are neither fitted nor written, or None.
        whiten_ahead: pass 2's batches whitened ahead on a background thread per worker (``WhitenVideoFn``); 0: none;
            None: decided by ``resolve_whiten_ahead`` once the pipeline options are known.
        whiten_batch_frames: frames stacked into one whitening matmul in pass 2; 1: one video per matmul.
    """
    input: str
    output: str
    level: str = "frame"
    features: tuple[str, ...] = ("rgb",)
    pca_dims: dict | None = None
    whitening: str | None = None
    dtype: str = "float16"
    epsilon: float = 1e-4
    mode: str = "pca"
    num_shards: int = 0
    shrinkage: str | float = "oas"
    stage: str = "all"
    combine_fanout: int = DEFAULT_COMBINE_FANOUT
    exclude_ids: str | None = None
    whiten_ahead: int | None = None
    whiten_batch_frames: int = WHITEN_BATCH_FRAMES

    @property
    def fits(self) -> bool:
        """Whether this run fits the whitening (pass 1)."""
        return self.stage != "write" and self.whitening is None

    @property
    def writes(self) -> bool:
        """Whether this run writes the shards (pass 2)."""
        return self.stage != "fit"

    def path(self, *parts: str) -> str:
        return _join(self.output, *parts)


def parse_features(text: str) -> tuple[str, ...]:
    """"rgb,audio" -> ("rgb", "audio"); raises FlagError on unknown or repeated names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FEATURE_DIMS]
    if not names or unknown:
        raise FlagError(f"--features {text!r}: expected a comma-separated subset of {sorted(FEATURE_DIMS)}")
    if len(set(names)) != len(names):
        raise FlagError(f"--features {text!r} names a feature twice")
    return names


def parse_pca_dims(text: str | None, features: Sequence[str]) -> dict | None:
    """Resolve ``--pca-dims``: None keeps every dim; ``N`` keeps at most N per feature (min(N, D)); ``rgb=512,
    audio=64`` sets each feature (unnamed ones keep all dims)."""
    if text is None:
        return None
    text = text.strip()
    try:
        if "=" not in text:
            n = int(text)
            if n < 1:
                raise FlagError(f"--pca-dims must be positive, got {n}")
            return {name: min(n, FEATURE_DIMS[name]) for name in features}
        dims = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in features:
                raise FlagError(f"--pca-dims names {name!r}, which is not among --features {','.join(features)}")
            dims[name] = int(value)
    except ValueError:
        raise FlagError(f"--pca-dims {text!r}: expected N or name=N[,name=N]") from None
    for name, n in dims.items():
        if not 1 <= n <= FEATURE_DIMS[name]:
            raise FlagError(f"--pca-dims {name}={n}: must be between 1 and {FEATURE_DIMS[name]}")
    return dims


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m beam_jobs.preprocess", description=__doc__.splitlines()[0],
        epilog="Any other --flag is a Beam pipeline option (e.g. --runner=DataflowRunner --project=P "
               "--region=R --temp_location=gs://B/tmp, or --direct_num_workers=4 for the local runner).")
    p.add_argument("--input", required=True, help="TFRecord file pattern: local glob or gs:// pattern (quote it)")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--level", choices=("frame", "video"), default="frame",
                   help="frame: SequenceExample per video; video: Example with mean_rgb/mean_audio (1 time step)")
    p.add_argument("--features", default="rgb", help="rgb or rgb,audio (each whitened separately)")
    p.add_argument("--pca-dims", default=None,
                   help="components to keep: N (per feature, at most its dims) or rgb=512,audio=64; "
                        "default: all dims (whitening without reduction)")
    p.add_argument("--whitening", default=None,
                   help="reuse this whitening.npz (validation/test splits: the training split's); skips pass 1")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype of frames")
    p.add_argument("--epsilon", type=float, default=1e-4,
                   help="variance floor added before 1/sqrt, as a fraction of the mean eigenvalue (scale-free)")
    p.add_argument("--shrinkage", default="oas",
                   help="covariance shrinkage toward its mean eigenvalue before whitening: 'oas' (default: Oracle "
                        "Approximating Shrinkage, near 0 when frames far outnumber dims) or a number in [0, 1]")
    p.add_argument("--zca", action="store_true", help="ZCA whitening (rotate back to the input axes; all dims)")
    p.add_argument("--num-shards", type=int, default=0,
                   help="Parquet files to write; 0 (default) lets the runner decide, avoiding an extra shuffle")
    p.add_argument("--stage", choices=STAGES, default="all",
                   help="all: fit, then write (two pipelines); fit: pass 1 only, writes OUT/whitening.npz; write: "
                        "pass 2 only, with --whitening FILE or OUT/whitening.npz of an earlier --stage fit "
                        "(for launchers that allow one pipeline per job)")
    p.add_argument("--combine-fanout", type=int, default=DEFAULT_COMBINE_FANOUT,
                   help="intermediate keys of the fit's moments combine, so that no one worker merges the partial "
                        "moments of every bundle; 0 or 1: no fanout (default %(default)s)")
    p.add_argument("--exclude-ids", default=None, metavar="FILE",
                   help="text file of video ids, one per line ('#' comment lines and blank lines ignored; local or "
                        "gs://), e.g. the --ids-out of python -m pipeline.split_overlap: those videos are left out "
                        "of the whitening fit and of the shards, and counted in the summary")
    p.add_argument("--whiten-ahead", type=int, default=None,
                   help="batches of frames whose whitening matmul runs on a background thread of each worker while "
                        "the rows before them are encoded and written; 0: all on the bundle's thread, one core per "
                        "worker. Default: 1 where each worker has a second core to itself (a local run with at most "
                        "half as many --direct_num_workers as cores), else 0 (Dataflow: one SDK process per vCPU)")
    p.add_argument("--whiten-batch-frames", type=int, default=WHITEN_BATCH_FRAMES,
                   help="frames of consecutive videos whitened by one matmul (default %(default)s). A row's float32 "
                        "rounding depends on its batch, and with several workers the batches depend on how the "
                        "runner cuts bundles; 1 whitens every video on its own, so the shards are bit-identical "
                        "from run to run with any runner, at a few %% of the write pass's speed")
    return p


def resolve_config(args: argparse.Namespace) -> JobConfig:
    """Check the flags against each other and build the ``JobConfig``; raises ``FlagError``."""
    features = parse_features(args.features)
    pca_dims = parse_pca_dims(args.pca_dims, features)
    if args.zca and pca_dims and any(n != FEATURE_DIMS[f] for f, n in pca_dims.items()):
        raise FlagError("--zca keeps every dim (it rotates back to the input axes); drop --pca-dims")
    if args.num_shards < 0:
        raise FlagError(f"--num-shards must be >= 0, got {args.num_shards}")
    if args.combine_fanout < 0:
        raise FlagError(f"--combine-fanout must be >= 0, got {args.combine_fanout}")
    if args.whiten_batch_frames < 1:
        raise FlagError(f"--whiten-batch-frames must be >= 1, got {args.whiten_batch_frames}")
    if args.whiten_ahead is not None and args.whiten_ahead < 0:
        raise FlagError(f"--whiten-ahead must be >= 0, got {args.whiten_ahead}")
    if args.stage == "fit" and args.whitening is not None:
        raise FlagError("--stage fit fits a whitening; --whitening reuses one: give one of the two")
    output = args.output.rstrip("/") or "/"
    whitening = args.whitening
    if args.stage == "write" and whitening is None:
        whitening = _join(output, "whitening.npz")
        fs, fs_path = fsspec.core.url_to_fs(whitening)
        if not fs.exists(fs_path):
            raise WhiteningFileError(f"--stage write needs --whitening FILE or {whitening} from an earlier "
                                     f"--stage fit into the same --output")
    if not args.epsilon >= 0:
        raise FlagError(f"--epsilon must be >= 0, got {args.epsilon}")
    try:
        shrinkage = parse_shrinkage(args.shrinkage)
    except WhiteningError as e:
        raise FlagError(f"--shrinkage: {e}") from None
    return JobConfig(input=args.input, output=output, level=args.level,
                     features=features, pca_dims=pca_dims, whitening=whitening, dtype=args.dtype,
                     epsilon=args.epsilon, mode="zca" if args.zca else "pca", num_shards=args.num_shards,
                     shrinkage=shrinkage, stage=args.stage, combine_fanout=args.combine_fanout,
                     exclude_ids=args.exclude_ids, whiten_ahead=args.whiten_ahead,
                     whiten_batch_frames=args.whiten_batch_frames)


def resolve_whiten_ahead(cfg: JobConfig, opts: PipelineOptions) -> JobConfig:
    """``cfg`` with ``whiten_ahead`` decided when the flag was not given: a background matmul thread per worker
    only where each worker has a spare core (``beam_jobs.options.spare_core_per_worker``). Where it has none, the
    thread only competes with the other workers: 2 local workers on 2 cores wrote 0.89-0.94x as fast with it
    (bench/preprocess.py)."""
    if cfg.whiten_ahead is not None:
        return cfg
    return replace(cfg, whiten_ahead=SPARE_CORE_WHITEN_AHEAD if job_options.spare_core_per_worker(opts) else 0)


# -- file helpers (fsspec: local paths and gs:// alike) -----------------------------------------------------------
def _join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


def _write_text(path: str, text: str) -> None:
    with fsspec.open(path, "w") as f:
        f.write(text)


def _remove(path: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)


def match_input(pattern: str) -> list[str]:
    """Sorted files matching ``pattern`` (directories left out); raises ``NoInputError`` when there are none."""
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # Beam wraps every filesystem failure in BeamIOError
        raise NoInputError(f"--input {pattern!r}: cannot list files ({e})") from None
    paths = sorted(m.path for m in metadata if not m.path.endswith("/") and not os.path.isdir(m.path))
    if not paths:
        hint = " (it is a directory: add /*.tfrecord)" if os.path.isdir(pattern) else ""
        raise NoInputError(f"--input {pattern!r} matches no file{hint}")
    return paths


def dead_letter(source: str, position: int | None, reason: str, message: str,
                video_id: str | None = None) -> dict:
    """One dead-letter entry, as written (one JSON object per line) to ``OUT/dead_letter/``."""
    return {"source": source, "position": position, "reason": reason, "message": message, "id": video_id}


class _BlasLimit:
    """Caps BLAS threads of this process while a bundle runs (Dataflow runs one SDK process per core)."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self._controller = self._limiter = None

    def __getstate__(self):
        return {"threads": self.threads}

    def __setstate__(self, state):
        self.__init__(state["threads"])

    def enter(self) -> None:
        if self.threads is None:
            return
        if self._controller is None:
            from threadpoolctl import ThreadpoolController
            self._controller = ThreadpoolController()
        self._limiter = self._controller.limit(limits=self.threads, user_api="blas")

    def exit(self) -> None:
        if self._limiter is not None:
            self._limiter.restore_original_limits()
            self._limiter = None


# -- DoFns and transforms --------------------------------------------------------------------------------------
class BundleCounts:
    """What one step did in one bundle (record counts and its own seconds), emitted once from ``finish_bundle`` as a
    ``counts`` output: ``{"step": name, key: number, ...}``.

    A bundle's outputs are committed together or not at all, so these lines count every committed record exactly
    once, also where a runner retries bundles, and they need no metrics support from the runner. Keys ending in
    ``_seconds`` are wall-clock time inside the step (``time.perf_counter``), excluding what runs downstream of it.

    Args:
        step: the step's name in the count lines.
    """

    def __init__(self, step: str):
        self.step = step
        self.values: dict[str, float] = {}

    def add(self, key: str, n: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + n

    def reset(self) -> None:
        """Forget everything: called in ``start_bundle``, so a DoFn instance reused after a failed bundle does not
        carry that bundle's counts into the next one."""
        self.values = {}

    def emit(self) -> Iterator:
        """The ``counts`` output of ``finish_bundle`` (nothing for an empty bundle); resets the counts."""
        if self.values:
            out = {"step": self.step, **{k: round(v, 6) if isinstance(v, float) else v
                                         for k, v in self.values.items()}}
            self.values = {}
            yield beam.pvalue.TaggedOutput(COUNTS, GlobalWindows.windowed_value(out))


class ReadTFRecordFramingFn(beam.DoFn):
    """``fileio.ReadableFile`` -> ``(source: str, position: int, payload: bytes)`` per intact record;
    tagged ``dead_letter``: a dict (``dead_letter``) per framing corruption (bad CRC, truncation); tagged ``counts``:
    ``read_records`` and ``read_seconds`` per bundle (``BundleCounts``).

    Args:
        namespace: metrics namespace; counts ``read_records``.
    """

    def __init__(self, namespace: str = METRICS_NAMESPACE):
        self.namespace = namespace

    def setup(self):
        self.read = Metrics.counter(self.namespace, "read_records")
        self.counts = BundleCounts("read")

    def start_bundle(self):
        self.counts.reset()

    def process(self, readable_file) -> Iterator:
        clock = time.perf_counter
        start = clock()
        source = readable_file.metadata.path
        with readable_file.open(mime_type="application/octet-stream") as f:
            records = iter_records(f, verify=True, on_error="yield", source=source)
            while True:
                item = next(records, None)  # timed apart from the downstream steps, which run inside each yield
                self.counts.add("read_seconds", clock() - start)
                if item is None:
                    break
                self.read.inc()
                self.counts.add("read_records")
                if isinstance(item, TFRecordCorruption):
                    yield beam.pvalue.TaggedOutput(
                        DEAD_LETTER, dead_letter(source, item.offset, item.reason, item.message))
                else:
                    position, payload = item
                    yield source, position, payload
                start = clock()

    def finish_bundle(self):
        yield from self.counts.emit()


class DecodeVideoFn(beam.DoFn):
    """``(source, position, payload)`` -> ``(source, position, VideoRecord)`` with every selected feature;
    tagged ``dead_letter``: a dict per record that fails validation (``RecordError.reason``, or ``non_finite``);
    tagged ``counts``: ``decoded_records``, the counts below and ``decode_seconds`` per bundle.

    Args:
        level: "frame" or "video".
        features: feature names every record must carry.
        namespace: metrics namespace; counts ``truncated_records``, ``truncated_frames``, ``segments_past_end``.
    """

    def __init__(self, level: str, features: Sequence[str], namespace: str = METRICS_NAMESPACE):
        self.level, self.features, self.namespace = level, tuple(features), namespace

    def setup(self):
        self.truncated_records = Metrics.counter(self.namespace, "truncated_records")
        self.truncated_frames = Metrics.counter(self.namespace, "truncated_frames")
        self.segments_past_end = Metrics.counter(self.namespace, "segments_past_end")
        self.counts = BundleCounts("decode")

    def start_bundle(self):
        self.counts.reset()

    def process(self, element) -> Iterator:
        start = time.perf_counter()
        source, position, payload = element
        bad = self._decode(payload)
        self.counts.add("decode_seconds", time.perf_counter() - start)
        if not isinstance(bad, VideoRecord):
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(source, position, *bad))
            return
        record = bad
        self.counts.add("decoded_records")
        if record.truncated_frames:
            self.truncated_records.inc()
            self.truncated_frames.inc(record.truncated_frames)
            self.counts.add("truncated_records")
            self.counts.add("truncated_frames", record.truncated_frames)
        if record.segments_past_end:  # kept in the row; counted for the summary
            self.segments_past_end.inc(record.segments_past_end)
            self.counts.add("segments_past_end", record.segments_past_end)
        yield source, position, record

    def _decode(self, payload: bytes) -> VideoRecord | tuple:
        """The record, or (reason, message, id) of why it is unusable."""
        try:
            record = decode_record(payload, level=self.level)
            for name in self.features:
                value = getattr(record, name)
                if value is None:
                    raise RecordError("missing_feature", f"record has no {name!r} feature", record.id)
                if value.dtype != np.uint8 and not np.isfinite(value).all():
                    return NON_FINITE, f"{name!r} holds NaN or infinite values", record.id
        except RecordError as e:
            return e.reason, e.message, e.video_id
        return record

    def finish_bundle(self):
        yield from self.counts.emit()


class ReadVideoRecords(beam.PTransform):
    """PBegin -> ``(videos, dead_letters, counts)`` from TFRecord files: ``videos`` holds ``(source, position,
    VideoRecord)``, ``dead_letters`` the dicts of ``dead_letter``, ``counts`` the per-bundle dicts of the read and
    decode steps (``BundleCounts``).

    Args:
        paths: the files to read (already matched, see ``match_input``).
        level, features: as ``DecodeVideoFn``.
        namespace: metrics namespace of the read and decode steps.
    """

    def __init__(self, paths: Sequence[str], level: str, features: Sequence[str],
                 namespace: str = METRICS_NAMESPACE):
        super().__init__()
        self.paths, self.level, self.features, self.namespace = list(paths), level, tuple(features), namespace

    def expand(self, pbegin):
        from apache_beam.io import fileio

        files = (pbegin
                 | "ListFiles" >> beam.Create(self.paths)
                 # Spread files over workers; keeps the file list from fusing with the (slow) reads.
                 | "SpreadFiles" >> beam.Reshuffle()
                 | "OpenFiles" >> fileio.ReadMatches())
        framed = files | "ReadFraming" >> beam.ParDo(ReadTFRecordFramingFn(self.namespace)).with_outputs(
            DEAD_LETTER, COUNTS, main="records")
        decoded = framed.records | "Decode" >> beam.ParDo(
            DecodeVideoFn(self.level, self.features, self.namespace)).with_outputs(DEAD_LETTER, COUNTS,
                                                                                   main="videos")
        dead = (framed[DEAD_LETTER], decoded[DEAD_LETTER]) | "MergeDeadLetters" >> beam.Flatten()
        counts = (framed[COUNTS], decoded[COUNTS]) | "MergeCounts" >> beam.Flatten()
        return decoded.videos, dead, counts


def load_id_set(path: str) -> frozenset:
    """The ids of an id list file as a set (the side input of ``ExcludeVideosFn``)."""
    return frozenset(read_id_list(path))


class ExcludeVideosFn(beam.DoFn):
    """``(source, position, VideoRecord)`` -> the same element when its id is not excluded; tagged ``excluded``:
    ``{"source", "position", "id"}`` per video left out; tagged ``counts``: ``excluded_records`` per bundle.

    The excluded ids come as a side input (``process``'s ``excluded_ids``, a frozenset).

    Args:
        namespace: metrics namespace; counts ``excluded_records``.
    """

    def __init__(self, namespace: str = METRICS_NAMESPACE):
        self.namespace = namespace

    def setup(self):
        self.excluded = Metrics.counter(self.namespace, "excluded_records")
        self.counts = BundleCounts("exclude")

    def start_bundle(self):
        self.counts.reset()

    def process(self, element, excluded_ids: frozenset) -> Iterator:
        source, position, record = element
        if record.id in excluded_ids:
            self.excluded.inc()
            self.counts.add("excluded_records")
            yield beam.pvalue.TaggedOutput(EXCLUDED, {"source": source, "position": position, "id": record.id})
            return
        yield element

    def finish_bundle(self):
        yield from self.counts.emit()


class ExcludeVideos(beam.PTransform):
    """PCollection of ``(source, position, VideoRecord)`` -> ``(kept, excluded, counts)``: the videos whose id is
    not in the id list at ``path``, the dicts of those that are, and the per-bundle counts (``ExcludeVideosFn``).

    The ids reach the workers as a side input that one worker reads from ``path`` (``OUT/exclude_ids.txt``, which
    Dataflow workers can read, unlike a file on the launching machine), not inside the DoFn's constructor: a
    constructor argument is pickled into the job graph, and a million 11-character YouTube ids pickle to about
    14 MB (10 MB compressed, more after base64), past Dataflow's 10 MB limit on the graph and close to its 20 MB
    limit on the job request; the graph would also grow with every id. As a singleton side input the set is
    materialized once by the runner, and the SDK keeps the decoded set in its state cache across bundles where the
    runner hands out side-input cache tokens, as Dataflow's Runner v2 does (a million ids take about 100 MB in
    memory: raise ``--max_cache_memory_usage_mb`` if workers log that side-input reads are slow).

    Args:
        path: the id list (one id per line; ``read_id_list``).
        namespace: metrics namespace of ``ExcludeVideosFn``.
    """

    def __init__(self, path: str, namespace: str = METRICS_NAMESPACE):
        super().__init__()
        self.path, self.namespace = path, namespace

    def expand(self, videos):
        ids = (videos.pipeline
               | "IdListPath" >> beam.Create([self.path])
               | "ReadIdList" >> beam.Map(load_id_set))
        kept = videos | "DropExcluded" >> beam.ParDo(
            ExcludeVideosFn(self.namespace), excluded_ids=beam.pvalue.AsSingleton(ids)).with_outputs(
            EXCLUDED, COUNTS, main="videos")
        return kept.videos, kept[EXCLUDED], kept[COUNTS]


class FeatureMoments:
    """Combiner accumulator: one ``MomentAccumulator`` per feature plus frames waiting to be added in a batch.

    Args:
        features: feature names.
        batch_frames: pending frames that trigger one ``MomentAccumulator.add``.
        blas_threads: BLAS threads while adding (None: leave as is).
    """

    def __init__(self, features: Sequence[str], batch_frames: int = FIT_BATCH_FRAMES,
                 blas_threads: int | None = 1):
        self.moments = {name: MomentAccumulator(FEATURE_DIMS[name]) for name in features}
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in features}
        self.pending_frames = 0
        self.batch_frames = batch_frames
        self.blas = _BlasLimit(blas_threads)

    def add(self, record: VideoRecord) -> None:
        """Queue the selected features of one video."""
        for name in self.moments:
            self.pending[name].append(getattr(record, name))  # uint8 codes (frame level) or float32 means
        self.pending_frames += record.num_frames
        if self.pending_frames >= self.batch_frames:
            self.flush()

    def flush(self) -> "FeatureMoments":
        if self.pending_frames:
            self.blas.enter()
            try:
                for name, acc in self.moments.items():
                    frames = np.concatenate(self.pending[name])  # (N, D)
                    if frames.dtype == np.uint8:
                        from pipeline.records import dequantize
                        frames = dequantize(frames)
                    acc.add(frames)
                    self.pending[name] = []
            finally:
                self.blas.exit()
            self.pending_frames = 0
        return self

    def merge(self, other: "FeatureMoments") -> None:
        other.flush()
        self.moments = {name: acc.merge(other.moments[name]) for name, acc in self.moments.items()}

    def __getstate__(self):
        # Only the moments travel between workers; pending frames are folded in first.
        self.flush()
        return {"moments": self.moments, "batch_frames": self.batch_frames, "blas": self.blas.threads}

    def __setstate__(self, state):
        self.moments = state["moments"]
        self.pending = {name: [] for name in self.moments}
        self.pending_frames = 0
        self.batch_frames = state["batch_frames"]
        self.blas = _BlasLimit(state["blas"])


class MomentsCombineFn(beam.CombineFn):
    """``(source, position, VideoRecord)`` -> ``{feature: MomentAccumulator}`` (count, mean, scatter of all
    frames, float64).

    Frames are buffered and added ``batch_frames`` at a time: one (4096, D) rank-k update is far faster than
    hundreds of per-video ones.

    Args:
        features: feature names to accumulate.
        batch_frames: frames per accumulator update.
        blas_threads: BLAS threads while adding (None: leave as is).
    """

    def __init__(self, features: Sequence[str], batch_frames: int = FIT_BATCH_FRAMES,
                 blas_threads: int | None = 1):
        self.features, self.batch_frames, self.blas_threads = tuple(features), batch_frames, blas_threads

    def create_accumulator(self) -> FeatureMoments:
        return FeatureMoments(self.features, self.batch_frames, self.blas_threads)

    def add_input(self, acc: FeatureMoments, element) -> FeatureMoments:
        acc.add(element[2])
        return acc

    def merge_accumulators(self, accumulators) -> FeatureMoments:
        it = iter(accumulators)
        out = next(it)
        for acc in it:
            out.merge(acc)
        return out

    def compact(self, acc: FeatureMoments) -> FeatureMoments:
        return acc.flush()

    def extract_output(self, acc: FeatureMoments) -> dict:
        return acc.flush().moments


def save_moments(moments: dict, path: str) -> str:
    """Write ``{feature: MomentAccumulator}`` to ``path`` as .npz (``rgb/count``, ``rgb/mean``, ``rgb/scatter``)."""
    arrays = {}
    for name, acc in moments.items():
        arrays.update({f"{name}/count": np.array(acc.count, np.int64), f"{name}/mean": acc.mean,
                       f"{name}/scatter": acc.scatter})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def load_moments(path: str, features: Sequence[str]) -> dict:
    """Inverse of ``save_moments``."""
    with fsspec.open(path, "rb") as f:
        data = f.read()
    out = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for name in features:
            acc = MomentAccumulator(FEATURE_DIMS[name])
            acc.count = int(npz[f"{name}/count"])
            acc.mean = npz[f"{name}/mean"].astype(np.float64)
            acc.scatter = npz[f"{name}/scatter"].astype(np.float64)
            out[name] = acc
    return out


class WhitenVideoFn(beam.DoFn):
    """``(source, position, VideoRecord)`` -> Parquet row dict (``pipeline.shards.record_to_row``) with whitened
    features; tagged ``dead_letter``: a dict (reason ``not_storable``) when a whitened value overflows the storage
    dtype (float16 ends at 65504); tagged ``counts``: ``written_records``, ``written_frames``,
    ``unwritten_segment_records``, ``center_seconds`` (stacking, dequantizing and centering), ``whiten_seconds``
    (the projection, on whichever thread ran it), ``whiten_wait_seconds`` (the bundle's thread waiting for a
    background matmul) and ``encode_seconds`` (the row: storage dtype, finiteness check, bytes) per bundle.

    Videos are whitened ``batch_frames`` frames at a time, one matmul for several videos: a 150-frame video alone
    keeps the BLAS kernel well below the speed it reaches on a few thousand rows (``bench/preprocess.py``). A batch
    never spans bundles: what is left is whitened and emitted in ``finish_bundle``.

    With ``ahead`` > 0 the matmuls run on one background thread, up to ``ahead`` batches ahead of the rows being
    emitted: numpy releases the GIL inside BLAS, so decoding, float16 encoding and the Parquet write of one batch
    overlap the matmul of the next, as tf.data's parallel map overlaps parsing with the consumer. Rows leave in input
    order either way, and a failed matmul raises in the bundle that submitted it.

    The statistics are read from ``whitening_path`` once per DoFn instance (``setup``), not shipped inside the
    pipeline graph: a 1024-d whitening is 8 MB per feature.

    Args:
        whitening_path: ``whitening.npz`` (local or gs://).
        features: features to whiten and store.
        dtype: storage dtype ("float16" or "float32").
        has_segments: whether the shard schema has segment columns.
        namespace: metrics namespace; counts ``written_records``, ``written_frames`` and, when a record carries
            segment ratings that the schema has no columns for, ``unwritten_segment_records``.
        blas_threads: BLAS threads during a bundle (None: leave as is).
        batch_frames: frames gathered before one matmul (1: every video on its own).
        ahead: batches whitened ahead on a background thread (0: every matmul inline, one thread).
    """

    def __init__(self, whitening_path: str, features: Sequence[str], dtype: str, has_segments: bool,
                 namespace: str = METRICS_NAMESPACE, blas_threads: int | None = 1,
                 batch_frames: int = WHITEN_BATCH_FRAMES, ahead: int = 0):
        if ahead < 0:
            raise ValueError(f"ahead must be >= 0, got {ahead}")
        self.whitening_path, self.features, self.dtype = whitening_path, tuple(features), dtype
        self.has_segments, self.namespace = has_segments, namespace
        self.blas = _BlasLimit(blas_threads)
        self.batch_frames = max(1, int(batch_frames))
        self.ahead = int(ahead)

    def setup(self):
        whitening = WhiteningSet.load(self.whitening_path)
        self.use_affine({name: (whitening[name].mean, whitening[name].projection) for name in self.features})
        self.written = Metrics.counter(self.namespace, "written_records")
        self.written_frames = Metrics.counter(self.namespace, "written_frames")
        self.unwritten_segments = Metrics.counter(self.namespace, "unwritten_segment_records")
        self.counts = BundleCounts("whiten")
        self.pending, self.pending_frames = [], 0
        self.in_flight = collections.deque()  # (batch, frame ends, Future of its whitened matrices), oldest first
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="whiten") if self.ahead else None

    def use_affine(self, affine: dict) -> None:
        """Whiten with ``{feature: (mean (D,), projection (D, dims))}``: ``(x - mean) @ projection``.

        Kept in float32 twice, cast once here rather than per batch: as given, for float features (video level),
        and moved into the quantized codes' domain for uint8 frames, ``(q - (mean - bias) / scale) @ (scale *
        projection)``, the same map, so that dequantizing and centering become one pass over the codes
        (``np.subtract`` with a float32 result) and the scale rides in the matmul."""
        self.affine, self.code_affine = {}, {}
        for name, (mean, projection) in affine.items():
            mean, projection = np.asarray(mean, np.float64), np.asarray(projection, np.float64)
            self.affine[name] = (mean.astype(np.float32), projection.astype(np.float32))
            self.code_affine[name] = (((mean - float(DEQUANT_BIAS)) / float(DEQUANT_SCALE)).astype(np.float32),
                                      (projection * float(DEQUANT_SCALE)).astype(np.float32))

    def teardown(self):
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def start_bundle(self):
        self.counts.reset()
        self.pending, self.pending_frames = [], 0
        self.in_flight.clear()
        self.blas.enter()

    def finish_bundle(self):
        outputs = list(self._submit())
        while self.in_flight:
            outputs.extend(self._emit_oldest())
        for output in outputs:  # outside process(), every output carries its window
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)
        self.blas.exit()
        yield from self.counts.emit()

    def process(self, element) -> Iterator:
        self.pending.append(element)
        self.pending_frames += element[2].num_frames
        if self.pending_frames >= self.batch_frames:
            yield from self._submit()

    def _submit(self) -> Iterator:
        """Start whitening the pending videos (on the background thread, or now when ``ahead`` is 0), then emit
        the rows of the batches that are more than ``ahead`` behind."""
        batch, self.pending, self.pending_frames = self.pending, [], 0
        if batch:
            # centered here, so that the background thread takes the GIL only a few times per batch (each time it
            # waits for this thread's Python code to let go of it) and spends its core on the matmul alone
            start = time.perf_counter()
            records = [record for _, _, record in batch]
            ends = np.cumsum([record.num_frames for record in records])
            centered = {name: self._center(name, [getattr(record, name) for record in records])
                        for name in self.features}
            self.counts.add("center_seconds", time.perf_counter() - start)
            if self.executor is None:
                future = Future()
                future.set_result(self._whiten(centered))
            else:
                future = self.executor.submit(self._whiten, centered)
            self.in_flight.append((batch, ends, future))
        while len(self.in_flight) > self.ahead:
            yield from self._emit_oldest()

    def _center(self, name: str, matrices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Videos' frames of one feature stacked and centered, in the domain their dtype says -> ((sum T, D)
        float32, its projection)."""
        if all(m.dtype == np.uint8 for m in matrices):
            mean, projection = self.code_affine[name]
            codes = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
            return np.subtract(codes, mean, dtype=np.float32), projection  # dequantize and center, one pass
        mean, projection = self.affine[name]
        return np.concatenate([np.asarray(m, np.float32) for m in matrices]) - mean, projection

    @staticmethod
    def _whiten(centered: dict) -> tuple[dict, float]:
        """One matmul per feature over the videos' stacked, centered frames ({feature: ((sum T, D), projection)})
        -> ({feature: (sum T, dims) float32}, seconds)."""
        start = time.perf_counter()
        whitened = {name: frames @ projection for name, (frames, projection) in centered.items()}
        return whitened, time.perf_counter() - start

    def _emit_oldest(self) -> Iterator:
        """Wait for the oldest batch's matmuls, then emit its rows (or dead letters) in input order."""
        batch, ends, future = self.in_flight.popleft()
        wait = time.perf_counter()
        whitened, seconds = future.result()
        if self.executor is not None:
            self.counts.add("whiten_wait_seconds", time.perf_counter() - wait)
        self.counts.add("whiten_seconds", seconds)
        per_video = {name: np.split(w, ends[:-1]) for name, w in whitened.items()}  # (sum T, dims) -> [(T, dims)]
        for i, (source, position, record) in enumerate(batch):
            yield from self._row(source, position, record, {name: w[i] for name, w in per_video.items()})

    def _row(self, source: str, position: int, record: VideoRecord, whitened: dict) -> Iterator:
        encode = time.perf_counter()
        try:
            row, error = shards.record_to_row(record, whitened, self.dtype, has_segments=self.has_segments), None
        except shards.ShardSchemaError as e:
            row, error = None, e
        self.counts.add("encode_seconds", time.perf_counter() - encode)
        if error is not None:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(source, position, NOT_STORABLE, str(error),
                                                                    record.id))
            return
        if record.has_segments and not self.has_segments:
            self.unwritten_segments.inc()
            self.counts.add("unwritten_segment_records")
        self.written.inc()
        self.written_frames.inc(record.num_frames)
        self.counts.add("written_records")
        self.counts.add("written_frames", record.num_frames)
        yield row


class FormatDeadLetterFn(beam.DoFn):
    """Dead-letter dict -> one JSON line; counts ``dead_lettered_<reason>``.

    Args:
        namespace: metrics namespace.
    """

    def __init__(self, namespace: str = METRICS_NAMESPACE):
        self.namespace = namespace

    def process(self, entry: dict) -> Iterator[str]:
        Metrics.counter(self.namespace, f"dead_lettered_{entry['reason']}").inc()
        yield json.dumps(entry, sort_keys=True)


class WriteDeadLetters(beam.PTransform):
    """PCollection[dict] -> ``DIR/dead_letter/dead-00000-of-00001.jsonl`` (written even when empty).

    Args:
        directory: the ``dead_letter`` directory.
    """

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def expand(self, dead_letters):
        return (dead_letters
                | "ToJson" >> beam.ParDo(FormatDeadLetterFn())
                | "WriteJsonl" >> beam.io.WriteToText(_join(self.directory, "dead"), file_name_suffix=".jsonl",
                                                      num_shards=1, shard_name_template="-SSSSS-of-NNNNN"))


class WriteShards(beam.PTransform):
    """PCollection[row dict] -> ``DIR/shards/part-SSSSS-of-NNNNN.parquet``.

    Built on Beam's public file sink rather than ``WriteToParquet``: that transform passes only a codec to its
    writer, so its shards had no page checksums (a flipped byte read back as silently different frames,
    tests/test_faults.py), and reaching into it meant depending on Beam internals that changed between releases.

    Args:
        directory: the ``shards`` directory.
        schema: pyarrow schema from ``pipeline.shards.shard_schema``.
        num_shards: number of files; 0 lets the runner decide (one per written bundle, no shuffle).
    """

    def __init__(self, directory: str, schema, num_shards: int = 0):
        super().__init__()
        self.directory, self.schema, self.num_shards = directory, schema, num_shards

    def expand(self, rows):
        return (rows
                | "ToRowGroups" >> beam.ParDo(RowsToRowGroupsFn(self.schema, ROW_GROUP_BYTES))
                | "WriteParquet" >> beam.io.Write(ShardSink(_join(self.directory, "part"), self.schema,
                                                            self.num_shards)))


class RowsToRowGroupsFn(beam.DoFn):
    """row dict -> pyarrow.Table of whole rows holding at least ``row_group_bytes`` of feature blobs (the last table
    of a bundle holds the rest); the sink writes each table as one Parquet row group.

    Rows become Arrow record batches every ``batch_rows`` rows, as Beam's own Parquet transform does: converting a
    whole row group at once made the write step 1.7x slower (bench/preprocess.py, 1024-dim frames).

    Args:
        schema: the shards' pyarrow schema.
        row_group_bytes: feature bytes per row group.
        batch_rows: rows per record batch.
    """

    def __init__(self, schema, row_group_bytes: int = ROW_GROUP_BYTES, batch_rows: int = 8):
        self.schema, self.row_group_bytes, self.batch_rows = schema, row_group_bytes, batch_rows
        self.features = tuple(shards.parse_schema_metadata(schema)["features"])

    def start_bundle(self):
        self._rows, self._batches, self._bytes = [], [], 0

    def process(self, row: dict):
        self._rows.append(row)
        self._bytes += sum(len(row[name]) for name in self.features)
        if self._bytes >= self.row_group_bytes:
            yield self._table()
        elif len(self._rows) >= self.batch_rows:
            self._batches.append(pa.RecordBatch.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def finish_bundle(self):
        if self._rows or self._batches:
            yield GlobalWindows.windowed_value(self._table())

    def _table(self):
        if self._rows:
            self._batches.append(pa.RecordBatch.from_pylist(self._rows, schema=self.schema))
        table = pa.Table.from_batches(self._batches, schema=self.schema)
        self._rows, self._batches, self._bytes = [], [], 0
        return table


class ShardSink(filebasedsink.FileBasedSink):
    """Beam file sink of pyarrow tables into Parquet files written with ``pipeline.shards.writer_options`` (the
    codecs and page checksums ``ShardWriter`` uses); each table becomes one row group.

    Args:
        prefix: path prefix of the files (``DIR/part``).
        schema: the shards' pyarrow schema.
        num_shards: number of files; 0 lets the runner decide.
    """

    def __init__(self, prefix: str, schema, num_shards: int = 0):
        super().__init__(prefix, coder=None, file_name_suffix=".parquet", num_shards=num_shards,
                         shard_name_template="-SSSSS-of-NNNNN", mime_type="application/x-parquet",
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self.schema = schema

    def open(self, temp_path):
        handle = super().open(temp_path)
        return pq.ParquetWriter(handle, self.schema, **shards.writer_options(self.schema)), handle

    def write_record(self, writer_and_handle, table):
        writer_and_handle[0].write_table(table)

    def close(self, writer_and_handle):
        writer, handle = writer_and_handle
        writer.close()
        handle.close()


def _json_line(value: dict) -> str:
    return json.dumps(value, sort_keys=True)


class WriteCounts(beam.PTransform):
    """PCollection[count dict] -> ``DIR/counts/counts-00000-of-00001.jsonl``, one line per step and bundle
    (``BundleCounts``); written even when empty.

    Args:
        directory: the ``counts`` directory.
    """
    prefix = "counts"

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def expand(self, counts):
        return (counts
                | "ToJson" >> beam.Map(_json_line)
                | "WriteJsonl" >> beam.io.WriteToText(_join(self.directory, self.prefix), file_name_suffix=".jsonl",
                                                      num_shards=1, shard_name_template="-SSSSS-of-NNNNN"))


class WriteExcluded(WriteCounts):
    """PCollection[dict] of ``ExcludeVideosFn`` -> ``DIR/excluded/excluded-00000-of-00001.jsonl``, one JSON line
    (source, position, id) per video left out; written even when empty.

    Args:
        directory: the ``excluded`` directory.
    """
    prefix = "excluded"


def moments_combine(cfg: JobConfig, blas_threads: int | None = 1) -> beam.PTransform:
    """The global moments combine of pass 1, with ``cfg.combine_fanout`` intermediate keys when above 1.

    Each bundle pre-combines its own records (combiner lifting); with a fanout each bundle's partial accumulator
    goes to one of N keys (chosen per bundle), the N key results are merged on the final key. Without it the final
    key merges one accumulator per bundle, which on a large corpus is one worker doing thousands of 1024x1024
    float64 merges while the others wait."""
    combine = beam.CombineGlobally(MomentsCombineFn(cfg.features, blas_threads=blas_threads))
    return combine.with_fanout(cfg.combine_fanout) if cfg.combine_fanout > 1 else combine


def build_fit_pipeline(p: beam.Pipeline, cfg: JobConfig, paths: Sequence[str], moments_path: str,
                       blas_threads: int | None = 1) -> None:
    """Pass 1: TFRecords -> per-feature moments -> ``moments_path``. Unusable records are only counted here
    (pass 2 writes them to the dead letter), so a failed fit can say why; so are the videos ``--exclude-ids`` leaves
    out, which must not shape the statistics the kept videos are whitened with."""
    videos, unusable, _ = p | "ReadVideos" >> ReadVideoRecords(paths, cfg.level, cfg.features,
                                                               FIT_METRICS_NAMESPACE)
    _ = unusable | "CountUnusable" >> beam.ParDo(FormatDeadLetterFn(FIT_METRICS_NAMESPACE))
    if cfg.exclude_ids is not None:
        videos, _, _ = videos | "ExcludeIds" >> ExcludeVideos(cfg.path(EXCLUDE_IDS_FILE), FIT_METRICS_NAMESPACE)
    _ = (videos
         | "FeatureMoments" >> moments_combine(cfg, blas_threads)
         | "SaveMoments" >> beam.Map(save_moments, moments_path))


def build_write_pipeline(p: beam.Pipeline, cfg: JobConfig, paths: Sequence[str], whitening_path: str, schema,
                         has_segments: bool, blas_threads: int | None = 1) -> None:
    """Pass 2: TFRecords -> whitened Parquet shards + dead letters + per-bundle counts, and with ``--exclude-ids``
    the videos left out (``OUT/excluded/``, one JSON line each, written even when empty)."""
    videos, unreadable, read_counts = p | "ReadVideos" >> ReadVideoRecords(paths, cfg.level, cfg.features)
    if cfg.exclude_ids is not None:
        videos, excluded, exclude_counts = videos | "ExcludeIds" >> ExcludeVideos(cfg.path(EXCLUDE_IDS_FILE))
        _ = excluded | "WriteExcluded" >> WriteExcluded(cfg.path(EXCLUDED))
        read_counts = (read_counts, exclude_counts) | "ReadAndExcludeCounts" >> beam.Flatten()
    whitened = videos | "Whiten" >> beam.ParDo(WhitenVideoFn(
        whitening_path, cfg.features, cfg.dtype, has_segments, blas_threads=blas_threads,
        batch_frames=cfg.whiten_batch_frames, ahead=cfg.whiten_ahead or 0)).with_outputs(
        DEAD_LETTER, COUNTS, main="rows")
    _ = whitened.rows | "WriteShards" >> WriteShards(cfg.path("shards"), schema, cfg.num_shards)
    _ = ((unreadable, whitened[DEAD_LETTER])
         | "AllDeadLetters" >> beam.Flatten()
         | "WriteDeadLetters" >> WriteDeadLetters(cfg.path("dead_letter")))
    _ = ((read_counts, whitened[COUNTS])
         | "AllCounts" >> beam.Flatten()
         | "WriteCounts" >> WriteCounts(cfg.path("counts")))


# -- launcher --------------------------------------------------------------------------------------------------
def counter_values(result, namespace: str) -> dict[str, int] | None:
    """Counters of ``namespace`` summed over steps (committed values where the runner reports them), or None when
    the runner reports no metrics."""
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    except Exception as e:  # NotImplementedError, or a runner's own failure: the summary does not depend on it
        _LOGGER.warning("the runner reports no metrics (%s: %s); the summary uses the job's outputs only",
                        type(e).__name__, e)
        return None
    out: dict[str, int] = {}
    for c in query["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def _run_and_wait(p: beam.Pipeline, what: str):
    result = p.run()
    state = result.wait_until_finish()
    if state is not None and state != PipelineState.DONE:
        raise PreprocessError(f"{what} ended in state {state}")
    return result


def load_whitening_for(path: str, cfg: JobConfig) -> WhiteningSet:
    """The statistics in ``path``, checked against the selected features (and against ``--pca-dims``/``--zca``
    when reusing a file)."""
    try:
        ws = WhiteningSet.load(path)
    except WhiteningError as e:
        raise WhiteningFileError(f"cannot use whitening file {path}: {e}") from None
    except OSError as e:
        raise WhiteningFileError(f"cannot read whitening file {path}: {e}") from None
    for name in cfg.features:
        if name not in ws:
            raise DimsMismatchError(f"{path} has no whitening for {name!r} (it has {ws.names}); fit one with "
                                    f"--features {','.join(cfg.features)}")
        w = ws[name]
        if w.input_dim != FEATURE_DIMS[name]:
            raise DimsMismatchError(f"{path}: the {name!r} whitening takes {w.input_dim}-d frames, but YouTube-8M "
                                    f"{name} frames have {FEATURE_DIMS[name]} dims")
        if cfg.pca_dims and name in cfg.pca_dims and cfg.pca_dims[name] != w.requested_dims:
            raise DimsMismatchError(f"--pca-dims asks for {cfg.pca_dims[name]} {name} dims but {path} keeps "
                                    f"{w.dims}; drop --pca-dims to use the file as it is")
        if cfg.mode == "zca" and w.mode != "zca":
            raise DimsMismatchError(f"--zca given but {path} holds a {w.mode} whitening for {name!r}")
    return ws


def detect_segments(paths: Sequence[str], level: str, max_files: int = 4, max_records: int = 16) -> bool:
    """Whether the shards get segment columns: the first decodable frame-level record (among the first
    ``max_records`` of the first ``max_files`` files) decides. YouTube-8M splits are uniform in this."""
    if level != "frame":
        return False
    for path in paths[:max_files]:
        for i, item in enumerate(read_records(path, on_error="yield")):
            if i >= max_records:
                break
            if isinstance(item, TFRecordCorruption):
                continue
            try:
                return decode_sequence_example(item[1]).has_segments
            except RecordError:
                continue
    return False


def read_exclude_ids(cfg: JobConfig) -> list[str] | None:
    """The distinct ids of ``--exclude-ids`` (None without the flag); raises ``ExcludeIdsError``."""
    if cfg.exclude_ids is None:
        return None
    try:
        return read_id_list(cfg.exclude_ids)
    except IdListError as e:
        raise ExcludeIdsError(f"--exclude-ids: {e}") from None
    except OSError as e:
        raise ExcludeIdsError(f"--exclude-ids: cannot read {cfg.exclude_ids} ({e})") from None


def exclusion_sha256(cfg: JobConfig) -> str | None:
    """The sha256 of ``OUT/exclude_ids.txt`` (sorted distinct ids, so the same set gives the same hash whatever the
    order, repeats and comments of the file it came from), or None when this run excludes nothing."""
    return file_sha256(cfg.path(EXCLUDE_IDS_FILE)) if cfg.exclude_ids is not None else None


def prepare_output(cfg: JobConfig) -> None:
    """Remove what a previous run left that this run rewrites or makes stale: the pass-2 outputs always (a new
    whitening invalidates old shards too), the whitening and its fit summary when this run fits."""
    fs, root = fsspec.core.url_to_fs(cfg.output)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols:  # object stores have no directories (and gcsfs would try to create a bucket)
        fs.makedirs(root, exist_ok=True)
    parts = ["summary.json", "shards", "dead_letter", "counts", "moments.npz", EXCLUDED, EXCLUDE_IDS_FILE]
    if cfg.fits:
        parts += ["whitening.npz", "fit_summary.json"]
    for part in parts:
        _remove(cfg.path(part))


def fit_pass(cfg: JobConfig, paths: Sequence[str], opts: PipelineOptions,
             new_pipeline: Callable[[PipelineOptions], beam.Pipeline]) -> tuple[dict, dict | None]:
    """Run pass 1, fit and save ``OUT/whitening.npz``; returns (fit facts for the summary, pass-1 metrics or None
    when the runner reports none)."""
    whitening_path, moments_path = cfg.path("whitening.npz"), cfg.path("moments.npz")
    p = new_pipeline(opts)
    build_fit_pipeline(p, cfg, paths, moments_path)
    result = _run_and_wait(p, "pass 1 (fit)")
    metrics = counter_values(result, FIT_METRICS_NAMESPACE)
    moments = load_moments(moments_path, cfg.features)
    _remove(moments_path)
    frames = {name: acc.count for name, acc in moments.items()}  # from the combine's output, not from metrics
    if min(frames.values()) < 2:
        if metrics is None:
            found = "(the runner reports no metrics to say why)"
        else:
            prefix = "dead_lettered_"
            why = ", ".join(f"{k[len(prefix):]} {v}" for k, v in sorted(metrics.items()) if k.startswith(prefix))
            excluded = (f"; excluded by --exclude-ids: {metrics.get('excluded_records', 0)}"
                        if cfg.exclude_ids is not None else "")
            found = f"in {metrics.get('read_records', 0)} records (unusable: {why or 'none'}{excluded})"
        raise FitError(f"pass 1 found {min(frames.values())} usable frames {found} of {len(paths)} files; a "
                       f"whitening needs at least 2 frames; check --input and --level")
    blas = _BlasLimit(1)  # a 1024-d eigh gains little from threads and loses badly on a busy machine
    blas.enter()
    try:
        ws = fit_whitening_set(moments, dims=cfg.pca_dims, epsilon=cfg.epsilon, mode=cfg.mode,
                               shrinkage=cfg.shrinkage)
    except WhiteningError as e:
        raise FitError(f"cannot fit the whitening: {e}") from None
    finally:
        blas.exit()
    ws.save(whitening_path)
    kept = components_kept(ws)
    # printed with the job summary (format_summary), not logged as well
    warnings = [f"{name}: kept {k['kept']} of {k['requested']} components ({k['why']})"
                for name, k in kept.items() if k["kept"] < k["requested"]]
    fit = {"fitted": True, "frames": frames, "warnings": warnings, "components": kept,
           # which videos the fit left out, so that a later --stage write can tell whether it leaves out the same
           "excluded_ids_sha256": exclusion_sha256(cfg),
           "explained_variance": {name: float(ws[name].explained_variance_ratio.sum()) for name in ws.names}}
    return fit, metrics


def components_kept(ws: WhiteningSet) -> dict:
    """Per feature: components asked for and kept, the shrinkage used, and why fewer were kept."""
    out = {}
    for name in ws.names:
        w = ws[name]
        if w.dims >= w.requested_dims:
            why = "as requested"
        elif w.dims == w.count - 1:
            why = f"{w.count} frames span at most {w.count - 1} directions"
        else:
            why = (f"the other directions have variance <= {RANK_RTOL:g} x the largest (numerically empty: "
                   f"constant or collinear inputs)")
        out[name] = {"requested": w.requested_dims, "kept": w.dims, "why": why, "shrinkage": w.shrinkage}
    return out


def reuse_whitening(cfg: JobConfig) -> dict:
    """Check ``--whitening`` and copy it to ``OUT/whitening.npz`` so the output is self-describing."""
    target = cfg.path("whitening.npz")
    same = os.path.abspath(cfg.whitening) == os.path.abspath(target) if "://" not in target else (
        cfg.whitening == target)
    if not same:
        with fsspec.open(cfg.whitening, "rb") as f:
            data = f.read()
        with fsspec.open(target, "wb") as f:
            f.write(data)
    return {"fitted": False, "source": cfg.whitening}


def whitening_facts(cfg: JobConfig, whitening: WhiteningSet, sha: str, fit: dict) -> dict:
    """The summary's ``whitening`` entry: the file's identity and settings plus the fit facts (``fit_pass``)."""
    return {"sha256": sha, "feature_dims": whitening.feature_dims,
            "mode": {name: whitening[name].mode for name in cfg.features},
            "epsilon": {name: whitening[name].epsilon for name in cfg.features}, **fit}


def _read_json(path: str) -> dict | None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return None
    with fs.open(fs_path, "r") as f:
        return json.load(f)


def _glob(directory: str, pattern: str) -> tuple[object, list[str]]:
    fs, root = fsspec.core.url_to_fs(directory)
    return fs, sorted(fs.glob(posixpath.join(root, pattern)))


def output_counts(cfg: JobConfig) -> dict:
    """Counts read back from pass 2's outputs: rows of the Parquet shards and frames in their ``num_frames``
    column (``pipeline.shards``' reader, page checksums verified), dead-letter lines by reason, the per-bundle count lines summed (``BundleCounts``), and with
    ``--exclude-ids`` the lines of ``excluded/`` against the ids of ``exclude_ids.txt``."""
    try:
        paths = shards.list_shards(cfg.path("shards"))
    except shards.NoShardsFound:
        paths = []
    written = frames = 0
    ids: Counter = Counter()
    for path in paths:
        for batch in shards.iter_batches(path, columns=["id", "num_frames"]):
            written += batch.num_rows
            frames += int(batch.column("num_frames").to_numpy().sum())
            ids.update(batch.column("id").to_pylist())
    repeated = {vid: n for vid, n in ids.items() if n > 1}
    dead: Counter = Counter()
    fs, paths = _glob(cfg.path("dead_letter"), "*.jsonl")
    for path in paths:
        with fs.open(path, "r") as f:
            dead.update(json.loads(line)["reason"] for line in f if line.strip())
    counted: dict[str, float] = {}
    lines = 0
    fs, paths = _glob(cfg.path("counts"), "*.jsonl")
    for path in paths:
        with fs.open(path, "r") as f:
            for line in f:
                if line.strip():
                    lines += 1
                    for key, value in json.loads(line).items():
                        if key != "step":
                            counted[key] = counted.get(key, 0) + value
    excluded_rows, excluded_ids = 0, set()
    fs, paths = _glob(cfg.path(EXCLUDED), "*.jsonl")
    for path in paths:
        with fs.open(path, "r") as f:
            for line in f:
                if line.strip():
                    excluded_rows += 1
                    excluded_ids.add(json.loads(line)["id"])
    exclude_list = None
    if cfg.exclude_ids is not None:
        listed = read_id_list(cfg.path(EXCLUDE_IDS_FILE))
        never_seen = sorted(set(listed) - excluded_ids)
        exclude_list = {"file": cfg.exclude_ids, "ids": len(listed), "sha256": exclusion_sha256(cfg),
                        "matched": len(excluded_ids), "never_seen": len(never_seen),
                        "never_seen_examples": never_seen[:5]}
    return {"written": written, "written_frames": frames, "dead_lettered": dict(sorted(dead.items())),
            "counted": counted, "count_lines": lines, "excluded": excluded_rows, "exclude_ids": exclude_list,
            # the same video id in several records (e.g. input files listed twice, or overlapping splits merged):
            # written as they came, and reported, since which copy is right is the user's call
            "duplicate_ids": {"ids": len(repeated), "extra_rows": sum(n - 1 for n in repeated.values()),
                              "examples": {vid: repeated[vid] for vid in sorted(repeated)[:5]}}}


# Where each number of the summary comes from (summary["sources"]).
SOURCES = {
    "read": "counts/*.jsonl: read_records of the read step, one line per bundle, summed",
    "written": "shards/*.parquet: row counts in the Parquet footers",
    "written_frames": "shards/*.parquet: sum of the num_frames column",
    "dead_lettered": "dead_letter/*.jsonl: lines by reason",
    "excluded": "excluded/*.jsonl: lines, one per video left out by --exclude-ids (0 without the flag)",
    "exclude_ids": "exclude_ids.txt (the --exclude-ids list: distinct ids, sorted) against the ids of "
                   "excluded/*.jsonl: ids listed, matched by a video, never seen among the decoded videos",
    "fit_exclusion_matches": "excluded_ids_sha256 of the fit (whitening) against the sha256 of this run's "
                             "exclude_ids.txt; null when this job reused a whitening it did not fit",
    "duplicate_ids": "shards/*.parquet: ids written more than once (count, extra rows, up to 5 examples)",
    "truncated_records, truncated_frames, segments_past_end": "counts/*.jsonl: the decode step's lines, summed",
    "unwritten_segment_records": "counts/*.jsonl: the whiten step's lines, summed",
    "stage_seconds": "counts/*.jsonl: each step's own wall-clock seconds, summed over bundles and workers",
    "whitening": "fit_summary.json of the fit (frames: the count in the moments the combine wrote)",
    "metrics": "Beam metrics counters as the runner reported them (committed, else attempted); null when it "
               "reports none; compared in metrics_agree, not used for the numbers above",
}
# Steps whose own time the count lines carry, in pipeline order; the Parquet write is Beam's and is not timed.
TIMED_STEPS = ("read", "decode", "center", "whiten", "whiten_wait", "encode")
_COUNTED = ("truncated_records", "truncated_frames", "segments_past_end", "unwritten_segment_records")


def summarize(cfg: JobConfig, outputs: dict, metrics: dict | None, paths: Sequence[str], whitening: dict,
              has_segments: bool, seconds: dict) -> dict:
    """The run's summary: what was read, written and dead-lettered, and why, from ``output_counts``."""
    counted = outputs["counted"]
    dead = outputs["dead_lettered"]
    read, written, excluded = int(counted.get("read_records", 0)), outputs["written"], outputs["excluded"]
    exclusion = outputs["exclude_ids"]
    fit_matches = None
    if whitening.get("fitted") and "excluded_ids_sha256" in whitening:
        fit_matches = whitening["excluded_ids_sha256"] == (exclusion["sha256"] if exclusion else None)
    summary = {
        "stage": cfg.stage, "input": cfg.input, "output": cfg.output, "files": len(paths),
        "read": read, "written": written, "dead_lettered": dead, "dead_lettered_total": sum(dead.values()),
        "excluded": excluded, "exclude_ids": exclusion, "fit_exclusion_matches": fit_matches,
        "invariant_holds": read == written + sum(dead.values()) + excluded,
        "written_frames": outputs["written_frames"],
        "duplicate_ids": outputs["duplicate_ids"],
        **{key: int(counted.get(key, 0)) for key in _COUNTED},
        # the shards hold every row the whiten step handed to the writer
        "shards_complete": (int(counted.get("written_records", 0)), int(counted.get("written_frames", 0)))
                           == (written, outputs["written_frames"]),
        "has_segments": has_segments,
        "whitening": whitening,
        "stage_seconds": {step: round(float(counted.get(f"{step}_seconds", 0.0)), 3) for step in TIMED_STEPS},
        "seconds": seconds,
        "metrics": metrics,
        "metrics_agree": None,
        "sources": SOURCES,
    }
    if metrics is not None:
        expected = {"read_records": read, "written_records": written, "written_frames": summary["written_frames"],
                    "excluded_records": excluded,
                    **{key: summary[key] for key in _COUNTED},
                    **{f"dead_lettered_{reason}": n for reason, n in dead.items()}}
        reported = {k: v for k, v in metrics.items() if v or k in expected}
        summary["metrics_agree"] = all(reported.get(k, 0) == v for k, v in expected.items()) and all(
            k in expected for k in reported)
    return summary


def format_summary(s: dict) -> str:
    dead = ", ".join(f"{k} {v}" for k, v in s["dead_lettered"].items()) or "none"
    lines = [
        f"preprocess: {s['files']} files -> {s['output']}",
        f"  read {s['read']}, written {s['written']} ({s['written_frames']} frames), "
        f"dead-lettered {s['dead_lettered_total']} ({dead})",
        f"  truncated to 300 frames: {s['truncated_records']} records ({s['truncated_frames']} frames); "
        f"ratings past the last frame (kept): {s['segments_past_end']}",
        f"  whitening {s['whitening']['sha256'][:12]} dims {s['whitening']['feature_dims']}",
    ]
    lines += [f"  NOTE: {w}" for w in s["whitening"].get("warnings", [])]
    exclusion = s.get("exclude_ids")
    if exclusion:
        line = (f"  excluded by --exclude-ids: {s['excluded']} videos ({exclusion['matched']} of the "
                f"{exclusion['ids']} listed ids)")
        if exclusion["never_seen"]:
            n = exclusion["never_seen"]
            line += (f"; {n} listed id{'' if n == 1 else 's'} never appeared, e.g. "
                     f"{', '.join(exclusion['never_seen_examples'])}")
        lines.append(line)
    if s.get("fit_exclusion_matches") is False:
        lines.append("  WARNING: the whitening was fitted with another --exclude-ids list than this run's (either may "
                     "be none): videos left out of the shards may have shaped its statistics, or written ones not")
    if s["unwritten_segment_records"]:
        lines.append(f"  WARNING: {s['unwritten_segment_records']} records carry segment ratings that were not "
                     f"written (the first records had none, so the shards have no segment columns)")
    dup = s.get("duplicate_ids") or {}
    if dup.get("ids"):
        examples = ", ".join(f"{k} x{v}" for k, v in dup["examples"].items())
        lines.append(f"  WARNING: {dup['ids']} video ids occur in more than one record ({dup['extra_rows']} extra "
                     f"rows written), e.g. {examples}")
    if not s["invariant_holds"]:
        lines.append("  WARNING: read != written + dead-lettered + excluded; some records are unaccounted for")
    if not s["shards_complete"]:
        lines.append("  WARNING: the shards hold fewer or more rows than the whiten step counted")
    if s["metrics_agree"] is False:
        lines.append("  NOTE: the runner's metrics differ from the counts of the outputs (summary.json has both)")
    return "\n".join(lines)


def format_fit_summary(s: dict) -> str:
    w = s["whitening"]
    lines = [f"preprocess --stage fit: {s['files']} files -> {s['output']}/whitening.npz",
             f"  frames {w['frames']}, whitening {w['sha256'][:12]} dims {w['feature_dims']}"]
    return "\n".join(lines + [f"  NOTE: {note}" for note in w.get("warnings", [])])


def run(argv: Sequence[str] | None = None, save_main_session: bool = True,
        test_pipeline: Callable[[PipelineOptions], beam.Pipeline] | None = None) -> dict:
    """Run the job; returns the summary (also written to ``OUT/summary.json``), or with ``--stage fit`` the fit
    summary (``OUT/fit_summary.json``).

    Args:
        argv: our flags and Beam options; default ``sys.argv[1:]``.
        save_main_session: pickle ``__main__``'s globals for the workers (Beam examples' convention).
        test_pipeline: a factory ``options -> beam.Pipeline`` used for both passes instead of
            ``beam_jobs.options.new_pipeline`` (e.g. ``lambda o: TestPipeline(options=o)``).
    """
    args, beam_args = get_args_parser().parse_known_args(argv)
    cfg = resolve_config(args)
    opts = job_options.make_pipeline_options(beam_args, save_main_session)
    cfg = resolve_whiten_ahead(cfg, opts)
    new_pipeline = test_pipeline or job_options.new_pipeline
    paths = match_input(cfg.input)
    if cfg.whitening is not None:
        load_whitening_for(cfg.whitening, cfg)  # fail before touching OUT
    exclude_ids = read_exclude_ids(cfg)  # read before prepare_output, which deletes an earlier OUT/exclude_ids.txt
    prepare_output(cfg)
    if exclude_ids is not None:
        # the pipelines read this copy: Dataflow workers reach OUT, not the launching machine's files
        write_id_list(cfg.path(EXCLUDE_IDS_FILE), sorted(exclude_ids))
    config = {**asdict(cfg), "runner": job_options.runner_name(opts), "beam_version": beam.__version__,
              "input_files": len(paths), "beam_options": opts.get_all_options(drop_default=True)}
    _write_text(cfg.path("config.json"), json.dumps(config, indent=1, sort_keys=True, default=str) + "\n")

    seconds = {}
    whitening_path = cfg.path("whitening.npz")
    if cfg.fits:
        start = time.perf_counter()
        fit, fit_metrics = fit_pass(cfg, paths, opts, new_pipeline)
        seconds["fit"] = round(time.perf_counter() - start, 3)
        whitening = load_whitening_for(whitening_path, cfg)
        sha = file_sha256(whitening_path)
        facts = whitening_facts(cfg, whitening, sha, fit)
        fit_summary = {"stage": "fit", "input": cfg.input, "output": cfg.output, "files": len(paths),
                       "whitening": facts, "seconds": {"fit": seconds["fit"]}, "metrics": fit_metrics,
                       "config": config, "sources": {"whitening": SOURCES["whitening"],
                                                     "metrics": SOURCES["metrics"]}}
        _write_text(cfg.path("fit_summary.json"), json.dumps(fit_summary, indent=1, sort_keys=True,
                                                             default=str) + "\n")
        if not cfg.writes:
            print(format_fit_summary(fit_summary))
            return json.loads(json.dumps(fit_summary, sort_keys=True, default=str))
    else:
        reused = reuse_whitening(cfg)
        whitening = load_whitening_for(whitening_path, cfg)
        sha = file_sha256(whitening_path)
        earlier = _read_json(cfg.path("fit_summary.json"))  # a --stage fit into this OUT fitted these statistics
        if earlier is not None and earlier.get("whitening", {}).get("sha256") == sha:
            facts = earlier["whitening"]
        else:
            facts = whitening_facts(cfg, whitening, sha, reused)
    has_segments = detect_segments(paths, cfg.level)
    schema = shards.shard_schema({name: whitening[name].output_dim for name in cfg.features}, dtype=cfg.dtype,
                                 has_segments=has_segments, level=cfg.level, whitening_sha256=sha)

    start = time.perf_counter()
    p = new_pipeline(opts)
    build_write_pipeline(p, cfg, paths, whitening_path, schema, has_segments)
    result = _run_and_wait(p, "pass 2 (write)")
    seconds["write"] = round(time.perf_counter() - start, 3)
    summary = summarize(cfg, output_counts(cfg), counter_values(result, METRICS_NAMESPACE), paths, facts,
                        has_segments, seconds)
    text = json.dumps(summary, indent=1, sort_keys=True) + "\n"
    _write_text(cfg.path("summary.json"), text)
    print(format_summary(summary))
    return json.loads(text)


def main(argv: Sequence[str] | None = None) -> int:
    return job_options.run_job(run, argv)


if __name__ == "__main__":
    # Re-import under the package name so DoFns pickle as beam_jobs.preprocess.X, importable on every worker.
    from beam_jobs.preprocess import main as _package_main

    sys.exit(_package_main())
