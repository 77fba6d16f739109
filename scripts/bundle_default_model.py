"""Copy a finished training run into the package as the bundled default model, with its card.

Usage: python scripts/bundle_default_model.py RUN AUDIT_JSON [TABLE1_JSON]

RUN: a run trained with `configs/default_model.toml` on the seed-0 paper split (e.g. its cell of
`kneeosteo reproduce`), given its trust files by `kneeosteo calibrate CELL DATA --split
CELL/split.json --out RUN` and scored again by `kneeosteo evaluate RUN` (metrics.json with the
shortcut probes and the trust block); AUDIT_JSON: `kneeosteo audit`'s audit.json; TABLE1_JSON:
the `reproduce` grid that compared it with the paper's hybrid (its evidence).

Every figure of the card is read from the run's own files, the audit and the grid, never typed in.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from kneeosteo.evaluation.probes import format_probes
from kneeosteo.run import RunDir
from kneeosteo.utils.atomic import write_text

DEST = Path(__file__).resolve().parent.parent / "kneeosteo" / "assets" / "default_model"
FILES = ("config.json", "model.safetensors", "metrics.json", "split.json", "history.csv")
TRUST_FILES = ("trust.json", "trust.safetensors")  # when the run has them (`kneeosteo calibrate`)


def ci(m: dict, name: str) -> str:
    v = m[name]
    return f"{v['value']:.3f} (95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f}, {v['method']})"


def architecture(rd: RunDir) -> str:
    ident = rd.config.model
    s = rd.config.settings
    prep = rd.config.preprocess
    branches = f"A frozen ImageNet {ident['backbone']} ({ident['feature_dim']} features)"
    if ident["use_attention"]:
        branches += " fused with the attention module (128 features)"
    head = "-".join(str(v) for v in [ident["head"]["in_features"], *ident["head"]["hidden"], 1])
    geometry = {
        "paper": "stretched to {0}x{0} (`paper` preset)",
        "robust": "letterboxed onto a black {0}x{0} square, aspect ratio kept (`robust` preset)",
        "bone": "everything outside its label-free bone region set to black, then letterboxed onto a black "
        "{0}x{0} square, aspect ratio kept (`bone` preset)",
    }[prep.preset].format(prep.size)
    weighting = (
        "each training image weighted by 1 / P(its label | file metadata), a forest fitted out of fold "
        'on the training images (`reweight = "metadata"`)'
        if s.get("reweight") == "metadata"
        else "unweighted"
    )
    augment = {
        "none": "no augmentation",
        "offline": f"{s.get('copies')} augmented copies per training image",
        "online": "online augmentation",
    }[s["augment"]]
    return (
        f"{branches}, then the FC head {head}. Input: a knee radiograph, {geometry}. Training: {augment}, "
        f"{weighting}. Output: P(osteoporosis); label `osteoporosis` at probability >= {rd.config.threshold}."
    )


def evidence(table: dict, keys: list[str]) -> str:
    rows = {r["model"]: r for r in table["rows"]}
    seeds = len(table["info"]["seeds"])
    out = [
        f"`kneeosteo reproduce`, {seeds} seeds, the same 72 test images per seed for every row "
        "(mean ± std over seeds; shortcut-adversarial accuracy pooled over seeds, Wilson interval):",
        "",
        "| model | accuracy | AUC | shortcut-adversarial acc (n) | AUC bone hidden | AUC bone only | AUC within source "
        "| McNemar p | DeLong p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        r = rows.get(k)
        if r is None:
            continue
        f = lambda c: f"{r[c + '_mean']:.3f} ± {r[c + '_std']:.3f}" if c + "_mean" in r else "-"  # noqa: E731, B023
        adv = (
            (
                f"{r['adversarial_accuracy']:.3f} [{r['adversarial_ci_low']:.3f}, {r['adversarial_ci_high']:.3f}] "
                f"({r['adversarial_n']})"
            )
            if "adversarial_n" in r
            else "-"
        )
        p = lambda c: f"{r[c]:.3g}" if c in r else "ref"  # noqa: E731, B023
        out.append(
            f"| {r['title']} | {f('accuracy')} | {f('auc')} | {adv} | {f('auc_bone_hidden')} | "
            f"{f('auc_bone_only')} | {f('auc_within_source')} | {p('mcnemar_p')} | {p('delong_p')} |"
        )
    return "\n".join(out)


def trust_text(rd: RunDir) -> str:
    t = rd.trust
    if t is None:
        return (
            "It gives a probability for any image, including ones that are not frontal knee radiographs: "
            "this run has no trust files (no domain check, uncalibrated)."
        )
    d = t.summary()
    fit = (
        f"temperature {d['calibration'].get('temperature', 1.0):.3f} on {d['fitted']['calibration_images']} "
        f"validation images, threshold {d['threshold']}, coverage {d['coverage']}, {d['domain_method']} domain "
        f"threshold {d['domain_threshold']:.1f}"
    )
    return (
        'Its trust files (`trust.json`, docs/trust.md, "Trusting a prediction") flag images unlike its training '
        "films as `out_of_domain` and answers whose conformal set holds both classes as `uncertain`; "
        f"they were fitted by `kneeosteo calibrate` on its own split ({fit}). "
        "The domain check was measured on generated and DICOM non-knee images and shifted KOP copies, "
        "never on knee films from another hospital."
    )


def card(run: Path, audit: dict, table: dict | None) -> str:
    rd = RunDir.open(run)
    rec = rd.config.record
    m = rd.read_json("metrics.json")
    split = rd.read_json("split.json")
    s = audit["shortcut_metadata_only"]
    c = m["counts"]
    rows = "\n".join(
        f"| {k} | {ci(m, k)} |"
        for k in ("sensitivity", "specificity", "precision", "fpr", "accuracy", "f1", "auc", "loss")
    )
    kind = "hybrid, with the attention module" if rd.config.model["use_attention"] else "backbone + FC head"
    grid = (
        ""
        if table is None
        else "\n## Evidence: the levers against the paper's hybrid\n"
        + evidence(table, [r["model"] for r in table["rows"] if r.get("seeds")])
    )
    return f"""# Model card: kneeosteo default model ({rd.config.model["backbone"]}, {kind})

**Research use only — not a diagnostic device.** It has not been validated on any clinical
population and must not be used to make decisions about patients.

## What it is
{architecture(rd)}
Backbone weights: `{rec["backbone_weights"]["source"]}`, sha256 `{rec["backbone_weights"]["sha256"]}`.
Why these settings: docs/model.md, "The default model and the evidence for it".

## Data
KOP (Kaggle "Osteoporosis Knee X-ray Dataset"): 372 files, 186 per class. After de-duplication
({len(split["excluded"])} files excluded: copies of the same picture, including
{audit["exact_duplicates"]["label_conflicts"]} pictures filed under both labels) and grouping of near
duplicates: train {len(split["train"])}, validation {len(split["val"])}, test {len(split["test"])}
images (split seed {split["seed"]}, stratified, no picture shared between partitions).

## Training command
```
kneeosteo split ../shared/datasets/kop --out split.json --seed {split["seed"]}
kneeosteo train ../shared/datasets/kop --config configs/default_model.toml --split split.json --out RUN
```
Best epoch {rec.get("best_epoch")} of {rec.get("epochs_run")} by validation loss.

## Test metrics (n = {m["n"]}: TP {c["tp"]}, FP {c["fp"]}, FN {c["fn"]}, TN {c["tn"]})
| metric | value |
|---|---|
{rows}

Test-set accuracy: **{m["accuracy"]["value"]:.4f}**. These are one split's figures (seed {split["seed"]});
the evidence below gives the mean ± std of the same settings over the grid's seeds: quote those.

## Does it read bone? (shortcut probes on the same test images)
```
{format_probes(m["shortcut_probes"])}
```
{grid}

## The shortcut this must be read against
A random forest that sees only file metadata (size, aspect ratio, file size, colour mode) reaches
**{s["accuracy"]:.3f}** accuracy (95% CI {s["accuracy_ci95"][0]:.3f}-{s["accuracy_ci95"][1]:.3f}) on the same
data: the source of a KOP image predicts its label. The shortcut-adversarial accuracy above is
this model's accuracy on the test images where that forest is wrong (chance: 0.5).

## Known failure modes and limits
- Trained and tested on one small public data set of mixed, undocumented sources; no external
  validation, no patient-level information, no DXA reference standard.
- A 72-image test set: the accuracy's 95% interval is about +-8 points wide.
- {trust_text(rd)}
- Image source, film format and post-processing shift the output: on the images where the file's
  metadata points the wrong way its accuracy falls towards chance (0.5; pooled over the grid's
  seeds in the evidence above).
"""


def main(run: str, audit_json: str, table_json: str | None = None) -> None:
    run_dir = Path(run)
    audit = json.loads(Path(audit_json).read_text())
    table = json.loads(Path(table_json).read_text()) if table_json else None
    DEST.mkdir(parents=True, exist_ok=True)
    for f in TRUST_FILES:  # a stale pair must not outlive the model it was fitted for
        (DEST / f).unlink(missing_ok=True)
    for f in FILES + tuple(f for f in TRUST_FILES if (run_dir / f).is_file()):
        shutil.copy2(run_dir / f, DEST / f)
    write_text(DEST / "MODEL_CARD.md", card(run_dir, audit, table))
    print(f"bundled {run_dir} into {DEST}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
