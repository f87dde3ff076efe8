"""YouTube-8M record codec: serialized ``tf.train.SequenceExample`` / ``tf.train.Example`` <-> ``VideoRecord``.

The wire format is done by this project's own protobuf classes (``pipeline.example_proto``: same field numbers and
types as ``tf.train``), so neither decoding nor encoding imports TensorFlow; this module adds the YouTube-8M
conventions (quantized uint8 frames, 300-frame cap, 2019 segment ratings) and checks every record, raising
``RecordError`` with a reason code instead of handing malformed arrays downstream.

Frames and mean features are read in bulk: a parsed feature list (or float list) is serialized back once and,
when it has the canonical layout (every frame one bytes value of the expected size; a packed float list), viewed
with numpy instead of walking ~600 frame messages in Python. Anything else takes the per-frame path, which
finds and names the problem; both give the same arrays.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from pipeline.errors import RecordError

RGB_DIM = 1024
AUDIO_DIM = 128
MAX_FRAMES = 300
VOCAB_SIZE = 3862
LEGACY_VOCAB_SIZE = 4716
FEATURE_DIMS = {"rgb": RGB_DIM, "audio": AUDIO_DIM}
SEGMENT_FRAMES = 5

# Official quantization: 256 levels over [-2, 2]; a byte stands for the centre of its bin.
QUANT_MIN, QUANT_MAX = -2.0, 2.0
# dequantized = code * DEQUANT_SCALE + DEQUANT_BIAS, in float32 as the official reader computes it
DEQUANT_SCALE = np.float32((QUANT_MAX - QUANT_MIN) / 255.0)
DEQUANT_BIAS = np.float32((QUANT_MAX - QUANT_MIN) / 512.0 + QUANT_MIN)

_SEGMENT_KEYS = ("segment_start_times", "segment_end_times", "segment_labels", "segment_scores")


def dequantize(q: np.ndarray) -> np.ndarray:
    """uint8 codes -> float32 values, ``q * 4/255 + 4/512 - 2`` (0 -> -1.9921875, 255 -> 2.0078125).

    Computed in float32 in the same order as the official reader, so results equal TensorFlow's bit for bit.
    """
    return np.asarray(q).astype(np.float32) * DEQUANT_SCALE + DEQUANT_BIAS


def quantize(x: np.ndarray) -> np.ndarray:
    """float values -> uint8 codes: clip to [-2, 2], then ``round((x + 2) * 255 / 4)`` (ties to even).

    This is the official writer's rule. With the official ``dequantize`` codes round-trip exactly, but values come
    back 4/512 too high on average (``dequantize(quantize(x)) - x`` lies in 4/512 +- 2/255).
    """
    x = np.clip(np.asarray(x, dtype=np.float64), QUANT_MIN, QUANT_MAX)
    return np.round((x - QUANT_MIN) * (255.0 / (QUANT_MAX - QUANT_MIN))).astype(np.uint8)


@dataclass
class VideoRecord:
    """One video as YouTube-8M stores it.

    Frame level keeps the quantized uint8 matrices ``(T, D)``; video level keeps the float32 means as ``(1, D)``.
    Segment arrays are all ``None`` or all of one length; ``segment_start_times[i]`` is the first frame of a
    5-frame segment rated ``segment_scores[i]`` (1 positive, 0 negative) for class ``segment_labels[i]``.
    Every rating of the record is kept, also those that start outside the video's (kept) frames: the official
    segment evaluation counts such a positive rating in its class's denominator although no submission can hit
    it. ``segments_past_end`` counts them; ``segment_outside_frames`` says which they are.

    Args:
        id: video id (4 characters in 2018+ data).
        labels: int32 class ids, shape (L,).
        rgb: (T, 1024) uint8 codes (frame level) or (1, 1024) float32 (video level).
        audio: (T, 128) like ``rgb``, or None when the record has no audio.
        segment_start_times: int32 (S,) or None.
        segment_labels: int32 (S,) or None.
        segment_scores: float32 (S,) or None.
        level: "frame" or "video".
        truncated_frames: frames cut off past ``max_frames`` while decoding.
    """

    id: str
    labels: np.ndarray
    rgb: np.ndarray
    audio: np.ndarray | None = None
    segment_start_times: np.ndarray | None = None
    segment_labels: np.ndarray | None = None
    segment_scores: np.ndarray | None = None
    level: str = "frame"
    truncated_frames: int = 0

    @property
    def num_frames(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def has_segments(self) -> bool:
        return self.segment_start_times is not None

    @property
    def segments_past_end(self) -> int:
        """Ratings whose segment starts outside the kept frames (at or past the last frame, or before frame 0):
        kept in the record and in the shards, never trained on, unhittable positives for the segment MAP."""
        if self.segment_start_times is None:
            return 0
        return int(segment_outside_frames(self.segment_start_times, self.num_frames).sum())

    def features(self, name: str) -> np.ndarray:
        """The (T, D) float32 matrix of feature ``name`` ("rgb" or "audio"), dequantized when stored as uint8."""
        if name not in FEATURE_DIMS:
            raise KeyError(f"unknown feature {name!r}; expected one of {sorted(FEATURE_DIMS)}")
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"video {self.id} has no {name} feature")
        if value.dtype == np.uint8:
            return dequantize(value)
        return np.asarray(value, dtype=np.float32)


def segment_outside_frames(start_times: Any, num_frames: int) -> np.ndarray:
    """(S,) bool: True where a rated segment starts outside frames ``[0, num_frames)`` of its video.

    This is how such ratings are told apart everywhere (records, Parquet rows, loader batches): no flag column,
    the start time and the video's ``num_frames`` say it, so shards written before these ratings were kept read
    the same way (they simply hold none).
    """
    starts = np.asarray(start_times).reshape(-1)
    return (starts < 0) | (starts >= int(num_frames))


def _protos() -> Any:
    """The protobuf classes of the record schema (``Example``, ``SequenceExample``, ``Feature``, ...): this project's
    ``pipeline.example_proto``, wire-compatible with ``tf.train``; no TensorFlow import."""
    from pipeline import example_proto

    return example_proto


def _parse(data: bytes, message_name: str) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected serialized bytes, got {type(data).__name__}")
    cls = getattr(_protos(), message_name)
    try:
        return cls.FromString(bytes(data))
    except DecodeError as e:
        raise RecordError("unparsable", f"bytes are not a tf.train.{message_name} ({e})") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


@functools.lru_cache(maxsize=None)
def _frame_prefix(dim: int) -> bytes:
    """The bytes before a frame's ``dim`` codes in a serialized ``FeatureList`` whose every frame is one bytes value
    of ``dim`` bytes: ``feature`` tag + length, ``bytes_list`` tag + length, ``value`` tag + length."""
    bytes_list = b"\n" + _varint(dim)                                   # BytesList.value (field 1)
    feature = b"\n" + _varint(len(bytes_list) + dim) + bytes_list      # Feature.bytes_list (field 1)
    return b"\n" + _varint(len(feature) + dim) + feature               # FeatureList.feature (field 1)


def _frames_in_bulk(frame_list: Any, dim: int, kept: int) -> np.ndarray | None:
    """The first ``kept`` frames as (kept, dim) uint8 when every frame of ``frame_list`` is one ``dim``-byte bytes
    value (the serialization is then exactly ``total`` rows of prefix + codes); None otherwise."""
    raw = frame_list.SerializeToString()
    prefix = _frame_prefix(dim)
    stride = len(prefix) + dim
    total = len(frame_list.feature)
    if len(raw) != total * stride:
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(total, stride)  # (T, prefix + D)
    if rows[:, :len(prefix)].tobytes() != prefix * total:
        return None
    return np.array(rows[:kept, len(prefix):])  # (kept, D), a writable copy


def _float_values(float_list: Any) -> np.ndarray:
    """``FloatList.value`` as float32 (n,): the packed bytes viewed directly (a Python float per value otherwise)."""
    n = len(float_list.value)
    raw = float_list.SerializeToString()
    head = len(raw) - 4 * n
    if n and head >= 0 and raw[:head] == b"\n" + _varint(4 * n):
        return np.frombuffer(raw, dtype="<f4", offset=head).astype(np.float32)
    return np.asarray(float_list.value, dtype=np.float32)


def record_id(payload: bytes) -> str:
    """The ``id`` of one serialized YouTube-8M record, frame level or video level, without decoding its frames.

    A ``SequenceExample`` (frame level) keeps its context in field 1, where an ``Example`` (video level) keeps its
    features, both of type ``Features``; parsed as an ``Example``, a frame-level record's feature lists (field 2)
    stay unparsed unknown bytes. Raises ``RecordError`` like the full decoder would for a bad or missing id."""
    return _read_id(_parse(payload, "Example").features.feature)


def _read_id(features: Any) -> str:
    """The ``id`` context feature as str; spots 2017 records, which used ``video_id``."""
    if "id" not in features:
        if "video_id" in features:
            raise RecordError(
                "legacy_2017_format",
                "record has 'video_id' instead of 'id': this is 2017 YouTube-8M data (4716 classes), which "
                f"this project does not read; use the 2018+ release ({VOCAB_SIZE} classes, "
                "'id' key), or convert the records and map the labels yourself")
        raise RecordError("missing_feature", "record has no 'id' feature")
    values = features["id"].bytes_list.value
    if len(values) != 1:
        raise RecordError("missing_feature", f"'id' must hold one bytes value, found {len(values)}")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError("unparsable", f"'id' is not UTF-8 text: {values[0][:16]!r}") from None


def _int_feature(features: Any, key: str) -> np.ndarray:
    if key not in features:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(features[key].int64_list.value, dtype=np.int64)


def _check_label_range(values: np.ndarray, vocab_size: int, what: str, video_id: str) -> np.ndarray:
    if values.size and (values.min() < 0 or values.max() >= vocab_size):
        bad = values[(values < 0) | (values >= vocab_size)]
        hint = (" (ids up to 4715 suggest 2017 data, which has 4716 classes)"
                if vocab_size == VOCAB_SIZE and bad.max() < LEGACY_VOCAB_SIZE and bad.min() >= 0 else "")
        raise RecordError("label_out_of_range",
                          f"{what} {bad[:5].tolist()} outside [0, {vocab_size}){hint}", video_id)
    return values.astype(np.int32)


def _read_segments(context: Any, vocab_size: int, video_id: str):
    """Segment arrays (start int32, label int32, score float32), every rating kept (also those starting
    outside the video's frames; see ``VideoRecord``). Returns all ``None`` when the record has no segment
    annotations.
    """
    present = [k for k in _SEGMENT_KEYS if k in context]
    if not present:
        return None, None, None
    starts = _int_feature(context, "segment_start_times")
    ends = _int_feature(context, "segment_end_times") if "segment_end_times" in context else None
    labels = _int_feature(context, "segment_labels")
    scores = (_float_values(context["segment_scores"].float_list)
              if "segment_scores" in context else np.zeros(0, dtype=np.float32))
    lengths = {"segment_start_times": starts.size, "segment_labels": labels.size, "segment_scores": scores.size}
    if ends is not None:
        lengths["segment_end_times"] = ends.size
    if len(set(lengths.values())) != 1:
        raise RecordError("segment_length_mismatch",
                          "segment arrays differ in length: " + ", ".join(f"{k}={n}" for k, n in lengths.items()),
                          video_id)
    if ends is not None and np.any(ends != starts + SEGMENT_FRAMES):
        i = int(np.flatnonzero(ends != starts + SEGMENT_FRAMES)[0])
        raise RecordError("segment_length_mismatch",
                          f"segment {i} spans {starts[i]}..{ends[i]}, expected {SEGMENT_FRAMES} frames "
                          "(end = start + 5)", video_id)
    labels = _check_label_range(labels, vocab_size, "segment label ids", video_id)
    # Some released records rate segments that start past their last frame. They stay: the official evaluation
    # counts them (a positive one is a miss for every submission); training skips them (no frames).
    return starts.astype(np.int32), labels, scores


def _read_frames(feature_lists: Any, name: str, max_frames: int, video_id: str) -> tuple[np.ndarray, int]:
    """The first ``max_frames`` frames of feature list ``name`` as (T, D) uint8, and the original count."""
    dim = FEATURE_DIMS[name]
    frames = feature_lists[name].feature
    total = len(frames)
    if total == 0:
        raise RecordError("zero_frames", f"feature list '{name}' has no frames", video_id)
    kept = min(total, max_frames)
    matrix = _frames_in_bulk(feature_lists[name], dim, kept)
    if matrix is not None:
        return matrix, total
    chunks = []
    for t in range(kept):
        values = frames[t].bytes_list.value
        if len(values) != 1 or len(values[0]) != dim:
            got = f"{len(values[0])} bytes" if len(values) == 1 else f"{len(values)} bytes values"
            raise RecordError("bad_frame_length",
                              f"'{name}' frame {t} holds {got}, expected one value of {dim} bytes", video_id)
        chunks.append(values[0])
    matrix = np.frombuffer(bytearray().join(chunks), dtype=np.uint8).reshape(kept, dim)  # (T, D)
    return matrix, total


def decode_sequence_example(data: bytes, vocab_size: int = VOCAB_SIZE, max_frames: int = MAX_FRAMES) -> VideoRecord:
    """Decode one frame-level record (``tf.train.SequenceExample``), checked; raises ``RecordError``.

    Frames past ``max_frames`` are cut (counted in ``truncated_frames``), as the official reader does;
    rated segments starting outside the kept frames are kept (counted by ``segments_past_end``).
    """
    seq = _parse(data, "SequenceExample")
    context = seq.context.feature
    video_id = _read_id(context)
    labels = _check_label_range(_int_feature(context, "labels"), vocab_size, "label ids", video_id)
    feature_lists = seq.feature_lists.feature_list
    if "rgb" not in feature_lists:
        hint = " (this looks like a video-level record: read it with level='video')" if "mean_rgb" in context else ""
        raise RecordError("missing_feature", f"record has no 'rgb' feature list{hint}", video_id)
    rgb, total = _read_frames(feature_lists, "rgb", max_frames, video_id)
    audio = None
    if "audio" in feature_lists:
        audio_frames = len(feature_lists["audio"].feature)
        if audio_frames != total:
            raise RecordError("frame_count_mismatch",
                              f"{total} rgb frames but {audio_frames} audio frames", video_id)
        audio, _ = _read_frames(feature_lists, "audio", max_frames, video_id)
    starts, seg_labels, scores = _read_segments(context, vocab_size, video_id)
    return VideoRecord(id=video_id, labels=labels, rgb=rgb, audio=audio, segment_start_times=starts,
                       segment_labels=seg_labels, segment_scores=scores, level="frame",
                       truncated_frames=total - rgb.shape[0])


def _read_mean(features: Any, key: str, name: str, video_id: str) -> np.ndarray:
    float_list = features[key].float_list
    dim = FEATURE_DIMS[name]
    if len(float_list.value) != dim:
        raise RecordError("bad_frame_length", f"'{key}' holds {len(float_list.value)} floats, expected {dim}",
                          video_id)
    return _float_values(float_list).reshape(1, dim)  # (1, D)


def decode_example(data: bytes, vocab_size: int = VOCAB_SIZE) -> VideoRecord:
    """Decode one video-level record (``tf.train.Example`` with ``mean_rgb``/``mean_audio``) as T = 1."""
    example = _parse(data, "Example")
    features = example.features.feature
    video_id = _read_id(features)
    labels = _check_label_range(_int_feature(features, "labels"), vocab_size, "label ids", video_id)
    if "mean_rgb" not in features:
        raise RecordError("missing_feature", "record has no 'mean_rgb' feature (frame-level records are read with "
                          "level='frame')", video_id)
    rgb = _read_mean(features, "mean_rgb", "rgb", video_id)
    audio = _read_mean(features, "mean_audio", "audio", video_id) if "mean_audio" in features else None
    return VideoRecord(id=video_id, labels=labels, rgb=rgb, audio=audio, level="video")


def decode_record(data: bytes, level: str = "frame", vocab_size: int = VOCAB_SIZE,
                  max_frames: int = MAX_FRAMES) -> VideoRecord:
    """Decode a frame-level (``level="frame"``) or video-level (``"video"``) record."""
    if level == "frame":
        return decode_sequence_example(data, vocab_size=vocab_size, max_frames=max_frames)
    if level == "video":
        return decode_example(data, vocab_size=vocab_size)
    raise ValueError(f"level must be 'frame' or 'video', got {level!r}")


def _context_features(record: VideoRecord, pb: Any, with_segments: bool) -> dict[str, Any]:
    feats = {
        "id": pb.Feature(bytes_list=pb.BytesList(value=[record.id.encode("utf-8")])),
        "labels": pb.Feature(int64_list=pb.Int64List(value=np.asarray(record.labels, np.int64).tolist())),
    }
    if with_segments and record.has_segments:
        starts = np.asarray(record.segment_start_times, np.int64)
        feats["segment_start_times"] = pb.Feature(int64_list=pb.Int64List(value=starts.tolist()))
        feats["segment_end_times"] = pb.Feature(
            int64_list=pb.Int64List(value=(starts + SEGMENT_FRAMES).tolist()))
        feats["segment_labels"] = pb.Feature(
            int64_list=pb.Int64List(value=np.asarray(record.segment_labels, np.int64).tolist()))
        feats["segment_scores"] = pb.Feature(
            float_list=pb.FloatList(value=np.asarray(record.segment_scores, np.float32).tolist()))
    return feats


def _frame_list_bytes(matrix: np.ndarray) -> bytes:
    """A serialized ``FeatureList`` with one ``bytes_list`` feature per row of ``matrix`` (quantized when float).

    Written in bulk with numpy: the same bytes as T ``Feature(bytes_list=BytesList(value=[row]))`` messages built
    one by one and serialized (~20x slower).
    """
    codes = np.ascontiguousarray(matrix if matrix.dtype == np.uint8 else quantize(matrix))
    frames, dim = codes.shape
    prefix = _frame_prefix(dim)
    rows = np.empty((frames, len(prefix) + dim), dtype=np.uint8)  # (T, prefix + D)
    rows[:, :len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    rows[:, len(prefix):] = codes
    return rows.tobytes()


def encode_sequence_example(record: VideoRecord) -> bytes:
    """Serialize a frame-level record in the official layout (float matrices are quantized first).

    Serialization is deterministic (sorted map keys), so equal records give equal bytes; they are the bytes
    TensorFlow's deterministic serialization of the same ``tf.train.SequenceExample`` gives.
    """
    pb = _protos()
    seq = pb.SequenceExample(context=pb.Features(feature=_context_features(record, pb, with_segments=True)))
    lists = seq.feature_lists.feature_list
    lists["rgb"].MergeFromString(_frame_list_bytes(record.rgb))  # parsed in place: copying a message costs more
    if record.audio is not None:
        lists["audio"].MergeFromString(_frame_list_bytes(record.audio))
    return seq.SerializeToString(deterministic=True)


def encode_example(record: VideoRecord) -> bytes:
    """Serialize a video-level record: ``mean_rgb``/``mean_audio`` are the frame means of the dequantized features.

    Segment ratings are left out: video-level YouTube-8M records never carry them.
    """
    pb = _protos()
    feats = _context_features(record, pb, with_segments=False)
    feats["mean_rgb"] = pb.Feature(float_list=pb.FloatList(value=record.features("rgb").mean(axis=0).tolist()))
    if record.audio is not None:
        feats["mean_audio"] = pb.Feature(
            float_list=pb.FloatList(value=record.features("audio").mean(axis=0).tolist()))
    return pb.Example(features=pb.Features(feature=feats)).SerializeToString(deterministic=True)
