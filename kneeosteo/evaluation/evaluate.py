"""`kneeosteo evaluate`: score a trained run on its test set or on any class-folder data set."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.scan import DataError, scan_dataset
from kneeosteo.data.split import SplitSets, load_split
from kneeosteo.evaluation import figures
from kneeosteo.evaluation.metrics import PAPER_COLUMNS, format_table, metrics_with_ci
from kneeosteo.models import load_checkpoint
from kneeosteo.paths import cache_dir
from kneeosteo.features.cache import TensorCache, backbone_cache_id
from kneeosteo.features.prepare import PreparedSet, prepare
from kneeosteo.utils.atomic import write_json, write_text


def run_settings(run: Path) -> dict:
    """The training settings saved in a run's config.json (under "run")."""
    try:
        return json.loads((Path(run) / "config.json").read_text())["run"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{run}: not a training run ({exc})") from exc


def run_preprocess(cfg: dict) -> Preprocess:
    ps = cfg["preprocess_spec"]
    return Preprocess(ps["preset"], ps["size"], tuple(ps["mean"]), tuple(ps["std"]), ps["clahe"])


@torch.no_grad()
def predict_prepared(model, data: PreparedSet, prep: Preprocess, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        x = prep.normalise(data.grey[sl].float()).to(device).contiguous(memory_format=torch.channels_last)
        feats = None if data.features is None else data.features[sl].to(device)
        out.append(torch.sigmoid(model(images=x, features=feats).float()).double().cpu())
    return torch.cat(out).numpy()


def _predictions_csv(paths, y, prob, threshold) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "probability", "prediction"])
    for p, t, q in zip(paths, y, prob):
        w.writerow([p, int(t), f"{q:.6f}", int(q >= threshold)])
    return buf.getvalue()


def score_and_write(run: Path, test: PreparedSet, sets: SplitSets, threshold: float, out: Path,
                    device: str = "cpu", history: list[dict] | None = None, model=None) -> dict:
    """Metrics with intervals, predictions.csv and figures for ``test`` under ``out``."""
    if model is None:
        model, _ = load_checkpoint(run)
        model.to(device)
    prep = run_preprocess(run_settings(run))
    prob = predict_prepared(model, test, prep, device)
    y = test.targets.numpy().astype(int)
    metrics = metrics_with_ci(y, prob, threshold=threshold)
    metrics["classes"] = sets.classes
    metrics["positive_class"] = sets.positive
    metrics["unreadable"] = test.bad
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    write_text(out / "predictions.csv", _predictions_csv(test.paths, y, prob, threshold))
    if history:
        figures.curves(history, out)
    figures.confusion(metrics["counts"], sets.classes, out)
    figures.roc(y, prob, metrics["auc"]["value"], out)
    print(format_table({Path(run).name: metrics}, PAPER_COLUMNS + ("auc",)))
    return metrics


def evaluate_run(run: str | Path, data: str | Path | None = None, split: str | Path | None = None,
                 out: str | Path | None = None, device: str = "cpu", threshold: float | None = None) -> dict:
    """Score ``run`` on: a class-folder data set ``data`` (all of it), a split's test part, or its own split."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise DataError(f"{run}: not a training run (no config.json)")
    cfg = run_settings(run)
    model, _ = load_checkpoint(run)
    model.to(device)
    if split is not None or data is None:
        sets = load_split(split or run / "split.json", data or cfg["data"], cfg.get("fold"))
        root = sets.data
    else:
        scan = scan_dataset(data, positive=cfg.get("positive", "osteoporosis"))
        root = Path(data)
        sets = SplitSets(root, scan.classes, scan.positive, [], [], [r.path for r in scan.records])
    prep = run_preprocess(cfg)
    cached = cfg.get("use_backbone", True) and not cfg.get("finetune", False)
    wi = cfg.get("backbone_weights_info") or {}
    backbone_id = backbone_cache_id(cfg["backbone"], model.backbone, wi.get("sha256")) if cached else None
    test = prepare(sets.items("test"), root, prep, TensorCache(cache_dir() / "tensors"),
                   backbone=model.backbone if cached else None, backbone_id=backbone_id, device=device, label="test")
    if out is None:  # never overwrite the run's own test results with another data set's
        out = run if (data is None and split is None) else run / "evaluations" / Path(split or data).stem
    return score_and_write(run, test, sets, cfg["threshold"] if threshold is None else threshold,
                           Path(out), device=device, model=model)
