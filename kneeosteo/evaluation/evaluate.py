"""`kneeosteo evaluate`: score a trained run on its test set or on any class-folder data set.

Nothing here prints: callers (the CLI, ``train_and_score``) show ``format_table`` of the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.split import SplitSets, load_split
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.evaluation import figures
from kneeosteo.evaluation.probes import shortcut_probes
from kneeosteo.evaluation.task_scoring import score_task, task_metrics
from kneeosteo.evaluation.trust_metrics import trust_metrics
from kneeosteo.features.cache import TensorCache, backbone_cache_id
from kneeosteo.features.prepare import PreparedSet, prepare
from kneeosteo.paths import cache_dir
from kneeosteo.run import RunDir
from kneeosteo.tasks import BINARY_PREDICTION_FIELDS, Binary, task_for
from kneeosteo.utils.atomic import write_json
from kneeosteo.utils.compute_path import compute_path
from kneeosteo.utils.csvfile import write_csv

__all__ = ["PREDICTION_FIELDS", "backbone_features", "evaluate_run", "predict_prepared", "raw_outputs", "score"]

PREDICTION_FIELDS = BINARY_PREDICTION_FIELDS


@torch.no_grad()
def raw_outputs(model, data: PreparedSet, prep: Preprocess, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """The model's outputs on ``data`` as they leave the head: logits, or a regression's values."""
    model.eval()
    out = [model(images=x, features=f).float().double().cpu() for x, f in data.batches(prep, device, batch_size)]
    return torch.cat(out).numpy()


def predict_prepared(
    model, data: PreparedSet, prep: Preprocess, device: str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """P(positive) (binary), class probabilities (multiclass) or values (regression) on ``data``."""
    z = torch.from_numpy(raw_outputs(model, data, prep, device, batch_size))
    return (getattr(model, "task", None) or Binary()).answer_of(z).double().numpy()


def score(
    run: RunDir,
    model,
    test: PreparedSet,
    sets: SplitSets,
    out: Path,
    threshold: float | None = None,
    device: str = "cpu",
    history: list[dict] | None = None,
    train: PreparedSet | None = None,
    probes: bool = True,
) -> dict:
    """Metrics with intervals, predictions.csv and figures for ``test`` under ``out``; returns the metrics.

    With ``probes`` the shortcut probes (:mod:`kneeosteo.evaluation.probes`) go into the metrics
    under ``shortcut_probes``; ``train`` (the prepared training originals) enables the two that
    need a training partition."""
    task = task_for(run.config)
    if not task.paper_metrics:
        return score_task(run, raw_outputs(model, test, run.config.preprocess, device), test, sets, out, history)
    threshold = run.config.threshold if threshold is None else threshold
    prob = predict_prepared(model, test, run.config.preprocess, device)
    y = test.targets.numpy().astype(int)
    metrics = task_metrics(task, y, prob, threshold=threshold)
    metrics["classes"] = sets.classes
    metrics["positive_class"] = sets.positive
    metrics["unreadable"] = test.bad
    env = run.config.record.get("environment") or {}
    metrics["computed_with"] = {  # results are identical on the same path, not across paths
        "training": {
            "precision": str(run.config.record.get("autocast", "unknown")),
            "cpu_capability": env.get("cpu_capability"),
            "onednn_max_cpu_isa": env.get("onednn_max_cpu_isa"),
        },
        "scoring": {"precision": "fp32", **compute_path()},
    }
    if probes:
        metrics["shortcut_probes"] = shortcut_probes(
            model,
            run.config.preprocess,
            sets.data,
            test.paths,
            y,
            prob,
            threshold,
            train=train,
            device=device,
            seed=int(run.config.settings.get("seed", 0)),
        )
    out.mkdir(parents=True, exist_ok=True)
    metrics["trust"] = trust_metrics(
        run, prob, y, None if test.features is None else test.features.numpy(), out, _folder_truth(sets, test.paths)
    )
    write_json(out / "metrics.json", metrics)
    write_csv(out / "predictions.csv", *task.prediction_table(test.paths, y, prob, threshold=threshold))
    if history:
        figures.curves(history, out)
    figures.confusion(metrics["counts"], sets.classes, out)
    figures.roc(y, prob, metrics["auc"]["value"], out)
    return metrics


def _folder_truth(sets: SplitSets, paths) -> np.ndarray | None:
    """The scored films' folder labels as class indices, where the split scores them against
    another truth (a held-out-source split: T-score truth) and every film has one; else None."""
    folder = sets.folder_labels
    index = {c: k for k, c in enumerate(sets.classes)}
    if not folder or any(folder.get(p) not in index for p in paths):
        return None
    return np.array([index[folder[p]] for p in paths], dtype=int)


def evaluate_run(
    run: str | Path | RunDir,
    data: str | Path | None = None,
    split: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    threshold: float | None = None,
    probes: bool = True,
    labels: str | Path | None = None,
    reference: str | Path | None = None,
    covariates: list[str] | None = None,
    definition: str | None = None,
    store_fused: bool = False,
) -> tuple[dict, Path]:
    """Score ``run`` on: a data set ``data`` (all of it; class folders, or the label manifest
    ``labels``), a split's test part, or its own split. Returns (metrics, the folder they were
    written to). The run's own ``merge`` applies to the data scored.

    ``reference`` and ``covariates``: also compare the image model with the clinical baselines on
    the scored films the reference manifest covers (:mod:`kneeosteo.evaluation.clinical`), against
    the reference truth under ``definition`` (default: the split's, else osteoporosis); the result
    goes into the metrics under ``clinical``. ``store_fused``: also fit the fused model on those
    films and store it in the run (``fused.json``, :mod:`kneeosteo.models.fused`), so that
    ``predict`` and the API answer from the image and the covariates."""
    if (reference is None) != (not covariates):
        raise ConfigError("--reference and --covariates go together: the clinical baseline needs both")
    if store_fused and reference is None:
        raise ConfigError(
            "--store-fused fits the fused model on the films of --reference with its --covariates: give both"
        )
    run = RunDir.open(run)
    cfg = run.config
    model = run.load_model(device)
    merge = cfg.settings.get("merge") or {}
    task = task_for(cfg)
    probes = probes and task.supports_shortcut_probes
    if split is not None or data is None:
        sets = load_split(
            split or run.split_file, data or cfg.record.get("data"), cfg.settings.get("fold"), target=cfg.target
        )
        if merge:
            sets = sets.merged(merge, task.merge_positive(cfg.positive))
        root = sets.data
    else:
        scan = scan_dataset(
            data,
            positive=cfg.positive,
            labels=labels,
            merge=merge,
            target=cfg.target,
            require_binary=task.require_binary,
            classes=task.expected_classes(cfg.classes),
        )
        root = Path(data)
        sets = SplitSets(
            root,
            scan.classes,
            scan.positive,
            [],
            [],
            [r.path for r in scan.records],
            labels={r.path: r.label for r in scan.records},
            values={r.path: r.values for r in scan.records if r.values},
            target=cfg.target,
        )
    if task.expected_classes(cfg.classes) not in (None, list(sets.classes)):
        raise DataError(
            f"{split or data or run.split_file}: classes {list(sets.classes)} differ from the model's "
            f"{list(cfg.classes)}"
        )
    test = prepare_part(model, sets.items("test"), root, cfg.preprocess, device, "test")
    train = (
        prepare_part(model, sets.items("train"), root, cfg.preprocess, device, "train")
        if probes and sets.train
        else None
    )
    if out is None:  # never overwrite the run's own test results with another data set's
        out = run.path if (data is None and split is None) else run.evaluation_dir(Path(split or data).stem)
    out = Path(out)
    metrics = score(run, model, test, sets, out, threshold, device, train=train, probes=probes)
    if reference is not None and task.supports_clinical_baselines:
        import json

        split_doc = json.loads(Path(split or run.split_file).read_text()) if (split or data is None) else {}
        definition = definition or (split_doc.get("reference") or {}).get("definition") or "osteoporosis"
        metrics["clinical"] = clinical_block(
            reference,
            covariates,
            definition,
            out / "predictions.csv",
            float(metrics.get("threshold", cfg.threshold)),
            run.model_id,
            store=run if store_fused else None,
        )
        write_json(out / "metrics.json", metrics)
    return metrics, out


def clinical_block(
    reference: str | Path,
    covariates: list[str],
    definition: str,
    predictions: Path,
    threshold: float,
    name: str,
    store: RunDir | None = None,
) -> dict:
    """The clinical comparison of the image model's ``predictions.csv`` on the films of ``reference``;
    ``store``: also fit the fused model on all of them and write it to that run's ``fused.json``."""
    import csv

    from kneeosteo.data.reference import read_reference
    from kneeosteo.evaluation.clinical import by_path, clinical_comparison, clinical_set

    ref = read_reference(reference)
    with open(predictions, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        probs = {r["path"]: float(r["probability"]) for r in csv.DictReader(fh)}
    scored = [p for p in probs if p in ref.files]
    if not scored:
        raise DataError(f"{reference}: none of the {len(probs)} scored films is in the reference manifest")
    cs = clinical_set(ref, scored, definition, covariates)
    out = clinical_comparison(cs, {f"image ({name})": (by_path(probs, cs.paths), threshold)})
    out.update(reference=str(reference), definition=definition, not_in_reference=len(probs) - len(scored))
    if store is not None:
        from kneeosteo.evaluation.clinical import fit_fused
        from kneeosteo.models.fused import FUSED_FILE
        from kneeosteo.utils.hashing import sha256_file

        row = next(r for r in out["rows"] if r["model"].startswith("fused ("))
        fused = fit_fused(
            cs,
            by_path(probs, cs.paths),
            store.config.weights_sha256,
            definition,
            {"reference": str(reference), "reference_sha256": sha256_file(reference), "predictions": str(predictions)},
            {
                "auc": row["auc"],
                "how": f"cross-fitted on the same films ({out['folds']} patient-level "
                "folds); the stored model is fitted on all of them, so no figure on these films tests it",
            },
        )
        write_json(store.path / FUSED_FILE, fused.to_json())
        store.update_record(fused={"sha256": sha256_file(store.path / FUSED_FILE)})  # the file first, then its record
        out["stored_fused"] = str(store.path / FUSED_FILE)
    return out


def prepare_part(
    model, items: list[tuple[str, int]], root: Path, prep: Preprocess, device: str, label: str
) -> PreparedSet:
    """Inputs, and the frozen backbone's features (cached), for scoring ``items`` (no augmentation)."""
    cached = model.use_backbone and model.freeze_backbone
    wi = model.backbone_weights
    backbone_id = backbone_cache_id(model.backbone_name, model.backbone, wi.sha256 if wi else None) if cached else None
    return prepare(
        items,
        root,
        prep,
        TensorCache(cache_dir() / "tensors"),
        backbone=model.backbone if cached else None,
        backbone_id=backbone_id,
        device=device,
        label=label,
    )


@torch.no_grad()
def backbone_features(
    model, data: PreparedSet, prep, device: str = "cpu", batch_size: int = 32, upside_down: bool = False
) -> np.ndarray | None:
    """(N, D) float64 backbone features of ``data`` (cached ones when the backbone is frozen,
    else computed now); None for a model without a backbone branch. ``upside_down``: of each
    input mirrored top to bottom (never cached; the orientation check's counter-examples)."""
    if model.backbone is None or not model.use_backbone:
        return None
    if data.features is not None and not upside_down:
        return data.features.double().numpy()
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model.extract_features(torch.flip(x, dims=[-2]) if upside_down else x).double().cpu()
                for x, _ in data.batches(prep, device, batch_size)
            ]
        ).numpy()
