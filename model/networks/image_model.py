"""Image classifier = image backbone (pixels -> feature maps) + the heads the video branch uses, one per scale.

    model = build_image_model("cma", backbone, num_classes=80, scales=3, label_embeddings=emb)
    logits = model(images)                        # images (B, 3, S, S) -> fused logits (B, K)
    feats, masks = model.forward_features(images)  # per scale: (B, H_l * W_l, C_l), all-true (B, H_l * W_l)

A feature map (B, C, H, W) enters a head as a sequence of H * W steps, (B, H * W, C), with an all-true mask: the
same ``model.networks.heads`` modules (``CMAHead``, ``SelfAttentionHead``, ``MeanPoolHead``) that read a video's
time steps read an image's locations, unchanged.

Scales (paper, section 3.2 "Multi-Scale CMA" and 4.1):

* ``scales=1`` (CMA): the backbone's stride-32 map, as it is (ResNet-101 at 448: 14 x 14 x 2048, the paper's I_2).
* ``scales=3`` (MS-CMA): the stride-16 map (I_1, 28 x 28 x 1024), the stride-32 map (I_2) and a stride-64 map (I_3,
  7 x 7) made by one extra residual block (a torchvision ``Bottleneck`` with stride 2) on I_2. Each map is reduced
  by a 1x1 conv + BN + ReLU to ``reduce_dim`` channels (512, the paper's I_3 width) and goes through its own head;
  the CMA heads share the label embeddings (one ASGE output, copied into each head's buffer).

Fusion, Eq. 11: y*_k = (1/L) sum_l sigmoid(z_lk), the mean of the per-scale probabilities. The model returns the
logit of that mean, computed without forming it: log y* = logsumexp_l log sigmoid(z_lk) - log L and
log(1 - y*) = logsumexp_l log sigmoid(-z_lk) - log L, so logit(y*) = log y* - log(1 - y*). Fed to
``binary_cross_entropy_with_logits`` (``model.networks.losses``) that is exactly the BCE of Eq. 12 on y*, and it
stays finite where a probability saturates (naively, log(mean(sigmoid)) underflows to -inf at z = -104 in float32).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

from model.networks.heads import HEADS
from model.networks.video_model import ModelConfigError

IMAGE_HEADS = ("cma", "self-attn", "mean")
SCALES = (1, 3)


def fuse_scale_logits(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 11 in logit space: (B, L, K) per-scale logits -> (B, K) logits whose sigmoid is the mean of the L
    per-scale probabilities."""
    B, L, K = logits.shape
    if L == 1:
        return logits[:, 0]
    log_p = torch.logsumexp(F.logsigmoid(logits), dim=1) - math.log(L)  # (B, K)
    log_q = torch.logsumexp(F.logsigmoid(-logits), dim=1) - math.log(L)  # (B, K), log(1 - p)
    return log_p - log_q


def flatten_map(fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, C, H, W) feature map as the (B, H * W, C) step sequence a head reads, with its all-true mask."""
    B, C, H, W = fmap.shape
    feats = fmap.flatten(2).transpose(1, 2)  # (B, H * W, C)
    return feats, torch.ones(B, H * W, dtype=torch.bool, device=fmap.device)


class ReduceConv(nn.Sequential):
    """1x1 conv + BN + ReLU: a scale's map brought to the common width of the MS-CMA heads."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


def extra_residual_block(in_channels: int, out_channels: int) -> Bottleneck:
    """The residual block that makes I_3 from I_2: a ResNet bottleneck with stride 2 (14 x 14 -> 7 x 7 at 448)."""
    width = out_channels // Bottleneck.expansion
    down = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False), nn.BatchNorm2d(out_channels))
    return Bottleneck(in_channels, width, stride=2, downsample=down)


class ImageClassifier(nn.Module):
    """Image backbone, optional multi-scale necks, one head per scale, Eq. 11 fusion.

    Args:
        backbone: module whose ``forward(images)`` returns the stride-16 and stride-32 maps and whose ``channels``
            gives their widths (``model.networks.image_backbones``).
        head: 'cma' (the paper's), 'self-attn' (the paper's single-map baseline) or 'mean' (global pooling).
        num_classes: K.
        scales: 1 (CMA on the stride-32 map) or 3 (MS-CMA).
        label_embeddings: (K, C_e) ASGE embeddings for 'cma' (None: random, the embedding ablation).
        reduce_dim: channels of every scale's map after its 1x1 reduction (``scales=3`` only).
        dropout: drop probability on the features entering the heads (training only).
        **head_kw: further ``CMAHead`` arguments (``attention``, ``scale``, ``attention_floor``, ...).
    """

    def __init__(self, backbone: nn.Module, head: str, num_classes: int, scales: int = 1,
                 label_embeddings: torch.Tensor | None = None, reduce_dim: int = 512, dropout: float = 0.0,
                 **head_kw: Any):
        super().__init__()
        if head not in IMAGE_HEADS:
            raise ModelConfigError(f"unknown image head {head!r}; choose one of {', '.join(IMAGE_HEADS)}")
        if scales not in SCALES:
            raise ModelConfigError(f"scales must be one of {SCALES}, got {scales}")
        c16, c32 = backbone.channels
        self.backbone = backbone
        self.scales = scales
        self.num_classes = num_classes
        if scales == 1:
            self.extra_block = None
            self.reduce = nn.ModuleList()
            widths = [c32]
        else:
            self.extra_block = extra_residual_block(c32, reduce_dim)
            self.reduce = nn.ModuleList([ReduceConv(c16, reduce_dim), ReduceConv(c32, reduce_dim),
                                         ReduceConv(reduce_dim, reduce_dim)])
            widths = [reduce_dim] * 3
        if head == "cma":
            if label_embeddings is None:
                label_embeddings = torch.randn(num_classes, head_kw.pop("embed_dim", 256))
            head_kw = {"label_embeddings": label_embeddings, **head_kw}
        try:
            self.heads = nn.ModuleList(HEADS[head](c, num_classes, **head_kw) for c in widths)
        except TypeError as e:
            raise ModelConfigError(f"image head {head}: {e}") from None
        self.drop = nn.Dropout(dropout)

    def backbone_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's stride-16 and stride-32 maps, (B, C16, H/16, W/16) and (B, C32, H/32, W/32)."""
        B, C, H, W = images.shape
        return list(self.backbone(images))

    def scale_maps(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The maps the heads read, from the backbone's two: [I_2] or [I_1, I_2, I_3], each (B, C_l, H_l, W_l).
        Cached backbone maps (a frozen backbone) enter here."""
        s16, s32 = maps
        if self.scales == 1:
            return [s32]
        s64 = self.extra_block(s32)  # (B, reduce_dim, H/64, W/64)
        return [self.reduce[0](s16), self.reduce[1](s32), self.reduce[2](s64)]

    def forward_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per scale, the (B, H_l * W_l, C_l) step sequence and its all-true mask."""
        pairs = [flatten_map(m) for m in self.scale_maps(self.backbone_maps(images))]
        return [f for f, _ in pairs], [m for _, m in pairs]

    def forward_head(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """Fused (B, K) logits (Eq. 11) from the per-scale step sequences."""
        logits = torch.stack([h(self.drop(f), m) for h, f, m in zip(self.heads, feats, masks)], dim=1)  # (B, L, K)
        return fuse_scale_logits(logits)

    def forward_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Fused logits from backbone maps computed earlier (the frozen-backbone feature cache)."""
        pairs = [flatten_map(m) for m in self.scale_maps(maps)]
        return self.forward_head([f for f, _ in pairs], [m for _, m in pairs])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        return self.forward_maps(self.backbone_maps(images))  # (B, K)

    @torch.no_grad()
    def attention(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per scale, each class's attention over the image, (B, K, H_l, W_l) (the paper's Fig. 4)."""
        return self.attention_from_maps(self.backbone_maps(images))

    @torch.no_grad()
    def attention_from_maps(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """``attention`` from backbone maps computed earlier (the frozen-backbone feature cache)."""
        out = []
        for head, fmap in zip(self.heads, self.scale_maps(maps)):
            B, C, H, W = fmap.shape
            feats, mask = flatten_map(fmap)
            out.append(head.attention(feats, mask).reshape(B, -1, H, W))  # (B, K, H, W)
        return out

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Train the heads only: no gradient into the backbone, and its BN statistics kept (eval mode)."""
        self.backbone_frozen = frozen
        if hasattr(self.backbone, "set_frozen"):
            self.backbone.set_frozen(frozen)
            return
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()

    def train(self, mode: bool = True) -> "ImageClassifier":
        super().train(mode)
        if getattr(self, "backbone_frozen", False):
            self.backbone.eval()
        return self


def build_image_model(args: Mapping[str, Any] | Any, backbone: nn.Module,
                      label_embeddings: torch.Tensor | None = None) -> ImageClassifier:
    """``ImageClassifier`` from a namespace or dict with ``head``, ``num_classes``, ``scales`` and optionally
    ``reduce_dim``, ``dropout``, ``cma_attention``, ``cma_scale`` (the keys ``model.train_image`` stores)."""
    a = args if isinstance(args, Mapping) else vars(args)
    head_kw: dict[str, Any] = {}
    if a["head"] == "cma":
        head_kw = {"attention": a.get("cma_attention") or "relu", "scale": float(a.get("cma_scale") or 10.0)}
    model = ImageClassifier(backbone, a["head"], int(a["num_classes"]), scales=int(a.get("scales") or 1),
                            label_embeddings=label_embeddings, reduce_dim=int(a.get("reduce_dim") or 512),
                            dropout=float(a.get("dropout") or 0.0), **head_kw)
    model.set_backbone_frozen(bool(a.get("freeze_backbone")))
    return model
