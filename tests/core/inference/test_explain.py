"""core.inference.explain: Grad-CAM on frozen and trainable backbones, overlays, feature maps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from core.data.preprocessing import Preprocessing, eval_transform, load_for_model
from core.inference.explain import CAM_METHOD_NAMES, CAM_METHODS, feature_maps, gradcam, overlay
from core.models.architectures import ARCHITECTURES, build_model, set_finetune, train_mode
from tests.conftest import make_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", weights="none", finetune="head").eval()


def lesion_tensor(tmp_path, size=(64, 64), arch: str = "resnet18") -> tuple[Image.Image, torch.Tensor]:
    """A synthetic lesion image and its input tensor, normalised as ``arch``'s pretrained weights expect."""
    path = tmp_path / "lesion.png"
    make_image(4, np.random.default_rng(0), size=(120, 90)).save(path)
    prep = Preprocessing(input_size=size, mean=ARCHITECTURES[arch].mean, std=ARCHITECTURES[arch].std)
    image = load_for_model(path, prep)
    return image, eval_transform(prep)(image).unsqueeze(0)


@pytest.mark.parametrize(
    ("arch", "weights"), [("mobilenet_v2", "imagenet_weights"), ("efficientnet_lite0", "lite_weights")]
)
def test_gradcam_on_frozen_imagenet_backbone_is_a_non_constant_map_of_the_image(arch, weights, tmp_path, request):
    request.getfixturevalue(weights)  # the architecture's real ImageNet file (skipped without it)
    torch.manual_seed(0)
    model = build_model(arch, weights="imagenet", finetune="head")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    train_mode(model)
    modes = {name: m.training for name, m in model.named_modules()}
    image, x = lesion_tensor(tmp_path, size=(96, 128), arch=arch)

    for method in CAM_METHODS:
        heat = gradcam(model, x, target_class=None, method=method)
        assert heat.shape == (96, 128) and heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() <= 1.0
        assert heat.std() > 0.05, f"{method} gave a (nearly) constant map"

    # Nothing the model had is changed: frozen flags, hooks, train/eval modes, grads.
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())

    shown = overlay(image, heat)
    assert shown.size == image.size and shown.mode == "RGB"


def test_frozen_and_trainable_backbones_give_the_librarys_own_gradcam(resnet, tmp_path):
    _, x = lesion_tensor(tmp_path)
    full = copy.deepcopy(resnet)
    set_finetune(full, "full")
    full.eval()
    # Reference: the library used directly, where gradients flow naturally through trainable layers.
    with GradCAM(model=full, target_layers=[full.cam_layer()]) as cam:
        reference = cam(input_tensor=x, targets=[ClassifierOutputTarget(2)])[0]
    np.testing.assert_allclose(gradcam(full, x, 2), reference, atol=1e-5)
    np.testing.assert_allclose(gradcam(resnet, x, 2), reference, atol=1e-5)


def test_target_class_none_means_the_predicted_class_and_targets_differ(resnet, tmp_path):
    _, x = lesion_tensor(tmp_path)
    with torch.no_grad():
        predicted = int(resnet(x).argmax())
    np.testing.assert_array_equal(gradcam(resnet, x, None), gradcam(resnet, x, predicted))
    other = (predicted + 3) % 7
    assert not np.allclose(gradcam(resnet, x, predicted), gradcam(resnet, x, other))


def test_gradcam_works_inside_inference_mode_and_on_3d_inputs(resnet, tmp_path):
    _, x = lesion_tensor(tmp_path)
    expected = gradcam(resnet, x, 1)
    with torch.inference_mode():
        made_in_inference = x.clone()
        np.testing.assert_allclose(gradcam(resnet, made_in_inference, 1), expected, atol=1e-6)
    np.testing.assert_allclose(gradcam(resnet, x[0], 1), expected, atol=1e-6)


def test_gradcam_refuses_bad_arguments(resnet):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown CAM method"):
        gradcam(resnet, x, 0, method="magic")
    with pytest.raises(ValueError, match="target_class"):
        gradcam(resnet, x, 7)
    with pytest.raises(ValueError, match="one image"):
        gradcam(resnet, torch.zeros(2, 3, 32, 32), 0)
    assert set(CAM_METHOD_NAMES) == set(CAM_METHODS)


def test_overlay_blends_heatmap_at_image_size():
    image = np.full((30, 40, 3), 100, dtype=np.uint8)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:, 4:] = 1.0
    assert np.array_equal(np.asarray(overlay(image, heat, alpha=0.0)), image)
    shown = np.asarray(overlay(Image.fromarray(image), heat, alpha=1.0))
    assert shown.shape == (30, 40, 3)
    # Jet: cold (blue) where the map is 0, hot (red) where it is 1.
    assert shown[15, 2, 2] > shown[15, 2, 0] and shown[15, 37, 0] > shown[15, 37, 2]
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, heat, alpha=1.5)
    with pytest.raises(ValueError, match="RGB uint8"):
        overlay(image.astype(np.float32), heat)


def test_feature_maps_match_a_manual_forward(resnet):
    x = torch.randn(1, 3, 64, 64)
    names = resnet.feature_layers()
    assert names == ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]
    b = resnet.backbone
    with torch.no_grad():
        expected = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))[0].numpy()
    maps = feature_maps(resnet, x, "backbone.layer1")
    assert maps.shape == (64, 16, 16)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert [feature_maps(resnet, x[0], n).shape[0] for n in names] == [64, 128, 256, 512]
    assert all(not m._forward_hooks for m in resnet.modules())
    with pytest.raises(ValueError, match="backbone.layer1"):
        feature_maps(resnet, x, "backbone.nope")
