"""Segment windows, scorers, bounded top lists, tagging CLI, segment evaluation and segment fine-tuning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

from model import evaluate, tag_segments, train_video
from model.engine import segments as sg
from model.engine.checkpoint import save_checkpoint
from model.networks.losses import class_balanced_bce
from model.engine.submission import read_segment_submission, segment_map_from_csv
from model.networks.video_model import VideoClassifier, build_video_model
from pipeline import shards
from shard_factory import write_random_shards

K = 20


# ---------------------------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("T, starts, counts", [
    (1, [0], [1]), (4, [0], [4]), (5, [0], [5]), (6, [0, 5], [5, 1]), (12, [0, 5, 10], [5, 5, 2]),
    (300, list(range(0, 300, 5)), [5] * 60),
])
def test_window_arithmetic(T, starts, counts):
    assert sg.segment_starts(T).tolist() == starts
    assert sg.segment_frame_counts(T).tolist() == counts
    assert sg.num_segments(T) == len(starts)


def _small_model(head: str, backbone: str = "snet", seed: int = 0) -> VideoClassifier:
    torch.manual_seed(seed)
    kw = {"channels": (8, 8, 8, 8)} if backbone == "snet" else {"hidden": 8}
    return build_video_model(head, backbone, in_dim=6, num_classes=K, backbone_kw=kw).eval()


@pytest.mark.parametrize("head,backbone", [("cma", "snet"), ("self-attn", "fc"), ("mean", "snet")])
def test_frames_scorer_is_the_model_on_each_window(head, backbone):
    model = _small_model(head, backbone)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, 6, generator=g)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for b, t in enumerate((12, 7, 1)):  # partial last windows, and a 1-frame video
        mask[b, :t] = True
    out = sg.score_segments(model, x, mask, "frames")
    assert out.valid.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    for b, t in enumerate((12, 7, 1)):
        for s, start in enumerate(sg.segment_starts(t).tolist()):
            end = min(start + 5, t)
            want = torch.sigmoid(model(x[b:b + 1, start:end], torch.ones(1, end - start, dtype=torch.bool)))
            torch.testing.assert_close(out.scores[b, s], want[0], rtol=1e-5, atol=1e-6)
    assert float(out.scores[~out.valid].abs().sum()) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# context scorer: attention mass through SNet pooling


class FixedHead(nn.Module):
    """A head whose attention over the backbone steps and logits are set by the test."""

    def __init__(self, attn: torch.Tensor, logits: torch.Tensor):
        super().__init__()
        self.attn, self.logits = attn, logits

    def attention(self, feats, mask):
        return self.attn

    def forward(self, feats, mask):
        return self.logits


def test_context_scorer_maps_snet_steps_to_frames():
    from model.networks.video_backbones import SNet

    backbone = SNet(in_dim=6, channels=(4, 4, 4, 4)).eval()
    assert sg.time_stride(backbone) == 16
    T = 37  # steps: frames 0-15, 16-31, 32-36 (ceil pooling)
    feats, fmask = backbone(torch.randn(1, T, 6), torch.ones(1, T, dtype=torch.bool))
    assert feats.shape[1] == 3
    attn = torch.zeros(1, 2, 3)
    attn[0, 0, 1] = 1.0  # class 0 attends to step 1 only
    attn[0, 1, 2] = 1.0  # class 1 to the partial last step only
    logits = torch.tensor([[0.0, 1.0]])
    model = VideoClassifier(backbone, FixedHead(attn, logits)).eval()
    out = sg.score_segments(model, torch.randn(1, T, 6), None, "context")
    p = torch.sigmoid(logits)[0]
    # class 0: step 1 = frames 16..31, 1/16 each. Segments 15-19: 4 frames, 20-24 and 25-29: 5, 30-34: 2.
    # Density = mass / (frames / 37); the peak (5/16 over 5/37) scales to 1.
    want0 = torch.tensor([0, 0, 0, 4 / 5, 1, 1, 2 / 5, 0]) * p[0]
    # class 1: step 2 = frames 32..36, 1/5 each. Segment 30-34 holds 3 of them (share 5/37), 35-36 holds 2 of
    # them with share 2/37: densities (3/5)/(5/37) and (2/5)/(2/37) -> 0.6 and 1.
    want1 = torch.tensor([0, 0, 0, 0, 0, 0, 0.6, 1]) * p[1]
    torch.testing.assert_close(out.scores[0, :, 0], want0)
    torch.testing.assert_close(out.scores[0, :, 1], want1)


def test_context_scorer_mean_head_gives_video_probability():
    model = _small_model("mean")
    x = torch.randn(2, 23, 6)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 9:] = False
    out = sg.score_segments(model, x, mask, "context")
    p = torch.sigmoid(model(x, mask))
    for b, S in ((0, 5), (1, 2)):
        torch.testing.assert_close(out.scores[b, :S], p[b].expand(S, K))
    assert out.valid.sum(1).tolist() == [5, 2]


@pytest.mark.parametrize("head", ["cma", "self-attn"])
def test_context_scorer_bounded_by_video_probability(head):
    model = _small_model(head)
    x = torch.randn(2, 40, 6)
    out = sg.score_segments(model, x, None, "context")
    p = torch.sigmoid(model(x, torch.ones(2, 40, dtype=torch.bool)))
    assert bool((out.scores <= p.unsqueeze(1) + 1e-6).all())
    torch.testing.assert_close(out.scores.amax(dim=1), p)  # the peak segment keeps the video probability


def test_score_video_segments_single_and_batch():
    model = _small_model("self-attn")
    x = torch.randn(2, 11, 6)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 3:] = False
    rows = sg.score_video_segments(model, x, mask, scorer="frames", top_k=3)
    single = sg.score_video_segments(model, x[0], scorer="frames", top_k=3)
    # the same rows; scores equal up to float32 rounding (a batch of 2 may take another matmul kernel than 1 video)
    assert [r[:2] for r in rows[0]] == [r[:2] for r in single]
    np.testing.assert_allclose([r[2] for r in rows[0]], [r[2] for r in single], rtol=1e-5)
    assert [r[0] for r in rows[1]] == [0, 0, 0]  # 3 frames: one window
    scores = sg.score_segments(model, x[1:2, :3], None, "frames").scores[0, 0]
    top = torch.topk(scores, 3)
    assert [(c, pytest.approx(v)) for _, c, v in rows[1]] == list(zip(top.indices.tolist(), top.values.tolist()))


# ---------------------------------------------------------------------------------------------------------------
# bounded top lists


@pytest.mark.parametrize("ties", [False, True])
def test_top_segments_per_class_equals_full_sort(ties):
    rng = np.random.default_rng(3)
    classes = [4, 9, 1]
    N, m = 700, 25
    scores = rng.random((N, 3)).astype(np.float32)
    if ties:
        scores = np.round(scores * 10) / 10  # many ties: the earlier segment must rank first
    ids = [f"v{i // 7}" for i in range(N)]
    starts = (np.arange(N) % 7) * 5
    top = sg.TopSegmentsPerClass(classes, m, capacity=m + 13)  # many compactions
    for lo in range(0, N, 37):
        top.add(ids[lo:lo + 37], starts[lo:lo + 37], scores[lo:lo + 37])
    got = top.ranked_with_scores()
    for j, c in enumerate(classes):
        order = np.argsort(-scores[:, j], kind="stable")[:m]
        assert [(v, s) for v, s, _ in got[c]] == [(ids[i], int(starts[i])) for i in order]
        assert [x for _, _, x in got[c]] == pytest.approx(scores[order, j].tolist())
    assert top.nbytes == 3 * (m + 13) * 12
    assert len(top._ids) <= 3 * m + 13  # the id table is pruned too


def test_top_segments_buffers_grow_with_the_stream_not_with_max_per_class():
    rng = np.random.default_rng(4)
    top = sg.TopSegmentsPerClass(list(range(1000)), 100_000)  # the challenge's sizes: 2.4 GB if preallocated
    assert top.nbytes <= 1000 * 4096 * 12
    scores = rng.random((9000, 2)).astype(np.float32)
    small = sg.TopSegmentsPerClass([0, 1], 100_000)
    for lo in range(0, 9000, 500):
        small.add([f"v{i}" for i in range(lo, lo + 500)], np.zeros(500), scores[lo:lo + 500])
    assert small.nbytes == 2 * 16384 * 12  # doubled twice: 4096 -> 8192 -> 16384 columns
    got = small.ranked_with_scores()[1]
    order = np.argsort(-scores[:, 1], kind="stable")
    assert [v for v, _, _ in got] == [f"v{i}" for i in order]


# ---------------------------------------------------------------------------------------------------------------
# tagging CLI and segment evaluation


def _checkpoint(path: Path, head: str, dims: int = 8, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_video_model(head, "snet", in_dim=dims, num_classes=K)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.3)
    save_checkpoint(path, {"model": model.state_dict(),
                           "args": {"head": head, "backbone": "snet", "feature_dim": dims, "num_classes": K,
                                    "features": "rgb", "max_frames": 300}})
    return path


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    root = tmp_path_factory.mktemp("tag")
    data = write_random_shards(root / "data", num_videos=10, num_shards=2, with_segments=True, num_classes=K,
                               frames=(1, 23), seed=4)
    ckpt = _checkpoint(root / "cma.pt", "cma")
    counts = np.bincount(np.concatenate([v.segment_labels for v in data.videos.values()]), minlength=K)
    classes = sorted(np.argsort(-counts, kind="stable")[:3].tolist())  # the most rated classes
    (root / "classes.csv").write_text("Index\n" + "\n".join(map(str, classes[::-1])) + "\n")
    argv = ["--checkpoint", str(ckpt), "--data", str(root / "data"), "--out", str(root / "out"), "--top-k", "4",
            "--scorer", "context", "--kaggle-csv", str(root / "sub.csv"), "--max-per-class", "12",
            "--classes", str(root / "classes.csv"),
            "--batch-size", "3", "--workers", "0", "--device", "cpu", "--rows-per-file", "50"]
    summary = tag_segments.main(tag_segments.get_args_parser().parse_args(argv))
    return root, data, summary, classes


def test_tag_segments_rows_equal_direct_computation(tagged):
    root, data, summary, classes = tagged
    model, _ = evaluate.load_model(str(root / "cma.pt"), torch.device("cpu"))
    files = sorted((root / "out").glob("part-*.parquet"))
    assert [str(f) for f in files] == summary["files"] and len(files) > 1  # rolled over every 50 rows
    table = pq.read_table(files).to_pydict()
    assert pq.read_schema(files[0]).types == [t for t in tag_segments.TAG_SCHEMA.types]
    got: dict[str, list] = {}
    for vid, start, cls, score in zip(table["id"], table["start_time"], table["class"], table["score"]):
        got.setdefault(vid, []).append((start, cls, score))
    assert set(got) == set(data.videos)
    windows = 0
    for vid, v in data.videos.items():
        want = sg.score_video_segments(model, torch.from_numpy(v.features["rgb"]), scorer="context", top_k=4,
                                         classes=classes)  # --classes restricts the rows too
        assert [(s, c) for s, c, _ in got[vid]] == [(s, c) for s, c, _ in want]
        assert [x for *_, x in got[vid]] == pytest.approx([x for *_, x in want], rel=1e-5)
        windows += sg.num_segments(v.num_frames)
    assert summary["segments"] == windows and summary["rows"] == 3 * windows  # top 4 of 3 classes
    config = json.loads((root / "out/config.json").read_text())
    assert config["scorer"] == "context" and config["top_k"] == 4


def test_kaggle_csv_format_ranking_and_cut(tagged):
    root, data, _, classes = tagged
    lines = (root / "sub.csv").read_text().splitlines()
    assert lines[0] == "Class,Segments"
    assert [int(ln.split(",")[0]) for ln in lines[1:]] == classes  # only --classes, ascending
    model, _ = evaluate.load_model(str(root / "cma.pt"), torch.device("cpu"))
    allrows = []
    for vid, v in data.videos.items():
        out = sg.score_segments(model, torch.from_numpy(v.features["rgb"])[None], None, "context")
        for s, start in enumerate(out.start_times.tolist()):
            allrows.append((vid, start, out.scores[0, s].numpy()))
    sub = read_segment_submission(root / "sub.csv")
    assert len(allrows) > 12
    for cls in classes:
        ranked = sorted(allrows, key=lambda r: -r[2][cls])[:12]
        assert len(sub[cls]) == 12
        got_scores = [next(r[2][cls] for r in allrows if (r[0], r[1]) == key) for key in sub[cls]]
        assert got_scores == pytest.approx([r[2][cls] for r in ranked], rel=1e-5)
        assert got_scores == sorted(got_scores, reverse=True)


def test_evaluate_segments_checkpoint_equals_submission_of_tagging(tagged, tmp_path):
    root, _, _, classes = tagged
    base = ["--data", str(root / "data"), "--workers", "0", "--device", "cpu", "--batch-size", "3",
            "--classes", str(root / "classes.csv")]
    direct = evaluate.main(evaluate.get_args_parser().parse_args(
        base + ["--segments", "--checkpoint", str(root / "cma.pt"), "--scorer", "context", "--k", "12",
                "--out", str(tmp_path / "a.json")]))
    from_csv = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--data", str(root / "data"), "--segments", "--submission", str(root / "sub.csv"),
         "--out", str(tmp_path / "b.json")]))
    assert direct["segment_map"] == pytest.approx(from_csv["segment_map"])
    assert direct["per_class_ap"] == pytest.approx(from_csv["per_class_ap"])
    # per-class AP of the submitted classes with a positive rating; the others are listed apart, not averaged
    ratings = evaluate.read_segment_ratings(str(root / "data"))
    positive = {str(c) for c in classes if ratings.num_positives(c) > 0}
    written = json.loads((tmp_path / "b.json").read_text())
    assert set(written["per_class_ap"]) == positive and written["classes"] == len(classes)
    assert written["classes_without_positives"] == len(classes) - len(positive) == direct["classes_without_positives"]
    assert direct["segment_map"] == pytest.approx(sum(direct["per_class_ap"].values()) / len(positive))
    assert direct["predictions"] - direct["unrated"] >= 1  # some ranked window was rated


@pytest.fixture(scope="module")
def rated_data(tmp_path_factory) -> Path:
    """Two videos with hand-set ratings (20 frames each, 4 dims)."""
    root = tmp_path_factory.mktemp("rated")
    (root / "shards").mkdir()
    schema = shards.shard_schema({"rgb": 4}, dtype="float16", has_segments=True, level="frame",
                                 whitening_sha256="0" * 64)
    rated = {"v1": ([0, 5, 0], [3, 3, 7], [1.0, 0.0, 1.0]), "v2": ([0, 10], [3, 7], [1.0, 0.0])}
    with shards.ShardWriter(str(root / "shards/part-00000-of-00001.parquet"), schema) as w:
        for vid, (st, lab, sco) in rated.items():
            w.write({"id": vid, "labels": [3, 7], "num_frames": 20,
                     "rgb": np.zeros((20, 4), "<f2").tobytes(), "segment_start_times": st,
                     "segment_labels": lab, "segment_scores": sco})
    return root


# class 3: rated list v1:5 (neg), v2:0 (pos, P = 1/2), v1:0 (pos, P = 2/3); vX:0 is unrated: AP = (1/2 + 2/3) / 2.
# class 7: v1:0 (pos, P = 1), v2:10 (neg): AP = 1. MAP = (7/12 + 1) / 2 = 19/24.
HAND_CSV = "3,v1:5 v2:0 vX:0 v1:0\n7,v1:0 v2:10\n"


@pytest.mark.parametrize("header", [True, False])
def test_evaluate_submission_hand_computed_map(rated_data, tmp_path, header):
    csv = tmp_path / "sub.csv"
    csv.write_text(("Class,Segments\n" if header else "") + HAND_CSV)
    r = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--segments", "--submission", str(csv), "--data", str(rated_data), "--out", str(tmp_path / "m.json")]))
    assert r["segment_map"] == pytest.approx(19 / 24)
    assert r["per_class_ap"] == {"3": pytest.approx(7 / 12), "7": pytest.approx(1.0)}
    assert r["unrated"] == 1 and r["ratings"] == 5
    assert json.loads((tmp_path / "m.json").read_text())["segment_map"] == pytest.approx(19 / 24)


def test_segment_ids_are_str_and_binary_csv_scores_the_same(rated_data, tmp_path):
    ratings = evaluate.read_segment_ratings(str(rated_data))
    keys = [k for c in ratings for k in ratings[c]]
    assert keys and all(type(vid) is str and type(start) is int for vid, start in keys)
    csv = tmp_path / "sub.csv"
    csv.write_bytes(("Class,Segments\r\n" + HAND_CSV).encode())
    with open(csv, "rb") as f:  # bytes lines must give str ids (the published script's Python 3 bug)
        rep = segment_map_from_csv(f, ratings)
    assert rep.map == pytest.approx(19 / 24) and rep.classes == 2


class _WindowMean(nn.Module):
    """Logits = the mean of the window's frames: frame values set the segment scores (D = K = 3)."""

    def forward(self, x, mask):
        m = mask.unsqueeze(-1).float()
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@pytest.fixture(scope="module")
def planted_data(tmp_path_factory) -> Path:
    """v: 12 frames (windows 0, 5, 10), class 0 scored 3 > 2 > 1 on them; w: 10 frames, class 1 scored 3 on the
    unrated w:0 and 2 on the rated w:5. Class 0 is also rated positive on v:15, past v's last frame."""
    root = tmp_path_factory.mktemp("planted")
    (root / "shards").mkdir()
    schema = shards.shard_schema({"rgb": 3}, dtype="float16", has_segments=True, level="frame",
                                 whitening_sha256="0" * 64)
    v = np.zeros((12, 3), "<f2")
    v[:, 0] = [3] * 5 + [2] * 5 + [1] * 2
    v[:, 1] = -5
    w = np.zeros((10, 3), "<f2")
    w[:, 0] = -5
    w[:, 1] = [3] * 5 + [2] * 5
    rows = [("v", v, [0], ([0, 5, 10, 15], [0, 0, 0, 0], [1.0, 0.0, 1.0, 1.0])),
            ("w", w, [1], ([5, 0], [1, 2], [1.0, 0.0]))]
    with shards.ShardWriter(str(root / "shards/part-00000-of-00001.parquet"), schema) as wr:
        for vid, x, labels, (st, lab, sco) in rows:
            wr.write({"id": vid, "labels": labels, "num_frames": len(x), "rgb": x.tobytes(),
                      "segment_start_times": st, "segment_labels": lab, "segment_scores": sco})
    return root


@pytest.mark.parametrize("from_shards", [False, True])
def test_model_segment_map_is_the_official_one_hand_computed(planted_data, from_shards):
    from model.data.video import make_loader

    loader = make_loader(str(planted_data), batch_size=2, workers=0, num_classes=3, shuffle=False,
                         segment_labels=True)
    ratings = sg.read_segment_ratings(str(planted_data)) if from_shards else None
    model = _WindowMean()
    # k = 100000: class 0 ranks v:0 +, v:5 -, v:10 + (w's windows are unrated for it); its 3 positives include
    # v:15, which no window can hit: AP = (1 + 2/3) / 3 = 5/9 (0.5556; 0.8333 if v:15 were dropped).
    # Class 1: w:0 (unrated, dropped), w:5 + -> AP 1. Class 2 is rated only negative: left out of the mean.
    rep = sg.rated_segment_map(model, loader, "cpu", "frames", ratings=ratings)
    assert rep.per_class_ap == pytest.approx({0: 5 / 9, 1: 1.0})
    assert rep.map == pytest.approx(7 / 9) and rep.classes_without_positives == [2]
    assert rep.windows == 5 and rep.positives == 4
    # k = 1: every window is ranked, rated or not, before the cut. Class 0 keeps v:0 (+): AP 1/3; class 1 keeps
    # only the unrated w:0: AP 0 (ranking rated windows alone would have kept w:5 and given 1).
    rep1 = sg.rated_segment_map(model, loader, "cpu", "frames", k=1, ratings=ratings)
    assert rep1.per_class_ap == pytest.approx({0: 1 / 3, 1: 0.0}) and rep1.map == pytest.approx(1 / 6)


def test_tag_segments_kaggle_csv_defaults_to_the_rated_classes(planted_data, tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt", "mean", dims=3)  # a K = 20 class model
    common = ["--checkpoint", str(ckpt), "--kaggle-csv", str(tmp_path / "sub.csv"), "--workers", "0",
              "--device", "cpu"]
    summary = tag_segments.main(tag_segments.get_args_parser().parse_args(
        common + ["--data", str(planted_data), "--out", str(tmp_path / "out")]))
    assert sorted(read_segment_submission(tmp_path / "sub.csv")) == [0, 1, 2]  # rated in the data, not all 20
    assert summary["kaggle_csv"]["classes"] == 3
    rows = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))).to_pydict()
    assert max(rows["class"]) >= 3  # the Parquet rows still rank every model class
    assert "classes that carry segment ratings in --data" in " ".join(
        tag_segments.get_args_parser().format_help().split())
    unrated = write_random_shards(tmp_path / "plain", num_videos=2, num_shards=1, dims={"rgb": 3}, frames=(5, 9))
    with pytest.raises(sg.SegmentError, match="--classes"):  # nothing rated there: --classes is required
        tag_segments.main(tag_segments.get_args_parser().parse_args(
            common + ["--data", str(unrated.root), "--out", str(tmp_path / "out2")]))


def test_evaluate_without_checkpoint_or_submission_is_a_user_error(rated_data, capsys):
    from model.engine.cli import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(evaluate.main, evaluate.get_args_parser(), ["--segments", "--data", str(rated_data)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0]


# ---------------------------------------------------------------------------------------------------------------
# segment fine-tuning


def _rated_batch():
    x = torch.arange(2 * 12 * 2, dtype=torch.float32).reshape(2, 12, 2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    return {"x": x, "mask": mask, "ids": ["a", "b"],
            "segment_start_times": [np.array([5, 5, 0]), np.array([5, 10])],
            "segment_labels": [np.array([2, 4, 1]), np.array([3, 3])],
            "segment_scores": [np.array([1.0, 0.0, 0.0]), np.array([1.0, 1.0])]}


def test_segment_training_examples():
    ex = sg.segment_training_examples(_rated_batch(), num_classes=6)
    assert list(zip(ex.ids, ex.start_times)) == [("a", 5), ("a", 0), ("b", 5)]
    assert ex.dropped == 1  # b:10 starts past its 7 frames
    torch.testing.assert_close(ex.x[0], _rated_batch()["x"][0, 5:10])
    assert ex.mask[2].tolist() == [True, True, False, False, False]  # b: frames 5, 6 only
    assert float(ex.x[2, 2:].abs().sum()) == 0.0
    assert (~ex.ignore).nonzero().tolist() == [[0, 2], [0, 4], [1, 1], [2, 3]]
    assert ex.targets[0, 2] == 1 and ex.targets[0, 4] == 0 and ex.targets[1, 1] == 0 and ex.targets[2, 3] == 1


def test_fine_tuning_loss_ignores_unrated_classes():
    ex = sg.segment_training_examples(_rated_batch(), num_classes=6)
    logits = torch.randn(3, 6)
    base = class_balanced_bce(logits, ex.targets, ignore=ex.ignore)
    changed = logits.clone()
    changed[ex.ignore] += 5.0  # move every unrated output
    assert float(class_balanced_bce(changed, ex.targets, ignore=ex.ignore)) == pytest.approx(float(base))
    rated = logits.clone()
    rated[0, 2] -= 3.0  # a rated positive scored lower: the loss must rise
    assert float(class_balanced_bce(rated, ex.targets, ignore=ex.ignore)) > float(base) + 1e-3


def test_train_video_segment_finetuning_from_init(tmp_path):
    data = write_random_shards(tmp_path / "data", num_videos=12, num_shards=1, with_segments=True,
                               num_classes=K, frames=(5, 20), seed=9)
    common = ["--train", str(tmp_path / "data"), "--val", str(tmp_path / "data"), "--head", "self-attn",
              "--num-classes", str(K), "--optimizer", "adam", "--batch-size", "6", "--workers", "0",
              "--device", "cpu", "--shuffle-buffer", "4", "--epochs", "1"]
    train_video.main(train_video.get_args_parser().parse_args(common + ["--out", str(tmp_path / "video")]))
    last = train_video.main(train_video.get_args_parser().parse_args(
        common + ["--out", str(tmp_path / "seg"), "--segment-labels", "--init", str(tmp_path / "video/last.pt"),
                  "--lr", "0"]))
    init = torch.load(tmp_path / "video/last.pt", weights_only=True)["model"]
    tuned = torch.load(tmp_path / "seg/last.pt", weights_only=True)["model"]
    model = build_video_model("self-attn", "snet", in_dim=8, num_classes=K)
    for name, _ in model.named_parameters():  # lr 0: the weights are the --init weights
        torch.testing.assert_close(tuned[name], init[name])
    model.load_state_dict(tuned)
    from model.data.video import make_loader

    loader = make_loader(str(tmp_path / "data"), batch_size=6, workers=0, num_classes=K, shuffle=False,
                         segment_labels=True)
    assert last["val_segment_map"] == pytest.approx(sg.rated_segment_map(model, loader, "cpu", "frames").map)
    assert last["train_samples"] == sum(len(set(v.segment_start_times.tolist())) for v in data.videos.values())
