"""What a prediction needs to know about a model, read once from a run folder (or, for an
ONNX export, from its metadata): preprocessing, threshold, class names and a model id that
names the exact weights, so every output row can be traced back to them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.scan import DataError
from kneeosteo.errors import InferenceError

__all__ = ["InferenceError", "ModelInfo", "load_model", "resolve_run", "run_info"]


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    preprocess: Preprocess
    threshold: float
    negative: str
    positive: str
    backbone: str = ""

    def label(self, probability: float, threshold: float | None = None) -> str:
        t = self.threshold if threshold is None else threshold
        return self.positive if probability >= t else self.negative


def resolve_run(run: str | Path | None) -> Path:
    """``run`` itself, or the bundled default model when it is None."""
    if run is None:
        from kneeosteo.inference.bundled import bundled_run_dir

        return bundled_run_dir()
    run = Path(run)
    if not (run / "config.json").is_file():
        raise InferenceError(f"{run}: not a run folder (no config.json); pass a folder written by `kneeosteo train`")
    return run


def _classes(run: Path, settings: dict) -> tuple[str, str]:
    """(negative, positive): training saved them in metrics.json / split.json, not in config.json."""
    positive = settings.get("positive", "osteoporosis")
    for name in ("metrics.json", "split.json"):
        try:
            classes = json.loads((run / name).read_text()).get("classes")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(classes, list) and len(classes) == 2 and positive in classes:
            return next(c for c in classes if c != positive), positive
    return "normal", positive


def run_info(run: str | Path) -> ModelInfo:
    """Read a run folder's settings; the model id is ``<folder name>-<sha256[:12] of model.safetensors>``
    (the digest recorded in config.json, which ``load_checkpoint`` verifies against the file)."""
    from kneeosteo.evaluation.evaluate import run_preprocess, run_settings

    run = Path(run)
    try:
        settings = run_settings(run)
        doc = json.loads((run / "config.json").read_text())
        prep = run_preprocess(settings)
        sha = doc["weights_sha256"]
    except (DataError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InferenceError(f"{run}: unusable run folder ({type(exc).__name__}: {exc})") from exc
    negative, positive = _classes(run, settings)
    return ModelInfo(f"{run.resolve().name}-{sha[:12]}", prep, float(settings.get("threshold", 0.5)),
                     negative, positive, str(settings.get("backbone", "")))


def load_model(run: Path, device: str = "cpu"):
    """The run's HybridModel in eval mode on ``device``; checkpoint problems become InferenceError."""
    from kneeosteo.models.backbones import BackboneWeightsError
    from kneeosteo.models.hybrid import CheckpointError, load_checkpoint

    try:
        model, _ = load_checkpoint(run)
    except (CheckpointError, BackboneWeightsError) as exc:
        raise InferenceError(str(exc)) from exc
    return model.to(device).eval()
