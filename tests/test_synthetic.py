"""pipeline.synthetic: deterministic files in the official layout, and the planted structure is really there."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pipeline import synthetic
from pipeline.records import dequantize, decode_sequence_example
from pipeline.tfrecord import read_records

SMALL = dict(min_frames=30, max_frames=60)


def _decode_dir(path, prefix="train"):
    return [decode_sequence_example(p) for f in sorted(path.glob(f"{prefix}*.tfrecord"))
            for _, p in read_records(str(f))]


@pytest.fixture(scope="module")
def videos():
    """80 generated videos (seed 9) with their planted evidence, straight from the generator (no files)."""
    ids = synthetic.make_ids(9, 80)
    return [synthetic.generate_video(9, i, ids[i], segments=True) for i in range(80)]


# -- files -------------------------------------------------------------------------------------------------------
def test_same_arguments_give_identical_bytes_and_another_seed_differs(tmp_path):
    def make(name, seed):
        synthetic.generate(str(tmp_path / name), videos=5, shards=2, seed=seed, segments=True, **SMALL)
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    a, b, c = make("a", 1), make("b", 1), make("c", 2)
    assert sorted(a) == ["config.json", "labels.json", "train0000.tfrecord", "train0001.tfrecord", "vocabulary.csv"]
    for name in ("train0000.tfrecord", "train0001.tfrecord", "labels.json", "vocabulary.csv"):
        assert a[name] == b[name]
    assert a["train0000.tfrecord"] != c["train0000.tfrecord"]
    assert a["labels.json"] == c["labels.json"]  # the class structure does not depend on --seed


def test_video_i_does_not_depend_on_data_set_size_or_sharding(tmp_path):
    synthetic.generate(str(tmp_path / "few"), videos=3, shards=1, seed=4, **SMALL)
    synthetic.generate(str(tmp_path / "many"), videos=6, shards=3, seed=4, **SMALL)
    few, many = _decode_dir(tmp_path / "few"), _decode_dir(tmp_path / "many")
    for x, y in zip(few, many[:3]):
        assert x.id == y.id
        np.testing.assert_array_equal(x.rgb, y.rgb)


def test_layout_ids_lengths_and_config(synthetic_frame_dir):
    assert sorted(p.name for p in synthetic_frame_dir.glob("*.tfrecord")) == ["train0000.tfrecord",
                                                                              "train0001.tfrecord"]
    per_shard = [sum(1 for _ in read_records(str(p))) for p in sorted(synthetic_frame_dir.glob("*.tfrecord"))]
    assert per_shard == [12, 12]
    recs = _decode_dir(synthetic_frame_dir)
    assert len({r.id for r in recs}) == 24
    assert all(re.fullmatch(r"[A-Za-z0-9]{4}", r.id) for r in recs)
    assert all(30 <= r.num_frames <= 300 and r.audio.shape == (r.num_frames, 128) for r in recs)
    config = json.loads((synthetic_frame_dir / "config.json").read_text())
    assert config["config"]["seed"] == 5 and config["videos"] == 24
    assert config["frames"] == sum(r.num_frames for r in recs)
    assert config["segment_ratings"] == sum(r.segment_labels.size for r in recs)
    assert sum(config["class_counts"].values()) == sum(r.labels.size for r in recs)


@pytest.mark.parametrize("prefix,shards", [("validate", 1), ("test", 3)])
def test_prefix_names_shards_like_the_official_release(tmp_path, prefix, shards):
    summary = synthetic.generate(str(tmp_path), videos=3, shards=shards, seed=0, prefix=prefix, **SMALL)
    assert summary["files"] == [f"{prefix}{i:04d}.tfrecord" for i in range(shards)]
    assert len(_decode_dir(tmp_path, prefix)) == 3


def test_labels_json_documents_the_structure(synthetic_frame_dir):
    doc = json.loads((synthetic_frame_dir / "labels.json").read_text())
    s = synthetic.build_structure()
    assert doc["classes"] == s.class_ids.tolist() and doc["vocab_size"] == 3862
    assert {int(f): h for f, h in doc["faint_host"].items()} == s.faint_host
    assert [tuple(g) for g in doc["groups"]] == list(s.groups)
    assert sorted(doc["strong"] + [int(f) for f in doc["faint_host"]]) == doc["classes"]


def test_vocabulary_csv_names_every_class_in_the_official_format(synthetic_frame_dir):
    import csv

    from pipeline.vocabulary import VOCABULARY_COLUMNS, read_vocabulary

    s = synthetic.build_structure()
    path = synthetic_frame_dir / "vocabulary.csv"
    assert path.read_text().splitlines()[0] == ",".join(VOCABULARY_COLUMNS)
    names = read_vocabulary(path)
    assert sorted(names) == s.class_ids.tolist()
    for faint, host in s.faint_host.items():
        assert names[faint].startswith("faint-") and names[faint].endswith(f"(host {names[host]})")
    assert all(names[c].startswith("strong-") for c in s.strong_ids) and len(set(names.values())) == len(names)
    with open(path, newline="") as f:
        rows = {int(r["Index"]): r for r in csv.DictReader(f)}
    counts = json.loads((synthetic_frame_dir / "config.json").read_text())["class_counts"]
    assert {c: int(r["TrainVideoCount"]) for c, r in rows.items()} == {int(c): n for c, n in counts.items()}


# -- structure ---------------------------------------------------------------------------------------------------
def test_structure_groups_ids_and_prototypes():
    s = synthetic.build_structure()
    assert len(s.groups) == 12 and all(3 <= len(g) <= 5 for g in s.groups)
    members = [c for g in s.groups for c in g]
    assert sorted(members) == s.class_ids.tolist() and len(set(members)) == len(members)
    assert 0 <= s.class_ids.min() and s.class_ids.max() < 3862
    assert s.class_ids.max() - s.class_ids.min() > 2000  # sparse ids spread over the vocabulary
    for faint, host in s.faint_host.items():
        assert any(faint in g and host in g for g in s.groups) and host not in s.faint_host
    assert len(s.faint_host) >= 4
    gram = s.rgb_prototypes @ s.rgb_prototypes.T
    np.testing.assert_allclose(gram, np.eye(len(s.class_ids)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(s.audio_prototypes, axis=1), 1.0, atol=1e-5)
    assert np.abs(s.group_weights.sum() - 1) < 1e-9


def test_labels_co_occur_within_groups_and_faint_classes_need_their_host():
    s = synthetic.build_structure()
    group_of = {c: i for i, g in enumerate(s.groups) for c in g}
    label_sets = [synthetic.generate_video(2, i, "x", max_frames=40).record.labels.tolist() for i in range(300)]
    faint_with_host = host_count = 0
    for labels in label_sets:
        assert labels == sorted(set(labels)) and labels
        assert len({group_of[c] for c in labels}) <= 2
        for faint, host in s.faint_host.items():
            assert faint not in labels or host in labels
            host_count += host in labels
            faint_with_host += faint in labels
    assert 2.0 <= np.mean([len(x) for x in label_sets]) <= 3.5
    assert 0.4 <= faint_with_host / host_count <= 0.8  # P(faint | host) is 0.6 by construction


# -- planted evidence ---------------------------------------------------------------------------------------------
def _frame_mask(num_frames: int, segments: np.ndarray) -> np.ndarray:
    mask = np.zeros(num_frames, bool)
    for seg in segments:
        mask[seg * 5:seg * 5 + 5] = True
    return mask


def test_evidence_stands_out_in_single_frames(videos):
    s = synthetic.build_structure()
    lift = {"strong": [], "faint": [], "audio": []}
    detected = []
    for v in videos:
        rgb, audio = v.record.features("rgb"), v.record.features("audio")
        for c, segs in v.evidence.items():
            on = _frame_mask(v.record.num_frames, segs)
            proj = rgb @ s.rgb_prototypes[s.row(c)]
            kind = "faint" if c in s.faint_host else "strong"
            lift[kind].append(proj[on].mean() - proj[~on].mean())
            if kind == "strong":
                audio_proj = audio @ s.audio_prototypes[s.row(c)]
                lift["audio"].append(audio_proj[on].mean() - audio_proj[~on].mean())
                # single frames: nearly every evidence frame beats the video's 95th background percentile
                detected.append(np.mean(proj[on] > np.percentile(proj[~on], 95)))
    # the lifts are the planted amplitudes (background, other labels and quantization average out)
    assert np.mean(lift["strong"]) == pytest.approx(synthetic.RGB_AMPLITUDE, rel=0.1)
    assert np.mean(lift["faint"]) == pytest.approx(synthetic.RGB_AMPLITUDE * synthetic.FAINT_FACTOR, rel=0.2)
    assert np.mean(lift["audio"]) == pytest.approx(synthetic.AUDIO_AMPLITUDE, rel=0.15)
    assert np.mean(detected) > 0.9


def test_evidence_is_confined_to_a_few_segments(videos):
    s = synthetic.build_structure()
    covered = frames = 0
    for v in videos:
        on = np.zeros(v.record.num_frames, bool)
        for c, segs in v.evidence.items():
            assert segs.size >= 1 and (segs * 5 + 5 <= v.record.num_frames).all()
            if c in s.faint_host:
                assert set(segs) <= set(v.evidence[s.faint_host[c]])  # faint evidence rides on its host
            on |= _frame_mask(v.record.num_frames, segs)
        covered += on.sum()
        frames += on.size
    assert 0.08 <= covered / frames <= 0.25


def test_background_drifts_smoothly_and_stays_in_a_realistic_range(videos):
    ratios, values = [], []
    for v in videos:
        on = np.zeros(v.record.num_frames, bool)
        for segs in v.evidence.values():
            on |= _frame_mask(v.record.num_frames, segs)
        x = v.record.features("rgb")
        pairs = ~on[:-1] & ~on[1:]
        background = x[~on] - x[~on].mean(0)
        step = ((x[1:] - x[:-1])[pairs] ** 2).sum(1).mean()
        ratios.append(step / (2 * (background ** 2).sum(1).mean()))  # 1.0 for independent frames
        values.append(x[~on])
    assert np.mean(ratios) < 0.5
    values = np.concatenate(values)
    assert 0.4 <= values.std() <= 0.6 and abs(values.mean()) < 0.05
    codes = np.concatenate([v.record.rgb.ravel() for v in videos])
    assert np.mean((codes == 0) | (codes == 255)) < 0.01  # clipping is rare


def test_segment_ratings_match_the_planted_evidence(videos, synthetic_frame_dir):
    s = synthetic.build_structure()
    counts, kinds = [], {"positive": 0, "negative_own_class": 0, "hard_negative": 0}
    for v in videos:
        r = v.record
        counts.append(r.segment_start_times.size)
        pairs = list(zip(r.segment_start_times.tolist(), r.segment_labels.tolist()))
        assert len(set(pairs)) == len(pairs)
        for start, label, score in zip(r.segment_start_times, r.segment_labels, r.segment_scores):
            assert start % 5 == 0 and start + 5 <= r.num_frames and label in s.class_ids
            planted = label in v.evidence and start // 5 in v.evidence[label]
            assert score == (1.0 if planted else 0.0)
            if score:
                kinds["positive"] += 1
            else:
                kinds["negative_own_class" if label in r.labels else "hard_negative"] += 1
    assert 3.5 <= np.mean(counts) <= 7  # about five ratings per video, as in the 2019 data
    assert min(kinds.values()) > 0
    # and the files hold exactly what the generator made
    written = _decode_dir(synthetic_frame_dir)
    ids = synthetic.make_ids(5, 24)
    for i in (0, 13, 23):
        planted = synthetic.generate_video(5, i, ids[i], segments=True).record
        assert written[i].id == planted.id
        np.testing.assert_array_equal(written[i].segment_start_times, planted.segment_start_times)
        np.testing.assert_array_equal(written[i].segment_labels, planted.segment_labels)
        np.testing.assert_array_equal(written[i].rgb, planted.rgb)


def test_strength_scales_the_evidence():
    s = synthetic.build_structure()

    def lift(strength):
        v = synthetic.generate_video(3, 0, "x", strength=strength)
        c = next(c for c in v.evidence if c not in s.faint_host)
        proj = dequantize(v.record.rgb) @ s.rgb_prototypes[s.row(c)]
        on = _frame_mask(v.record.num_frames, v.evidence[c])
        return proj[on].mean() - proj[~on].mean()

    assert lift(0.0) == pytest.approx(0.0, abs=0.5)
    assert lift(2.0) == pytest.approx(2 * lift(1.0), rel=0.25)


# -- command line and errors --------------------------------------------------------------------------------------
def test_main_writes_and_reports(tmp_path, capsys):
    summary = synthetic.main(["--out", str(tmp_path), "--videos", "2", "--shards", "1", "--seed", "3",
                              "--max-frames", "40"])
    assert summary["videos"] == 2 and (tmp_path / "train0000.tfrecord").exists()
    assert "wrote 2 videos" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--level", "video", "--segments"], "--segments"),
    (["--videos", "2", "--shards", "3"], "shards"),
    (["--videos", "0"], "videos"),
    (["--seed", "-1"], "seed"),
    (["--max-frames", "301"], "300"),
    (["--min-frames", "50", "--max-frames", "40"], "min_frames"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--out", str(tmp_path), "--videos", "2", "--shards", "1"] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_shards_of_an_earlier_bigger_run_are_not_left_behind(tmp_path):
    synthetic.generate(str(tmp_path), videos=3, shards=3, seed=0, **SMALL)
    with pytest.raises(synthetic.GeneratorError, match="train0002.tfrecord"):
        synthetic.generate(str(tmp_path), videos=3, shards=2, seed=0, **SMALL)
    synthetic.generate(str(tmp_path), videos=3, shards=3, seed=1, **SMALL)  # same files again: fine


def test_generated_files_read_back_with_tensorflow(tmp_path):
    """The generator writes TFRecords without TensorFlow; TensorFlow's own reader and parser must read them."""
    import tensorflow as tf

    from pipeline import synthetic
    from pipeline.records import decode_sequence_example

    synthetic.main(["--out", str(tmp_path), "--videos", "6", "--shards", "2", "--seed", "3", "--segments",
                    "--max-frames", "40"])
    files = sorted(str(p) for p in tmp_path.glob("*.tfrecord"))
    seen = 0
    for raw in tf.data.TFRecordDataset(files):  # checks the CRC32C framing
        ctx, seq = tf.io.parse_single_sequence_example(
            raw, context_features={"id": tf.io.FixedLenFeature([], tf.string),
                                   "labels": tf.io.VarLenFeature(tf.int64)},
            sequence_features={"rgb": tf.io.FixedLenSequenceFeature([], tf.string)})
        ours = decode_sequence_example(raw.numpy())
        assert ctx["id"].numpy().decode() == ours.id
        assert sorted(tf.sparse.to_dense(ctx["labels"]).numpy().tolist()) == sorted(ours.labels.tolist())
        rgb = tf.io.decode_raw(seq["rgb"], tf.uint8).numpy()
        assert rgb.shape == (ours.num_frames, 1024) and (rgb == ours.rgb).all()
        seen += 1
    assert seen == 6
