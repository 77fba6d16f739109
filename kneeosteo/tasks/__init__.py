"""What the model learns, one class per task: :class:`Binary`, :class:`Multiclass`,
:class:`Regression`. The task's name is read in one place (:func:`task_for`, from a training
config or a run's config); everything else asks the task object instead of comparing names.

A task fixes how many outputs the head ends in, the loss it trains with, how an output becomes an
answer, which classes a run records and how a split's classes are checked:

=============  =========  ============================  =====================================
task           outputs    loss                          answer
=============  =========  ============================  =====================================
binary         1          BCE with logits (the paper)   P(positive) = sigmoid(logit)
multiclass     K          cross-entropy                 P(class) = softmax(logits)
regression     1          Huber (delta 1.0)             the value itself (T-score, BMD)
=============  =========  ============================  =====================================

``--task binary|multiclass`` picks a classification task; ``--target t_score|bmd`` (a column of the
label manifest) makes it a regression, whatever ``--task`` says. The names stay the run folder's
format (``config.json``'s ``task``); torch is imported when a loss or an answer is computed, not
when a task is built, so the configuration and ``--help`` do not load it.

A task also says what a run of it offers, so no other module asks which class it is:
``scoring`` (the key of the tables in ``evaluation``, ``compare`` and ``inference`` that hold the
scorers, paired tests and verdicts of each kind of answer), ``prediction_fields`` and
``format_row`` (``predictions.csv``), ``comparison_lines`` (``compare``'s printout), and the
capability flags below (``has_threshold``, ``paper_metrics``, ``supports_onnx_export``, ...): a
feature that needs one checks the flag, with the one-line message it always gave.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from kneeosteo.choices import CLASSIFICATION_TASKS, TASK_NAMES
from kneeosteo.errors import ConfigError

__all__ = [
    "BINARY_PREDICTION_FIELDS",
    "CLASSIFICATION_TASKS",
    "HUBER_DELTA",
    "TASK_NAMES",
    "Binary",
    "Multiclass",
    "Regression",
    "Task",
    "task_for",
    "task_named",
    "task_name",
]

BINARY_PREDICTION_FIELDS = ("path", "label", "probability", "prediction")  # the paper's predictions.csv
HUBER_DELTA = 1.0  # in target units: one T-score unit, i.e. one standard deviation of young-adult BMD


class Task:
    """One task's behaviour; subclasses override what differs."""

    name: ClassVar[str]
    loss_name: ClassVar[str]
    answer: ClassVar[str]
    target: str = "label"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.target == other.target

    def __hash__(self) -> int:
        return hash((self.name, self.target))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ the model
    def model_entry(self) -> dict:
        """What the model's config (``HybridModel.model_config``) records of the task."""
        return {"task": self.name}

    def outputs(self, n_classes: int) -> int:
        """Width of the head's last layer."""
        return 1

    def loss(self, out, y, weight=None, reduction: str = "mean", smoothing: float = 0.0, gce_q: float = 0.0):
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
        rows = self._loss_rows(out, y, smoothing, gce_q)
        if weight is not None:
            rows = rows * weight
        return rows.sum() if reduction == "sum" else rows.mean()

    def _loss_rows(self, out, y, smoothing: float, gce_q: float):
        raise NotImplementedError

    def answer_of(self, out):
        """Outputs -> P(positive) (B,), class probabilities (B, K), or values (B,)."""
        return out.float()

    def correct(self, answer: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Per-row hits for the history's "accuracy" column: thresholded P(positive), the top
        class, or, for a regression, |error| <= 0.5 target units."""
        raise NotImplementedError

    def head_scaling(self, values: np.ndarray) -> tuple[float, float] | None:
        """(shift, scale) of a new head's output, drawn for this task (``values``: the training
        targets), or None to keep the paper's one-logit head as built."""
        return 0.0, 1.0

    # ------------------------------------------------------------------ the classes
    def merge_positive(self, positive: str) -> str | None:
        """The positive class a ``--merge`` must keep (binary only)."""
        return None

    @property
    def require_binary(self) -> bool:
        """Whether scanning a data set must find exactly two classes."""
        return False

    def check_split_classes(self, classes: Sequence[str]) -> None:
        """ConfigError when a split's classes cannot train this task."""

    def run_classes(self, classes: Sequence[str], positive: str) -> tuple[str, ...]:
        """The classes a run's identity records: (negative, positive), the K classes in index
        order, or none for a regression."""
        return ()

    def expected_classes(self, classes: Sequence[str]) -> list[str] | None:
        """The classes a data set scanned for this run must have (multiclass), or None."""
        return None

    # ------------------------------------------------------------------ what a run of this task offers
    scoring: ClassVar[str]
    """What is scored: ``probability`` (one P(positive)), ``classes`` (K probabilities) or ``value``;
    the key of evaluation's, compare's and predict's one table of scorers, tests and verdicts."""
    has_threshold: ClassVar[bool] = False
    """The answer is one probability called at an operating threshold (the others: top class, value)."""
    paper_metrics: ClassVar[bool] = False
    """Scored with the paper's table (counts at the threshold, AUC; Table I, McNemar, DeLong in reproduce)."""
    supports_shortcut_probes: ClassVar[bool] = False
    """The shortcut probes score metadata classifiers against one binary label."""
    supports_clinical_baselines: ClassVar[bool] = False
    """The clinical baselines (OST, logistic, fused) are compared with P(positive) by DeLong."""
    supports_report: ClassVar[bool] = False
    """`report`'s sections (probes, calibration, the gallery of errors at the threshold) need P(positive)."""
    supports_onnx_export: ClassVar[bool] = False
    """The ONNX graph's outputs are one probability and one logit."""
    supports_dicom_sr: ClassVar[bool] = False
    """The DICOM SR records one probability at a threshold and the positive class's heat map."""
    supports_shift_alarm: ClassVar[bool] = False
    """The batch shift alarm tests calibrated P(positive) against the trust bundle's reference."""
    conformal_output: ClassVar[str] = "sets"
    """What the conformal step gives: prediction ``sets`` of classes, or ``intervals`` around a value."""

    # ------------------------------------------------------------------ evaluate's predictions.csv
    def prediction_fields(self, classes: Sequence[str] = ()) -> tuple[str, ...]:
        """The header of ``predictions.csv`` for a run with ``classes``."""
        raise NotImplementedError

    def format_row(
        self, path: str, truth, answer, classes: Sequence[str] = (), threshold: float = 0.5, low=None, high=None
    ) -> tuple:
        """One row of ``predictions.csv``: ``truth`` (class index or value), ``answer`` (P(positive),
        class probabilities or value), ``low``/``high`` a regression's conformal interval."""
        raise NotImplementedError

    def prediction_table(
        self,
        paths: Sequence[str],
        truth: np.ndarray,
        answers: np.ndarray,
        classes: Sequence[str] = (),
        threshold: float = 0.5,
        interval: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[tuple[str, ...], list[tuple]]:
        """(header, rows) of a scored test set: ``truth`` (class indices or values), ``answers``
        (P(positive), class probabilities or values), a regression's conformal ``interval``."""
        lo, hi = interval if interval is not None else (np.full(len(truth), np.nan),) * 2
        rows = [
            self.format_row(p, t, q, classes, threshold, a, b) for p, t, q, a, b in zip(paths, truth, answers, lo, hi)
        ]
        return self.prediction_fields(classes), rows

    # ------------------------------------------------------------------ compare's printout
    def comparison_lines(self, c: dict) -> list[str]:
        """The lines of ``kneeosteo compare``'s paired tests (``c``: compare_runs' result)."""
        raise NotImplementedError

    def explained_output(self, probabilities: Sequence[float]) -> int:
        """The output Grad-CAM explains for a run without a threshold: the top class, or the one value."""
        return 0

    # ------------------------------------------------------------------ trust (issue 29)
    # Which trust pieces a run of this task fits, stores (trust.json) and applies, by name: the
    # estimator for each name is in one table in the layer that has them (``trust.TRUST_PIECES``:
    # calibration, operating_point, conformal, interval, domain, shift); tasks/ cannot import trust/.
    trust_pieces: ClassVar[tuple[str, ...]] = ("domain",)

    @property
    def has_operating_point(self) -> bool:
        """Whether an answer is one probability at an operating threshold (``TrustBundle.predict``
        answers it, and ``calibrate RUN SITE`` can run its site check), not a task's own answers."""
        return "operating_point" in self.trust_pieces


def _gce(log_p, q: float):
    """Generalised cross-entropy of the log-probability given to the target: (1 - p^q) / q."""
    import torch

    return (1 - torch.exp(q * log_p)) / q


class Binary(Task):
    name = "binary"
    loss_name = "binary cross-entropy with logits"
    answer = "P(positive class)"
    scoring = "probability"
    has_threshold = True
    paper_metrics = True
    supports_shortcut_probes = True
    supports_clinical_baselines = True
    supports_report = True
    supports_onnx_export = True
    supports_dicom_sr = True
    supports_shift_alarm = True

    def _loss_rows(self, out, y, smoothing: float, gce_q: float):
        import torch.nn.functional as F

        target = y * (1 - smoothing) + smoothing / 2 if smoothing else y
        if not gce_q:
            return F.binary_cross_entropy_with_logits(out, target, reduction="none")
        return target * _gce(F.logsigmoid(out), gce_q) + (1 - target) * _gce(F.logsigmoid(-out), gce_q)

    def loss(self, out, y, weight=None, reduction: str = "mean", smoothing: float = 0.0, gce_q: float = 0.0):
        if not gce_q:  # the paper's loss exactly as before (weight inside the reduction)
            import torch.nn.functional as F

            target = y * (1 - smoothing) + smoothing / 2 if smoothing else y
            return F.binary_cross_entropy_with_logits(out, target, weight=weight, reduction=reduction)
        return super().loss(out, y, weight, reduction, smoothing, gce_q)

    def model_entry(self) -> dict:
        return {}  # the paper's binary model's config: unchanged since before tasks existed

    def answer_of(self, out):
        import torch

        return torch.sigmoid(out.float())

    def correct(self, answer: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return (answer >= threshold) == (y >= 0.5)

    def head_scaling(self, values: np.ndarray) -> tuple[float, float] | None:
        return None

    def merge_positive(self, positive: str) -> str | None:
        return positive

    @property
    def require_binary(self) -> bool:
        return True

    def check_split_classes(self, classes: Sequence[str]) -> None:
        if len(classes) != 2:
            raise ConfigError(
                f"the split has {len(classes)} classes ({', '.join(classes)}): "
                "use --task multiclass, or --merge such as osteopenia=normal"
            )

    def run_classes(self, classes: Sequence[str], positive: str) -> tuple[str, ...]:
        return (next(c for c in classes if c != positive), positive)

    def prediction_fields(self, classes: Sequence[str] = ()) -> tuple[str, ...]:
        return BINARY_PREDICTION_FIELDS

    def format_row(self, path, truth, answer, classes=(), threshold=0.5, low=None, high=None) -> tuple:
        return (path, int(truth), f"{answer:.6f}", int(answer >= threshold))

    def comparison_lines(self, c: dict) -> list[str]:
        d, m = c["delong"], c["mcnemar"]
        return [
            f"accuracy {c['accuracy_a']:.3f} vs {c['accuracy_b']:.3f}: exact McNemar p = {m['pvalue']:.4g} "
            f"(b {m['b']}, c {m['c']})",
            f"AUC {d['auc_a']:.3f} vs {d['auc_b']:.3f}: DeLong p = {d['pvalue']:.4g}",
        ]

    # ------------------------------------------------------------------ trust (issue 29)
    trust_pieces = ("calibration", "operating_point", "conformal", "domain", "orientation", "shift")


class Multiclass(Task):
    name = "multiclass"
    loss_name = "cross-entropy over K softmax logits"
    answer = "a probability per class"
    scoring = "classes"

    def outputs(self, n_classes: int) -> int:
        return n_classes

    def _loss_rows(self, out, y, smoothing: float, gce_q: float):
        import torch.nn.functional as F

        if gce_q:
            log_p = F.log_softmax(out.float(), dim=-1).gather(-1, y.long()[:, None])[:, 0]
            return _gce(log_p, gce_q)
        return F.cross_entropy(out, y.long(), reduction="none", label_smoothing=smoothing)

    def answer_of(self, out):
        import torch

        return torch.softmax(out.float(), dim=-1)

    def correct(self, answer: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return np.argmax(answer, axis=-1) == y.astype(int)

    def check_split_classes(self, classes: Sequence[str]) -> None:
        if len(classes) < 2:
            raise ConfigError(f"the split has one class ({', '.join(classes)}): nothing to classify")

    def run_classes(self, classes: Sequence[str], positive: str) -> tuple[str, ...]:
        return tuple(classes)

    def expected_classes(self, classes: Sequence[str]) -> list[str] | None:
        return list(classes)

    def prediction_fields(self, classes: Sequence[str] = ()) -> tuple[str, ...]:
        return ("path", "label", "prediction", *[f"p_{c}" for c in classes])

    def format_row(self, path, truth, answer, classes=(), threshold=0.5, low=None, high=None) -> tuple:
        return (path, classes[truth], classes[int(np.argmax(answer))], *[f"{v:.6f}" for v in answer])

    def comparison_lines(self, c: dict) -> list[str]:
        sm, m = c["stuart_maxwell"], c["mcnemar_correct"]
        lines = [
            f"accuracy {c['accuracy_a']:.3f} vs {c['accuracy_b']:.3f}: exact McNemar p = {m['pvalue']:.4g}",
            f"Stuart-Maxwell (same class frequencies?): statistic {sm['statistic']:.3f}, df {sm['df']}, "
            f"p = {sm['p_value']:.4g}" + (f" ({sm['note']})" if sm.get("note") else ""),
        ]
        return lines + [f"  {name}: one-vs-rest McNemar p = {t['pvalue']:.4g}" for name, t in c["per_class"].items()]

    def explained_output(self, probabilities: Sequence[float]) -> int:
        return int(np.argmax(probabilities)) if len(probabilities) else 0

    # ------------------------------------------------------------------ trust (issue 29)
    trust_pieces = ("calibration", "conformal", "domain")


class Regression(Task):
    name = "regression"
    loss_name = f"Huber (delta {HUBER_DELTA})"
    answer = "the predicted value"
    scoring = "value"
    conformal_output = "intervals"

    def __init__(self, target: str):
        self.target = target

    def __repr__(self) -> str:
        return f"Regression({self.target!r})"

    def _loss_rows(self, out, y, smoothing: float, gce_q: float):
        import torch.nn.functional as F

        return F.huber_loss(out, y, delta=HUBER_DELTA, reduction="none")

    def correct(self, answer: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return np.abs(answer - y) <= 0.5

    def head_scaling(self, values: np.ndarray) -> tuple[float, float] | None:
        y = np.asarray(values, dtype=np.float64)
        return float(y.mean()), float(y.std()) if len(y) > 1 and y.std() > 0 else 1.0

    def prediction_fields(self, classes: Sequence[str] = ()) -> tuple[str, ...]:
        return ("path", self.target, "prediction", "interval_low", "interval_high")

    def format_row(self, path, truth, answer, classes=(), threshold=0.5, low=None, high=None) -> tuple:
        low, high = (np.nan if x is None else x for x in (low, high))
        return (path, f"{truth:.4f}", f"{answer:.4f}", f"{low:.4f}", f"{high:.4f}")

    def comparison_lines(self, c: dict) -> list[str]:
        w = c["wilcoxon_abs_errors"]
        return [
            f"MAE {c['mae_a']:.3f} vs {c['mae_b']:.3f}: Wilcoxon signed-rank on absolute errors p = {w['p_value']:.4g}"
        ]

    # ------------------------------------------------------------------ trust (issue 29)
    trust_pieces = ("interval", "domain")


def task_name(task: str, target: str = "label") -> str:
    """The name of the task a run trains: ``regression`` for a number target, else ``task``."""
    return "regression" if target != "label" else task


def task_named(name: str, target: str = "label") -> Task:
    """The task of a stored name (and a regression's target); ConfigError for an unknown name."""
    name = task_name(name, target)
    if name == "binary":
        return Binary()
    if name == "multiclass":
        return Multiclass()
    if name == "regression":
        return Regression(target)
    raise ConfigError(f"unknown task {name!r} (choose one of {', '.join(TASK_NAMES)})")


def task_for(cfg) -> Task:
    """The task of a training config or a run's config (anything with ``task`` and ``target``)."""
    return task_named(str(getattr(cfg, "task", "binary")), str(getattr(cfg, "target", "label")))
