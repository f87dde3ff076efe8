"""Video classifier = backbone (frames -> visual features) + head (visual features -> logits), chosen by name.

    model = build_video_model("cma", "snet", in_dim=1024, num_classes=3862, label_embeddings=emb)
    logits = model(x, mask)                       # x (B, T, D), mask (B, T) -> (B, K)
    feats, fmask = model.forward_features(x, mask)  # (B, T', C), (B, T'); e.g. for attention plots
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from model.networks.video_backbones import BACKBONES
from model.networks.heads import HEADS
from pipeline.errors import Yt8mError


class ModelConfigError(Yt8mError, ValueError):
    """An unknown head or backbone name, or arguments the chosen modules do not take."""


class VideoClassifier(nn.Module):
    """Backbone followed by a head; both keep the frame mask so padding never reaches a sum.

    Args:
        backbone: module with ``forward(x, mask) -> (feats, mask)`` and ``out_channels``.
        head: module with ``forward(feats, mask) -> logits``.
        dropout: drop probability on the visual features entering the head (training only; no weights, so a
            checkpoint loads whatever it was trained with).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.drop = nn.Dropout(dropout)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(x, mask)

    def forward_head(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(feats), mask)

    def attention(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's attention over backbone steps, (B, K, T'), with the (B, T') step mask (for plots)."""
        feats, mask = self.forward_features(x, mask)
        return self.head.attention(feats, mask), mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        feats, mask = self.forward_features(x, mask)
        return self.forward_head(feats, mask)  # (B, K)


def build_video_model(head: str, backbone: str, in_dim: int, num_classes: int,
                      label_embeddings: torch.Tensor | None = None,
                      backbone_kw: Mapping[str, Any] | None = None, dropout: float = 0.0,
                      **head_kw: Any) -> VideoClassifier:
    """Build one of the paper's Table 4 models (plus the mean-pooling baseline).

    Args:
        head: 'mean', 'self-attn' (the paper's: one attention map shared by all classes), 'self-attn-per-class'
            (one map per class) or 'cma'.
        backbone: 'snet' or 'fc'.
        in_dim: frame feature dimension D.
        num_classes: K.
        label_embeddings: (K, C_e) ASGE embeddings for 'cma' (None: random, the embedding ablation); ignored by
            the other heads.
        backbone_kw: extra constructor arguments of the backbone (e.g. ``channels`` for SNet, ``hidden`` for FC).
        dropout: see ``VideoClassifier``.
        **head_kw: extra constructor arguments of the head (e.g. ``attention_floor``, ``fused``).
    """
    if head not in HEADS:
        raise ModelConfigError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if backbone not in BACKBONES:
        raise ModelConfigError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    try:
        trunk = BACKBONES[backbone](in_dim=in_dim, **dict(backbone_kw or {}))
        if head == "cma":
            head_kw = {"label_embeddings": label_embeddings, **head_kw}
        classifier = HEADS[head](trunk.out_channels, num_classes, **head_kw)
    except TypeError as e:
        raise ModelConfigError(f"{head}/{backbone}: {e}") from None
    return VideoClassifier(trunk, classifier, dropout)


def backbone_width_kw(backbone: str, width: int) -> dict[str, Any]:
    """Constructor arguments that set a backbone's channel width (every SNet stage, both FC layers)."""
    if backbone == "snet":
        return {"channels": (width,) * 4}
    return {"hidden": width}


def build_model(args: Any, label_embeddings: torch.Tensor | None = None) -> VideoClassifier:
    """``build_video_model`` from a namespace or dict with ``head``, ``backbone``, ``feature_dim``, ``num_classes``
    and optionally ``width`` and the CMA flags of ``cma_head_kw`` (the keys ``model.train_video`` stores in its
    checkpoints)."""
    a = args if isinstance(args, Mapping) else vars(args)
    kw = backbone_width_kw(a["backbone"], a["width"]) if a.get("width") else None
    head_kw = cma_head_kw(a) if a["head"] == "cma" else {}
    return build_video_model(a["head"], a["backbone"], in_dim=a["feature_dim"], num_classes=a["num_classes"],
                             label_embeddings=label_embeddings, backbone_kw=kw, dropout=float(a.get("dropout") or 0.0),
                             **head_kw)


# CMA flags of model.train_video, with the values that checkpoints written before them imply (the paper's Eq. 7
# with fixed embeddings)
CMA_FLAG_DEFAULTS = {"cma_attention": "relu", "cma_scale": 10.0, "finetune_label_emb": False}


def cma_head_kw(a: Mapping[str, Any]) -> dict[str, Any]:
    """CMAHead arguments from the flags ``cma_attention``, ``cma_scale``, ``finetune_label_emb`` (``CMA_FLAG_DEFAULTS``
    where absent)."""
    f = {**CMA_FLAG_DEFAULTS, **{k: a[k] for k in CMA_FLAG_DEFAULTS if a.get(k) is not None}}
    return {"attention": f["cma_attention"], "scale": float(f["cma_scale"]),
            "finetune_embeddings": bool(f["finetune_label_emb"])}


def resolve_legacy_head(ckpt_args: Mapping[str, Any], model_state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's args with the head renamed where the name changed meaning.

    Checkpoints written before the paper's single-map self-attention head store ``head="self-attn"`` for the
    per-class head, whose ``head.attn_conv.weight`` is (K, C) instead of (1, C); those get
    ``"self-attn-per-class"``. The weight's shape tells them apart, so no flag is needed (for K = 1 both heads are
    the same model).
    """
    a = dict(ckpt_args)
    w = model_state.get("head.attn_conv.weight")
    if a.get("head") == "self-attn" and w is not None and w.ndim == 2 and w.shape[0] != 1:
        a["head"] = "self-attn-per-class"
    return a
