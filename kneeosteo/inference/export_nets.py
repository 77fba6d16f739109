"""The graph ``kneeosteo export`` traces (torch modules): kept apart from
:mod:`kneeosteo.inference.export`, so running an export with ONNX Runtime never imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from kneeosteo.models.hybrid import HybridModel

__all__ = ["ExportNet", "ProbabilityNet"]


class ProbabilityNet(nn.Module):
    """images -> sigmoid(logit): the exported graph, so ONNX users get probabilities directly."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images=images).float())


class ExportNet(nn.Module):
    """The exported graph: images -> (probability, logit[, features]). The logit feeds the
    calibration, the frozen backbone's pooled features the domain check (issue 15)."""

    def __init__(self, model: HybridModel):
        super().__init__()
        self.model = model
        self.with_features = model.use_backbone and model.backbone is not None

    def output_names(self) -> list[str]:
        return ["probability", "logit", "features"] if self.with_features else ["probability", "logit"]

    def forward(self, images: torch.Tensor):
        feats = self.model.extract_features(images) if self.with_features else None
        z = self.model(images=images, features=feats).float()
        if feats is None:
            return torch.sigmoid(z), z
        return torch.sigmoid(z), z, feats.float()
