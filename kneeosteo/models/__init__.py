"""Model building blocks (timm/MONAI-style split): reusable blocks (``attention``, ``head``),
the backbone registry (``registry``: the spec type; ``backbones``: the entries) with explicit
weight resolution (``weights``), the assembled paper model (``hybrid``) and its weights file
(``checkpoint``; ``weights_file``: its identity, read without torch).

The names below are loaded on first use (PEP 562), so the torch-free modules of this package
(``weights_file``, ``fused``) are imported without torch: ``kneeosteo predict`` with ONNX Runtime
reads a run's identity and fused model but never its tensors (issue 29). Taking any name from the
package imports ``backbones`` first, so the registry is always filled."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kneeosteo.errors import BackboneWeightsError, CheckpointError
    from kneeosteo.models.attention import AttentionModule, ChannelAttention, SpatialAttention
    from kneeosteo.models.backbones import build_backbone, freeze
    from kneeosteo.models.checkpoint import load_weights, save_weights
    from kneeosteo.models.head import ClassifierHead
    from kneeosteo.models.hybrid import HybridModel, build_model, build_model_from_config
    from kneeosteo.models.registry import BACKBONES, BackboneSpec, get_backbone_spec, list_backbones, register_backbone
    from kneeosteo.models.weights import WeightsInfo, find_default_weights, load_backbone_weights
    from kneeosteo.models.weights_file import read_identity

_WHERE = {
    "AttentionModule": "attention",
    "BACKBONES": "registry",
    "BackboneSpec": "registry",
    "BackboneWeightsError": "kneeosteo.errors",
    "ChannelAttention": "attention",
    "CheckpointError": "kneeosteo.errors",
    "ClassifierHead": "head",
    "HybridModel": "hybrid",
    "SpatialAttention": "attention",
    "WeightsInfo": "weights",
    "build_backbone": "backbones",
    "build_model": "hybrid",
    "build_model_from_config": "hybrid",
    "find_default_weights": "weights",
    "freeze": "backbones",
    "get_backbone_spec": "registry",
    "list_backbones": "registry",
    "load_backbone_weights": "weights",
    "load_weights": "checkpoint",
    "read_identity": "weights_file",
    "register_backbone": "registry",
    "save_weights": "checkpoint",
}

__all__ = [
    "AttentionModule",
    "BACKBONES",
    "BackboneSpec",
    "BackboneWeightsError",
    "ChannelAttention",
    "CheckpointError",
    "ClassifierHead",
    "HybridModel",
    "SpatialAttention",
    "WeightsInfo",
    "build_backbone",
    "build_model",
    "build_model_from_config",
    "find_default_weights",
    "freeze",
    "get_backbone_spec",
    "list_backbones",
    "load_backbone_weights",
    "load_weights",
    "read_identity",
    "register_backbone",
    "save_weights",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module("kneeosteo.models.backbones")  # the registry's entries
    where = _WHERE[name]
    value = getattr(importlib.import_module(where if "." in where else f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
