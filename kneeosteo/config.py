"""Every training setting in one dataclass, validated where it is built, loadable from TOML and
saved with each run.

Precedence: command-line option > ``--config run.toml`` > the defaults below. The paper gives
the architecture but not the optimiser settings; the defaults here are common choices for a small
head trained with Adam, not tuned on KOP (tuning on its 27 validation images would overfit them).

The choices (``PRESETS``, ``AUGMENT_MODES``, ``PRECISIONS``, ``DEVICES``, the backbone registry)
are the ones the command line offers, so a value the CLI accepts is one the trainer runs, and an
impossible one (``--precision fp16``, ``--epochs 0``) is a :class:`~kneeosteo.errors.ConfigError`
naming the setting before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from kneeosteo.choices import PRESETS, REWEIGHTS, TASK_NAMES
from kneeosteo.data.manifest import TARGETS
from kneeosteo.errors import ConfigError

__all__ = ["AUGMENT_MODES", "DEVICES", "PRECISIONS", "PRESETS", "REWEIGHTS", "TrainConfig", "load_config"]

AUGMENT_MODES = ("offline", "online", "none")  # offline: the paper's 5 copies; online: fresh per epoch
PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the CPU/GPU runs it natively
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    data: str | None = None
    out: str = "runs/train"
    split: str | None = None  # split.json; made on the fly with the paper protocol when absent
    fold: int | None = None  # for k-fold split files
    positive: str = "osteoporosis"
    labels: str | None = None  # a label manifest (data/manifest.py); None = class folders
    merge: dict = field(default_factory=dict)  # {"osteopenia": "normal"}: classes merged before anything else
    task: str = "binary"  # binary | multiclass | regression (kneeosteo/tasks); target != label makes it regression
    target: str = "label"  # label (classification) | t_score | bmd (regression on that manifest column)
    classes: tuple = ()  # class names in index order; empty = found in the data
    backbone: str = "efficientnet_lite0"
    backbone_weights: str = "default"  # "default" (cache/package/download), a file, or "none"
    attention: bool = True  # the AM branch (False = backbone + head ablation)
    use_backbone: bool = True  # False = AM + head ablation
    finetune: bool = False  # train the backbone too (no feature cache)
    trainable_stages: int = 0  # with finetune: train only the backbone's last N stages (0 = all of it)
    backbone_lr_scale: float = 1.0  # discriminative learning rate: the backbone learns at lr x this
    preprocess: str = "paper"  # paper | robust (letterbox) | bone (letterbox, all but the bone region black) | knee (the joint's region)
    clahe: bool = False
    image_size: int = 224
    augment: str = "offline"  # offline (paper, 5 copies) | online | none
    copies: int = 5
    zoom: tuple[float, float] = (0.9, 1.2)
    crop_fraction: tuple[float, float] = (0.8, 1.0)
    rotation: float = 15.0
    source_augment: bool = False  # with augment = online: JPEG re-encoding, gamma, blur, noise, flips
    label_smoothing: float = 0.0  # classification targets moved towards uniform by this much (label noise)
    gce_q: float = 0.0  # > 0: generalised cross-entropy (1 - p^q) / q instead of cross-entropy (label noise)
    epochs: int = 30
    patience: int = 6  # early stopping on validation loss
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    seed: int = 0
    threshold: float = 0.5
    reweight: str = "none"  # none | metadata: inverse-propensity weights against the file-metadata shortcut
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where the CPU/GPU has it) | bf16 | fp32
    channels_last: bool = True
    # trust (issue 15), fitted after training: see kneeosteo.experiments.trust_fit
    operating_point: str = "0.5"  # youden | sensitivity=X | specificity=X | a threshold
    coverage: float = 0.9  # split-conformal coverage
    domain_acceptance: float = 0.95  # share of held-out in-domain images the domain check accepts
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.zoom = tuple(self.zoom)
        self.crop_fraction = tuple(self.crop_fraction)
        self.operating_point = str(self.operating_point)
        self.classes = tuple(self.classes)
        if self.target != "label":  # --target makes a regression whatever --task says: one name for the task
            self.task = "regression"
        from kneeosteo.data.manifest import parse_merge

        self.merge = parse_merge(self.merge)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work."""
        from kneeosteo.models import list_backbones

        def choice(name: str, options) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: choose one of {', '.join(options)}")

        def number(name: str, lo: float, hi: float = math.inf, integer: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) if integer else isinstance(v, (int, float))
            if not ok or not (math.isfinite(v) and lo <= v <= hi):
                kind = "a whole number" if integer else "a number"
                raise ConfigError(f"{name} = {v!r}: must be {kind} in [{lo}, {hi}]")

        choice("preprocess", PRESETS)
        choice("augment", AUGMENT_MODES)
        choice("precision", PRECISIONS)
        choice("device", DEVICES)
        choice("reweight", REWEIGHTS)
        choice("task", TASK_NAMES)
        choice("target", TARGETS)
        if self.task == "regression" and self.target == "label":
            raise ConfigError("task = 'regression' needs a number target (target = t_score or bmd)")
        if self.target != "label" and not self.labels:
            raise ConfigError(f"target = {self.target!r} needs a label manifest with that column (labels = labels.csv)")
        if self.task != "binary":
            for name, default in (("reweight", "none"), ("operating_point", "0.5")):
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{name} = {getattr(self, name)!r} is for the binary task only (this run: {self.task})"
                    )
        if self.classes and (len(set(self.classes)) != len(self.classes) or len(self.classes) < 2):
            raise ConfigError(f"classes = {list(self.classes)}: give two or more different names")
        choice("backbone", list_backbones())
        number("epochs", 1, integer=True)
        number("patience", 1, integer=True)
        number("batch_size", 2, integer=True)  # BatchNorm cannot train on one sample
        number("copies", 0, 100, integer=True)
        number("image_size", 32, 2048, integer=True)
        number("seed", 0, integer=True)
        number("lr", 1e-12, 10.0)
        number("weight_decay", 0.0, 10.0)
        number("threshold", 0.0, 1.0)
        number("rotation", 0.0, 180.0)
        number("trainable_stages", 0, 64, integer=True)
        number("backbone_lr_scale", 1e-6, 10.0)
        number("label_smoothing", 0.0, 0.5)
        number("gce_q", 0.0, 1.0)
        for name in ("label_smoothing", "gce_q"):
            if getattr(self, name) and self.task == "regression":
                raise ConfigError(
                    f"{name} = {getattr(self, name)} is for classification, not a {self.target} regression"
                )
        if self.label_smoothing and self.gce_q:
            raise ConfigError(
                f"label_smoothing = {self.label_smoothing} and gce_q = {self.gce_q}: choose one loss against label noise"
            )
        if self.trainable_stages and not self.finetune:
            raise ConfigError(
                f"trainable_stages = {self.trainable_stages} needs finetune = true (the backbone is frozen)"
            )
        if self.source_augment and self.augment != "online":
            raise ConfigError(
                f"source_augment = true needs augment = online (it draws per batch), not {self.augment!r}"
            )
        if self.fold is not None:
            number("fold", 0, integer=True)
        from kneeosteo.trust.operating_point import parse_operating_point

        parse_operating_point(self.operating_point)
        for name in ("coverage", "domain_acceptance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"{name} = {v!r}: must be a number in (0, 1), such as 0.9")
        for name, lo, hi in (("zoom", 0.1, 10.0), ("crop_fraction", 0.05, 1.0)):
            pair = getattr(self, name)
            if (
                len(pair) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair)
                or not lo <= pair[0] <= pair[1] <= hi
            ):
                raise ConfigError(f"{name} = {pair!r}: must be LOW,HIGH with {lo} <= LOW <= HIGH <= {hi}")
        if not (self.attention or self.use_backbone):
            raise ConfigError("attention and use_backbone are both off: the model would have no input branch")

    def scan_options(self) -> dict:
        """``data.scan.scan_dataset``'s keywords for this run's labels, merge, target and task."""
        return {
            "labels": self.labels,
            "merge": self.merge,
            "target": self.target,
            "classes": list(self.classes) or None,
            "require_binary": self.task == "binary",
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, value):
    if name not in TrainConfig.__dataclass_fields__:
        raise ConfigError(f"unknown setting '{name}' (valid: {', '.join(TrainConfig.__dataclass_fields__)})")
    if isinstance(value, list) and name != "merge":
        value = tuple(value)
    return value


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Merge a TOML file (flat keys, as in ``config.json``) with explicit command-line values."""
    values: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the settings file ({exc})") from exc
        values.update({k: _coerce(k, v) for k, v in doc.get("train", doc).items()})
    values.update({k: _coerce(k, v) for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # a value of the wrong kind that validation could not even compare
        raise ConfigError(f"{path or 'settings'}: {exc}") from exc
