"""Trust pieces of a multiclass or regression run, fitted on the validation partition at the
end of training (the binary run's are in ``trust_fit``). Which pieces a run gets is its task's
``trust_pieces`` (``kneeosteo.tasks``), each fitted with the estimator ``trust.TRUST_PIECES`` names:

- ``calibration`` (multiclass): one temperature for the K logits (kept at 1 with fewer than
  ``trust.calibration.MIN_TEMPERATURE_IMAGES`` images or a fit that runs to its bound);
- ``conformal`` (multiclass): split-conformal prediction sets at ``coverage`` on the calibrated
  probabilities;
- ``interval`` (regression): a split-conformal interval ``prediction -+ half width`` at
  ``coverage`` (a T-score of -2.1 [-2.9, -1.3], say), from the validation residuals;
- ``domain``: the binary run's domain check (``fit_task_domain``), fitted on the training images.

All of them go into the run's one trust file (trust.json + trust.safetensors, ``RunDir.save_trust``),
as a binary run's do; ``evaluation.task_scoring.task_answers`` applies them.
"""

from __future__ import annotations

from pathlib import Path

from kneeosteo.data.split import SplitSets, load_split
from kneeosteo.errors import DataError
from kneeosteo.evaluation.evaluate import backbone_features, prepare_part, raw_outputs
from kneeosteo.features.prepare import PreparedSet
from kneeosteo.run import RunDir
from kneeosteo.tasks import task_for
from kneeosteo.trust import ConformalClassifier, ConformalInterval, DomainCheck, TemperatureScaler, TrustBundle
from kneeosteo.trust.calibration import DEGENERATE_TEMPERATURE, MIN_TEMPERATURE_IMAGES
from kneeosteo.trust.domain import MIN_DOMAIN_IMAGES

__all__ = ["calibrate_task_run", "fit_task_domain", "fit_task_trust", "task_trust_line"]


def fit_task_domain(run: RunDir, model, train: PreparedSet, acceptance: float = 0.95, device: str = "cpu") -> str:
    """The binary run's domain check (``trust.DomainCheck``: Mahalanobis distance of the frozen
    backbone's features, threshold at ``acceptance`` of out-of-fold distances), fitted on the
    training originals and saved into the run's trust files (beside what ``fit_task_trust`` fitted);
    returns what was done."""
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
    bundle = run.trust or _empty_bundle(run)
    bundle.domain = check
    bundle.fitted["domain"] = note
    run.save_trust(bundle)
    return note


def _empty_bundle(run: RunDir) -> TrustBundle:
    return TrustBundle(None, None, None, None, None, tuple(run.config.classes))


def fit_task_trust(run: RunDir, model, sets: SplitSets, coverage: float = 0.9, device: str = "cpu") -> TrustBundle:
    """The task's trust pieces but the domain check, fitted on ``sets``' validation partition
    (a bundle for ``RunDir.save_trust``)."""
    prep = run.config.preprocess
    val = prepare_part(model, sets.items("val"), sets.data, prep, device, "calibration (val)").originals()
    if len(val) == 0:
        raise DataError("no validation images to calibrate on")
    out = raw_outputs(model, val, prep, device)
    y = val.targets.numpy()
    pieces = task_for(run.config).trust_pieces
    bundle = _empty_bundle(run)
    bundle.fitted.update(calibration_set="validation partition", calibration_images=int(len(y)))
    if "interval" in pieces:
        bundle.interval = ConformalInterval(coverage).fit(y, out)
    if "calibration" in pieces:
        y = y.astype(int)
        if len(y) < MIN_TEMPERATURE_IMAGES:
            scaler = TemperatureScaler(1.0).fit(out, y)
            bundle.fitted["temperature_note"] = f"kept at 1: {len(y)} images are too few"
        else:
            scaler = TemperatureScaler().fit(out, y)
            t = scaler.temperature_
            if not DEGENERATE_TEMPERATURE[0] < t < DEGENERATE_TEMPERATURE[1]:
                scaler = TemperatureScaler(1.0).fit(out, y)
                bundle.fitted["temperature_note"] = f"kept at 1: the fit ran to its bound ({t:.3g})"
        bundle.calibrator = scaler
        out = scaler.transform(out)
    if "conformal" in pieces:
        bundle.conformal = ConformalClassifier(coverage, class_names=tuple(run.config.classes)).fit(out, y)
    return bundle


def task_trust_line(bundle: TrustBundle) -> str:
    """One console line: what was fitted."""
    n = bundle.fitted.get("calibration_images")
    parts = []
    if bundle.calibrator is not None:
        note = bundle.fitted.get("temperature_note")
        parts.append(f"temperature {bundle.calibrator.temperature_:.3g}{' (' + note + ')' if note else ''}")
    if bundle.conformal is not None:
        parts.append(f"conformal sets at coverage {bundle.conformal.coverage:g}")
    if bundle.interval is not None:
        i = bundle.interval
        parts.append(f"conformal interval +-{i.half_width_:.3g} at coverage {i.coverage:g}")
    return f"trust: {'; '.join(parts) or 'nothing fitted'} ({n} validation images)"


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
    bundle = fit_task_trust(src, model, sets, coverage, device)
    old = src.trust
    if old is not None and old.domain is not None:  # fitted on the training images for these weights: still valid
        bundle.domain = old.domain
        bundle.fitted["domain"] = old.fitted.get("domain", "")
    new = src.derive(
        out,
        {
            "calibrated_from": {"run": str(src.path), "model_id": src.model_id},
            "calibration_data": {"data": str(sets.data), "split": str(split_file)},
        },
    )
    new.save_trust(bundle)
    return new
