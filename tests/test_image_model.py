"""model.networks.image_model: the video heads on image maps, MS-CMA scales, Eq. 11 fusion, frozen backbone."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.networks.heads import CMAHead, MeanPoolHead, SelfAttentionHead
from model.networks.image_model import IMAGE_HEADS, ImageClassifier, fuse_scale_logits


class TwoStrideConvNet(nn.Module):
    """A small two-output conv net with the image-backbone interface (stride-16 and stride-32 maps)."""

    def __init__(self, c16: int = 12, c32: int = 20):
        super().__init__()
        self.to16 = nn.Sequential(nn.Conv2d(3, c16, 3, stride=16, padding=1), nn.BatchNorm2d(c16), nn.ReLU())
        self.to32 = nn.Sequential(nn.Conv2d(c16, c32, 3, stride=2, padding=1), nn.BatchNorm2d(c32), nn.ReLU())
        self.channels = (c16, c32)

    def forward(self, x):
        s16 = self.to16(x)
        return [s16, self.to32(s16)]


@pytest.mark.parametrize("head", IMAGE_HEADS)
@pytest.mark.parametrize("scales", [1, 3])
def test_shapes_finite_and_every_parameter_gets_a_gradient(head, scales):
    torch.manual_seed(0)
    K = 7
    model = ImageClassifier(TwoStrideConvNet(), head, K, scales=scales, reduce_dim=16)
    x = torch.randn(2, 3, 128, 128)
    logits = model(x)
    assert logits.shape == (2, K) and torch.isfinite(logits).all()
    F.binary_cross_entropy_with_logits(logits, torch.randint(0, 2, (2, K)).float()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == []
    feats, masks = model.forward_features(x)
    # 128 px: stride 16 -> 8 x 8, stride 32 -> 4 x 4, the extra block -> 2 x 2
    expected = [(4 * 4, 20)] if scales == 1 else [(64, 16), (16, 16), (4, 16)]
    assert [tuple(f.shape[1:]) for f in feats] == expected
    assert all(m.all() for m in masks)
    attn = model.attention(x)
    assert len(attn) == scales and all(a.shape[:2] == (2, K) for a in attn)
    for a in attn:  # each class's weights sum to 1 over the image
        torch.testing.assert_close(a.sum(dim=(2, 3)), torch.ones(2, K))


def test_heads_are_the_video_heads():
    model = ImageClassifier(TwoStrideConvNet(), "cma", 5, scales=3, reduce_dim=16)
    assert all(type(h) is CMAHead for h in model.heads)
    emb = [h.label_embeddings for h in model.heads]
    assert all(torch.equal(emb[0], e) for e in emb[1:])  # the three scales share one ASGE output
    assert type(ImageClassifier(TwoStrideConvNet(), "self-attn", 5).heads[0]) is SelfAttentionHead
    assert type(ImageClassifier(TwoStrideConvNet(), "mean", 5).heads[0]) is MeanPoolHead


def test_fusion_is_the_mean_of_probabilities_and_its_loss_is_exact():
    torch.manual_seed(1)
    z = torch.randn(4, 3, 6, dtype=torch.float64) * 4
    fused = fuse_scale_logits(z)
    torch.testing.assert_close(torch.sigmoid(fused), torch.sigmoid(z).mean(dim=1))
    y = torch.randint(0, 2, (4, 6)).double()
    p = torch.sigmoid(z).mean(dim=1)
    direct = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(fused, y), direct)


def test_fusion_stays_finite_where_the_naive_form_does_not():
    z = torch.tensor([[[-120.0, 60.0]], [[-110.0, 80.0]], [[-200.0, 95.0]]]).transpose(0, 1)  # (1, 3, 2)
    naive = torch.log(torch.sigmoid(z).mean(dim=1))
    assert torch.isinf(naive).any()  # float32 sigmoid underflows to 0 at these logits
    fused = fuse_scale_logits(z)
    y = torch.tensor([[1.0, 0.0]])
    loss = F.binary_cross_entropy_with_logits(fused, y, reduction="none")
    assert torch.isfinite(loss).all()
    # class 0: log mean sigmoid = logsumexp(z) - log 3 ~ -110 + log(1 + e^-10) - log 3
    expected = -(-110.0 + math.log1p(math.exp(-10.0) + math.exp(-90.0)) - math.log(3))
    assert loss[0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_frozen_backbone_gets_no_gradient_and_keeps_its_statistics():
    torch.manual_seed(0)
    model = ImageClassifier(TwoStrideConvNet(), "cma", 5, scales=3, reduce_dim=16)
    model.set_backbone_frozen(True)
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    F.binary_cross_entropy_with_logits(model(torch.randn(3, 3, 64, 64)), torch.ones(3, 5)).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert all(p.grad is not None for p in model.heads.parameters() if p.requires_grad)


def test_cached_maps_give_the_same_logits_as_images():
    torch.manual_seed(0)
    model = ImageClassifier(TwoStrideConvNet(), "cma", 5, scales=3, reduce_dim=16).eval()
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(model.forward_maps(model.backbone_maps(x)), model(x))


def test_box_attention_lift_against_hand_values():
    from model.metrics.box_attention import BoxAttentionLift, box_coverage

    # a 4 x 4 map of a 40 x 40 image; the box covers the top-left 2 x 2 cells exactly (a quarter of the map)
    cover = box_coverage(np.array([[0, 0, 20, 20]]), 40, 40, 4, 4)
    assert cover.sum().item() == pytest.approx(4.0) and cover[0, 0].item() == 1.0 and cover[3, 3].item() == 0.0
    # half a cell: a 5 x 10 box inside cell (0, 0)
    assert box_coverage(np.array([[0, 0, 5, 10]]), 40, 40, 4, 4)[0, 0].item() == pytest.approx(0.5)
    acc = BoxAttentionLift(2)
    attn = torch.zeros(2, 4, 4)
    attn[0, 0, 0] = 1.0  # class 0: all mass inside its box -> 1 / 0.25 = 4
    attn[1] = 1 / 16  # class 1: uniform -> 1
    acc.update(attn, np.array([[0, 0, 20, 20], [20, 20, 20, 20]]), np.array([0, 1]), 40, 40)
    r = acc.compute()
    assert r["pairs"] == 2 and r["per_class"] == {0: pytest.approx(4.0), 1: pytest.approx(1.0)}
    assert r["lift"] == pytest.approx(2.5)
