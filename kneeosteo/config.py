"""Every training setting, declared once, in sections that match the TOML tables, validated where
it is built, loadable from TOML and saved with each run.

Each field carries its default, its help text and its command-line flag
(``dataclasses.field(metadata=...)``, written by :func:`setting`): that one declaration is what
``kneeosteo train --help`` shows, what a ``[model]`` table may hold and what the docs list. A
settings file names them in sections::

    [model]
    backbone = "efficientnet_lite0"
    attention = true

    [optimiser]
    epochs = 30

The old flat form (every key in one ``[train]`` table, or no table at all, as in a run's
``config.json``) keeps loading; :data:`FLAT` maps its keys (``augment``, ``data``, ``epochs``) to
the sections. ``TrainConfig.to_dict()`` stays flat, so a run folder's ``settings`` are as before.

Precedence: command-line option > ``--config run.toml`` > the defaults below. The paper gives
the architecture but not the optimiser settings; the defaults here are common choices for a small
head trained with Adam, not tuned on KOP (tuning on its 27 validation images would overfit them).

The choices (``PRESETS``, ``AUGMENT_MODES``, ``PRECISIONS``, ``DEVICES``, the backbone registry)
are the ones the command line offers, so a value the CLI accepts is one the trainer runs, and an
impossible one (``--precision fp16``, ``--epochs 0``) is a :class:`~kneeosteo.errors.ConfigError`
naming the setting (``runtime.precision``) before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from kneeosteo.choices import CLASSIFICATION_TASKS, PRESETS, REWEIGHTS, TASK_NAMES
from kneeosteo.data.manifest import NUMERIC_COLUMNS, TARGETS
from kneeosteo.errors import ConfigError

__all__ = [
    "AUGMENT_MODES",
    "DEVICES",
    "FLAT",
    "PRECISIONS",
    "PRESETS",
    "REWEIGHTS",
    "SECTIONS",
    "Setting",
    "TrainConfig",
    "load_config",
    "read_settings",
    "settings",
]

AUGMENT_MODES = ("offline", "online", "none")  # offline: the paper's 5 copies; online: fresh per epoch
PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 where the CPU/GPU runs it natively
DEVICES = ("auto", "cpu", "cuda")


def _backbone_names() -> list[str]:
    """The backbone registry (imports torch: called only when a value is checked, never for --help)."""
    from kneeosteo.models import list_backbones

    return list_backbones()


def setting(
    default: Any,
    help: str,
    flag: str | None = "",
    *,
    key: str | None = None,
    choices: tuple[str, ...] | Callable[[], list[str]] | None = None,
    parse: str | None = None,
    metavar: str | None = None,
) -> Any:
    """One setting: its default and help, and how the command line spells it.

    ``flag``: ``""`` for ``--the-field-name``, a declaration such as ``"--attention/--no-attention"``,
    or ``None`` for a setting that only a settings file sets. ``key``: its name in the flat form
    (``config.json``, old ``[train]`` tables) when that is not the field's. ``choices``: what the
    command line offers (a function for a registry that is slow to import). ``parse``: how the
    command line's text becomes the value: ``pair`` (``LOW,HIGH``), ``names`` (comma-separated),
    ``repeat`` (the option repeated, a list) or ``path``.
    """
    meta = {"help": help, "flag": flag, "key": key, "choices": choices, "parse": parse, "metavar": metavar}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSection:
    """What the model learns from, and how each picture is prepared."""

    path: str | None = setting(
        None,
        "Data folder with class sub-folders, or the images a label manifest names.",
        None,  # the DATA argument of `train`
        key="data",
    )
    split: str | None = setting(
        None, "Split JSON; made with the paper protocol (and saved in the run) when absent.", "--split", parse="path"
    )
    fold: int | None = setting(None, "Fold of a k-fold split file.")
    positive: str = setting("osteoporosis", "Name of the positive class folder.")
    labels: str | None = setting(
        None,
        "Label manifest (CSV: path,label[,patient_id,t_score,bmd,side,study_date,...]; paths relative to DATA) "
        "instead of class folders. See docs/own-data.md.",
        parse="path",
    )
    merge: dict = setting(
        {},
        "Merge classes before anything else: CLASS=INTO, such as osteopenia=normal (repeatable).",
        parse="repeat",
    )
    task: str = setting(
        "binary",
        "binary (the paper's; two classes) or multiclass (K classes, softmax head).",
        choices=CLASSIFICATION_TASKS,  # regression follows from target
    )
    target: str = setting(
        "label", "label (classify), or t_score / bmd: regress that manifest column (Huber loss).", choices=TARGETS
    )
    aux_target: str = setting(
        "none",
        "A number of the label manifest or split (t_score, bmd) learned as a second output of the shared head "
        "where a training film has it, beside the task's own target; it shapes the shared layers, predictions "
        "do not use it (none: off).",
        choices=("none", *NUMERIC_COLUMNS),
    )
    classes: tuple = setting(
        (),
        "Class names in index order, comma-separated; a manifest label outside them is left out as unknown.",
        parse="names",
    )
    preprocess: str = setting(
        "paper",
        "paper (stretch to the input size), robust (letterbox), bone (letterbox, all but the bone region "
        "black) or knee (each knee joint's region at 2 plateau widths; use an image size of 384-512).",
        choices=PRESETS,
    )
    clahe: bool = setting(False, "CLAHE contrast equalisation before resizing.", "--clahe/--no-clahe")
    image_size: int = setting(224, "Network input side in px (the paper's: 224).")


@dataclass
class ModelSection:
    """The network: backbone, branches, what trains."""

    backbone: str = setting(
        "efficientnet_lite0",
        "Backbone: efficientnet_lite0 runs offline, densenet169 is the paper's. `kneeosteo backbones` lists them.",
        choices=_backbone_names,
    )
    backbone_weights: str = setting(
        "default", "'default' (package/cache/download), a .pth/.safetensors file, or 'none' (random)."
    )
    attention: bool = setting(
        True, "Use the attention module branch (off: the backbone + head ablation).", "--attention/--no-attention"
    )
    use_backbone: bool = setting(
        True, "Use the backbone branch (off: the attention module + head ablation).", "--use-backbone/--no-backbone"
    )
    finetune: bool = setting(False, "Train the backbone too (no feature cache).", "--finetune/--frozen")
    trainable_stages: int = setting(0, "With --finetune: train only the backbone's last N stages (0: all of it).")


@dataclass
class AugmentSection:
    """Augmentation of the training pictures."""

    mode: str = setting(
        "offline",
        "offline (the paper's: copies made once), online (fresh every epoch), or none.",
        "--augment",
        key="augment",
        choices=AUGMENT_MODES,
    )
    copies: int = setting(5, "Augmented copies per training image with offline augmentation (the paper's: 5).")
    zoom: tuple[float, float] = setting((0.9, 1.2), "Zoom range LOW,HIGH.", parse="pair", metavar="LOW,HIGH")
    crop_fraction: tuple[float, float] = setting(
        (0.8, 1.0), "ROI crop side fraction LOW,HIGH.", parse="pair", metavar="LOW,HIGH"
    )
    rotation: float = setting(15.0, "Rotation range in degrees.")
    source_augment: bool = setting(
        False,
        "With --augment online: also JPEG re-encoding, gamma, blur, noise and flips, against film-source cues.",
        "--source-augment/--no-source-augment",
    )


@dataclass
class OptimiserSection:
    """The loss, Adam and when to stop."""

    epochs: int = setting(30, "Maximum epochs.")
    patience: int = setting(6, "Early-stopping patience on validation loss (epochs).")
    batch_size: int = setting(32, "Batch size.")
    lr: float = setting(3e-4, "Adam learning rate.")
    weight_decay: float = setting(1e-4, "Adam weight decay.", None)
    backbone_lr_scale: float = setting(1.0, "Discriminative learning rate: the backbone learns at lr x this.")
    label_smoothing: float = setting(0.0, "Label smoothing in [0, 0.5] against label noise (0: the paper's targets).")
    gce_q: float = setting(
        0.0,
        "Generalised cross-entropy (1 - p^q)/q with this q in (0, 1] against label noise, instead of "
        "cross-entropy (0: off).",
    )
    aux_weight: float = setting(
        1.0,
        "With data.aux_target: weight of the auxiliary loss (squared error of the standardised value, summed "
        "over the batch's films that have one, divided by the batch size) beside the task's loss.",
    )
    reweight: str = setting(
        "none",
        "none, or metadata: weight each training image by 1 / P(its label | file metadata) against the "
        "source shortcut.",
        choices=REWEIGHTS,
    )


@dataclass
class RuntimeSection:
    """Where the run goes and what runs it."""

    out: str = setting("runs/train", "Run folder.", "--out", parse="path")
    seed: int = setting(0, "Seed of the split, augmentation, initialisation and batch order: same seed, same metrics.")
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda.", choices=DEVICES)
    precision: str = setting(
        "auto", "auto (bf16 where the hardware runs it natively), bf16 or fp32.", choices=PRECISIONS
    )
    channels_last: bool = setting(True, "Channels-last memory layout for the convolutions.", None)


@dataclass
class TrustSection:
    """The trust pieces fitted after training (kneeosteo.experiments.trust_fit)."""

    threshold: float = setting(
        0.5,
        "Decision threshold on the model's raw probability, stored with the weights; the calibrated "
        "operating point (operating_point) is fitted after training.",
        None,
    )
    operating_point: str = setting(
        "0.5",
        "Operating threshold on the calibrated probability, chosen on the validation images: youden, "
        "sensitivity=0.9, specificity=0.9, or a threshold such as 0.5.",
    )
    coverage: float = setting(0.9, "Split-conformal coverage of the prediction sets, in (0, 1).")
    domain_acceptance: float = setting(0.95, "Share of held-out in-domain images the domain check accepts, in (0, 1).")


SECTIONS: dict[str, type] = {
    "data": DataSection,
    "model": ModelSection,
    "augment": AugmentSection,
    "optimiser": OptimiserSection,
    "runtime": RuntimeSection,
    "trust": TrustSection,
}


@dataclass(frozen=True)
class Setting:
    """One row of the settings table: ``section.name``, its flat key, its type and its metadata."""

    section: str
    name: str
    key: str
    type: Any
    default: Any
    help: str
    flag: str | None  # the command-line declaration; None: settings files only
    choices: tuple[str, ...] | Callable[[], list[str]] | None
    parse: str | None
    metavar: str | None

    @property
    def qualified(self) -> str:
        return f"{self.section}.{self.name}"


def _table() -> dict[str, Setting]:
    rows: dict[str, Setting] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
            key = m["key"] or f.name
            flag = "--" + f.name.replace("_", "-") if m["flag"] == "" else m["flag"]
            rows[key] = Setting(
                section, f.name, key, hints[f.name], default, m["help"], flag, m["choices"], m["parse"], m["metavar"]
            )
    return rows


FLAT: dict[str, Setting] = _table()  # flat key (as in config.json) -> its setting


def settings() -> Iterator[Setting]:
    """Every setting, section by section, in declaration order."""
    return iter(FLAT.values())


def _default(cls: type) -> Any:
    return field(default_factory=cls)


@dataclass
class TrainConfig:
    data: DataSection = _default(DataSection)
    model: ModelSection = _default(ModelSection)
    augment: AugmentSection = _default(AugmentSection)
    optimiser: OptimiserSection = _default(OptimiserSection)
    runtime: RuntimeSection = _default(RuntimeSection)
    trust: TrustSection = _default(TrustSection)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        a, d = self.augment, self.data
        a.zoom = tuple(a.zoom)
        a.crop_fraction = tuple(a.crop_fraction)
        self.trust.operating_point = str(self.trust.operating_point)
        d.classes = tuple(d.classes)
        if d.target != "label":  # --target makes a regression whatever --task says: one name for the task
            d.task = "regression"
        from kneeosteo.data.manifest import parse_merge

        d.merge = parse_merge(d.merge)
        self.validate()

    def get(self, qualified: str) -> Any:
        """A setting's value by its ``section.name``."""
        section, name = qualified.split(".")
        return getattr(getattr(self, section), name)

    def validate(self) -> None:
        """Raise ConfigError naming the first setting (``section.name``) that cannot work."""

        def choice(name: str, options) -> None:
            if self.get(name) not in options:
                raise ConfigError(f"{name} = {self.get(name)!r}: choose one of {', '.join(options)}")

        def number(name: str, lo: float, hi: float = math.inf, integer: bool = False) -> None:
            v = self.get(name)
            ok = isinstance(v, int) and not isinstance(v, bool) if integer else isinstance(v, (int, float))
            if not ok or not (math.isfinite(v) and lo <= v <= hi):
                kind = "a whole number" if integer else "a number"
                raise ConfigError(f"{name} = {v!r}: must be {kind} in [{lo}, {hi}]")

        d, m, a, o, t = self.data, self.model, self.augment, self.optimiser, self.trust
        choice("data.preprocess", PRESETS)
        choice("augment.mode", AUGMENT_MODES)
        choice("runtime.precision", PRECISIONS)
        choice("runtime.device", DEVICES)
        choice("optimiser.reweight", REWEIGHTS)
        choice("data.task", TASK_NAMES)
        choice("data.target", TARGETS)
        if d.task == "regression" and d.target == "label":
            raise ConfigError("data.task = 'regression' needs a number target (data.target = t_score or bmd)")
        if d.target != "label" and not d.labels:
            raise ConfigError(
                f"data.target = {d.target!r} needs a label manifest with that column (data.labels = labels.csv)"
            )
        choice("data.aux_target", ("none", *NUMERIC_COLUMNS))
        if d.aux_target != "none" and d.task == "regression":
            raise ConfigError(
                f"data.aux_target = {d.aux_target!r} is for a classification task; this run regresses {d.target}"
            )
        number("optimiser.aux_weight", 0.0, 100.0)
        if d.task != "binary":
            for name, default in (("optimiser.reweight", "none"), ("trust.operating_point", "0.5")):
                if self.get(name) != default:
                    raise ConfigError(f"{name} = {self.get(name)!r} is for the binary task only (this run: {d.task})")
        if d.classes and (len(set(d.classes)) != len(d.classes) or len(d.classes) < 2):
            raise ConfigError(f"data.classes = {list(d.classes)}: give two or more different names")
        choice("model.backbone", _backbone_names())
        number("optimiser.epochs", 1, integer=True)
        number("optimiser.patience", 1, integer=True)
        number("optimiser.batch_size", 2, integer=True)  # BatchNorm cannot train on one sample
        number("augment.copies", 0, 100, integer=True)
        number("data.image_size", 32, 2048, integer=True)
        number("runtime.seed", 0, integer=True)
        number("optimiser.lr", 1e-12, 10.0)
        number("optimiser.weight_decay", 0.0, 10.0)
        number("trust.threshold", 0.0, 1.0)
        number("augment.rotation", 0.0, 180.0)
        number("model.trainable_stages", 0, 64, integer=True)
        number("optimiser.backbone_lr_scale", 1e-6, 10.0)
        number("optimiser.label_smoothing", 0.0, 0.5)
        number("optimiser.gce_q", 0.0, 1.0)
        for name in ("optimiser.label_smoothing", "optimiser.gce_q"):
            if self.get(name) and d.task == "regression":
                raise ConfigError(f"{name} = {self.get(name)} is for classification, not a {d.target} regression")
        if o.label_smoothing and o.gce_q:
            raise ConfigError(
                f"optimiser.label_smoothing = {o.label_smoothing} and optimiser.gce_q = {o.gce_q}: "
                "choose one loss against label noise"
            )
        if m.trainable_stages and not m.finetune:
            raise ConfigError(
                f"model.trainable_stages = {m.trainable_stages} needs model.finetune = true (the backbone is frozen)"
            )
        if a.source_augment and a.mode != "online":
            raise ConfigError(
                f"augment.source_augment = true needs augment.mode = online (it draws per batch), not {a.mode!r}"
            )
        if d.fold is not None:
            number("data.fold", 0, integer=True)
        from kneeosteo.trust.operating_point import parse_operating_point

        parse_operating_point(t.operating_point)
        for name in ("trust.coverage", "trust.domain_acceptance"):
            v = self.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"{name} = {v!r}: must be a number in (0, 1), such as 0.9")
        for name, lo, hi in (("augment.zoom", 0.1, 10.0), ("augment.crop_fraction", 0.05, 1.0)):
            pair = self.get(name)
            if (
                len(pair) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair)
                or not lo <= pair[0] <= pair[1] <= hi
            ):
                raise ConfigError(f"{name} = {pair!r}: must be LOW,HIGH with {lo} <= LOW <= HIGH <= {hi}")
        if not (m.attention or m.use_backbone):
            raise ConfigError(
                "model.attention and model.use_backbone are both off: the model would have no input branch"
            )

    def scan_options(self) -> dict:
        """``data.scan.scan_dataset``'s keywords for this run's labels, merge, target and task."""
        d = self.data
        return {
            "labels": d.labels,
            "merge": d.merge,
            "target": d.target,
            "classes": list(d.classes) or None,
            "require_binary": d.task == "binary",
        }

    def to_dict(self) -> dict:
        """The flat form (``config.json``'s ``settings``): every setting under its flat key."""
        out = {key: self.get(s.qualified) for key, s in FLAT.items()}
        out["extra"] = dict(self.extra)
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "settings") -> TrainConfig:
        """A config from flat keys (``config.json``'s ``settings``, an old ``[train]`` table) and/or
        section tables (``{"model": {"backbone": ...}}``), validated; anything unknown is a ConfigError."""
        return cls._build(_qualified(values), where)

    def replace(self, **flat: Any) -> TrainConfig:
        """A validated copy with some settings changed, named by their flat keys (``out``, ``seed``)."""
        return self.from_dict({**self.to_dict(), **flat})

    @classmethod
    def _build(cls, values: dict[str, Any], where: str) -> TrainConfig:
        """``values``: ``section.name`` (or ``extra``) -> value."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        extra = values.pop("extra", None)
        for qualified, v in values.items():
            section, name = qualified.split(".")
            parts[section][name] = v
        try:
            return cls(
                **{name: SECTIONS[name](**kw) for name, kw in parts.items()},
                extra=dict(extra or {}),
            )
        except TypeError as exc:  # a value of the wrong kind that validation could not even compare
            raise ConfigError(f"{where}: {exc}") from exc


_BY_QUALIFIED = {s.qualified: s for s in FLAT.values()}


def _value(s: Setting, value: Any) -> Any:
    if isinstance(value, list) and s.key != "merge":
        value = tuple(value)
    return value


def _unknown(name: str, valid) -> ConfigError:
    return ConfigError(f"unknown setting '{name}' (valid: {', '.join(valid)})")


def _qualified(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys, ``[train]`` tables and section tables, as ``section.name`` -> value; a setting
    given twice is a ConfigError."""
    out: dict[str, Any] = {}

    def put(s: Setting, v: Any) -> None:
        if s.qualified in out:
            raise ConfigError(f"{s.qualified} is given twice (as '{s.key}' and in [{s.section}])")
        out[s.qualified] = _value(s, v)

    for k, v in values.items():
        if k in SECTIONS and isinstance(v, dict):
            for name, item in v.items():
                s = _BY_QUALIFIED.get(f"{k}.{name}")
                if s is None:
                    valid = [x.name for x in FLAT.values() if x.section == k]
                    raise ConfigError(f"unknown setting '{k}.{name}' (valid in [{k}]: {', '.join(valid)})")
                put(s, item)
        elif k == "train" and isinstance(v, dict):  # the old flat table
            for name, item in _qualified(v).items():
                if name in out:
                    raise ConfigError(f"{name} is given twice")
                out[name] = item
        elif k == "extra":
            out["extra"] = v
        elif k in FLAT:
            put(FLAT[k], v)
        else:
            raise _unknown(k, [*FLAT, "extra", *(f"[{s}]" for s in SECTIONS)])
    return out


def _read(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the settings file ({exc})") from exc
    return _qualified(doc)


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings a TOML file names (either form), under their flat keys: what it sets, without
    the defaults."""
    return {("extra" if q == "extra" else _BY_QUALIFIED[q].key): v for q, v in _read(path).items()}


def load_config(path: str | Path | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """Merge a TOML file (section tables, or the old flat keys / ``[train]`` table) with explicit
    command-line values (flat keys; None = not given)."""
    values: dict = {}
    if path is not None:
        values.update(_read(path))
    values.update(_qualified({k: v for k, v in overrides.items() if v is not None}))
    return TrainConfig._build(values, str(path or "settings"))
