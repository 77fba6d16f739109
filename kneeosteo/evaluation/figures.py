"""The paper's figures for a run: accuracy and loss curves (Fig. 3, 4), confusion matrix (Fig. 5), ROC."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from kneeosteo.utils.atomic import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def curves(history: list[dict], out: Path) -> None:
    epochs = [int(r["epoch"]) for r in history]
    for key, name, title in (("accuracy", "accuracy.png", "Training and validation accuracy"),
                             ("loss", "loss.png", "Training and validation loss")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(epochs, [float(r[f"train_{key}"]) for r in history], "o-", label="train")
        ax.plot(epochs, [float(r[f"val_{key}"]) for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, out / name)


def confusion(counts: dict, classes: list[str], out: Path) -> None:
    m = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=14)
    ax.set_xticks([0, 1], classes)
    ax.set_yticks([0, 1], classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Confusion matrix (test set)")
    _save(fig, out / "confusion_matrix.png")


def roc(y: np.ndarray, prob: np.ndarray, auc: float, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(4, 4))
    if len(set(y.tolist())) == 2:
        fpr, tpr, _ = roc_curve(y, prob)
        ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (test set)")
    ax.legend(loc="lower right")
    _save(fig, out / "roc.png")
