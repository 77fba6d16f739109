"""`kneeosteo reproduce`: the paper's Table I, on one split per seed shared by every model.

Each (model, seed[, fold]) is a *cell*: an ordinary training run folder under
``DIR/cells/<model>/seed<S>[/fold<K>]``. A cell with a ``metrics.json`` is finished and never
recomputed; an interrupted cell resumes from its last epoch. Frozen-backbone features are
cached by (content, preprocessing, augmentation, backbone weights), so models sharing a
backbone share them. Under torchrun every rank walks the same cells, each trained
data-parallel; rank 0 writes the splits, timings and tables.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.split import make_split, write_split
from kneeosteo.evaluation.metrics import PAPER_COLUMNS, binary_metrics
from kneeosteo.evaluation.stats import delong_test, mcnemar_exact, mean_std_ci
from kneeosteo.models.backbones import BackboneWeightsError, _default_weights_file, get_backbone_spec
from kneeosteo.training import distributed
from kneeosteo.config import TrainConfig
from kneeosteo.utils.atomic import ensure_writable, write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = PAPER_COLUMNS + ("auc",)

# The paper's Table I, as printed.
PAPER_TABLE = {
    "VGG19": (0.8889, 0.7143, 0.9211, 0.2857, 0.7763, 0.8046, 0.6294),
    "EfficientNetB0": (0.9259, 0.7347, 0.8774, 0.2643, 0.8026, 0.8276, 0.6029),
    "Densenet169": (0.8571, 0.8049, 0.8684, 0.1951, 0.8289, 0.8354, 0.5892),
    "ViT": (0.9444, 0.6852, 0.7782, 0.3148, 0.7500, 0.8043, 0.6498),
    "ResNet50": (0.8571, 0.7083, 0.8947, 0.2917, 0.7632, 0.7907, 0.6236),
    "Ours": (0.8293, 0.8710, 0.8947, 0.1290, 0.8472, 0.8608, 0.5834),
}


@dataclass(frozen=True)
class ModelSpec:
    key: str  # folder-safe id
    title: str
    backbone: str | None  # None: attention module only
    attention: bool
    paper_row: str | None = None

    @property
    def use_backbone(self) -> bool:
        return self.backbone is not None


BASELINES = {"vgg19": "VGG19", "efficientnet_b0": "EfficientNetB0", "densenet169": "Densenet169",
             "vit_b_16": "ViT", "resnet50": "ResNet50"}
HYBRID_BACKBONES = ("densenet169", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
OFFLINE_BACKBONES = ("efficientnet_lite0",)


def model_catalogue(backbones: tuple[str, ...] = HYBRID_BACKBONES) -> dict[str, ModelSpec]:
    """Every model reproduce knows: hybrids, backbone+FC baselines/ablations, AM+FC."""
    cat: dict[str, ModelSpec] = {}
    for b in backbones:
        cat[f"hybrid-{b}"] = ModelSpec(f"hybrid-{b}", f"Hybrid ({b} + AM)", b, True,
                                       "Ours" if b == "densenet169" else None)
    for b in dict.fromkeys(list(BASELINES) + list(backbones)):
        cat[f"fc-{b}"] = ModelSpec(f"fc-{b}", f"{b} + FC head (no AM)", b, False, BASELINES.get(b))
    cat["am-only"] = ModelSpec("am-only", "AM + FC head (no backbone)", None, True)
    return cat


PAPER_MODELS = ("hybrid-densenet169",) + tuple(f"fc-{b}" for b in BASELINES)


def default_models(quick: bool) -> list[str]:
    if quick:
        return [f"hybrid-{b}" for b in OFFLINE_BACKBONES] + [f"fc-{b}" for b in OFFLINE_BACKBONES] + ["am-only"]
    return list(model_catalogue())


def quick_display_only(models: list[str]) -> list[str]:
    """The paper's rows that --quick does not train, listed so its values stand beside ours."""
    return [m for m in PAPER_MODELS if m not in models]


def weights_available(backbone: str, allow_download: bool = True) -> tuple[bool, str]:
    """Resolve the default weights file (package, caches, one download try) without building the net."""
    try:
        _, source = _default_weights_file(get_backbone_spec(backbone), allow_download=allow_download)
        return True, source
    except BackboneWeightsError as exc:
        return False, str(exc).splitlines()[0]


def _read_predictions(cell: Path) -> dict[str, tuple[int, float]]:
    # surrogateescape: file names that are not UTF-8 were written as their bytes (utils.atomic)
    with open(cell / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return {r["path"]: (int(r["label"]), float(r["probability"])) for r in csv.DictReader(fh)}


@dataclass
class Cell:
    model: ModelSpec
    seed: int
    fold: int | None
    path: Path


def _cells(out: Path, specs: list[ModelSpec], seeds: list[int], folds: int | None) -> list[Cell]:
    cells = []
    for s in seeds:
        for m in specs:
            for k in ([None] if folds is None else range(folds)):
                p = out / "cells" / m.key / f"seed{s}" / (f"fold{k}" if k is not None else "")
                cells.append(Cell(m, s, k, p))
    return cells


def run_cell(cell: Cell, base: TrainConfig, split_path: Path, random_init: bool) -> float:
    """Train+score one cell unless finished; returns the wall seconds it took (0 if cached)."""
    from kneeosteo.training.trainer import train

    if (cell.path / "metrics.json").is_file():
        return 0.0
    m = cell.model
    cfg = replace(
        base, out=str(cell.path), split=str(split_path), fold=cell.fold, seed=cell.seed,
        backbone=m.backbone or "efficientnet_lite0", attention=m.attention, use_backbone=m.use_backbone,
        backbone_weights="none" if random_init else base.backbone_weights,
    )
    resume = (cell.path / "checkpoint" / "state.json").is_file()
    t = time.perf_counter()
    train(cfg, resume=resume, console=lambda msg: log.info("%s seed %s: %s", m.key, cell.seed, msg))
    seconds = time.perf_counter() - t
    if distributed.is_main_process():
        prev = json.loads((cell.path / "timing.json").read_text())["seconds"] if (cell.path / "timing.json").is_file() else 0
        write_json(cell.path / "timing.json", {"seconds": round(prev + seconds, 1)})
    return seconds


def make_splits(data: Path, out: Path, seeds: list[int], protocol: str, folds: int, positive: str,
                test_size: int = 72) -> dict[int, Path]:
    """One split file per seed, written once and reused on rerun (so a resume sees the same split)."""
    paths, scan = {}, None
    for s in seeds:
        p = out / "splits" / f"seed{s}.json"
        if not p.is_file():
            scan = scan or scan_dataset(data, positive=positive)
            write_split(make_split(scan, protocol, seed=s, test_size=test_size, folds=folds), p)
        paths[s] = p
    return paths


def _seed_predictions(cells: list[Cell]) -> dict[tuple[str, int], dict[str, tuple[int, float]]]:
    preds: dict[tuple[str, int], dict] = {}
    for c in cells:
        if (c.path / "predictions.csv").is_file():
            preds.setdefault((c.model.key, c.seed), {}).update(_read_predictions(c.path))
    return preds


def aggregate(specs: list[ModelSpec], seeds: list[int], cells: list[Cell], status: dict[str, str],
              reference: str | None, shortcut: dict | None) -> tuple[list[dict], dict]:
    preds = _seed_predictions(cells)
    seconds = {m.key: 0.0 for m in specs}
    for c in cells:
        if (c.path / "timing.json").is_file():
            seconds[c.model.key] += json.loads((c.path / "timing.json").read_text())["seconds"]
    # every model of a seed must have been scored on the same images
    same_images = all(
        len({tuple(sorted(preds[(m.key, s)])) for m in specs if (m.key, s) in preds}) <= 1 for s in seeds
    )
    rows = []
    for m in specs:
        row = {"model": m.key, "title": m.title, "status": status.get(m.key, "ok"), "paper_row": m.paper_row or "",
               "seeds": 0, "seconds": round(seconds[m.key], 1)}
        per_seed = [preds[(m.key, s)] for s in seeds if (m.key, s) in preds]
        row["seeds"] = len(per_seed)
        for col in COLUMNS:
            vals = []
            for p in per_seed:
                y = np.array([v[0] for v in p.values()])
                prob = np.array([v[1] for v in p.values()])
                vals.append(binary_metrics(y, prob)[col])
            stat = mean_std_ci(vals) if vals else {"mean": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan}
            if col != "loss":  # a t-interval can overshoot [0, 1]; the metric cannot
                stat = {**stat, "ci_low": max(stat["ci_low"], 0.0), "ci_high": min(stat["ci_high"], 1.0)}
            row.update({f"{col}_mean": stat["mean"], f"{col}_std": stat["std"],
                        f"{col}_ci_low": stat["ci_low"], f"{col}_ci_high": stat["ci_high"]})
            paper = PAPER_TABLE.get(m.paper_row or "")
            row[f"{col}_paper"] = paper[PAPER_COLUMNS.index(col)] if paper and col in PAPER_COLUMNS else np.nan
        if reference and m.key != reference and per_seed:
            row.update(_paired(preds, m.key, reference, seeds))
        rows.append(row)
    if shortcut and shortcut.get("accuracy") is not None:
        lo, hi = shortcut["accuracy_ci95"]
        rows.append({"model": "metadata-only", "title": "File metadata only (audit shortcut check)",
                     "status": "reference", "seeds": 0, "accuracy_mean": shortcut["accuracy"],
                     "accuracy_ci_low": lo, "accuracy_ci_high": hi, "auc_mean": shortcut["auc"]})
    return rows, {"same_test_images": same_images}


def _paired(preds, key: str, ref: str, seeds: list[int]) -> dict:
    """McNemar and DeLong against the reference hybrid, pooling (seed, image) pairs over seeds."""
    y, pa, pb = [], [], []
    for s in seeds:
        a, b = preds.get((key, s)), preds.get((ref, s))
        if not a or not b:
            continue
        for path in sorted(set(a) & set(b)):
            y.append(a[path][0])
            pa.append(a[path][1])
            pb.append(b[path][1])
    if not y:
        return {}
    y, pa, pb = np.array(y), np.array(pa), np.array(pb)
    mc = mcnemar_exact((pa >= 0.5) == y, (pb >= 0.5) == y)
    out = {"mcnemar_b": mc["b"], "mcnemar_c": mc["c"], "mcnemar_p": mc["pvalue"], "paired_n": len(y)}
    try:
        out["delong_p"] = delong_test(y, pa, pb)["pvalue"]
    except ValueError:
        out["delong_p"] = np.nan
    return out


def _fmt(row: dict, col: str) -> str:
    m = row.get(f"{col}_mean")
    if m is None or (isinstance(m, float) and np.isnan(m)):
        return "-"
    sd, lo, hi = row.get(f"{col}_std"), row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
    s = f"{m:.3f}"
    if sd is not None and not np.isnan(sd):
        s += f" ± {sd:.3f}"
    if lo is not None and not np.isnan(lo):
        s += f" [{lo:.3f}, {hi:.3f}]"
    return s


def render_markdown(rows: list[dict], info: dict) -> str:
    head = "| model | status | seeds | " + " | ".join(COLUMNS) + " | paper acc | McNemar p | DeLong p | time (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]  # a delimiter row per header cell, or no table
    for r in rows:
        paper = r.get("accuracy_paper")
        paper_s = f"{paper:.4f} ({r['paper_row']})" if paper is not None and not np.isnan(paper) else "-"
        p = lambda k: f"{r[k]:.3g}" if k in r and r[k] is not None and not np.isnan(r[k]) else "-"  # noqa: E731
        lines.append(
            f"| {r['title']} | {r['status']} | {r.get('seeds', 0)} | " + " | ".join(_fmt(r, c) for c in COLUMNS)
            + f" | {paper_s} | {p('mcnemar_p')} | {p('delong_p')} | {r.get('seconds', '-')} |"
        )
    lines += [
        "",
        "Cells: mean ± std over seeds [95% t-interval over seeds]. Paired tests are against the reference "
        f"hybrid ({info.get('reference')}), pooling the (seed, test image) pairs of all seeds: exact McNemar on "
        "correctness at threshold 0.5, DeLong on AUC.",
        f"Every model of a seed was scored on the same test images: {'yes' if info.get('same_test_images') else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def forest_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kneeosteo.utils.atomic import atomic_path

    shown = [r for r in rows if r.get("seeds") or r["model"] == "metadata-only"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(shown) + 1.5), sharey=True)
    for ax, col in zip(axes, ("accuracy", "auc")):
        for i, r in enumerate(shown):
            m, lo, hi = r.get(f"{col}_mean"), r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high")
            if m is None or np.isnan(m):
                continue
            err = None if lo is None or np.isnan(lo) else [[max(m - lo, 0.0)], [max(hi - m, 0.0)]]
            ax.errorbar(m, i, xerr=err, fmt="o", capsize=3)
            paper = r.get(f"{col}_paper")
            if paper is not None and not np.isnan(paper):
                ax.plot(paper, i, "rx")
        ax.set_title(f"{col} (95% CI over seeds; x = paper)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(shown)), [r["title"] for r in shown])
    axes[0].invert_yaxis()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _silent(*_args, **_kw) -> None:
    pass


def reproduce(data: Path, out: Path, base: TrainConfig, models: list[str], seeds: list[int], protocol: str = "paper",
              folds: int = 5, allow_random_init: bool = False, shortcut: dict | None = None, console=print,
              test_size: int = 72, display_only: tuple[str, ...] = ()) -> list[dict]:
    """Run every cell of ``models``; ``display_only`` models get a table row (paper values) but no run."""
    cat = model_catalogue()
    unknown = [m for m in list(models) + list(display_only) if m not in cat]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(cat)}")
    specs = [cat[m] for m in models]
    ensure_writable(out)  # before hours of training, not after
    ctx = distributed.context(base.device)
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
            status[m.key] = "frozen backbone" if m.backbone else "trained from scratch"
    ref = next((k for k in ("hybrid-densenet169", "hybrid-efficientnet_lite0") if any(m.key == k for m in runnable)), None)
    if ctx.is_main:
        make_splits(data, out, seeds, protocol, folds, base.positive, test_size)
    ctx.barrier()
    splits = make_splits(data, out, seeds, protocol, folds, base.positive, test_size)  # now only reads
    cells = _cells(out, runnable, seeds, folds if protocol == "kfold" else None)
    for i, c in enumerate(cells, 1):
        fold = f" fold {c.fold}" if c.fold is not None else ""
        done = (c.path / "metrics.json").is_file()
        console(f"[{i}/{len(cells)}] {c.model.key} seed {c.seed}{fold}" + (" (done, reused)" if done else ""))
        secs = run_cell(c, base, splits[c.seed], c.model.key in random_init)
        if secs:
            console(f"    {secs:.0f} s")
    if not ctx.is_main:
        return []
    rows, info = aggregate(specs, seeds, cells, status, ref, shortcut)
    info.update(reference=ref, seeds=seeds, protocol=protocol, models=models)
    write_text(out / "table1.csv", table_csv(rows))
    write_text(out / "table1.md", render_markdown(rows, info))
    write_json(out / "table1.json", {"info": info, "rows": rows})
    forest_plot(rows, out / "table1.png")
    return rows
