"""Image backbones: EfficientNet-Lite0 against its packaged weights and real photos, ResNet weight files, freezing."""
from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest
import torch

from model.networks.image_backbones import (
    IMAGE_BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBackboneError,
    build_image_backbone,
    packaged_lite0_weights_path,
    tf_same_padding,
)

CAT_CLASSES = (281, 282, 285)  # ImageNet tabby, tiger cat, Egyptian cat
ESPRESSO = 967

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def lite0():
    return build_image_backbone("efficientnet-lite0").eval()


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A random torchvision resnet50 state dict on disk, with non-trivial BN statistics, and the model itself."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                # Defaults (mean 0, var 1, weight 1, bias 0) would let a backbone that silently skipped loading
                # BN tensors still match; random ones make every tensor count.
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("resnet50") / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    return path, reference


def eval_crop(image: np.ndarray, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Standard ImageNet evaluation view: bicubic resize of the shorter side to 256, center 224 crop, [0, 1]."""
    from PIL import Image

    im = Image.fromarray(image)
    scale = resize / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    left, top = (im.width - crop) // 2, (im.height - crop) // 2
    pixels = np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # (H, W, 3) -> (1, 3, H, W)


def test_tf_same_padding_is_lopsided_at_stride_2():
    assert tf_same_padding(224, 3, 2) == (0, 1)  # output 112: (111 * 2 + 3) - 224 = 1 pixel, after
    assert tf_same_padding(225, 3, 2) == (1, 1)
    assert tf_same_padding(112, 5, 2) == (1, 2)
    assert tf_same_padding(14, 5, 1) == (2, 2)
    assert tf_same_padding(7, 1, 1) == (0, 0)


def test_lite0_state_dict_matches_packaged_file_exactly(lite0):
    packaged = torch.load(packaged_lite0_weights_path(), map_location="cpu", weights_only=True)
    random_net = build_image_backbone("efficientnet-lite0", random_init=True)
    for net in (random_net, lite0):
        ours = net.state_dict()
        assert list(ours) == list(packaged)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in packaged.items()}
    assert len(packaged) == 296
    assert all(torch.equal(lite0.state_dict()[k], v) for k, v in packaged.items())
    assert all(p.requires_grad for p in lite0.parameters())
    assert lite0.channels == (112, 1280) and lite0.stride16_block == 10


@pytest.fixture(scope="module")
def photo_probabilities(lite0):
    """{photo: (probabilities with the pinned normalization, probabilities with ImageNet mean/std)}."""
    from skimage import data

    out = {}
    for photo in ("chelsea", "coffee"):
        rgb01 = eval_crop(getattr(data, photo)())
        imagenet_normalized = (rgb01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = lite0.imagenet_logits(torch.cat([lite0.normalize(rgb01), imagenet_normalized]))  # (2, 1000)
        pinned, imagenet = logits.softmax(dim=-1)
        out[photo] = (pinned, imagenet)
    return out


def test_lite0_pinned_normalization_is_tf_half_half(lite0):
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)


def test_lite0_recognizes_chelsea_as_cat_and_imagenet_normalization_is_worse(photo_probabilities):
    pinned, imagenet = photo_probabilities["chelsea"]
    assert int(pinned.argmax()) in CAT_CLASSES
    p_cat, p_cat_imagenet = float(pinned[list(CAT_CLASSES)].sum()), float(imagenet[list(CAT_CLASSES)].sum())
    assert p_cat > 0.88  # measured 0.909
    assert p_cat - p_cat_imagenet > 0.03  # measured 0.857 with ImageNet mean/std
    entropy = [float(-(p * p.clamp_min(1e-12).log()).sum()) for p in (pinned, imagenet)]
    assert entropy[0] < entropy[1] - 0.2  # measured 1.74 vs 2.08 nats


def test_lite0_recognizes_coffee_as_espresso_and_imagenet_normalization_is_worse(photo_probabilities):
    pinned, imagenet = photo_probabilities["coffee"]
    assert int(pinned.argmax()) == ESPRESSO
    assert float(pinned[ESPRESSO]) > 0.9  # measured 0.951
    assert float(imagenet[ESPRESSO]) < float(pinned[ESPRESSO]) - 0.1  # measured 0.779


@pytest.mark.parametrize("name,size", [
    ("efficientnet-lite0", 224), ("efficientnet-lite0", 448), ("efficientnet-lite0", 230),
    ("resnet50", 224), ("resnet50", 448), ("resnet101", 224),
])
def test_feature_maps_are_stride_16_and_32(name, size, lite0):
    backbone = lite0 if name == "efficientnet-lite0" else build_image_backbone(name, random_init=True).eval()
    expected_channels = (112, 1280) if name == "efficientnet-lite0" else (1024, 2048)
    assert backbone.channels == expected_channels and backbone.name == name
    torch.manual_seed(1)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, size, size))
    assert len(maps) == 2
    for fmap, channels, stride in zip(maps, expected_channels, (16, 32)):
        side = -(-size // stride)  # 230 -> 15 and 8: partial windows count, for both kinds of padding
        assert fmap.shape == (1, channels, side, side)
        assert torch.isfinite(fmap).all()


def test_resnet50_from_file_equals_torchvision(resnet50_file):
    path, reference = resnet50_file
    backbone = build_image_backbone("resnet50", weights=str(path)).eval()
    assert backbone.mean == IMAGENET_MEAN and backbone.std == IMAGENET_STD
    assert all(p.requires_grad and p.device.type == "cpu" for p in backbone.parameters())
    seen = {}
    reference.layer3.register_forward_hook(lambda m, i, o: seen.__setitem__("layer3", o))
    reference.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("layer4", o))
    torch.manual_seed(2)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected_logits = reference(x)
        stride16, stride32 = backbone(x)
        logits = backbone.imagenet_logits(x)
    torch.testing.assert_close(stride16, seen["layer3"], rtol=0, atol=0)
    torch.testing.assert_close(stride32, seen["layer4"], rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_state_dict_is_unwrapped(lite0, tmp_path, wrapper):
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({wrapper: lite0.state_dict(), "epoch": 3}, wrapped)
    backbone = build_image_backbone("efficientnet-lite0", weights=str(wrapped))
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in lite0.state_dict().items())


def test_refusals_are_one_clear_line(tmp_path):
    with pytest.raises(ImageBackboneError, match="resnet101 needs weights=FILE.*random_init=True"):
        build_image_backbone("resnet101")
    with pytest.raises(ImageBackboneError, match="unknown image backbone 'vgg16'"):
        build_image_backbone("vgg16")
    with pytest.raises(ImageBackboneError, match="not both"):
        build_image_backbone("resnet50", weights="x.pth", random_init=True)
    missing = tmp_path / "nope.pth"
    with pytest.raises(ImageBackboneError, match=f"resnet50 weights {missing}: no such file"):
        build_image_backbone("resnet50", weights=str(missing))
    with pytest.raises(ImageBackboneError, match="not a regular file"):
        build_image_backbone("resnet50", weights=str(tmp_path))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ImageBackboneError, match="cannot be read as a torch checkpoint") as err:
        build_image_backbone("efficientnet-lite0", weights=str(garbage))
    assert "\n" not in str(err.value)
    a_tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), a_tensor)
    with pytest.raises(ImageBackboneError, match="holds a Tensor, not a state dict"):
        build_image_backbone("resnet50", weights=str(a_tensor))
    assert set(IMAGE_BACKBONES) == {"efficientnet-lite0", "resnet101", "resnet50"}


def test_wrong_architecture_names_missing_keys_and_guesses(resnet50_file):
    path, _ = resnet50_file
    with pytest.raises(ImageBackboneError) as err:
        build_image_backbone("resnet101", weights=str(path))
    message = str(err.value)
    assert message.startswith(f"resnet101 weights {path}: missing keys layer3.6.conv1.weight")
    assert message.endswith("(is this a resnet50 state dict?)") and "\n" not in message
    with pytest.raises(ImageBackboneError, match=r"missing keys _conv_stem.weight.*is this a resnet50"):
        build_image_backbone("efficientnet-lite0", weights=str(path))
    lite0_guess = r"unexpected keys _conv_stem.weight.*is this an efficientnet-lite0 state"
    with pytest.raises(ImageBackboneError, match=lite0_guess):
        build_image_backbone("resnet50", weights=packaged_lite0_weights_path())


def test_wrong_shapes_are_named(lite0, tmp_path):
    state = lite0.state_dict()
    state["_fc.weight"] = torch.zeros(80, 1280)  # e.g. a head retrained for COCO's 80 labels
    state["_fc.bias"] = torch.zeros(80)
    path = tmp_path / "coco_head.pth"
    torch.save(state, path)
    with pytest.raises(ImageBackboneError, match=r"shapes file vs model _fc.weight \(80, 1280\) vs \(1000, 1280\)"):
        build_image_backbone("efficientnet-lite0", weights=str(path))


class MarkerPayload:
    """Unpickling this creates ``path``: stands for any code a crafted checkpoint would run."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"conv1.weight": MarkerPayload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(ImageBackboneError, match=f"resnet50 weights {path}: refused, not a weights-only") as err:
        build_image_backbone("resnet50", weights=str(path))
    assert "\n" not in str(err.value) and "add_safe_globals" not in str(err.value)
    assert not marker.exists()
    # The payload is live: an unrestricted load runs it. Without this the test could pass on an inert file.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_frozen_backbone_keeps_batch_norm_statistics(lite0):
    backbone = build_image_backbone("efficientnet-lite0")
    batch_norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)

    backbone.set_frozen(True).train()
    assert backbone.training and not any(bn.training for bn in batch_norms)
    assert not any(p.requires_grad for p in backbone.parameters())
    stride16, stride32 = backbone(x)
    assert not stride32.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(stride32, lite0(x)[1])  # frozen train mode computes exactly what eval does

    backbone.set_frozen(False).train()
    assert all(bn.training for bn in batch_norms) and all(p.requires_grad for p in backbone.parameters())
    backbone(x)  # unfrozen, a train-mode forward does move the statistics: the check above is not vacuous
    assert not torch.equal(backbone._bn0.running_mean, before["_bn0.running_mean"])


def test_old_files_without_batch_counters_and_half_precision_load(lite0, tmp_path):
    # torchvision's original ResNet files predate BN's num_batches_tracked; fp16 exports exist too.
    state = {k: v.half() if v.is_floating_point() else v for k, v in lite0.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    backbone = build_image_backbone("efficientnet-lite0", weights=str(path))
    assert int(backbone._bn0.num_batches_tracked) == 0
    assert all(p.dtype == torch.float32 for p in backbone.parameters())
    torch.testing.assert_close(backbone._fc.weight, lite0._fc.weight.half().float(), rtol=0, atol=0)
