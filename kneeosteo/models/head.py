"""The paper's fully connected classification head on the fused features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ClassifierHead"]


class ClassifierHead(nn.Module):
    """Hidden blocks of Linear -> BatchNorm1d -> Dropout -> ReLU, then Linear(-> outputs): one logit
    (or one per class for a multiclass task, or the value of a regression; ``kneeosteo/tasks``).

    The block order is the paper's. Dropout before ReLU is mathematically the same as after it
    (dropout multiplies by 0 or a positive scale, which commutes with ReLU), so following the
    paper costs nothing. The Linear bias before BatchNorm is redundant but kept (Keras' default,
    what the paper used). Returns (B, 1) logits; apply the sigmoid outside (train with
    BCE-with-logits). BatchNorm1d needs batches of >= 2 in train mode: drop the last batch
    of an epoch if it could hold a single sample.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (1024, 512, 256, 128),
        dropout: Sequence[float] = (0.5, 0.3, 0.2, 0.1),
        outputs: int = 1,
        output_shift: float = 0.0,
        output_scale: float = 1.0,
        aux_outputs: int = 0,
    ):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        dropout = tuple(float(p) for p in dropout)
        if len(hidden) != len(dropout):
            raise ValueError(f"hidden {hidden} and dropout {dropout} must have the same length")
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = int(in_features)
        self.hidden = hidden
        self.dropout = dropout
        layers: list[nn.Module] = []
        prev = self.in_features
        for width, p in zip(hidden, dropout):
            layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.Dropout(p), nn.ReLU()]
            prev = width
        self.layers = nn.Sequential(*layers)
        if outputs < 1:
            raise ValueError(f"outputs must be >= 1, got {outputs}")
        self.outputs = int(outputs)  # 1: a logit or a value; K: one logit per class (kneeosteo/tasks)
        self.out = nn.Linear(prev, self.outputs)
        # a regression answers in target units: out * scale + shift, with the training targets'
        # mean and standard deviation, so the freshly initialised head starts near the mean
        self.output_shift, self.output_scale = float(output_shift), float(output_scale)
        # an auxiliary output (``data.aux_target``, a T-score where one is known) read from the same
        # last hidden layer as ``out``, so learning it shapes the layers both share (multi-task heads);
        # training uses it, predictions do not
        if aux_outputs < 0:
            raise ValueError(f"aux_outputs must be >= 0, got {aux_outputs}")
        self.aux = nn.Linear(prev, int(aux_outputs)) if aux_outputs else None

    def config(self) -> dict:
        extra = {"outputs": self.outputs} if self.outputs != 1 else {}  # a one-output head's config is unchanged
        if (self.output_shift, self.output_scale) != (0.0, 1.0):
            extra.update(output_shift=self.output_shift, output_scale=self.output_scale)
        if self.aux is not None:
            extra["aux_outputs"] = self.aux.out_features
        return {"in_features": self.in_features, "hidden": list(self.hidden), "dropout": list(self.dropout), **extra}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(x)[0]

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the outputs, the auxiliary outputs or None without an auxiliary head)."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"ClassifierHead expects (B, {self.in_features}), got {tuple(x.shape)}")
        h = self.layers(x)
        y = self.out(h)
        if (self.output_shift, self.output_scale) != (0.0, 1.0):
            y = y * self.output_scale + self.output_shift
        return y, (None if self.aux is None else self.aux(h))
