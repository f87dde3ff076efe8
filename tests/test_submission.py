"""model.engine.submission: CSV round trips, header/bytes/whitespace tolerance, line-numbered errors, GAP from a CSV."""
from __future__ import annotations

import io

import numpy as np
import pytest

from model.metrics.video import SegmentRatings, VideoMetrics, segment_map, top_k_per_row
from model.engine.submission import (SEGMENT_HEADER, VIDEO_HEADER, SubmissionFormatError, VideoPredictionWriter,
                              iter_video_predictions, read_segment_submission, read_video_predictions,
                              recompute_gap_from_csv, segment_map_from_csv, write_segment_submission,
                              write_video_predictions)
from pipeline.errors import Yt8mError


def scored_videos(seed=0, n=50, k=40, quantized=True):
    rng = np.random.default_rng(seed)
    y = rng.random((n, k)) < 0.1
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, (n, k)) + 2 * y)))
    if quantized:
        s = np.round(s * 1e6) / 1e6  # exactly what 6 decimals carry: the CSV loses nothing
    ids = [f"v{i:03d}" for i in range(n)]
    labels_by_id = {vid: np.nonzero(row)[0].tolist() for vid, row in zip(ids, y)}
    return ids, s, y, labels_by_id


# ---------------------------------------------------------------------------------------------------------------
# video level


def test_video_round_trip(tmp_path):
    ids, s, _, _ = scored_videos()
    path = tmp_path / "pred.csv"
    with VideoPredictionWriter(path) as w:
        w.write(ids[:20], s[:20])
        w.write(ids[20:], s[20:])
    lines = path.read_text().splitlines()
    assert lines[0] == VIDEO_HEADER and len(lines) == 51
    first = lines[1].split(",")[1].split()
    assert len(first) == 40 and all(len(t.split(".")[1]) == 6 for t in first[1::2])  # 20 pairs, 6 decimals
    back = read_video_predictions(path)
    assert list(back) == ids
    values, idx = top_k_per_row(s, 20)
    for i, vid in enumerate(ids):
        np.testing.assert_array_equal(back[vid][0], idx[i])
        np.testing.assert_array_equal(back[vid][1], values[i])


def test_video_line_format_hand_example():
    buf = io.StringIO()
    # ties: 0.5 at classes 1 and 3 -> class 1 first; top 3 of 4 classes
    write_video_predictions(buf, ["ab12"], np.array([[0.25, 0.5, 0.125, 0.5]]), top_k=3)
    assert buf.getvalue() == f"{VIDEO_HEADER}\nab12,1 0.500000 3 0.500000 0 0.250000\n"


def test_writer_accepts_torch_and_bytes_ids():
    torch = pytest.importorskip("torch")
    buf = io.StringIO()
    write_video_predictions(buf, [b"XyZ9"], torch.tensor([[0.1, 0.9]]), top_k=2)
    assert buf.getvalue().splitlines()[1] == "XyZ9,1 0.900000 0 0.100000"


def test_writer_rejects_ids_that_break_the_format():
    with pytest.raises(SubmissionFormatError) as e:
        write_video_predictions(io.StringIO(), ["ok", "bad,id"], np.zeros((2, 3)))
    assert e.value.line_number == 3  # header, "ok", then this one
    assert isinstance(e.value, Yt8mError)


@pytest.mark.parametrize("text", [
    "VideoId,LabelConfidencePairs\nab12,3 0.9 7 0.25\ncd34,\n",              # header; a video without pairs
    "ab12,3 0.9 7 0.25\ncd34,\n",                                            # no header
    "\ufeffVideoId, LabelConfidencePairs\r\nab12 , 3 0.9  7 0.25  \r\ncd34,\r\n\r\n\n",  # BOM, CRLF, spaces
    "videoid,labelconfidencepairs\n\nab12,3 0.9 7 0.25\n   \ncd34,   \n",      # case, blank lines
])
def test_video_reader_tolerates_header_and_whitespace(text):
    back = read_video_predictions(io.StringIO(text))
    assert list(back) == ["ab12", "cd34"]
    np.testing.assert_array_equal(back["ab12"][0], [3, 7])
    np.testing.assert_array_equal(back["ab12"][1], [0.9, 0.25])
    assert back["cd34"][0].size == 0


def test_video_reader_gives_str_ids_from_binary_files(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"VideoId,LabelConfidencePairs\nab12,3 0.9\n")
    with open(path, "rb") as f:
        rows = list(iter_video_predictions(f))
    assert [type(vid) for vid, _, _ in rows] == [str]
    assert rows[0][0] == "ab12"  # not "b'ab12'"
    assert recompute_gap_from_csv(io.BytesIO(path.read_bytes()), {"ab12": [3]}).gap == 1.0


@pytest.mark.parametrize("text,line,fragment", [
    ("VideoId,LabelConfidencePairs\nab12,3 0.9 7\n", 2, "pair up"),
    ("ab12,3 0.9\ncd34 3 0.9\n", 2, "expected"),
    ("ab12,3 0.9\n\ncd34,x 0.9\n", 3, "label 'x'"),
    ("ab12,3 0.9\ncd34,-1 0.9\n", 2, "negative"),
    ("ab12,3 zero\n", 1, "not a number"),
    ("ab12,3 nan\n", 1, "not finite"),
    ("ab12,3 0.9 3 0.8\n", 1, "twice"),
    ("ab12,3 0.9\nab12,4 0.9\n", 2, "listed twice"),
    ("a b,3 0.9\n", 1, "whitespace"),
    (",3 0.9\n", 1, "empty"),
    ("Class,Segments\n3,ab12:0\n", 1, "other submission format"),  # a segment file is not a video file
])
def test_video_reader_errors_carry_line_numbers(text, line, fragment):
    with pytest.raises(SubmissionFormatError) as e:
        read_video_predictions(io.StringIO(text))
    assert e.value.line_number == line
    assert fragment in str(e.value) and str(e.value).startswith(f"line {line}:")


def test_video_reader_checks_class_range():
    with pytest.raises(SubmissionFormatError, match="number of classes"):
        read_video_predictions(io.StringIO("ab12,3862 0.5\n"), num_classes=3862)


@pytest.mark.parametrize("quantized", [True, False])
def test_gap_from_csv_equals_in_memory_gap(tmp_path, quantized):
    ids, s, y, labels_by_id = scored_videos(seed=1, n=120, quantized=quantized)
    path = tmp_path / "pred.csv"
    write_video_predictions(path, ids, s.astype(np.float32) if not quantized else s)
    expected = VideoMetrics(40, top_k=20).update(s, y).compute()["gap"]
    got = recompute_gap_from_csv(path, labels_by_id)
    if quantized:
        assert got.gap == expected  # the same numbers, the same ranking: bit-identical
    else:
        assert got.gap == pytest.approx(expected, abs=1e-5)  # only the 6-decimal rounding differs
    assert (got.videos, got.pairs, got.positives, got.missing_videos, got.unknown_videos) == \
        (120, 2400, int(y.sum()), 0, 0)


def test_gap_from_csv_counts_missing_and_unknown_videos():
    text = "VideoId,LabelConfidencePairs\na,1 0.9 2 0.8\nzz,1 0.95\nb,2 0.7 1 0.6 3 0.5\n"
    truth = {"a": [1], "b": [3], "c": [4, 5]}
    # top_k=2: a -> (0.9 +), (0.8 -); b -> (0.7 -), (0.6 -), (0.5 +) cut; zz unknown; c missing
    # pooled 0.9 +, 0.8 -, 0.7 -, 0.6 -; positives = 1 + 1 + 2 = 4 -> GAP = 1/4
    got = recompute_gap_from_csv(io.StringIO(text), truth, top_k=2)
    assert got.gap == pytest.approx(0.25)
    assert (got.videos, got.unknown_videos, got.missing_videos, got.truncated_pairs, got.pairs) == (2, 1, 1, 1, 4)


# ---------------------------------------------------------------------------------------------------------------
# segment level


def test_segment_round_trip_and_truncation(tmp_path):
    ranked = {7: [("b", 5), ("a", 0)], 3: [("a", 0), ("c", 10), ("a", 5)], 9: []}
    path = tmp_path / "seg.csv"
    summary = write_segment_submission(path, ranked, max_per_class=2)
    assert (summary.classes, summary.segments, summary.truncated) == (3, 4, 1)
    assert path.read_text() == f"{SEGMENT_HEADER}\n3,a:0 c:10\n7,b:5 a:0\n9,\n"
    back = read_segment_submission(path)
    assert back == {3: [("a", 0), ("c", 10)], 7: [("b", 5), ("a", 0)], 9: []}
    assert all(type(vid) is str for segs in back.values() for vid, _ in segs)


def test_segment_reader_tolerates_header_bytes_and_whitespace():
    raw = "\ufeffClass,Segments\r\n3, ab12:0  cd34:35 \r\n\r\n7,ab12:5\r\n\n".encode()
    back = read_segment_submission(io.BytesIO(raw))
    assert back == {3: [("ab12", 0), ("cd34", 35)], 7: [("ab12", 5)]}
    assert read_segment_submission(io.StringIO("3,ab12:0\n")) == {3: [("ab12", 0)]}  # no header


@pytest.mark.parametrize("text,line,fragment", [
    ("Class,Segments\n3,ab12:0\n3,cd34:0\n", 3, "listed twice"),
    ("Class,Segments\nx,ab12:0\n", 2, "class id 'x'"),
    ("Class,Segments\n3,ab12\n", 2, "vid:start"),
    ("Class,Segments\n3,ab12:zz\n", 2, "start time 'zz'"),
    ("Class,Segments\n3,:5\n", 2, "vid:start"),
    ("Class,Segments\n\n3 ab12:0\n", 3, "expected"),
    ("VideoId,LabelConfidencePairs\n", 1, "other submission format"),
    ("Video,Segments\n", 1, "class id 'Video'"),
])
def test_segment_reader_errors_carry_line_numbers(text, line, fragment):
    with pytest.raises(SubmissionFormatError) as e:
        read_segment_submission(io.StringIO(text))
    assert e.value.line_number == line and fragment in str(e.value)


def test_segment_map_from_csv_equals_in_memory():
    ratings = SegmentRatings([(b"ab12", 0, 3, 1), ("cd34", 35, 3, 0), ("ef56", 5, 3, 1), ("ab12", 5, 7, 1)])
    text = "Class,Segments\n3,cd34:35 ab12:0 zz99:0 ef56:5\n7,ab12:0 ab12:5\n"
    # class 3: cd34:35 - (rank 1), ab12:0 + (rank 2, 1/2), zz99:0 unrated, ef56:5 + (rank 3, 2/3): (1/2+2/3)/2
    # class 7: ab12:0 unrated, ab12:5 + (rank 1): 1.  MAP = (7/12 + 1) / 2 = 19/24
    rep = segment_map_from_csv(io.StringIO(text), ratings)
    assert rep.map == pytest.approx(19 / 24) and rep.unrated == 2
    assert segment_map(read_segment_submission(io.StringIO(text)), ratings)[0] == rep.map
