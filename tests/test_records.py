"""pipeline.records: the codec agrees with TensorFlow's own parsing, and every bad record gets its reason.

The codec runs on ``pipeline.example_proto`` (no TensorFlow); TensorFlow here is the independent reference: its
``tf.train`` classes and ``tf.io.parse_single_*`` parsers.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline import example_proto, records
from pipeline.errors import RecordError
from pipeline.records import VideoRecord, decode_example, decode_record, decode_sequence_example, dequantize, quantize
from pipeline.tfrecord import read_records

from conftest import REAL_DATA

tf = pytest.importorskip("tensorflow")


# -- hand-built protos -------------------------------------------------------------------------------------------
def _bytes(*values: bytes) -> "tf.train.Feature":
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values) -> "tf.train.Feature":
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _floats(values) -> "tf.train.Feature":
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _frames(n: int, size: int, seed: int = 0) -> "tf.train.FeatureList":
    rng = np.random.default_rng(seed)
    return tf.train.FeatureList(feature=[_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
                                         for _ in range(n)])


def sequence_example(rgb_frames=4, audio_frames=None, rgb_bytes=1024, audio_bytes=128, labels=(3, 7),
                     id_key="id", extra_context=None, feature_lists=None) -> bytes:
    """A frame-level record with random frames; each argument breaks one thing when changed."""
    context = {id_key: _bytes(b"vid0"), "labels": _ints(labels)}
    context.update(extra_context or {})
    lists = {"rgb": _frames(rgb_frames, rgb_bytes, 1),
             "audio": _frames(rgb_frames if audio_frames is None else audio_frames, audio_bytes, 2)}
    lists.update(feature_lists or {})
    lists = {k: v for k, v in lists.items() if v is not None}
    return tf.train.SequenceExample(context=tf.train.Features(feature=context),
                                    feature_lists=tf.train.FeatureLists(feature_list=lists)).SerializeToString()


def example(rgb_len=1024, audio_len=128, labels=(3,), id_key="id", drop=()) -> bytes:
    feats = {id_key: _bytes(b"vid1"), "labels": _ints(labels), "mean_rgb": _floats(np.linspace(-1, 1, rgb_len)),
             "mean_audio": _floats(np.linspace(-1, 1, audio_len))}
    for key in drop:
        del feats[key]
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _frames_with(n: int, replace: dict, size: int = 1024) -> "tf.train.FeatureList":
    """``n`` random frames of ``size`` bytes, frame ``t`` replaced by the Feature ``replace[t]``."""
    frames = _frames(n, size, 4)
    for t, feature in replace.items():
        frames.feature[t].CopyFrom(feature)
    return frames


def segments(starts, labels, scores, ends=None) -> dict:
    ends = [s + 5 for s in starts] if ends is None else ends
    return {"segment_start_times": _ints(starts), "segment_end_times": _ints(ends),
            "segment_labels": _ints(labels), "segment_scores": _floats(scores)}


# -- quantization ------------------------------------------------------------------------------------------------
def test_dequantize_end_points_and_a_hand_computed_value():
    out = dequantize(np.array([0, 64, 255], np.uint8))
    assert out.dtype == np.float32
    assert out[0] == np.float32(-1.9921875) and out[2] == np.float32(2.0078125)
    assert out[1] == pytest.approx(64 * 4 / 255 + 4 / 512 - 2, abs=1e-6)  # 0.0117340...


def test_quantize_hand_computed_clip_and_round_trip():
    # (x + 2) * 63.75: -1 -> 63.75 -> 64; 0 -> 127.5 -> 128 (ties to even, like Python's round in the official writer)
    assert quantize(np.array([-2.0, -1.0, 0.0, 2.0, -7.0, 9.0])).tolist() == [0, 64, 128, 255, 0, 255]
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quantize(dequantize(codes)), codes)
    x = np.random.default_rng(0).uniform(-2, 2, 10_000)
    # the official pair is not centred: quantize rounds to the nearest code (+-2/255), then dequantize adds 4/512
    err = dequantize(quantize(x)) - x
    assert err.min() >= 4 / 512 - 2 / 255 - 1e-6 and err.max() <= 4 / 512 + 2 / 255 + 1e-6
    assert err.mean() == pytest.approx(4 / 512, abs=2e-4)


def test_dequantize_equals_tensorflow_formula_bitwise():
    codes = np.arange(256, dtype=np.uint8)
    expected = (tf.cast(tf.constant(codes), tf.float32) * (4 / 255) + (4 / 512 - 2)).numpy()
    np.testing.assert_array_equal(dequantize(codes), expected)


# -- agreement with TensorFlow's parsers -------------------------------------------------------------------------
def _tf_parse_frame_level(payload: bytes):
    context, lists = tf.io.parse_single_sequence_example(
        payload,
        context_features={"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64),
                          "segment_start_times": tf.io.VarLenFeature(tf.int64),
                          "segment_labels": tf.io.VarLenFeature(tf.int64),
                          "segment_scores": tf.io.VarLenFeature(tf.float32)},
        sequence_features={"rgb": tf.io.FixedLenSequenceFeature([], tf.string),
                           "audio": tf.io.FixedLenSequenceFeature([], tf.string)})

    def frames(name, dim):
        raw = tf.reshape(tf.cast(tf.io.decode_raw(lists[name], tf.uint8), tf.float32), [-1, dim])
        return (raw * (4 / 255) + (4 / 512 - 2)).numpy()

    return context, frames("rgb", 1024), frames("audio", 128)


def test_frame_level_decode_equals_tensorflow_parse(synthetic_frame_dir):
    n = 0
    for path in sorted(synthetic_frame_dir.glob("*.tfrecord")):
        for _, payload in read_records(str(path)):
            rec = decode_sequence_example(payload)
            context, rgb, audio = _tf_parse_frame_level(payload)
            assert rec.id == context["id"].numpy().decode()
            np.testing.assert_array_equal(rec.labels, context["labels"].values.numpy())
            assert rec.labels.dtype == np.int32 and rec.rgb.dtype == np.uint8
            np.testing.assert_array_equal(rec.features("rgb"), rgb)
            np.testing.assert_array_equal(rec.features("audio"), audio)
            np.testing.assert_array_equal(rec.segment_start_times, context["segment_start_times"].values.numpy())
            np.testing.assert_array_equal(rec.segment_labels, context["segment_labels"].values.numpy())
            np.testing.assert_array_equal(rec.segment_scores, context["segment_scores"].values.numpy())
            assert rec.num_frames == rgb.shape[0] and rec.truncated_frames == 0 and rec.segments_past_end == 0
            assert rec.level == "frame" and rec.has_segments
            n += 1
    assert n == 24



@pytest.mark.parametrize("name,count", [("validate0067.tfrecord", 243), ("validate0076.tfrecord", 251)])
def test_real_video_level_shards_decode_like_tensorflow(name, count):
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64),
            "mean_rgb": tf.io.FixedLenFeature([1024], tf.float32),
            "mean_audio": tf.io.FixedLenFeature([128], tf.float32)}
    ids = set()
    for n, (_, payload) in enumerate(read_records(str(REAL_DATA / name)), 1):
        rec = decode_example(payload)
        parsed = tf.io.parse_single_example(payload, spec)
        assert rec.id == parsed["id"].numpy().decode() and len(rec.id) == 4
        np.testing.assert_array_equal(rec.labels, parsed["labels"].values.numpy())
        np.testing.assert_array_equal(rec.rgb, parsed["mean_rgb"].numpy()[None])
        np.testing.assert_array_equal(rec.audio, parsed["mean_audio"].numpy()[None])
        assert rec.rgb.shape == (1, 1024) and rec.rgb.dtype == np.float32 and rec.num_frames == 1
        assert rec.level == "video" and not rec.has_segments
        assert 1 <= rec.labels.size <= 10 and rec.labels.max() < 3862
        ids.add(rec.id)
    assert n == count == len(ids)


def test_video_level_means_are_frame_means(synthetic_frame_dir, synthetic_video_dir):
    frame = {r.id: r for p in sorted(synthetic_frame_dir.glob("*.tfrecord"))
             for r in (decode_record(b) for _, b in read_records(str(p)))}
    for path in sorted(synthetic_video_dir.glob("*.tfrecord")):
        for _, payload in read_records(str(path)):
            rec = decode_record(payload, level="video")
            np.testing.assert_allclose(rec.rgb[0], frame[rec.id].features("rgb").mean(0), atol=1e-6)
            np.testing.assert_allclose(rec.audio[0], frame[rec.id].features("audio").mean(0), atol=1e-6)
            np.testing.assert_array_equal(rec.labels, frame[rec.id].labels)


# -- encoder -------------------------------------------------------------------------------------------------------
def _record(frames=12, with_segments=True) -> VideoRecord:
    rng = np.random.default_rng(3)
    seg = dict(segment_start_times=np.array([0, 5], np.int32), segment_labels=np.array([7, 9], np.int32),
               segment_scores=np.array([1.0, 0.0], np.float32)) if with_segments else {}
    return VideoRecord(id="ab_9", labels=np.array([7, 9, 3000], np.int32),
                       rgb=rng.integers(0, 256, (frames, 1024), dtype=np.uint8),
                       audio=rng.integers(0, 256, (frames, 128), dtype=np.uint8), **seg)


@pytest.mark.parametrize("with_segments", [True, False])
def test_encode_decode_round_trip_is_exact_and_deterministic(with_segments):
    rec = _record(with_segments=with_segments)
    payload = records.encode_sequence_example(rec)
    assert payload == records.encode_sequence_example(_record(with_segments=with_segments))
    back = decode_sequence_example(payload)
    assert back.id == rec.id
    for name in ("labels", "rgb", "audio", "segment_start_times", "segment_labels", "segment_scores"):
        if getattr(rec, name) is None:
            assert getattr(back, name) is None
        else:
            np.testing.assert_array_equal(getattr(back, name), getattr(rec, name))
    if with_segments:  # the official layout also carries the end times, start + 5
        context, _ = tf.io.parse_single_sequence_example(
            payload, context_features={"segment_end_times": tf.io.VarLenFeature(tf.int64)})
        np.testing.assert_array_equal(context["segment_end_times"].values.numpy(), [5, 10])


def test_encoding_float_frames_quantizes_them():
    rec = _record(frames=3, with_segments=False)
    floats = VideoRecord(id=rec.id, labels=rec.labels, rgb=dequantize(rec.rgb), audio=dequantize(rec.audio))
    assert records.encode_sequence_example(floats) == records.encode_sequence_example(rec)


def test_encode_example_writes_means():
    rec = _record()
    back = decode_example(records.encode_example(rec))
    np.testing.assert_allclose(back.rgb[0], dequantize(rec.rgb).mean(0), atol=1e-6)
    np.testing.assert_allclose(back.audio[0], dequantize(rec.audio).mean(0), atol=1e-6)
    assert not back.has_segments and back.features("rgb").dtype == np.float32


# -- truncation and segments past the end ---------------------------------------------------------------------------
def test_more_than_300_frames_are_cut_and_counted():
    payload = sequence_example(rgb_frames=310, extra_context=segments([0, 295, 300, 305], [3, 3, 7, 7],
                                                                      [1, 0, 1, 0]))
    rec = decode_sequence_example(payload)
    _, rgb, audio = _tf_parse_frame_level(payload)
    assert rec.num_frames == 300 and rec.audio.shape == (300, 128) and rec.truncated_frames == 10
    np.testing.assert_array_equal(rec.features("rgb"), rgb[:300])
    np.testing.assert_array_equal(rec.features("audio"), audio[:300])
    # segments starting at 300 and 305 lie in the cut frames: kept (the segment MAP counts them), and counted
    assert rec.segment_start_times.tolist() == [0, 295, 300, 305] and rec.segments_past_end == 2
    assert rec.segment_labels.tolist() == [3, 3, 7, 7] and rec.segment_scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert records.segment_outside_frames(rec.segment_start_times, rec.num_frames).tolist() == [False, False,
                                                                                                True, True]


@pytest.mark.parametrize("max_frames,kept,cut", [(300, 300, 0), (301, 300, 0), (120, 120, 180)])
def test_max_frames_argument(max_frames, kept, cut):
    rec = decode_sequence_example(sequence_example(rgb_frames=300), max_frames=max_frames)
    assert (rec.num_frames, rec.truncated_frames) == (kept, cut)


def test_segments_starting_past_the_last_frame_are_kept_and_counted():
    rec = decode_sequence_example(sequence_example(
        rgb_frames=20, extra_context=segments([0, 15, 20, 45, 10], [3, 4, 5, 6, 7], [1, 0, 1, 1, 0])))
    assert rec.segment_start_times.tolist() == [0, 15, 20, 45, 10]
    assert rec.segment_labels.tolist() == [3, 4, 5, 6, 7]
    assert rec.segment_scores.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert rec.segments_past_end == 2  # 20 and 45 start at or past the 20th (last) frame
    assert records.segment_outside_frames(rec.segment_start_times, 20).tolist() == [False, False, True, True, False]
    back = decode_sequence_example(records.encode_sequence_example(rec))  # and they survive a round trip
    assert back.segment_start_times.tolist() == [0, 15, 20, 45, 10] and back.segments_past_end == 2


def test_record_without_segments_has_none_and_empty_segments_stay_empty():
    plain = decode_sequence_example(sequence_example())
    assert plain.segment_start_times is None and plain.segment_labels is None and plain.segment_scores is None
    empty = decode_sequence_example(sequence_example(extra_context=segments([], [], [])))
    assert empty.has_segments and empty.segment_start_times.size == 0 and empty.segments_past_end == 0


def test_audio_is_optional():
    rec = decode_sequence_example(sequence_example(feature_lists={"audio": None}))
    assert rec.audio is None and rec.num_frames == 4
    with pytest.raises(KeyError, match="no audio"):
        rec.features("audio")


# -- one bad record per reason --------------------------------------------------------------------------------------
BAD_FRAME_RECORDS = {
    "unparsable": [b"\xff\x00 not a protocol buffer \x01", b"\x0a\xff\xff\xff\xff\x0f"],
    "missing_feature": [b"", sequence_example(feature_lists={"rgb": None}),
                        sequence_example(id_key="name"), example()],
    "legacy_2017_format": [sequence_example(id_key="video_id")],
    "bad_frame_length": [sequence_example(rgb_bytes=1023), sequence_example(audio_bytes=129),
                         sequence_example(feature_lists={"rgb": tf.train.FeatureList(
                             feature=[_bytes(bytes(1024), bytes(1024))])}),
                         sequence_example(feature_lists={"rgb": _frames_with(4, {2: _bytes(bytes(1000))})}),
                         sequence_example(feature_lists={"rgb": _frames_with(4, {3: _floats([0.5] * 256)})}),
                         sequence_example(feature_lists={"audio": _frames_with(4, {0: _bytes()}, size=128)})],
    "frame_count_mismatch": [sequence_example(rgb_frames=10, audio_frames=9)],
    "zero_frames": [sequence_example(rgb_frames=0, audio_frames=0)],
    "label_out_of_range": [sequence_example(labels=(3, 3862)), sequence_example(labels=(-1,)),
                           sequence_example(extra_context=segments([0], [5000], [1.0]))],
    "segment_length_mismatch": [
        sequence_example(extra_context={"segment_start_times": _ints([0, 5]), "segment_labels": _ints([1]),
                                        "segment_scores": _floats([1, 0])}),
        sequence_example(extra_context=segments([0, 5], [1, 2], [1.0])),
        sequence_example(extra_context=segments([0, 5], [1, 2], [1.0, 0.0], ends=[5, 9])),
    ],
}
BAD_VIDEO_RECORDS = {
    "unparsable": [b"garbage!!"],
    "missing_feature": [b"", example(drop=("mean_rgb",)), example(drop=("id",)), sequence_example()],
    "legacy_2017_format": [example(id_key="video_id")],
    "bad_frame_length": [example(rgb_len=1000), example(audio_len=0), example(rgb_len=1025)],
    "label_out_of_range": [example(labels=(4000,))],
}


@pytest.mark.parametrize("level,reason,payload",
                         [("frame", r, p) for r, ps in BAD_FRAME_RECORDS.items() for p in ps]
                         + [("video", r, p) for r, ps in BAD_VIDEO_RECORDS.items() for p in ps])
def test_each_bad_record_raises_its_reason(level, reason, payload):
    with pytest.raises(RecordError) as info:
        decode_record(payload, level=level)
    assert info.value.reason == reason
    assert info.value.message and reason in str(info.value)


def test_legacy_message_names_2017_and_its_vocabulary():
    with pytest.raises(RecordError, match="2017") as info:
        decode_sequence_example(sequence_example(id_key="video_id"))
    assert "4716" in info.value.message and "2018" in info.value.message


def test_error_carries_the_id_once_known_and_survives_pickling():
    with pytest.raises(RecordError) as info:
        decode_sequence_example(sequence_example(rgb_frames=10, audio_frames=9))
    assert info.value.video_id == "vid0" and "10 rgb frames but 9 audio frames" in info.value.message
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.reason, copy.message, copy.video_id, str(copy)) == (
        info.value.reason, info.value.message, "vid0", str(info.value))
    with pytest.raises(RecordError) as info:
        decode_sequence_example(b"")
    assert info.value.video_id is None


def test_vocab_size_argument_bounds_labels():
    payload = sequence_example(labels=(3, 7))
    assert decode_sequence_example(payload, vocab_size=8).labels.tolist() == [3, 7]
    with pytest.raises(RecordError, match=r"\[7\] outside \[0, 7\)"):
        decode_sequence_example(payload, vocab_size=7)


def test_frame_and_video_level_mix_ups_say_which_level_to_use():
    with pytest.raises(RecordError, match="level='video'"):
        decode_sequence_example(example())
    with pytest.raises(RecordError, match="level='frame'"):
        decode_example(sequence_example())
    with pytest.raises(ValueError, match="level"):
        decode_record(example(), level="segment")


def test_unknown_reason_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown RecordError reason"):
        RecordError("bad_luck", "x")


# -- the TensorFlow-free schema: wire compatibility with tf.train ------------------------------------------------------
MESSAGES = ("BytesList", "FloatList", "Int64List", "Feature", "Features", "FeatureList", "FeatureLists", "Example",
            "SequenceExample")


def _wire_shape(descriptor) -> tuple:
    """What the wire format depends on, per field: name, number, type, repeated, packed, message type, oneof;
    and the nested map entry messages."""
    fields = sorted((f.name, f.number, f.type, f.label, f.is_packed,
                     f.message_type.name if f.message_type else None,
                     f.containing_oneof.name if f.containing_oneof else None) for f in descriptor.fields)
    nested = sorted((n.name, n.GetOptions().map_entry, _wire_shape(n)) for n in descriptor.nested_types)
    return tuple(fields), tuple(nested)


@pytest.mark.parametrize("name", MESSAGES)
def test_schema_matches_tf_train_field_for_field(name):
    ours, theirs = getattr(example_proto, name).DESCRIPTOR, getattr(tf.train, name).DESCRIPTOR
    assert ours.full_name == f"yt8m_cma.records.{name}" and theirs.full_name == f"tensorflow.{name}"
    assert _wire_shape(ours) == _wire_shape(theirs)
    assert ours.file.pool is not theirs.file.pool  # a private pool: no clash with TensorFlow's default one


def _payloads(synthetic_frame_dir, synthetic_video_dir):
    """(message name, serialized record) of every generated and real record."""
    out = [("SequenceExample", b) for p in sorted(synthetic_frame_dir.glob("*.tfrecord"))
           for _, b in read_records(str(p))]
    out += [("Example", b) for p in sorted(synthetic_video_dir.glob("*.tfrecord")) for _, b in read_records(str(p))]
    out += [("Example", b) for p in sorted(REAL_DATA.glob("*.tfrecord")) for _, b in read_records(str(p))]
    return out


def test_records_parse_to_the_same_message_as_tf_train(synthetic_frame_dir, synthetic_video_dir):
    payloads = _payloads(synthetic_frame_dir, synthetic_video_dir)
    assert len(payloads) == 24 + 24 + 243 + 251
    for name, payload in payloads:
        ours = getattr(example_proto, name).FromString(payload)
        theirs = getattr(tf.train, name).FromString(payload)
        assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
        assert ours.ByteSize() == theirs.ByteSize() == len(payload)


def _tf_sequence_example(rec: VideoRecord) -> bytes:
    """The reference encoder: tf.train messages built one per frame (what the codec did before it left
    TensorFlow), serialized deterministically."""
    context = {"id": _bytes(rec.id.encode()), "labels": _ints(rec.labels.tolist())}
    if rec.has_segments:
        context.update(segments(rec.segment_start_times.tolist(), rec.segment_labels.tolist(),
                                rec.segment_scores.tolist()))
    lists = {name: tf.train.FeatureList(feature=[_bytes(row.tobytes()) for row in getattr(rec, name)])
             for name in ("rgb", "audio") if getattr(rec, name) is not None}
    return tf.train.SequenceExample(context=tf.train.Features(feature=context),
                                    feature_lists=tf.train.FeatureLists(feature_list=lists)
                                    ).SerializeToString(deterministic=True)


def test_encoded_frame_records_are_tensorflows_bytes_and_parse_in_tensorflow(synthetic_frame_dir):
    recs = [decode_sequence_example(b) for p in sorted(synthetic_frame_dir.glob("*.tfrecord"))
            for _, b in read_records(str(p))]
    no_audio = _record(frames=7, with_segments=False)
    no_audio.audio = None
    recs += [_record(), _record(with_segments=False), no_audio]
    for rec in recs:
        payload = records.encode_sequence_example(rec)
        assert payload == _tf_sequence_example(rec)  # byte for byte, map keys sorted in both
        if rec.audio is None:
            continue
        context, rgb, audio = _tf_parse_frame_level(payload)
        assert context["id"].numpy().decode() == rec.id
        np.testing.assert_array_equal(context["labels"].values.numpy(), rec.labels)
        np.testing.assert_array_equal(rgb, rec.features("rgb"))
        np.testing.assert_array_equal(audio, rec.features("audio"))
        if rec.has_segments:
            np.testing.assert_array_equal(context["segment_start_times"].values.numpy(), rec.segment_start_times)
            np.testing.assert_array_equal(context["segment_labels"].values.numpy(), rec.segment_labels)
            np.testing.assert_array_equal(context["segment_scores"].values.numpy(), rec.segment_scores)


def test_encoded_video_records_are_tensorflows_bytes_and_parse_in_tensorflow():
    rec = _record()
    payload = records.encode_example(rec)
    mean_rgb, mean_audio = rec.features("rgb").mean(0), rec.features("audio").mean(0)
    reference = tf.train.Example(features=tf.train.Features(feature={
        "id": _bytes(rec.id.encode()), "labels": _ints(rec.labels.tolist()),
        "mean_rgb": _floats(mean_rgb.tolist()), "mean_audio": _floats(mean_audio.tolist())}))
    assert payload == reference.SerializeToString(deterministic=True)
    parsed = tf.io.parse_single_example(payload, {
        "id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64),
        "mean_rgb": tf.io.FixedLenFeature([1024], tf.float32), "mean_audio": tf.io.FixedLenFeature([128], tf.float32)})
    assert parsed["id"].numpy() == b"ab_9"
    np.testing.assert_array_equal(parsed["labels"].values.numpy(), [7, 9, 3000])
    np.testing.assert_array_equal(parsed["mean_rgb"].numpy(), mean_rgb)
    np.testing.assert_array_equal(parsed["mean_audio"].numpy(), mean_audio)


def _same_record(a: VideoRecord, b: VideoRecord) -> None:
    assert (a.id, a.level, a.truncated_frames) == (b.id, b.level, b.truncated_frames)
    for name in ("labels", "rgb", "audio", "segment_start_times", "segment_labels", "segment_scores"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and x.flags.writeable and y.flags.writeable, name
            np.testing.assert_array_equal(x, y)


def test_bulk_and_per_value_paths_give_the_same_records(synthetic_frame_dir, synthetic_video_dir, monkeypatch):
    payloads = _payloads(synthetic_frame_dir, synthetic_video_dir)
    payloads.append(("SequenceExample", sequence_example(rgb_frames=310, extra_context=segments([0], [3], [0.5]))))
    level = {"SequenceExample": "frame", "Example": "video"}
    bulk = [decode_record(p, level=level[name]) for name, p in payloads]
    monkeypatch.setattr(records, "_frames_in_bulk", lambda *args: None)
    monkeypatch.setattr(records, "_float_values", lambda float_list: np.asarray(float_list.value, np.float32))
    for (name, payload), fast in zip(payloads, bulk):
        _same_record(fast, decode_record(payload, level=level[name]))


def test_valid_non_canonical_encodings_take_the_per_value_path():
    """Unknown fields inside frames, unpacked floats, an unknown field in a float list: valid records whose
    re-serialization is not the canonical layout; they decode like the canonical record."""
    unknown = b"\xa0\x06\x01"  # field 100, varint 1: skipped by every parser, kept (and written back) by protobuf
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (4, 1024), dtype=np.uint8)
    canonical = sequence_example(feature_lists={"rgb": tf.train.FeatureList(feature=[_bytes(r.tobytes())
                                                                                     for r in rgb])})
    odd = sequence_example(feature_lists={"rgb": tf.train.FeatureList(feature=[
        tf.train.Feature.FromString(_bytes(r.tobytes()).SerializeToString() + unknown) for r in rgb])})
    assert odd != canonical
    lists = lambda payload: example_proto.SequenceExample.FromString(payload).feature_lists.feature_list  # noqa: E731
    assert records._frames_in_bulk(lists(odd)["rgb"], 1024, 4) is None  # so the per-frame path read it
    np.testing.assert_array_equal(records._frames_in_bulk(lists(canonical)["rgb"], 1024, 3), rgb[:3])
    _same_record(decode_sequence_example(odd), decode_sequence_example(canonical))
    np.testing.assert_array_equal(decode_sequence_example(odd).rgb, rgb)

    mean = np.linspace(-1, 1, 1024, dtype=np.float32)
    unpacked = b"".join(b"\x0d" + v.tobytes() for v in mean.astype("<f4"))  # one (tag, fixed32) pair per value
    for float_list in (tf.train.FloatList.FromString(unpacked),
                       tf.train.FloatList.FromString(_floats(mean).float_list.SerializeToString() + unknown)):
        feats = tf.train.Example.FromString(example())
        feats.features.feature["mean_rgb"].float_list.CopyFrom(float_list)
        rec = decode_example(feats.SerializeToString())
        np.testing.assert_array_equal(rec.rgb[0], mean)
        assert rec.rgb.dtype == np.float32 and rec.rgb.flags.writeable


def test_bad_frames_past_max_frames_are_not_read():
    rgb = _frames_with(310, {305: _bytes(bytes(1023))})
    payload = sequence_example(rgb_frames=310, feature_lists={"rgb": rgb})
    rec = decode_sequence_example(payload)
    assert rec.num_frames == 300 and rec.truncated_frames == 10
    np.testing.assert_array_equal(rec.rgb, np.stack([np.frombuffer(f.bytes_list.value[0], np.uint8)
                                                     for f in rgb.feature[:300]]))
    with pytest.raises(RecordError, match="'rgb' frame 305 holds 1023 bytes") as info:
        decode_sequence_example(payload, max_frames=310)
    assert info.value.reason == "bad_frame_length"


def test_decoded_frames_are_writable_copies():
    payload = sequence_example()
    rec = decode_sequence_example(payload)
    assert rec.rgb.flags.writeable and rec.rgb.flags.c_contiguous and rec.audio.flags.writeable
    rec.rgb[0, 0] ^= 1  # must not touch anything shared
    assert decode_sequence_example(payload).rgb[0, 0] == rec.rgb[0, 0] ^ 1


def test_non_bytes_input_is_a_type_error():
    with pytest.raises(TypeError, match="serialized bytes"):
        decode_sequence_example("not bytes")
    rec = decode_sequence_example(bytearray(sequence_example()))
    assert rec.id == "vid0" and decode_sequence_example(memoryview(sequence_example())).num_frames == 4
