"""The paper's figures for a run: accuracy and loss curves (Fig. 3, 4), confusion matrix (Fig. 5),
ROC; Table I's forest plot; and for the multiclass and regression tasks a K x K confusion matrix,
a Bland-Altman plot and predicted against true values.

Matplotlib's object-oriented API only: each figure is a :class:`matplotlib.figure.Figure` saved
with its own Agg canvas, so importing this module sets no backend and never imports pyplot
(no global figure registry to leak, nothing to close, safe in servers and threads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from kneeosteo.evaluation.regression import bland_altman_limits
from kneeosteo.utils.atomic import atomic_path

__all__ = ["curves", "confusion", "confusion_k", "roc", "forest_plot", "bland_altman", "predicted_vs_true"]


def _figure(**kw) -> Figure:
    fig = Figure(**kw)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save(fig: Figure, path: Path, dpi: int = 120) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def curves(history: list[dict], out: Path) -> None:
    epochs = [int(r["epoch"]) for r in history]
    for key, name, title in (
        ("accuracy", "accuracy.png", "Training and validation accuracy"),
        ("loss", "loss.png", "Training and validation loss"),
    ):
        fig = _figure(figsize=(5, 3.5))
        ax = fig.subplots()
        ax.plot(epochs, [float(r[f"train_{key}"]) for r in history], "o-", label="train")
        ax.plot(epochs, [float(r[f"val_{key}"]) for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, out / name)


def confusion(counts: dict, classes: list[str], out: Path) -> None:
    """The binary confusion matrix (Fig. 5) from ``{"tp", "fp", "fn", "tn"}``, as confusion_matrix.png."""
    m = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    confusion_k(m, classes, out / "confusion_matrix.png")


def confusion_k(matrix, classes: Sequence[str], out_path: Path, title: str = "Confusion matrix (test set)") -> None:
    """A K x K confusion matrix (rows true class, columns predicted), each cell's count written in it."""
    m = np.asarray(matrix)
    k = len(classes)
    if m.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k} x {k} for {k} classes, got shape {m.shape}")
    size = max(4.0, 1.1 * k + 1.5)
    fig = _figure(figsize=(size, size * 0.875))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            color="white" if v > m.max() / 2 else "black",
            fontsize=14 if k <= 3 else 10,
        )
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, Path(out_path))


def roc(y: np.ndarray, prob: np.ndarray, auc: float, out: Path) -> None:
    fig = _figure(figsize=(4, 4))
    ax = fig.subplots()
    if len(set(y.tolist())) == 2:
        fpr, tpr, _ = roc_curve(y, prob)
        ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (test set)")
    ax.legend(loc="lower right")
    _save(fig, out / "roc.png")


def _missing(x) -> bool:
    return x is None or x != x  # None or nan, of any float type


def forest_plot(
    rows: Sequence[Mapping], path: Path, columns: Sequence[tuple[str, str]] = (("accuracy", "accuracy"), ("auc", "AUC"))
) -> None:
    """Table I as a forest plot: per model, ``{col}_mean`` with its ``{col}_ci_low/high`` and the
    paper's ``{col}_paper`` as a red x, one panel per ``(column, title)``. Rows that were not run
    (no ``seeds``) are left out, except the metadata-only reference."""
    shown = [r for r in rows if r.get("seeds") or r["model"] == "metadata-only"]
    fig = _figure(figsize=(5 * len(columns), 0.5 * len(shown) + 1.5))
    axes = np.atleast_1d(fig.subplots(1, len(columns), sharey=True))
    for ax, (col, title) in zip(axes, columns):
        for i, r in enumerate(shown):
            m, lo, hi = r.get(f"{col}_mean"), r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high")
            if _missing(m):
                continue
            err = None if _missing(lo) else [[max(m - lo, 0.0)], [max(hi - m, 0.0)]]
            ax.errorbar(m, i, xerr=err, fmt="o", capsize=3)
            paper = r.get(f"{col}_paper")
            if not _missing(paper):
                ax.plot(paper, i, "rx")
        ax.set_title(f"{title} (95% CI over seeds; x = paper)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(shown)), [r["title"] for r in shown])
    axes[0].invert_yaxis()
    _save(fig, path, dpi=110)


def bland_altman(y_true, y_pred, out_path: Path, target_name: str) -> None:
    """Bland-Altman plot: mean of predicted and true against their difference (predicted - true),
    with the bias and the 95% limits of agreement as labelled horizontal lines."""
    t, p = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_pred, dtype=np.float64).ravel()
    ba = bland_altman_limits(t, p)
    fig = _figure(figsize=(5.5, 4))
    ax = fig.subplots()
    ax.scatter((t + p) / 2, p - t, s=14, alpha=0.7)
    for key, label, style in (("upper", "+1.96 SD", "--"), ("bias", "bias", "-"), ("lower", "-1.96 SD", "--")):
        v = ba[key]["value"]
        ax.axhline(v, linestyle=style, color="crimson" if key == "bias" else "grey")
        ax.annotate(
            f"{label} {v:.2f}",
            xy=(1.0, v),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    ax.set_xlabel(f"mean of predicted and true {target_name}")
    ax.set_ylabel(f"predicted - true {target_name}")
    ax.set_title(f"Bland-Altman ({target_name}, n = {t.size})")
    ax.grid(alpha=0.3)
    _save(fig, Path(out_path))


def predicted_vs_true(y_true, y_pred, out_path: Path, target_name: str, cutoffs: Sequence[float] | None = None) -> None:
    """Scatter of predicted against true values with the identity line; ``cutoffs`` (e.g. the WHO
    T-score cut-offs -1.0 and -2.5) are drawn as dashed lines on both axes."""
    t, p = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_pred, dtype=np.float64).ravel()
    fig = _figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.scatter(t, p, s=14, alpha=0.7)
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="grey", label="identity")
    for i, c in enumerate(cutoffs or ()):
        ax.axvline(c, linestyle="--", color="crimson", linewidth=0.8, label="cut-offs" if i == 0 else None)
        ax.axhline(c, linestyle="--", color="crimson", linewidth=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"true {target_name}")
    ax.set_ylabel(f"predicted {target_name}")
    ax.set_title(f"Predicted vs true {target_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, Path(out_path))
