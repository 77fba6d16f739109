"""Every training setting in one dataclass, loadable from TOML and saved with each run.

Precedence: command-line option > ``--config run.toml`` > the defaults below. The paper gives
the architecture but not the optimiser settings; the defaults here are common choices for a small
head trained with Adam, not tuned on KOP (tuning on its 27 validation images would overfit them).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainConfig:
    data: str | None = None
    out: str = "runs/train"
    split: str | None = None  # split.json; made on the fly with the paper protocol when absent
    fold: int | None = None  # for k-fold split files
    positive: str = "osteoporosis"
    backbone: str = "efficientnet_lite0"
    backbone_weights: str = "default"  # "default" (cache/package/download), a file, or "none"
    attention: bool = True  # the AM branch (False = backbone + head ablation)
    use_backbone: bool = True  # False = AM + head ablation
    finetune: bool = False  # train the backbone too (no feature cache)
    preprocess: str = "paper"  # paper | robust
    clahe: bool = False
    image_size: int = 224
    augment: str = "offline"  # offline (paper, 5 copies) | online | none
    copies: int = 5
    zoom: tuple[float, float] = (0.9, 1.2)
    crop_fraction: tuple[float, float] = (0.8, 1.0)
    rotation: float = 15.0
    epochs: int = 30
    patience: int = 6  # early stopping on validation loss
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    seed: int = 0
    threshold: float = 0.5
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where the CPU/GPU has it) | bf16 | fp32
    channels_last: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, value):
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(name)
    if f is None:
        raise ValueError(f"unknown setting '{name}' (valid: {', '.join(TrainConfig.__dataclass_fields__)})")
    if isinstance(value, list):
        value = tuple(value)
    return value


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Merge a TOML file (flat keys, as in ``config.json``) with explicit command-line values."""
    values: dict = {}
    if path is not None:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
        values.update({k: _coerce(k, v) for k, v in doc.get("train", doc).items()})
    values.update({k: _coerce(k, v) for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
