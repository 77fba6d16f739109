"""Trust pieces of a multiclass or regression run, fitted on the validation partition at the
end of training (the binary run's are in ``trust_fit``):

- **multiclass**: one temperature for the K logits (kept at 1 with fewer than
  ``trust_fit.MIN_TEMPERATURE_IMAGES`` images or a fit that runs to its bound), then split-
  conformal prediction sets at ``coverage`` on the calibrated probabilities;
- **regression**: a split-conformal interval ``prediction -+ half width`` at ``coverage`` (a
  T-score of -2.1 [-2.9, -1.3], say), from the validation residuals.

They are small (a few numbers) and go into config.json's record as ``task_trust``, next to
the rest of what training recorded; ``evaluation.task_scoring.task_answers`` applies them.
The binary run's domain check has no counterpart here yet (README: limitations).
"""

from __future__ import annotations

from kneeosteo.data.split import SplitSets
from kneeosteo.errors import DataError
from kneeosteo.evaluation.evaluate import prepare_part, raw_outputs
from kneeosteo.experiments.trust_fit import _T_BOUNDS, MIN_TEMPERATURE_IMAGES
from kneeosteo.run import RunDir
from kneeosteo.trust.multiclass import ConformalInterval, ConformalSetsK, TemperatureScalerK

__all__ = ["fit_task_trust", "task_trust_line"]


def fit_task_trust(run: RunDir, model, sets: SplitSets, coverage: float = 0.9, device: str = "cpu") -> dict:
    """Fit on ``sets``' validation partition; returns what goes into ``record["task_trust"]``."""
    prep = run.config.preprocess
    val = prepare_part(model, sets.items("val"), sets.data, prep, device, "calibration (val)").originals()
    if len(val) == 0:
        raise DataError("no validation images to calibrate on")
    out = raw_outputs(model, val, prep, device)
    y = val.targets.numpy()
    fitted = {"calibration_set": "validation partition", "calibration_images": int(len(y))}
    if run.config.task == "regression":
        return {"interval": ConformalInterval(coverage).fit(y, out).to_dict(), **fitted}
    y = y.astype(int)
    scaler = TemperatureScalerK()
    if len(y) < MIN_TEMPERATURE_IMAGES:
        fitted["temperature_note"] = f"kept at 1: {len(y)} images are too few"
    else:
        t = scaler.fit(out, y)
        if not _T_BOUNDS[0] < t < _T_BOUNDS[1]:
            scaler = TemperatureScalerK()
            fitted["temperature_note"] = f"kept at 1: the fit ran to its bound ({t:.3g})"
    probs = scaler.transform(out)
    return {"temperature": scaler.to_dict(), "conformal": ConformalSetsK(coverage).fit(probs, y).to_dict(), **fitted}


def task_trust_line(trust: dict) -> str:
    """One console line: what was fitted."""
    n = trust.get("calibration_images")
    if "interval" in trust:
        i = trust["interval"]
        return f"trust: conformal interval +-{i['half_width']:.3g} at coverage {i['coverage']:g} ({n} validation images)"
    t = trust["temperature"]["temperature"]
    return (f"trust: temperature {t:.3g}{' (' + trust['temperature_note'] + ')' if 'temperature_note' in trust else ''}; "
            f"conformal sets at coverage {trust['conformal']['coverage']:g} ({n} validation images)")
