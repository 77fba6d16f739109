"""Does a model rank films within one source? AUC inside source strata, from a reproduce grid.

KOP's sources (file format x colour mode x aspect-ratio tercile: the three attributes the source
probe predicts) are not pure in class: most strata hold films of both classes. Ranking a
positive above a negative *of the same stratum* cannot come from those three attributes, so the
within-stratum AUC (the share of same-stratum positive/negative pairs ranked right, pooled over
strata; ties count a half) is a lower bound on what a model reads beyond them. The metadata
forest (width, height, aspect ratio, file size, colour mode; refitted per seed on the training
partition, as the shortcut-adversarial probe does) is scored the same way: what is left to read
inside a stratum from the file alone.

    python research/within_source.py GRID_DIR DATA [--out research/WITHIN_SOURCE.md] [--write-cells]

Reads each cell's predictions.csv and each seed's split; trains nothing. Not a package feature.
``--write-cells`` also adds the probe as `evaluate` computes it (tercile cut points from the seed's
training and test films, bootstrap interval) to each cell's metrics.json, marked as added from
predictions.csv, for cells scored before the probe existed; `reproduce` on the grid folder then
tabulates it with the other probes (the cells themselves are reused, not retrained).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kneeosteo.data.scan import scan_dataset  # noqa: E402
from kneeosteo.data.shortcut import metadata_classifier, metadata_matrix  # noqa: E402
from kneeosteo.evaluation.probes import within_source_auc  # noqa: E402
from kneeosteo.evaluation.stats import mean_std_ci  # noqa: E402
from kneeosteo.utils.atomic import write_json  # noqa: E402


def _write_cell(cell: Path, probe: dict) -> None:
    metrics = json.loads((cell / "metrics.json").read_text())
    probes = metrics.get("shortcut_probes")
    if probes is None or "within_source" in probes and "added_from" not in probes["within_source"]:
        return  # no probes at all, or scored with the probe already: left as it is
    probes["within_source"] = {**probe, "added_from": "predictions.csv, by research/within_source.py --write-cells"}
    write_json(cell / "metrics.json", metrics)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "WITHIN_SOURCE.md")
    ap.add_argument("--write-cells", action="store_true", help="add the probe to each cell's metrics.json")
    args = ap.parse_args(argv)
    records = scan_dataset(args.data).records
    by_path = {r.path: r for r in records}

    def within(test: list[str], train: list[str], y_test: list[int], score, seed: int) -> dict:
        """The package's probe as `evaluate` runs it: tercile cut points from the seed's training and
        test films (its bootstrap interval only when the cells are written)."""
        return within_source_auc(
            y_test,
            score,
            [by_path[p].meta for p in test],
            [by_path[p].meta for p in train],
            boot=1000 if args.write_cells else 1,
            seed=seed,
        )

    seeds = sorted(int(p.stem[4:]) for p in (args.grid / "splits").glob("seed*.json"))
    rows: dict[str, list[tuple[float, int, float]]] = {}
    for seed in seeds:
        split = json.loads((args.grid / "splits" / f"seed{seed}.json").read_text())
        test = split["test"]
        y_test = [by_path[p].target for p in test]
        train = split["train"]
        x, _ = metadata_matrix([by_path[p].meta for p in train] + [by_path[p].meta for p in test])
        forest = metadata_classifier(seed).fit(x[: len(train)], [by_path[p].target for p in train])
        meta_score = forest.predict_proba(x[len(train) :])[:, 1]
        w = within(test, train, y_test, meta_score, seed)
        rows.setdefault("file metadata only (the probe's forest)", []).append(
            (w["auc"], w["pairs"], roc_auc_score(y_test, meta_score))
        )
        for cell in sorted((args.grid / "cells").glob(f"*/seed{seed}/predictions.csv")):
            with open(cell, newline="") as fh:
                pred = {r["path"]: float(r["probability"]) for r in csv.DictReader(fh)}
            score = [pred[p] for p in test]
            w = within(test, train, y_test, score, seed)
            if args.write_cells:
                _write_cell(cell.parent, w)
            rows.setdefault(cell.parent.parent.name, []).append((w["auc"], w["pairs"], roc_auc_score(y_test, score)))
    aspect = np.array([r.meta.width / r.meta.height for r in records])
    tercile = np.digitize(aspect, np.quantile(aspect, [1 / 3, 2 / 3]), right=True)
    counts: dict[str, list[int]] = {}
    for r, t in zip(records, tercile):
        counts.setdefault(f"{r.meta.format}/{r.meta.mode}/{int(t)}", [0, 0])[r.target] += 1
    lines = [
        "# Within-source AUC of the lever grid",
        "",
        f"Grid `{args.grid}`, seeds {seeds}, {len(records)} files. Strata = format / colour mode / "
        "aspect-ratio tercile, the source probe's three attributes; in each seed the tercile cut points come "
        "from that seed's training and test films, as `evaluate`'s probe does. Films per stratum with the "
        "cut points of all files (0 = narrowest; normal / osteoporosis):",
        "",
        "| stratum | normal | osteoporosis |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {v[0]} | {v[1]} |" for k, v in sorted(counts.items())]
    lines += [
        "",
        "Per row: the usual AUC and the within-stratum AUC (same-stratum positive/negative pairs only), "
        "mean ± sd over seeds with a 95% t-interval; pairs = same-stratum pairs per seed (mean).",
        "",
        "| row | AUC (all pairs) | within-stratum AUC [95%] | minus the forest's, paired by seed [95%] | "
        "same-stratum pairs per seed |",
        "|---|---:|---:|---:|---:|",
    ]
    meta = [v[0] for v in rows["file metadata only (the probe's forest)"]]
    for name, vals in sorted(rows.items(), key=lambda kv: -np.mean([v[0] for v in kv[1]])):
        w = mean_std_ci([v[0] for v in vals])
        o = mean_std_ci([v[2] for v in vals])
        d = mean_std_ci([v[0] - m for v, m in zip(vals, meta)]) if len(vals) == len(meta) else None
        diff = (
            "-"
            if name.startswith("file metadata") or d is None
            else f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        )
        lines.append(
            f"| {name} | {o['mean']:.3f} ± {o['std']:.3f} | {w['mean']:.3f} ± {w['std']:.3f} "
            f"[{w['ci_low']:.3f}, {w['ci_high']:.3f}] | {diff} | "
            f"{np.mean([v[1] for v in vals]):.0f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
