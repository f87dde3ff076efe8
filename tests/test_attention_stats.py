"""model.metrics.attention: lift on rated segments and label overlap, against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shard_factory import write_random_shards

from model.metrics.attention import AttentionStatsAccumulator, AttentionStatsError, attention_stats
from model.data.video import make_loader
from model.networks.video_model import build_model


def ratings(*videos):
    """batch fields from per-video lists of (start, class, rating) and multi-hot label rows."""
    return {
        "segment_start_times": [np.array([r[0] for r in v], np.int32) for v, _ in videos],
        "segment_labels": [np.array([r[1] for r in v], np.int32) for v, _ in videos],
        "segment_scores": [np.array([r[2] for r in v], np.float32) for v, _ in videos],
        "labels": torch.tensor([labels for _, labels in videos], dtype=torch.float32),
    }


def test_lift_frame_rate_hand_computed():
    # one video of 20 frames at stride 1: class 0 attends only to frames 5-9, class 1 uniformly
    attn = torch.zeros(1, 2, 20)
    attn[0, 0, 5:10] = 0.2
    attn[0, 1] = 1 / 20
    acc = AttentionStatsAccumulator()
    acc.update(attn, torch.tensor([20]), 20, 1, ratings(([(5, 0, 1.0), (0, 0, 0.0), (15, 1, 1.0)], [1, 1])))
    s = acc.compute()
    # class 0 on segment 5: mass 1 over a 5/20 share -> 4; on segment 0: 0; uniform class 1 -> 1
    assert s.positive_lift == pytest.approx((4.0 + 1.0) / 2)
    assert s.negative_lift == pytest.approx(0.0)
    assert (s.positives, s.negatives) == (2, 1)
    # overlap of the two labels: sum of min(0.2 on frames 5-9, 0.05) = 5 * 0.05
    assert s.overlap == pytest.approx(0.25) and s.pairs == 1


def test_lift_with_strided_steps_and_partial_last_segment():
    # 21 valid frames, stride 16 -> 2 steps (16 frames, then 5 valid frames); all attention on step 0
    attn = torch.tensor([[[1.0, 0.0]]])  # (1, 1, 2)
    acc = AttentionStatsAccumulator()
    batch = ratings(([(0, 0, 1.0), (15, 0, 1.0), (20, 0, 0.0)], [1]))
    acc.update(attn, torch.tensor([21]), 32, 16, batch)
    s = acc.compute()
    # segment 0: 5/16 of step 0 over a 5/21 share -> 21/16; segment 15 (frames 15-19): 1/16 -> (1/16)/(5/21);
    # segment 20 is a 1-frame partial segment on step 1 -> mass 0
    assert s.positive_lift == pytest.approx((21 / 16 + (1 / 16) / (5 / 21)) / 2)
    assert s.negative_lift == 0.0
    assert math.isnan(s.overlap) and s.pairs == 0


def test_ratings_outside_the_video_or_the_classes_are_counted_not_used():
    attn = torch.full((1, 2, 10), 0.1)
    acc = AttentionStatsAccumulator()
    acc.update(attn, torch.tensor([10]), 10, 1, ratings(([(10, 0, 1.0), (3, 0, 1.0), (0, 7, 1.0), (5, 1, 0.0)],
                                                         [1, 0])))
    s = acc.compute()
    assert (s.positives, s.negatives, s.skipped) == (0, 1, 3)
    assert math.isnan(s.positive_lift) and s.negative_lift == pytest.approx(1.0)


def test_overlap_classes_restrict_the_pairs():
    attn = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])  # (1, 3, 2)
    batch = ratings(([], [1, 1, 1]))
    everything = AttentionStatsAccumulator()
    everything.update(attn, torch.tensor([2]), 2, 1, batch)
    assert everything.compute().overlap == pytest.approx((0.0 + 0.5 + 0.5) / 3)
    only = AttentionStatsAccumulator(overlap_classes=[0, 1])
    only.update(attn, torch.tensor([2]), 2, 1, batch)
    assert only.compute().overlap == 0.0 and only.compute().pairs == 1


def test_mean_pooling_at_frame_rate_has_lift_one(tmp_path, torch_one_thread):
    write_random_shards(tmp_path, num_videos=6, num_shards=1, with_segments=True, frames=(10, 30), num_classes=20)
    model = build_model({"head": "mean", "backbone": "fc", "feature_dim": 8, "num_classes": 20}).eval()
    loader = make_loader(str(tmp_path), 3, workers=0, num_classes=20, shuffle=False, segment_labels=True)
    s = attention_stats(model, loader, torch.device("cpu"))
    assert s.positives + s.negatives > 0
    for lift in (s.positive_lift, s.negative_lift):
        assert math.isnan(lift) or lift == pytest.approx(1.0, abs=1e-5)
    assert s.overlap == pytest.approx(1.0, abs=1e-5)  # identical uniform attention for every label


def test_loader_without_ratings_is_a_clear_error(tmp_path, torch_one_thread):
    write_random_shards(tmp_path, num_videos=2, num_shards=1, num_classes=20)
    model = build_model({"head": "cma", "backbone": "snet", "feature_dim": 8, "num_classes": 20}).eval()
    loader = make_loader(str(tmp_path), 2, workers=0, num_classes=20, shuffle=False)
    with pytest.raises(AttentionStatsError, match="segment_labels=True"):
        attention_stats(model, loader, torch.device("cpu"))
