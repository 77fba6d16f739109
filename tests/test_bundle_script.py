"""scripts/bundle_default_model.py and scripts/write_default_config.py on a tiny held-out grid
(issue 32, "Ship it"): the card's held-out figures are the grid's files and what follows from
them, the shipped weights must be the row's seed-0 cell, and the settings file reads back as the
bundled run's settings."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import imagegen as g
from kneeosteo.config import TrainConfig, load_config, read_settings
from kneeosteo.data.reference import read_reference
from kneeosteo.run import RunDir

REPO = Path(__file__).resolve().parent.parent
HEADER = ["path", "t_score", "diagnosis", "source_id", "age", "sex", "weight_kg"]
# osteoporosis (T <= -2.5): 3 of 8; low bone mass (T < -1): 6 of 8, so the two truths differ
ROWS = [
    ["normal/normal_000.png", "-0.5", "", "P0", "51", "female", "70"],
    ["normal/normal_001.png", "-1.5", "", "P1", "60", "female", "66"],
    ["normal/normal_003.png", "-0.2", "", "P2", "48", "male", "80"],
    ["normal/normal_004.png", "-2.7", "", "P3", "70", "female", "55"],
    ["osteoporosis/osteoporosis_000.png", "-3.1", "", "P4", "80", "female", "50"],
    ["osteoporosis/osteoporosis_001.png", "-2.0", "", "P5", "65", "male", "75"],
    ["osteoporosis/osteoporosis_002.png", "-1.2", "", "P6", "55", "male", "90"],
    ["osteoporosis/osteoporosis_003.png", "-2.9", "", "P7", "62", "female", "60"],
]
AUDIT = {
    "shortcut_metadata_only": {"accuracy": 0.61, "accuracy_ci95": [0.5, 0.7]},
    "exact_duplicates": {"label_conflicts": 0},
}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two settings-file rows (the shipped one, `ship`, and `prev`), two seeds, the held-out
    protocol with covariates; `ship`'s seed-0 cell calibrated and evaluated as the ship script does."""
    from kneeosteo.evaluation.evaluate import evaluate_run
    from kneeosteo.experiments.reproduce import reproduce
    from kneeosteo.experiments.trust_fit import calibrate_run

    base = tmp_path_factory.mktemp("bundle")
    root = g.make_dataset(base / "data", n_per_class=12).root
    ref = base / "tscores.csv"
    with open(ref, "w", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *ROWS])
    levers = {}
    for name, preset, size in (("ship", "robust", 48), ("prev", "paper", 32)):
        levers[name] = base / f"{name}.toml"
        levers[name].write_text(
            f'[train]\nuse_backbone = false\nattention = true\npreprocess = "{preset}"\nimage_size = {size}\n'
            'augment = "none"\nepochs = 3\nbatch_size = 8\nseed = 0\n'
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KNEEOSTEO_CACHE", str(base / "cache"))
            mp.setenv("KNEEOSTEO_OFFLINE", "1")
            out = base / "grid"
            reproduce(
                root,
                out,
                TrainConfig.from_dict(dict(data=str(root), epochs=1, copies=1, batch_size=8, image_size=48)),
                [str(levers["ship"]), str(levers["prev"])],
                seeds=[0, 1],
                protocol="holdout-reference",
                reference=ref,
                covariates=["age", "sex", "weight_kg"],
                console=lambda *a: None,
                limits={"epochs": 1},
            )
            cell = out / "cells" / "ship" / "seed0"
            run = calibrate_run(cell, base / "run", root, cell / "split.json", acceptance=0.99).path
            (run / "history.csv").write_bytes((cell / "history.csv").read_bytes())
            evaluate_run(run, probes=False)
    finally:
        torch.set_num_threads(threads)
    return base, out, run, ref, levers


def _preds(grid: Path, row: str) -> dict[int, dict[str, tuple[int, float]]]:
    out = {}
    for seed in (0, 1):
        with open(grid / "cells" / row / f"seed{seed}" / "predictions.csv", newline="") as fh:
            out[seed] = {r["path"]: (int(r["label"]), float(r["probability"])) for r in csv.DictReader(fh)}
    return out


def test_the_card_gives_the_grids_held_out_figures(grid, tmp_path):
    base, out, run, ref, _ = grid
    bundle = _script("bundle_default_model")
    dest = tmp_path / "assets"
    (dest).mkdir()
    (dest / "fused.json").write_text("{}")  # a stale file of an earlier model
    bundle.bundle(run, AUDIT, None, dest, grid=out, row="ship", against="prev", reference=ref)
    card = (dest / "MODEL_CARD.md").read_text()
    assert (dest / "model.safetensors").read_bytes() == (out / "cells/ship/seed0/model.safetensors").read_bytes()
    assert (dest / "trust.json").is_file() and not (dest / "fused.json").exists()
    assert "`knee` preset" not in card and "`robust` preset" in card
    assert "held-out-source protocol" in card and "--protocol holdout-reference" in card
    table = {r["model"]: r for r in json.loads((out / "table1.json").read_text())["rows"]}
    clinical = json.loads((out / "clinical.json").read_text())
    truth = {f.path: f for f in read_reference(ref).single}
    for row in ("ship", "prev"):
        r, p = table[row], _preds(out, row)
        # rows named by what their cells were trained with ("prev" is the previous default's settings)
        title = (
            f"{row} (`robust` preset, 48 px)"
            if row == "ship"
            else f"{row} (`paper` preset, 32 px" + (", the previous default's settings)")
        )
        line = next(x for x in card.splitlines() if x.startswith(f"| {title} | 2 | "))
        assert f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f}" in line
        # the seeds' mean probability, one score per film, against the cells' labels
        paths = sorted(p[0])
        mean = [np.mean([p[s][x][1] for s in p]) for x in paths]
        assert f"| {roc_auc_score([p[0][x][0] for x in paths], mean):.3f} [" in line
        # the same cells against low bone mass (T < -1), from the reference, not the cells' labels
        lbm = [roc_auc_score([int(truth[x].t_score < -1) for x in d], [v[1] for v in d.values()]) for d in p.values()]
        assert f"| {title} | 2 | {np.mean(lbm):.3f} ± {np.std(lbm, ddof=1):.3f} | " in card
        fused = np.mean([s["fused_auc"]["auc"] for s in clinical["models"][row]])
        assert any(x.startswith(f"| {title} | 2 | ") and f"| {fused:.3f} (" in x for x in card.splitlines())
    for name, r in clinical["fixed"].items():
        a = r["auc"]
        assert f"| {name} ({r['rule']}) | - | {a['auc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] |" in card
    # the rule's figures are the rows' own
    rule = bundle.rule_figures(out, "ship", "prev")
    assert rule["complete"] and rule["seeds_in"] == [0, 1]
    assert rule["mean_auc"]["ship"] == pytest.approx(table["ship"]["auc_mean"])
    assert rule["mean_auc"]["prev"] == pytest.approx(table["prev"]["auc_mean"])
    assert rule["passes"] == (rule["a"] and rule["b"])


def test_only_the_rows_seed0_weights_are_bundled_and_a_wrong_reference_is_refused(grid, tmp_path):
    base, out, run, ref, _ = grid
    bundle = _script("bundle_default_model")
    dest = tmp_path / "assets"
    common = [str(base / "audit.json"), "--grid", str(out), "--against", "prev", "--dest", str(dest)]
    (base / "audit.json").write_text(json.dumps(AUDIT))
    with pytest.raises(SystemExit, match="seed-0 cell"):  # seed 1's weights: a chosen seed
        bundle.main([str(out / "cells/ship/seed1"), *common, "--row", "ship", "--reference", str(ref)])
    with pytest.raises(SystemExit, match="seed-0 cell"):  # the run is not the other row's
        bundle.main([str(run), *common, "--row", "prev", "--reference", str(ref)])
    assert not dest.exists()
    edited = tmp_path / "tscores.csv"
    edited.write_text(ref.read_text().replace("-3.1", "-0.1"))
    with pytest.raises(SystemExit, match="sha256"):
        bundle.main([str(run), *common, "--row", "ship", "--reference", str(edited)])
    assert not (dest / "model.safetensors").exists()  # the card is written first: nothing copied
    # --check-rule exits 0 exactly when the rule passes
    with pytest.raises(SystemExit) as e:
        bundle.main(["--check-rule", "--grid", str(out), "--row", "ship", "--against", "prev"])
    assert e.value.code == (0 if bundle.rule_figures(out, "ship", "prev")["passes"] else 1)


def test_the_default_settings_file_is_written_as_the_bundled_run_was_trained(grid, tmp_path):
    base, out, run, ref, levers = grid
    write = _script("write_default_config")
    dest = tmp_path / "default_model.toml"
    write.main(str(run), str(levers["ship"]), str(dest))
    import tomllib

    text = dest.read_text()
    doc = tomllib.loads(text)
    assert "train" not in doc and {"data", "model", "trust"} <= set(doc)  # written in sections
    named = read_settings(dest)
    settings = RunDir.open(run).config.settings
    lever_keys = list(tomllib.loads(levers["ship"].read_text())["train"])  # the lever in the old form
    assert set(named) == set(lever_keys) | {"operating_point", "coverage", "domain_acceptance"}
    assert named["epochs"] == settings["epochs"] == 1  # the grid's limit, not the lever file's 3
    assert named["domain_acceptance"] == 0.99  # what the run was calibrated with, not the training default
    flat = load_config(dest, {}).to_dict()
    for key in named:
        assert flat[key] == settings[key], key
    assert "research/DEFAULT_CHOICE.md" in text and "at most 1 epochs" in text
    assert "kneeosteo train DATA --config configs/default_model.toml --split S --out RUN" in text
