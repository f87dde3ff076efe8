"""Video backbones: frame features (B, T, D) with a frame mask -> visual features I (B, T', C) with a mask.

Padding contract shared by every module here: a padded time step is zero on output, is excluded from every
statistic (batch norm included), and never contributes to a valid output. So a video gives the same features
whether it is padded to 300 frames or not padded at all, and whatever the padded values were.

* ``SNet`` (paper, section 3.2): 4 successive 1D conv + pooling stages that squeeze the time axis by 2 each.
* ``FCBackbone`` (paper, Table 4): two fully connected layers applied to every frame; T' = T.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of the default process group, differentiable: the gradient of every rank's input is the
    sum of the gradients all ranks receive for the output (each rank's loss depends on every rank's frames)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_autograd(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the default process group, with gradients flowing back to every rank."""
    return _AllReduceSum.apply(t)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C, T) whose batch statistics come from valid time steps only.

    Same parameters and buffers (so the same state-dict keys) as ``nn.BatchNorm1d``; in eval mode it is exactly
    ``nn.BatchNorm1d``. Without the mask, short videos padded to a long batch would pull the mean towards zero and
    the result would depend on how much padding the batch happened to have.
    """

    synchronized = False  # set by model.engine.distributed.convert_sync_batch_norm: statistics over all ranks

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if not self.synchronized:
            return t
        return all_reduce_sum_autograd(t)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if not self.training or (mask is None and not self.synchronized):
            return super().forward(x)
        B, C, T = x.shape
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        # Statistics in float32 even under autocast (as nn.BatchNorm1d does): a bfloat16 sum over B * T steps
        # would lose most of its digits.
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        m = mask.unsqueeze(1).to(x.dtype)  # (B, 1, T)
        # Two passes (mean, then squared deviations), each summed over ranks when synchronized: the same formula
        # as one process on the whole global batch, so data-parallel training reproduces it (and a rank whose
        # share of the batch is empty still contributes its zeros).
        sums = torch.cat([(x * m).sum(dim=(0, 2)), m.sum().reshape(1)])  # (C + 1,)
        sums = self._sum_over_ranks(sums)
        n = sums[C].clamp_min(1.0)
        mean = sums[:C] / n  # (C,)
        sq = self._sum_over_ranks(((x - mean.view(1, C, 1)) * m).pow(2).sum(dim=(0, 2)))
        var = sq / n  # biased, as BN normalizes with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        y = (x - mean.view(1, C, 1)) * torch.rsqrt(var.view(1, C, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, C, 1) + self.bias.view(1, C, 1)
        return y


def masked_max_pool1d(x: torch.Tensor, mask: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping max pooling over time that ignores padded steps.

    The time axis is right-padded up to a multiple of ``pool`` (ceil mode), so T' = ceil(T / pool) >= 1 for any
    T >= 1. A pooled step is valid when any of its input steps was valid; invalid pooled steps are zero.

    Args:
        x: (B, C, T) features.
        mask: (B, T) bool, True at valid steps.
        pool: window and stride.
    Returns:
        (B, C, T') pooled features and their (B, T') mask.
    """
    B, C, T = x.shape
    T_out = -(-T // pool)
    extra = T_out * pool - T
    x = x.masked_fill(~mask.unsqueeze(1), float("-inf"))
    if extra:
        x = F.pad(x, (0, extra), value=float("-inf"))
        mask = F.pad(mask, (0, extra), value=False)
    x = x.view(B, C, T_out, pool).amax(dim=-1)  # (B, C, T')
    mask = mask.view(B, T_out, pool).any(dim=-1)  # (B, T')
    return x.masked_fill(~mask.unsqueeze(1), 0.0), mask


class ConvPoolStage(nn.Module):
    """One SNet stage: conv1d (same length) -> masked BN -> ReLU -> masked max pool.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: temporal kernel (odd, so the conv keeps the length).
        pool: pooling window and stride.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, pool: int = 2):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the time length, got {kernel_size}")
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = MaskedBatchNorm1d(out_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Zero padded steps first so the conv's receptive field at the last valid frames sees zeros, exactly as
        # it would at the end of an unpadded video.
        x = x.masked_fill(~mask.unsqueeze(1), 0.0)
        x = F.relu(self.bn(self.conv(x), mask))
        return masked_max_pool1d(x, mask, self.pool)


class SNet(nn.Module):
    """Squeezing Network: successive conv1d + pool stages over time.

    Args:
        in_dim: frame feature dimension D (1024 for YouTube-8M rgb, or the PCA dimension).
        channels: output channels of each stage; the paper uses 4 stages (its widths are not given).
        kernel_size: temporal kernel of every conv.
        pool: pooling stride of every stage; T' = ceil(T / pool**len(channels)), never below 1.
    """

    def __init__(self, in_dim: int = 1024, channels: Sequence[int] = (512, 512, 512, 512), kernel_size: int = 3,
                 pool: int = 2):
        super().__init__()
        dims = [in_dim, *channels]
        self.stages = nn.ModuleList(ConvPoolStage(dims[i], dims[i + 1], kernel_size, pool)
                                    for i in range(len(channels)))
        self.out_channels = dims[-1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        x = x.transpose(1, 2)  # (B, D, T)
        for stage in self.stages:
            x, mask = stage(x, mask)
        return x.transpose(1, 2), mask  # (B, T', C), (B, T')


class FCBackbone(nn.Module):
    """Two fully connected layers (each with masked BN and ReLU) applied to every frame; the mask is unchanged.

    Args:
        in_dim: frame feature dimension D.
        hidden: width of both layers (= out_channels).
    """

    def __init__(self, in_dim: int = 1024, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden, bias=False)
        self.bn1 = MaskedBatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = MaskedBatchNorm1d(hidden)
        self.out_channels = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        x = F.relu(self.bn1(self.fc1(x).transpose(1, 2), mask))  # (B, C, T)
        x = F.relu(self.bn2(self.fc2(x.transpose(1, 2)).transpose(1, 2), mask))  # (B, C, T)
        x = x.masked_fill(~mask.unsqueeze(1), 0.0)
        return x.transpose(1, 2), mask  # (B, T, C)


BACKBONES = {"snet": SNet, "fc": FCBackbone}
