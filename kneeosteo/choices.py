"""The choices of the settings that live beside heavy code (preprocessing presets, reweighting,
classification tasks), as plain tuples in a module that imports nothing: the configuration and the
command line read them here, so ``kneeosteo --help`` and a bad option are answered without
importing torch, OpenCV or scikit-learn. The modules that act on them re-export them
(``kneeosteo.data.preprocess.PRESETS`` and so on).
"""

from __future__ import annotations

__all__ = ["CLASSIFICATION_TASKS", "PRESETS", "REWEIGHTS", "TASK_NAMES"]

PRESETS = (
    "paper",
    "robust",
    "bone",
    "knee",
)  # data/preprocess.py: the paper's resize, letterbox, bone region, knee region
REWEIGHTS = ("none", "metadata")  # TrainConfig.reweight (data/shortcut.py)
CLASSIFICATION_TASKS = ("binary", "multiclass")  # --task; regression comes from --target (kneeosteo/tasks)
TASK_NAMES = (*CLASSIFICATION_TASKS, "regression")  # the run folder's names (config.json, the weights' identity)
