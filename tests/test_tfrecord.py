"""pipeline.tfrecord: byte compatibility with TensorFlow both ways, CRC values, and located corruption."""
from __future__ import annotations

import io
import pickle
import struct

import fsspec
import numpy as np
import pytest

from pipeline import tfrecord
from pipeline.errors import TFRecordCorruption
from pipeline.tfrecord import frame_record, iter_records, read_records, write_records

tf = pytest.importorskip("tensorflow")

# empty and header-sized payloads, and one bigger than the chunk size patched in below
PAYLOADS = [b"", b"x", bytes(range(256)) * 3, np.random.default_rng(0).bytes(70_000), b"\x00" * 12]


def _offsets(payloads) -> list[int]:
    return np.cumsum([0] + [16 + len(p) for p in payloads[:-1]]).tolist()


def _framed(payloads) -> bytearray:
    buf = io.BytesIO()
    write_records(buf, payloads)
    return bytearray(buf.getvalue())


def test_crc32c_known_values_and_python_fallback():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tfrecord.crc32c(b"") == 0
    assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4 test vector
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 100, 4099):
        data = rng.bytes(n)
        assert tfrecord._crc32c_python(data) == tfrecord.crc32c(data)


def test_masked_crc_hand_computed():
    crc = 0xE3069283
    expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert tfrecord.masked_crc32c(b"123456789") == expected


def test_frame_layout():
    framed = frame_record(b"abc")
    assert len(framed) == 12 + 3 + 4
    assert struct.unpack("<Q", framed[:8])[0] == 3 and framed[12:15] == b"abc"
    assert struct.unpack("<I", framed[15:])[0] == tfrecord.masked_crc32c(b"abc")


def test_reads_files_written_by_tensorflow(tmp_path):
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for p in PAYLOADS:
            w.write(p)
    with open(path, "rb") as f:
        got = list(iter_records(f))
    assert [p for _, p in got] == PAYLOADS
    assert [o for o, _ in got] == _offsets(PAYLOADS)


def test_tensorflow_reads_our_files_and_they_are_byte_identical(tmp_path):
    ours, theirs = tmp_path / "ours.tfrecord", str(tmp_path / "tf.tfrecord")
    with open(ours, "wb") as f:
        assert write_records(f, PAYLOADS) == len(PAYLOADS)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(ours))] == PAYLOADS
    with tf.io.TFRecordWriter(theirs) as w:
        for p in PAYLOADS:
            w.write(p)
    assert ours.read_bytes() == open(theirs, "rb").read()


def test_empty_file_has_no_records():
    assert list(iter_records(io.BytesIO(b""))) == []


def test_bad_data_crc_raises_at_its_record_or_is_yielded_and_skipped(tmp_path):
    offsets = _offsets(PAYLOADS)
    data = _framed(PAYLOADS)
    data[offsets[2] + 12 + 5] ^= 0x01  # one bit of the third payload
    with pytest.raises(TFRecordCorruption) as info:
        list(iter_records(io.BytesIO(bytes(data)), source="f.tfrecord"))
    assert (info.value.reason, info.value.offset) == ("bad_data_crc", offsets[2])
    assert "f.tfrecord" in str(info.value) and str(offsets[2]) in str(info.value)

    items = list(iter_records(io.BytesIO(bytes(data)), on_error="yield"))
    assert isinstance(items[2], TFRecordCorruption) and items[2].offset == offsets[2]
    assert [it for i, it in enumerate(items) if i != 2] == [(o, p) for i, (o, p) in
                                                            enumerate(zip(offsets, PAYLOADS)) if i != 2]
    # TensorFlow agrees that the file is damaged
    damaged = tmp_path / "damaged.tfrecord"
    damaged.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(damaged)))


def test_damaged_footer_is_a_bad_data_crc_too():
    offsets = _offsets(PAYLOADS)
    data = _framed(PAYLOADS)
    data[offsets[1] + 12 + len(PAYLOADS[1])] ^= 0x80  # first byte of the second record's data CRC
    items = list(iter_records(io.BytesIO(bytes(data)), on_error="yield"))
    assert [type(i).__name__ for i in items] == ["tuple", "TFRecordCorruption", "tuple", "tuple", "tuple"]
    assert items[1].reason == "bad_data_crc"


def test_bad_length_crc_ends_the_file():
    offsets = _offsets(PAYLOADS)
    data = _framed(PAYLOADS)
    data[offsets[3]] ^= 0x04  # the fourth record's length field
    with pytest.raises(TFRecordCorruption) as info:
        list(iter_records(io.BytesIO(bytes(data))))
    assert (info.value.reason, info.value.offset) == ("bad_length_crc", offsets[3])
    items = list(iter_records(io.BytesIO(bytes(data)), on_error="yield"))
    assert [p for _, p in items[:3]] == PAYLOADS[:3]
    assert len(items) == 4 and items[3].reason == "bad_length_crc"


@pytest.mark.parametrize("cut", [1, 11, 12, 13, 12 + 70_000, 12 + 70_000 + 3])
def test_truncation_inside_the_last_record(cut):
    offsets = _offsets(PAYLOADS)
    data = bytes(_framed(PAYLOADS[:4]))[:offsets[3] + cut]  # the 70,000-byte record loses its tail
    with pytest.raises(TFRecordCorruption) as info:
        list(iter_records(io.BytesIO(data)))
    assert (info.value.reason, info.value.offset) == ("truncated", offsets[3])
    items = list(iter_records(io.BytesIO(data), on_error="yield"))
    assert [p for _, p in items[:3]] == PAYLOADS[:3] and len(items) == 4 and items[3].reason == "truncated"


def test_verify_false_skips_crc_checks_but_not_truncation():
    offsets = _offsets(PAYLOADS)
    data = _framed(PAYLOADS)
    data[offsets[2] + 12 + 5] ^= 0x01
    got = [p for _, p in iter_records(io.BytesIO(bytes(data)), verify=False)]
    assert got[2] != PAYLOADS[2] and got[:2] == PAYLOADS[:2] and got[3:] == PAYLOADS[3:]
    with pytest.raises(TFRecordCorruption, match="truncated"):
        list(iter_records(io.BytesIO(bytes(data[:-1])), verify=False))


def test_garbage_length_without_verification_is_truncation_not_a_huge_allocation():
    data = struct.pack("<Q", 1 << 62) + b"\x00" * 4 + b"short"
    with pytest.raises(TFRecordCorruption) as info:
        list(iter_records(io.BytesIO(data), verify=False))
    assert (info.value.reason, info.value.offset) == ("truncated", 0)


def test_reads_in_chunks_across_the_chunk_size(monkeypatch):
    monkeypatch.setattr(tfrecord, "_READ_CHUNK", 1000)
    assert [p for _, p in iter_records(io.BytesIO(bytes(_framed(PAYLOADS))))] == PAYLOADS


class _Trickle(io.RawIOBase):
    """A file object that returns at most 7 bytes per read, like some network streams."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def read(self, n=-1):
        return self._buf.read(min(n, 7) if n >= 0 else 7)


def test_short_reads_are_completed():
    assert [p for _, p in iter_records(_Trickle(bytes(_framed(PAYLOADS))))] == PAYLOADS


def test_fsspec_files_and_urls():
    fs = fsspec.filesystem("memory")
    with fs.open("/yt8m/a.tfrecord", "wb") as f:
        write_records(f, PAYLOADS)
    with fsspec.open("memory://yt8m/a.tfrecord", "rb") as f:
        assert [p for _, p in iter_records(f)] == PAYLOADS
    assert [p for _, p in read_records("memory://yt8m/a.tfrecord")] == PAYLOADS
    fs.rm("/yt8m/a.tfrecord")


def test_corruption_pickles_and_rejects_unknown_reasons():
    err = TFRecordCorruption("truncated", 123, "ends early", "gs://b/x.tfrecord")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.offset, copy.message, copy.source, str(copy)) == (
        "truncated", 123, "ends early", "gs://b/x.tfrecord", str(err))
    with pytest.raises(ValueError):
        TFRecordCorruption("bad_magic", 0, "x")
    with pytest.raises(ValueError, match="on_error"):
        next(iter_records(io.BytesIO(b""), on_error="skip"))
