"""`kneeosteo reproduce`: the grid behind the paper's Table I, on one split per seed shared by every model.

Each (model, seed[, fold]) is a *cell*: an ordinary run folder under
``DIR/cells/<model>/seed<S>[/fold<K>]``, trained and scored by
:func:`kneeosteo.experiments.pipeline.train_and_score`. A cell with a ``metrics.json`` is finished
and never recomputed; an interrupted cell resumes from its last epoch. Frozen-backbone features
are cached by (content, preprocessing, augmentation, backbone weights), so models sharing a
backbone share them. Under torchrun every rank walks the same cells, each trained
data-parallel; rank 0 writes the splits, timings and tables (:mod:`kneeosteo.experiments.table1`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kneeosteo.config import TrainConfig, load_config
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.split import make_split, write_split
from kneeosteo.errors import BackboneWeightsError, ConfigError
from kneeosteo.experiments.pipeline import train_and_score
from kneeosteo.experiments.table1 import Predictions, aggregate, write_table1
from kneeosteo.models.weights import find_default_weights
from kneeosteo.run import RunDir
from kneeosteo.tasks import task_for
from kneeosteo.training import distributed
from kneeosteo.utils.atomic import ensure_writable, write_json
from kneeosteo.utils.compute_path import cells_paths

__all__ = [
    "BASELINES",
    "HYBRID_BACKBONES",
    "OFFLINE_BACKBONES",
    "PAPER_MODELS",
    "Cell",
    "ModelSpec",
    "config_model",
    "default_models",
    "make_splits",
    "model_catalogue",
    "quick_display_only",
    "reproduce",
    "run_cell",
    "weights_available",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    key: str  # folder-safe id
    title: str
    backbone: str | None  # None: attention module only
    attention: bool
    paper_row: str | None = None  # its row in table1.PAPER_TABLE
    config: str | None = None  # a TOML settings file: the cell trains exactly these settings...
    limits: tuple[tuple[str, int], ...] = ()  # ...but for the grid's explicit --epochs/--patience
    trained: str | None = None  # what training changes, when not the default (a fine-tuned backbone)

    @property
    def use_backbone(self) -> bool:
        return self.backbone is not None


BASELINES = {
    "vgg19": "VGG19",
    "efficientnet_b0": "EfficientNetB0",
    "densenet169": "Densenet169",
    "vit_b_16": "ViT",
    "resnet50": "ResNet50",
}
HYBRID_BACKBONES = ("densenet169", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
OFFLINE_BACKBONES = ("efficientnet_lite0",)


def model_catalogue(backbones: tuple[str, ...] = HYBRID_BACKBONES) -> dict[str, ModelSpec]:
    """Every model reproduce knows: hybrids, backbone+FC baselines/ablations, AM+FC."""
    cat: dict[str, ModelSpec] = {}
    for b in backbones:
        cat[f"hybrid-{b}"] = ModelSpec(
            f"hybrid-{b}", f"Hybrid ({b} + AM)", b, True, "Ours" if b == "densenet169" else None
        )
    for b in dict.fromkeys(list(BASELINES) + list(backbones)):
        cat[f"fc-{b}"] = ModelSpec(f"fc-{b}", f"{b} + FC head (no AM)", b, False, BASELINES.get(b))
    cat["am-only"] = ModelSpec("am-only", "AM + FC head (no backbone)", None, True)
    return cat


def config_model(path: str, limits: dict[str, int] | None = None) -> ModelSpec:
    """A model given as a settings file (``configs/default_model.toml``): its key is the file's stem.
    ``limits``: the grid's explicit ``epochs``/``patience``, which override the file's (a user who
    asks the grid for at most 8 epochs gets that in every cell)."""
    cfg = load_config(path, {})
    tuned = None
    if cfg.model.use_backbone and cfg.model.finetune:
        tuned = (
            f"backbone's last {cfg.model.trainable_stages} stage(s) fine-tuned"
            if cfg.model.trainable_stages
            else "backbone fine-tuned"
        )
    return ModelSpec(
        Path(path).stem,
        f"{Path(path).stem} ({path})",
        cfg.model.backbone if cfg.model.use_backbone else None,
        cfg.model.attention,
        config=str(Path(path).resolve()),  # resolved: a Ray task may run elsewhere
        limits=tuple(sorted((limits or {}).items())),
        trained=tuned,
    )


PAPER_MODELS = ("hybrid-densenet169",) + tuple(f"fc-{b}" for b in BASELINES)


def default_models(quick: bool) -> list[str]:
    if quick:
        return [f"hybrid-{b}" for b in OFFLINE_BACKBONES] + [f"fc-{b}" for b in OFFLINE_BACKBONES] + ["am-only"]
    return list(model_catalogue())


def quick_display_only(models: list[str]) -> list[str]:
    """The paper's rows that --quick does not train, listed so its values stand beside ours."""
    return [m for m in PAPER_MODELS if m not in models]


def weights_available(backbone: str, allow_download: bool = True) -> tuple[bool, str]:
    """(True, source) if the default weights resolve (package, caches, one download try), else
    (False, why in a few words), without building the net."""
    try:
        _, source = find_default_weights(backbone, allow_download=allow_download)
        return True, source
    except BackboneWeightsError as exc:
        return False, exc.summary


@dataclass
class Cell:
    model: ModelSpec
    seed: int
    fold: int | None
    path: Path

    @property
    def run(self) -> RunDir:
        """The cell is an ordinary run folder."""
        return RunDir(self.path)


def _cells(out: Path, specs: list[ModelSpec], seeds: list[int], folds: int | None) -> list[Cell]:
    cells = []
    for s in seeds:
        for m in specs:
            for k in [None] if folds is None else range(folds):
                p = out / "cells" / m.key / f"seed{s}" / (f"fold{k}" if k is not None else "")
                cells.append(Cell(m, s, k, p))
    return cells


def run_cell(cell: Cell, base: TrainConfig, split_path: Path, random_init: bool) -> float:
    """Train+score one cell unless finished; returns the wall seconds it took (0 if cached)."""
    if cell.run.metrics_file.is_file():
        return 0.0
    m = cell.model
    if m.config:  # the file's own settings; the grid decides only the data, split, seed and device
        own = load_config(m.config, {})
        cfg = own.replace(
            data=base.data.path,
            out=str(cell.path),
            split=str(split_path),
            fold=cell.fold,
            seed=cell.seed,
            device=base.runtime.device,
            backbone_weights="none" if random_init else own.model.backbone_weights,
            **dict(m.limits),
        )
    else:
        cfg = base.replace(
            out=str(cell.path),
            split=str(split_path),
            fold=cell.fold,
            seed=cell.seed,
            backbone=m.backbone or "efficientnet_lite0",
            attention=m.attention,
            use_backbone=m.use_backbone,
            backbone_weights="none" if random_init else base.model.backbone_weights,
        )
    resume = (cell.path / "checkpoint" / "state.json").is_file()
    t = time.perf_counter()
    train_and_score(cfg, resume=resume, console=lambda msg: log.info("%s seed %s: %s", m.key, cell.seed, msg))
    seconds = time.perf_counter() - t
    if distributed.is_main_process():
        prev = (
            json.loads((cell.path / "timing.json").read_text())["seconds"]
            if (cell.path / "timing.json").is_file()
            else 0
        )
        write_json(cell.path / "timing.json", {"seconds": round(prev + seconds, 1)})
    return seconds


def make_splits(
    data: Path,
    out: Path,
    seeds: list[int],
    protocol: str,
    folds: int,
    positive: str,
    test_size: int = 72,
    scan_kw: dict | None = None,
    reference: Path | None = None,
    definition: str = "osteoporosis",
) -> dict[int, Path]:
    """One split file per seed, written once and reused on rerun (so a resume sees the same split).
    ``scan_kw``: the label manifest and merge (``TrainConfig.scan_options``); ``reference`` and
    ``definition``: the held-out source of ``--protocol holdout-reference`` (its test films are
    the same every seed)."""
    from kneeosteo.data.reference import read_reference

    paths, scan, ref = {}, None, None
    for s in seeds:
        p = out / "splits" / f"seed{s}.json"
        if not p.is_file():
            scan = scan or scan_dataset(data, positive=positive, **(scan_kw or {}))
            ref = ref or (read_reference(reference, data) if reference is not None else None)
            write_split(
                make_split(
                    scan, protocol, seed=s, test_size=test_size, folds=folds, reference=ref, definition=definition
                ),
                p,
            )
        paths[s] = p
    return paths


def _read_predictions(run: RunDir) -> dict[str, tuple[int, float]]:
    # surrogateescape: file names that are not UTF-8 were written as their bytes (utils.atomic)
    with open(run.predictions_file, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return {r["path"]: (int(r["label"]), float(r["probability"])) for r in csv.DictReader(fh)}


def _seed_predictions(cells: list[Cell]) -> dict[tuple[str, int], Predictions]:
    """Each (model, seed)'s test predictions; the folds of a k-fold seed are pooled."""
    preds: dict[tuple[str, int], dict] = {}
    for c in cells:
        if c.run.predictions_file.is_file():
            preds.setdefault((c.model.key, c.seed), {}).update(_read_predictions(c.run))
    return preds


def _seed_probes(cells: list[Cell]) -> dict[tuple[str, int], list[dict]]:
    """Each (model, seed)'s shortcut probes from its metrics.json, one entry per fold."""
    out: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        if c.run.metrics_file.is_file():
            probes = (c.run.read_json(c.run.metrics_file.name) or {}).get("shortcut_probes")
            if probes:
                out.setdefault((c.model.key, c.seed), []).append(probes)
    return out


def _seconds(specs: list[ModelSpec], cells: list[Cell]) -> dict[str, float]:
    seconds = {m.key: 0.0 for m in specs}
    for c in cells:
        if (c.path / "timing.json").is_file():
            seconds[c.model.key] += json.loads((c.path / "timing.json").read_text())["seconds"]
    return seconds


def _silent(*_args, **_kw) -> None:
    pass


def reproduce(
    data: Path,
    out: Path,
    base: TrainConfig,
    models: list[str],
    seeds: list[int],
    protocol: str = "paper",
    folds: int = 5,
    allow_random_init: bool = False,
    shortcut: dict | None = None,
    console=print,
    test_size: int = 72,
    display_only: tuple[str, ...] = (),
    ray: str | None = None,
    cpus_per_cell: float = 1.0,
    reference: Path | None = None,
    definition: str = "osteoporosis",
    covariates: list[str] | None = None,
    limits: dict[str, int] | None = None,
) -> list[dict]:
    """Run every cell of ``models``; ``display_only`` models get a table row (paper values) but no run.
    ``reference``/``definition``: the held-out source of ``protocol="holdout-reference"``;
    ``limits``: ``epochs``/``patience`` given on the command line, applied to settings-file models
    too (the other models take them from ``base``).
    ``covariates``: also write the clinical baselines beside every model (``clinical.md``/``.json``,
    :func:`kneeosteo.evaluation.clinical.over_seeds`).

    ``ray``: None runs the cells here one after another; an address (``"local"``, ``"auto"``,
    ``HOST:PORT``) runs each unfinished cell as a Ray task (:mod:`kneeosteo.experiments.ray_grid`)."""
    cat = model_catalogue()
    cat.update({m: config_model(m, limits) for m in models if m.endswith(".toml")})
    unknown = [m for m in list(models) + list(display_only) if m not in cat]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown}; known: {', '.join(cat)}")
    specs = [cat[m] for m in models]
    ensure_writable(out)  # before hours of training, not after
    if ray is not None and distributed.under_torchrun():
        raise ConfigError(
            "--ray runs each cell as one Ray task; it cannot be combined with --devices/--nodes (torchrun)"
        )
    out = Path(out).resolve()  # Ray tasks may run in another working directory
    ctx = distributed.context(base.runtime.device)
    if not ctx.is_main:
        console = _silent
    status, runnable, random_init = {}, [], set()
    avail: dict[str, tuple[bool, str]] = {}
    for m in specs:
        if m.backbone is not None and m.backbone not in avail:
            avail[m.backbone] = weights_available(m.backbone)
        ok, why = avail.get(m.backbone, (True, ""))
        if ok:
            runnable.append(m)
        elif allow_random_init:
            runnable.append(m)
            random_init.add(m.key)
            status[m.key] = "random init (no pretrained weights)"
        else:
            status[m.key] = f"skipped: {why}"
            console(f"skipping {m.key}: {why}")
    for key in display_only:
        specs.append(cat[key])
        status[key] = "not run (--quick: offline backbones only)"
    for m in runnable:
        if m.key not in random_init:
            status[m.key] = m.trained or ("frozen backbone" if m.backbone else "trained from scratch")
    ref = next(
        (k for k in ("hybrid-densenet169", "hybrid-efficientnet_lite0") if any(m.key == k for m in runnable)), None
    )
    if not task_for(base.data).paper_metrics:
        raise ConfigError(
            f"reproduce compares binary classifiers (Table I, McNemar, DeLong); this is a {task_for(base.data)} "
            "task: train and evaluate it with `kneeosteo train`, or --merge to two classes"
        )
    if (protocol == "holdout-reference") != (reference is not None):
        raise ConfigError("--protocol holdout-reference and --reference go together")
    if covariates and reference is None:
        raise ConfigError("--covariates needs --protocol holdout-reference --reference (the covariates' manifest)")
    if ctx.is_main:
        make_splits(
            data, out, seeds, protocol, folds, base.data.positive, test_size, base.scan_options(), reference, definition
        )
    ctx.barrier()
    splits = make_splits(data, out, seeds, protocol, folds, base.data.positive, test_size)  # now only reads
    cells = _cells(out, runnable, seeds, folds if protocol == "kfold" else None)
    if ray is not None:
        from kneeosteo.experiments.ray_grid import run_cells_ray

        base = base.replace(data=str(Path(base.data.path).resolve()) if base.data.path else None)
        run_cells_ray(run_cell, cells, base, splits, random_init, ray, cpus_per_cell, console)
    for i, c in enumerate(cells if ray is None else [], 1):
        fold = f" fold {c.fold}" if c.fold is not None else ""
        done = c.run.metrics_file.is_file()
        console(f"[{i}/{len(cells)}] {c.model.key} seed {c.seed}{fold}" + (" (done, reused)" if done else ""))
        secs = run_cell(c, base, splits[c.seed], c.model.key in random_init)
        if secs:
            console(f"    {secs:.0f} s")
    if not ctx.is_main:
        return []
    rows, info = aggregate(
        specs, seeds, _seed_predictions(cells), _seconds(specs, cells), status, ref, shortcut, _seed_probes(cells)
    )
    if reference is not None:
        info["held_out"] = json.loads(splits[seeds[0]].read_text()).get("reference")
    info.update(
        reference=ref,
        seeds=seeds,
        protocol=protocol,
        models=models,
        compute_paths=cells_paths([c.run.config.record for c in cells if c.run.config_file.is_file()]),
    )
    write_table1(out, rows, info)
    if covariates:
        write_clinical(out, reference, definition, covariates, cells, splits[seeds[0]])
    return rows


def write_clinical(
    out: Path, reference: Path, definition: str, covariates: list[str], cells: list[Cell], split_path: Path
) -> None:
    """``clinical.json`` and ``clinical.md``: the clinical logistic, OST and each model's fused
    model on the held-out films, every seed."""
    from kneeosteo.data.reference import read_reference
    from kneeosteo.evaluation.clinical import clinical_set, over_seeds, render_over_seeds
    from kneeosteo.utils.atomic import write_text

    test = json.loads(split_path.read_text())["test"]
    cs = clinical_set(read_reference(reference), test, definition, covariates)
    preds = {k: {p: v[1] for p, v in d.items()} for k, d in _seed_predictions(cells).items()}
    thresholds = {
        c.model.key: float((c.run.read_json(c.run.metrics_file.name) or {}).get("threshold", 0.5))
        for c in cells
        if c.run.metrics_file.is_file()
    }
    doc = over_seeds(cs, preds, thresholds)
    doc.update(reference=str(reference), definition=definition)
    write_json(out / "clinical.json", doc)
    write_text(out / "clinical.md", render_over_seeds(doc))
