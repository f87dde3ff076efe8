"""Class-balanced BCE (Eq. 12): plain BCE at beta = 0, hand-computed weights, the ignore mask, stability."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.networks.losses import ClassBalancedBCE, LossConfigError, class_balanced_bce, label_frequencies


def batch(seed=0, B=4, K=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, generator=g) * 3, (torch.rand(B, K, generator=g) < 0.3).float()


def test_beta_zero_is_torch_bce_summed_over_classes_and_averaged_over_batch():
    logits, y = batch()
    expected = torch.nn.BCELoss(reduction="sum")(torch.sigmoid(logits), y) / logits.shape[0]
    torch.testing.assert_close(ClassBalancedBCE()(logits, y), expected)
    torch.testing.assert_close(class_balanced_bce(logits, y.bool()), expected)
    freq = torch.rand(6)  # ignored at beta = 0
    torch.testing.assert_close(ClassBalancedBCE(0.0, freq)(logits, y), expected)


def test_weights_hand_computed():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    freq = np.array([0.25, 0.5])
    beta = 0.4

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    def w(t, f):
        return t * math.exp(beta * (1 - f)) + (1 - t) * math.exp(beta * f)

    expected = (w(1, .25) * bce(0.0, 1) + w(0, .5) * bce(2.0, 0) + w(0, .25) * bce(-1.0, 0) + w(1, .5) * bce(.5, 1)) / 2
    assert ClassBalancedBCE(beta, freq)(logits, y).item() == pytest.approx(expected, rel=1e-6)
    # rare positives weigh more than frequent ones
    assert w(1, .25) > w(1, .5) and w(0, .25) < w(0, .5)


def test_ignore_mask_drops_entries_and_their_gradient():
    logits, y = batch(1)
    ignore = torch.zeros_like(y, dtype=torch.bool)
    ignore[0, :3] = True
    ignore[2, 5] = True
    x = logits.clone().requires_grad_(True)
    loss = ClassBalancedBCE(0.5, torch.full((6,), 0.2))(x, y, ignore)
    loss.backward()
    assert (x.grad[ignore] == 0).all() and (x.grad[~ignore] != 0).all()
    w = y * math.exp(0.5 * 0.8) + (1 - y) * math.exp(0.5 * 0.2)
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w
    assert loss.item() == pytest.approx(per[~ignore].sum().item() / 4, rel=1e-6)
    # changing ignored targets changes nothing
    y2 = y.clone()
    y2[ignore] = 1 - y2[ignore]
    assert ClassBalancedBCE(0.5, torch.full((6,), 0.2))(logits, y2, ignore).item() == pytest.approx(loss.item())


def test_saturated_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 80.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 1.0]])
    loss = ClassBalancedBCE(1.0, torch.tensor([0.1, 0.2, 0.3]))(logits, y)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(1e4 * math.exp(0.1) + 1e4 * math.exp(0.8), rel=1e-4)


def test_label_frequencies_count_videos():
    freq = label_frequencies([[0, 1], [1], [1, 1, 3], []], 5)  # repeated label counts once per video
    np.testing.assert_allclose(freq, [0.25, 0.75, 0.0, 0.25, 0.0])


@pytest.mark.parametrize("make", [
    lambda: ClassBalancedBCE(0.4),  # beta without frequencies
    lambda: ClassBalancedBCE(0.4, np.array([0.5, 1.5])),  # not a fraction
    lambda: class_balanced_bce(torch.zeros(2, 3), torch.zeros(2, 3), beta=1.0),
    lambda: class_balanced_bce(torch.zeros(2, 3), torch.zeros(2, 4)),
    lambda: class_balanced_bce(torch.zeros(2, 3), torch.zeros(2, 3), ignore=torch.zeros(3, 3, dtype=torch.bool)),
    lambda: label_frequencies([], 3),
])
def test_misuse_raises(make):
    with pytest.raises(LossConfigError):
        make()
