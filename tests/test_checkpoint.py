"""Checkpoints: atomic replace, weights_only round trip, RNG capture/restore, compatibility errors."""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model.engine import checkpoint as ckpt_mod
from model.engine.checkpoint import (CheckpointError, capture_rng_state, check_compatible, load_checkpoint,
                              restore_rng_state, save_checkpoint, to_plain)


def _training_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.8)
    for _ in range(3):  # non-trivial momentum buffers and scheduler position
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    args = argparse.Namespace(head="cma", backbone="snet", features=("rgb", "audio"), out=Path("/tmp/run"),
                              lr=2e-4, epochs=3, resume=False)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": 2, "step": 3, "samples_seen": 15, "best_metric": 0.25, "args": to_plain(args),
            "rng": capture_rng_state()}


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_weights_only_round_trip(tmp_path):
    state = _training_state()
    save_checkpoint(tmp_path / "last.pt", state)
    back = load_checkpoint(tmp_path / "last.pt")
    _assert_same(state, back)
    assert back["args"] == {"head": "cma", "backbone": "snet", "features": ["rgb", "audio"], "out": "/tmp/run",
                            "lr": 2e-4, "epochs": 3, "resume": False}
    # The file loads with plain torch.load(weights_only=True) too: nothing project-specific is pickled.
    torch.load(tmp_path / "last.pt", weights_only=True)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind


def test_save_refuses_objects_weights_only_cannot_load_and_keeps_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(CheckpointError, match="PosixPath|WindowsPath"):
        save_checkpoint(path, {"epoch": 2, "args": {"out": Path("/x")}})
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(10.0)})
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip archive")  # what a process killed mid-write leaves behind
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(10)})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_failed_rename_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def no_replace(src, dst):
        raise PermissionError("simulated")

    monkeypatch.setattr(ckpt_mod.os, "replace", no_replace)
    with pytest.raises(PermissionError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


@pytest.mark.parametrize("content, match", [
    (None, "no checkpoint"),
    (b"", "cannot read"),
    (b"not a zip at all", "cannot read"),
    ("truncated", "cannot read"),
])
def test_missing_or_corrupt_checkpoint_raises_checkpoint_error(tmp_path, content, match):
    path = tmp_path / "c.pt"
    if content == "truncated":
        save_checkpoint(path, _training_state())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_load_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"args": argparse.Namespace(head="cma")}, path)  # legal for torch.save, refused by weights_only
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


def test_required_keys_and_non_dict(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"model": {}, "epoch": 0})
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        load_checkpoint(tmp_path / "a.pt", required_keys=("model", "optimizer"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pt")


def test_fsspec_url_round_trip():
    state = {"epoch": 4, "w": torch.randn(3, 2)}
    save_checkpoint("memory://ckpt-test/last.pt", state)
    _assert_same(state, load_checkpoint("memory://ckpt-test/last.pt"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint("memory://ckpt-test/none.pt")


def test_map_location_moves_tensors(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"w": torch.ones(2)})
    assert load_checkpoint(tmp_path / "a.pt", map_location=torch.device("cpu"))["w"].device.type == "cpu"


def _draw() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(),  # randn caches a gauss
            random.random(), random.gauss(0, 1))


def test_rng_capture_restore_reproduces_draws_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(1)  # leave numpy with a cached Gaussian, which must be restored too
    random.gauss(0, 1)
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draw()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert _draw() != expected
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected


def test_malformed_rng_state_is_a_checkpoint_error():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(CheckpointError, match="RNG"):
        restore_rng_state(state)


def test_check_compatible_names_every_mismatched_flag():
    stored = {"head": "cma", "backbone": "snet", "features": ["rgb"], "num_classes": 3862, "feature_dim": 1024}
    check_compatible(stored, {**stored, "features": ("rgb",), "lr": 1.0})  # tuple == stored list; lr not checked
    with pytest.raises(CheckpointError) as e:
        check_compatible(stored, {**stored, "head": "mean", "num_classes": 100})
    msg = str(e.value)
    assert "--head cma in the checkpoint vs mean now" in msg
    assert "--num-classes 3862 in the checkpoint vs 100 now" in msg
    assert "backbone" not in msg
    with pytest.raises(CheckpointError, match="--feature-dim <absent>"):
        check_compatible({k: v for k, v in stored.items() if k != "feature_dim"}, stored)
    check_compatible(stored, {"head": "mean", "backbone": "snet"}, keys=("backbone",))  # only the keys asked for are compared


def test_per_class_self_attention_saved_as_self_attn_loads_as_per_class(tmp_path):
    """Checkpoints from before the paper's single-map head call the per-class head 'self-attn'; its (K, C)
    attention conv tells it apart, and every loader maps it to 'self-attn-per-class'."""
    from model.evaluate import load_model
    from model.networks.heads import PerClassSelfAttentionHead, SelfAttentionHead
    from model.train_video import ARCH_KEYS, with_arch_defaults
    from model.networks.video_model import build_model, resolve_legacy_head

    args = {"head": "self-attn-per-class", "backbone": "fc", "features": "rgb", "feature_dim": 6,
            "num_classes": 4, "width": 8, "max_frames": 300}
    torch.manual_seed(0)
    old = build_model(args).eval()
    save_checkpoint(tmp_path / "old.pt", {"model": old.state_dict(), "args": {**args, "head": "self-attn"}})
    model, a = load_model(str(tmp_path / "old.pt"), torch.device("cpu"))
    assert isinstance(model.head, PerClassSelfAttentionHead) and a["head"] == "self-attn-per-class"
    x, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), old(x, mask))

    stored = load_checkpoint(tmp_path / "old.pt")
    resolved = with_arch_defaults(stored["args"], stored["model"])
    check_compatible(resolved, args, ARCH_KEYS[:5])  # an explicit per-class run matches it
    with pytest.raises(CheckpointError, match="--head self-attn-per-class in the checkpoint vs self-attn now"):
        check_compatible(resolved, {**args, "head": "self-attn"}, ARCH_KEYS[:5])

    new = build_model({**args, "head": "self-attn"})  # the single-map head keeps its name
    assert isinstance(new.head, SelfAttentionHead)
    assert resolve_legacy_head({"head": "self-attn"}, new.state_dict())["head"] == "self-attn"
    assert resolve_legacy_head({"head": "cma"}, old.state_dict())["head"] == "cma"
