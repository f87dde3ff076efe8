"""Untrusted inputs: a malicious checkpoint never runs code; random and mutated records only ever decode to a
valid record or raise the codec's own error (hypothesis fuzzing)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.engine.checkpoint import CheckpointError, load_checkpoint
from pipeline.errors import RecordError
from pipeline.records import (VideoRecord, decode_example, decode_sequence_example, encode_example,
                              encode_sequence_example)


class _Payload:
    """Unpickling this object would create ``marker`` (what a malicious checkpoint would do instead)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"model": {}, "args": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with open(path, "rb") as f:  # the payload is live: an unsafe load would run it
        pickle.loads(f.read()) if writer == "pickle" else torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def _frame_record(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = int(rng.integers(10, 20))
    return encode_sequence_example(VideoRecord(
        id=f"v{seed}", labels=np.array([1, 5], np.int32), rgb=rng.integers(0, 256, (t, 1024), dtype=np.uint8),
        audio=rng.integers(0, 256, (t, 128), dtype=np.uint8), segment_start_times=np.array([0, 5], np.int32),
        segment_labels=np.array([1, 5], np.int32), segment_scores=np.array([1.0, 0.0], np.float32)))


def _video_record(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_example(VideoRecord(id=f"v{seed}", labels=np.array([2], np.int32),
                                      rgb=rng.standard_normal((1, 1024)).astype(np.float32),
                                      audio=rng.standard_normal((1, 128)).astype(np.float32), level="video"))


def _decodes_or_raises_its_own_error(data: bytes, decode) -> None:
    try:
        record = decode(data)
    except RecordError:
        return
    assert isinstance(record, VideoRecord)
    assert record.rgb.shape[0] == record.num_frames >= 1 and record.rgb.shape[1] == 1024
    assert record.labels.dtype == np.int32 and ((record.labels >= 0) & (record.labels < 3862)).all()


FRAME, VIDEO = _frame_record(0), _video_record(0)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _decodes_or_raises_its_own_error(data, decode_sequence_example)
    _decodes_or_raises_its_own_error(data, decode_example)


@FUZZ
@given(st.data())
def test_mutated_records(data):
    for valid, decode in ((FRAME, decode_sequence_example), (VIDEO, decode_example)):
        b = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 8))):
            kind = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
            pos = data.draw(st.integers(0, max(len(b) - 1, 0)))
            if kind == "flip" and b:
                b[pos] ^= data.draw(st.integers(1, 255))
            elif kind == "delete" and b:
                del b[pos:pos + data.draw(st.integers(1, 16))]
            elif kind == "insert":
                b[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
            elif kind == "truncate":
                del b[pos:]
        _decodes_or_raises_its_own_error(bytes(b), decode)
