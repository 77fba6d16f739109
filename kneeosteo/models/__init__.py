"""Model building blocks (timm/MONAI-style split): reusable blocks (``attention``, ``head``),
the backbone registry (``registry``: the spec type; ``backbones``: the entries) with explicit
weight resolution (``weights``), the assembled paper model (``hybrid``) and its weights file
(``checkpoint``; ``weights_file``: its identity, read without torch).

The names below are loaded on first use (PEP 562), so the torch-free modules of this package
(``weights_file``, ``fused``) are imported without torch: ``kneeosteo predict`` with ONNX Runtime
reads a run's identity and fused model but never its tensors (issue 29). Taking any name from the
package imports ``backbones`` first, so the registry is always filled."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kneeosteo.utils.lazy import lazy_names

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
    "AttentionModule": "kneeosteo.models.attention",
    "BACKBONES": "kneeosteo.models.registry",
    "BackboneSpec": "kneeosteo.models.registry",
    "BackboneWeightsError": "kneeosteo.errors",
    "ChannelAttention": "kneeosteo.models.attention",
    "CheckpointError": "kneeosteo.errors",
    "ClassifierHead": "kneeosteo.models.head",
    "HybridModel": "kneeosteo.models.hybrid",
    "SpatialAttention": "kneeosteo.models.attention",
    "WeightsInfo": "kneeosteo.models.weights",
    "build_backbone": "kneeosteo.models.backbones",
    "build_model": "kneeosteo.models.hybrid",
    "build_model_from_config": "kneeosteo.models.hybrid",
    "find_default_weights": "kneeosteo.models.weights",
    "freeze": "kneeosteo.models.backbones",
    "get_backbone_spec": "kneeosteo.models.registry",
    "list_backbones": "kneeosteo.models.registry",
    "load_backbone_weights": "kneeosteo.models.weights",
    "load_weights": "kneeosteo.models.checkpoint",
    "read_identity": "kneeosteo.models.weights_file",
    "register_backbone": "kneeosteo.models.registry",
    "save_weights": "kneeosteo.models.checkpoint",
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


__getattr__, __dir__ = lazy_names(__name__, globals(), _WHERE, first="kneeosteo.models.backbones")
