"""`reproduce` end to end on a tiny generated data set: table shape, shared test images, resume."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

import imagegen
from kneeosteo.config import TrainConfig
from kneeosteo.evaluation.metrics import METRICS, Metric
from kneeosteo.experiments.reproduce import model_catalogue, reproduce
from kneeosteo.experiments.table1 import PAPER_TABLE

MODELS = ["hybrid-efficientnet_lite0", "fc-efficientnet_lite0", "am-only", "fc-vgg19"]


@pytest.fixture(scope="module")
def tiny_repro(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    imagegen.make_dataset(root, n_per_class=12, size=48, seed=3)
    out = tmp_path_factory.mktemp("repro")
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("KNEEOSTEO_CACHE", str(cache))
    mp.setenv("KNEEOSTEO_OFFLINE", "1")  # vgg19 weights: don't try a download
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = TrainConfig.from_dict(dict(data=str(root), epochs=1, copies=1, batch_size=8, image_size=64))
    logs = []
    rows = reproduce(root, out, base, MODELS, seeds=[0, 1], test_size=6, console=logs.append)
    yield root, out, base, rows, logs
    torch.set_num_threads(threads)
    mp.undo()


def test_table_has_a_row_per_model_with_paper_columns(tiny_repro):
    _, out, _, rows, _ = tiny_repro
    with open(out / "table1.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["model"] for r in table] == MODELS  # no metadata row: no shortcut figure was given
    for col in METRICS:  # one column group per metric of the table
        assert f"{col}_mean" in table[0] and f"{col}_ci_low" in table[0]
    ran = {r["model"]: r for r in rows}
    for key in MODELS[:3]:
        assert ran[key]["seeds"] == 2
        assert 0.0 <= ran[key]["accuracy_mean"] <= 1.0
    assert ran["fc-vgg19"]["status"].startswith("skipped")
    assert ran["fc-vgg19"]["seeds"] == 0
    # the paper's value sits next to ours for the baseline it corresponds to
    assert ran["fc-vgg19"]["accuracy_paper"] == PAPER_TABLE["VGG19"]["accuracy"]
    md = (out / "table1.md").read_text()
    assert "same test images: yes" in md
    # a GitHub/CommonMark table needs as many delimiter cells as header cells, and rows to match
    table_lines = [line for line in md.split("Shortcut probes")[0].splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(MODELS)
    assert {line.count("|") for line in table_lines} == {table_lines[0].count("|")}
    assert (out / "table1.png").stat().st_size > 1000


def test_every_model_saw_identical_test_images(tiny_repro):
    _, out, _, _, _ = tiny_repro
    for seed in (0, 1):
        split = json.loads((out / "splits" / f"seed{seed}.json").read_text())
        expected = sorted(split["test"])
        for key in MODELS[:3]:
            with open(out / "cells" / key / f"seed{seed}" / "predictions.csv", newline="") as fh:
                assert sorted(r["path"] for r in csv.DictReader(fh)) == expected


def test_paired_tests_against_the_reference_hybrid(tiny_repro):
    _, _, _, rows, _ = tiny_repro
    ran = {r["model"]: r for r in rows}
    ref = ran["hybrid-efficientnet_lite0"]
    assert "mcnemar_p" not in ref  # the reference is not compared with itself
    fc = ran["fc-efficientnet_lite0"]
    assert fc["paired_n"] == 12  # 6 test images x 2 seeds
    assert 0.0 <= fc["mcnemar_p"] <= 1.0


def _cell(out, key: str, seed: int) -> tuple[dict, dict]:
    """A cell's predictions.csv as {path: (label, probability)} and its metrics.json."""
    cell = out / "cells" / key / f"seed{seed}"
    with open(cell / "predictions.csv", newline="") as fh:
        preds = {r["path"]: (int(r["label"]), float(r["probability"])) for r in csv.DictReader(fh)}
    return preds, json.loads((cell / "metrics.json").read_text())


def _delong_p(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong's test written out (structural components, Sun & Xu's notation), independent of
    kneeosteo.evaluation.stats; p = 1 for equal AUCs, nan for a zero variance with unequal ones."""
    from scipy.stats import norm

    pos, neg = y == 1, y == 0

    def components(p):
        x, z = p[pos][:, None], p[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        return psi.mean(axis=1), psi.mean(axis=0), psi.mean()

    va, wa, auc_a = components(a)
    vb, wb, auc_b = components(b)
    s = np.cov(np.vstack([va, vb])) / pos.sum() + np.cov(np.vstack([wa, wb])) / neg.sum()
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    if auc_a == auc_b:
        return 1.0
    if var <= 1e-15:
        return math.nan
    return float(2 * norm.sf(abs(auc_a - auc_b) / math.sqrt(var)))


def test_paired_tests_and_aggregation_recomputed_from_the_cells(tiny_repro):
    """Every aggregated figure again, from the cells' own files and textbook formulas: per-seed
    accuracy and AUC (predictions.csv vs metrics.json), mean, sample std and Student-t interval
    over seeds, the discordant counts, McNemar's exact p and DeLong's p pooled over seeds."""
    from scipy.stats import binomtest
    from scipy.stats import t as student_t
    from sklearn.metrics import roc_auc_score

    _, out, _, rows, _ = tiny_repro
    ran = {r["model"]: r for r in rows}
    with open(out / "table1.csv", newline="") as fh:
        table = {r["model"]: r for r in csv.DictReader(fh)}
    ref = "hybrid-efficientnet_lite0"
    cells = {(k, s): _cell(out, k, s) for k in MODELS[:3] for s in (0, 1)}
    for key in MODELS[:3]:
        per_seed = []
        for seed in (0, 1):
            preds, metrics = cells[key, seed]
            y = np.array([v[0] for v in preds.values()])
            p = np.array([v[1] for v in preds.values()])
            acc, auc = float(np.mean((p >= 0.5) == y)), float(roc_auc_score(y, p))
            assert metrics["accuracy"]["value"] == pytest.approx(acc, abs=1e-12), (key, seed)
            # predictions.csv keeps 6 decimals: a positive and a negative that round to the same value
            # count half in the file's AUC, whatever their order was; each such pair may move it by
            # 0.5 / (positives x negatives) (an untrained tiny model's outputs differ in the 6th decimal)
            tied = int(np.sum(p[y == 1][:, None] == p[y == 0][None, :]))
            slack = 0.5 * tied / (int(np.sum(y == 1)) * int(np.sum(y == 0)))
            assert metrics["auc"]["value"] == pytest.approx(auc, abs=1e-6 + slack), (key, seed)
            per_seed.append({"accuracy": acc, "auc": auc})  # Table I aggregates the cells' predictions.csv
        for col in ("accuracy", "auc"):
            v = np.array([s[col] for s in per_seed])
            mean, sd = float(v.mean()), float(v.std(ddof=1))
            half = float(student_t.ppf(0.975, df=len(v) - 1)) * sd / math.sqrt(len(v))
            want = {"mean": mean, "std": sd, "ci_low": max(mean - half, 0.0), "ci_high": min(mean + half, 1.0)}
            for stat, value in want.items():
                assert ran[key][f"{col}_{stat}"] == pytest.approx(value, abs=1e-6), (key, col, stat)
                assert float(table[key][f"{col}_{stat}"]) == pytest.approx(value, abs=1e-4), (key, col, stat)
        if key == ref:
            continue
        y, pa, pb = [], [], []
        for seed in (0, 1):
            a, b = cells[key, seed][0], cells[ref, seed][0]
            assert set(a) == set(b)
            for path in sorted(a):
                y.append(a[path][0])
                pa.append(a[path][1])
                pb.append(b[path][1])
        y, pa, pb = np.array(y), np.array(pa), np.array(pb)
        right_a, right_b = (pa >= 0.5) == y, (pb >= 0.5) == y
        b_, c_ = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
        r = ran[key]
        assert (r["paired_n"], r["mcnemar_b"], r["mcnemar_c"]) == (len(y), b_, c_), key
        p_mc = 1.0 if b_ == c_ else min(1.0, binomtest(min(b_, c_), b_ + c_, 0.5).pvalue)
        assert r["mcnemar_p"] == pytest.approx(p_mc, abs=1e-9), key
        assert r["delong_p"] == pytest.approx(_delong_p(y, pa, pb), abs=1e-6, nan_ok=True), key
        assert float(table[key]["mcnemar_p"]) == pytest.approx(p_mc, abs=1e-4)


def test_rerun_reuses_finished_cells(tiny_repro):
    root, out, base, rows, _ = tiny_repro
    logs = []
    again = reproduce(root, out, base, MODELS, seeds=[0, 1], test_size=6, console=logs.append)
    assert sum("(done, reused)" in line for line in logs) == 6
    assert [r["accuracy_mean"] for r in again] == [r["accuracy_mean"] for r in rows]


def test_unknown_model_is_refused(tiny_repro):
    root, out, base, _, _ = tiny_repro
    with pytest.raises(ValueError, match="unknown model"):
        reproduce(root, out, base, ["resnet-9000"], seeds=[0])


def test_catalogue_covers_the_papers_baselines_and_ablations():
    cat = model_catalogue()
    assert {m.paper_row for m in cat.values()} >= set(PAPER_TABLE)
    assert not cat["fc-efficientnet_lite0"].attention and cat["fc-efficientnet_lite0"].use_backbone
    assert cat["am-only"].attention and not cat["am-only"].use_backbone


def npv(tp, fp, fn, tn):
    return tn, tn + fn


def test_a_registered_metric_flows_into_metrics_json_and_table1(tiny_repro, tmp_path, monkeypatch):
    """One table entry, no other change: a rescored cell's metrics.json and Table I carry it, even
    marked as a paper column (which the paper's printed table lacks: its paper value is nan)."""
    root, out, base, rows, _ = tiny_repro
    monkeypatch.setitem(METRICS, "npv", Metric("npv", "NPV", "wilson", counts=npv, paper=True))
    again = tmp_path / "repro"
    shutil.copytree(out, again)
    shutil.rmtree(again / "cells" / "am-only" / "seed0")  # trained and scored anew (AM only: seconds)
    new = reproduce(root, again, base, MODELS, seeds=[0, 1], test_size=6, console=lambda _: None)
    metrics = json.loads((again / "cells" / "am-only" / "seed0" / "metrics.json").read_text())
    assert metrics["npv"]["method"] == "wilson" and "ci_low" in metrics["npv"]
    with open(again / "table1.csv", newline="") as fh:
        table = {r["model"]: r for r in csv.DictReader(fh)}
    assert {"npv_mean", "npv_std", "npv_ci_low", "npv_ci_high", "npv_paper"} <= set(table["am-only"])
    assert table["fc-vgg19"]["npv_paper"] == "nan"
    header = [c.strip() for c in (again / "table1.md").read_text().splitlines()[0].split("|")]
    assert header[header.index("auc") + 1] == "npv"
    old = {r["model"]: r for r in rows}
    for r in new:  # the metrics already there keep their values in the cells not rescored
        if r["model"] in ("hybrid-efficientnet_lite0", "fc-efficientnet_lite0"):
            for c in METRICS:
                if c != "npv":  # nan == nan: a ratio undefined in both runs
                    assert r[f"{c}_mean"] == pytest.approx(old[r["model"]][f"{c}_mean"], abs=0, nan_ok=True), c


def test_shortcut_probes_in_the_table_recomputed_from_the_cells(tiny_repro):
    """The probe columns of table1 again from each cell's metrics.json: shortcut-adversarial
    correct/n pooled over seeds with a Wilson interval, per-seed counts, occlusion AUCs averaged."""
    from statsmodels.stats.proportion import proportion_confint

    _, out, _, rows, _ = tiny_repro
    ran = {r["model"]: r for r in rows}
    for key in MODELS[:3]:
        probes = [_cell(out, key, s)[1]["shortcut_probes"] for s in (0, 1)]
        adv = [p["shortcut_adversarial"] for p in probes]
        k, n = sum(a.get("correct", 0) for a in adv), sum(a["n"] for a in adv if "correct" in a)
        if n:
            assert (ran[key]["adversarial_n"], ran[key]["adversarial_accuracy"]) == (n, pytest.approx(k / n)), key
            lo, hi = proportion_confint(k, n, method="wilson")
            assert (ran[key]["adversarial_ci_low"], ran[key]["adversarial_ci_high"]) == (
                pytest.approx(lo),
                pytest.approx(hi),
            )
            assert ran[key]["adversarial_per_seed"] == "; ".join(
                f"{s}: {a['correct']}/{a['n']}" for s, a in zip((0, 1), adv) if "correct" in a
            )
        hidden = [p["occlusion"]["hide_bone"]["auc"] for p in probes]
        assert ran[key]["auc_bone_hidden_mean"] == pytest.approx(np.mean(hidden)), key
        within = [p["within_source"]["auc"] for p in probes]  # generated films: one source, both classes
        assert ran[key]["auc_within_source_mean"] == pytest.approx(np.mean(within)), key
    md = (out / "table1.md").read_text()
    assert "Shortcut probes" in md and "shortcut-adversarial acc" in md and "AUC within source" in md
    table_lines = [line for line in md.split("Shortcut probes")[1].splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 3 and len({line.count("|") for line in table_lines}) == 1


def test_tables_say_which_compute_path_trained_the_cells(tiny_repro):
    _root, out, _base, _rows, _logs = tiny_repro
    info = json.loads((out / "table1.json").read_text())["info"]
    cells = list((out / "cells").rglob("metrics.json"))
    assert sum(info["compute_paths"].values()) == len(cells)
    label = next(iter(info["compute_paths"]))
    assert label.startswith(("fp32 on ", "bf16 on ")) and f"Trained on: {label}" in (out / "table1.md").read_text()


def test_report_of_a_reproduce_folder_links_every_row_to_its_cells(tiny_repro, tmp_path):
    from html.parser import HTMLParser

    from kneeosteo.reporting import write_report

    _root, out, _base, rows, _logs = tiny_repro
    html = write_report(out, tmp_path / "grid.html").read_text()

    class Links(HTMLParser):
        ids, hrefs, srcs = set(), [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "id" in a:
                self.ids.add(a["id"])
            if "href" in a:
                self.hrefs.append(a["href"])
            if "src" in a:
                self.srcs.append(a["src"])

    page = Links()
    page.feed(html)
    cells = sorted(p.parent for p in (out / "cells").rglob("metrics.json"))
    anchors = {i for i in page.ids if i.startswith("cell-")}
    assert len(anchors) == len(cells)  # one section per finished cell
    assert all(h.startswith("#") and h[1:] in page.ids for h in page.hrefs)  # every link lands
    assert all(s.startswith("data:image/") for s in page.srcs) and page.srcs  # forest plot, ROC, loss inline
    for r in rows:
        if r.get("seeds"):
            assert r["title"] in html
            acc = f"{r['accuracy_mean']:.3f} &plusmn; {r['accuracy_std']:.3f}"
            assert acc in html


def test_every_lever_file_loads_and_says_what_it_trains():
    from pathlib import Path

    from kneeosteo.experiments.reproduce import config_model

    levers = sorted((Path(__file__).resolve().parent.parent / "configs" / "levers").glob("*.toml"))
    assert len(levers) >= 5
    for f in levers:
        spec = config_model(str(f))
        assert spec.key == f.stem and Path(spec.config) == f.resolve()
        from kneeosteo.config import read_settings

        train = read_settings(f)
        if train.get("finetune"):
            assert spec.trained == f"backbone's last {train['trainable_stages']} stage(s) fine-tuned", f.name
        else:
            assert "fine-tuned" not in (spec.trained or ""), f.name


def test_grid_epochs_and_patience_reach_settings_file_models(tmp_path, monkeypatch):
    """`reproduce --models FILE.toml --epochs 8 --patience 3`: the file's own 30/6 must not win
    over the grid's explicit limits (a five-seed grid silently trained 30 epochs per cell once);
    without limits the file's settings stand."""
    from pathlib import Path

    from kneeosteo.config import TrainConfig
    from kneeosteo.experiments import reproduce as rp

    seen = []
    monkeypatch.setattr(rp, "train_and_score", lambda cfg, **kw: seen.append(cfg))
    f = str(Path(__file__).resolve().parent.parent / "configs" / "levers" / "knee384.toml")  # 30 epochs, patience 6
    base = TrainConfig.from_dict({"data": str(tmp_path)})
    for limits, want in (({"epochs": 8, "patience": 3}, (8, 3)), (None, (30, 6))):
        cell = rp.Cell(rp.config_model(f, limits), 1, None, tmp_path / str(want[0]))
        rp.run_cell(cell, base, tmp_path / "split.json", False)
        got = seen[-1]
        assert (got.optimiser.epochs, got.optimiser.patience, got.runtime.seed) == (*want, 1)
        assert (got.data.preprocess, got.data.image_size) == ("knee", 384)  # the file's other settings kept
