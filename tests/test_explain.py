"""model.explain: attention mapped to frames, the Fig. 5 plot, image overlays, class names, unknown ids."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import explain
from model.engine.checkpoint import save_checkpoint
from model.networks.video_model import build_model
from pipeline import shards

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIM, NUM_CLASSES = 8, 6


def test_frame_attention_hand_computed():
    # stride 4, T = 6 padded frames, 5 valid: step 0 = frames 0-3 (4 valid), step 1 = frames 4-5 (only 4 valid)
    attn = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])  # (1, K=2, T'=2)
    got = explain.frame_attention(attn, torch.tensor([5]), T=6, stride=4)
    want = torch.tensor([[[0.0625] * 4 + [0.75, 0.0], [0.25] * 4 + [0.0, 0.0]]])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("head", ["cma", "self-attn", "mean"])
@pytest.mark.parametrize("backbone", ["snet", "fc"])
def test_frame_attention_sums_to_one_over_valid_frames(head, backbone):
    torch.manual_seed(0)
    model = build_model({"head": head, "backbone": backbone, "feature_dim": DIM, "num_classes": NUM_CLASSES}).eval()
    lengths = torch.tensor([37, 5, 16, 1])
    T = 40
    x = torch.randn(4, T, DIM)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    with torch.no_grad():
        feats, fmask = model.forward_features(x, mask)
        attn = model.head.attention(feats, fmask)  # (B, K, T')
    stride = explain.time_stride(model.backbone)
    assert stride == (16 if backbone == "snet" else 1)
    per_frame = explain.frame_attention(attn, lengths, T, stride)  # (B, K, T)
    assert per_frame.shape == (4, NUM_CLASSES, T)
    torch.testing.assert_close(per_frame.sum(dim=-1), torch.ones(4, NUM_CLASSES))
    assert torch.all(per_frame.masked_select(~mask.unsqueeze(1).expand_as(per_frame)) == 0)
    assert torch.all(per_frame >= 0)


def test_explain_video_picks_most_probable_classes():
    torch.manual_seed(1)
    model = build_model({"head": "cma", "backbone": "snet", "feature_dim": DIM, "num_classes": NUM_CLASSES}).eval()
    frames = np.random.default_rng(0).normal(size=(23, DIM)).astype(np.float32)
    expl = explain.explain_video(model, frames, top_classes=3)
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.from_numpy(frames)[None], torch.ones(1, 23, dtype=torch.bool)))[0]
    np.testing.assert_allclose(expl.probabilities, probs.numpy(), rtol=1e-5, atol=1e-6)
    assert expl.classes.tolist() == torch.argsort(probs, descending=True)[:3].tolist()
    assert expl.attention.shape == (3, 23)
    np.testing.assert_allclose(expl.attention.sum(axis=1), 1.0, rtol=1e-5)


def test_rated_spans_split_by_rating_and_cut_to_frames():
    video = shards.Video(id="v", labels=np.array([2], np.int32), num_frames=12,
                         segment_start_times=np.array([0, 5, 10, 15, 5], np.int32),
                         segment_labels=np.array([2, 2, 2, 2, 3], np.int32),
                         segment_scores=np.array([1, 0, 1, 1, 1], np.float32))
    assert explain.rated_spans(video, 2, 12) == ([(0, 5), (10, 12)], [(5, 10)])
    assert explain.rated_spans(video, 3, 12) == ([(5, 10)], [])
    assert explain.rated_spans(video, 4, 12) == ([], [])


def test_resize_nearest_and_image_overlay(tmp_path):
    from matplotlib.figure import Figure

    attn = np.array([[0.1, 0.2], [0.3, 0.4]])
    big = explain.resize_nearest(attn, 4, 6)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(attn, 2, axis=0), 3, axis=1))
    image = np.random.default_rng(0).uniform(size=(4, 6, 3))
    fig = Figure()
    drawn = explain.plot_attention_2d(fig.subplots(), image, attn, title="class 3")
    np.testing.assert_allclose(drawn, big / 0.4)
    fig.savefig(tmp_path / "img.png")
    assert (tmp_path / "img.png").read_bytes()[:8] == PNG_MAGIC


def test_read_class_names_formats(tmp_path):
    vocab = tmp_path / "vocabulary.csv"
    vocab.write_text("Index,TrainVideoCount,KnowledgeGraphId,Name\n0,9,/m/a,Game\n3,4,/m/b,\"Car, race\"\n")
    assert explain.read_class_names(vocab) == {0: "Game", 3: "Car, race"}
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("5,Skiing\n7,Dog\n")
    assert explain.read_class_names(pairs) == {5: "Skiing", 7: "Dog"}
    plain = tmp_path / "names.txt"
    plain.write_text("Game\nVehicle\n\nCar\n")
    assert explain.read_class_names(plain) == {0: "Game", 1: "Vehicle", 2: "Car"}


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    """Two shards; video 'rated' carries ratings for classes the model's top list is forced to contain."""
    root = tmp_path_factory.mktemp("explain")
    schema = shards.shard_schema({"rgb": DIM}, has_segments=True, whitening_sha256="0" * 64)
    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    ids = [["a0", "a1", "rated"], ["b0", "b1"]]
    for s, names in enumerate(ids):
        with shards.ShardWriter(root / "shards" / f"part-{s:05d}-of-00002.parquet", schema) as w:
            for vid in names:
                t = 45 if vid == "rated" else 12
                w.write({"id": vid, "labels": [0, 2], "num_frames": t,
                         "rgb": rng.normal(size=(t, DIM)).astype("<f2").tobytes(),
                         "segment_start_times": [0, 20, 40] if vid == "rated" else [],
                         "segment_labels": [0, 0, 1] if vid == "rated" else [],
                         "segment_scores": [1.0, 0.0, 1.0] if vid == "rated" else []})
    args = {"head": "cma", "backbone": "snet", "features": "rgb", "feature_dim": DIM,
            "num_classes": NUM_CLASSES, "max_frames": 300}
    torch.manual_seed(0)
    model = build_model(args)
    with torch.no_grad():  # classes 0 and 1 most probable whatever the frames: their bias dominates
        model.head.classifier.bias.copy_(torch.tensor([4.0, 3.0, -4.0, -4.0, -4.0, -4.0]))
    save_checkpoint(root / "best.pt", {"model": model.state_dict(), "args": args})
    return root


def test_cli_writes_png_and_numbers(video_data, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("Skiing\nSnowboarding\nMountain\nCar\nGuitar\nDog\n")
    out = tmp_path / "fig" / "rated.png"
    args = explain.get_args_parser().parse_args(
        ["--checkpoint", str(video_data / "best.pt"), "--data", str(video_data), "--id", "rated", "--out", str(out),
         "--top-classes", "2", "--class-names", str(names), "--device", "cpu"])
    record = explain.main(args)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    saved = json.loads(out.with_name("rated.png.json").read_text())
    assert saved["classes"] == record["classes"] == [0, 1]
    assert saved["frames"] == 45 and saved["stride"] == 16 and saved["labels"] == [0, 2]
    np.testing.assert_allclose(np.sum(saved["attention"], axis=1), 1.0, atol=1e-4)
    assert saved["probabilities"][0] >= saved["probabilities"][1]


def test_unknown_id_is_one_line_error(video_data, tmp_path, capsys):
    from model.engine.cli import run_cli

    with pytest.raises(explain.VideoNotFound, match=r"among the 5 videos of 2 shard"):
        explain.find_video(str(video_data), "missing")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(explain.main, explain.get_args_parser(),
                ["--checkpoint", str(video_data / "best.pt"), "--data", str(video_data), "--id", "missing",
                 "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "5 videos" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_attention_1d_overlaid_and_checked():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    attention = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    explain.plot_attention_1d(ax, attention, ["a", "b"], positions=np.array([10, 11, 12]), xlabel="token")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    assert ax.get_xlim() == (10, 13) and ax.get_xlabel() == "token"
    with pytest.raises(explain.ExplainError):
        explain.plot_attention_1d(ax, attention, ["only one"])


REAL_VOCABULARY = Path(__file__).resolve().parents[2] / "shared" / "reference" / "yt8m_labels" / "vocabulary.csv"


@pytest.mark.skipif(not REAL_VOCABULARY.exists(), reason="shared/reference/yt8m_labels not beside the checkout")
def test_real_youtube8m_vocabulary_parses():
    names = explain.read_class_names(REAL_VOCABULARY)
    assert len(names) == 3862 and sorted(names) == list(range(3862))
    assert names[0] == "Game" and names[2] == "Vehicle"
    assert "Nike, Inc." in names.values()  # quoted field with a comma
    unnamed = next(c for c, n in names.items() if not n)  # the 2018 file leaves some names empty
    assert explain.class_label(unnamed, names) == f"class {unnamed}"


def test_vocabulary_without_name_column_is_refused(tmp_path):
    from pipeline.vocabulary import VocabularyError, read_vocabulary

    bad = tmp_path / "v.csv"
    bad.write_text("Index,TrainVideoCount\n0,3\n")
    with pytest.raises(VocabularyError, match="Index and Name"):
        read_vocabulary(bad)


def _vocabulary(tmp_path):
    from pipeline.vocabulary import write_vocabulary

    path = tmp_path / "vocabulary.csv"
    write_vocabulary(path, [{"Index": i, "Name": n, "WikiDescription": "a, \"quoted\" text"}
                            for i, n in enumerate(["Skiing", "Snowboarding", "Mountain, snowy", "Car"])])
    return path


def test_figure_names_classes_and_marks_true_labels_and_ratings(video_data, tmp_path):
    names = explain.read_class_names(_vocabulary(tmp_path))
    assert names[2] == "Mountain, snowy"
    video = explain.find_video(str(video_data), "rated")
    expl = explain.VideoExplanation(probabilities=np.linspace(0.9, 0.4, NUM_CLASSES), classes=np.array([0, 1]),
                                    attention=np.full((2, 45), 1 / 45), stride=16)
    fig = explain.build_video_figure(expl, video, names)
    axes = fig.get_axes()
    assert len(axes) == 3  # two classes and the rated-segment strip
    from matplotlib.text import Text

    titles = [ax.get_title(loc="left") for ax in axes[:2]]
    assert titles[0].startswith("* 0 Skiing") and "a true label" in titles[0]
    assert titles[1].startswith("1 Snowboarding") and "not a label" in titles[1]
    weight = {t.get_text(): t.get_fontweight() for t in fig.findobj(Text)}
    assert weight[titles[0]] == "bold" and weight[titles[1]] == "normal"
    ticks = axes[2].get_yticklabels()  # the strip: one row per rated class, true labels bold
    assert [t.get_text() for t in ticks] == ["0 Skiing", "1 Snowboarding"]
    assert [t.get_fontweight() for t in ticks] == ["bold", "normal"]
    assert "2 Mountain, snowy" in fig.get_suptitle()


def test_cli_pick_correct_with_vocabulary_writes_png_with_names(video_data, tmp_path):
    out = tmp_path / "pick.png"
    record = explain.main(explain.get_args_parser().parse_args(
        ["--checkpoint", str(video_data / "best.pt"), "--data", str(video_data), "--pick", "correct",
         "--out", str(out), "--top-classes", "2", "--vocabulary", str(_vocabulary(tmp_path)), "--device", "cpu"]))
    assert out.read_bytes()[:8] == PNG_MAGIC
    # every video has label 0 on top (the bias); only 'rated' has a rated segment of class 0
    assert record["video"] == "rated" and record["pick"]["correct"] and record["pick"]["rated"]
    assert record["pick"]["videos"] == record["pick"]["correct_videos"] == 5
    assert record["names"] == {"0": "0 Skiing", "1": "1 Snowboarding", "2": "2 Mountain, snowy"}
    with pytest.raises(SystemExit):  # --id and --pick exclude each other
        explain.get_args_parser().parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--id", "x",
                                              "--pick", "correct"])
