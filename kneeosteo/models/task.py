"""What the model learns, as one table: binary, multiclass or regression.

A task fixes how many outputs the head ends in, the loss it trains with, and how an output
becomes an answer. Everything above (trainer, evaluate, predict) asks this table instead of
assuming the paper's one sigmoid logit:

=============  =========  ============================  =====================================
task           outputs    loss                          answer
=============  =========  ============================  =====================================
binary         1          BCE with logits (the paper)   P(positive) = sigmoid(logit)
multiclass     K          cross-entropy                 P(class) = softmax(logits)
regression     1          Huber (delta 1.0)             the value itself (T-score, BMD)
=============  =========  ============================  =====================================

``--task binary|multiclass`` picks a classification task; ``--target t_score|bmd`` (a column of the
label manifest) makes it a regression, whatever ``--task`` says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kneeosteo.choices import CLASSIFICATION_TASKS  # re-exported: --task
from kneeosteo.errors import ConfigError

__all__ = ["CLASSIFICATION_TASKS", "HUBER_DELTA", "TASKS", "TaskSpec", "get_task", "task_of"]

HUBER_DELTA = 1.0  # in target units: one T-score unit, i.e. one standard deviation of young-adult BMD


@dataclass(frozen=True)
class TaskSpec:
    name: str
    loss_name: str
    answer: str

    def outputs(self, n_classes: int) -> int:
        """Width of the head's last layer."""
        return n_classes if self.name == "multiclass" else 1

    def loss(
        self,
        out: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        smoothing: float = 0.0,
        gce_q: float = 0.0,
    ) -> torch.Tensor:
        """The training loss of outputs ``out`` ((B,) or (B, K)) against targets ``y`` (float:
        0/1, a class index, or a value); ``weight``: per-row loss weights or None.
        ``smoothing`` (label smoothing, Szegedy et al. 2016): a classification target is moved
        that far towards the uniform distribution (binary: 1 -> 1 - s/2, 0 -> s/2, as
        ``F.cross_entropy(label_smoothing=s)`` does for two classes), so a mislabelled film
        cannot push its logit without bound.
        ``gce_q`` > 0 (classification): the generalised cross-entropy of Zhang & Sabuncu (2018),
        (1 - p^q) / q for p the probability given to the target class, instead of -log p: q -> 0
        is cross-entropy, q = 1 the mean absolute error, which a mislabelled film pulls on with a
        bounded gradient."""
        if self.name == "binary":
            target = y * (1 - smoothing) + smoothing / 2 if smoothing else y
            if not gce_q:
                return F.binary_cross_entropy_with_logits(out, target, weight=weight, reduction=reduction)
            rows = target * _gce(F.logsigmoid(out), gce_q) + (1 - target) * _gce(F.logsigmoid(-out), gce_q)
        elif self.name == "multiclass":
            if gce_q:
                log_p = F.log_softmax(out.float(), dim=-1).gather(-1, y.long()[:, None])[:, 0]
                rows = _gce(log_p, gce_q)
            else:
                rows = F.cross_entropy(out, y.long(), reduction="none", label_smoothing=smoothing)
        else:
            rows = F.huber_loss(out, y, delta=HUBER_DELTA, reduction="none")
        if weight is not None:
            rows = rows * weight
        return rows.sum() if reduction == "sum" else rows.mean()

    def answer_of(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs -> P(positive) (B,), class probabilities (B, K), or values (B,)."""
        out = out.float()
        if self.name == "binary":
            return torch.sigmoid(out)
        if self.name == "multiclass":
            return torch.softmax(out, dim=-1)
        return out

    def correct(self, answer, y, threshold: float = 0.5):
        """Per-row hits for the history's "accuracy" column (numpy): thresholded P(positive), the
        top class, or, for a regression, |error| <= 0.5 target units."""
        if self.name == "binary":
            return (answer >= threshold) == (y >= 0.5)
        if self.name == "multiclass":
            return np.argmax(answer, axis=-1) == y.astype(int)
        return np.abs(answer - y) <= 0.5


def _gce(log_p: torch.Tensor, q: float) -> torch.Tensor:
    """Generalised cross-entropy of the log-probability given to the target: (1 - p^q) / q."""
    return (1 - torch.exp(q * log_p)) / q


TASKS = {
    t.name: t
    for t in (
        TaskSpec("binary", "binary cross-entropy with logits", "P(positive class)"),
        TaskSpec("multiclass", "cross-entropy over K softmax logits", "a probability per class"),
        TaskSpec("regression", f"Huber (delta {HUBER_DELTA})", "the predicted value"),
    )
}


def task_of(task: str, target: str = "label") -> str:
    """The task a run trains: ``regression`` for a number target, else ``task``."""
    return "regression" if target != "label" else task


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r} (choose one of {', '.join(TASKS)})") from None
