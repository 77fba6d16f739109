"""One run end to end: train on the split, fit its trust pieces (calibration, operating
threshold, conformal sets, domain check: ``trust_fit``), then score the held-out test set into the run folder.

Training (``kneeosteo.training``) and scoring (``kneeosteo.evaluation``) do not know each other;
this is where they meet, for ``kneeosteo train`` and for every cell of ``reproduce``.
"""

from __future__ import annotations

from pathlib import Path

from kneeosteo.config import TrainConfig
from kneeosteo.errors import DataError
from kneeosteo.evaluation.evaluate import score
from kneeosteo.evaluation.metrics import format_table
from kneeosteo.evaluation.probes import format_probes
from kneeosteo.evaluation.task_scoring import format_task_metrics
from kneeosteo.experiments.task_trust import fit_task_domain, fit_task_trust, task_trust_line
from kneeosteo.experiments.trust_fit import fit_trust_from_split, trust_line
from kneeosteo.tasks import task_for
from kneeosteo.training.trainer import train

__all__ = ["train_and_score"]


def train_and_score(cfg: TrainConfig, resume: bool = False, console=print) -> Path:
    """Train ``cfg`` (resuming if asked), score the test set into the run folder, return the folder."""
    result = train(cfg, resume=resume, console=console)
    if result.is_main and not task_for(cfg.data).has_operating_point:
        _score_task_run(result, cfg, console)
    elif result.is_main:
        try:
            bundle = fit_trust_from_split(
                result.run,
                result.model,
                result.sets,
                operating_point=cfg.trust.operating_point,
                coverage=cfg.trust.coverage,
                acceptance=cfg.trust.domain_acceptance,
                device=result.device,
                train=result.train,
            )
        except DataError as exc:  # e.g. a validation part of one class: the trained model is kept, uncalibrated
            console(
                f"warning: no trust files fitted ({exc}); predictions will say calibrated: false. "
                f"Fit them later with `kneeosteo calibrate {result.run.path} DATA --out NEWRUN`"
            )
        else:
            result.run.save_trust(bundle)
            console(trust_line(bundle))
        metrics = score(
            result.run,
            result.model,
            result.test,
            result.sets,
            result.run.path,
            device=result.device,
            history=result.history,
            train=result.train,
        )
        console(format_table({result.run.path.name: metrics}))
        console(format_probes(metrics["shortcut_probes"]))
    result.ctx.barrier()  # no rank moves on (e.g. to reproduce's next cell) before rank 0 has written
    return result.run.path


def _score_task_run(result, cfg: TrainConfig, console) -> None:
    """A multiclass or regression run: its task trust on the validation images, then the test set."""
    try:
        trust = fit_task_trust(result.run, result.model, result.sets, cfg.trust.coverage, result.device)
    except DataError as exc:
        console(f"warning: no calibration fitted ({exc})")
    else:
        result.run.save_trust(trust)
        console(task_trust_line(trust))
    console(
        "domain check: "
        + fit_task_domain(result.run, result.model, result.train, cfg.trust.domain_acceptance, result.device)
    )
    metrics = score(
        result.run,
        result.model,
        result.test,
        result.sets,
        result.run.path,
        device=result.device,
        history=result.history,
    )
    console(format_task_metrics(result.run.path.name, metrics))
