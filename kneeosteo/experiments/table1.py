"""The paper's Table I from finished runs: per-model aggregation over seeds, paired tests against
the reference hybrid, and the table as markdown, CSV, JSON and a forest plot.

Knows nothing of training or of the grid's folders: it takes each (model, seed)'s test
predictions. Its columns are :func:`kneeosteo.evaluation.metrics.metric_names` at call time, so a
metric registered in :data:`~kneeosteo.evaluation.metrics.METRICS` appears here with no other change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from kneeosteo.evaluation import figures
from kneeosteo.evaluation.metrics import METRICS, binary_metrics, metric_names
from kneeosteo.evaluation.probes import SOURCE_ATTRIBUTES
from kneeosteo.evaluation.stats import delong_test, mcnemar_exact, mean_std_ci
from kneeosteo.utils.atomic import write_json, write_text
from kneeosteo.utils.csvfile import csv_text
from kneeosteo.utils.intervals import wilson_interval

__all__ = [
    "PAPER_TABLE",
    "Predictions",
    "aggregate",
    "paired_tests",
    "probe_summary",
    "render_markdown",
    "table_csv",
    "write_table1",
]

#: One model's test predictions for one seed: image path -> (label, P(positive)).
Predictions = Mapping[str, tuple[int, float]]

# The paper's Table I, as printed (its columns: the paper's metrics, in this order).
_PRINTED = ("sensitivity", "specificity", "precision", "fpr", "accuracy", "f1", "loss")
PAPER_TABLE: dict[str, dict[str, float]] = {
    row: dict(zip(_PRINTED, values))
    for row, values in {
        "VGG19": (0.8889, 0.7143, 0.9211, 0.2857, 0.7763, 0.8046, 0.6294),
        "EfficientNetB0": (0.9259, 0.7347, 0.8774, 0.2643, 0.8026, 0.8276, 0.6029),
        "Densenet169": (0.8571, 0.8049, 0.8684, 0.1951, 0.8289, 0.8354, 0.5892),
        "ViT": (0.9444, 0.6852, 0.7782, 0.3148, 0.7500, 0.8043, 0.6498),
        "ResNet50": (0.8571, 0.7083, 0.8947, 0.2917, 0.7632, 0.7907, 0.6236),
        "Ours": (0.8293, 0.8710, 0.8947, 0.1290, 0.8472, 0.8608, 0.5834),
    }.items()
}


class TableModel(Protocol):
    """What a table row needs to know of a model (``experiments.reproduce.ModelSpec`` has it)."""

    key: str
    title: str
    paper_row: str | None


def aggregate(
    specs: Sequence[TableModel],
    seeds: Sequence[int],
    preds: Mapping[tuple[str, int], Predictions],
    seconds: Mapping[str, float],
    status: Mapping[str, str],
    reference: str | None,
    shortcut: dict | None,
    probes: Mapping[tuple[str, int], list[dict]] | None = None,
) -> tuple[list[dict], dict]:
    """One row per model: every metric's mean, std and t-interval over seeds, the paper's value,
    paired tests against ``reference``, the shortcut probes (``probes``: each (model, seed)'s
    ``shortcut_probes`` from metrics.json, one per fold); plus a metadata-only row from the audit's
    ``shortcut``."""
    columns = metric_names()
    # every model of a seed must have been scored on the same images
    same_images = all(len({tuple(sorted(preds[(m.key, s)])) for m in specs if (m.key, s) in preds}) <= 1 for s in seeds)
    rows = []
    for m in specs:
        row = {
            "model": m.key,
            "title": m.title,
            "status": status.get(m.key, "ok"),
            "paper_row": m.paper_row or "",
            "seeds": 0,
            "seconds": round(seconds.get(m.key, 0.0), 1),
        }
        per_seed = [preds[(m.key, s)] for s in seeds if (m.key, s) in preds]
        row["seeds"] = len(per_seed)
        scored = []
        for p in per_seed:
            y = np.array([v[0] for v in p.values()])
            prob = np.array([v[1] for v in p.values()])
            scored.append(binary_metrics(y, prob))
        paper = PAPER_TABLE.get(m.paper_row or "", {})
        for col in columns:
            vals = [s[col] for s in scored]
            stat = mean_std_ci(vals) if vals else {"mean": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan}
            if METRICS[col].unit:  # a t-interval can overshoot [0, 1]; the metric cannot
                stat = {**stat, "ci_low": max(stat["ci_low"], 0.0), "ci_high": min(stat["ci_high"], 1.0)}
            row.update(
                {
                    f"{col}_mean": stat["mean"],
                    f"{col}_std": stat["std"],
                    f"{col}_ci_low": stat["ci_low"],
                    f"{col}_ci_high": stat["ci_high"],
                }
            )
            row[f"{col}_paper"] = paper.get(col, np.nan)
        if reference and m.key != reference and per_seed:
            row.update(paired_tests(preds, m.key, reference, seeds))
        if probes:
            row.update(probe_summary({s: probes[(m.key, s)] for s in seeds if (m.key, s) in probes}))
        rows.append(row)
    if shortcut and shortcut.get("accuracy") is not None:
        lo, hi = shortcut["accuracy_ci95"]
        rows.append(
            {
                "model": "metadata-only",
                "title": "File metadata only (audit shortcut check)",
                "status": "reference",
                "seeds": 0,
                "accuracy_mean": shortcut["accuracy"],
                "accuracy_ci_low": lo,
                "accuracy_ci_high": hi,
                "auc_mean": shortcut["auc"],
            }
        )
    return rows, {"same_test_images": same_images}


def probe_summary(per_seed: Mapping[int, list[dict]]) -> dict:
    """One model's shortcut probes over seeds: shortcut-adversarial accuracy pooled over seeds
    (correct / n summed, Wilson interval) and per seed; occlusion AUCs, the within-source AUC and
    source-probe balanced accuracies as mean ± std over seeds."""
    out: dict = {}
    k = n = 0
    seeds_txt, occ, src, within = [], {"hide_bone": [], "only_bone": []}, {}, []
    for seed, folds in sorted(per_seed.items()):
        ks = sum(f["shortcut_adversarial"].get("correct", 0) for f in folds)
        ns = sum(f["shortcut_adversarial"].get("n", 0) for f in folds if "correct" in f["shortcut_adversarial"])
        k, n = k + ks, n + ns
        if ns:
            seeds_txt.append(f"{seed}: {ks}/{ns}")
        for kind in occ:
            vals = [f["occlusion"][kind]["auc"] for f in folds if "auc" in f["occlusion"][kind]]
            if vals:
                occ[kind].append(float(np.mean(vals)))
        vals = [f["within_source"]["auc"] for f in folds if "auc" in f.get("within_source", {})]
        if vals:
            within.append(float(np.mean(vals)))
        for attr in SOURCE_ATTRIBUTES:
            vals = [
                f["source"][attr]["balanced_accuracy"]
                for f in folds
                if "balanced_accuracy" in f.get("source", {}).get(attr, {})
            ]
            if vals:
                src.setdefault(attr, []).append(float(np.mean(vals)))
    if n:
        lo, hi = wilson_interval(k, n)
        out.update(
            adversarial_accuracy=k / n,
            adversarial_ci_low=lo,
            adversarial_ci_high=hi,
            adversarial_n=n,
            adversarial_per_seed="; ".join(seeds_txt),
        )
    for kind, name in (("hide_bone", "auc_bone_hidden"), ("only_bone", "auc_bone_only")):
        if occ[kind]:
            st = mean_std_ci(occ[kind])
            out.update({f"{name}_mean": st["mean"], f"{name}_std": st["std"]})
    if within:
        st = mean_std_ci(within)
        out.update(auc_within_source_mean=st["mean"], auc_within_source_std=st["std"])
    for attr, vals in src.items():
        out[f"source_{attr}_mean"] = float(np.mean(vals))
    return out


def paired_tests(preds: Mapping[tuple[str, int], Predictions], key: str, ref: str, seeds: Sequence[int]) -> dict:
    """McNemar and DeLong of ``key`` against ``ref``, pooling (seed, image) pairs over seeds."""
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


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(row: dict, col: str) -> str:
    m = row.get(f"{col}_mean")
    if _missing(m):
        return "-"
    sd, lo, hi = row.get(f"{col}_std"), row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
    s = f"{m:.3f}"
    if not _missing(sd):
        s += f" ± {sd:.3f}"
    if not _missing(lo):
        s += f" [{lo:.3f}, {hi:.3f}]"
    return s


def render_markdown(rows: list[dict], info: dict) -> str:
    columns = metric_names()
    head = "| model | status | seeds | " + " | ".join(columns) + " | paper acc | McNemar p | DeLong p | time (s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]  # a delimiter row per header cell, or no table
    for r in rows:
        paper = r.get("accuracy_paper")
        paper_s = f"{paper:.4f} ({r['paper_row']})" if not _missing(paper) else "-"
        p = lambda k: f"{r[k]:.3g}" if not _missing(r.get(k)) else "-"  # noqa: E731, B023 (used in this iteration)
        lines.append(
            f"| {r['title']} | {r['status']} | {r.get('seeds', 0)} | "
            + " | ".join(_fmt(r, c) for c in columns)
            + f" | {paper_s} | {p('mcnemar_p')} | {p('delong_p')} | {r.get('seconds', '-')} |"
        )
    lines += ["", *_probe_table(rows)]
    held = info.get("held_out")
    if held:
        lines += [
            "",
            f"Held-out source: the test films are every film of `{held['file']}` with a single truth, "
            f"scored against it ({held['meaning']}), the same films every seed; no duplicate, near duplicate "
            f"or patient of theirs was trained on; {len(held.get('multi_truth', []))} reference file(s) with no "
            "single truth excluded. Training labels are the data's own (class folders).",
        ]
    lines += [
        "",
        "Cells: mean ± std over seeds [95% t-interval over seeds]. Paired tests are against the reference "
        f"hybrid ({info.get('reference')}), pooling the (seed, test image) pairs of all seeds: exact McNemar on "
        "correctness at threshold 0.5, DeLong on AUC.",
        f"Every model of a seed was scored on the same test images: {'yes' if info.get('same_test_images') else 'NO'}.",
        "Trained on: "
        + (
            ", ".join(f"{k} ({v} cells)" for k, v in info["compute_paths"].items())
            if info.get("compute_paths")
            else "unknown (cells from before paths were recorded)"
        )
        + ". The same seed gives identical results on the same path (precision and instruction set), not across paths.",
    ]
    return "\n".join(lines) + "\n"


def _probe_table(rows: list[dict]) -> list[str]:
    """The shortcut probes per model (rows that have them)."""
    probed = [r for r in rows if "adversarial_n" in r or "auc_bone_hidden_mean" in r]
    if not probed:
        return []
    lines = [
        "Shortcut probes (does the model read bone or the film's source?):",
        "",
        "| model | shortcut-adversarial acc [Wilson 95%] (n) | per seed (correct/n) | AUC bone hidden | "
        "AUC bone only | AUC within source | source probe: format / mode / aspect (balanced acc) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in probed:
        adv = (
            (
                f"{r['adversarial_accuracy']:.3f} [{r['adversarial_ci_low']:.3f}, {r['adversarial_ci_high']:.3f}] "
                f"(n = {r['adversarial_n']})"
            )
            if "adversarial_n" in r
            else "-"
        )
        src = " / ".join(
            "-" if _missing(r.get(f"source_{a}_mean")) else f"{r[f'source_{a}_mean']:.2f}" for a in SOURCE_ATTRIBUTES
        )
        lines.append(
            f"| {r['title']} | {adv} | {r.get('adversarial_per_seed', '-')} | {_fmt(r, 'auc_bone_hidden')} | "
            f"{_fmt(r, 'auc_bone_only')} | {_fmt(r, 'auc_within_source')} | {src} |"
        )
    lines += [
        "",
        "Shortcut-adversarial: accuracy on the test images where the metadata-only forest (fitted on each "
        "seed's training partition) is wrong; the shortcut scores 0 there, chance is 0.5. AUCs: mean ± std "
        "over seeds with the bone region hidden (only the film's border shows) and with only the bone shown; "
        "within source: over the positive/negative pairs from the same format x mode x aspect-tercile stratum "
        "only (what the model reads beyond those attributes; a pure source reader scores 0.5). "
        "Source probe: cross-validated balanced accuracy of a logistic regression predicting the file's "
        "format, colour mode and aspect-ratio tercile from the model's fused features (training images).",
    ]
    return lines


def table_csv(rows: list[dict]) -> str:
    """Every key of every row is a column (first-seen order); a row lacking one leaves it empty."""
    return csv_text(list(dict.fromkeys(k for r in rows for k in r)), rows)


def write_table1(out: Path, rows: list[dict], info: dict) -> None:
    """``table1.csv``, ``table1.md``, ``table1.json`` and the forest plot ``table1.png`` under ``out``."""
    write_text(out / "table1.csv", table_csv(rows))
    write_text(out / "table1.md", render_markdown(rows, info))
    write_json(out / "table1.json", {"info": info, "rows": rows})
    figures.forest_plot(rows, out / "table1.png", [(c, METRICS[c].title) for c in ("accuracy", "auc") if c in METRICS])
