"""The held-out-source table (issue 31): image models, the clinical logistic, OST and the fused
model on KOP's reference films, scored against their T-score truth.

    python research/heldout_reference.py DATA --reference DATA/tscores.csv --split SPLIT \\
        --run "default (holdout)=RUN_A" --run "paper hybrid (holdout)=RUN_B" --run "bundled default=BUNDLED" \\
        [--covariates age,sex,weight_kg,height_m,bmi] [--out docs/results/research/HELDOUT_REFERENCE.md]

SPLIT is a ``kneeosteo split --protocol holdout-reference`` file. A run trained on SPLIT brings its
own test predictions (predictions.csv); any other run (the bundled default) is scored on SPLIT's
test films here (`evaluate_run`, no probes), and the table says how many of those films (or
copies of them, by content id) it was trained or validated on. Trains nothing; re-run it on a
GPU machine with better-trained runs and the table updates. Not a package feature.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from statsmodels.stats.proportion import proportion_confint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kneeosteo.data.reference import DEFINITIONS, read_reference  # noqa: E402
from kneeosteo.evaluation.clinical import by_path, clinical_comparison, clinical_set, parse_covariates  # noqa: E402
from kneeosteo.evaluation.evaluate import evaluate_run  # noqa: E402
from kneeosteo.evaluation.stats import delong_auc_ci  # noqa: E402
from kneeosteo.run import RunDir  # noqa: E402
from kneeosteo.utils.atomic import write_json, write_text  # noqa: E402


def _predictions(folder: Path) -> tuple[dict[str, float], float]:
    with open(folder / "predictions.csv", newline="", encoding="utf-8") as fh:
        probs = {r["path"]: float(r["probability"]) for r in csv.DictReader(fh)}
    threshold = float(json.loads((folder / "metrics.json").read_text()).get("threshold", 0.5))
    return probs, threshold


def _seen(run: RunDir, split: dict) -> int:
    """How many of the split's test films the run trained or validated on (by path or content id)."""
    own = json.loads(run.split_file.read_text()) if run.split_file.is_file() else {}
    ids = own.get("content_ids", {})
    seen_paths = set(own.get("train", [])) | set(own.get("val", []))
    seen_ids = {ids[p] for p in seen_paths if p in ids}
    test_ids = split.get("content_ids", {})
    return sum(1 for p in split["test"] if p in seen_paths or test_ids.get(p) in seen_ids)


def image_predictions(runs: dict[str, Path], split_file: Path, data: Path, work: Path) -> dict[str, dict]:
    split = json.loads(split_file.read_text())
    out = {}
    for name, path in runs.items():
        run = RunDir.open(path)
        own = json.loads(run.split_file.read_text()) if run.split_file.is_file() else {}
        if (
            own.get("test") == split["test"]
            and own.get("reference") == split.get("reference")
            and (run.path / "predictions.csv").is_file()
        ):
            probs, threshold = _predictions(run.path)
            how = "trained on the holdout split"
        else:
            folder = work / name.replace(" ", "_").replace("/", "_")
            if not (folder / "predictions.csv").is_file():  # a --work folder keeps them for a rerun
                evaluate_run(run, data, split_file, folder, probes=False)
            probs, threshold = _predictions(folder)
            how = f"trained elsewhere (its own split of {run.config.record.get('data', '?')}), scored here on the split's test films"
        settings = run.config.settings
        out[name] = {
            "probs": probs,
            "threshold": threshold,
            "seen": _seen(run, split),
            "how": how,
            "settings": {
                k: settings.get(k)
                for k in ("backbone", "attention", "preprocess", "epochs", "patience", "reweight", "finetune")
            },
            "best_epoch": run.config.record.get("best_epoch"),
        }
    return out


def _wilson(k: int, n: int) -> list[float]:
    return [float(v) for v in proportion_confint(k, n, method="wilson")] if n else [float("nan")] * 2


def image_rows(preds: dict[str, dict], ref, paths: list[str], definition: str) -> list[dict]:
    y = np.array([int(ref.files[p].positive(definition)) for p in paths])
    rows = []
    for name, d in preds.items():
        p = by_path(d["probs"], paths)
        called = p >= d["threshold"]
        tp, fn = int(np.sum(called & (y == 1))), int(np.sum(~called & (y == 1)))
        tn, fp = int(np.sum(~called & (y == 0))), int(np.sum(called & (y == 0)))
        rows.append(
            {
                "model": name,
                "n": len(y),
                "positives": int(y.sum()),
                "auc": delong_auc_ci(y, p),
                "threshold": d["threshold"],
                "sensitivity": tp / (tp + fn),
                "sensitivity_ci": _wilson(tp, tp + fn),
                "specificity": tn / (tn + fp),
                "specificity_ci": _wilson(tn, tn + fp),
                "seen": d["seen"],
            }
        )
    return rows


def _ci(x: float, lo: float, hi: float) -> str:
    return f"{x:.2f} [{lo:.2f}, {hi:.2f}]"


def render(doc: dict) -> str:
    lines = [
        "# The held-out-source table (issue 31)",
        "",
        f"Test films: the {doc['n_test']} distinct reference films of `{doc['reference']}` with a single truth "
        f"(split `{doc['split']}`, protocol holdout-reference); image models trained on the other KOP films "
        "with their folder labels. Generated by `research/heldout_reference.py`.",
        "",
    ]
    for r in doc["runs"]:
        lines.append(
            f"- **{r['name']}**: {r['how']}; held-out films it trained or validated on: {r['seen']}; "
            f"settings {json.dumps(r['settings'])}, best epoch {r['best_epoch']}"
        )
    for definition, block in doc["definitions"].items():
        lines += [
            "",
            f"## Truth: {DEFINITIONS[definition][0]}",
            "",
            f"### Image models on all {block['image'][0]['n']} films ({block['image'][0]['positives']} positive)",
            "",
            "| model | AUC [95% CI] | sensitivity | specificity | threshold | held-out films seen in training |",
            "|---|---|---|---|---|---|",
        ]
        for r in block["image"]:
            a = r["auc"]
            lines.append(
                f"| {r['model']} | {_ci(a['auc'], a['ci_low'], a['ci_high'])} | "
                f"{_ci(r['sensitivity'], *r['sensitivity_ci'])} | {_ci(r['specificity'], *r['specificity_ci'])} | "
                f"{r['threshold']:g} | {r['seen']} |"
            )
        c = block["clinical"]
        lines += [
            "",
            f"### Beside the clinical baselines: the {c['n']} films with one patient's covariates "
            f"({c['positives']} positive; covariates {', '.join(c['covariates'])}; {len(c['left_out'])} films "
            "linked to two patients left out)",
            "",
            "| model | AUC [95% CI] | sensitivity | specificity | rule | Brier | calibration slope | fitted |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            a = r["auc"]
            brier = f"{r['brier']:.3f}" if "brier" in r else "-"
            slope = f"{r['calibration']['slope']:.2f}" if "calibration" in r else "-"
            lines.append(
                f"| {r['model']} | {_ci(a['auc'], a['ci_low'], a['ci_high'])} | "
                f"{_ci(r['sensitivity'], *r['sensitivity_ci'])} | {_ci(r['specificity'], *r['specificity_ci'])} | "
                f"{r['rule']} | {brier} | {slope} | {r['fitted']} |"
            )
        lines += ["", "| incremental value | dAUC [95% CI] (paired DeLong) | p |", "|---|---|---|"]
        for d in c["incremental"]:
            lines.append(
                f"| {d['a']} - {d['b']} | {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | {d['pvalue']:.3g} |"
            )
        best = {r["model"]: r for r in c["rows"]}
        nb = [
            f"{name}: "
            + ", ".join(
                f"{t:g} {v:+.3f}"
                for t, v in zip(r["decision_curve"]["thresholds"][::2], r["decision_curve"]["net_benefit"][::2])
            )
            for name, r in best.items()
            if "decision_curve" in r
        ]
        treat_all = next(r for r in c["rows"] if "decision_curve" in r)["decision_curve"]["treat_all"][::2]
        lines += [
            "",
            "Net benefit at threshold probabilities 0.05, 0.15, ..., 0.45: "
            + "; ".join(nb)
            + "; treat all: "
            + ", ".join(f"{v:+.3f}" for v in treat_all)
            + ".",
            "",
            f"({c['cost']}.)",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_FOLDER (repeatable)")
    ap.add_argument("--covariates", default="age,sex,weight_kg,height_m,bmi")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("docs/results/research/HELDOUT_REFERENCE.md"))
    ap.add_argument("--work", type=Path, default=None, help="keep the scores of runs trained elsewhere here (reused)")
    args = ap.parse_args()
    runs = dict(item.split("=", 1) for item in args.run)
    names = parse_covariates(args.covariates)
    ref = read_reference(args.reference, args.data)
    split = json.loads(args.split.read_text())
    with tempfile.TemporaryDirectory(prefix="heldout-") as tmp:
        preds = image_predictions({k: Path(v) for k, v in runs.items()}, args.split, args.data, args.work or Path(tmp))
    doc = {
        "reference": str(args.reference),
        "split": str(args.split),
        "n_test": len(split["test"]),
        "runs": [{"name": k, **{x: v[x] for x in ("how", "seen", "settings", "best_epoch")}} for k, v in preds.items()],
        "definitions": {},
    }
    for definition in DEFINITIONS:
        cs = clinical_set(ref, split["test"], definition, names)
        image = {k: (by_path(v["probs"], cs.paths), v["threshold"]) for k, v in preds.items()}
        doc["definitions"][definition] = {
            "image": image_rows(preds, ref, split["test"], definition),
            "clinical": clinical_comparison(cs, image, folds=args.folds),
        }
    write_json(args.out.with_suffix(".json"), doc)
    write_text(args.out, render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
