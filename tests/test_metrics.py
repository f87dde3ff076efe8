"""model.metrics.video against hand-computed values, scikit-learn, and itself (batching, histogram mode)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from model.metrics.video import (MetricsError, SegmentRatings, VideoMetrics, average_precision, gap, hit_at_1,
                           map_full_ranking, perr, segment_map, segment_map_report, top_k_per_row, youtube8m_map)


def multi_hot(label_lists, num_classes):
    y = np.zeros((len(label_lists), num_classes), dtype=np.float32)
    for row, ids in enumerate(label_lists):
        y[row, list(ids)] = 1
    return y


def random_case(seed, n=400, k=30, positive_rate=0.08, decimals=None, logits=False):
    rng = np.random.default_rng(seed)
    y = rng.random((n, k)) < positive_rate
    s = rng.normal(0, 1, (n, k)) + 1.5 * y  # informative but imperfect scores
    if not logits:
        s = 1 / (1 + np.exp(-s))
    if decimals is not None:
        s = np.round(s, decimals)  # many exact ties
    return s.astype(np.float32), y


def sklearn_map(s, y):
    return np.mean([average_precision_score(y[:, c], s[:, c]) for c in range(y.shape[1]) if y[:, c].any()])


# ---------------------------------------------------------------------------------------------------------------
# top_k_per_row


def test_top_k_tie_rule_hand_example():
    # 0.5 at columns 1, 2, 4 straddles the 3rd place: the lowest columns (1, 2) win, in column order
    values, idx = top_k_per_row(np.array([[0.1, 0.5, 0.5, 0.9, 0.5]]), 3)
    assert idx.tolist() == [[3, 1, 2]]
    assert values.tolist() == [[0.9, 0.5, 0.5]]


@pytest.mark.parametrize("k", [1, 3, 7, 10, 25])
def test_top_k_equals_stable_sort(k):
    s, _ = random_case(0, n=50, k=10, decimals=1)  # heavy ties
    values, idx = top_k_per_row(s, k)
    ref = np.argsort(-s, axis=1, kind="stable")[:, : min(k, 10)]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(values, np.take_along_axis(s, ref, axis=1))


def test_top_k_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    s = torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.3, 0.9]], requires_grad=True)
    _, idx = top_k_per_row(s, 2)
    assert idx.tolist() == [[1, 0], [2, 0]]


# ---------------------------------------------------------------------------------------------------------------
# hand-computed video-level metrics


def test_hit_at_1_hand_example():
    s = np.array([[0.9, 0.1, 0.3],   # top class 0, a label: hit
                  [0.2, 0.8, 0.8],   # tie 1/2 -> class 1 (lower index), label is 2: miss
                  [0.5, 0.4, 0.1]])  # no labels: counts 0
    y = multi_hot([{0}, {2}, set()], 3)
    assert hit_at_1(s, y) == pytest.approx(1 / 3)


def test_perr_hand_example():
    s = np.array([[0.9, 0.8, 0.1, 0.0],    # k=2, top-2 {0, 1}, labels {0, 2}: 1/2
                  [0.0, 0.0, 0.7, 0.2],    # k=1, top-1 {2}, label 0: 0
                  [0.0, -1., -1., -1.],    # k=1, top-1 {0} is the label but its score is not > 0: 0
                  [0.5, 0.5, 0.5, 0.5],    # no labels: contributes 0, still counts
                  [0.3, 0.6, 0.5, 0.1]])   # k=3, top-3 {1, 2, 0}, labels {1, 2, 3}: 2/3
    y = multi_hot([{0, 2}, {0}, {0}, set(), {1, 2, 3}], 4)
    # (1/2 + 0 + 0 + 0 + 2/3) / 5 = 7/30
    assert perr(s, y) == pytest.approx(7 / 30)


def hand_gap_case():
    # 3 videos, classes 0..3, top_k = 2; class 3 is never positive.
    s = np.array([[0.9, 0.5, 0.1, 0.0],    # labels {0, 2}: top-2 (0.9 c0 +), (0.5 c1 -); c2 outside
                  [0.2, 0.65, 0.8, 0.0],   # label {1}:     top-2 (0.8 c2 -), (0.65 c1 +)
                  [0.7, 0.3, 0.4, 0.0]])   # no labels:     top-2 (0.7 c0 -), (0.4 c2 -)
    y = multi_hot([{0, 2}, {1}, set()], 4)
    return s, y


def test_gap_hand_example():
    s, y = hand_gap_case()
    # pooled: 0.9 +, 0.8 -, 0.7 -, 0.65 +, 0.5 -, 0.4 -; all positives = 3 (one outside every top 2)
    # GAP = (1/1 + 2/4) / 3 = 0.5
    assert gap(s, y, top_k=2) == pytest.approx(0.5)


def test_youtube8m_map_hand_example():
    s, y = hand_gap_case()
    # class 0: (0.9 +), (0.7 -), 1 positive -> AP 1;  class 1: (0.65 +), (0.5 -) -> 1
    # class 2: (0.8 -), (0.4 -), its positive (video 0) is outside the top 2 -> 0;  class 3: no positive
    # mAP over classes with positives = (1 + 1 + 0) / 3; over all 4 classes = 2 / 4
    assert youtube8m_map(s, y, top_k=2) == pytest.approx(2 / 3)
    assert youtube8m_map(s, y, top_k=2, all_classes=True) == pytest.approx(0.5)
    m = VideoMetrics(4, top_k=2).update(s, y)
    np.testing.assert_allclose(m.per_class_ap(), [1.0, 1.0, 0.0, np.nan])
    r = m.compute()
    assert (r["num_positives"], r["num_positives_in_top_k"], r["num_classes_with_positives"]) == (3, 2, 3)
    assert r["num_videos_without_labels"] == 1


def test_gap_tie_block_hand_example():
    # one video, every class ranked: 0.9 -, then a tie block {c1 +, c2 +, c3 -} at ranks 2-4, then 0.1 + at 5.
    # Both positives of the block get the precision at its end, 2/4; the last positive 3/5.
    # GAP = (2/4 + 2/4 + 3/5) / 3 = 8/15. (Column order would give (1/2 + 2/3 + 3/5) / 3, negatives-first
    # (1/3 + 2/4 + 3/5) / 3.)
    s = np.array([[0.9, 0.5, 0.5, 0.5, 0.1]])
    y = multi_hot([{1, 2, 4}], 5)
    assert gap(s, y, top_k=5) == pytest.approx(8 / 15)
    flipped = [0, 3, 2, 1, 4]  # the negative first within the block
    assert gap(s[:, flipped], y[:, flipped], top_k=5) == pytest.approx(8 / 15)
    assert average_precision_score(y.ravel(), s.ravel()) == pytest.approx(8 / 15)  # scikit-learn's rule


def test_gap_tie_across_videos_does_not_depend_on_order():
    # two videos tie at 0.7; one of the two is positive: precision at the block end (rank 2) is 1/2
    s = np.array([[0.7, 0.0], [0.7, 0.0]])
    y = multi_hot([{0}, set()], 2)
    assert gap(s, y, top_k=1) == pytest.approx(0.5)
    assert gap(s[::-1], y[::-1], top_k=1) == pytest.approx(0.5)


def test_average_precision_denominator():
    # ranked: +, -, +; with 4 positives in all: (1/1 + 2/3) / 4
    assert average_precision([0.9, 0.8, 0.7], [1, 0, 1], num_positives=4) == pytest.approx((1 + 2 / 3) / 4)
    assert average_precision([0.9, 0.8], [0, 0]) == 0.0


def test_zero_positives_everywhere():
    s = np.random.default_rng(0).random((5, 6))
    r = VideoMetrics(6).update(s, np.zeros((5, 6))).compute()
    assert (r["hit_at_1"], r["perr"], r["gap"], r["map"], r["map_all_classes"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert r["num_classes_with_positives"] == 0 and r["num_videos_without_labels"] == 5


def test_compute_is_json_ready_and_full_ranking_optional():
    s, y = random_case(1, n=40, k=8)
    r = VideoMetrics(8).update(s, y).compute()
    assert r["map_full_ranking"] is None and r["mode"] == "exact" and r["gap_error_bound"] == 0.0
    json.dumps(r)
    with pytest.raises(MetricsError):
        VideoMetrics(8).per_class_ap_full_ranking()


# ---------------------------------------------------------------------------------------------------------------
# scikit-learn, where the definitions coincide


@pytest.mark.parametrize("seed,decimals,logits", [(0, None, False), (1, 1, False), (2, 2, True), (3, None, True)])
def test_gap_with_all_classes_equals_sklearn_ap_of_flattened(seed, decimals, logits):
    s, y = random_case(seed, decimals=decimals, logits=logits)
    assert gap(s, y, top_k=s.shape[1]) == pytest.approx(average_precision_score(y.ravel(), s.ravel()), abs=1e-12)


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (4, 2)])
def test_full_ranking_map_equals_sklearn(seed, decimals):
    s, y = random_case(seed, decimals=decimals, positive_rate=0.03)
    y[:, :3] = False  # classes without positives: left out of the mean
    expected = sklearn_map(s, y)
    assert map_full_ranking(s, y) == pytest.approx(expected, abs=1e-12)
    # with every class in the "top k" the YouTube-8M mAP is the same quantity
    assert youtube8m_map(s, y, top_k=s.shape[1]) == pytest.approx(expected, abs=1e-12)
    r = VideoMetrics(s.shape[1], full_ranking=True).update(s, y).compute()
    assert r["map_full_ranking"] == pytest.approx(expected, abs=1e-12)
    assert r["map"] < r["map_full_ranking"]  # top-20 of 30 classes misses some positives


def test_hit_at_1_equals_numpy_argmax():
    s, y = random_case(5, decimals=1)
    assert hit_at_1(s, y) == pytest.approx(y[np.arange(len(s)), s.argmax(axis=1)].mean())


# ---------------------------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("full_ranking", [False, True])
def test_batches_equal_one_shot(full_ranking):
    s, y = random_case(6, n=500, decimals=2)
    one = VideoMetrics(30, full_ranking=full_ranking).update(s, y).compute()
    m = VideoMetrics(30, full_ranking=full_ranking)
    cuts = [0, 1, 7, 64, 65, 300, 500]
    for a, b in zip(cuts[:-1], cuts[1:]):
        m.update(s[a:b], y[a:b])
    many = m.compute()
    assert many["gap"] == one["gap"] and many["map"] == one["map"]  # order-independent: bit-identical
    for key in ("hit_at_1", "perr", "map_full_ranking"):
        assert many[key] == pytest.approx(one[key], abs=1e-12) if one[key] is not None else many[key] is None


def test_label_id_lists_and_tensors_equal_multi_hot():
    torch = pytest.importorskip("torch")
    s, y = random_case(7, n=60, k=12)
    ids = [np.nonzero(row)[0].tolist() for row in y]
    a = VideoMetrics(12).update(s, y).compute()
    b = VideoMetrics(12).update(torch.from_numpy(s), ids).compute()
    c = VideoMetrics(12).update(torch.from_numpy(s).to(torch.bfloat16).float(), torch.from_numpy(y)).compute()
    assert a == b
    assert c["num_positives"] == a["num_positives"]


@pytest.mark.parametrize("bad_scores,bad_labels", [
    (np.zeros((2, 5)), np.zeros((2, 4))),              # label shape
    (np.zeros((2, 4, 1)), np.zeros((2, 4))),           # score rank
    (np.full((2, 4), np.nan), np.zeros((2, 4))),       # NaN
    (np.zeros((2, 4)), np.full((2, 4), 0.5)),          # not multi-hot
    (np.zeros((2, 4)), [[0], [4]]),                    # label id out of range
    (np.zeros((2, 4)), [[0]]),                         # one list for two rows
])
def test_bad_inputs_raise(bad_scores, bad_labels):
    with pytest.raises(MetricsError):
        VideoMetrics(4).update(bad_scores, bad_labels)


def test_compute_without_videos_raises():
    with pytest.raises(MetricsError):
        VideoMetrics(3).compute()


# ---------------------------------------------------------------------------------------------------------------
# histogram (bounded memory) mode


def run_exact_and_bounded(seed, decimals, logits, **kwargs):
    s, y = random_case(seed, n=3000, k=60, positive_rate=0.05, decimals=decimals, logits=logits)
    exact = VideoMetrics(60, exact_limit=None)
    bounded = VideoMetrics(60, exact_limit=4000, **kwargs)  # switches after 200 videos
    for a in range(0, 3000, 250):
        exact.update(s[a : a + 250], y[a : a + 250])
        bounded.update(s[a : a + 250], y[a : a + 250])
    return exact, bounded


DATA_VARIANTS = [(10, None, False), (11, None, True), (12, 3, False)]  # probabilities, logits, ties


@pytest.mark.parametrize("seed,decimals,logits", DATA_VARIANTS)
@pytest.mark.parametrize("sizes", [dict(gap_bins=4096, gap_head=300, class_bins=64, class_head=20, merge_every=2000),
                                   dict(gap_bins=512, gap_head=50, class_bins=16, class_head=5, merge_every=500)])
def test_histogram_error_within_reported_bound(seed, decimals, logits, sizes):
    # deliberately coarse: the bins hold most positives, the errors are large, the bound must still hold
    exact, bounded = run_exact_and_bounded(seed, decimals, logits, **sizes)
    e, h = exact.compute(), bounded.compute()
    assert h["mode"] == "histogram" and e["mode"] == "exact"
    for key in ("gap", "map"):
        assert 0 < h[f"{key}_error_bound"]
        assert abs(e[key] - h[key]) <= h[f"{key}_error_bound"] + 1e-12, key
    for key in ("hit_at_1", "perr", "num_positives", "num_positives_in_top_k"):
        assert h[key] == pytest.approx(e[key], abs=1e-12)
    assert np.array_equal(np.isnan(exact.per_class_ap()), np.isnan(bounded.per_class_ap()))


@pytest.mark.parametrize("seed,decimals,logits", DATA_VARIANTS)
def test_histogram_mode_within_1e3_of_exact(seed, decimals, logits):
    # a third to a half of the top-20 positives end up in bins here (heads much smaller than the lists)
    exact, bounded = run_exact_and_bounded(seed, decimals, logits, gap_bins=65_536, gap_head=5000, class_bins=256,
                                           class_head=300, merge_every=5000)
    e, h = exact.compute(), bounded.compute()
    for key in ("gap", "map"):
        assert abs(e[key] - h[key]) < 1e-3, key


def test_histogram_gap_exact_when_few_distinct_scores():
    # scores on a 0.05 grid: fewer distinct values than bins, each gets its own bin, tie blocks are preserved
    s, y = random_case(13, n=2000, k=20, decimals=None)
    s = np.round(s * 20) / 20
    exact = VideoMetrics(20, exact_limit=None).update(s, y).compute()
    m = VideoMetrics(20, exact_limit=0, gap_head=10, class_head=3, merge_every=100)  # histogram from batch 1
    for a in range(0, 2000, 500):
        m.update(s[a : a + 500], y[a : a + 500])
    r = m.compute()
    assert r["mode"] == "histogram"
    assert r["gap"] == pytest.approx(exact["gap"], abs=1e-12)


def test_histogram_mode_memory_stays_fixed():
    s, y = random_case(14, n=1200, k=40)
    m = VideoMetrics(40, exact_limit=1000, gap_head=100, class_head=10, class_bins=32, merge_every=500)
    for a in range(0, 1200, 100):
        m.update(s[a : a + 100], y[a : a + 100])
        if m.mode == "histogram":
            # nothing kept per pair any more: the exact buffer is empty, heads and bins have fixed shapes
            assert m._num_pairs == 0
            assert m._classes.head_score.shape == (40, 10) and m._classes.pos.shape == (40, 32)
            assert m._gap.head_count.sum() <= 100 and (m._classes.head_count <= 10).all()
            assert m._gap._num_pending <= 500 and m._classes._num_pending <= 500
    assert m.mode == "histogram"


# ---------------------------------------------------------------------------------------------------------------
# segment MAP@K


def hand_segment_case():
    ratings = SegmentRatings([
        ("a", 0, 3, 1), ("a", 5, 3, 0), (b"b", 10, 3, 1), ("c", 0, 3, 1),  # class 3: 3 positives
        ("a", 0, 7, 0), ("d", 5, 7, 1),                                    # class 7: 1 positive
        ("e", 0, 9, 1),                                                    # class 9: not submitted
    ])
    submission = {
        3: [("a", 0), ("x", 0), ("a", 5), ("b", 10), ("a", 0)],  # x:0 unrated, a:0 repeated
        7: [("d", 5), ("a", 0)],
        11: [("a", 0)],  # no rating at all for class 11
    }
    return submission, ratings


def test_segment_map_hand_example():
    submission, ratings = hand_segment_case()
    # class 3: a:0 + (rank 1, P=1), x:0 dropped, a:5 - (rank 2), b:10 + (rank 3, P=2/3), repeat dropped
    #          AP = (1 + 2/3) / 3 positives = 5/9
    # class 7: d:5 + (P=1), a:0 -  -> AP = 1/1
    # class 11: no positive rating -> AP 0/0, left out of the mean (official)
    # MAP = (5/9 + 1) / 2 = 7/9
    value, per_class = segment_map(submission, ratings)
    assert value == pytest.approx(7 / 9)
    assert per_class == pytest.approx({3: 5 / 9, 7: 1.0})
    rep = segment_map_report(submission, ratings)
    assert (rep.unrated, rep.duplicates, rep.hits, rep.predictions) == (2, 1, 3, 8)
    assert rep.classes_without_positives == [11] and rep.rated_classes_not_submitted == 1
    assert (rep.classes, rep.scored_classes, rep.positives) == (3, 2, 4)


def test_segment_map_truncates_at_k():
    submission, ratings = hand_segment_case()
    # k=2: class 3 keeps a:0 (+) and x:0 (dropped): AP = 1/3; class 7: 1; class 11 not in the mean -> 2/3
    rep = segment_map_report(submission, ratings, k=2)
    assert rep.map == pytest.approx(2 / 3)
    assert rep.truncated == 3


# Hand-computed against the official definitions (docs: /work/shared/reference/yt8m.md, "Segment MAP@K"):
# per class, cut the submitted list at K, drop the entries not rated for that class, AP_c = sum_i P(i) rel(i) /
# (positively rated segments of c); MAP = mean of AP_c over the submitted classes that have a positive rating.


def test_segment_map_counts_a_positive_rated_past_the_last_frame():
    # v has 12 frames: windows 0, 5, 10. Class 4 is rated on 4 segments; v:15 starts past the last frame, so no
    # submission built from windows can hit it, but it is a positive of class 4 all the same.
    ratings = SegmentRatings([("v", 0, 4, 1), ("v", 5, 4, 0), ("v", 10, 4, 1), ("v", 15, 4, 1)])
    submission = {4: [("v", 0), ("v", 5), ("v", 10)]}  # every window of v, best first
    # ranks: +, -, +  ->  (1/1 + 2/3) / 3 positives = 5/9 = 0.5556 (dropping v:15 would give 5/6 = 0.8333)
    rep = segment_map_report(submission, ratings)
    assert rep.map == pytest.approx(5 / 9) and round(rep.map, 4) == 0.5556
    assert rep.positives == 3 and rep.hits == 2


def test_segment_map_leaves_submitted_classes_without_positives_out_of_the_mean():
    ratings = SegmentRatings([("a", 0, 1, 1), ("a", 5, 1, 0), ("b", 0, 2, 0), ("b", 5, 2, 0)])
    submission = {
        1: [("a", 5), ("a", 0)],  # -, +  -> AP 1/2
        2: [("b", 0), ("b", 5)],  # rated, but only negative: AP 0/0, not in the mean
        3: [("a", 0)],            # never rated: AP 0/0, not in the mean
    }
    rep = segment_map_report(submission, ratings)
    assert rep.map == pytest.approx(1 / 2)  # not (1/2 + 0 + 0) / 3
    assert rep.per_class_ap == pytest.approx({1: 0.5})
    assert rep.classes_without_positives == [2, 3] and (rep.classes, rep.scored_classes) == (3, 1)
    assert segment_map_report({2: [("b", 0)], 3: [("a", 0)]}, ratings).map == 0.0  # nothing to average


def test_segment_map_cut_at_k_comes_before_dropping_unrated_entries():
    ratings = SegmentRatings([("a", 0, 5, 1), ("b", 0, 5, 1), ("c", 0, 5, 0)])
    submission = {5: [("x", 0), ("y", 0), ("a", 0), ("c", 0), ("b", 0)]}  # x, y unrated for class 5
    # k = 3: x, y, a kept, then x, y dropped -> a + at rank 1: AP = 1 / 2 positives
    assert segment_map_report(submission, ratings, k=3).map == pytest.approx(1 / 2)
    # k = 5: a + (P = 1), c - , b + (P = 2/3) -> (1 + 2/3) / 2 = 5/6
    rep = segment_map_report(submission, ratings, k=5)
    assert rep.map == pytest.approx(5 / 6) and rep.unrated == 2 and rep.truncated == 0
    # k = 2: only unrated entries survive the cut -> AP 0, class still in the mean
    rep2 = segment_map_report(submission, ratings, k=2)
    assert rep2.map == 0.0 and rep2.scored_classes == 1 and rep2.truncated == 3


def test_segment_map_drops_predictions_not_rated_for_that_class():
    # a:0 is rated for class 1 only; submitting it for class 2 neither hits nor misses there
    ratings = SegmentRatings([("a", 0, 1, 1), ("b", 0, 2, 1), ("c", 0, 2, 0)])
    submission = {2: [("a", 0), ("c", 0), ("z", 5), ("b", 0)]}
    # class 2 after dropping a:0 and z:5: c - (rank 1), b + (rank 2, P = 1/2) -> AP = (1/2) / 1
    rep = segment_map_report(submission, ratings)
    assert rep.map == pytest.approx(1 / 2) and rep.unrated == 2 and rep.hits == 1


def test_segment_map_empty_submission():
    _, ratings = hand_segment_case()
    rep = segment_map_report({}, ratings)
    assert rep.map == 0.0 and rep.classes == 0 and rep.rated_classes_not_submitted == 3


def test_segment_ratings_container():
    r = SegmentRatings([(b"vid1", 5, 3, 1.0), ("vid1", 5, 3, 1)])  # bytes id == str id: a duplicate
    assert r.duplicates == 1 and r.num_ratings == 1
    assert list(r[3]) == [("vid1", 5)] and all(type(v) is str for v, _ in r[3])
    with pytest.raises(MetricsError):
        r.add("vid1", 5, 3, 0)  # conflicting rating
    with pytest.raises(MetricsError):
        r.add("vid2", 0, 3, 0.5)  # not 0/1
    video = SimpleNamespace(id="v9", segment_start_times=np.array([0, 5]), segment_labels=np.array([3, 8]),
                            segment_scores=np.array([0.0, 1.0], dtype=np.float32))
    plain = SimpleNamespace(id="v10", segment_start_times=None, segment_labels=None, segment_scores=None)
    r2 = SegmentRatings.from_videos([video, plain])
    assert dict(r2[3]) == {("v9", 0): 0} and dict(r2[8]) == {("v9", 5): 1}
    assert r2.num_positives(8) == 1 and r2.num_positives(3) == 0 and len(r2) == 2
