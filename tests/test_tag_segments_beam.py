"""beam_jobs.tag_segments (RunInference) yields exactly the rows of the local CLI model.tag_segments."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from model import tag_segments as local_tagger
from model.engine.checkpoint import save_checkpoint
from model.networks.video_model import build_model
from shard_factory import write_random_shards

NUM_CLASSES = 12
DIM = 16
MAX_FRAMES = 30  # below the longest video (40 frames): both paths must truncate alike


def write_checkpoint(path: Path, head: str = "cma", backbone: str = "snet", seed: int = 0) -> Path:
    """A checkpoint in the format model.train_video writes: 'model' state and the run's 'args'."""
    args = {"head": head, "backbone": backbone, "features": "rgb", "feature_dim": DIM,
            "num_classes": NUM_CLASSES, "max_frames": MAX_FRAMES}
    torch.manual_seed(seed)
    model = build_model(args)
    # Non-default batch-norm statistics, so eval-mode normalization is not the identity.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(path, {"model": model.state_dict(), "args": args, "epoch": 0})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tagbeam")
    data = write_random_shards(root / "data", num_videos=14, num_shards=3, dims={"rgb": DIM}, seed=3,
                               num_classes=NUM_CLASSES, frames=(1, 40), row_group_size=3)
    ckpt = write_checkpoint(root / "best.pt")
    classes = root / "classes.csv"
    classes.write_text("Index\n1\n4\n5\n7\n11\n")
    return root, data, ckpt, classes


def read_rows(out: Path) -> dict[tuple[str, int, int], float]:
    files = sorted(out.glob("part-*.parquet"))
    assert files, f"no tag files in {out}"
    rows: dict[tuple[str, int, int], float] = {}
    for f in files:
        table = pq.read_table(f)
        assert table.schema.equals(local_tagger.TAG_SCHEMA, check_metadata=False), table.schema
        for vid, start, cls, score in zip(*(table.column(c).to_pylist() for c in table.schema.names)):
            assert (vid, start, cls) not in rows, "a (video, segment, class) row appears twice"
            rows[(vid, start, cls)] = score
    return rows


def run_local(root: Path, data: Path, ckpt: Path, out: Path, extra: list[str]) -> dict:
    args = local_tagger.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--workers", "0", "--device", "cpu",
         "--batch-size", "4"] + extra)
    return local_tagger.main(args)


def run_beam(data: str, ckpt: Path, out: Path, extra: list[str]) -> dict:
    from beam_jobs import tag_segments

    return tag_segments.run(["--checkpoint", str(ckpt), "--data", data, "--out", str(out), "--device", "cpu",
                             "--batch-size", "3", "--direct_num_workers", "1"] + extra)


@pytest.mark.parametrize("scorer,top_k,restrict", [("frames", 3, False), ("context", 2, True)])
def test_beam_rows_equal_local_cli_rows(setup, tmp_path, scorer, top_k, restrict):
    root, data, ckpt, classes = setup
    extra = ["--scorer", scorer, "--top-k", str(top_k)] + (["--classes", str(classes)] if restrict else [])
    local = run_local(root, data.root, ckpt, tmp_path / "local", extra)
    summary = run_beam(str(data.root), ckpt, tmp_path / "beam", extra)
    want, got = read_rows(tmp_path / "local"), read_rows(tmp_path / "beam")

    assert set(got) == set(want)
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= 1e-5, worst
    # every window of every (truncated) video, top_k classes each
    frames = {v.id: min(v.num_frames, MAX_FRAMES) for v in data.videos.values()}
    windows = sum(-(-t // 5) for t in frames.values())
    assert len(got) == windows * top_k == local["rows"] == summary["rows"]
    assert {vid for vid, _, _ in got} == set(frames)
    if restrict:
        assert {cls for _, _, cls in got} <= {1, 4, 5, 7, 11}
    assert summary["videos_tagged"] == len(frames) and summary["segments"] == windows
    assert summary["frames_truncated"] == sum(max(v.num_frames - MAX_FRAMES, 0) for v in data.videos.values())
    assert summary["dead_lettered"] == {} and summary["shards_read"] == 3
    config = json.loads((tmp_path / "beam/config.json").read_text())
    assert config["scorer"] == scorer and config["max_frames"] == MAX_FRAMES


def test_unreadable_shard_is_dead_lettered_and_the_rest_tagged(setup, tmp_path):
    root, data, ckpt, _ = setup
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in data.paths:
        os.symlink(p, mixed / Path(p).name)
    (mixed / "part-99999-of-99999.parquet").write_bytes(b"PAR1 this is not a parquet file")
    run_local(root, data.root, ckpt, tmp_path / "local", ["--top-k", "2"])
    summary = run_beam(str(mixed), ckpt, tmp_path / "beam", ["--top-k", "2"])

    assert read_rows(tmp_path / "beam").keys() == read_rows(tmp_path / "local").keys()
    assert summary["dead_lettered"] == {"unreadable_shard": 1} and summary["shards_read"] == 3
    lines = (tmp_path / "beam/dead_letter/dead-00000-of-00001.jsonl").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["source"].endswith("part-99999-of-99999.parquet") and entry["reason"] == "unreadable_shard"


def test_feature_dim_mismatch_is_one_line_error(setup, tmp_path, capsys):
    from beam_jobs import tag_segments

    _, data, _, _ = setup
    wide = write_checkpoint(tmp_path / "wide.pt")
    state = torch.load(wide, weights_only=True)
    state["args"]["feature_dim"] = DIM * 2
    state["model"] = build_model(state["args"]).state_dict()
    save_checkpoint(wide, state)
    code = tag_segments.main(["--checkpoint", str(wide), "--data", str(data.root), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dims" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
