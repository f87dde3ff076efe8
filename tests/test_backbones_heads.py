"""Backbones, heads and the assembled video classifier: shapes, masking, the fused aggregation, CMA's dead case."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.networks.video_backbones import FCBackbone, MaskedBatchNorm1d, SNet, masked_max_pool1d
from model.networks.heads import (HEADS as HEAD_CLASSES, CMAHead, MeanPoolHead, PerClassSelfAttentionHead, SelfAttentionHead,
                         aggregate_logits, normalize_attention)
from model.networks.video_model import ModelConfigError, VideoClassifier, build_video_model

D, K, E = 12, 7, 6
HEADS = list(HEAD_CLASSES)  # every head a model can be built with
ATTENTION_HEADS = [h for h in HEADS if h != "mean"]
BACKBONES = ["snet", "fc"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def small_model(head: str, backbone: str, seed: int = 0, **head_kw) -> VideoClassifier:
    torch.manual_seed(seed)
    bkw = {"channels": (8, 8, 8, 8)} if backbone == "snet" else {"hidden": 8}
    if head == "cma":
        head_kw.setdefault("embed_dim", E)
    return build_video_model(head, backbone, in_dim=D, num_classes=K, backbone_kw=bkw, **head_kw)


def padded_batch(lengths, T, seed=0, garbage_seed=100):
    """Videos of the given lengths (content fixed by seed) padded to T with garbage (fixed by garbage_seed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), 320, D, generator=g)[:, :T]  # the same content whatever T
    junk = torch.randn(len(lengths), T, D, generator=torch.Generator().manual_seed(garbage_seed)) * 50
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(mask[..., None], x, junk), mask


# -- backbone pieces -------------------------------------------------------------------------------------------
def test_masked_max_pool_hand_computed():
    x = torch.tensor([[[1.0, 5.0, 2.0, 7.0, 3.0]]])  # (1, 1, 5)
    mask = torch.tensor([[True, True, True, False, False]])
    out, m = masked_max_pool1d(x, mask, 2)
    # windows [1, 5] -> 5; [2, 7(padded)] -> 2; [3(padded), beyond] -> invalid, 0
    assert out.tolist() == [[[5.0, 2.0, 0.0]]]
    assert m.tolist() == [[True, True, False]]


def test_masked_max_pool_never_below_one_step():
    out, m = masked_max_pool1d(torch.tensor([[[-3.0]]]), torch.tensor([[True]]), 2)
    assert out.tolist() == [[[-3.0]]] and m.tolist() == [[True]]


def test_masked_batchnorm_uses_valid_steps_only():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    masked, plain = MaskedBatchNorm1d(4), torch.nn.BatchNorm1d(4)
    y = masked(x, mask)
    valid = x.transpose(1, 2)[mask]  # (n, C) the 9 valid steps
    ref = plain(valid)
    torch.testing.assert_close(y.transpose(1, 2)[mask], ref)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var)
    masked.eval(), plain.eval()
    torch.testing.assert_close(masked(x, mask), plain(x))


@pytest.mark.parametrize("T", [1, 5, 300])
def test_snet_output_length_and_mask(T):
    torch.manual_seed(0)
    net = SNet(in_dim=D, channels=(8, 8, 8, 8))
    lengths = [T, max(1, T // 3), 1]
    x, mask = padded_batch(lengths, T)
    feats, fmask = net(x, mask)
    t_out = math.ceil(T / 16)
    assert feats.shape == (3, t_out, 8) and fmask.shape == (3, t_out)
    assert fmask.sum(1).tolist() == [math.ceil(n / 16) for n in lengths]
    assert torch.isfinite(feats).all()
    assert (feats[~fmask] == 0).all()
    assert net.out_channels == 8


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("train", [True, False])
def test_backbone_padding_never_matters(backbone, train):
    torch.manual_seed(0)
    net = SNet(D, (8, 8, 8, 8)) if backbone == "snet" else FCBackbone(D, 8)
    net.train(train)
    lengths = [37, 5, 20]
    x1, m1 = padded_batch(lengths, 40, garbage_seed=1)
    x2, m2 = padded_batch(lengths, 64, garbage_seed=2)
    f1, fm1 = net(x1, m1)
    f2, fm2 = net(x2, m2)
    n = f1.shape[1]
    assert fm2[:, n:].sum() == 0 and (f2[:, n:] == 0).all()
    assert torch.equal(fm1, fm2[:, :n])
    torch.testing.assert_close(f1, f2[:, :n], rtol=1e-5, atol=1e-5)


# -- whole models ----------------------------------------------------------------------------------------------
VARIANTS = [(h, b, fused, {}) for h in HEADS for b in BACKBONES
            for fused in ([True, False] if h != "mean" else [None])]
VARIANTS += [("cma", b, fused, {"attention": "softmax"}) for b in BACKBONES for fused in (True, False)]


@pytest.mark.parametrize("head,backbone,fused,head_kw", VARIANTS)
def test_every_parameter_gets_a_gradient(head, backbone, fused, head_kw):
    kw = dict(head_kw) if fused is None else {"fused": fused, **head_kw}
    model = small_model(head, backbone, **kw)
    x, mask = padded_batch([30, 9, 1, 16], 30)
    logits = model(x, mask)
    assert logits.shape == (4, K) and torch.isfinite(logits).all()
    attn, amask = model.attention(x, mask)
    assert attn.shape == (4, K, amask.shape[1]) and (attn.permute(0, 2, 1)[~amask] == 0).all()
    # random weights: a plain sum of BN outputs has zero gradient wrt the layers before the BN
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    names = dict(model.named_parameters())
    if head == "cma":  # fixed label embeddings: a buffer, saved, not trained
        assert "head.label_embeddings" not in names and "head.label_embeddings" in model.state_dict()


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_model_logits_do_not_depend_on_padding(head, backbone):
    model = small_model(head, backbone)
    lengths = [33, 4, 1]
    x1, m1 = padded_batch(lengths, 40, garbage_seed=1)
    x2, m2 = padded_batch(lengths, 70, garbage_seed=2)
    torch.testing.assert_close(model(x1, m1), model(x2, m2), rtol=1e-5, atol=1e-5)  # train mode, batch BN stats
    model.eval()
    batched = model(x2, m2)
    for i, n in enumerate(lengths):  # each video alone, unpadded
        torch.testing.assert_close(batched[i:i + 1], model(x2[i:i + 1, :n], m2[i:i + 1, :n]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("head", ATTENTION_HEADS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_fused_equals_naive_forward_and_gradients(head, backbone):
    fused = small_model(head, backbone, fused=True)
    naive = small_model(head, backbone, fused=False)
    naive.load_state_dict(fused.state_dict())
    x, mask = padded_batch([25, 7, 12], 25)
    w = torch.randn(3, K, generator=torch.Generator().manual_seed(4))
    lf, ln = fused(x, mask), naive(x, mask)
    torch.testing.assert_close(lf, ln, rtol=1e-5, atol=1e-6)
    (lf * w).sum().backward()
    (ln * w).sum().backward()
    gn = dict(naive.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, gn[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_aggregate_logits_hand_computed():
    attn = torch.tensor([[[0.25, 0.75], [1.0, 0.0]]])  # (1, K=2, M=2)
    feats = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # (1, M=2, C=2)
    weight = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    bias = torch.tensor([0.5, -1.0])
    # h_0 = .25*(1,2) + .75*(3,-1) = (2.5, -0.25) -> 2.25 + .5 ; h_1 = (1, 2) -> 2 - 1
    expected = torch.tensor([[2.75, 1.0]])
    for fused in (True, False):
        torch.testing.assert_close(aggregate_logits(attn, feats, weight, bias, fused), expected)


def test_normalize_attention_zero_at_padding():
    z = torch.tensor([[[1.0, 3.0, 100.0]]])
    a = normalize_attention(z, torch.tensor([[True, True, False]]))
    assert a.tolist() == [[[0.25, 0.75, 0.0]]]


# -- heads on their own ----------------------------------------------------------------------------------------
def make_head(name: str, C: int = 5, **kw):
    torch.manual_seed(1)
    if name == "cma":
        return CMAHead(C, K, embed_dim=E, **kw)
    if name == "self-attn":
        return SelfAttentionHead(C, K, **kw)
    if name == "self-attn-per-class":
        return PerClassSelfAttentionHead(C, K, **kw)
    return MeanPoolHead(C, K)


@pytest.mark.parametrize("name", HEADS)
def test_head_padded_steps_get_zero_attention_and_do_not_change_logits(name):
    head = make_head(name)
    feats = torch.rand(2, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    other = feats.clone()
    other[~mask] = torch.randn(int((~mask).sum()), 5) * 1e3
    a = head.attention(feats, mask)
    assert a.shape == (2, K, 6)
    assert (a.permute(0, 2, 1)[~mask] == 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, K))
    torch.testing.assert_close(head(feats, mask), head(other, mask))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("fused", [True, False])
def test_head_shapes_finite_gradients_and_attention(name, fused):
    head = make_head(name, **({} if name == "mean" else {"fused": fused}))
    feats = torch.randn(3, 6, 5)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    logits = head(feats, mask)
    assert logits.shape == (3, K) and torch.isfinite(logits).all()
    a = head.attention(feats, mask)
    assert a.shape == (3, K, 6) and torch.isfinite(a).all() and (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3, K))
    assert (a.permute(0, 2, 1)[~mask] == 0).all()
    if name in ("self-attn", "mean"):  # one map for every class
        assert torch.equal(a, a[:, :1].expand_as(a))
    else:  # per-class maps differ between classes
        assert not torch.allclose(a[0, 0], a[0, 1])
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", HEADS)
def test_heads_take_image_feature_maps(name):
    head = make_head(name, C=5)
    B, H, W = 2, 3, 4
    feats = torch.rand(B, H * W, 5)  # (B, H*W, C), as an image branch would pass
    mask = torch.ones(B, H * W, dtype=torch.bool)
    assert head(feats, mask).shape == (B, K)
    assert head.attention(feats, mask).shape == (B, K, H * W)


def test_mean_head_is_masked_mean_then_linear():
    head = make_head("mean")
    feats = torch.rand(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    pooled = torch.stack([feats[0, :3].mean(0), feats[1, 0]])
    torch.testing.assert_close(head(feats, mask), pooled @ head.classifier.weight.t() + head.classifier.bias)


def test_self_attention_is_one_map_shared_by_all_classes():
    """The paper's baseline: z^i = sigmoid(f_conv(I^i)), one scalar per step, normalized over the valid steps."""
    head = make_head("self-attn")
    assert head.attn_conv.weight.shape == (1, 5)
    feats = torch.rand(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    z = torch.sigmoid(feats @ head.attn_conv.weight.t() + head.attn_conv.bias).squeeze(-1) * mask  # (B, M)
    expected = (z / z.sum(-1, keepdim=True)).unsqueeze(1).expand(2, K, 4)
    a = head.attention(feats, mask)
    torch.testing.assert_close(a, expected)
    assert torch.equal(a, a[:, :1].expand_as(a))  # bit-identical across classes
    # every class pools the same feature: logits are one classifier applied to h = sum_i a^i I^i
    h = (expected[:, 0, :, None] * feats).sum(1)  # (B, C)
    torch.testing.assert_close(head(feats, mask), head.classifier(h))


def test_per_class_self_attention_is_sigmoid_of_conv_normalized():
    head = make_head("self-attn-per-class")
    feats = torch.rand(1, 3, 5)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    z = torch.sigmoid(feats[0, :2] @ head.attn_conv.weight.t() + head.attn_conv.bias)  # (2, K)
    expected = torch.cat([(z / z.sum(0)).t(), torch.zeros(K, 1)], dim=1)
    torch.testing.assert_close(head.attention(feats, mask)[0], expected)


def test_cma_attention_formula_with_positive_cosines():
    """Floor 0 is Eq. 7-8 as printed; the floor adds f * exp(min(cos, 0)) before normalizing."""
    head = make_head("cma", attention_floor=0.0)
    head.label_embeddings.abs_()  # non-negative like ASGE's, CMT output is non-negative too: cos >= 0
    feats = torch.rand(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    cos = head.cosine(feats, mask)
    z = F.relu(cos) * mask[:, None, :]
    torch.testing.assert_close(head.attention(feats, mask), z / z.sum(-1, keepdim=True))
    head.attention_floor = 0.01
    z = (F.relu(cos) + 0.01 * torch.exp(cos.clamp_max(0))) * mask[:, None, :]
    torch.testing.assert_close(head.attention(feats, mask), z / z.sum(-1, keepdim=True))


def negative_cma_head(**kw) -> CMAHead:
    """Label embeddings with all entries < 0 against the CMT's non-negative output: every cosine is <= 0."""
    head = make_head("cma", **kw)
    head.label_embeddings.copy_(-head.label_embeddings.abs() - 0.1)
    return head


def test_cma_all_negative_cosines_attend_like_mean_pooling_and_keep_training():
    head = negative_cma_head(attention_floor=1e-3)
    feats = torch.rand(3, 6, 5)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    cos = head.cosine(feats, mask)
    assert (cos[mask[:, None, :].expand_as(cos)] < 0).all()
    a = head.attention(feats, mask)
    # softmax of the cosines over valid steps: within a factor e of uniform
    expected = torch.softmax(cos.masked_fill(~mask[:, None, :], -math.inf), dim=-1)
    torch.testing.assert_close(a, expected)
    valid = mask[:, None, :].expand_as(a)
    n = mask.sum(1)[:, None, None].float().expand_as(a)
    ratio = (a * n)[valid]
    assert (ratio > 1 / math.e).all() and (ratio < math.e).all()
    logits = head(feats, mask)
    assert torch.isfinite(logits).all()
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient with all cosines < 0"


def test_cma_all_negative_equal_cosines_give_exact_mean_pooling():
    head = negative_cma_head()
    frame = torch.rand(1, 1, 5)
    feats = frame.expand(2, 4, 5).clone()  # identical frames: identical cosines
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    head.eval()
    a = head.attention(feats, mask)
    torch.testing.assert_close(a[0], torch.full((K, 4), 0.25))
    torch.testing.assert_close(a[1], torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(K, 4))


def test_cma_without_floor_dead_classes_fall_back_to_the_bias():
    head = negative_cma_head(attention_floor=0.0)
    feats = torch.rand(2, 4, 5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert (head.attention(feats, mask) == 0).all()
    torch.testing.assert_close(head(feats, mask), head.classifier.bias.expand(2, K))


def test_cma_softmax_attention_is_softmax_of_scaled_cosines():
    head = make_head("cma", attention="softmax", scale=7.0)
    feats = torch.rand(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    cos = head.cosine(feats, mask)
    expected = torch.softmax((7.0 * cos).masked_fill(~mask[:, None, :], -math.inf), dim=-1)
    torch.testing.assert_close(head.attention(feats, mask), expected)


def test_cma_softmax_attention_stays_finite_for_any_cosines():
    head = negative_cma_head(attention="softmax", scale=50.0)  # every cosine <= 0: exp(50 (c - 1)) is tiny
    feats = torch.rand(2, 3, 5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    a = head.attention(feats, mask)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, K))


@pytest.mark.parametrize("kw,match", [({"attention": "sigmoid"}, "attention must be"),
                                      ({"attention": "softmax", "scale": 0.0}, "scale must be")])
def test_cma_rejects_bad_attention_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        CMAHead(5, K, embed_dim=E, **kw)


def test_cma_label_embeddings_can_be_finetuned():
    emb = torch.randn(K, E)
    head = CMAHead(5, K, label_embeddings=emb, finetune_embeddings=True)
    assert "label_embeddings" in dict(head.named_parameters())
    head(torch.rand(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)).sum().backward()
    assert head.label_embeddings.grad.abs().sum() > 0
    torch.testing.assert_close(CMAHead(5, K, label_embeddings=emb).label_embeddings, emb)


def test_build_video_model_rejects_unknown_names_and_arguments():
    with pytest.raises(ModelConfigError, match="unknown head"):
        build_video_model("lstm", "snet", in_dim=D, num_classes=K)
    with pytest.raises(ModelConfigError, match="unknown backbone"):
        build_video_model("cma", "resnet", in_dim=D, num_classes=K)
    with pytest.raises(ModelConfigError):
        build_video_model("mean", "fc", in_dim=D, num_classes=K, no_such_option=1)
    with pytest.raises(ValueError, match="label_embeddings"):
        build_video_model("cma", "fc", in_dim=D, num_classes=K, label_embeddings=torch.randn(K + 1, E))


def test_dropout_acts_in_training_only_and_loads_into_any_model():
    torch.manual_seed(0)
    x, mask = torch.randn(4, 40, 16), torch.ones(4, 40, dtype=torch.bool)
    from model.networks.video_model import build_model

    args = {"head": "mean", "backbone": "fc", "feature_dim": 16, "num_classes": 5, "width": 8}
    plain, dropped = build_model(args), build_model({**args, "dropout": 0.5})
    assert dropped.drop.p == 0.5 and plain.drop.p == 0.0
    dropped.train()
    assert not torch.equal(dropped(x, mask), dropped(x, mask))  # a new mask every call
    dropped.load_state_dict(plain.state_dict())  # dropout has no weights: checkpoints are interchangeable
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(x, mask), plain(x, mask))
