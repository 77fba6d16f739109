"""Reference labels (issue 31): a T-score manifest beside the folder labels, the agreement table,
files with no single truth, and the held-out-source split, on a hand-made manifest with known
answers (and on KOP's tscores.csv when the data set is there)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import imagegen as g
from kneeosteo.data.audit import build_audit, reference_check, summary_lines
from kneeosteo.data.reference import covariate_matrix, read_reference
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.split import held_out_leaks, load_split, make_split
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.interfaces.cli import main
from kneeosteo.run import RunDir
from kneeosteo.trust import logit

HEADER = ["path", "t_score", "diagnosis", "source_id", "age", "sex", "weight_kg"]
# path, T, diagnosis, patient, age, sex, weight: the known answers below are counted by hand
ROWS = [
    ["normal/normal_000.png", "-0.5", "normal", "P0", "51", "female", "70"],  # agrees under both
    ["normal/normal_001.png", "-1.5", "", "P1", "60", "female", "66"],  # osteopenia: op agrees, lbm not
    ["normal/normal_002.png", "-0.5", "", "P2", "48", "male", "80"],  # planted: two truths
    ["normal/normal_002.png", "-3.0", "", "P3", "77", "female", "52"],
    ["normal/normal_004.png", "-2.7", "osteoporosis", "P4", "70", "female", "55"],  # disagrees under both
    ["osteoporosis/osteoporosis_000.png", "-3.1", "", "P5", "80", "female", "50"],  # agrees under both
    ["osteoporosis/osteoporosis_001.png", "-2.0", "", "P6", "65", "male", "75"],  # op disagrees, lbm agrees
    ["osteoporosis/osteoporosis_002.png", "-0.2", "", "P7", "45", "male", "90"],  # disagrees under both
    ["osteoporosis/osteoporosis_003.png", "", "osteopenia", "P8", "62", "female", "60"],  # diagnosis only
]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def refdata(tmp_path_factory):
    """12+12 generated films, an exact copy of normal_000 (dup_000) and a near copy of normal_001
    (near_000), both reference films; scanned once."""
    base = tmp_path_factory.mktemp("ref")
    root = base / "data"
    g.make_dataset(root, n_per_class=12, exact_duplicates=1, near_duplicates=1)
    ref = write_csv(base / "reference.csv", HEADER, ROWS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(base / "cache"))
        scan = scan_dataset(root)
    return root, ref, scan


def test_agreement_table_matches_the_hand_count(refdata, monkeypatch):
    import functools

    import kneeosteo.data.audit as audit_mod
    from kneeosteo.data.shortcut import metadata_only_accuracy

    monkeypatch.setattr(audit_mod, "metadata_only_accuracy", functools.partial(metadata_only_accuracy, repeats=1))
    root, ref_file, scan = refdata
    ref = read_reference(ref_file, root)
    a = build_audit(scan, reference=ref)["reference"]
    assert a["files_with_single_truth"] == 7 and a["files"] == 8 and a["rows"] == 9
    op, lbm = a["definitions"]["osteoporosis"], a["definitions"]["low_bone_mass"]
    assert (op["agree"], op["of"]) == (3, 7)
    assert op["table"] == {"tp": 1, "fp": 3, "fn": 1, "tn": 2}
    assert {m["path"] for m in op["disagreeing"]} == {
        "normal/normal_004.png",
        "osteoporosis/osteoporosis_001.png",
        "osteoporosis/osteoporosis_002.png",
        "osteoporosis/osteoporosis_003.png",
    }
    assert (lbm["agree"], lbm["of"]) == (4, 7)
    assert lbm["table"] == {"tp": 3, "fp": 1, "fn": 2, "tn": 1}
    assert {m["path"] for m in lbm["disagreeing"]} == {
        "normal/normal_001.png",
        "normal/normal_004.png",
        "osteoporosis/osteoporosis_002.png",
    }
    # the planted file with two truths is excluded and named, with both rows
    assert [m["path"] for m in a["multi_truth"]] == ["normal/normal_002.png"]
    assert "rows 4 (normal, T -0.5), 5 (osteoporosis, T -3)" in a["multi_truth"][0]["reason"]
    assert a["folder_by_band"]["normal"] == {"normal": 1, "osteopenia": 1, "osteoporosis": 1}
    md = "\n".join(summary_lines(_minimal(a)))
    assert "3 of 7 agree" in md and "4 of 7 agree" in md and "normal/normal_002.png" in md


def _minimal(ref: dict) -> dict:
    """An audit document holding only what summary_lines reads, plus the reference section."""
    return {
        "exact_duplicates": {"groups": 0, "files_involved": 0, "label_conflicts": 0},
        "near_duplicates": {"threshold_bits": 6, "clusters": 0},
        "shortcut_metadata_only": {},
        "per_class": {},
        "files_read": 0,
        "distinct_images": 0,
        "unreadable": [],
        "skipped_not_images": [],
        "patients": {"patients": 0, "images_without_patient": 0},
        "manifest_rows_left_out": [],
        "reference": ref,
    }


def test_audit_command_prints_and_writes_the_reference_section(refdata, tmp_path, capsys, monkeypatch):
    import functools

    import kneeosteo.data.audit as audit_mod
    from kneeosteo.data.shortcut import metadata_only_accuracy

    monkeypatch.setattr(audit_mod, "metadata_only_accuracy", functools.partial(metadata_only_accuracy, repeats=1))
    root, ref_file, _ = refdata
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(root), "--reference", str(ref_file), "--out", str(tmp_path / "a")])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "osteoporosis = T <= -2.5 (WHO): 3 of 7 agree (4 disagree)" in out
    assert "T < -1 (osteopenia or osteoporosis): 4 of 7 agree (3 disagree)" in out
    assert "no single truth (excluded): 1 (normal/normal_002.png)" in out
    doc = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert doc["reference"]["definitions"]["osteoporosis"]["agree"] == 3
    md = (tmp_path / "a" / "audit.md").read_text()
    assert "| osteoporosis = T <= -2.5 (WHO) | 3 of 7 | 0.429 | 1 | 3 | 1 | 2 |" in md
    assert "`normal/normal_002.png`: reference gives no single truth" in md


@pytest.mark.parametrize(
    "row, message",
    [
        (
            ["normal/normal_000.png", "abc", "", "P0", "1", "female", "1"],
            r"row 2 \(normal/normal_000.png\): T-score 'abc'",
        ),
        (
            ["normal/normal_000.png", "-3.0", "normal", "P0", "1", "female", "1"],
            r"row 2 .*diagnosis normal but T-score -3 is osteoporosis",
        ),
        (["normal/normal_000.png", "", "", "P0", "1", "female", "1"], r"row 2 .*neither a T-score nor a diagnosis"),
        (["normal/missing.png", "-1", "", "P0", "1", "female", "1"], r"row 2: normal/missing.png not found"),
        (["../x.png", "-1", "", "P0", "1", "female", "1"], r"row 2: path '../x.png' outside"),
    ],
)
def test_a_bad_reference_row_is_a_one_line_error_naming_it(refdata, tmp_path, row, message):
    root, _, _ = refdata
    with pytest.raises(DataError, match=message):
        read_reference(write_csv(tmp_path / "r.csv", HEADER, [row]), root)


def test_missing_or_non_numeric_covariates_are_errors_naming_the_row(refdata, tmp_path, capsys):
    root, _, _ = refdata
    rows = [r[:] for r in ROWS]
    ref = read_reference(write_csv(tmp_path / "ok.csv", HEADER, rows), root)
    single = [f for f in ref.files.values() if f.covariates(["age", "sex", "weight_kg"]) is not None]
    x = covariate_matrix(single, ["age", "sex", "weight_kg"])
    assert x[0].tolist() == [51.0, 1.0, 70.0] and x[5].tolist() == [45.0, 0.0, 90.0]
    # the planted two-patient file has no single covariate value: an error, not a mean
    with pytest.raises(DataError, match="normal_002.png .*different age"):
        covariate_matrix(list(ref.files.values()), ["age"])
    for k, bad, message in [
        (6, "", r"row 8 \(osteoporosis/osteoporosis_001.png\): covariate weight_kg is missing"),
        (6, "heavy", r"row 8 .*covariate weight_kg 'heavy' is not a number"),
        (6, "nan", r"row 8 .*covariate weight_kg 'nan' is not a number"),
    ]:
        rows = [r[:] for r in ROWS]
        rows[k][6] = bad
        ref = read_reference(write_csv(tmp_path / "bad.csv", HEADER, rows), root)
        files = [f for f in ref.files.values() if f.single_truth]
        with pytest.raises(DataError, match=message):
            covariate_matrix(files, ["age", "sex", "weight_kg"])
    rows = [r[:] for r in ROWS]
    rows[0][5] = "x"
    ref = read_reference(write_csv(tmp_path / "sex.csv", HEADER, rows), root)
    with pytest.raises(DataError, match=r"row 2 .*sex 'x' is not female/male"):
        covariate_matrix([ref.files["normal/normal_000.png"]], ["sex"])
    with pytest.raises(DataError, match="no covariate column 'height'"):
        covariate_matrix([ref.files["normal/normal_000.png"]], ["height"])


def test_holdout_split_keeps_every_held_out_film_and_its_copies_out_of_training(refdata, tmp_path):
    root, ref_file, scan = refdata
    ref = read_reference(ref_file, root)
    docs = [make_split(scan, "holdout-reference", seed=s, reference=ref) for s in (0, 1)]
    single = sorted(f.path for f in ref.single)
    for doc in docs:
        assert doc["test"] == single  # every single-truth reference film, the same every seed
        assert held_out_leaks(doc, scan.records) == []
        training = set(doc["train"]) | set(doc["val"])
        assert not training & set(ref.files)
        # the exact and the near copy of held-out films, and the two-truth file, are nowhere
        excluded = {e["path"]: e["reason"] for e in doc["excluded"]}
        for p in ("normal/dup_000.png", "normal/near_000.png", "normal/normal_002.png"):
            assert p in excluded and p not in training and p not in doc["test"]
        assert "no single truth" in excluded["normal/normal_002.png"]
        assert doc["reference"]["definition"] == "osteoporosis"
        assert doc["reference"]["multi_truth"] == ["normal/normal_002.png"]
        # test labels are the T-score truth, not the folder
        truth = {p for p in doc["test"] if doc["labels"][p] == "osteoporosis"}
        assert truth == {"normal/normal_004.png", "osteoporosis/osteoporosis_000.png"}
        assert doc["folder_labels"]["normal/normal_004.png"] == "normal"
    assert docs[0]["train"] != docs[1]["train"] or docs[0]["val"] != docs[1]["val"]
    lbm = make_split(scan, "holdout-reference", seed=0, reference=ref, definition="low_bone_mass")
    assert {p for p in lbm["test"] if lbm["labels"][p] == "osteoporosis"} == {
        "normal/normal_001.png",
        "normal/normal_004.png",
        "osteoporosis/osteoporosis_000.png",
        "osteoporosis/osteoporosis_001.png",
        "osteoporosis/osteoporosis_003.png",
    }
    # the split file is what training reads: its test labels are the reference's
    path = tmp_path / "s.json"
    path.write_text(json.dumps(docs[0]))
    sets = load_split(path, root)
    assert (
        sets.label("normal/normal_004.png") == "osteoporosis"
        and sets.label("osteoporosis/osteoporosis_002.png") == "normal"
    )


def test_held_out_leaks_finds_a_planted_copy_in_training(refdata):
    root, ref_file, scan = refdata
    doc = make_split(scan, "holdout-reference", seed=0, reference=read_reference(ref_file, root))
    doc["train"] = doc["train"] + ["normal/near_000.png"]  # a near copy of held-out normal_001
    assert held_out_leaks(doc, scan.records) == [
        {"path": "normal/near_000.png", "part": "train", "test": "normal/normal_001.png"}
    ]


def test_holdout_protocol_needs_a_reference_and_reference_needs_the_protocol(refdata):
    root, ref_file, scan = refdata
    with pytest.raises(ConfigError, match="needs --reference"):
        make_split(scan, "holdout-reference")
    with pytest.raises(ConfigError, match="use it with --protocol holdout-reference"):
        make_split(scan, "paper", reference=read_reference(ref_file, root), test_size=6)
    with pytest.raises(ConfigError, match="unknown reference definition"):
        make_split(scan, "holdout-reference", reference=read_reference(ref_file, root), definition="osteopenia")


def test_kop_reference_agreement_is_41_and_77_of_93(kop, kop_scan):
    ref = read_reference(kop / "tscores.csv", kop)
    a = reference_check(kop_scan, ref)
    assert a["files_with_single_truth"] == 93 and len(a["multi_truth"]) == 4
    assert a["definitions"]["osteoporosis"]["agree"] == 41
    assert a["definitions"]["low_bone_mass"]["agree"] == 77
    doc = make_split(kop_scan, "holdout-reference", seed=0, reference=ref)
    assert held_out_leaks(doc, kop_scan.records) == []
    assert not (set(doc["train"]) | set(doc["val"])) & set(ref.files)
    assert len(doc["test"]) == 84  # 93 single-truth files, 84 distinct pictures


def test_reproduce_holdout_reference_scores_the_same_reference_films_every_seed(refdata, tmp_path, monkeypatch):
    """The protocol end to end through `reproduce` (the cheap model, one epoch): what CI runs."""
    import torch

    from kneeosteo.config import TrainConfig
    from kneeosteo.experiments.reproduce import reproduce

    root, ref_file, _ = refdata
    monkeypatch.setenv("KNEEOSTEO_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = TrainConfig.from_dict(dict(data=str(root), epochs=1, copies=1, batch_size=8, image_size=64))
        out = tmp_path / "repro"
        rows = reproduce(
            root,
            out,
            base,
            ["am-only"],
            seeds=[0, 1],
            protocol="holdout-reference",
            reference=ref_file,
            covariates=["age", "sex", "weight_kg"],
            console=lambda _: None,
        )
    finally:
        torch.set_num_threads(threads)
    assert rows[0]["seeds"] == 2
    ref = read_reference(ref_file, root)
    truth = {f.path: int(f.positive("osteoporosis")) for f in ref.single}
    for seed in (0, 1):
        split = json.loads((out / "splits" / f"seed{seed}.json").read_text())
        assert sorted(split["test"]) == sorted(truth) and split["protocol"] == "holdout-reference"
        with open(out / "cells" / "am-only" / f"seed{seed}" / "predictions.csv", newline="") as fh:
            scored = {r["path"]: int(r["label"]) for r in csv.DictReader(fh)}
        assert scored == truth  # scored against the reference's truth, not the folders
        # reproduce's cells carry the coverage against both truths (wiring only: this one-epoch
        # model's sets hold both classes, so the counts cannot tell the truths apart; the test
        # ..._against_the_folders_too_where_the_truth_differs below checks the counting)
        cell = RunDir(out / "cells" / "am-only" / f"seed{seed}")
        t = json.loads((cell.path / "metrics.json").read_text())["trust"]
        with open(cell.path / "predictions.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        mask = cell.trust.conformal.predict_mask(
            cell.trust.calibrated(logit(np.array([float(r["probability"]) for r in rows])))
        )
        folder = np.array([int(split["folder_labels"][r["path"]] == "osteoporosis") for r in rows])
        scored_y = np.array([int(r["label"]) for r in rows])
        assert (folder != scored_y).any()  # the two truths differ on these films
        got = t["conformal_coverage_folder_labels"]
        assert got["covered"] == int(mask[np.arange(len(rows)), folder].sum()) and got["n"] == len(rows) == 7
        assert t["conformal_coverage"] == pytest.approx(mask[np.arange(len(rows)), scored_y].mean())
    md = (out / "table1.md").read_text()
    assert "Held-out source" in md and "osteoporosis = T <= -2.5" in md
    clinical = json.loads((out / "clinical.json").read_text())
    assert clinical["n"] == 7 and [s["seed"] for s in clinical["models"]["am-only"]] == [0, 1]
    assert set(clinical["fixed"]) == {"clinical logistic", "OST index"}
    assert "| am-only | 2 |" in (out / "clinical.md").read_text()
    # the report page shows the baselines and, per seed, the incremental value with its interval
    from kneeosteo.reporting import write_report

    html = write_report(out, tmp_path / "grid.html").read_text()
    assert 'id="clinical"' in html and "covariates age, sex, weight_kg" in html
    for name, r in clinical["fixed"].items():
        a = r["auc"]
        assert f'<td>{name}</td><td class="n">{a["auc"]:.3f} [{a["ci_low"]:.3f}, {a["ci_high"]:.3f}]</td>' in html
    for s in clinical["models"]["am-only"]:
        d = s["fused_minus_clinical"]
        assert (
            f'am-only, seed {s["seed"]}</td><td class="n">{s["image_auc"]["auc"]:.3f}' in html
            and f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" in html
        ), s
    with pytest.raises(ConfigError, match="go together"):
        reproduce(root, tmp_path / "r2", base, ["am-only"], seeds=[0], protocol="holdout-reference")


def test_conformal_coverage_is_reported_against_the_folders_too_where_the_truth_differs(tmp_path):
    """Where the scored truth (T-scores) is not the one the sets were calibrated on (folders), the
    trust block gives the coverage against both, each counted from the same sets."""
    from types import SimpleNamespace

    from kneeosteo.evaluation.trust_metrics import trust_metrics
    from kneeosteo.trust import ConformalClassifier, TemperatureScaler, TrustBundle

    rng = np.random.default_rng(4)
    z = rng.normal(0, 3, 300)
    y = (rng.random(300) < 1 / (1 + np.exp(-z))).astype(int)
    cal = TemperatureScaler().fit(z, y)
    bundle = TrustBundle(
        cal, 0.5, "0.5", ConformalClassifier(0.8).fit(cal.transform(z), y), None, ("normal", "osteoporosis")
    )
    run = SimpleNamespace(trust=bundle, config=SimpleNamespace(classes=["normal", "osteoporosis"], threshold=0.5))
    zt = rng.normal(0, 3, 60)
    folder = (zt > 0).astype(int)  # the folders follow the model
    scored = np.where(rng.random(60) < 0.5, 1 - folder, folder)  # the other truth half disagrees
    prob = 1 / (1 + np.exp(-zt))
    mask = bundle.conformal.predict_mask(bundle.calibrated(zt))
    assert (mask.sum(axis=1) == 1).sum() > 30  # informative sets: the two coverages can differ
    block = trust_metrics(run, prob, scored, None, tmp_path, folder)
    got = block["conformal_coverage_folder_labels"]
    assert got["covered"] == int(mask[np.arange(60), folder].sum()) and got["n"] == 60
    assert block["conformal_coverage"] == pytest.approx(mask[np.arange(60), scored].mean())
    assert got["coverage"] > block["conformal_coverage"] + 0.2
    assert "conformal_coverage_folder_labels" not in trust_metrics(run, prob, scored, None, tmp_path)
