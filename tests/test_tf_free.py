"""Record decoding, the preprocess job's decode step and the training TensorBoard writer run without TensorFlow.

Each check runs in a fresh interpreter (this test process may have imported TensorFlow already) and looks at
``sys.modules`` at the end. The last checks import TensorFlow on purpose, beside ``pipeline.example_proto``, in both
orders: the two schemas live in different descriptor pools and packages, so neither import breaks the other.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REAL_DATA

REPO = Path(__file__).resolve().parents[1]
# find_spec, not importorskip: this process need not pay for importing them
needs_tensorflow = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow")
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")


def _run(code: str, *args: str, timeout: int = 300) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints one JSON object last."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_TF_MODULES = 'sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras"))'

_DECODE = f"""
    import json, sys
    from pipeline import records
    from pipeline.tfrecord import read_records
    from beam_jobs import preprocess
    import apache_beam as beam

    counts = {{}}
    for path, level in (sys.argv[1], "video"), (sys.argv[2], "frame"):
        fn = preprocess.DecodeVideoFn(level, ("rgb", "audio"))
        fn.setup()
        items = [(offset, payload) for offset, payload in read_records(path)] + [(-1, b"not a record")]
        good = dead = frames = 0
        for offset, payload in items:
            for out in fn.process((path, offset, payload)):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    assert out.value["reason"] == "unparsable" and offset == -1, out.value
                    dead += 1
                else:
                    rec = out[2]
                    again = records.decode_record(payload, level=level)
                    assert rec.id == again.id and (rec.rgb == again.rgb).all() and (rec.audio == again.audio).all()
                    assert records.decode_record(records.encode_sequence_example(rec) if level == "frame"
                                                 else records.encode_example(rec), level=level).id == rec.id
                    good += 1
                    frames += rec.num_frames
        counts[level] = [good, dead, frames]
    print(json.dumps({{"counts": counts, "tf": {_TF_MODULES}}}))
"""


def test_decoding_and_the_preprocess_decode_step_do_not_import_tensorflow(synthetic_frame_dir):
    real = str(REAL_DATA / "validate0067.tfrecord")
    frame_file = str(synthetic_frame_dir / "train0000.tfrecord")
    result = _run(_DECODE, real, frame_file)
    assert result["tf"] == []
    assert result["counts"]["video"] == [243, 1, 243]
    good, dead, frames = result["counts"]["frame"]
    assert (good, dead) == (12, 1) and frames > 12 * 30


_TENSORBOARD = f"""
    import json, sys, tempfile
    from pathlib import Path
    from model.train_video import _tensorboard

    out = Path(tempfile.mkdtemp())
    writer = _tensorboard(out)
    writer.add_scalar("train/loss", 0.5, 3)
    writer.add_scalar("train/loss", 0.25, 7)
    writer.add_scalar("val/gap", 0.75, 1)
    writer.close()
    tf_after_writer = {_TF_MODULES}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    scalars = {{tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}}
    print(json.dumps({{"scalars": scalars, "tf": tf_after_writer, "tf_at_end": {_TF_MODULES}}}))
"""


@needs_tensorboard
def test_training_tensorboard_writer_does_not_import_tensorflow():
    result = _run(_TENSORBOARD)
    assert result["tf"] == [] and result["tf_at_end"] == []
    assert result["scalars"] == {"train/loss": [[3, 0.5], [7, 0.25]], "val/gap": [[1, 0.75]]}


_BOTH = f"""
    import json, sys
    import numpy as np
    if sys.argv[1] == "tensorflow_first":
        import tensorflow as tf
        from pipeline import example_proto
    else:
        from pipeline import example_proto
        import tensorflow as tf
    from google.protobuf import descriptor_pool
    from pipeline import records

    rng = np.random.default_rng(0)
    rec = records.VideoRecord(id="ab_9", labels=np.array([7, 9], np.int32),
                              rgb=rng.integers(0, 256, (6, 1024), dtype=np.uint8),
                              audio=rng.integers(0, 256, (6, 128), dtype=np.uint8))
    payload = records.encode_sequence_example(rec)
    theirs = tf.train.SequenceExample.FromString(payload)
    assert theirs.SerializeToString(deterministic=True) == payload
    assert records.decode_sequence_example(theirs.SerializeToString()).rgb.tolist() == rec.rgb.tolist()
    _, lists = tf.io.parse_single_sequence_example(
        payload, sequence_features={{"rgb": tf.io.FixedLenSequenceFeature([], tf.string)}})
    assert tf.io.decode_raw(lists["rgb"], tf.uint8).numpy().tolist() == rec.rgb.tolist()
    default = descriptor_pool.Default()
    assert default.FindMessageTypeByName("tensorflow.SequenceExample") is tf.train.SequenceExample.DESCRIPTOR
    try:
        default.FindMessageTypeByName("yt8m_cma.records.SequenceExample")
        in_default = True
    except KeyError:
        in_default = False
    print(json.dumps({{"ours": example_proto.SequenceExample.DESCRIPTOR.full_name,
                       "theirs": tf.train.SequenceExample.DESCRIPTOR.full_name, "in_default_pool": in_default,
                       "tf_loaded": "tensorflow" in sys.modules}}))
"""


@needs_tensorflow
@pytest.mark.parametrize("order", ["tensorflow_first", "example_proto_first"])
def test_tensorflow_and_example_proto_import_together_in_either_order(order):
    result = _run(_BOTH, order)
    assert result == {"ours": "yt8m_cma.records.SequenceExample", "theirs": "tensorflow.SequenceExample",
                      "in_default_pool": False, "tf_loaded": True}
