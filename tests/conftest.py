"""Shared fixtures: small synthetic YouTube-8M data sets generated once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import model  # noqa: F401  (must precede TensorFlow: see model/__init__.py)

# Two genuine YouTube-8M video-level shards ship with the tests (see data/yt8m_real/README.md); YT8M_REAL_DATA
# points the real-data tests at another folder.
REAL_DATA = Path(os.environ.get("YT8M_REAL_DATA", Path(__file__).resolve().parent / "data" / "yt8m_real"))


def prepare_planted_splits(root: Path, train_videos: int, train_shards: int, train_out: str = "train") -> Path:
    """Generated frame-level splits (``root/raw/train``: seed 11; ``root/raw/val``: 24 videos, seed 12) through the
    real Beam job with one local worker: ``root/<train_out>`` whitened to 32 dims, ``root/val`` with its whitening.
    Returns ``root``."""
    from beam_jobs import preprocess
    from pipeline import synthetic

    synthetic.generate(str(root / "raw/train"), videos=train_videos, shards=train_shards, seed=11, prefix="train")
    synthetic.generate(str(root / "raw/val"), videos=24, shards=1, seed=12, prefix="validate")
    beam = ["--direct_num_workers", "1"]
    preprocess.run(["--input", str(root / "raw/train/*.tfrecord"), "--output", str(root / train_out),
                    "--pca-dims", "32"] + beam)
    preprocess.run(["--input", str(root / "raw/val/*.tfrecord"), "--output", str(root / "val"),
                    "--whitening", str(root / train_out / "whitening.npz")] + beam)
    return root


@pytest.fixture(scope="session")
def synthetic_frame_dir(tmp_path_factory) -> Path:
    """24 frame-level videos with segment ratings in 2 shards (``train0000/0001.tfrecord``), seed 5."""
    from pipeline import synthetic

    out = tmp_path_factory.mktemp("synthetic_frame")
    synthetic.generate(str(out), videos=24, shards=2, seed=5, segments=True)
    return out


@pytest.fixture(scope="session")
def synthetic_video_dir(tmp_path_factory) -> Path:
    """The same 24 videos as ``synthetic_frame_dir`` written at video level (``tf.train.Example`` means)."""
    from pipeline import synthetic

    out = tmp_path_factory.mktemp("synthetic_video")
    synthetic.generate(str(out), videos=24, shards=2, seed=5, level="video")
    return out


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module of tiny tensors: on a shared 2-core machine two OpenMP threads spin against
    each other and run up to ~30x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
