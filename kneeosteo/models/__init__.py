"""Model building blocks (timm/MONAI-style split): reusable blocks (``attention``, ``head``),
the backbone registry (``registry``: the spec type; ``backbones``: the entries) with explicit
weight resolution (``weights``), the assembled paper model (``hybrid``) and its weights file
(``checkpoint``)."""

from kneeosteo.errors import BackboneWeightsError, CheckpointError
from kneeosteo.models.attention import AttentionModule, ChannelAttention, SpatialAttention
from kneeosteo.models.backbones import build_backbone, freeze
from kneeosteo.models.checkpoint import load_weights, read_identity, save_weights
from kneeosteo.models.head import ClassifierHead
from kneeosteo.models.hybrid import HybridModel, build_model, build_model_from_config
from kneeosteo.models.registry import BACKBONES, BackboneSpec, get_backbone_spec, list_backbones, register_backbone
from kneeosteo.models.weights import WeightsInfo, find_default_weights, load_backbone_weights

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
