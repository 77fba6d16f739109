"""The weights file of a trained model: safetensors with the model's identity in its metadata.

``save_weights`` writes the tensors and, in the file's own metadata, the architecture
(``HybridModel.model_config()``) plus whatever identity the caller adds (the run folder adds the
preprocessing, class names and threshold), so the sha256 of this one file covers everything that
changes a prediction. When the backbone is frozen and its weights came from a known file
(pretrained, sha256 recorded), only the non-backbone tensors are stored: the backbone is rebuilt
from its weights file and its sha256 checked against the recorded one, so a run stores ~9 MB
instead of also repeating the backbone (~57 MB for DenseNet169). Otherwise the full state is stored.

``read_identity`` and ``load_weights`` refuse a file whose sha256 differs from the one the caller
expects, a file that is not ours, and tensors that do not fit the architecture, each with a
:class:`~kneeosteo.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from kneeosteo.errors import BackboneWeightsError, CheckpointError
from kneeosteo.models.hybrid import HybridModel, build_model_from_config
from kneeosteo.models.weights import WeightsInfo
from kneeosteo.models.weights_file import META_KEY, PARTIAL, WEIGHTS_FORMAT_VERSION, read_identity, read_weights_file
from kneeosteo.utils.atomic import write_bytes
from kneeosteo.utils.state_dict import mismatch_report

__all__ = ["WEIGHTS_FORMAT_VERSION", "load_weights", "read_identity", "save_weights"]

# the format's constants and the checked read: torch-free, in weights_file (read_identity is re-exported)
_META_KEY, _PARTIAL, _read = META_KEY, PARTIAL, read_weights_file


def _backbone_reproducible(model: HybridModel) -> bool:
    """A frozen backbone whose pretrained weights file is identified (sha256) can be rebuilt,
    whether or not the module is attached (training from cached features may omit it)."""
    w = model.backbone_weights
    return bool(model.use_backbone and model.freeze_backbone and w and w.pretrained and w.sha256)


def save_weights(
    model: HybridModel,
    path: str | os.PathLike,
    identity: dict[str, Any] | None = None,
    *,
    include_backbone: bool | None = None,
) -> str:
    """Write the model's tensors to ``path`` (atomically) with ``{"model": architecture, **identity}``
    in the metadata; returns the file's sha256. ``include_backbone=None`` stores a frozen
    pretrained backbone only when it cannot be rebuilt from its weights file; ``True`` forces it."""
    from safetensors.torch import save as st_save

    from kneeosteo.utils.safetensors_bytes import canonical

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
    meta = {"model": model.model_config(), **(identity or {})}
    data = canonical(
        st_save(
            tensors,
            metadata={
                _META_KEY: json.dumps(meta, sort_keys=True),
                "format_version": str(WEIGHTS_FORMAT_VERSION),
                "contents": _PARTIAL if partial else "full",
            },
        )
    )
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_weights(
    path: str | os.PathLike,
    sha256: str | None = None,
    *,
    backbone_weights: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> HybridModel:
    """Rebuild the model described in the weights file and load it (eval mode).

    For a file without its frozen backbone, the backbone weights are resolved from
    ``backbone_weights``, else the recorded path, else the default sources, and must have the
    recorded sha256.
    """
    from safetensors.torch import load as st_load

    path = Path(path)
    data, meta = _read(path, sha256)
    mc = json.loads(meta[_META_KEY])["model"]
    tensors = st_load(data)
    partial = meta.get("contents") == _PARTIAL
    model = (
        _rebuild_with_backbone(mc, backbone_weights, allow_download, path)
        if partial
        else build_model_from_config(mc, "none")
    )
    expected = {k: v for k, v in model.state_dict().items() if not (partial and k.startswith("backbone."))}
    problems = mismatch_report(expected, tensors)
    if problems:
        raise CheckpointError(" ".join([f"{path}: does not match the model described in its metadata.", *problems]))
    broken = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if broken:  # NaN/inf weights give NaN probabilities, which must never become a label
        raise CheckpointError(
            f"{path}: non-finite values in {', '.join(broken[:5])}"
            + (f" and {len(broken) - 5} more tensors" if len(broken) > 5 else "")
        )
    model.load_state_dict(tensors, strict=False)
    return model.eval()


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


def backbone_weights_of(identity: dict[str, Any]) -> WeightsInfo | None:
    """The backbone weights' provenance recorded in a weights file's identity."""
    rec = identity.get("model", {}).get("backbone_weights")
    return WeightsInfo.from_dict(rec) if rec else None
