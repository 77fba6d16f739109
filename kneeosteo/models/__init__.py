"""Model building blocks (timm/MONAI-style split): reusable blocks (``attention``, ``head``),
a backbone registry with explicit weight resolution (``backbones``), and the assembled
paper model with its checkpoints (``hybrid``)."""

from kneeosteo.models.attention import AttentionModule, ChannelAttention, SpatialAttention
from kneeosteo.models.backbones import (
    BACKBONES,
    BackboneSpec,
    BackboneWeightsError,
    WeightsInfo,
    build_backbone,
    freeze,
    get_backbone_spec,
    list_backbones,
    load_backbone_weights,
    register_backbone,
)
from kneeosteo.models.head import ClassifierHead
from kneeosteo.models.hybrid import (
    CheckpointError,
    HybridModel,
    build_model,
    build_model_from_config,
    load_checkpoint,
    model_config,
    save_checkpoint,
)

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
    "freeze",
    "get_backbone_spec",
    "list_backbones",
    "load_backbone_weights",
    "load_checkpoint",
    "model_config",
    "register_backbone",
    "save_checkpoint",
]
