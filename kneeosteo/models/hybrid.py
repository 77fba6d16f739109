"""The paper's hybrid model (frozen backbone features ++ attention-module features -> FC head)
and its factory. Its checkpoint file format is in ``checkpoint.py``.

"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kneeosteo.errors import CheckpointError, ConfigError
from kneeosteo.models.attention import AttentionModule
from kneeosteo.models.backbones import build_backbone, freeze, train_last_stages
from kneeosteo.models.head import ClassifierHead
from kneeosteo.models.registry import BackboneSpec, get_backbone_spec
from kneeosteo.models.weights import WeightsInfo
from kneeosteo.tasks import task_named

__all__ = ["HybridModel", "build_model", "build_model_from_config"]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class HybridModel(nn.Module):
    """concat(backbone features, AM features) -> ClassifierHead -> one logit per image.

    ``forward(images, features)``: ``images`` (B, 3, H, W) normalised with the backbone's
    mean/std feed the AM and, when ``features`` is not given, the backbone; ``features``
    (B, feature_dim) are precomputed backbone features, so training can cache the frozen
    backbone's output and run only AM + head. Ablations: ``use_attention=False`` (backbone +
    head) and ``use_backbone=False`` (AM + head, head input 128). A frozen backbone has
    ``requires_grad=False`` and stays in eval mode through ``model.train()`` (its BatchNorm
    statistics must not drift towards the radiographs' while "frozen").
    ``trainable_stages=N`` (with ``freeze_backbone=False``) fine-tunes only the backbone's last N
    stages (the registry's ``stages``); the rest stays frozen, and every BatchNorm of the backbone
    keeps its ImageNet statistics (eval mode): a few hundred radiographs in batches of 32 are too
    few to re-estimate them, while the stages' weights and BN affine parameters still learn.
    """

    def __init__(
        self,
        backbone_name: str,
        backbone: nn.Module | None,
        feature_dim: int,
        use_attention: bool = True,
        use_backbone: bool = True,
        freeze_backbone: bool = True,
        *,
        attention_features: int = 128,
        head_hidden: Sequence[int] = (1024, 512, 256, 128),
        head_dropout: Sequence[float] = (0.5, 0.3, 0.2, 0.1),
        image_size: int = 224,
        backbone_weights: WeightsInfo | None = None,
        trainable_stages: int = 0,
        task: str = "binary",
        outputs: int = 1,
        output_shift: float = 0.0,
        output_scale: float = 1.0,
        aux_outputs: int = 0,
    ):
        super().__init__()
        self.task = task_named(task)  # a Task; the model's config keeps its name
        if not (use_attention or use_backbone):
            raise ValueError("at least one of use_attention / use_backbone must be True")
        get_backbone_spec(backbone_name)  # validate; the name also fixes the input normalisation
        self.backbone_name = backbone_name
        self.use_attention = bool(use_attention)
        self.use_backbone = bool(use_backbone)
        self.freeze_backbone = bool(freeze_backbone) and self.use_backbone
        self.image_size = int(image_size)
        self.feature_dim = int(feature_dim) if self.use_backbone else 0
        if self.use_backbone and self.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1 with a backbone, got {feature_dim}")
        self.backbone_weights = backbone_weights if self.use_backbone else None
        self.register_module("backbone", backbone if self.use_backbone else None)
        self.trainable_stages = int(trainable_stages) if (self.use_backbone and not self.freeze_backbone) else 0
        if self.backbone is not None and self.freeze_backbone:
            freeze(self.backbone)
        elif self.backbone is not None and self.trainable_stages:
            train_last_stages(self.backbone, backbone_name, self.trainable_stages)
        self.attention = AttentionModule(3, attention_features) if self.use_attention else None
        head_in = self.feature_dim + (attention_features if self.use_attention else 0)
        self.head = ClassifierHead(
            head_in, head_hidden, head_dropout, outputs, output_shift, output_scale, aux_outputs=aux_outputs
        )

    def train(self, mode: bool = True) -> HybridModel:
        super().train(mode)
        if self.backbone is not None and (self.freeze_backbone or self.trainable_stages):
            self.backbone.eval()
        return self

    @property
    def spec(self) -> BackboneSpec:
        return get_backbone_spec(self.backbone_name)

    @property
    def preprocess(self) -> dict[str, Any]:
        """Normalisation the inputs must have: the backbone's mean/std at ``image_size``."""
        spec = self.spec
        return {"mean": list(spec.mean), "std": list(spec.std), "input_size": self.image_size}

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, feature_dim); without autograd when frozen (for caching).

        Gradients still flow to ``images`` if they require grad (input-saliency explanations).
        """
        if self.backbone is None:
            raise ValueError("this model has no backbone module; pass precomputed features")
        if self.freeze_backbone and not images.requires_grad:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def logit_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B,), the backbone's pooled features (B, D) or None without a backbone branch):
        one backbone pass for both the prediction and the domain check."""
        if not (self.use_backbone and self.backbone is not None):
            return self(images=images), None
        feats = self.extract_features(images)
        return self(images=images, features=feats), feats

    def forward(
        self, images: torch.Tensor | None = None, features: torch.Tensor | None = None, with_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The task's outputs (B,) or (B, K); ``with_aux``: (those, the auxiliary outputs (B,) or None)."""
        out, aux = self.head.forward_with_aux(self.fused_features(images, features))
        if not with_aux:
            return out.squeeze(-1)
        return out.squeeze(-1), (None if aux is None else aux.squeeze(-1))

    def fused_features(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """What the head reads: backbone and attention-module features side by side (B, head input).
        The source probe asks how much of the film's source these carry."""
        parts: list[torch.Tensor] = []
        if self.use_backbone:
            if features is None:
                if images is None:
                    raise ValueError("pass images or precomputed backbone features")
                features = self.extract_features(images)
            if features.dim() != 2 or features.shape[1] != self.feature_dim:
                raise ValueError(
                    f"backbone features must be (B, {self.feature_dim}) for {self.backbone_name}, "
                    f"got {tuple(features.shape)}"
                )
            if features.is_inference():  # cached under inference_mode: unusable for autograd
                features = features.clone()
            if not _autocast_enabled(features.device.type):
                features = features.to(self.head.out.weight.dtype)
            parts.append(features)
        elif features is not None:
            raise ValueError("this model has no backbone branch (use_backbone=False); do not pass features")
        if self.use_attention:
            if images is None:
                raise ValueError("the attention branch needs the images")
            am = self.attention(images)
            if parts and parts[0].shape[0] != am.shape[0]:
                raise ValueError(f"batch sizes differ: features {parts[0].shape[0]}, images {am.shape[0]}")
            parts.append(am)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """P(osteoporosis) per image (a multiclass model: (B, K) class probabilities; a regression:
        the values), always computed in eval mode (the previous mode is restored):
        dropout and batch statistics at prediction time are a classic silent bug."""
        was_training = self.training
        self.eval()
        try:
            return self.task.answer_of(self(images, features))
        finally:
            self.train(was_training)

    def model_config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`build_model_from_config` rebuilds this model.

        ``backbone_weights`` is where the backbone's *initial* weights came from; a fine-tuned
        backbone differs from them (its full state then goes into the checkpoint).
        """
        return {
            "architecture": "HybridModel",
            "backbone": self.backbone_name,
            "feature_dim": self.feature_dim,
            "use_backbone": self.use_backbone,
            "use_attention": self.use_attention,
            "freeze_backbone": self.freeze_backbone,
            **({"trainable_stages": self.trainable_stages} if self.trainable_stages else {}),
            "image_size": self.image_size,
            "attention": self.attention.config() if self.attention is not None else None,
            "head": self.head.config(),
            "backbone_weights": self.backbone_weights.to_dict() if self.backbone_weights else None,
            **self.task.model_entry(),  # the paper's binary model: no entry
        }


def build_model(
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = "default",
    attention: bool = True,
    use_backbone: bool = True,
    finetune: bool = False,
    *,
    trainable_stages: int = 0,
    image_size: int = 224,
    allow_download: bool = True,
    task: str = "binary",
    outputs: int = 1,
    aux_outputs: int = 0,
) -> tuple[HybridModel, WeightsInfo]:
    """Build the hybrid model with a resolved backbone (see ``build_backbone`` for ``weights``).

    ``use_backbone=False`` builds no backbone (the name still fixes the input normalisation) and
    returns ``WeightsInfo(source="unused", ...)``.
    """
    spec = get_backbone_spec(backbone)  # ConfigError for an unknown name, before any weights are sought
    if use_backbone:
        module, info = build_backbone(backbone, weights, allow_download=allow_download)
    else:
        module, info = None, WeightsInfo(source="unused", path=None, sha256=None, pretrained=False)
    model = HybridModel(
        backbone,
        module,
        spec.feature_dim,
        use_attention=attention,
        use_backbone=use_backbone,
        freeze_backbone=not finetune,
        image_size=image_size,
        backbone_weights=info if use_backbone else None,
        trainable_stages=trainable_stages if finetune else 0,
        task=task,
        outputs=outputs,
        aux_outputs=aux_outputs,
    )
    return model, info


def build_model_from_config(
    config: dict[str, Any], weights: str | os.PathLike | None = "none", *, allow_download: bool = False
) -> HybridModel:
    """Rebuild the architecture described by ``HybridModel.model_config()``.

    ``weights`` is for the backbone only (default random: the caller loads a full state).
    """
    try:
        name = config["backbone"]
        use_backbone = bool(config["use_backbone"])
        att = config["attention"]
        head = config["head"]
        backbone, info = (None, None)
        if use_backbone:
            backbone, info = build_backbone(name, weights, allow_download=allow_download)
            if info.source == "random":
                info = WeightsInfo.from_dict(config["backbone_weights"]) if config.get("backbone_weights") else info
        model = HybridModel(
            name,
            backbone,
            int(config["feature_dim"]),
            use_attention=bool(config["use_attention"]),
            use_backbone=use_backbone,
            freeze_backbone=bool(config["freeze_backbone"]),
            attention_features=int(att["out_features"]) if att else 128,
            head_hidden=tuple(head["hidden"]),
            head_dropout=tuple(head["dropout"]),
            image_size=int(config.get("image_size", 224)),
            backbone_weights=info,
            trainable_stages=int(config.get("trainable_stages", 0)),
            task=str(config.get("task", "binary")),
            outputs=int(head.get("outputs", 1)),
            output_shift=float(head.get("output_shift", 0.0)),
            output_scale=float(head.get("output_scale", 1.0)),
            aux_outputs=int(head.get("aux_outputs", 0)),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"model config is incomplete or malformed: {type(exc).__name__}: {exc}") from exc
    if att is not None and model.attention is not None and model.attention.config() != att:
        raise CheckpointError(f"attention config {att} is not buildable (got {model.attention.config()})")
    if model.head.config() != head:
        raise CheckpointError(f"head config {head} disagrees with feature_dim/attention (built {model.head.config()})")
    return model
