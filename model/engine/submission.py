"""The official YouTube-8M submission CSVs: write them, read them back, and recompute GAP from one.

Video level (2018 challenge): header ``VideoId,LabelConfidencePairs``, then one line per video,
``vid,label score label score ...``: its top 20 classes, best first, scores with 6 decimals.

Segment level (2019 challenge): header ``Class,Segments``, then one line per class,
``class_id,vid:start vid:start ...``: best first, at most 100,000 segments.

The readers accept the header or its absence, a UTF-8 byte-order mark, CRLF line ends, surrounding whitespace and
blank lines, and files opened in text or binary mode; video ids always come back as ``str``. A malformed line
raises :class:`SubmissionFormatError` with its 1-based line number. Paths with ``://`` go through fsspec.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from model.metrics.video import SEGMENT_TOP_K, as_numpy, as_str_id, average_precision, top_k_per_row
from pipeline.errors import Yt8mError

VIDEO_HEADER = "VideoId,LabelConfidencePairs"
SEGMENT_HEADER = "Class,Segments"
VIDEO_TOP_K = 20


class SubmissionFormatError(Yt8mError):
    """A submission line that does not follow the format (``line_number`` is 1-based; 0: not tied to a line)."""

    def __init__(self, line_number: int, message: str):
        self.line_number = line_number
        self.message = message
        super().__init__(f"line {line_number}: {message}" if line_number else message)


# ---------------------------------------------------------------------------------------------------------------
# plumbing

def _open(target: Any, mode: str):
    """(file object, whether we opened it) for a path, an fsspec URL or an open file."""
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        encoding = "utf-8-sig" if "r" in mode else "utf-8"
        if "://" in path:
            import fsspec  # only remote paths need it

            return fsspec.open(path, mode, encoding=encoding, newline="" if "w" in mode else None).open(), True
        return open(path, mode, encoding=encoding, newline="" if "w" in mode else None), True
    return target, False


def _lines(source: Any) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of every non-blank line; bytes are decoded as UTF-8, a BOM is dropped."""
    f, owned = _open(source, "r")
    try:
        for number, line in enumerate(f, 1):
            if isinstance(line, (bytes, bytearray)):
                try:
                    line = bytes(line).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SubmissionFormatError(number, f"not UTF-8 text ({e.reason})") from None
            if number == 1:
                line = line.lstrip("\ufeff")
            line = line.strip()
            if line:
                yield number, line
    finally:
        if owned:
            f.close()


def _is_header(line: str, header: str) -> bool:
    return line.replace(" ", "").lower() == header.lower()


def _skip_header(line: str, header: str, other_header: str) -> bool:
    """True for this format's header; the other format's header raises (a common mix-up)."""
    if _is_header(line, other_header):
        raise SubmissionFormatError(1, f"header {other_header!r}: this is the other submission format, "
                                       f"expected {header!r}")
    return _is_header(line, header)


def _check_id(vid: Any, line_number: int) -> str:
    vid = as_str_id(vid)
    if not vid or any(ch.isspace() or ch == "," for ch in vid):
        raise SubmissionFormatError(line_number, f"video id {vid!r} is empty or holds a comma or whitespace")
    return vid


def _parse_int(token: str, what: str, line_number: int) -> int:
    try:
        value = int(token)
    except ValueError:
        raise SubmissionFormatError(line_number, f"{what} {token!r} is not an integer") from None
    if value < 0:
        raise SubmissionFormatError(line_number, f"{what} {value} is negative")
    return value


# ---------------------------------------------------------------------------------------------------------------
# video level


IMAGE_HEADER = "ImageId,LabelConfidencePairs"


class _SubmissionWriter:
    """A CSV target that is closed on ``close()`` when this writer opened it, else flushed; usable as ``with``."""

    _file: Any
    _owned: bool

    def close(self) -> None:
        if self._owned:
            self._file.close()
        else:
            self._file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImagePredictionWriter(_SubmissionWriter):
    """The image twin of the video submission: header ``ImageId,LabelConfidencePairs``, then one row per image, its
    COCO image id and space-separated ``category_id probability`` pairs for every class, in label-map order.

    Args:
        target: path (local or fsspec URL) or an open text file (left open by :meth:`close`).
        category_ids: (K,) COCO category ids, in the model's label order.
    """

    def __init__(self, target: Any, category_ids: Sequence[int]):
        self.category_ids = [int(c) for c in category_ids]
        self._file, self._owned = _open(target, "w")
        self.images = 0
        self._file.write(IMAGE_HEADER + "\n")

    def write(self, image_ids: Sequence[Any], probs: Any) -> None:
        """One batch: ``image_ids`` (B,), ``probs`` (B, K) probabilities."""
        p = as_numpy(probs)
        if p.ndim != 2 or p.shape != (len(image_ids), len(self.category_ids)):
            raise SubmissionFormatError(0, f"{len(image_ids)} image ids and {len(self.category_ids)} classes but "
                                           f"probabilities of shape {p.shape}")
        for image_id, row in zip(image_ids, p.tolist()):
            pairs = " ".join(f"{c} {v:.6f}" for c, v in zip(self.category_ids, row))
            self._file.write(f"{image_id},{pairs}\n")
        self.images += len(image_ids)


class VideoPredictionWriter(_SubmissionWriter):
    """Writes the video-level submission batch by batch: header, then each video's top ``top_k`` classes.

    Args:
        target: path (local or fsspec URL) or an open text file (left open by :meth:`close`).
        top_k: classes per video (official: 20); ties as in :func:`model.metrics.video.top_k_per_row`.
        header: write the ``VideoId,LabelConfidencePairs`` header line.
    """

    def __init__(self, target: Any, top_k: int = VIDEO_TOP_K, header: bool = True):
        if top_k < 1:
            raise SubmissionFormatError(0, f"top_k must be >= 1, got {top_k}")
        self.top_k = int(top_k)
        self._file, self._owned = _open(target, "w")
        self._line = 0
        self.videos = 0
        if header:
            self._emit(VIDEO_HEADER)

    def _emit(self, text: str) -> None:
        self._file.write(text + "\n")
        self._line += 1

    def write(self, ids: Sequence[Any], scores: Any) -> None:
        """One batch: ``ids`` (B,) str (bytes are decoded), ``scores`` (B, K) array or tensor."""
        s = as_numpy(scores)
        if s.ndim != 2 or s.shape[0] != len(ids):
            raise SubmissionFormatError(0, f"{len(ids)} ids but scores of shape {s.shape}")
        if len(ids) == 0:
            return
        values, labels = top_k_per_row(s, self.top_k)
        for i, vid in enumerate(ids):
            vid = _check_id(vid, self._line + 1)
            pairs = " ".join(f"{label} {value:.6f}" for label, value in zip(labels[i].tolist(), values[i].tolist()))
            self._emit(f"{vid},{pairs}")
        self.videos += len(ids)



def write_video_predictions(target: Any, ids: Sequence[Any], scores: Any, top_k: int = VIDEO_TOP_K) -> int:
    """Whole-array form of :class:`VideoPredictionWriter`; returns the number of videos written."""
    with VideoPredictionWriter(target, top_k=top_k) as w:
        w.write(ids, scores)
    return w.videos


def iter_video_predictions(source: Any, num_classes: int | None = None
                           ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields ``(video id, labels int64 (n,), scores float64 (n,))`` per line, in file order.

    A video may list no pair (``vid,``). Raises :class:`SubmissionFormatError` on an odd number of tokens, a
    label that is not a non-negative integer (or is >= ``num_classes``), a score that is not a finite number,
    or a label listed twice for one video.
    """
    for _, vid, labels, scores in _video_lines(source, num_classes):
        yield vid, labels, scores


def _video_lines(source: Any, num_classes: int | None = None
                 ) -> Iterator[tuple[int, str, np.ndarray, np.ndarray]]:
    for number, line in _lines(source):
        if number == 1 and _skip_header(line, VIDEO_HEADER, SEGMENT_HEADER):
            continue
        vid, sep, rest = line.partition(",")
        if not sep:
            raise SubmissionFormatError(number, f"expected 'VideoId,label score ...', got {line[:60]!r}")
        vid = _check_id(vid.strip(), number)
        tokens = rest.split()
        if len(tokens) % 2:
            raise SubmissionFormatError(number, f"{len(tokens)} tokens after the id: labels and scores must pair up")
        labels = np.array([_parse_int(t, "label", number) for t in tokens[0::2]], dtype=np.int64)
        try:
            scores = np.array([float(t) for t in tokens[1::2]], dtype=np.float64)
        except ValueError as e:
            raise SubmissionFormatError(number, f"score is not a number ({e})") from None
        if not np.all(np.isfinite(scores)):
            raise SubmissionFormatError(number, "score is not finite")
        if num_classes is not None and labels.size and labels.max() >= num_classes:
            raise SubmissionFormatError(number, f"label {labels.max()} >= number of classes {num_classes}")
        if np.unique(labels).size != labels.size:
            raise SubmissionFormatError(number, "a label appears twice")
        yield number, vid, labels, scores


def read_video_predictions(source: Any, num_classes: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{video id: (labels, scores)}``; a video listed twice raises :class:`SubmissionFormatError`."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for number, vid, labels, scores in _video_lines(source, num_classes):
        if vid in out:
            raise SubmissionFormatError(number, f"video {vid!r} is listed twice")
        out[vid] = (labels, scores)
    return out


@dataclass
class CsvGap:
    """GAP recomputed from a video-level submission."""

    gap: float
    videos: int  # submitted videos that have ground truth
    pairs: int  # (label, score) pairs ranked
    positives: int  # all ground-truth labels (the denominator)
    missing_videos: int  # videos with ground truth but no line: their labels count as missed
    unknown_videos: int  # lines for videos without ground truth: not ranked
    truncated_pairs: int  # pairs beyond a video's best top_k: not ranked


def recompute_gap_from_csv(source: Any, labels_by_id: Mapping[str, Iterable[int]], top_k: int = VIDEO_TOP_K
                           ) -> CsvGap:
    """GAP as the official metric defines it, from a ``VideoId,LabelConfidencePairs`` file.

    Each listed video contributes its best ``top_k`` pairs (by score, ties: lower label first); the denominator
    is every label in ``labels_by_id`` ({video id: label ids}), so videos missing from the file count as missed.
    Ties across videos follow the block rule of :mod:`model.metrics.video`; the result therefore equals
    ``VideoMetrics(...).compute()["gap"]`` on the same scores, and differs from it on raw scores only by the
    rounding to 6 decimals. Memory: 9 bytes per ranked pair.
    """
    truth = {as_str_id(vid): {int(l) for l in labels} for vid, labels in labels_by_id.items()}
    scores: list[np.ndarray] = []
    rels: list[np.ndarray] = []
    seen: set[str] = set()
    unknown = truncated = 0
    for number, vid, labels, values in _video_lines(source):
        if vid in seen:
            raise SubmissionFormatError(number, f"video {vid!r} is listed twice")
        seen.add(vid)
        if vid not in truth:
            unknown += 1
            continue
        if labels.size > top_k:
            order = np.lexsort((labels, -values))[:top_k]
            truncated += labels.size - top_k
            labels, values = labels[order], values[order]
        gt = truth[vid]
        scores.append(values)
        rels.append(np.fromiter((int(l) in gt for l in labels.tolist()), dtype=bool, count=labels.size))
    positives = sum(len(v) for v in truth.values())
    score = np.concatenate(scores) if scores else np.zeros(0)
    rel = np.concatenate(rels) if rels else np.zeros(0, dtype=bool)
    return CsvGap(gap=average_precision(score, rel, num_positives=positives), videos=len(seen) - unknown,
                  pairs=int(score.size), positives=positives, missing_videos=sum(1 for v in truth if v not in seen),
                  unknown_videos=unknown, truncated_pairs=truncated)


# ---------------------------------------------------------------------------------------------------------------
# segment level


@dataclass
class SegmentWriteSummary:
    classes: int  # lines written (without the header)
    segments: int  # segments written
    truncated: int  # segments past max_per_class, not written


def write_segment_submission(target: Any, ranked: Mapping[int, Sequence[tuple[Any, Any]]],
                             max_per_class: int = SEGMENT_TOP_K) -> SegmentWriteSummary:
    """Writes ``Class,Segments``: one line per class (ascending class id), its segments ``(video id, start
    time)`` best first, the first ``max_per_class`` of them (the rest is counted in ``truncated``)."""
    if max_per_class < 1:
        raise SubmissionFormatError(0, f"max_per_class must be >= 1, got {max_per_class}")
    f, owned = _open(target, "w")
    summary = SegmentWriteSummary(0, 0, 0)
    try:
        f.write(SEGMENT_HEADER + "\n")
        for line_number, cls in enumerate(sorted(int(c) for c in ranked), 2):
            if cls < 0:
                raise SubmissionFormatError(line_number, f"class id {cls} is negative")
            segments = list(ranked[cls])
            kept = segments[:max_per_class]
            tokens = []
            for vid, start in kept:
                start = int(start)
                if start < 0:
                    raise SubmissionFormatError(line_number, f"start time {start} is negative")
                tokens.append(f"{_check_id(vid, line_number)}:{start}")
            f.write(f"{cls}," + " ".join(tokens) + "\n")
            summary.classes += 1
            summary.segments += len(kept)
            summary.truncated += len(segments) - len(kept)
    finally:
        if owned:
            f.close()
        else:
            f.flush()
    return summary


def read_segment_submission(source: Any) -> dict[int, list[tuple[str, int]]]:
    """``{class id: [(video id, start time), ...]}`` in file order (best first). A class listed twice, a class
    id or start time that is not a non-negative integer, or a token without ``vid:start`` form raises
    :class:`SubmissionFormatError`. A class with no segment (``3,``) is kept with an empty list."""
    out: dict[int, list[tuple[str, int]]] = {}
    for number, line in _lines(source):
        if number == 1 and _skip_header(line, SEGMENT_HEADER, VIDEO_HEADER):
            continue
        cls_text, sep, rest = line.partition(",")
        if not sep:
            raise SubmissionFormatError(number, f"expected 'Class,vid:start ...', got {line[:60]!r}")
        cls = _parse_int(cls_text.strip(), "class id", number)
        if cls in out:
            raise SubmissionFormatError(number, f"class {cls} is listed twice")
        segments = []
        for token in rest.split():
            vid, colon, start = token.rpartition(":")
            if not colon or not vid:
                raise SubmissionFormatError(number, f"segment {token!r} is not of the form vid:start")
            segments.append((_check_id(vid, number), _parse_int(start, "start time", number)))
        out[cls] = segments
    return out


def segment_map_from_csv(source: Any, ratings: Mapping[int, Mapping[tuple[str, int], int]],
                         k: int = SEGMENT_TOP_K):
    """:func:`model.metrics.video.segment_map_report` of a ``Class,Segments`` file."""
    from model.metrics.video import segment_map_report

    return segment_map_report(read_segment_submission(source), ratings, k)
