"""The auxiliary T-score target, cross-validated on the held-out source (issue 32; rule of
research/DEFAULT_CHOICE.md, 2026-12-07 12:02).

    python research/aux_tscore_cv.py GRID DATA --reference DATA/tscores.csv --work DIR \\
        [--config configs/levers/knee384.toml] [--seeds 0] [--folds 5] [--epochs 8] [--patience 3] \\
        [--aux-weight 1.0] [--base-row knee384] [--out docs/results/research/AUX_TSCORE_CV]

GRID: the ``kneeosteo reproduce --protocol holdout-reference`` folder (its ``splits/`` and the
``--base-row`` cells). The T-score is known only on the held-out films, so a model that learns it
is scored on the ones it did not see: the held-out films go into ``--folds`` folds (patient =
the sheet's ``source_id``, exact and near duplicates together, stratified by WHO truth, drawn once
with seed 0); for fold k and grid seed s the training films are seed s's (KOP folder labels) plus
the other folds' held-out films with their WHO truth as label, seed s's validation films choose
the epoch, fold k's films are the test. Two arms: ``site`` (those films as labelled training
films) and ``site+aux`` (the same with ``--aux-target t_score``). Per arm and seed the
out-of-fold predictions are pooled; AUCs with DeLong intervals under each truth, and paired DeLong
differences against the other arm and against the grid's cell of the same seed (which never saw
any held-out film). Writes ``.md`` and ``.json``; a finished cell is reused on rerun. Not a
package feature.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bundle_default_model import seed_predictions  # noqa: E402

from kneeosteo.config import load_config  # noqa: E402
from kneeosteo.data.reference import DEFINITIONS, read_reference  # noqa: E402
from kneeosteo.data.scan import scan_dataset  # noqa: E402
from kneeosteo.data.split import make_split  # noqa: E402
from kneeosteo.evaluation.stats import delong_auc_ci, delong_test  # noqa: E402
from kneeosteo.experiments.pipeline import train_and_score  # noqa: E402
from kneeosteo.utils.atomic import write_json, write_text  # noqa: E402

ARMS = {"site": {}, "site+aux": {"aux_target": "t_score"}}


def assign_folds(doc: dict, ref, data: Path, work: Path, folds: int) -> dict[str, int]:
    """Held-out film -> fold: a k-fold split of a manifest of the test films (label = their WHO
    truth from the split, patient = the sheet's source_id), so patients and duplicates stay in one fold."""
    manifest = work / "heldout_manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id"])
        for p in doc["test"]:
            w.writerow([p, doc["labels"][p], sorted(r.patient for r in ref.files[p].rows)[0]])
    kfold = make_split(scan_dataset(data, labels=manifest), "kfold", seed=0, folds=folds, val_fraction=0.15)
    fold_of = {p: k for k, part in enumerate(kfold["folds"]) for p in part["test"]}
    lost = sorted(set(doc["test"]) - set(fold_of))
    if lost:
        raise SystemExit(f"{len(lost)} held-out films fell out of the k-fold split (duplicates?), e.g. {lost[0]}")
    return fold_of


def fold_split(doc: dict, fold_of: dict[str, int], k: int, folds: int) -> dict:
    """Seed s's split with the other folds' held-out films moved into training (labelled with
    their WHO truth, which the split's ``labels`` already hold) and fold k's as the test."""
    d = copy.deepcopy(doc)
    moved = [p for p in doc["test"] if fold_of[p] != k]
    d["train"] = doc["train"] + moved
    d["test"] = [p for p in doc["test"] if fold_of[p] == k]
    d["folder_labels"] = {p: v for p, v in doc.get("folder_labels", {}).items() if p in set(d["test"])}
    d["cv"] = {"fold": k, "folds": folds, "held_out_films_in_training": len(moved)}
    return d


def run_cell(args, doc: dict, fold_of: dict[str, int], seed: int, k: int, arm: str) -> Path:
    out = args.work / f"seed{seed}" / arm.replace("+", "_") / f"fold{k}"
    if (out / "metrics.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    split = args.work / f"seed{seed}" / f"split_fold{k}.json"
    write_json(split, fold_split(doc, fold_of, k, args.folds))
    extra = {**ARMS[arm], **({"aux_weight": args.aux_weight} if ARMS[arm] else {})}
    cfg = load_config(
        args.config,
        {
            "data": str(args.data),
            "out": str(out),
            "split": str(split),
            "seed": seed,
            "epochs": args.epochs,
            "patience": args.patience,
            **extra,
        },
    )
    train_and_score(cfg, console=print)
    return out


def pooled(cells: list[Path]) -> dict[str, float]:
    probs: dict[str, float] = {}
    for cell in cells:
        with open(cell / "predictions.csv", newline="") as fh:
            probs.update({r["path"]: float(r["probability"]) for r in csv.DictReader(fh)})
    return probs


def diff(y, a, b) -> dict:
    t = delong_test(y, a, b)
    return {k: float(t[k]) for k in ("diff", "ci_low", "ci_high", "pvalue")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--config", default="configs/levers/knee384.toml")
    ap.add_argument("--seeds", default="0", help="comma-separated grid seeds")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--base-row", default="knee384")
    ap.add_argument("--out", type=Path, default=Path("docs/results/research/AUX_TSCORE_CV"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    ref = read_reference(args.reference, args.data)
    base = seed_predictions(args.grid, args.base_row)
    docs = {s: json.loads((args.grid / "splits" / f"seed{s}.json").read_text()) for s in seeds}
    fold_of = assign_folds(docs[seeds[0]], ref, args.data, args.work, args.folds)
    films = sorted(fold_of)
    for s in seeds:
        if sorted(docs[s]["test"]) != films:
            raise SystemExit(f"seed {s}'s held-out films differ from seed {seeds[0]}'s")
    result: dict = {
        "grid": str(args.grid),
        "films": len(films),
        "folds": {str(k): sum(v == k for v in fold_of.values()) for k in range(args.folds)},
        "settings": {
            "config": args.config,
            "epochs": args.epochs,
            "patience": args.patience,
            "aux_weight": args.aux_weight,
        },
        "seeds": {},
    }
    for s in seeds:
        cells = {arm: [run_cell(args, docs[s], fold_of, s, k, arm) for k in range(args.folds)] for arm in ARMS}
        probs = {arm: pooled(c) for arm, c in cells.items()}
        probs[args.base_row] = {p: v[1] for p, v in base[s].items()}
        aux_rec = [json.loads((c / "config.json").read_text())["record"]["aux_target"] for c in cells["site+aux"]]
        seed_doc: dict = {"aux_films_with_value": [r["films_with_value"] for r in aux_rec]}
        for definition in DEFINITIONS:
            truth = {p: int(ref.files[p].positive(definition)) for p in films}
            y = np.array([truth[p] for p in films])
            score = {arm: np.array([pr[p] for p in films]) for arm, pr in probs.items()}
            seed_doc[definition] = {
                "auc": {arm: delong_auc_ci(y, v) for arm, v in score.items()},
                "aux_minus_site": diff(y, score["site+aux"], score["site"]),
                "site_minus_base": diff(y, score["site"], score[args.base_row]),
                "aux_minus_base": diff(y, score["site+aux"], score[args.base_row]),
                "positives": int(y.sum()),
            }
        result["seeds"][str(s)] = seed_doc
    who = [result["seeds"][str(s)]["osteoporosis"]["aux_minus_site"] for s in seeds]
    above = all(d["diff"] > 0 for d in who)
    excludes = sum(d["ci_low"] > 0 for d in who)
    result["rule"] = {
        "above_on_every_seed": above,
        "seeds_with_interval_above_0": excludes,
        "helps": bool(above and excludes * 2 >= len(seeds)),
    }
    write_json(args.out.with_suffix(".json"), result)
    write_text(args.out.with_suffix(".md"), report(result, seeds, args))
    print(args.out.with_suffix(".md").read_text())


def report(result: dict, seeds: list[int], args) -> str:
    lines = [
        "# The auxiliary T-score target, cross-validated on the held-out source (issue 32)",
        "",
        f"{result['films']} held-out films in {args.folds} patient-grouped folds (sizes "
        f"{', '.join(map(str, result['folds'].values()))}); per fold the other folds' films join grid seed s's training films "
        "with their WHO truth as label; `"
        f"{args.config}`, {args.epochs} epochs at most, patience {args.patience}; site+aux adds `--aux-target t_score "
        f"--aux-weight {args.aux_weight}`. Out-of-fold predictions pooled per arm; `{args.base_row}`: the grid's cell "
        "of the same seed, trained without any held-out film. Rule: research/DEFAULT_CHOICE.md (2026-12-07 12:02), "
        "written before any cell. Generated by `research/aux_tscore_cv.py`.",
        "",
    ]
    for definition, (title, _) in DEFINITIONS.items():
        lines += [
            f"## Truth: {title}",
            "",
            f"| seed | {args.base_row} AUC | site AUC | site+aux AUC | site+aux - site [95% CI] | "
            f"site - {args.base_row} [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for s in seeds:
            d = result["seeds"][str(s)][definition]
            a = d["auc"]

            def cell(v):
                return f"{v['auc']:.3f} [{v['ci_low']:.2f}, {v['ci_high']:.2f}]"

            def dd(v):
                return f"{v['diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"

            lines.append(
                f"| {s} | {cell(a[args.base_row])} | {cell(a['site'])} | {cell(a['site+aux'])} | "
                f"{dd(d['aux_minus_site'])} | {dd(d['site_minus_base'])} |"
            )
        lines.append("")
    r = result["rule"]
    lines += [
        "## The rule (WHO truth)",
        "",
        f"- site+aux above site on every seed run ({len(seeds)}): **{'yes' if r['above_on_every_seed'] else 'no'}**",
        f"- seeds whose paired interval excludes 0 (above): **{r['seeds_with_interval_above_0']} of {len(seeds)}**",
        f"- verdict: the auxiliary target **{'helps' if r['helps'] else 'shows no measurable gain'}**",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
