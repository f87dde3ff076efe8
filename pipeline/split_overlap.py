"""Video ids shared by two prepared splits: the check that catches training on what a model is evaluated on.

    python -m pipeline.split_overlap A B [--ids-out FILE] [--json]

A and B are prepared splits: a ``beam_jobs.preprocess`` output directory, a directory or glob of Parquet shards, a
single shard, or any fsspec URL of these (whatever ``pipeline.shards.list_shards`` takes); only the ``id`` column
is read, never the frames. Raw YouTube-8M TFRecords (a ``*.tfrecord`` file or glob, or a directory holding them
and no Parquet shards) work too: only each record's context is parsed (see ``pipeline.records.record_id``).

Why it matters on the real corpus: the 2019 segment-rated validation set was drawn from the 2018 validation set, so
a model trained on 2018 validation videos and evaluated on the 2019 ratings has seen many of its test videos.
``beam_jobs.preprocess --exclude-ids FILE`` leaves the ids that ``--ids-out`` writes out of a split.

Exit status: 0 when the splits share no id, 1 when they do (so a CI step can fail on a leak), 2 on errors (one
line on stderr).

Id lists (``--ids-out``, ``--exclude-ids``) are text files with one id per line; ``read_id_list`` ignores blank
lines and lines starting with ``#``.
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards
from pipeline.errors import RecordError, TFRecordCorruption, Yt8mError
from pipeline.records import record_id
from pipeline.storage import user_error_line
from pipeline.tfrecord import read_records
from pipeline.whitening import write_bytes_atomically

EXAMPLES = 10  # overlapping ids printed
READ_THREADS = 8  # shards read at once: remote reads wait on the network, not on this process
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
_GLOB_CHARS = set("*?[")


class SplitOverlapError(Yt8mError):
    """A split cannot be read as asked (a glob matching TFRecords and other files)."""


class IdListError(Yt8mError):
    """An id list file cannot be read, or a line of it is not one video id."""


# -- id lists --------------------------------------------------------------------------------------------------
def parse_id_lines(lines: Iterable[str], source: str = "id list") -> list[str]:
    """The distinct ids of ``lines`` in first-seen order: one id per line, surrounding spaces stripped, blank lines
    and lines starting with ``#`` skipped.

    Raises ``IdListError`` for a line holding whitespace inside (two ids on a line, or a trailing comment): a
    YouTube id never contains one, and silently taking the whole line would exclude nothing.
    """
    ids: dict[str, None] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if len(text.split()) != 1:
            raise IdListError(f"{source} line {number}: {text[:60]!r} is not one video id (one id per line; "
                              f"comments on lines of their own, starting with '#')")
        ids[text] = None
    return list(ids)


def read_id_list(path: str | os.PathLike) -> list[str]:
    """The distinct ids of an id list file (local path or fsspec URL), in file order (``parse_id_lines``)."""
    path = str(path)
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise IdListError(f"id list {path}: no such file") from None
    except IsADirectoryError:
        raise IdListError(f"id list {path} is a directory, not a file of ids") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a spreadsheet export is not part of the first id
    except UnicodeDecodeError as e:
        raise IdListError(f"id list {path} is not UTF-8 text (byte {e.start}); expected one id per line") from None
    return parse_id_lines(text.splitlines(), source=path)


def write_id_list(path: str | os.PathLike, ids: Iterable[str]) -> int:
    """Write ``ids`` one per line to ``path`` (local or fsspec URL); returns how many. A local file appears only
    when complete (temporary name, then rename); an object store publishes an object when its upload completes."""
    ids = list(ids)
    try:
        write_bytes_atomically(path, "".join(f"{i}\n" for i in ids).encode("utf-8"))
    except IsADirectoryError:
        raise IdListError(f"cannot write ids to {path}: it is a directory") from None
    except (NotADirectoryError, PermissionError) as e:
        raise IdListError(f"cannot write ids to {path} ({e.strerror or e})") from None
    return len(ids)


# -- reading a split's ids -------------------------------------------------------------------------------------
def _is_tfrecord(path: str) -> bool:
    return posixpath.basename(path).endswith(TFRECORD_SUFFIXES)


def _is_local(fs) -> bool:
    proto = fs.protocol
    return "file" in ((proto,) if isinstance(proto, str) else tuple(proto))


def split_files(path: str | os.PathLike) -> tuple[str, list[str]]:
    """``("parquet", shards)`` or ``("tfrecord", files)`` of a split.

    Parquet shards are found exactly as ``pipeline.shards.list_shards`` finds them; TFRecords are a ``*.tfrecord``
    file, a glob matching only such files, or a directory holding them and no Parquet shards. Raises
    ``NoShardsFound`` when nothing matches, ``SplitOverlapError`` when a glob mixes TFRecords with other files.
    """
    path = str(path)
    fs, fs_path = fsspec.core.url_to_fs(path)

    def named(found: list[str]) -> list[str]:
        return sorted(p if _is_local(fs) else fs.unstrip_protocol(p) for p in found)

    if _GLOB_CHARS & set(fs_path):
        matched = [p for p in fs.glob(fs_path) if fs.isfile(p)]
        records = [p for p in matched if _is_tfrecord(p)]
        if records and len(records) < len(matched):
            raise SplitOverlapError(f"{path} matches TFRecord files and other files; give a pattern that "
                                    f"matches one kind")
        if records:
            return "tfrecord", named(records)
    elif fs.isdir(fs_path):
        try:
            return "parquet", shards.list_shards(path)
        except shards.NoShardsFound:
            records = fs.glob(posixpath.join(fs_path, "*.tfrecord")) + fs.glob(posixpath.join(fs_path, "*.tfrecords"))
            if not records:
                raise shards.NoShardsFound(f"no Parquet shards or TFRecords at {path} (looked for shards/*.parquet, "
                                           f"*.parquet and *.tfrecord)") from None
            return "tfrecord", named(records)
    elif _is_tfrecord(fs_path) and fs.isfile(fs_path):
        return "tfrecord", [path]
    return "parquet", shards.list_shards(path)


def _parquet_ids(path: str) -> tuple[pa.Array, int]:
    chunks = [batch.column(0) for batch in shards.iter_batches(path, columns=["id"])]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string()), 0


def _tfrecord_ids(path: str) -> tuple[pa.Array, int]:
    ids, unreadable = [], 0
    for item in read_records(path, on_error="yield"):
        if isinstance(item, TFRecordCorruption):
            unreadable += 1
            continue
        try:
            ids.append(record_id(item[1]))
        except RecordError:
            unreadable += 1
    return pa.array(ids, pa.string()), unreadable


@dataclass
class SplitIds:
    """Every id of one split, one per row or record, in file order.

    Args:
        path: the split as given.
        kind: "parquet" or "tfrecord".
        files: how many files were read.
        ids: string ids (rows x 1), duplicates included.
        unreadable: TFRecord records whose id could not be read (framing corruption, unparsable record, no id);
            always 0 for Parquet, whose files either read or raise.
    """
    path: str
    kind: str
    files: int
    ids: pa.ChunkedArray
    unreadable: int = 0


def read_split_ids(path: str | os.PathLike, threads: int = READ_THREADS) -> SplitIds:
    """Read the ids of a split (see ``split_files``), ``threads`` files at a time; only the ``id`` column of a
    Parquet shard is read."""
    kind, files = split_files(path)
    reader = _parquet_ids if kind == "parquet" else _tfrecord_ids
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        parts = list(pool.map(reader, files))
    ids = pa.chunked_array([p[0] for p in parts], type=pa.string())
    return SplitIds(path=str(path), kind=kind, files=len(files), ids=ids, unreadable=sum(p[1] for p in parts))


# -- comparing two splits --------------------------------------------------------------------------------------
@dataclass
class SplitStats:
    """What one split holds: ``videos`` rows (records), ``unique_ids`` distinct ids, ``duplicated_ids`` ids on more
    than one row, ``extra_rows`` rows beyond the first of each id (videos = unique_ids + extra_rows)."""
    path: str
    kind: str
    files: int
    videos: int
    unique_ids: int
    duplicated_ids: int
    extra_rows: int
    unreadable_records: int


@dataclass
class OverlapReport:
    """Ids in both splits. ``fraction_of_b``: overlap / B's unique ids (None when B is empty); ``examples``: the
    first ``EXAMPLES`` overlapping ids in sorted order; ``overlap_ids``: all of them, sorted (not in ``to_dict``)."""
    a: SplitStats
    b: SplitStats
    overlap: int
    fraction_of_b: float | None
    examples: list[str]
    overlap_ids: list[str] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["overlap_ids"]
        return out


def _unique(split: SplitIds) -> tuple[pa.Array, SplitStats]:
    """(distinct ids, stats) of a split, counted by Arrow: millions of ids stay in Arrow buffers, not Python."""
    counts = pc.value_counts(split.ids) if len(split.ids) else None
    if counts is None:
        unique, repeated = pa.array([], pa.string()), pa.array([], pa.int64())
    else:
        unique, per_id = counts.field("values"), counts.field("counts")
        repeated = pc.filter(per_id, pc.greater(per_id, 1))
    stats = SplitStats(path=split.path, kind=split.kind, files=split.files, videos=len(split.ids),
                       unique_ids=len(unique), duplicated_ids=len(repeated),
                       extra_rows=int(pc.sum(repeated).as_py() or 0) - len(repeated),
                       unreadable_records=split.unreadable)
    return unique, stats


def compare_splits(a: SplitIds, b: SplitIds, examples: int = EXAMPLES) -> OverlapReport:
    """Count the ids of ``b`` that also occur in ``a`` (each distinct id once)."""
    unique_a, stats_a = _unique(a)
    unique_b, stats_b = _unique(b)
    shared = pc.filter(unique_b, pc.is_in(unique_b, value_set=unique_a))
    overlap_ids = sorted(shared.to_pylist())
    fraction = len(overlap_ids) / stats_b.unique_ids if stats_b.unique_ids else None
    return OverlapReport(a=stats_a, b=stats_b, overlap=len(overlap_ids), fraction_of_b=fraction,
                         examples=overlap_ids[:examples], overlap_ids=overlap_ids)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_report(report: OverlapReport) -> str:
    """The lines the command prints."""
    lines = []
    for name, s in (("A", report.a), ("B", report.b)):
        line = (f"{name}: {s.path} ({s.kind}, {_plural(s.files, 'file')}): {s.videos} videos, {s.unique_ids} unique "
                f"ids, {s.duplicated_ids} duplicated ids ({s.extra_rows} extra rows)")
        if s.unreadable_records:
            line += f", {s.unreadable_records} unreadable records left out"
        lines.append(line)
    if report.fraction_of_b is None:
        share = "B holds no video"
    else:
        share = f"{100 * report.fraction_of_b:.2f}% of B's unique ids are in A"
    lines.append(f"overlap: {report.overlap} ids ({share})")
    if report.overlap:
        more = f" ... ({report.overlap - len(report.examples)} more)" if report.overlap > len(report.examples) else ""
        lines.append(f"examples: {' '.join(report.examples)}{more}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.split_overlap", description=__doc__.splitlines()[0],
        epilog="Exit status: 0 no shared id, 1 shared ids (a leak), 2 error.")
    p.add_argument("a", metavar="A", help="first split: preprocess output dir, Parquet dir/glob/file or TFRecords "
                                          "(local or fsspec URL), e.g. the training split")
    p.add_argument("b", metavar="B", help="second split, e.g. the evaluation split; the overlap is given as a share "
                                          "of B")
    p.add_argument("--ids-out", default=None,
                   help="write every shared id to this file, one per line (empty when none); "
                        "beam_jobs.preprocess --exclude-ids reads it")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    return p


def run(args: argparse.Namespace) -> OverlapReport:
    """Read both splits, compare them, print the report and write ``--ids-out``."""
    report = compare_splits(read_split_ids(args.a), read_split_ids(args.b))
    if args.ids_out is not None:
        write_id_list(args.ids_out, report.overlap_ids)
    print(json.dumps(report.to_dict(), indent=1, sort_keys=True) if args.json else format_report(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit status: 0 no overlap, 1 overlap, 2 error (one line on stderr, as
    ``model.engine.cli`` prints it)."""
    args = get_args_parser().parse_args(argv)
    try:
        report = run(args)
    except Exception as e:  # project errors, missing files, object-store failures: one line, not a traceback
        line = user_error_line(e, sys.argv[1:] if argv is None else argv)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    return 1 if report.overlap else 0


if __name__ == "__main__":
    sys.exit(main())
