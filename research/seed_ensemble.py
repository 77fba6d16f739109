"""An ensemble over training seeds of the paper's hybrid, scored with the package's metrics and probes.

The issue's lever "an ensemble over seeds": on each grid split (seed S of the lever grid), the
paper's hybrid trained with three training seeds (the grid's own cell, trained with seed S, and two
more runs, ``kneeosteo train DATA --config configs/paper.toml --split GRID/splits/seedS.json
--seed S+100`` and ``S+200``); the ensemble's P(osteoporosis) is the mean of the three members'.
It is scored exactly as `evaluate` scores a run (`metrics_with_ci`, the four shortcut probes,
the members' own backbone and split) and compared with the grid's hybrid on the same test images
(McNemar and DeLong pooled over the (seed, image) pairs, as `reproduce` does).

    python research/seed_ensemble.py GRID_DIR MEMBERS_DIR DATA [--out research/SEED_ENSEMBLE.md]

MEMBERS_DIR holds ``split<S>-train<T>`` run folders. Trains nothing. Not a package feature.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kneeosteo.data.split import load_split  # noqa: E402
from kneeosteo.evaluation.evaluate import predict_prepared, prepare_part  # noqa: E402
from kneeosteo.evaluation.metrics import metrics_with_ci  # noqa: E402
from kneeosteo.evaluation.probes import shortcut_probes  # noqa: E402
from kneeosteo.evaluation.stats import delong_test, mcnemar_exact, mean_std_ci  # noqa: E402
from kneeosteo.run import RunDir  # noqa: E402
from kneeosteo.utils.atomic import write_json, write_text  # noqa: E402
from kneeosteo.utils.intervals import wilson_interval  # noqa: E402

REF = "hybrid-efficientnet_lite0"


class MeanProbability(nn.Module):
    """P = mean of the members' P(positive), returned as its logit; the fused features are the
    members' side by side. The members share one frozen backbone (same weights), so the
    backbone's cached features serve them all."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        first = members[0]
        self.use_backbone, self.freeze_backbone = first.use_backbone, first.freeze_backbone
        self.backbone, self.backbone_name, self.backbone_weights = (
            first.backbone,
            first.backbone_name,
            first.backbone_weights,
        )
        self.task = "binary"

    def forward(self, images=None, features=None):
        if images is not None and features is None and self.use_backbone:
            features = self.members[0].extract_features(images)  # once, not once per member
        p = torch.stack([torch.sigmoid(m(images=images, features=features).float()) for m in self.members]).mean(0)
        return torch.logit(p.clamp(1e-7, 1 - 1e-7))

    def fused_features(self, images=None, features=None):
        if images is not None and features is None and self.use_backbone:
            features = self.members[0].extract_features(images)
        return torch.cat([m.fused_features(images=images, features=features) for m in self.members], dim=1)


def members_of(grid: Path, members_dir: Path, seed: int) -> list[Path]:
    own = grid / "cells" / REF / f"seed{seed}"
    extra = sorted(members_dir.glob(f"split{seed}-train*"))
    return [own] + [p for p in extra if (p / "metrics.json").is_file()]


def score_seed(grid: Path, members_dir: Path, data: Path, seed: int) -> dict:
    paths = members_of(grid, members_dir, seed)
    runs = [RunDir.open(p) for p in paths]
    models = [r.load_model("cpu") for r in runs]
    prep = runs[0].config.preprocess
    if any(r.config.preprocess != prep for r in runs):
        raise SystemExit(f"seed {seed}: members differ in preprocessing")
    ens = MeanProbability(models).eval()
    sets = load_split(grid / "splits" / f"seed{seed}.json", data)
    test = prepare_part(models[0], sets.items("test"), sets.data, prep, "cpu", "test")
    train = prepare_part(models[0], sets.items("train"), sets.data, prep, "cpu", "train")
    y = test.targets.numpy().astype(int)
    member_probs = [predict_prepared(m, test, prep) for m in models]
    prob = np.mean(member_probs, axis=0)  # what ens computes; ens itself is for the probes' occluded views
    m = metrics_with_ci(y, prob, threshold=0.5)
    probes = shortcut_probes(ens, prep, sets.data, test.paths, y, prob, 0.5, train=train, seed=seed)
    return {
        "seed": seed,
        "members": [str(p) for p in paths],
        "y": y.tolist(),
        "paths": list(test.paths),
        "prob": prob.tolist(),
        "reference_prob": member_probs[0].tolist(),
        "member_accuracy": [float(((p >= 0.5) == y).mean()) for p in member_probs],
        "accuracy": m["accuracy"]["value"],
        "auc": m["auc"]["value"],
        "probes": probes,
    }


def summarise(cells: list[dict]) -> dict:
    def ms(key):
        return mean_std_ci([c[key] for c in cells])

    def probe(c, kind):
        return c["probes"]["occlusion"][kind]["auc"]

    adv = [c["probes"]["shortcut_adversarial"] for c in cells]
    k, n = sum(a["correct"] for a in adv), sum(a["n"] for a in adv)
    y = np.concatenate([c["y"] for c in cells])
    pa, pb = np.concatenate([c["prob"] for c in cells]), np.concatenate([c["reference_prob"] for c in cells])
    return {
        "seeds": [c["seed"] for c in cells],
        "members_per_seed": [len(c["members"]) for c in cells],
        "accuracy": ms("accuracy"),
        "auc": ms("auc"),
        "member_accuracy_mean": float(np.mean([a for c in cells for a in c["member_accuracy"]])),
        "auc_bone_hidden": mean_std_ci([probe(c, "hide_bone") for c in cells]),
        "auc_bone_only": mean_std_ci([probe(c, "only_bone") for c in cells]),
        "auc_within_source": mean_std_ci([c["probes"]["within_source"]["auc"] for c in cells]),
        "adversarial": {
            "correct": k,
            "n": n,
            "accuracy": k / n,
            "ci95": list(wilson_interval(k, n)),
            "per_seed": [f"{a['correct']}/{a['n']}" for a in adv],
        },
        "source_probe": {
            a: float(np.mean([c["probes"]["source"][a]["balanced_accuracy"] for c in cells]))
            for a in ("format", "mode", "aspect_tercile")
        },
        "paired_vs_hybrid": {
            "n": int(len(y)),
            "mcnemar_p": mcnemar_exact((pa >= 0.5) == y, (pb >= 0.5) == y)["pvalue"],
            "delong_p": delong_test(y, pa, pb)["pvalue"],
        },
    }


def report(s: dict) -> str:
    f = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"  # noqa: E731
    a = s["adversarial"]
    return "\n".join(
        [
            "# An ensemble over training seeds of the paper's hybrid",
            "",
            "Written by `python research/seed_ensemble.py` (its docstring says how the members were trained).",
            f"Seeds (grid splits): {s['seeds']}; members per seed: {s['members_per_seed']} (the grid's hybrid cell "
            "and runs with training seeds S+100, S+200); P = the members' mean probability, threshold 0.5.",
            "Mean ± std over the seeds [95% t-interval]; shortcut-adversarial accuracy pooled over seeds (Wilson).",
            "",
            f"| measure | the ensemble of {max(s['members_per_seed'])} training seeds |",
            "|---|---|",
            f"| accuracy | {f(s['accuracy'])} (its members alone: {s['member_accuracy_mean']:.3f} on average) |",
            f"| AUC | {f(s['auc'])} |",
            f"| shortcut-adversarial accuracy | {a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] "
            f"({a['correct']}/{a['n']}; per seed {', '.join(a['per_seed'])}) |",
            f"| AUC with the bone hidden | {f(s['auc_bone_hidden'])} |",
            f"| AUC with only the bone | {f(s['auc_bone_only'])} |",
            f"| AUC within one source | {f(s['auc_within_source'])} |",
            "| source probe format / mode / aspect | "
            + " / ".join(f"{v:.2f}" for v in s["source_probe"].values())
            + " |",
            f"| paired against the grid's hybrid ({s['paired_vs_hybrid']['n']} (seed, image) pairs) | McNemar p = "
            f"{s['paired_vs_hybrid']['mcnemar_p']:.3g}, DeLong p = {s['paired_vs_hybrid']['delong_p']:.3g} |",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("members", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "SEED_ENSEMBLE.md")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    cells = [score_seed(a.grid, a.members, a.data, int(s)) for s in a.seeds.split(",")]
    s = summarise(cells)
    write_json(a.out.with_suffix(".json"), {"summary": s, "cells": cells})
    write_text(a.out, report(s))
    print(report(s))


if __name__ == "__main__":
    main()
