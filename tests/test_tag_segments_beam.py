"""beam_jobs.tag_segments (RunInference) yields exactly the rows of the local CLI model.tag_segments."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from beam_jobs.tag_segments import SegmentTaggerModelHandler
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


# -- one model per worker VM (RunInference's share_model_across_processes) ----------------------------------------
class CountingHandler(SegmentTaggerModelHandler):
    """``SegmentTaggerModelHandler`` that appends the loading process's id to ``LOG/loads`` on every
    ``load_model`` and ``pid batch_size`` to ``LOG/batches`` on every ``run_inference``. Loads and batches run in
    the FnApiRunner's worker processes, so they are counted through files, not in this process; the workers
    unpickle this class by reference (this module, with tests/ on their PYTHONPATH)."""

    def __init__(self, log_dir: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_dir = str(log_dir)

    def load_model(self):
        with open(os.path.join(self.log_dir, "loads"), "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().load_model()

    def run_inference(self, batch, model, inference_args=None):
        with open(os.path.join(self.log_dir, "batches"), "a") as f:
            f.write(f"{os.getpid()} {len(batch)}\n")
        return super().run_inference(batch, model, inference_args)


def test_one_model_load_shared_by_the_worker_processes(setup, tmp_path, monkeypatch):
    """Two FnApiRunner worker processes (``--direct_num_workers=2``, multi_processing), the handler shared across
    processes: the first process to set up RunInference loads the model into a ``MultiProcessShared`` server that
    lives in it, and every process's batches go through a proxy to that one model, so the loads are 1 however
    many processes run inference (on Dataflow: one per worker VM, not one per SDK process). Rows equal the local
    CLI's, so the proxy path scores what the in-process model does."""
    from beam_jobs import options as job_options
    from beam_jobs import tag_segments

    root, data, ckpt, _ = setup
    tests_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    # MultiProcessShared keeps its server's address and lock files in the workers' temp dir: keep them here
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    logs = tmp_path / "logs"
    logs.mkdir()
    handler = CountingHandler(logs, str(ckpt), "frames", 3, None, "cpu", min_batch_size=1, max_batch_size=2,
                              share_model=True)
    assert handler.share_model_across_processes() and handler.model_copies() == 1

    opts = job_options.make_pipeline_options(["--direct_num_workers=2"], save_main_session=False)
    assert job_options.runner_name(opts) == "FnApiRunner(multi_processing, workers=2)"
    assert tag_segments.share_model_by_default(opts)
    p = job_options.new_pipeline(opts)
    out = tmp_path / "beam"
    tag_segments.build_pipeline(p, data.paths, handler, ("rgb",), DIM, MAX_FRAMES, str(out))
    p.run().wait_until_finish()

    loads = (logs / "loads").read_text().split()
    batches = [line.split() for line in (logs / "batches").read_text().splitlines()]
    assert len(loads) == 1, loads
    assert sum(int(n) for _, n in batches) == len(data.videos) and all(1 <= int(n) <= 2 for _, n in batches)
    assert int(loads[0]) != os.getpid()  # loaded in a worker process, not here
    per_process = Counter(pid for pid, _ in batches)
    # both worker processes ran inference (3 shards split over 2 workers after the Reshuffle) on the one model
    assert len(per_process) == 2, f"batches per process {dict(per_process)}: the test needs both workers busy"
    assert sorted(f.name for f in tmp_path.glob("*.address"))  # the shared model's server was there
    run_local(root, data.root, ckpt, tmp_path / "local", ["--top-k", "3"])
    want, got = read_rows(tmp_path / "local"), read_rows(out)
    assert set(got) == set(want) and max(abs(got[k] - want[k]) for k in want) <= 1e-5


def test_batch_and_sharing_flags_reach_the_handler(setup, tmp_path):
    from apache_beam.ml.inference.base import KeyedModelHandler
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs import options as job_options
    from beam_jobs import tag_segments

    _, _, ckpt, _ = setup
    h = tag_segments.SegmentTaggerModelHandler(str(ckpt), "frames", 3, min_batch_size=4, max_batch_size=8,
                                               share_model=True, model_copies=2)
    keyed = KeyedModelHandler(h)  # what RunInference sees
    assert dict(keyed.batch_elements_kwargs()) == {"min_batch_size": 4, "max_batch_size": 8}
    assert keyed.share_model_across_processes() and keyed.model_copies() == 2
    h = tag_segments.SegmentTaggerModelHandler(str(ckpt), "frames", 3, share_model=False, model_copies=3)
    assert not h.share_model_across_processes() and h.model_copies() == 1
    with pytest.raises(ValueError):
        tag_segments.SegmentTaggerModelHandler(str(ckpt), "frames", 3, min_batch_size=9, max_batch_size=8)

    args = tag_segments.get_args_parser().parse_args(
        ["--checkpoint", "c", "--data", "d", "--out", "o", "--batch-size", "5", "--no-share-model"])
    assert (args.min_batch_size, args.max_batch_size, args.share_model) == (1, 5, False)
    # default sharing: off only for the local runner's single in-process worker
    assert not tag_segments.share_model_by_default(job_options.make_pipeline_options(["--direct_num_workers=1"]))
    assert tag_segments.share_model_by_default(job_options.make_pipeline_options(["--direct_num_workers=3"]))
    assert tag_segments.share_model_by_default(PipelineOptions(["--runner=DataflowRunner"]))


@pytest.mark.parametrize("flags, message", [
    (["--min-batch-size", "8", "--max-batch-size", "4"], "--min-batch-size"),
    (["--model-copies", "0"], "--model-copies"),
    (["--model-copies", "2", "--no-share-model"], "--share-model"),
])
def test_bad_batch_or_sharing_flags_are_one_line_errors(setup, tmp_path, capsys, flags, message):
    from beam_jobs import tag_segments

    _, data, ckpt, _ = setup
    code = tag_segments.main(["--checkpoint", str(ckpt), "--data", str(data.root), "--out", str(tmp_path / "o")]
                             + flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
