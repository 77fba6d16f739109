"""The paper's hybrid model (frozen backbone features ++ attention-module features -> FC head),
its factory, and safetensors checkpoints that rebuild it exactly.

Checkpoint layout (a directory): ``model.safetensors`` + ``config.json``. When the backbone is
frozen and its weights came from a known file (pretrained, sha256 recorded), only the
non-backbone tensors are stored ("partial"): the backbone is rebuilt from its weights file and
its sha256 checked against the recorded one, so each seed/fold stores only the head and AM
(~9 MB) instead of also repeating the backbone (~57 MB for DenseNet169). Otherwise (fine-tuned, random or no backbone) the full state is stored. The
model config is written both to ``config.json`` and into the safetensors metadata, so a config
edited (or swapped) after saving is detected, as is a truncated or altered tensor file (sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kneeosteo.models.attention import AttentionModule
from kneeosteo.models.head import ClassifierHead
from kneeosteo.models.backbones import (
    BackboneSpec,
    BackboneWeightsError,
    WeightsInfo,
    build_backbone,
    freeze,
    get_backbone_spec,
)
from kneeosteo.utils.atomic import atomic_path, write_json
from kneeosteo.utils.state_dict import mismatch_report
from kneeosteo.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "HybridModel",
    "build_model",
    "build_model_from_config",
    "load_checkpoint",
    "model_config",
    "save_checkpoint",
    "CHECKPOINT_WEIGHTS",
    "CHECKPOINT_CONFIG",
]

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_FORMAT = "kneeosteo-hybrid-checkpoint"
CHECKPOINT_VERSION = 1
_META_KEY = "kneeosteo_model_config"


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
    ):
        super().__init__()
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
        if self.backbone is not None and self.freeze_backbone:
            freeze(self.backbone)
        self.attention = AttentionModule(3, attention_features) if self.use_attention else None
        head_in = self.feature_dim + (attention_features if self.use_attention else 0)
        self.head = ClassifierHead(head_in, head_hidden, head_dropout)

    def train(self, mode: bool = True) -> "HybridModel":
        super().train(mode)
        if self.backbone is not None and self.freeze_backbone:
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

    def forward(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
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
        fused = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.head(fused).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """P(osteoporosis) per image, always computed in eval mode (the previous mode is restored):
        dropout and batch statistics at prediction time are a classic silent bug."""
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(images, features).float())
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
            "image_size": self.image_size,
            "attention": self.attention.config() if self.attention is not None else None,
            "head": self.head.config(),
            "preprocess": self.preprocess,
            "backbone_weights": self.backbone_weights.to_dict() if self.backbone_weights else None,
        }


def build_model(
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = "default",
    attention: bool = True,
    use_backbone: bool = True,
    finetune: bool = False,
    *,
    image_size: int = 224,
    allow_download: bool = True,
) -> tuple[HybridModel, WeightsInfo]:
    """Build the hybrid model with a resolved backbone (see ``build_backbone`` for ``weights``).

    ``use_backbone=False`` builds no backbone (the name still fixes the input normalisation) and
    returns ``WeightsInfo(source="unused", ...)``.
    """
    spec = get_backbone_spec(backbone)
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
        )
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"model config is incomplete or malformed: {type(exc).__name__}: {exc}") from exc
    if att is not None and model.attention is not None and model.attention.config() != att:
        raise CheckpointError(f"attention config {att} is not buildable (got {model.attention.config()})")
    if model.head.config() != head:
        raise CheckpointError(f"head config {head} disagrees with feature_dim/attention (built {model.head.config()})")
    return model


# --------------------------------------------------------------------------------------------
# checkpoints


def model_config(model: HybridModel) -> dict[str, Any]:
    """Same as ``model.model_config()``."""
    return model.model_config()


def _backbone_reproducible(model: HybridModel) -> bool:
    """A frozen backbone whose pretrained weights file is identified (sha256) can be rebuilt,
    whether or not the module is attached (training from cached features may omit it)."""
    w = model.backbone_weights
    return bool(model.use_backbone and model.freeze_backbone and w and w.pretrained and w.sha256)


def save_checkpoint(
    model: HybridModel,
    path_dir: str | os.PathLike,
    config: dict[str, Any] | None = None,
    *,
    include_backbone: bool | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``path_dir`` (atomically each).

    ``config``: extra JSON-able run information (training settings, metrics), stored under
    ``"run"``; the model's own config is always written. ``include_backbone=None`` stores the
    frozen pretrained backbone only when it cannot be rebuilt from its weights file (see module
    docstring); ``True`` forces a full state.
    """
    from safetensors.torch import save as st_save

    path_dir = Path(path_dir)
    mc = model.model_config()
    reproducible = _backbone_reproducible(model)
    if include_backbone is False and not reproducible and model.use_backbone:
        raise ValueError("the backbone is fine-tuned or not from a known weights file; it must be saved")
    partial = reproducible if include_backbone is None else not include_backbone
    if model.use_backbone and model.backbone is None and not partial:
        raise ValueError(
            "the model has no backbone module and no identified pretrained backbone weights, so a "
            "checkpoint could not rebuild it; construct it with backbone_weights=WeightsInfo from build_backbone"
        )
    tensors = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if not (partial and k.startswith("backbone."))
    }
    contents = "without-frozen-backbone" if partial else "full"
    data = st_save(tensors, metadata={_META_KEY: json.dumps(mc, sort_keys=True), "contents": contents})
    weights_path = path_dir / CHECKPOINT_WEIGHTS
    with atomic_path(weights_path) as tmp:
        tmp.write_bytes(data)
    write_json(
        path_dir / CHECKPOINT_CONFIG,
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "model": mc,
            "weights_file": CHECKPOINT_WEIGHTS,
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "contents": contents,
            "num_tensors": len(tensors),
            "versions": {"torch": torch.__version__, "kneeosteo": _kneeosteo_version()},
            "run": config or {},
        },
    )
    return path_dir


def _kneeosteo_version() -> str:
    from kneeosteo import __version__

    return __version__


def _st_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header length, JSON)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__") or {}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def load_checkpoint(
    path_dir: str | os.PathLike,
    *,
    backbone_weights: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> tuple[HybridModel, dict[str, Any]]:
    """Rebuild and load a checkpoint; returns ``(model in eval mode, config.json contents)``.

    For a checkpoint without its frozen backbone, the backbone weights are resolved from
    ``backbone_weights``, else the recorded path, else the default sources, and must have the
    recorded sha256. Every disagreement (sha256, config vs file metadata, missing/unexpected
    keys, shapes) raises :class:`CheckpointError` naming the file.
    """
    from safetensors.torch import load as st_load

    path_dir = Path(path_dir)
    cfg_path, w_path = path_dir / CHECKPOINT_CONFIG, path_dir / CHECKPOINT_WEIGHTS
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: missing; not a kneeosteo checkpoint directory") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable ({exc})") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{cfg_path}: not a {CHECKPOINT_FORMAT} config")
    if cfg.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {cfg.get('format_version')} (this code reads {CHECKPOINT_VERSION})")
    try:
        data = w_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{w_path}: missing") from None
    sha = hashlib.sha256(data).hexdigest()
    if cfg.get("weights_sha256") != sha:
        raise CheckpointError(
            f"{w_path}: sha256 {sha[:12]}... differs from {cfg.get('weights_sha256')!r} recorded in {cfg_path.name}; "
            "the file is truncated, altered, or from another checkpoint"
        )
    try:
        tensors = st_load(data)
        meta = _st_metadata(data)
    except Exception as exc:
        raise CheckpointError(f"{w_path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if _META_KEY not in meta:
        raise CheckpointError(f"{w_path}: has no embedded model config; not written by kneeosteo")
    file_mc = json.loads(meta[_META_KEY])
    mc = cfg.get("model")
    diffs = _diff(mc, file_mc)
    if diffs:
        raise CheckpointError(
            f"{cfg_path} and {w_path.name} disagree on the model: " + "; ".join(diffs[:5])
            + ". The config was edited or swapped after saving."
        )
    partial = meta.get("contents") == "without-frozen-backbone"

    if partial:
        model = _rebuild_with_backbone(mc, backbone_weights, allow_download, w_path)
    else:
        model = build_model_from_config(mc, "none")
    expected = {k: v for k, v in model.state_dict().items() if not (partial and k.startswith("backbone."))}
    problems = mismatch_report(expected, tensors)
    if problems:
        raise CheckpointError(" ".join([f"{w_path}: does not match the model described in {cfg_path.name}.", *problems]))
    model.load_state_dict(tensors, strict=False)
    return model.eval(), cfg


def _rebuild_with_backbone(
    mc: dict[str, Any], backbone_weights: str | os.PathLike | None, allow_download: bool, w_path: Path
) -> HybridModel:
    rec = mc.get("backbone_weights") or {}
    want = rec.get("sha256")
    candidates: list[str | os.PathLike | None] = []
    if backbone_weights is not None:
        candidates.append(backbone_weights)
    else:  # the way it was resolved at training time first, so the provenance stays the same
        recorded = rec.get("path") if rec.get("path") and Path(rec["path"]).is_file() else None
        if rec.get("source") == "file" and recorded:
            candidates += [recorded, "default"]
        else:
            candidates += ["default"] + ([recorded] if recorded else [])
    errors = []
    for cand in candidates:
        try:
            model = build_model_from_config(mc, cand, allow_download=allow_download)
        except BackboneWeightsError as exc:
            errors.append(str(exc))
            continue
        got = model.backbone_weights.sha256 if model.backbone_weights else None
        if got == want:
            return model
        errors.append(f"{cand}: backbone weights sha256 {got} differs from the recorded {want}")
    raise CheckpointError(
        f"{w_path}: stores the model without its frozen {mc.get('backbone')} backbone, whose weights "
        f"(sha256 {want}, originally {rec.get('path')}) could not be found; pass backbone_weights=FILE. "
        + " | ".join(errors)
    )
