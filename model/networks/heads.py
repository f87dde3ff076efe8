"""Classification heads over visual features I (B, M, C) with a mask (B, M): video (M = T') or image (M = H * W,
mask all true). Every head maps to logits (B, K); the attention heads also expose ``attention() -> (B, K, M)``.

* ``CMAHead``: cross-modality attention (paper, Eq. 6-10) guided by fixed label embeddings from ASGE.
* ``SelfAttentionHead``: the paper's self-attention baseline (Tables 3-4), ONE sigmoid attention map from a
  1x1 conv, shared by all classes.
* ``PerClassSelfAttentionHead``: K sigmoid attention maps from a 1x1 conv, one per class (not in the paper;
  a stronger baseline, and what ``self-attn`` meant in checkpoints written before the single-map head).
* ``MeanPoolHead``: masked mean over M, then a linear classifier.

Aggregation (Eq. 9-10) never builds the per-class features h (B, K, C), which is 256 x 3862 x 512 floats (2 GB)
for a YouTube-8M batch. Since logit_k = w_k^T sum_i a_k^i I^i + b_k = sum_i a_k^i (w_k^T I^i) + b_k, the fused form
scores every step for every class first, S = I W^T (B, M, K), and then contracts with the attention (B, K, M).
Both forms are kept (``fused=False``) and tested equal.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.networks.video_backbones import MaskedBatchNorm1d

CMA_ATTENTION = ("relu", "softmax")


def normalize_attention(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 8: a_k^i = z_k^i / sum over valid i of z_k^i, exactly zero at padded steps.

    Args:
        z: (B, K, M) non-negative scores.
        mask: (B, M) bool, True at valid steps.
    Returns:
        (B, K, M) weights summing to 1 over valid steps, or to 0 where every valid z is 0.
    """
    z = z.masked_fill(~mask.unsqueeze(1), 0.0)
    # The clamp only matters when every valid z is zero (possible only with attention_floor = 0): then a = 0
    # and the logit falls back to the bias instead of becoming NaN.
    return z / z.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


def aggregate_logits(attn: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     fused: bool = True) -> torch.Tensor:
    """Eq. 9-10: logit_k = w_k^T (sum_i a_k^i I^i) + b_k.

    Args:
        attn: (B, K, M) attention weights.
        feats: (B, M, C) visual features I.
        weight: (K, C) per-class classifier weights w_k.
        bias: (K,) per-class biases b_k.
        fused: compute through per-step class scores (memory B*M*K) instead of h (memory B*K*C).
    Returns:
        (B, K) logits.
    """
    if fused:
        scores = feats @ weight.t()  # (B, M, K)
        return torch.einsum("bkm,bmk->bk", attn, scores) + bias
    h = attn @ feats  # (B, K, C)
    return (h * weight).sum(dim=-1) + bias


class CrossModalityTransformer(nn.Module):
    """CMT (Eq. 6): a stack of 1x1 convs (per-step linear layers), each followed by masked BN and ReLU.

    Args:
        in_channels: C of the visual features.
        embed_dim: C_e of the label embeddings.
        num_layers: number of linear + BN + ReLU layers (>= 1); hidden widths are embed_dim.
        final_activation: ReLU after the last BN (the paper's wording). Projected features are then non-negative,
            so their cosine with non-negative ASGE embeddings is never negative.
    """

    def __init__(self, in_channels: int, embed_dim: int = 256, num_layers: int = 2, final_activation: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_channels] + [embed_dim] * num_layers
        self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=False) for i in range(num_layers))
        self.norms = nn.ModuleList(MaskedBatchNorm1d(embed_dim) for _ in range(num_layers))
        self.final_activation = final_activation

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, M, C = feats.shape
        x = feats
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            x = norm(linear(x).transpose(1, 2), mask).transpose(1, 2)  # (B, M, C_e)
            if i < len(self.linears) - 1 or self.final_activation:
                x = F.relu(x)
        return x


class CMAHead(nn.Module):
    """Cross-modality attention head (paper, Eq. 6-10).

    Attention scores, with c = cos(I_s^i, e_k) and f = ``attention_floor``:

        z_k^i = ReLU(c) + f * exp(min(c, 0))

    For f = 0 this is Eq. 7 as printed. With Eq. 7 alone, a class whose cosine is <= 0 at every step gets z = 0,
    an undefined Eq. 8, and no gradient through its attention; a literal implementation trained such classes
    into a dead end. The floor term defines that case: a class with no positive cosine attends with
    softmax(c) over the valid steps, which lies within a factor e of mean pooling (exactly mean pooling when the
    cosines are equal), keeps its classifier trained, and still passes gradient (of size f) to the CMT. A class
    with a positive cosine c at some step is barely affected, since f is small against c there. With f = 0 and
    no positive cosine, the attention is all zero and the logit is the bias.

    ``attention="softmax"`` replaces Eq. 7 by z_k^i = exp(s c), so Eq. 8 becomes softmax(s c) over the valid steps
    (not in the paper). Eq. 7's weights are proportional to cosines in [0, 1], so a step can outweigh a background
    step only by the ratio of their cosines, and across many steps the evidence stays diluted. On the Table 4 bench
    (YouTube-8M-length videos, mean of two seeds) the softmax with s = 10 raised CMA-SNet from 58.7 to 70.0 GAP,
    against 67.3 for the per-class self-attention head and 53.7 for mean pooling; see the README.

    Args:
        in_channels: C of the visual features I.
        num_classes: K.
        label_embeddings: (K, C_e) embeddings (ASGE); None draws them from N(0, 1) (the random-embedding ablation).
        embed_dim: C_e when ``label_embeddings`` is None.
        cmt_layers: depth of the CMT.
        cmt_final_activation: see ``CrossModalityTransformer``.
        attention_floor: f above (>= 0); used by ``attention="relu"`` only.
        attention: "relu" (Eq. 7 with the floor, the paper's) or "softmax" (softmax of ``scale`` x cosine).
        scale: s of the softmax attention (> 0); cosines lie in [-1, 1], so s sets how peaked it can get.
        fused: fused aggregation (see module docstring).
        finetune_embeddings: make the label embeddings a trained parameter instead of a fixed buffer. Either way
            the state-dict key is ``label_embeddings``.
    """

    def __init__(self, in_channels: int, num_classes: int, label_embeddings: torch.Tensor | None = None,
                 embed_dim: int = 256, cmt_layers: int = 2, cmt_final_activation: bool = True,
                 attention_floor: float = 1e-3, attention: str = "relu", scale: float = 10.0, fused: bool = True,
                 finetune_embeddings: bool = False):
        super().__init__()
        if label_embeddings is None:
            label_embeddings = torch.randn(num_classes, embed_dim)
        label_embeddings = torch.as_tensor(label_embeddings, dtype=torch.float32).detach().clone()
        if label_embeddings.ndim != 2 or label_embeddings.shape[0] != num_classes:
            raise ValueError(f"label_embeddings must be ({num_classes}, C_e), got {tuple(label_embeddings.shape)}")
        if attention_floor < 0:
            raise ValueError(f"attention_floor must be >= 0, got {attention_floor}")
        if attention not in CMA_ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(CMA_ATTENTION)}, got {attention!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if finetune_embeddings:
            self.label_embeddings = nn.Parameter(label_embeddings)
        else:
            self.register_buffer("label_embeddings", label_embeddings)
        self.cmt = CrossModalityTransformer(in_channels, label_embeddings.shape[1], cmt_layers, cmt_final_activation)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.attention_floor = attention_floor
        self.attention_kind = attention
        self.scale = float(scale)
        self.fused = fused

    def cosine(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """cos(I_s^i, e_k) as (B, K, M); a zero projected vector has cosine 0 with every class."""
        B, M, C = feats.shape
        proj = F.normalize(self.cmt(feats, mask), dim=-1)  # (B, M, C_e)
        emb = F.normalize(self.label_embeddings, dim=-1)  # (K, C_e)
        return torch.einsum("ke,bme->bkm", emb.to(proj.dtype), proj)  # (B, K, M)

    def attention(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 7-8 with the floor (or the scaled softmax): (B, K, M) weights, zero at padded steps, summing to 1 over
        valid steps."""
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        cos = self.cosine(feats, mask)  # (B, K, M)
        if self.attention_kind == "softmax":
            logits = self.scale * cos
            # shifted by each class's largest valid logit: no overflow, and the top step gets exactly exp(0)
            top = logits.masked_fill(~mask.unsqueeze(1), -math.inf).amax(dim=-1, keepdim=True)  # (B, K, 1)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row without valid steps
            return normalize_attention(torch.exp(logits - top), mask)
        f = self.attention_floor
        # relu(c) + f * exp(min(c, 0)) as one select: fewer (B, K, M) temporaries (1.2 GB each for an FC backbone
        # batch of 256 x 300 frames x 3862 classes)
        z = torch.where(cos > 0, cos + f, f * torch.exp(cos)) if f > 0 else F.relu(cos)
        return normalize_attention(z, mask)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, M, C = feats.shape
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        attn = self.attention(feats, mask)
        return aggregate_logits(attn, feats, self.classifier.weight, self.classifier.bias, self.fused)


class SelfAttentionHead(nn.Module):
    """The paper's self-attention baseline (Tables 3-4): Eq. 7 replaced by z^i = sigmoid(f_conv(I^i)), one scalar
    per step, so a single attention map per video is shared by all categories; then Eq. 8-10.

    With one map for every class, Eq. 9 gives the same pooled feature h = sum_i a^i I^i for all K classes, so the
    fused form pools once (B, C) and classifies it; ``fused=False`` keeps the literal per-class form (B, K, C).

    Args:
        in_channels: C of the visual features.
        num_classes: K.
        fused: pool once, then classify (see above); False builds h for every class.
    """

    def __init__(self, in_channels: int, num_classes: int, fused: bool = True):
        super().__init__()
        self.attn_conv = nn.Linear(in_channels, 1)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.num_classes = num_classes
        self.fused = fused

    def attention_map(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The shared map: (B, 1, M) weights, zero at padded steps, summing to 1 over valid steps."""
        B, M, C = feats.shape
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        z = torch.sigmoid(self.attn_conv(feats)).transpose(1, 2)  # (B, 1, M)
        return normalize_attention(z, mask)

    def attention(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The shared map expanded to every class, (B, K, M) like the other heads' (a view, no copy)."""
        B, M, C = feats.shape
        return self.attention_map(feats, mask).expand(B, self.num_classes, M)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, M, C = feats.shape
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        attn = self.attention_map(feats, mask)  # (B, 1, M)
        if self.fused:
            return self.classifier((attn @ feats).squeeze(1))  # (B, C) -> (B, K)
        attn = attn.expand(B, self.num_classes, M)  # (B, K, M)
        return aggregate_logits(attn, feats, self.classifier.weight, self.classifier.bias, fused=False)


class PerClassSelfAttentionHead(nn.Module):
    """Self-attention with one map per class: z_k^i = sigmoid(conv1x1(I)^i)_k, then Eq. 8-10. Not the paper's
    baseline (its map is shared by all classes, ``SelfAttentionHead``); kept as ``self-attn-per-class`` and for
    checkpoints written when ``self-attn`` named this head.

    Args:
        in_channels: C of the visual features.
        num_classes: K (one attention map per class).
        fused: fused aggregation (see module docstring).
    """

    def __init__(self, in_channels: int, num_classes: int, fused: bool = True):
        super().__init__()
        self.attn_conv = nn.Linear(in_channels, num_classes)
        self.classifier = nn.Linear(in_channels, num_classes)
        self.fused = fused

    def attention(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, M, C = feats.shape
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        z = torch.sigmoid(self.attn_conv(feats)).transpose(1, 2)  # (B, K, M)
        return normalize_attention(z, mask)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, M, C = feats.shape
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        attn = self.attention(feats, mask)
        return aggregate_logits(attn, feats, self.classifier.weight, self.classifier.bias, self.fused)


class MeanPoolHead(nn.Module):
    """Masked mean over valid steps, then a linear classifier.

    Args:
        in_channels: C of the visual features.
        num_classes: K.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(in_channels, num_classes)
        self.num_classes = num_classes

    def attention(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Uniform weights over valid steps, the same for every class: (B, K, M)."""
        B, M, C = feats.shape
        a = mask.to(feats.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(feats.dtype)  # (B, M)
        return a.unsqueeze(1).expand(B, self.num_classes, M)  # (B, K, M)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, M, C = feats.shape
        feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = feats.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(feats.dtype)  # (B, C)
        return self.classifier(pooled)


def init_bias_to_prior(classifier: nn.Linear, freqs, floor: float = 1e-4) -> None:
    """Start each class's bias at the log-odds of its training frequency.

    With thousands of classes at ~0.1% positives, a zero bias puts every sigmoid at 0.5 and the first thousands of
    steps go into learning the label prior instead of the content.
    """
    p = torch.as_tensor(freqs, dtype=torch.float32).clamp(floor, 1 - floor)
    with torch.no_grad():
        classifier.bias.copy_(torch.log(p / (1 - p)))


HEADS = {"mean": MeanPoolHead, "self-attn": SelfAttentionHead, "self-attn-per-class": PerClassSelfAttentionHead,
         "cma": CMAHead}

__all__ = ["CMAHead", "SelfAttentionHead", "PerClassSelfAttentionHead", "MeanPoolHead", "CrossModalityTransformer",
           "HEADS", "normalize_attention", "aggregate_logits", "init_bias_to_prior"]
