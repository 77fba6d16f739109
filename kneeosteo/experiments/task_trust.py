"""Trust pieces of a multiclass or regression run, fitted on the validation partition at the
end of training (the binary run's are in ``trust_fit``):

- **multiclass**: one temperature for the K logits (kept at 1 with fewer than
  ``trust.calibration.MIN_TEMPERATURE_IMAGES`` images or a fit that runs to its bound), then split-
  conformal prediction sets at ``coverage`` on the calibrated probabilities;
- **regression**: a split-conformal interval ``prediction -+ half width`` at ``coverage`` (a
  T-score of -2.1 [-2.9, -1.3], say), from the validation residuals.

They are small (a few numbers) and go into config.json's record as ``task_trust``, next to
the rest of what training recorded; ``evaluation.task_scoring.task_answers`` applies them.
The **domain check** is the binary run's (``fit_task_domain``), fitted on the training images
and kept in domain.json + domain.safetensors, verified like the trust files (``RunDir.domain``).
"""

from __future__ import annotations

import json
from pathlib import Path

from kneeosteo.data.split import SplitSets, load_split
from kneeosteo.errors import DataError
from kneeosteo.evaluation.evaluate import backbone_features, prepare_part, raw_outputs
from kneeosteo.features.prepare import PreparedSet
from kneeosteo.run import RunDir
from kneeosteo.tasks import Regression, task_for
from kneeosteo.trust.calibration import DEGENERATE_TEMPERATURE, MIN_TEMPERATURE_IMAGES
from kneeosteo.trust.domain import MIN_DOMAIN_IMAGES, DomainCheck
from kneeosteo.trust.multiclass import ConformalInterval, ConformalSetsK, TemperatureScalerK

__all__ = ["calibrate_task_run", "fit_task_domain", "fit_task_trust", "task_trust_line"]


def fit_task_domain(run: RunDir, model, train: PreparedSet, acceptance: float = 0.95, device: str = "cpu") -> str:
    """The binary run's domain check (``trust.DomainCheck``: Mahalanobis distance of the frozen
    backbone's features, threshold at ``acceptance`` of out-of-fold distances), fitted on the
    training originals and saved as domain.json + domain.safetensors; returns what was done."""
    feats = backbone_features(model, train.originals(), run.config.preprocess, device)
    if feats is None:
        return "pixel checks only: the model has no backbone features"
    if len(feats) < MIN_DOMAIN_IMAGES:
        return (
            f"pixel checks only: {len(feats)} training images are too few for a feature distance "
            f"(at least {MIN_DOMAIN_IMAGES})"
        )
    check = DomainCheck(acceptance=acceptance).fit(feats)
    note = f"fitted on {len(feats)} training images, threshold at {acceptance:g} of out-of-fold distances"
    run.save_domain(check, note)
    return note


def fit_task_trust(run: RunDir, model, sets: SplitSets, coverage: float = 0.9, device: str = "cpu") -> dict:
    """Fit on ``sets``' validation partition; returns what goes into ``record["task_trust"]``."""
    prep = run.config.preprocess
    val = prepare_part(model, sets.items("val"), sets.data, prep, device, "calibration (val)").originals()
    if len(val) == 0:
        raise DataError("no validation images to calibrate on")
    out = raw_outputs(model, val, prep, device)
    y = val.targets.numpy()
    fitted = {"calibration_set": "validation partition", "calibration_images": int(len(y))}
    if isinstance(task_for(run.config), Regression):
        return {"interval": ConformalInterval(coverage).fit(y, out).to_dict(), **fitted}
    y = y.astype(int)
    scaler = TemperatureScalerK()
    if len(y) < MIN_TEMPERATURE_IMAGES:
        fitted["temperature_note"] = f"kept at 1: {len(y)} images are too few"
    else:
        t = scaler.fit(out, y)
        if not DEGENERATE_TEMPERATURE[0] < t < DEGENERATE_TEMPERATURE[1]:
            scaler = TemperatureScalerK()
            fitted["temperature_note"] = f"kept at 1: the fit ran to its bound ({t:.3g})"
    probs = scaler.transform(out)
    return {"temperature": scaler.to_dict(), "conformal": ConformalSetsK(coverage).fit(probs, y).to_dict(), **fitted}


def task_trust_line(trust: dict) -> str:
    """One console line: what was fitted."""
    n = trust.get("calibration_images")
    if "interval" in trust:
        i = trust["interval"]
        return (
            f"trust: conformal interval +-{i['half_width']:.3g} at coverage {i['coverage']:g} ({n} validation images)"
        )
    t = trust["temperature"]["temperature"]
    return (
        f"trust: temperature {t:.3g}{' (' + trust['temperature_note'] + ')' if 'temperature_note' in trust else ''}; "
        f"conformal sets at coverage {trust['conformal']['coverage']:g} ({n} validation images)"
    )


def calibrate_task_run(src: RunDir, model, out, data, split, coverage: float, device: str) -> RunDir:
    """``calibrate`` for a multiclass or regression run: its temperature and conformal sets, or
    its conformal interval, refitted on a split's validation partition (``experiments/task_trust.py``)."""
    cfg = src.config
    if data is not None and split is None:
        raise DataError(
            f"a {cfg.task} run is calibrated on a split's validation part: pass --split "
            "(make one with `kneeosteo split DATA --labels ...`)"
        )
    split_file = Path(split) if split is not None else src.split_file
    sets = load_split(
        split_file, data if data is not None else cfg.record.get("data"), cfg.settings.get("fold"), target=cfg.target
    )
    if cfg.settings.get("merge"):
        sets = sets.merged(cfg.settings["merge"])
    trust = fit_task_trust(src, model, sets, coverage, device)
    new = src.derive(
        out,
        {
            "calibrated_from": {"run": str(src.path), "model_id": src.model_id},
            "calibration_data": {"data": str(sets.data), "split": str(split_file)},
        },
    )
    new.update_record(task_trust=trust)
    if src.domain is not None:  # fitted on the training images for these weights: still valid
        new.save_domain(src.domain, json.loads(src.domain_file.read_text()).get("fitted", ""))
    return new
