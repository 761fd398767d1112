"""Models through torchvision's weights API: pretrained weights, local files, fine-tuning policies."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from core.common.labels import NUM_CLASSES
from core.models.architectures import (
    ARCHITECTURES,
    WeightsUnavailableError,
    build_model,
    default_arch,
    train_mode,
    weights_available,
    weights_file,
)


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


def test_with_no_imagenet_file_the_preferred_architecture_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_arch("resnet50") == "resnet50"
