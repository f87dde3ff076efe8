"""Data-parallel training under ``torchrun``: process group, device per local rank, and the few collectives the
training loops need.

    torchrun --nproc-per-node 2 -m model.train_video ...      # gloo on CPU, NCCL on CUDA

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op on one process, so the
training entry points run the same code path either way. Rules the loops follow:

* ``--batch-size`` is the global batch; learning-rate schedules count global samples (one step = one global batch).
* Each rank's loss is its share of the global mean: ``sum of its per-sample losses * world / global count``;
  DistributedDataParallel averages gradients over ranks, so the step equals one process's step on the whole batch.
* Batch norm statistics come from the whole global batch (``convert_sync_batch_norm``), masked where padding is.
* Only rank 0 writes files or prints progress; metrics are merged exactly from every rank's accumulator.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from model.engine.device import DeviceError, resolve_device
from pipeline.errors import Yt8mError


class DistributedError(Yt8mError):
    """The process group cannot be set up as the environment describes."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device, and whether it writes (rank 0)."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_spec: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...),
    or return a single-process context when there is none.

    Device: with CUDA (``--device auto`` or ``cuda``) each process takes ``cuda:LOCAL_RANK`` and NCCL; otherwise
    CPU and gloo. ``timeout_s`` bounds every collective, so a rank that stops participating ends the job with an
    error instead of leaving the others waiting for torch's default 30 minutes.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(0, 1, 0, resolve_device(device_spec))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    spec = str(device_spec).strip().lower()
    if spec.startswith("cuda:"):
        raise DeviceError(f"--device {spec}: under torchrun each process takes cuda:LOCAL_RANK; use --device cuda "
                          f"or auto (and CUDA_VISIBLE_DEVICES to choose GPUs)")
    use_cuda = spec in ("auto", "cuda") and torch.cuda.is_available()
    if spec == "cuda" and not use_cuda:
        resolve_device(spec)  # raises the usual "no CUDA" error
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)),
                                **({"device_id": device} if use_cuda else {}))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def run(train: Callable[[Any, DistContext], Any], args) -> Any:
    """``train(args, ctx)`` inside the process group the environment describes (``args.device``,
    ``args.dist_timeout``), left cleanly however ``train`` ends."""
    ctx = init_distributed(args.device, args.dist_timeout)
    try:
        return train(args, ctx)
    finally:
        shutdown(ctx)


def wrap_model(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when distributed (batch norms synchronized first), else the
    model itself. The wrapper broadcasts rank 0's parameters and buffers, so every rank starts equal.
    ``find_unused_parameters``: the model has trainable parameters that no loss reaches."""
    if not ctx.distributed:
        return model
    convert_sync_batch_norm(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def convert_sync_batch_norm(module: nn.Module) -> nn.Module:
    """Synchronize every batch norm in ``module`` across ranks, in place.

    ``MaskedBatchNorm1d`` keeps its class and gains cross-rank statistics over real frames only;
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would swap it for a plain ``SyncBatchNorm`` that averages
    padding and drops the mask argument. Other batch norms (the image backbones') become ``SyncBatchNorm``.
    """
    from model.networks.video_backbones import MaskedBatchNorm1d

    for name, child in list(module.named_children()):
        if isinstance(child, MaskedBatchNorm1d):
            child.synchronized = True
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            on_cuda = any(t.is_cuda for t in child.parameters()) or any(t.is_cuda for t in child.buffers())
            # DistributedDataParallel refuses torch's SyncBatchNorm on CPU modules (gloo); there the statistics
            # are summed over ranks by CrossRankBatchNorm instead, with the same state-dict keys
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child) if on_cuda
                    else CrossRankBatchNorm.from_batch_norm(child))
        else:
            convert_sync_batch_norm(child)
    return module


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over (N, C, ...) whose training statistics are those of the whole global batch: sums over all
    ranks (differentiable), the same two-pass formula as ``MaskedBatchNorm1d``; eval mode is plain batch norm."""

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "CrossRankBatchNorm":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new.to(next(iter(bn.buffers()), torch.zeros(0)).device)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from model.networks.video_backbones import all_reduce_sum_autograd

        C = x.shape[1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = [0] + list(range(2, x.dim()))
        shape = [1, C] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // max(C, 1)], dtype=xf.dtype, device=x.device)
        sums = all_reduce_sum_autograd(torch.cat([xf.sum(dim=dims), count]))  # (C + 1,)
        n = sums[C].clamp_min(1.0)
        mean = sums[:C] / n
        var = all_reduce_sum_autograd((xf - mean.view(shape)).pow(2).sum(dim=dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * (n / (n - 1).clamp_min(1.0))).detach().to(self.running_var.dtype),
                                       momentum)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def all_reduce_sum(value: float | torch.Tensor, ctx: DistContext) -> float:
    """Sum of a number over ranks (float64 on the wire); the number itself on one process."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t.item())


def share_of_global_mean(local_mean: torch.Tensor, n_local: int, n_global: float, ctx: DistContext) -> torch.Tensor:
    """This rank's loss for a step whose global batch has ``n_global`` examples, given the mean over its own
    ``n_local``: DistributedDataParallel averages gradients over ranks, so ``mean * n_local * world / n_global``
    makes the averaged gradient the global batch mean's (one process: ``local_mean`` itself)."""
    return local_mean * (n_local * ctx.world_size / n_global)


def all_gather_objects(obj: Any, ctx: DistContext) -> list:
    """Every rank's ``obj`` in rank order (picklable objects: metric accumulators, counts)."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
