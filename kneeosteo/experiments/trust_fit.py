"""Fitting a run's trust pieces (issue 15): at the end of training, and for `kneeosteo calibrate`.

What is fitted on what:

- **temperature** (one parameter, so the ranking and the 0.5 decision point stay put), the
  **operating threshold** (``--operating-point``) and the **split-conformal** quantile
  (``--coverage``): on held-out labelled images, the validation partition when training (KOP:
  27 images), a site's own films with ``calibrate RUN DATA``. With fewer than
  ``MIN_TEMPERATURE_IMAGES`` images, fewer than 3 of a class, or logits the temperature can
  separate perfectly (its fit then runs to the lower bound, probabilities 0 and 1), or logits
  that carry no information about the labels (flat or reversed: the fit runs to the upper bound,
  every probability 0.5), the temperature is kept at 1 and ``fitted`` says which. Conformal sets from too few images hold both classes (the
  answer is then ``uncertain``, honestly), see :mod:`kneeosteo.trust.conformal`.
- the **domain check**: on the frozen backbone's features of the training images (originals,
  not augmented copies), with the threshold at ``acceptance`` of out-of-fold distances (each
  training image scored by a fit without it). ``calibrate RUN DATA`` keeps the fitted arrays
  and sets the threshold on the site's films; a run without a domain check gets one fitted on
  the site's films.

The temperature, threshold and conformal quantile share the same held-out images; the
temperature has one parameter, so the exchangeability the conformal guarantee needs is only
mildly strained (docs/trust.md says so).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from kneeosteo.data.reader import ImageReadError, read_image
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.split import SplitSets, load_split
from kneeosteo.errors import DataError
from kneeosteo.evaluation.evaluate import backbone_features, predict_prepared, prepare_part
from kneeosteo.evaluation.metrics import metrics_with_ci
from kneeosteo.features.prepare import PreparedSet
from kneeosteo.run import RunDir
from kneeosteo.tasks import task_for
from kneeosteo.trust import (
    ConformalClassifier,
    DomainCheck,
    OrientationCheck,
    TemperatureScaler,
    TrustBundle,
    calibration_slope_intercept,
    choose_threshold,
    expected_calibration_error_interval,
    logit,
    sigmoid,
)
from kneeosteo.trust.bundle import NO_SIGNAL
from kneeosteo.trust.calibration import DEGENERATE_TEMPERATURE, MIN_TEMPERATURE_IMAGES
from kneeosteo.trust.domain import MIN_DOMAIN_IMAGES
from kneeosteo.trust.operating_point import parse_operating_point
from kneeosteo.trust.orientation import MIN_ORIENTATION_IMAGES
from kneeosteo.trust.shift import ShiftReference
from kneeosteo.utils.progress import progress_bar

__all__ = [
    "calibrate_run",
    "check_new_run_folder",
    "exact_set",
    "fit_trust",
    "fit_trust_from_split",
    "min_refit_images",
    "site_check",
    "site_check_lines",
    "temperature_fit",
    "trust_line",
]

log = logging.getLogger(__name__)


def temperature_fit(z: np.ndarray, y: np.ndarray) -> tuple[TemperatureScaler, str]:
    """The temperature for logits ``z`` and 0/1 labels ``y``, and what ``fitted`` says about it.

    The NLL-optimal temperature runs to a bound in two opposite cases: logits that separate the
    classes perfectly want ``T -> 0`` (probabilities 0 and 1), logits that carry no information
    about the labels, or order them the wrong way round, want ``T -> inf`` (every probability
    0.5; a temperature cannot turn a ranking round). Both keep T = 1, with the reason."""
    n_min = int(min((y == 0).sum(), (y == 1).sum()))
    if z.size < MIN_TEMPERATURE_IMAGES or n_min < 3:
        return TemperatureScaler(1.0).fit(z, y), f"kept at 1: {z.size} images ({n_min} of the rarer class) are too few"
    cal = TemperatureScaler().fit(z, y)
    t = cal.temperature_
    if t <= DEGENERATE_TEMPERATURE[0]:
        return TemperatureScaler(1.0).fit(z, y), (
            f"kept at 1: the fit ran to its lower bound ({t:.3g}): the logits separate "
            "these images perfectly, so no temperature calibrates them"
        )
    if t >= DEGENERATE_TEMPERATURE[1]:
        return TemperatureScaler(1.0).fit(z, y), (
            f"kept at 1: the fit ran to its upper bound ({t:.3g}): the logits carry no "
            "information about these labels (the relation is flat or reversed), so the "
            "fit flattened every probability towards 0.5"
        )
    return cal, f"fitted on {z.size} images"


def min_refit_images(acceptance: float) -> int:
    """Films needed to refit a domain threshold at ``acceptance``: two expected beyond it (40 at
    0.95). With two films, 0.95's quantile is the larger distance, and ordinary films fail."""
    return max(MIN_TEMPERATURE_IMAGES, math.ceil(2 / (1 - acceptance) - 1e-9))


def exact_set(records, root: Path, prep, label: str = "calibration (site)") -> PreparedSet:
    """``records`` (scan records) as a PreparedSet of the exact fp32 inputs ``predict`` gives the
    network (the feature cache keeps fp16 inputs; a threshold fitted on those held films that
    prediction then refused). Identical images are kept once; identical images with two labels
    are a label conflict and left out; both said in a warning."""
    by_content: dict[str, list] = {}
    for r in records:
        by_content.setdefault(r.content_id, []).append(r)
    keep, copies, conflicts = [], 0, []
    for group in by_content.values():
        if len({r.target for r in group}) > 1:
            conflicts.extend(r.path for r in group)
            continue
        copies += len(group) - 1
        keep.append(group[0])
    if copies or conflicts:
        log.warning(
            "%s: %d identical cop%s kept once; %d file(s) left out as identical images with two labels%s",
            label,
            copies,
            "y" if copies == 1 else "ies",
            len(conflicts),
            f" ({', '.join(conflicts[:4])}{', ...' if len(conflicts) > 4 else ''})" if conflicts else "",
        )
    grey, targets, paths, bad = [], [], [], []
    for r in progress_bar(keep, f"{label}: images", total=len(keep)):
        try:
            grey.append(prep.geometry(read_image(Path(root) / r.path).pixels))
        except ImageReadError as exc:
            log.warning("%s: %s; left out", Path(root) / r.path, exc.reason)
            bad.append({"path": r.path, "reason": exc.reason})
            continue
        targets.append(float(r.target))
        paths.append(r.path)
    if not grey:
        raise DataError(f"{root}: no readable image in the {label} set")
    return PreparedSet(
        torch.stack(grey),
        torch.tensor(targets),
        paths,
        [0] * len(paths),
        None,
        bad + [{"path": p, "reason": "label conflict: an identical image has the other label"} for p in conflicts],
    )


def site_check(old: TrustBundle | None, z: np.ndarray, y: np.ndarray, classes, raw_threshold: float) -> dict:
    """The run's own pieces on a site's labelled films (logits ``z``, 0/1 labels ``y``), before
    anything is refitted: AUC with its 95% interval (stratified bootstrap, as ``evaluate``),
    ECE with its interval and the calibration slope of the run's probabilities, the coverage of
    the run's prediction sets (overall and per class; none for a run without trust files), and
    accuracy at the run's threshold (Wilson interval). ``verdict`` is ``no signal at this site``
    when the AUC interval holds 0.5 or lies below it, else ``signal``; ``reason`` says it in words."""
    p = sigmoid(z) if old is None else old.calibrated(z)
    thr = raw_threshold if old is None else old.threshold
    m = metrics_with_ci(y, p, threshold=thr)
    auc, acc = m["auc"], m["accuracy"]
    ece, lo, hi = expected_calibration_error_interval(p, y)
    out = {
        "n": int(y.size),
        "classes": {classes[0]: int((y == 0).sum()), classes[1]: int((y == 1).sum())},
        "auc": {k: auc[k] for k in ("value", "ci_low", "ci_high")},
        "ece": {"value": ece, "ci_low": lo, "ci_high": hi},
        "calibration_slope": calibration_slope_intercept(p, y).to_dict().get("slope"),
        "threshold": float(thr),
        "accuracy": {k: acc[k] for k in ("value", "ci_low", "ci_high")},
        "calibrated": old is not None,
    }
    if old is not None:
        mask = old.conformal.predict_mask(p)
        hit = mask[np.arange(y.size), y]
        out["coverage"] = {
            "target": old.conformal.coverage,
            "overall": float(hit.mean()),
            **{c: float(hit[y == k].mean()) for k, c in enumerate(classes)},
            "class_conditional": old.conformal.class_conditional,
        }
    a = out["auc"]
    where = f"AUC {a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] on {y.size} films"
    if a["ci_high"] < 0.5:
        out["verdict"] = NO_SIGNAL
        out["reason"] = (
            f"{NO_SIGNAL}: the model ranks this site's films the wrong way round ({where}); it has not "
            "been shown to work at this site"
        )
    elif a["ci_low"] <= 0.5:
        out["verdict"] = NO_SIGNAL
        out["reason"] = (
            f"{NO_SIGNAL}: the AUC interval includes 0.5 ({where}); the model has not been shown to work at this site"
        )
    else:
        out["verdict"] = "signal"
        out["reason"] = f"the model ranks this site's films above chance ({where})"
    return out


def site_check_lines(sc: dict) -> list[str]:
    """The site check for the console, verdict first."""

    def ci(d):
        return f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"

    lines = [
        f"site check: {sc['verdict'].upper()}: {sc['reason'].removeprefix(NO_SIGNAL + ': ')}",
        f"  AUC {ci(sc['auc'])}; ECE {ci(sc['ece'])}; calibration slope "
        f"{sc['calibration_slope'] if sc['calibration_slope'] is None else format(sc['calibration_slope'], '.3f')}; "
        f"accuracy at the run's threshold {sc['threshold']:.3g}: {ci(sc['accuracy'])}",
    ]
    cov = sc.get("coverage")
    if cov:
        per = ", ".join(f"{c} {cov[c]:.3f}" for c in sc["classes"])
        lines.append(
            f"  the run's {cov['target']:.0%} prediction sets covered {cov['overall']:.3f} of these films ({per})"
        )
    else:
        lines.append("  the run has no prediction sets (no trust files): coverage not measured")
    if sc["verdict"] == NO_SIGNAL:
        lines.append("  the new run marks every prediction `uncertain` with this reason")
    return lines


def fit_trust(
    model,
    prep,
    fit_set: PreparedSet,
    classes,
    *,
    operating_point="0.5",
    coverage: float = 0.9,
    domain_set: PreparedSet | None = None,
    domain: DomainCheck | None = None,
    orientation: OrientationCheck | None = None,
    acceptance: float = 0.95,
    device: str = "cpu",
    fitted: dict | None = None,
    class_conditional: bool = False,
    site: TrustBundle | None = None,
    raw_threshold: float = 0.5,
) -> TrustBundle:
    """The bundle for ``model``: calibration, threshold and conformal on ``fit_set``'s original
    images; the domain check fitted on ``domain_set`` (out-of-fold threshold), or ``domain``'s
    arrays with the threshold refitted on ``fit_set``, or (neither) fitted on ``fit_set``.
    ``class_conditional``: Mondrian conformal sets (one quantile per class). With ``fitted``'s
    mode ``site`` (a site's films), the site check runs first with ``site``, the original run's
    pieces (None for a run without trust files, whose threshold is ``raw_threshold``)."""
    op = parse_operating_point(operating_point)
    fit_set = fit_set.originals()
    y = fit_set.targets.numpy().astype(int)
    if y.min() == y.max():
        raise DataError(f"calibration images: need both classes, got {len(y)} of class {int(y[0])} only")
    z = logit(predict_prepared(model, fit_set, prep, device))
    checked = site_check(site, z, y, tuple(classes), raw_threshold) if (fitted or {}).get("mode") == "site" else None
    calibrator, t_note = temperature_fit(z, y)
    p = calibrator.transform(z)
    threshold = choose_threshold(p, y, op)
    conformal = ConformalClassifier(coverage, class_conditional=class_conditional, class_names=tuple(classes)).fit(p, y)
    info = dict(fitted or {})
    info.update(
        calibration_images=int(len(y)),
        temperature=t_note,
        calibration_classes={classes[0]: int((y == 0).sum()), classes[1]: int((y == 1).sum())},
    )
    feats = backbone_features(model, fit_set, prep, device)
    check = None
    turned = None
    if feats is None:
        info["domain"] = "pixel checks only: the model has no backbone features"
    elif domain is not None:  # a site's refit: the training fit's checks kept, the threshold maybe refitted
        check, turned = copy.deepcopy(domain), orientation
        need = min_refit_images(check.acceptance)
        if len(feats) < need:
            info["domain"] = (
                f"training-image fit and threshold kept: {len(feats)} calibration images are too few "
                f"to refit it (at least {need} at acceptance {check.acceptance:g})"
            )
            log.warning("domain check: %s", info["domain"])
        else:
            check.refit_threshold(feats)
            info["domain"] = f"training-image fit kept; threshold refitted on {len(feats)} calibration images"
    else:
        source = fit_set if domain_set is None else domain_set.originals()
        x = feats if domain_set is None else backbone_features(model, source, prep, device)
        try:
            if len(x) < MIN_DOMAIN_IMAGES:
                raise DataError(
                    f"{len(x)} in-domain images are too few for a feature distance in {x.shape[1]} "
                    f"dimensions (at least {MIN_DOMAIN_IMAGES}); only the pixel checks apply"
                )
            check = DomainCheck(acceptance=acceptance).fit(x)
            info["domain"] = (
                f"fitted on {len(x)} {'calibration' if domain_set is None else 'training'} images, "
                f"threshold at {acceptance:g} of out-of-fold distances"
            )
        except DataError as exc:
            info["domain"] = f"pixel checks only: {exc}"
            log.warning("no domain check for this run: %s", exc)
        if check is not None:
            turned, info["orientation"] = fit_orientation(model, source, prep, device, x)
    reference = ShiftReference().fit(
        None if check is None else check.heldout_scores_,
        p,
        {
            "domain_source": None if check is None else info["domain"],
            "probability_source": f"calibrated probabilities of the {len(y)} calibration images",
        },
    )
    return TrustBundle(
        calibrator, threshold, str(op), conformal, check, tuple(classes), info, reference, checked, orientation=turned
    )


def fit_orientation(model, films: PreparedSet, prep, device: str, upright: np.ndarray):
    """``(check, note)``: the learned orientation check (:class:`~kneeosteo.trust.OrientationCheck`)
    fitted on ``films``' features (``upright``) and those of the same inputs mirrored top to
    bottom; ``(None, why)`` with too few films, where the older mirror comparison stays in force."""
    try:
        if len(upright) < MIN_ORIENTATION_IMAGES:
            raise DataError(f"{len(upright)} films are too few (at least {MIN_ORIENTATION_IMAGES})")
        mirrored = backbone_features(model, films, prep, device, upside_down=True)
        oc = OrientationCheck().fit(upright, mirrored)
    except DataError as exc:
        note = f"none ({exc}); the mirror comparison applies"
        log.warning("orientation check: %s", note)
        return None, note
    note = (
        f"learned on {oc.n_images_} films and their top-to-bottom mirrors: out of fold it refuses "
        f"{oc.false_refusals_:.1%} of upright films and catches {oc.detection_:.1%} of mirrored ones "
        f"(AUC {oc.auc_:.3f})"
    )
    log.info("orientation check: %s", note)
    return oc, note


def trust_line(bundle: TrustBundle) -> str:
    """One line for the console: what was fitted."""
    cal = bundle.calibrator.get_state()
    t = cal.get("temperature")
    dom = "none" if bundle.domain is None else f"{bundle.domain.method}, threshold {bundle.domain.threshold_:.4g}"
    mondrian = " per class (Mondrian)" if bundle.conformal.class_conditional else ""
    return (
        f"trust: temperature {t:.3g} ({bundle.fitted.get('temperature', '')}); operating point "
        f"{bundle.operating_point} -> threshold {bundle.threshold:.4g}; conformal coverage "
        f"{bundle.conformal.coverage:g}{mondrian}; domain check {dom}"
    )


def fit_trust_from_split(
    run: RunDir,
    model,
    sets: SplitSets,
    *,
    operating_point="0.5",
    coverage: float = 0.9,
    acceptance: float = 0.95,
    device: str = "cpu",
    train: PreparedSet | None = None,
    class_conditional: bool = False,
) -> TrustBundle:
    """Training's fit: calibration on the validation partition, the domain check on the
    training partition's originals (``train`` when the caller has them prepared already, else
    read from the feature cache training filled)."""
    prep = run.config.preprocess
    val = prepare_part(model, sets.items("val"), sets.data, prep, device, "calibration (val)")
    if train is None:
        train = prepare_part(model, sets.items("train"), sets.data, prep, device, "domain check (train)")
    return fit_trust(
        model,
        prep,
        val,
        run.config.classes,
        operating_point=operating_point,
        coverage=coverage,
        domain_set=train,
        acceptance=acceptance,
        device=device,
        class_conditional=class_conditional,
        fitted={
            "mode": "split",
            "calibration_set": "validation partition",
            "domain_set": "training partition (originals)",
        },
    )


def check_new_run_folder(run: str | Path, out: str | Path) -> None:
    """``calibrate``'s ``--out`` must be a new run folder: not a run already, not inside (or
    holding) the run it reads, and not an existing folder with files in it (whose split.json or
    trust.json would be overwritten)."""
    try:
        where, src = Path(out).resolve(), Path(run).resolve()
    except (OSError, RuntimeError) as exc:  # a link loop, a name too long
        raise DataError(f"{out}: cannot be checked ({getattr(exc, 'strerror', None) or exc})") from exc
    if RunDir(out).is_run():
        raise DataError(f"{out}: already a run folder; choose a new --out (the original run is never changed)")
    if where == src or src in where.parents or where in src.parents:
        raise DataError(
            f"{out}: inside (or around) the run {run}; choose a --out outside it (the original run is never changed)"
        )
    try:
        taken = where.exists() and (not where.is_dir() or any(where.iterdir()))
    except OSError as exc:
        raise DataError(f"{out}: cannot be checked ({exc.strerror or exc})") from exc
    if taken:
        raise DataError(f"{out}: exists and is not an empty folder; choose a new --out (nothing was changed)")


def calibrate_run(
    run,
    out,
    data=None,
    split=None,
    *,
    operating_point="0.5",
    coverage: float = 0.9,
    acceptance: float = 0.95,
    device: str = "cpu",
    labels=None,
    class_conditional: bool = False,
) -> RunDir:
    """`kneeosteo calibrate`: a new run folder at ``out`` with ``run``'s weights (a byte copy; the
    original is only read) and trust pieces fitted on

    - ``data`` alone: every image of that class-folder data set (a site's own films);
    - ``split`` (or neither: the run's own split.json): that split's validation partition, with
      the domain check on its training partition, as training does.
    """
    src = RunDir.open(run)
    check_new_run_folder(src.path, out)
    model = src.load_model(device)
    cfg = src.config
    parse_operating_point(operating_point)  # a bad setting fails before any image is read
    common = dict(
        operating_point=operating_point,
        coverage=coverage,
        acceptance=acceptance,
        device=device,
        class_conditional=class_conditional,
    )
    if not task_for(cfg).has_operating_point:  # multiclass, regression: no threshold, no site check
        from kneeosteo.experiments.task_trust import calibrate_task_run

        return calibrate_task_run(src, model, out, data, split, coverage, device)
    if data is not None and split is None:
        scan = scan_dataset(data, positive=cfg.positive, labels=labels, merge=cfg.settings.get("merge") or None)
        if scan.classes and list(scan.classes) != list(cfg.classes) and set(scan.classes) != set(cfg.classes):
            raise DataError(f"{data}: class folders {scan.classes} differ from the model's {list(cfg.classes)}")
        site = exact_set(scan.records, data, cfg.preprocess)
        old = src.trust
        bundle = fit_trust(
            model,
            cfg.preprocess,
            site,
            cfg.classes,
            domain=None if old is None else old.domain,
            orientation=None if old is None else old.orientation,
            fitted={"mode": "site", "calibration_set": str(data)},
            site=old,
            raw_threshold=cfg.threshold,
            **common,
        )
        record = {"data": str(Path(data)), "content_ids": {r.path: r.content_id for r in scan.records}}
    else:
        split_file = Path(split) if split is not None else src.split_file
        root = data if data is not None else cfg.record.get("data")
        sets = load_split(split_file, root, cfg.settings.get("fold"))
        bundle = fit_trust_from_split(src, model, sets, **common)
        try:
            ids = json.loads(split_file.read_text()).get("content_ids") or {}
        except (OSError, ValueError, AttributeError):
            ids = {}
        record = {
            "data": str(sets.data),
            "split": str(split_file),
            "content_ids": {p: ids.get(p, "") for p in sets.val},
        }
    new = src.derive(
        out,
        {"calibrated_from": {"run": str(src.path), "model_id": src.model_id}, "calibration_data": record},
        # the new run's [trust] settings are the ones its trust files were fitted with
        trust_settings={"operating_point": str(operating_point), "coverage": coverage, "domain_acceptance": acceptance},
    )
    new.save_trust(bundle)
    return new
