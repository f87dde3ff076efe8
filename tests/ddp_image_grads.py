"""Helper of tests/test_distributed.py (run by it, once alone and once under torchrun): one float64 training step
of the image model with a trainable EfficientNet-Lite0 backbone; rank 0 saves the averaged gradients to argv[1]."""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import train_image
from model.engine.distributed import convert_sync_batch_norm, init_distributed
from model.networks.image_backbones import build_image_backbone
from model.networks.image_model import build_image_model

ctx = init_distributed("cpu", 60)
torch.manual_seed(0)
args = train_image.get_args_parser().parse_args(["--train-ann", "-", "--train-images", "-", "--out", "-"])
args.num_classes = 14
net = build_image_model(args, build_image_backbone(args.backbone, random_init=True),
                        label_embeddings=torch.randn(14, 256)).double()
if ctx.distributed:
    convert_sync_batch_norm(net)
net.train()
g = torch.Generator().manual_seed(1)
B = 8
x = torch.randn(B, 3, 64, 64, generator=g).double()
y = (torch.rand(B, 14, generator=g) < 0.3).double()
x, y = x[ctx.rank::ctx.world_size], y[ctx.rank::ctx.world_size]
loss = F.binary_cross_entropy_with_logits(net(x), y, reduction="none").sum() / B * ctx.world_size
loss.backward()
grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
for t in grads.values():
    if ctx.distributed:
        dist.all_reduce(t)
        t /= ctx.world_size
if ctx.rank == 0:
    torch.save(grads, sys.argv[1])
