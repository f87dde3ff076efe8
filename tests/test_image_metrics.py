"""model.metrics.image against hand-computed values, scikit-learn, an ML-GCN-style loop, and itself (merging)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from model.metrics.image import ImageMetrics, ImageMetricsError, average_precision, format_table1

# ---------------------------------------------------------------------------------------------------------------
# the hand example: 5 images x 5 classes
#
# class 2 has positives but no probability >= 0.5 (no prediction: precision 0 in CP);
# class 3 has no positive (AP undefined: left out of mAP, CP, CR) but two predictions (false positives in OP);
# img4 / class 3 is exactly 0.5 (predicted: >=); ties inside class 0 (0.6, 0.6) and class 2 (0.4, 0.4), and at the
# third place of img1 (0.6 x3) and img3 (0.1 x3).

Y = np.array([
    # c0 c1 c2 c3 c4
    [1, 0, 1, 0, 1],  # img0
    [1, 1, 0, 0, 0],  # img1
    [0, 1, 0, 0, 1],  # img2
    [1, 0, 0, 0, 0],  # img3
    [0, 0, 1, 0, 0],  # img4
])
P = np.array([
    # c0   c1    c2   c3   c4
    [0.9, 0.2, 0.4, 0.1, 0.7],  # img0
    [0.6, 0.7, 0.3, 0.6, 0.6],  # img1
    [0.6, 0.8, 0.4, 0.2, 0.3],  # img2
    [0.3, 0.1, 0.2, 0.1, 0.1],  # img3
    [0.2, 0.75, 0.1, 0.5, 0.4],  # img4
])

# AP per class (tie block: each positive gets the precision at the end of its block)
#   c0: 0.9(+) | 0.6(+), 0.6(-) | 0.3(+) | 0.2(-)  -> (1 + 2/3 + 3/4) / 3 = 29/36
#       (positive first inside the tie would give (1 + 1 + 3/4) / 3 = 11/12)
#   c1: 0.8(+) | 0.75(-) | 0.7(+) | ...            -> (1 + 2/3) / 2 = 5/6
#   c2: 0.4(+), 0.4(-) | 0.3(-) | 0.2(-) | 0.1(+)  -> (1/2 + 2/5) / 2 = 9/20
#   c3: no positive                                -> None, not in the mean
#   c4: 0.7(+) | 0.6(-) | 0.4(-) | 0.3(+) | 0.1(-) -> (1 + 2/4) / 2 = 3/4
#   mAP = (29/36 + 5/6 + 9/20 + 3/4) / 4 = 511/720
AP = [29 / 36, 5 / 6, 9 / 20, None, 3 / 4]
MAP = 511 / 720

# threshold block (p >= 0.5): img0 {c0, c4}, img1 {c0, c1, c3, c4}, img2 {c0, c1}, img3 {}, img4 {c1, c3}
#   c0: TP 2 / pred 3 / pos 3 -> P 2/3, R 2/3
#   c1: TP 2 / pred 3 / pos 2 -> P 2/3, R 1
#   c2: TP 0 / pred 0 / pos 2 -> P 0 (no prediction), R 0
#   c3: TP 0 / pred 2 / pos 0 -> left out of CP, CR
#   c4: TP 1 / pred 2 / pos 2 -> P 1/2, R 1/2
#   CP = (2/3 + 2/3 + 0 + 1/2) / 4 = 11/24, CR = (2/3 + 1 + 0 + 1/2) / 4 = 13/24, CF1 = 2 CP CR / (CP + CR) = 143/288
#   OP = 5 / 10 (c3's two false positives count) = 1/2, OR = 5/9, OF1 = 2 (1/2)(5/9) / (1/2 + 5/9) = 10/19
ALL = {"cp": 11 / 24, "cr": 13 / 24, "cf1": 143 / 288, "op": 1 / 2, "or": 5 / 9, "of1": 10 / 19}

# top-3 block with the threshold: each image's 3 best classes (ties: lower index first), then p >= 0.5
#   img0 top3 {c0, c4, c2} -> {c0, c4};   img1 top3 {c1, c0, c3} (c0, c3, c4 tie at 0.6: c4 is cut) -> {c1, c0, c3}
#   img2 top3 {c1, c0, c2} -> {c1, c0};   img3 top3 {c0, c2, c1} -> {};   img4 top3 {c1, c3, c4} -> {c1, c3}
#   c0: TP 2 / pred 3 -> P 2/3, R 2/3;  c1: TP 2 / pred 3 -> P 2/3, R 1;  c2: P 0, R 0;  c4: TP 1 / pred 1 -> P 1, R 1/2
#   CP = (2/3 + 2/3 + 0 + 1) / 4 = 7/12, CR = 13/24, CF1 = 2 (7/12)(13/24) / (7/12 + 13/24) = 91/162
#   OP = 5/9 (9 predictions), OR = 5/9, OF1 = 5/9
TOP3 = {"cp": 7 / 12, "cr": 13 / 24, "cf1": 91 / 162, "op": 5 / 9, "or": 5 / 9, "of1": 5 / 9}

# top-3 without a threshold (threshold=0): every image's 3 best classes are predicted
#   img0 {c0, c4, c2}, img1 {c1, c0, c3}, img2 {c1, c0, c2}, img3 {c0, c2, c1} (c1, c3, c4 tie at 0.1: c1 kept),
#   img4 {c1, c3, c4}
#   c0: TP 3 / pred 4 -> P 3/4, R 1;  c1: TP 2 / pred 4 -> P 1/2, R 1;  c2: TP 1 / pred 3 -> P 1/3, R 1/2
#   c4: TP 1 / pred 2 -> P 1/2, R 1/2
#   CP = (3/4 + 1/2 + 1/3 + 1/2) / 4 = 25/48, CR = (1 + 1 + 1/2 + 1/2) / 4 = 3/4, CF1 = 75/122
#   OP = 7/15, OR = 7/9, OF1 = 7/12
TOP3_NO_THRESHOLD = {"cp": 25 / 48, "cr": 3 / 4, "cf1": 75 / 122, "op": 7 / 15, "or": 7 / 9, "of1": 7 / 12}


def hand_result(threshold: float = 0.5) -> dict:
    return ImageMetrics(5, threshold=threshold).update(P, Y).compute()


def test_hand_example_map_and_per_class_ap():
    r = hand_result()
    assert r["ap"][3] is None
    assert r["ap"][:3] + r["ap"][4:] == pytest.approx(AP[:3] + AP[4:], abs=1e-12)
    assert r["map"] == pytest.approx(MAP, abs=1e-12)
    assert r["classes_without_positives"] == [3]
    assert r["num_classes_with_positives"] == 4
    assert r["num_images"] == 5


def test_hand_example_threshold_block():
    r = hand_result()
    assert {k: r[k] for k in ALL} == pytest.approx(ALL, abs=1e-12)
    assert r["classes_without_predictions"] == [2]
    # the conventions this pins, against the alternatives named in coco.md:
    mean_per_class_f1 = (2 / 3 + 4 / 5 + 0 + 1 / 2) / 4  # ASL's scripts: mean of per-class F1 = 59/120
    assert abs(r["cf1"] - mean_per_class_f1) > 1e-3
    salgl_cp = (2 / 3 + 2 / 3 + 1 + 1 / 2) / 4  # a class without prediction counting precision 1
    assert abs(r["cp"] - salgl_cp) > 0.1
    assert abs(r["op"] - 5 / 8) > 0.1  # OP without class 3's false positives (or without the p == 0.5 one)


def test_hand_example_top3_block_with_threshold():
    r = hand_result()
    assert {k: r[f"top3_{k}"] for k in TOP3} == pytest.approx(TOP3, abs=1e-12)
    assert r["top3_classes_without_predictions"] == [2]
    # keeping the higher index at img1's tie (c3, c4 instead of c0) would give c0 P 1/2: CP = (1/2 + 2/3 + 0 + 1/2) / 4
    assert abs(r["top3_cp"] - (1 / 2 + 2 / 3 + 0 + 1 / 2) / 4) > 0.1


def test_hand_example_top3_without_threshold_differs():
    with_threshold = hand_result()
    without = hand_result(threshold=0.0)
    assert {k: without[f"top3_{k}"] for k in TOP3_NO_THRESHOLD} == pytest.approx(TOP3_NO_THRESHOLD, abs=1e-12)
    for k in ("cp", "cr", "cf1", "op", "or", "of1"):
        assert abs(with_threshold[f"top3_{k}"] - without[f"top3_{k}"]) > 0.02
    assert without["map"] == pytest.approx(MAP, abs=1e-12)  # the threshold never touches mAP
    assert without["top3_classes_without_predictions"] == []


def test_top_k_names_the_keys():
    r = ImageMetrics(5, top_k=2).update(P, Y).compute()
    # top-2 at 0.5: img0 {c0, c4}, img1 {c1, c0} (c0 wins the tie at 0.6), img2 {c1, c0}, img3 {}, img4 {c1, c3}
    # TP: c0 2 (img0, img1), c1 2, c4 1; predictions 8 -> OP 5/8
    assert r["top2_op"] == pytest.approx(5 / 8, abs=1e-12)
    assert r["top_k"] == 2
    assert "top3_cp" not in r and len([k for k in r if k.startswith("top2_")]) == 7


def test_hand_example_batches_rows_and_float32_do_not_matter():
    one = hand_result()
    m = ImageMetrics(5)
    order = [4, 1, 3, 0, 2]
    m.update(P[order[:2]].astype(np.float32), Y[order[:2]].astype(bool))
    m.update(P[order[2:]].astype(np.float32), Y[order[2:]])
    r = m.compute()
    for key in ("map", "cp", "cr", "cf1", "op", "or", "of1", "top3_cp", "top3_cr", "top3_op", "top3_of1"):
        assert r[key] == pytest.approx(one[key], abs=1e-12)


def test_torch_tensors_are_accepted():
    import torch

    r = ImageMetrics(5).update(torch.tensor(P, dtype=torch.float32), torch.tensor(Y)).compute()
    assert r["map"] == pytest.approx(MAP, abs=1e-12)
    assert r["top3_cp"] == pytest.approx(TOP3["cp"], abs=1e-12)


def test_result_is_json_ready():
    r = hand_result()
    back = json.loads(json.dumps(r, allow_nan=False))
    assert back["map"] == r["map"]
    assert back["ap"][3] is None


# ---------------------------------------------------------------------------------------------------------------
# average precision


def test_average_precision_tie_block_hand_values():
    s, y = P[:, 0], Y[:, 0]
    assert average_precision(s, y) == pytest.approx(29 / 36, abs=1e-12)
    assert average_precision(s[::-1], y[::-1]) == pytest.approx(29 / 36, abs=1e-12)  # input order: no effect
    assert abs(average_precision(s, y) - 11 / 12) > 0.1  # not "positive first inside the tie"
    # two positives tied at the top of four: both get 2/2 -> 1; one positive tied with three negatives: 1/4
    assert average_precision([0.5, 0.5, 0.1, 0.1], [1, 1, 0, 0]) == 1.0
    assert average_precision([0.5, 0.5, 0.5, 0.5], [0, 0, 1, 0]) == pytest.approx(1 / 4, abs=1e-15)


def test_average_precision_without_positives_is_nan():
    assert np.isnan(average_precision([0.3, 0.9], [0, 0]))
    assert np.isnan(average_precision(np.zeros(0), np.zeros(0)))


def random_case(seed: int, n: int = 300, k: int = 12, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = rng.random((n, k)) < 0.15
    y[:, -1] = False  # one class without positives
    logits = rng.normal(0, 1, (n, k)) + 1.5 * y
    p = 1 / (1 + np.exp(-logits))
    if decimals is not None:
        p = np.round(p, decimals)  # many exact ties
    return p, y


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, None), (2, 1), (3, 2)])
def test_map_equals_sklearn(seed, decimals):
    p, y = random_case(seed, decimals=decimals)
    if decimals is not None:
        assert np.unique(p).size < p.size / 10  # the case really has ties
    r = ImageMetrics(p.shape[1]).update(p, y).compute()
    expected = [average_precision_score(y[:, c], p[:, c]) for c in range(p.shape[1] - 1)]
    assert r["ap"][:-1] == pytest.approx(expected, abs=1e-12)
    assert r["ap"][-1] is None
    assert r["map"] == pytest.approx(np.mean(expected), abs=1e-12)
    for c in range(3):
        assert average_precision(p[:, c], y[:, c]) == pytest.approx(expected[c], abs=1e-12)


def mlgcn_average_precision(scores, labels) -> float:
    """ML-GCN's loop: sort descending, precision at each hit, averaged over the positives."""
    hits, total = 0, 0.0
    for rank, i in enumerate(np.argsort(-scores, kind="stable"), start=1):
        if labels[i]:
            hits += 1
            total += hits / rank
    return total / hits


@pytest.mark.parametrize("seed", [4, 5])
def test_average_precision_without_ties_equals_mlgcn_loop(seed):
    p, y = random_case(seed)
    assert np.unique(p).size == p.size  # no ties
    for c in range(p.shape[1] - 1):
        assert average_precision(p[:, c], y[:, c]) == pytest.approx(mlgcn_average_precision(p[:, c], y[:, c]),
                                                                    abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# merging, ids


@pytest.mark.parametrize("decimals", [None, 1])
def test_merge_equals_single_accumulation(decimals):
    p, y = random_case(6, n=240, decimals=decimals)
    single = ImageMetrics(p.shape[1]).update(p, y).compute()
    parts = [ImageMetrics(p.shape[1]) for _ in range(3)]
    rng = np.random.default_rng(7)
    for rank, rows in enumerate(np.array_split(rng.permutation(len(p)), 3)):  # shuffled, uneven batches
        for batch in np.array_split(rows, rank + 2):
            parts[rank].update(p[batch], y[batch])
    merged = parts[2]
    merged.merge(pickle.loads(pickle.dumps(parts[0]))).merge(parts[1])  # as after all_gather_object
    assert merged.compute() == single  # bit for bit, every key
    assert parts[1].num_images == 80  # the merged-in accumulator is unchanged


def test_merge_rejects_other_settings():
    a = ImageMetrics(5).update(P, Y)
    for other in (ImageMetrics(6), ImageMetrics(5, threshold=0.4), ImageMetrics(5, top_k=2)):
        with pytest.raises(ImageMetricsError):
            a.merge(other)
    with pytest.raises(ImageMetricsError):
        a.merge(a)
    assert a.num_images == 5


def test_ids_repeated_raise_or_are_dropped():
    ids = ["a", "b", "c", "d", "e"]
    m = ImageMetrics(5).update(P[:3], Y[:3], ids=ids[:3])
    with pytest.raises(ImageMetricsError):
        m.update(P[2:], Y[2:], ids=ids[2:])  # "c" again
    assert m.num_images == 3  # nothing of the failed batch was kept
    m.update(P[3:], Y[3:], ids=ids[3:])
    assert m.compute()["map"] == pytest.approx(MAP, abs=1e-12)

    other = ImageMetrics(5).update(P[4:], Y[4:], ids=["e"])
    with pytest.raises(ImageMetricsError):
        m.merge(other)
    assert m.num_images == 5

    # DistributedSampler-style padding: rank 1 repeats img0 and img1; with drop_duplicate_ids they count once
    r0 = ImageMetrics(5, drop_duplicate_ids=True).update(P[:3], Y[:3], ids=ids[:3])
    r1 = ImageMetrics(5, drop_duplicate_ids=True).update(P[[3, 4, 0, 1]], Y[[3, 4, 0, 1]], ids=["d", "e", "a", "b"])
    r = r0.merge(r1).compute()
    assert r["num_images"] == 5 and r["num_duplicates_dropped"] == 2
    assert r["map"] == pytest.approx(MAP, abs=1e-12)
    assert r["top3_cp"] == pytest.approx(TOP3["cp"], abs=1e-12)


def test_ids_for_some_batches_only_raise():
    m = ImageMetrics(5).update(P[:2], Y[:2], ids=[0, 1])
    with pytest.raises(ImageMetricsError):
        m.update(P[2:], Y[2:])
    with pytest.raises(ImageMetricsError):
        m.update(P[2:], Y[2:], ids=[2, 3])  # 3 rows, 2 ids
    assert m.num_images == 2


# ---------------------------------------------------------------------------------------------------------------
# edge cases and validation


def test_zero_denominators_give_zero():
    y = np.array([[1, 0], [0, 1]])
    r = ImageMetrics(2).update(np.full((2, 2), 0.1), y).compute()  # nothing predicted
    assert (r["cp"], r["cr"], r["cf1"], r["op"], r["or"], r["of1"]) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert r["classes_without_predictions"] == [0, 1]
    assert r["map"] == pytest.approx(0.5 * (1 / 2 + 1 / 2), abs=1e-12)  # all tied: each AP 1/2
    r = ImageMetrics(2).update(np.full((2, 2), 0.9), np.zeros((2, 2))).compute()  # no positive at all
    assert (r["map"], r["cp"], r["cr"], r["op"], r["or"], r["of1"]) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert r["classes_without_positives"] == [0, 1] and r["ap"] == [None, None]


@pytest.mark.parametrize("probs, labels", [
    (np.full((2, 4), 0.5), np.zeros((2, 5))),  # 4 columns for 5 classes
    (np.full(5, 0.5), np.zeros(5)),  # 1-D
    (np.full((2, 5), 0.5), np.zeros((3, 5))),  # label rows
    (np.where(np.eye(2, 5) > 0, np.nan, 0.5), np.zeros((2, 5))),  # NaN
    (np.full((2, 5), 1.2), np.zeros((2, 5))),  # above 1 (a logit?)
    (np.full((2, 5), -0.1), np.zeros((2, 5))),  # below 0
    (np.full((2, 5), np.inf), np.zeros((2, 5))),
    (np.ones((2, 5), dtype=bool), np.zeros((2, 5))),  # bool probabilities
    (np.full((2, 5), 0.5), np.full((2, 5), 2)),  # non-binary labels
    (np.full((2, 5), 0.5), np.full((2, 5), 0.5)),
])
def test_bad_inputs_raise(probs, labels):
    m = ImageMetrics(5)
    with pytest.raises(ImageMetricsError):
        m.update(probs, labels)
    assert m.num_images == 0


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 5, "threshold": 1.5},
                                    {"num_classes": 5, "threshold": float("nan")}, {"num_classes": 5, "top_k": 0}])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ImageMetricsError):
        ImageMetrics(**kwargs)


def test_average_precision_bad_inputs_raise():
    for scores, labels in (([0.1, np.nan], [0, 1]), ([0.1, 0.2], [0, 1, 1]), ([[0.1]], [[1]]), ([0.1], [3])):
        with pytest.raises(ImageMetricsError):
            average_precision(scores, labels)
    assert average_precision([2.0, -1.0], [0, 1]) == 0.5  # logits are fine: only the order matters


def test_compute_without_images_raises():
    m = ImageMetrics(5).update(np.zeros((0, 5)), np.zeros((0, 5)))
    with pytest.raises(ImageMetricsError):
        m.compute()
    assert m.num_images == 0


# ---------------------------------------------------------------------------------------------------------------
# Table 1


def test_format_table1_prints_percentages_and_excluded_classes():
    r = hand_result()
    lines = format_table1(r, class_names=["person", "bicycle", "car", "motorcycle", "airplane"]).splitlines()
    assert lines[0].split() == ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "|", "top-3:",
                                "CP", "CR", "CF1", "OP", "OR", "OF1"]
    values = [float(v) for v in lines[1].split() if v != "|"]
    expected = [MAP, *ALL.values(), *TOP3.values()]
    assert values == pytest.approx([round(100 * v, 1) for v in expected], abs=1e-9)
    assert values[:3] == [71.0, 45.8, 54.2]
    assert len(lines) == 4
    assert lines[2].endswith("class motorcycle") and lines[3].endswith("class car")  # classes 3 and 2
    assert lines[0].index("|") == lines[1].index("|")  # aligned columns
    # nothing excluded, nothing silent -> only the two table lines
    assert len(format_table1(ImageMetrics(2).update(np.eye(2) * 0.9, np.eye(2)).compute()).splitlines()) == 2
