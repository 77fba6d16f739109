"""The run folder, kneeosteo's central artifact, as a type (MONAI-bundle style: a fixed, typed layout).

``kneeosteo train`` writes one; ``evaluate``, ``predict``, ``explain``, ``export``, ``serve`` and
``reproduce`` read it, all through :class:`RunDir`. Nobody else spells its file names or parses
its ``config.json``. The bundled default model is just a ``RunDir`` at a packaged path.

``config.json`` (format ``kneeosteo-run``, version 3; version 2 folders still load)::

    {"format": "kneeosteo-run", "format_version": 3,
     "weights_file": "model.safetensors", "weights_sha256": "<sha256 of that file>",
     "identity": {"model": {architecture}, "preprocess": {preset, size, mean, std, clahe},
                  "classes": [negative, positive], "threshold": 0.5},
     "settings": {every training setting, as asked},
     "record": {split sizes, backbone weights, precision, environment, best epoch, ...}}

``identity`` is everything that changes a prediction. It is stored once more *inside* the
weights file's own metadata, so the recorded sha256 covers it: reading a run checks the file's
sha256, then that config.json's identity is the one in the file, then that every value is in
range. An edited mean, threshold or class name is refused with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kneeosteo import __version__
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.errors import CheckpointError
from kneeosteo.utils.atomic import atomic_path, write_json
from kneeosteo.utils.hashing import sha256_file

if TYPE_CHECKING:
    from kneeosteo.trust import TrustBundle

__all__ = ["RUN_FILES", "ModelInfo", "RunConfig", "RunDir"]

FORMAT = "kneeosteo-run"
FORMAT_VERSION = 3  # 3: every task's trust in trust.json (issue 29); 2: a task run's in record + domain.json
READ_VERSIONS = (2, 3)  # what this version reads

# Every file a run folder may hold, with what it is; docs/cli.md's table (`train`) is this one (a test checks).
RUN_FILES = {
    "config.json": "`identity` (what changes a prediction: architecture, preprocessing, class names, threshold), "
    "`settings` (every training setting as asked), `record` (split sizes, backbone weights' source "
    "and sha256, precision, environment, best epoch), the sha256 of `model.safetensors`",
    "model.safetensors": "the best epoch's weights (AM + head; a frozen pretrained backbone is rebuilt from its "
    "verified weights file, not duplicated), with the identity in its metadata",
    "split.json": "the split used",
    "history.csv": "per epoch: `epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,seconds`",
    "metrics.json": "test metrics with intervals (see `evaluate`)",
    "predictions.csv": "`path,label,probability,prediction` per test image, path relative to DATA",
    "accuracy.png": "training and validation accuracy per epoch (the paper's Fig. 3)",
    "loss.png": "training and validation loss per epoch (the paper's Fig. 4)",
    "confusion_matrix.png": "the test confusion matrix (the paper's Fig. 5)",
    "roc.png": "the test ROC curve with its AUC",
    "trust.json": "the fitted trust pieces of any task (format `kneeosteo-trust/2`): temperature, operating point "
    "and threshold, conformal coverage (sets or a regression's interval), domain-check method and threshold, "
    "the shift reference, what each was fitted on, and the sha256 of `trust.safetensors` and of the weights; "
    "its own sha256 is in config.json's record",
    "trust.safetensors": "the trust arrays: conformal quantiles and calibration scores, the domain check's mean, "
    "scale and shrunk inverse covariance, the shift reference (float64)",
    "domain.json": "read only, in a folder of format 2: a multiclass or regression run's domain check (now in "
    "trust.json)",
    "domain.safetensors": "read only, in a folder of format 2: that domain check's arrays",
    "fused.json": "the fused model (image + covariates, issue 31; `evaluate --store-fused`): standardised logistic "
    "coefficients as plain numbers, the covariates it takes, the weights' sha256 and the films it was fitted on; "
    "its own sha256 is in config.json's record",
    "calibration.png": "reliability diagram of the test probabilities, raw and calibrated (`evaluate`)",
    "decision_curve.png": "net benefit of the calibrated model against treat-all and treat-none (`evaluate`)",
    "checkpoint/": "last epoch's state for `--resume` (one atomic safetensors file, and a readable state.json)",
    "evaluations/NAME/": "scores on another data set or split (`evaluate RUN DATA`)",
    "MODEL_CARD.md": "the bundled model's card (`scripts/bundle_default_model.py`)",
}
# No model.onnx: an export found in a run folder is never trusted (it could have been planted);
# exports live in the cache, keyed by the weights' sha256, with their own sha256 beside them.


@dataclass(frozen=True)
class ModelInfo:
    """What a prediction needs to know about a model: read from a run folder or an ONNX export."""

    model_id: str
    preprocess: Preprocess
    threshold: float
    negative: str
    positive: str
    backbone: str = ""
    weights_sha256: str = ""  # the exact weights; an ONNX export records it and is checked against it

    def label(self, probability: float, threshold: float | None = None) -> str:
        t = self.threshold if threshold is None else threshold
        return self.positive if probability >= t else self.negative


@dataclass(frozen=True)
class RunConfig:
    """The typed content of a run's config.json (see the module docstring)."""

    model: dict
    preprocess: Preprocess
    classes: tuple[str, ...]  # binary: (negative, positive); multiclass: index order; regression: ()
    threshold: float
    weights_sha256: str
    settings: dict
    record: dict
    task: str = "binary"  # binary | multiclass | regression (kneeosteo/tasks)
    target: str = "label"  # a regression's number (t_score, bmd)

    @property
    def negative(self) -> str:
        return self.classes[0] if self.classes else ""

    @property
    def positive(self) -> str:
        return self.classes[-1] if self.classes else ""

    @property
    def backbone(self) -> str:
        return str(self.model.get("backbone", ""))

    def identity(self) -> dict[str, Any]:
        return identity(self.preprocess, self.classes, self.threshold, self.task, self.target)


def identity(
    preprocess: Preprocess, classes, threshold: float, task: str = "binary", target: str = "label"
) -> dict[str, Any]:
    """The prediction-changing settings stored with the weights (besides the architecture).
    A binary run's identity has no task/target keys (the paper's; unchanged since format 2)."""
    p = asdict(preprocess)
    p["mean"], p["std"] = list(p["mean"]), list(p["std"])
    extra = {} if task == "binary" else {"task": task, "target": target}
    return {"preprocess": p, "classes": list(classes), "threshold": float(threshold), **extra}


def _checked(doc: dict, where: Path) -> tuple[Preprocess, tuple[str, ...], float]:
    """The identity's values, or CheckpointError naming the file and the value out of range."""
    try:
        p = doc["preprocess"]
        mean, std = tuple(float(v) for v in p["mean"]), tuple(float(v) for v in p["std"])
        prep = Preprocess(str(p["preset"]), int(p["size"]), mean, std, bool(p["clahe"]))
        classes = tuple(str(c) for c in doc["classes"])
        task = str(doc.get("task", "binary"))
        if task == "binary":
            negative, positive = classes
        threshold = float(doc["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: incomplete or malformed identity ({type(exc).__name__}: {exc})") from exc
    problems = []
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std):
        problems.append(f"mean {list(mean)} / std {list(std)} must be 3 finite numbers each")
    elif not all(v > 0 for v in std):
        problems.append(f"std {list(std)} must be positive")
    if not 1 <= prep.size <= 4096:
        problems.append(f"size {prep.size} out of [1, 4096]")
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        problems.append(f"threshold {threshold} out of [0, 1]")
    if task not in ("binary", "multiclass", "regression"):
        problems.append(f"task {task!r} unknown")
    elif task != "regression" and (not all(classes) or len(set(classes)) != len(classes) or len(classes) < 2):
        problems.append(f"classes {list(classes)} must be two or more different names")
    elif task == "regression" and classes:
        problems.append(f"a regression has no classes, found {list(classes)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    return prep, classes, threshold


class RunDir:
    """A run folder: its paths, its verified config, its model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---------------------------------------------------------------------------- the layout
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def weights_file(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def split_file(self) -> Path:
        return self.path / "split.json"

    @property
    def history_file(self) -> Path:
        return self.path / "history.csv"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def predictions_file(self) -> Path:
        return self.path / "predictions.csv"

    @property
    def trust_file(self) -> Path:
        return self.path / "trust.json"

    @property
    def trust_tensors_file(self) -> Path:
        return self.path / "trust.safetensors"

    @property
    def domain_file(self) -> Path:
        return self.path / "domain.json"

    @property
    def domain_tensors_file(self) -> Path:
        return self.path / "domain.safetensors"

    @property
    def card_file(self) -> Path:
        return self.path / "MODEL_CARD.md"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def state_file(self) -> Path:
        """Everything ``--resume`` needs, in one atomic safetensors file."""
        return self.checkpoint_dir / "last.safetensors"

    @property
    def state_json(self) -> Path:
        """A readable copy of the resume state."""
        return self.checkpoint_dir / "state.json"

    def evaluation_dir(self, name: str) -> Path:
        return self.path / "evaluations" / name

    def is_run(self) -> bool:
        return self.config_file.is_file()

    # ---------------------------------------------------------------------------- finding one
    @classmethod
    def bundled(cls) -> RunDir:
        """The default model shipped in ``kneeosteo/assets/default_model/``."""
        folder = resources.files("kneeosteo").joinpath("assets", "default_model")
        missing = [f for f in ("config.json", "model.safetensors") if not folder.joinpath(f).is_file()]
        if missing:
            raise CheckpointError(
                f"no bundled default model in this installation ({', '.join(missing)} missing in "
                "kneeosteo/assets/default_model/); pass --run RUN, a folder written by `kneeosteo train`"
            )
        if not isinstance(folder, Path):  # e.g. a zipped install: the loaders need real files
            raise CheckpointError(
                "the bundled default model is not on the file system (zipped install?); pass --run RUN"
            )
        return cls(folder)

    @classmethod
    def open(cls, run: str | Path | RunDir | None) -> RunDir:
        """``run`` (checked to be a run folder), or the bundled default model when it is None."""
        if run is None:
            return cls.bundled()
        rd = run if isinstance(run, RunDir) else cls(run)
        if not rd.is_run():
            raise CheckpointError(
                f"{rd.path}: not a run folder (no config.json); pass a folder written by `kneeosteo train`"
            )
        return rd

    # ---------------------------------------------------------------------------- reading
    @functools.cached_property
    def config(self) -> RunConfig:
        """config.json, read once, with the weights file's sha256 and identity verified."""
        from kneeosteo.models.weights_file import read_identity

        for f in (self.config_file, self.weights_file):
            if f.exists() and not f.is_file():  # a FIFO or device would block the read forever
                raise CheckpointError(f"{f}: not a regular file")
        try:
            doc = json.loads(self.config_file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.config_file}: missing; not a run folder") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.config_file}: unreadable ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"{self.config_file}: not a {FORMAT} config")
        if doc.get("format_version") not in READ_VERSIONS:
            raise CheckpointError(
                f"{self.config_file}: format_version {doc.get('format_version')} "
                f"(this kneeosteo reads {' and '.join(map(str, READ_VERSIONS))}); retrain the model with this version"
            )
        sha = doc.get("weights_sha256")
        if not isinstance(sha, str) or not isinstance(doc.get("identity"), dict):
            raise CheckpointError(f"{self.config_file}: no weights_sha256 or identity recorded")
        stored = read_identity(self.weights_file, sha)  # the sha256 covers the identity inside the file
        diffs = _diff(doc["identity"], stored)
        if diffs:
            raise CheckpointError(
                f"{self.config_file} and {self.weights_file.name} disagree: "
                + "; ".join(diffs[:5])
                + ". The config was edited or swapped after training."
            )
        prep, classes, threshold = _checked(stored, self.weights_file)
        return RunConfig(
            stored["model"],
            prep,
            classes,
            threshold,
            sha,
            doc.get("settings") or {},
            doc.get("record") or {},
            str(stored.get("task", "binary")),
            str(stored.get("target", "label")),
        )

    @property
    def model_id(self) -> str:
        """``<folder name>-<first 12 hex of the weights' sha256>``: names the exact weights."""
        return f"{self.path.resolve().name}-{self.config.weights_sha256[:12]}"

    @property
    def info(self) -> ModelInfo:
        """The model as its weights define it: the identity's threshold, on the raw probability
        (what an ONNX export records). A run with trust files predicts with ``trust.threshold``
        on the calibrated probability instead (``Predictor``, ``Explainer``)."""
        c = self.config
        return ModelInfo(self.model_id, c.preprocess, c.threshold, c.negative, c.positive, c.backbone, c.weights_sha256)

    @functools.cached_property
    def trust(self) -> TrustBundle | None:
        """The fitted trust pieces of any task, verified, or None for a run without them.

        config.json's record holds the sha256 of trust.json, which holds the sha256 of
        trust.safetensors and of the weights it was fitted for: an edited, swapped or planted
        trust file is a CheckpointError naming it. Older layouts still load: a binary run's
        trust.json of format ``kneeosteo-trust/1``, and a multiclass or regression run of folder
        format 2, whose trust lived in ``record["task_trust"]`` and domain.json + domain.safetensors."""
        from safetensors import SafetensorError

        from kneeosteo.errors import DataError
        from kneeosteo.trust import TrustBundle

        loaded = self._verified_pair("trust", self.trust_file, self.trust_tensors_file)
        domain = (
            None if loaded is not None else self._verified_pair("domain", self.domain_file, self.domain_tensors_file)
        )
        task_trust = None if loaded is not None else self.config.record.get("task_trust")
        if loaded is None and domain is None and task_trust is None:
            return None
        try:
            if loaded is not None:
                where = self.trust_file
                bundle = TrustBundle.from_storage(loaded[1], loaded[0])
            else:
                where = self.config_file if domain is None else self.domain_file
                bundle = TrustBundle.from_task_record(
                    task_trust,
                    None if domain is None else {**domain[0]["domain"], **domain[1]},
                    "" if domain is None else str(domain[0].get("fitted", "")),
                    self.config.classes,
                )
        except (KeyError, TypeError, ValueError, DataError, SafetensorError) as exc:
            raise CheckpointError(f"{where}: malformed trust state ({type(exc).__name__}: {exc})") from exc
        if tuple(bundle.classes) != self.config.classes:
            raise CheckpointError(
                f"{self.trust_file}: classes {list(bundle.classes)} differ from the model's {list(self.config.classes)}"
            )
        return bundle

    def _verified_pair(self, key: str, json_file: Path, tensors_file: Path) -> tuple[dict, dict] | None:
        """(meta, arrays) of a JSON + safetensors pair whose JSON's sha256 config.json's record holds
        under ``key`` (trust files; a task run's domain check), or None when none is recorded.

        The record holds the JSON's sha256, the JSON the arrays' and the weights' sha256: an edited,
        swapped or planted file is a CheckpointError naming it."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        recorded = self.config.record.get(key)
        present = [f for f in (json_file, tensors_file) if f.exists()]
        if recorded is None:
            if present:
                raise CheckpointError(
                    f"{present[0]}: {key} file not recorded in {self.config_file.name} (planted or "
                    "left by an interrupted write); remove it or refit with `kneeosteo calibrate`"
                )
            return None
        for f in (json_file, tensors_file):
            if not f.is_file():
                raise CheckpointError(
                    f"{f}: missing or not a regular file, but {self.config_file.name} records {key} "
                    "files; copy the whole run folder"
                )
        if not isinstance(recorded, dict) or sha256_file(json_file) != recorded.get("sha256"):
            raise CheckpointError(
                f"{json_file}: sha256 differs from the one recorded in "
                f"{self.config_file.name}; the file was edited or swapped after fitting"
            )
        try:
            meta = json.loads(json_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{json_file}: unreadable ({exc})") from exc
        if sha256_file(tensors_file) != meta.get("tensors_sha256"):
            raise CheckpointError(
                f"{tensors_file}: sha256 differs from the one recorded in "
                f"{json_file.name}; the file was edited or swapped after fitting"
            )
        if meta.get("weights_sha256") != self.config.weights_sha256:
            raise CheckpointError(f"{json_file}: fitted for other weights ({meta.get('weights_sha256')!r})")
        try:
            return meta, load_file(str(tensors_file))
        except SafetensorError as exc:
            raise CheckpointError(f"{tensors_file}: malformed ({exc})") from exc

    @property
    def domain(self):
        """The run's domain check (``kneeosteo.trust.DomainCheck``, part of :attr:`trust`), or None."""
        return None if self.trust is None else self.trust.domain

    def load_model(self, device: str = "cpu", backbone_weights=None):
        """The run's HybridModel in eval mode on ``device`` (weights verified against config.json)."""
        from kneeosteo.models.checkpoint import load_weights

        model = load_weights(self.weights_file, self.config.weights_sha256, backbone_weights=backbone_weights)
        return model.to(device).eval()

    def read_json(self, name: str) -> Any:
        """A JSON file of the run (metrics.json, split.json), or None when absent or unreadable."""
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------------------- writing
    def save_model(
        self,
        model,
        preprocess: Preprocess,
        classes,
        threshold: float,
        settings: dict,
        record: dict,
        task: str = "binary",
        target: str = "label",
    ) -> None:
        """Write the weights (identity inside) and config.json; what is verified on reading."""
        import torch

        from kneeosteo.models.checkpoint import save_weights

        ident = identity(preprocess, classes, threshold, task, target)
        _checked(ident, self.weights_file)
        for stale in (
            self.trust_file,
            self.trust_tensors_file,
            self.domain_file,
            self.domain_tensors_file,
        ):  # fitted for the weights replaced now
            stale.unlink(missing_ok=True)
        sha = save_weights(model, self.weights_file, ident)
        write_json(
            self.config_file,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "weights_file": self.weights_file.name,
                "weights_sha256": sha,
                "identity": {"model": model.model_config(), **ident},
                "settings": settings,
                "record": record,
                "versions": {"kneeosteo": __version__, "torch": torch.__version__},
            },
        )
        self.__dict__.pop("config", None)

    def save_trust(self, bundle) -> None:
        """Write trust.safetensors, then trust.json (with the former's sha256), then record
        trust.json's sha256 in config.json; each write atomic. Any task's bundle: the one place a
        run keeps its trust (an older task run's ``task_trust`` and domain files are dropped)."""
        from safetensors.numpy import save_file

        tensors, meta = bundle.to_storage()
        with atomic_path(self.trust_tensors_file) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        meta = {
            **meta,
            "tensors_sha256": sha256_file(self.trust_tensors_file),
            "weights_sha256": self.config.weights_sha256,
        }
        write_json(self.trust_file, meta)
        doc = json.loads(self.config_file.read_text())
        record = {k: v for k, v in doc["record"].items() if k not in ("task_trust", "domain")}
        doc["record"] = {**record, "trust": {"sha256": sha256_file(self.trust_file)}}
        doc["format_version"] = FORMAT_VERSION
        write_json(self.config_file, doc)
        for old in (self.domain_file, self.domain_tensors_file):
            old.unlink(missing_ok=True)
        for cached in ("config", "trust"):
            self.__dict__.pop(cached, None)

    def derive(self, out: str | Path, record: dict, trust_settings: dict | None = None) -> RunDir:
        """A new run folder at ``out`` with a byte copy of this run's weights and split, and this
        run's identity and settings; ``record`` is added to the copied record (nothing here is
        modified). ``trust_settings``: the ``[trust]`` settings the new run's trust files are fitted
        with (``calibrate``'s options), replacing the source's. Its model id differs by the folder
        name; trust files are fitted afterwards."""
        import shutil

        src = self.config  # verifies the weights before they are copied
        new = RunDir(out)
        new.path.mkdir(parents=True, exist_ok=True)
        if new.is_run():
            raise CheckpointError(f"{new.path}: already a run folder; choose a new --out")
        with atomic_path(new.weights_file) as tmp:
            shutil.copyfile(self.weights_file, tmp)
        if self.split_file.is_file():
            with atomic_path(new.split_file) as tmp:
                shutil.copyfile(self.split_file, tmp)
        doc = json.loads(self.config_file.read_text())
        dropped = ("trust", "domain", "task_trust", "fused")  # fitted for the source run; refitted for the new one
        base = {k: v for k, v in (doc.get("record") or {}).items() if k not in dropped}
        doc["record"] = {**base, **record}
        if trust_settings:
            from kneeosteo.config import SECTIONS

            known = {f.name for f in dataclasses.fields(SECTIONS["trust"])}
            unknown = sorted(set(trust_settings) - known)
            if unknown:
                raise ValueError(f"not [trust] settings: {unknown}")
            doc["settings"] = {**(doc.get("settings") or {}), **trust_settings}
        doc["format_version"] = FORMAT_VERSION
        if sha256_file(new.weights_file) != src.weights_sha256:
            raise CheckpointError(f"{new.weights_file}: the copy differs from {self.weights_file}")
        write_json(new.config_file, doc)
        return new

    def update_record(self, **values: Any) -> None:
        """Add to config.json's record (not part of the identity: the weights stay valid)."""
        doc = json.loads(self.config_file.read_text())
        doc["record"].update(values)
        write_json(self.config_file, doc)
        for cached in ("config", "trust"):
            self.__dict__.pop(cached, None)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]
