"""Copy a finished training run into the package as the bundled default model, with its card.

Usage:
  python scripts/bundle_default_model.py RUN AUDIT_JSON [TABLE1_JSON]
  python scripts/bundle_default_model.py RUN AUDIT_JSON --grid GRID --row ROW --against ROW2
      [--reference TSCORES_CSV] [--domain KNEE_DOMAIN_JSON] [--dest FOLDER]
  python scripts/bundle_default_model.py --check-rule --grid GRID --row ROW --against ROW2

RUN: a run trained with `configs/default_model.toml` (e.g. the seed-0 cell of `kneeosteo
reproduce`), given its trust files by `kneeosteo calibrate CELL DATA --split CELL/split.json --out
RUN` and scored again by `kneeosteo evaluate RUN` (metrics.json with the shortcut probes and the
trust block); AUDIT_JSON: `kneeosteo audit`'s audit.json.

Paper split (KOP's folder labels): TABLE1_JSON is the `reproduce` grid that compared it with the
paper's hybrid (its evidence).

Held-out source (a run trained on a `--protocol holdout-reference` split): GRID is the finished
`reproduce --protocol holdout-reference --covariates ...` folder (table1.json, clinical.json, its
cells' predictions.csv), ROW the grid row RUN is the seed-0 cell of (checked: same weights),
ROW2 the row it was compared with by research/DEFAULT_CHOICE.md's rule (2026-12-07 03:05). The
card gives the seeds' figures under the split's truth (WHO osteoporosis) with the clinical
logistic and OST beside them, and the same under low bone mass (T < -1) computed from the
cells' predictions and the reference manifest (`--reference`, default: the split's own file,
checked by its sha256). `--domain`: research/knee_domain.py's json for RUN (the domain check's
acceptance of the reference films, two-knee films and the non-knee corpus).

`--check-rule` prints the rule's two figures for ROW against ROW2 and exits 1 when the rule
fails (or fewer seeds than the grid's are in); nothing is bundled.

Every figure of the card is read from the run's own files, the audit and the grid, or computed
from them here, never typed in.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from kneeosteo.data import knee as knee_mod
from kneeosteo.data.reference import read_reference
from kneeosteo.evaluation.clinical import clinical_set, over_seeds, seed_figures
from kneeosteo.evaluation.probes import format_probes
from kneeosteo.evaluation.stats import delong_auc_ci
from kneeosteo.run import RunDir
from kneeosteo.utils.atomic import write_text
from kneeosteo.utils.hashing import sha256_file

DEST = Path(__file__).resolve().parent.parent / "kneeosteo" / "assets" / "default_model"
FILES = ("config.json", "model.safetensors", "metrics.json", "split.json", "history.csv")
TRUST_FILES = ("trust.json", "trust.safetensors")  # when the run has them (`kneeosteo calibrate`)
HOLDOUT = "holdout-reference"


def ci(m: dict, name: str) -> str:
    v = m[name]
    return f"{v['value']:.3f} (95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f}, {v['method']})"


def architecture(rd: RunDir) -> str:
    ident = rd.config.model
    s = rd.config.settings
    prep = rd.config.preprocess
    if not ident.get("freeze_backbone", True):
        stages = ident.get("trainable_stages", 0)
        tuned = ("its last stage" if stages == 1 else f"its last {stages} stages") if stages else "all of it"
        rate = s.get("backbone_lr_scale", 1.0)
        branches = (
            f"An ImageNet {ident['backbone']} ({ident['feature_dim']} features) with {tuned} fine-tuned "
            f"(at {rate:g} x the head's learning rate; every BatchNorm keeps its ImageNet statistics)"
        )
    else:
        branches = f"A frozen ImageNet {ident['backbone']} ({ident['feature_dim']} features)"
    if ident["use_attention"]:
        branches += " fused with the attention module (128 features)"
    head = "-".join(str(v) for v in [ident["head"]["in_features"], *ident["head"]["hidden"], 1])
    geometry = {
        "paper": "stretched to {0}x{0} (`paper` preset)",
        "robust": "letterboxed onto a black {0}x{0} square, aspect ratio kept (`robust` preset)",
        "bone": "everything outside its label-free bone region set to black, then letterboxed onto a black "
        "{0}x{0} square, aspect ratio kept (`bone` preset)",
        "knee": "each knee joint on the film found without labels (`kneeosteo.data.knee`, localiser version "
        f"{knee_mod.LOCALISER_VERSION}: the joint space, the tibial plateau's margins), a square of "
        f"{knee_mod.ROI_SCALE:g} tibial plateau widths centred on the joint cut out and resampled to "
        "{0}x{0} (`knee` preset): every framing reaches the network at the same anatomical scale. A film "
        "with two knees is scored knee by knee and its answer is their mean probability, its status the "
        "worst of theirs (`kneeosteo.inference.knees`); a film on which no knee is found is "
        "`out_of_domain` with the reason, never guessed",
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


# --------------------------------------------------------------------------- the held-out grid


def _cell_predictions(grid: Path, row: str, seed: int) -> dict[str, tuple[int, float]] | None:
    """A finished cell's test predictions (path -> (label, P)); None while the cell is unfinished."""
    cell = grid / "cells" / row / f"seed{seed}"
    if not (cell / "metrics.json").is_file():
        return None
    with open(cell / "predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return {r["path"]: (int(r["label"]), float(r["probability"])) for r in csv.DictReader(fh)}


def _grid_seeds(grid: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("seed")) for p in (grid / "splits").glob("seed*.json"))


def seed_predictions(grid: Path, row: str) -> dict[int, dict[str, tuple[int, float]]]:
    out = {}
    for s in _grid_seeds(grid):
        p = _cell_predictions(grid, row, s)
        if p is not None:
            out[s] = p
    return out


def mean_probability_auc(per_seed: dict[int, dict[str, tuple[int, float]]], truth: dict[str, int] | None = None):
    """The AUC (DeLong 95% interval) of the seeds' mean probability, one score per film; ``truth``:
    path -> 0/1 (default: the cells' own labels, the split's truth). Films every seed scored."""
    paths = sorted(set.intersection(*(set(p) for p in per_seed.values())))
    if truth is not None:
        paths = [p for p in paths if p in truth]
    y = np.array([truth[p] if truth is not None else per_seed[min(per_seed)][p][0] for p in paths])
    prob = np.array([np.mean([d[p][1] for d in per_seed.values()]) for p in paths])
    return {**delong_auc_ci(y, prob), "n": len(paths), "positives": int(y.sum())}


def rule_figures(grid: Path, row: str, against: str) -> dict:
    """research/DEFAULT_CHOICE.md, 2026-12-07 03:05: (a) ROW's mean AUC over the seeds above
    AGAINST's over the same seeds; (b) the DeLong lower bound of the AUC of ROW's seed-mean
    probability above 0.5; rule 3: every seed of the grid in for both rows."""
    seeds = _grid_seeds(grid)
    a, b = seed_predictions(grid, row), seed_predictions(grid, against)
    common = sorted(set(a) & set(b))

    def auc(p):
        return delong_auc_ci([v[0] for v in p.values()], [v[1] for v in p.values()])["auc"]

    mean_a = float(np.mean([auc(a[s]) for s in common])) if common else float("nan")
    mean_b = float(np.mean([auc(b[s]) for s in common])) if common else float("nan")
    pooled = mean_probability_auc(a) if a else None
    complete = len(common) == len(seeds) > 0
    return {
        "seeds": seeds,
        "seeds_in": common,
        "complete": complete,
        "mean_auc": {row: mean_a, against: mean_b},
        "mean_probability_auc": pooled,
        "a": bool(mean_a > mean_b),
        "b": bool(pooled is not None and pooled["ci_low"] > 0.5),
        "passes": bool(complete and mean_a > mean_b and pooled is not None and pooled["ci_low"] > 0.5),
    }


def _reference_for(split: dict, given: Path | None):
    """The held-out manifest: ``given`` or the split's own file, either way the bytes the split names."""
    ref = split["reference"]
    path = Path(given if given is not None else ref["file"])
    if not path.is_file():
        sys.exit(f"{path}: the held-out reference manifest is not there; give it with --reference")
    if sha256_file(path) != ref["sha256"]:
        sys.exit(f"{path}: not the reference manifest the split was made from (sha256 differs from {ref['sha256']})")
    return read_reference(path)


def _auc_txt(a: dict) -> str:
    return f"{a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"


def _seed_summary(doc: dict, meaning: str, rows: list[str], titles: dict[str, str]) -> list[str]:
    """A clinical over-seeds doc as a table: the fixed baselines, then each image row's seeds."""
    out = [
        f"**{meaning}**: {doc['n']} films with one patient's covariates ({doc['positives']} positive; "
        f"covariates {', '.join(doc['covariates'])}; {len(doc['left_out'])} left out).",
        "",
        "| model | seeds | AUC | fused with the covariates: AUC | fused - clinical dAUC (mean; seeds with the "
        "lower bound > -0.05) | image - clinical dAUC (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in doc["fixed"].items():
        out.append(f"| {name} ({r['rule']}) | - | {_auc_txt(r['auc'])} | - | - | - |")
    for key in rows:
        seeds = doc["models"].get(key)
        if not seeds:
            continue
        f = seed_figures(seeds, margin=-0.05)  # issue 32's target: lower bound above -0.05
        (im, isd, ilo, ihi), (fm, flo, fhi) = f["image"], f["fused"]
        out.append(
            f"| {titles.get(key, key)} | {f['seeds']} | {im:.3f} ± {isd:.3f} ({ilo:.3f}-{ihi:.3f}) | "
            f"{fm:.3f} ({flo:.3f}-{fhi:.3f}) | {f['fused_minus_clinical']:+.3f}; {f['above_margin']} of {f['seeds']} | "
            f"{f['image_minus_clinical']:+.3f} |"
        )
    return out


def _title(grid: Path, row: str, previous: bool) -> str:
    """A row named by what its seed-0 cell was trained with (a settings file's path may since name
    other settings: configs/default_model.toml is rewritten when a model ships)."""
    rd = RunDir.open(grid / "cells" / row / "seed0")
    prep = rd.config.preprocess
    extra = ", the previous default's settings" if previous else ""
    return f"{row} (`{prep.preset}` preset, {prep.size} px{extra})"


def heldout_evidence(grid: Path, row: str, against: str, split: dict, reference: Path | None) -> str:
    table = json.loads((grid / "table1.json").read_text())
    clinical = json.loads((grid / "clinical.json").read_text())
    titles = {r["model"]: _title(grid, r["model"], r["model"] == against) for r in table["rows"] if r.get("seeds")}
    keys = [k for k in (row, against) if k in titles] + [
        r["model"] for r in table["rows"] if r.get("seeds") and r["model"] not in (row, against)
    ]
    ref = _reference_for(split, reference)
    held = split.get("reference") or table["info"]["held_out"]  # the shipped split: its paths as shipped
    seeds = table["info"]["seeds"]
    per_row = {k: seed_predictions(grid, k) for k in keys}
    rule = rule_figures(grid, row, against)
    trows = {r["model"]: r for r in table["rows"]}
    out = [
        f"`kneeosteo reproduce --protocol holdout-reference`, seeds {', '.join(map(str, seeds))}: each seed "
        "draws its own training/validation films from the KOP films that are not held out; the test films "
        f"are the same every seed: every film of `{held['file']}` with a single truth, scored against it "
        f"({held['meaning']}), none of them, their duplicates or their patients trained on. "
        "The shipped weights are the seed-0 cell of the first row, whatever it scores (never the best seed).",
        "",
        "| model | seeds | AUC (mean ± std over seeds) | accuracy | sensitivity | specificity | AUC of the seeds' "
        "mean probability [DeLong 95%] |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        r = trows[k]
        f = lambda c: f"{r[c + '_mean']:.3f} ± {r[c + '_std']:.3f}" if c + "_mean" in r else "-"  # noqa: E731, B023
        pooled = mean_probability_auc(per_row[k]) if per_row[k] else None
        out.append(
            f"| {titles[k]} | {r['seeds']} | {f('auc')} | {f('accuracy')} | {f('sensitivity')} | "
            f"{f('specificity')} | {_auc_txt(pooled) if pooled else '-'} |"
        )
    out += [
        "",
        f"The rule (research/DEFAULT_CHOICE.md, 2026-12-07 03:05, applied unchanged to each later row, written "
        f"before that row's cells): (a) mean AUC "
        f"{rule['mean_auc'][row]:.3f} against {titles.get(against, against)}'s {rule['mean_auc'][against]:.3f} "
        f"over seeds {', '.join(map(str, rule['seeds_in']))}: {'met' if rule['a'] else 'not met'}; (b) the "
        f"seeds' mean probability scores AUC {_auc_txt(rule['mean_probability_auc'])}, lower bound above "
        f"0.5: {'met' if rule['b'] else 'not met'}; all {len(rule['seeds'])} seeds in: "
        f"{'yes' if rule['complete'] else 'no'}.",
        "",
        "Beside the clinical baselines (clinical.json of the grid; the clinical logistic and fused rows are "
        "cross-fitted on the held-out films in patient-level folds, OST (Koh 2001) has nothing fitted, the image "
        "models never saw these films):",
        "",
        *_seed_summary(clinical, held["meaning"], keys, titles),
    ]
    # low bone mass: the same films and cells, the reference's other binary truth
    low = "low_bone_mass"
    if held.get("definition") != low:
        test = json.loads((grid / "splits" / f"seed{seeds[0]}.json").read_text())["test"]
        truth = {p: int(ref.files[p].positive(low)) for p in test if p in ref.files and ref.files[p].single_truth}
        lines = [
            "| model | seeds | AUC (mean ± std over seeds) | AUC of the seeds' mean probability [DeLong 95%] |",
            "|---|---|---|---|",
        ]
        for k in keys:
            if not per_row[k]:
                continue
            aucs = [
                delong_auc_ci([truth[p] for p in d if p in truth], [v[1] for p, v in d.items() if p in truth])["auc"]
                for d in per_row[k].values()
            ]
            sd = np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0
            lines.append(
                f"| {titles[k]} | {len(aucs)} | {np.mean(aucs):.3f} ± {sd:.3f} | "
                f"{_auc_txt(mean_probability_auc(per_row[k], truth))} |"
            )
        cs = clinical_set(ref, test, low, clinical["covariates"])
        preds = {(k, s): {p: v[1] for p, v in d.items()} for k in keys for s, d in per_row[k].items()}
        thresholds = {
            k: float(json.loads((grid / "cells" / k / f"seed{s}" / "metrics.json").read_text()).get("threshold", 0.5))
            for k in keys
            for s in per_row[k]
        }
        doc = over_seeds(cs, preds, thresholds)
        out += [
            "",
            f"The same films against the other truth, low bone mass (T < -1; {sum(truth.values())} of {len(truth)} "
            "films positive), computed here from the cells' predictions and the reference manifest:",
            "",
            *lines,
            "",
            *_seed_summary(doc, "low bone mass (T < -1)", keys, titles),
        ]
    return "\n".join(out)


def domain_text(domain: dict | None, rd: RunDir) -> str:
    if domain is None:
        return (
            "The domain check was measured on generated and DICOM non-knee images and shifted KOP copies, "
            "never on knee films from another hospital."
        )
    if domain.get("model") != rd.model_id:
        sys.exit(f"--domain: measured on {domain.get('model')}, not on this run ({rd.model_id})")
    c = domain["cases"]
    words = {
        "reference": "every film named in the reference manifest (the held-out films among them)",
        "two_knee": "two-knee films built from pairs of them (one mirrored, side by side)",
        "non_knee": "the test suite's non-knee inputs (generated pictures, documents, DICOM CT and MR)",
    }
    parts = [
        f"{words.get(k, k)}: {v['accepted']} of {v['n']} accepted ({v['ok']} `ok`)"
        + (
            f", refused for {', '.join(f'{r} ({n})' for r, n in v['refusal_reasons'].items())}"
            if v["refusal_reasons"]
            else ""
        )
        for k, v in c.items()
    ]
    return "Measured on this run by research/knee_domain.py: " + "; ".join(parts) + "."


def coverage_text(m: dict) -> str:
    """The conformal sets' coverage of a held-out-source test against both truths (evaluate's trust
    block): the folder labels they were calibrated on, and the T-score truth the films are scored against."""
    t = m.get("trust") or {}
    f = t.get("conformal_coverage_folder_labels")
    if not f:
        return ""
    n = f["n"]
    scored = round(t["conformal_coverage"] * n)
    both = t.get("abstention_rate")
    both_txt = f" ({round(both * n)} of the {n} sets hold both classes: `uncertain`)" if both is not None else ""
    return (
        f" Its conformal sets (coverage {t['coverage']:g}) hold the folder label, the truth they were calibrated "
        f"on, for {f['covered']} of {n} held-out films, and the T-score truth those films are scored against for "
        f"{scored} of {n}{both_txt}: the guarantee is about the calibration films' truth and does not carry over "
        "to another. Sets and a threshold that mean the WHO diagnosis need T-score-labelled calibration films "
        "(`kneeosteo calibrate RUN SITE` on your own)."
    )


def orientation_text(d: dict) -> str:
    o = d.get("orientation")
    if not o:
        return ""
    return (
        f" Upside-down films are refused by a learned orientation check (out of fold on its training films and "
        f"their top-to-bottom mirrors: {o['false_refusals']:.1%} of upright films refused, {o['detection']:.1%} of "
        f"mirrored ones caught)."
    )


def trust_text(rd: RunDir, domain: dict | None = None, m: dict | None = None) -> str:
    t = rd.trust
    if t is None:
        return (
            "It gives a probability for any image, including ones that are not frontal knee radiographs: "
            "this run has no trust files (no domain check, uncalibrated)."
        )
    d = t.summary()
    fit = (
        f"temperature {d['calibration'].get('temperature', 1.0):.3f} on {d['fitted']['calibration_images']} "
        f"validation images, threshold {d['threshold']}, coverage {d['coverage']}, "
        + (
            f"{d['domain_method']} domain threshold {d['domain_threshold']:.1f}"
            if d.get("domain_threshold") is not None
            else "no feature-distance domain check"
        )
    )
    return (
        'Its trust files (`trust.json`, docs/trust.md, "Trusting a prediction") flag images unlike its training '
        "films as `out_of_domain` and answers whose conformal set holds both classes as `uncertain`; "
        f"they were fitted by `kneeosteo calibrate` on its own split ({fit})."
        + orientation_text(d)
        + coverage_text(m or {})
        + " "
        + domain_text(domain, rd)
    )


def data_text(split: dict, audit: dict) -> str:
    if split.get("protocol") != HOLDOUT:
        return f"""KOP (Kaggle "Osteoporosis Knee X-ray Dataset"): 372 files, 186 per class. After de-duplication
({len(split["excluded"])} files excluded: copies of the same picture, including
{audit["exact_duplicates"]["label_conflicts"]} pictures filed under both labels) and grouping of near
duplicates: train {len(split["train"])}, validation {len(split["val"])}, test {len(split["test"])}
images (split seed {split["seed"]}, stratified, no picture shared between partitions)."""
    ref = split["reference"]
    why: dict[str, int] = {}
    for e in split["excluded"]:
        r = e["reason"]
        k = (
            "no single truth"
            if "no single truth" in r
            else "label conflict"
            if r.startswith("label conflict")
            else "a copy or near copy of a held-out film"
            if "held-out" in r
            else "a copy of another film"
        )
        why[k] = why.get(k, 0) + 1
    return f"""KOP (Kaggle "Osteoporosis Knee X-ray Dataset"), the held-out-source protocol: the test films are
every film of `{ref["file"]}` with a single truth, {len(split["test"])} distinct films labelled by their
T-score ({ref["meaning"]}), the same test films every seed. Training and validation films are the
other KOP films with their folder labels: train {len(split["train"])}, validation {len(split["val"])}
(split seed {split["seed"]}; near duplicates kept together, no picture shared between partitions).
{len(split["excluded"])} files excluded{"" if not why else " (" + "; ".join(f"{k}: {n}" for k, n in why.items()) + ")"}."""


def command_text(split: dict) -> str:
    data = split.get("data") or "../shared/datasets/kop"
    extra = (
        f" --protocol {HOLDOUT} --reference {split['reference']['file']}" if split.get("protocol") == HOLDOUT else ""
    )
    return (
        f"kneeosteo split {data}{extra} --out split.json --seed {split['seed']}\n"
        f"kneeosteo train {data} --config configs/default_model.toml --split split.json --out RUN"
    )


def shift_text(m: dict, pooled: str) -> str:
    """The source-shift limit, with this run's own shortcut-adversarial figure where it has one."""
    adv = (m.get("shortcut_probes") or {}).get("shortcut_adversarial") or {}
    if not adv.get("n"):
        return (
            "Image source, film format and post-processing shift the output: on the images where the file's\n"
            f"  metadata points the wrong way its accuracy falls towards chance (0.5{pooled})."
        )
    lo, hi = adv["ci95"]
    return (
        "Image source, film format and post-processing shift the output: on the "
        f"{adv['n']} of its {adv['n_test']} test images where a forest on the file's metadata alone is wrong, "
        f"its accuracy is {adv['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] (chance 0.5{pooled})."
    )


def card(
    run: Path,
    audit: dict,
    table: dict | None,
    grid: Path | None = None,
    row: str | None = None,
    against: str | None = None,
    reference: Path | None = None,
    domain: dict | None = None,
) -> str:
    rd = RunDir.open(run)
    rec = rd.config.record
    m = rd.read_json("metrics.json")
    split = rd.read_json("split.json")
    holdout = split.get("protocol") == HOLDOUT
    s = audit["shortcut_metadata_only"]
    c = m["counts"]
    rows = "\n".join(
        f"| {k} | {ci(m, k)} |"
        for k in ("sensitivity", "specificity", "precision", "fpr", "accuracy", "f1", "auc", "loss")
    )
    kind = "hybrid, with the attention module" if rd.config.model["use_attention"] else "backbone + FC head"
    if grid is not None:
        grid_txt = (
            f"\n## Evidence: {len(json.loads((grid / 'table1.json').read_text())['info']['seeds'])} seeds on the "
            "held-out source\n" + heldout_evidence(grid, row, against, split, reference)
        )
    elif table is not None:
        grid_txt = "\n## Evidence: the levers against the paper's hybrid\n" + evidence(
            table, [r["model"] for r in table["rows"] if r.get("seeds")]
        )
    else:
        grid_txt = ""
    probes = (
        f"""
## Does it read bone? (shortcut probes on the same test images)
```
{format_probes(m["shortcut_probes"])}
```
"""
        if m.get("shortcut_probes")
        else ""
    )
    pooled = "" if holdout else "; pooled over the grid's\n  seeds in the evidence above"
    truth = f" against their T-score truth ({split['reference']['meaning']})" if holdout else ""
    source = (
        "- Trained on one small public data set of mixed, undocumented sources with folder labels, and tested "
        "on its films that carry a T-score, from the same public collection: no other hospital's films. "
        "Read its figures beside the clinical baselines' (the evidence above)."
        + f"\n- Its threshold was set on folder labels: on the held-out films it calls {c['tp'] + c['fp']} of "
        f"{m['n']} osteoporosis (specificity {m['specificity']['value']:.3f} against the T-score truth)."
        if holdout
        else "- Trained and tested on one small public data set of mixed, undocumented sources; no external\n"
        "  validation, no patient-level information, no DXA reference standard."
    )
    return f"""# Model card: kneeosteo default model ({rd.config.model["backbone"]}, {kind})

**Research use only — not a diagnostic device.** It has not been validated on any clinical
population and must not be used to make decisions about patients.

## What it is
{architecture(rd)}
Backbone weights: `{rec["backbone_weights"]["source"]}`, sha256 `{rec["backbone_weights"]["sha256"]}`.
Why these settings: docs/model.md, "The default model and the evidence for it".

## Data
{data_text(split, audit)}

## Training command
```
{command_text(split)}
```
Best epoch {rec.get("best_epoch")} of {rec.get("epochs_run")} by validation loss.

## Test metrics (n = {m["n"]}{truth}: TP {c["tp"]}, FP {c["fp"]}, FN {c["fn"]}, TN {c["tn"]})
| metric | value |
|---|---|
{rows}

Test-set accuracy: **{m["accuracy"]["value"]:.4f}**. These are one split's figures (seed {split["seed"]});
the evidence below gives the mean ± std of the same settings over the grid's seeds: quote those.
{probes}{grid_txt}

## The shortcut this must be read against
A random forest that sees only file metadata (size, aspect ratio, file size, colour mode) reaches
**{s["accuracy"]:.3f}** accuracy (95% CI {s["accuracy_ci95"][0]:.3f}-{s["accuracy_ci95"][1]:.3f}) on the same
data: the source of a KOP image predicts its label. The shortcut-adversarial accuracy above is
this model's accuracy on the test images where that forest is wrong (chance: 0.5).

## Known failure modes and limits
{source}
- A test set of {m["n"]} images: the accuracy's 95% interval is {m["accuracy"]["ci_low"]:.3f}-{m["accuracy"]["ci_high"]:.3f} here.
- {trust_text(rd, domain, m)}
- {shift_text(m, pooled)}
"""


def bundle(
    run_dir: Path,
    audit: dict,
    table: dict | None,
    dest: Path = DEST,
    **kw,
) -> None:
    text = card(run_dir, audit, table, **kw)  # first: a card that cannot be written leaves the bundle as it was
    dest.mkdir(parents=True, exist_ok=True)
    for f in TRUST_FILES + ("fused.json",):  # a stale file must not outlive the model it was fitted for
        (dest / f).unlink(missing_ok=True)
    for f in FILES + tuple(f for f in TRUST_FILES if (run_dir / f).is_file()):
        shutil.copy2(run_dir / f, dest / f)
    write_text(dest / "MODEL_CARD.md", text)
    print(f"bundled {run_dir} into {dest}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage=__doc__)
    ap.add_argument("run", nargs="?", type=Path)
    ap.add_argument("audit", nargs="?", type=Path)
    ap.add_argument("table", nargs="?", type=Path)
    ap.add_argument("--grid", type=Path)
    ap.add_argument("--row")
    ap.add_argument("--against")
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--domain", type=Path)
    ap.add_argument("--dest", type=Path, default=DEST)
    ap.add_argument("--check-rule", action="store_true")
    a = ap.parse_args(argv)
    if a.grid is not None and not (a.row and a.against):
        ap.error("--grid needs --row (the shipped row) and --against (the row it was compared with)")
    if a.check_rule:
        if a.grid is None:
            ap.error("--check-rule needs --grid, --row and --against")
        r = rule_figures(a.grid, a.row, a.against)
        print(json.dumps(r, indent=2))
        sys.exit(0 if r["passes"] else 1)
    if a.run is None or a.audit is None:
        ap.error("RUN and AUDIT_JSON are needed")
    if a.grid is not None:
        if a.table is not None:
            ap.error("--grid replaces TABLE1_JSON (its table1.json is read)")
        cell = RunDir.open(a.grid / "cells" / a.row / "seed0")
        if RunDir.open(a.run).config.weights_sha256 != cell.config.weights_sha256:
            sys.exit(f"{a.run}: not the weights of {cell.path} (the shipped model is the row's seed-0 cell)")
    table = json.loads(a.table.read_text()) if a.table else None
    domain = json.loads(a.domain.read_text()) if a.domain else None
    bundle(
        a.run,
        json.loads(a.audit.read_text()),
        table,
        a.dest,
        grid=a.grid,
        row=a.row,
        against=a.against,
        reference=a.reference,
        domain=domain,
    )


if __name__ == "__main__":
    main()
