"""One run end to end: train on the split, then score the held-out test set into the run folder.

Training (``kneeosteo.training``) and scoring (``kneeosteo.evaluation``) do not know each other;
this is where they meet, for ``kneeosteo train`` and for every cell of ``reproduce``.
"""

from __future__ import annotations

from pathlib import Path

from kneeosteo.config import TrainConfig
from kneeosteo.training.trainer import train

__all__ = ["train_and_score"]


def train_and_score(cfg: TrainConfig, resume: bool = False, console=print) -> Path:
    """Train ``cfg`` (resuming if asked), score the test set, and return the run folder."""
    return train(cfg, resume=resume, console=console)
