"""The clinical baseline (issue 31): OST, the cross-fitted clinical logistic and the fused model,
their incremental value against an independent DeLong, and the covariates' one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kneeosteo.data.reference import read_reference
from kneeosteo.errors import DataError
from kneeosteo.evaluation.clinical import (
    clinical_comparison,
    clinical_set,
    cross_fitted_logistic,
    fit_logistic,
    ost_index,
    patient_folds,
)
from kneeosteo.interfaces.cli import main


def brute_delong(y, a, b):
    """DeLong's paired AUC difference and its standard error by the O(m n) definition (DeLong
    et al. 1988, eq. for the structural components), independent of the package's midranks."""
    y = np.asarray(y)
    out = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = out
    m, n = len(v10a), len(v01a)
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return auc_a - auc_b, np.sqrt(var)


def write_reference(path: Path, films: list[tuple[str, float, str, int, str, float]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "t_score", "source_id", "age", "sex", "weight_kg"])
        for p, t, pid, age, sex, weight in films:
            w.writerow([p, t, pid, age, sex, weight])
    return path


def synthetic(n: int = 60, seed: int = 0):
    """Films whose osteoporosis tracks age (strongly) and the image (weakly)."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(40, 85, n)
    t = -0.09 * (age - 40) + rng.normal(0, 0.8, n)
    weight = rng.uniform(50, 90, n)
    films = [
        (
            f"f/{i:03d}.png",
            round(float(t[i]), 2),
            f"P{i}",
            int(age[i]),
            "female" if i % 3 else "male",
            round(float(weight[i]), 1),
        )
        for i in range(n)
    ]
    image = 1 / (1 + np.exp(-(-(t + 2.5) + rng.normal(0, 1.5, n))))
    return films, image


def test_ost_index_is_the_published_formula():
    assert ost_index([70, 50], [55, 80]).tolist() == pytest.approx([0.2 * (55 - 70), 0.2 * (80 - 50)])


def test_incremental_value_matches_an_independent_delong(tmp_path):
    films, image = synthetic()
    ref = read_reference(write_reference(tmp_path / "r.csv", films))
    cs = clinical_set(ref, [f[0] for f in films], "osteoporosis", ["age", "sex", "weight_kg"])
    assert len(cs.paths) == 60 and cs.ost is not None
    c = clinical_comparison(cs, {"image": (image, 0.5)}, folds=5, seed=0)
    rows = {r["model"]: r for r in c["rows"]}
    # the clinical and fused probabilities are out-of-fold: refit them by hand, fold by fold
    fold = patient_folds(cs.y, cs.groups, 5, 0)
    clinical = np.empty(60)
    for f in range(5):
        test = fold == f
        clinical[test] = fit_logistic(cs.x[~test], cs.y[~test]).predict_proba(cs.x[test])[:, 1]
    assert rows["clinical logistic"]["auc"]["auc"] == pytest.approx(roc_auc_score(cs.y, clinical))
    assert rows["OST index"]["auc"]["auc"] == pytest.approx(roc_auc_score(cs.y, -cs.ost))
    assert rows["image"]["auc"]["auc"] == pytest.approx(roc_auc_score(cs.y, image))
    z = np.log(image / (1 - image))[:, None]
    fused = cross_fitted_logistic(np.hstack([z, cs.x]), cs.y, fold)
    d = next(d for d in c["incremental"] if d["a"].startswith("fused") and d["b"] == "clinical logistic")
    diff, se = brute_delong(cs.y, fused, clinical)
    assert d["diff"] == pytest.approx(diff) and d["se"] == pytest.approx(se)
    assert d["ci_low"] == pytest.approx(diff - 1.959963984540054 * se) and d["ci_high"] == pytest.approx(
        diff + 1.959963984540054 * se
    )
    d = next(d for d in c["incremental"] if d["a"] == "image" and d["b"] == "OST index")
    diff, se = brute_delong(cs.y, image, -cs.ost)
    assert d["diff"] == pytest.approx(diff) and d["se"] == pytest.approx(se)
    # sensitivity/specificity at the rule each row states
    t = rows["image"]["counts"]
    y, called = cs.y.astype(bool), image >= 0.5
    assert t == {
        "tp": int(np.sum(y & called)),
        "fp": int(np.sum(~y & called)),
        "fn": int(np.sum(y & ~called)),
        "tn": int(np.sum(~y & ~called)),
    }
    assert (
        rows["clinical logistic"]["decision_curve"]["net_benefit"]
        and "calibration" in rows["fused (image + covariates)"]
    )
    assert "calibration" not in rows["OST index"]  # a score, not a probability


def test_cross_fitting_keeps_a_patient_in_one_fold(tmp_path):
    films, _ = synthetic(40)
    films = [(p, t, "PX" if i in (3, 17, 29) else pid, a, s, w) for i, (p, t, pid, a, s, w) in enumerate(films)]
    ref = read_reference(write_reference(tmp_path / "r.csv", films))
    cs = clinical_set(ref, [f[0] for f in films], "osteoporosis", ["age"])
    fold = patient_folds(cs.y, cs.groups, 5, 0)
    assert len({fold[3], fold[17], fold[29]}) == 1
    assert len(set(cs.groups.tolist())) == 38


def test_a_film_of_two_patients_is_left_out_not_averaged(tmp_path):
    films, _ = synthetic(30)
    path = write_reference(tmp_path / "r.csv", films)
    with open(path, "a", newline="") as fh:  # the first film again, under another patient
        csv.writer(fh).writerow([films[0][0], films[0][1], "Q9", 99, "male", 120])
    ref = read_reference(path)
    cs = clinical_set(ref, [f[0] for f in films], "osteoporosis", ["age", "sex", "weight_kg"])
    assert films[0][0] not in cs.paths and len(cs.paths) == 29
    assert "two patients" in cs.left_out[0]["reason"]


@pytest.fixture(scope="module")
def scored_tiny(tiny, tmp_path_factory):
    """The tiny run copied, and a reference manifest over its 20 films (T-scores by folder, ages
    tracking them)."""
    base = tmp_path_factory.mktemp("clin")
    run = base / "run"
    shutil.copytree(tiny.run, run)
    films = sorted(p.relative_to(tiny.data).as_posix() for p in tiny.data.rglob("*.png"))
    rng = np.random.default_rng(1)
    rows = []
    for i, p in enumerate(films):
        osteo = p.startswith("osteoporosis/")
        t = (-3.0 if osteo else -0.4) + float(rng.normal(0, 0.3))
        rows.append(
            (
                p,
                round(t, 2),
                f"P{i}",
                int(75 + rng.integers(-8, 8) if osteo else 55 + rng.integers(-8, 8)),
                "female",
                60.0 + i,
            )
        )
    return run, write_reference(base / "ref.csv", rows), rows


def test_evaluate_with_covariates_writes_the_clinical_comparison_and_the_report_shows_it(
    scored_tiny, tiny, tmp_path, capsys
):
    from kneeosteo.reporting import write_report

    run, ref, _ = scored_tiny
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                str(run),
                str(tiny.data),
                "--out",
                str(run),
                "--no-probes",
                "--reference",
                str(ref),
                "--covariates",
                "age,sex,weight_kg",
            ]
        )
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "clinical comparison on 20 films (10 positive)" in out and "OST index: AUC" in out
    m = json.loads((run / "metrics.json").read_text())
    models = [r["model"] for r in m["clinical"]["rows"]]
    assert models[1:] == ["clinical logistic", "OST index", f"fused ({models[0]} + covariates)"]
    assert models[0].startswith("image (")
    assert m["clinical"]["definition"] == "osteoporosis" and m["clinical"]["n"] == 20
    html = write_report(run, tmp_path / "report.html", data=tiny.data, correct=0).read_text()
    assert "Against the clinical baseline" in html and "clinical logistic" in html and "incremental value" in html


@pytest.mark.parametrize(
    "cell, value, message",
    [
        ("age", "", "row 3 \\(.*\\): covariate age is missing"),
        ("weight_kg", "heavy", "row 3 \\(.*\\): covariate weight_kg 'heavy' is not a number"),
    ],
)
def test_a_missing_or_non_numeric_covariate_is_a_one_line_error(
    scored_tiny, tiny, tmp_path, capsys, cell, value, message
):
    import re

    run, _, rows = scored_tiny
    col = {"age": 3, "weight_kg": 5}[cell]
    bad = [list(r) for r in rows]
    bad[1][col] = value
    ref = write_reference(tmp_path / "bad.csv", [tuple(r) for r in bad])
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                str(run),
                str(tiny.data),
                "--out",
                str(tmp_path / "e"),
                "--no-probes",
                "--reference",
                str(ref),
                "--covariates",
                "age,sex,weight_kg",
            ]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    with pytest.raises(DataError, match=message):
        cs_ref = read_reference(ref)
        clinical_set(cs_ref, [r[0] for r in rows], "osteoporosis", ["age", "sex", "weight_kg"])


def test_compare_prints_the_clinical_rows_beside_the_two_runs(scored_tiny, tiny, tmp_path, capsys):
    """`compare A B --reference --covariates`: each run's row is its own AUC against the reference
    truth (checked with sklearn), each gets its fused row, and the baselines sit beside them."""
    run, ref, rows = scored_tiny
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run, a)
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(a), str(tiny.data), "--out", str(a), "--no-probes"])
    assert exc.value.code in (0, None)
    shutil.copytree(a, b)
    with open(b / "predictions.csv", newline="") as fh:
        pred = list(csv.DictReader(fh))
    rng = np.random.default_rng(3)
    for r in pred:  # run B: other probabilities, same films and labels
        r["probability"] = f"{rng.uniform():.6f}"
    with open(b / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(pred[0]))
        w.writeheader()
        w.writerows(pred)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "compare",
                str(a),
                str(b),
                "--reference",
                str(ref),
                "--covariates",
                "age,sex,weight_kg",
                "--out",
                str(tmp_path / "c.json"),
            ]
        )
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    c = json.loads((tmp_path / "c.json").read_text())["clinical"]
    truth = {r[0]: int(r[1] <= -2.5) for r in rows}
    got = {r["model"]: r for r in c["rows"]}
    for folder, key in ((a, "A"), (b, "B")):
        with open(folder / "predictions.csv", newline="") as fh:
            probs = {r["path"]: float(r["probability"]) for r in csv.DictReader(fh)}
        name = next(m for m in got if m.startswith(f"{key} ("))
        paths = sorted(probs)
        want = roc_auc_score([truth[p] for p in paths], [probs[p] for p in paths])
        assert got[name]["auc"]["auc"] == pytest.approx(want), key
        assert f"fused ({name} + covariates)" in got and f"  {name}: AUC {want:.3f}" in out
    assert "clinical logistic: AUC" in out and "OST index: AUC" in out and c["n"] == 20
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(a), str(b), "--reference", str(ref)])
    assert exc.value.code == 2


def test_stored_fused_model_is_the_logistic_fit_and_predict_answers_from_the_covariates(
    scored_tiny, tiny, tmp_path, capsys
):
    """`evaluate --store-fused` writes plain coefficients that reproduce an independent sklearn fit;
    `predict --covariates` gives the fused answer where every covariate is there, and marks the
    rest image-only (a missing cell, a missing row, a non-number), naming each; never a filled-in value."""
    from scipy.special import logit as _logit
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from kneeosteo.models.fused import load_fused
    from kneeosteo.run import RunDir

    run, ref, rows = scored_tiny
    fr = tmp_path / "fr"
    shutil.copytree(run, fr)
    (fr / "fused.json").unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                str(fr),
                str(tiny.data),
                "--out",
                str(tmp_path / "e"),
                "--no-probes",
                "--reference",
                str(ref),
                "--covariates",
                "age,sex,weight_kg",
                "--store-fused",
            ]
        )
    assert exc.value.code in (0, None)
    assert "stored the fused model (fitted on these 20 films)" in capsys.readouterr().out
    fused = load_fused(fr, RunDir(fr).config.weights_sha256, RunDir(fr).config.record["fused"]["sha256"])
    derived = RunDir(fr).derive(tmp_path / "derived", {})  # a derived run copies neither the file nor its record
    assert "fused" not in derived.config.record and load_fused(derived.path, "x", None) is None
    assert fused.covariates == ("age", "sex", "weight_kg") and fused.fitted_on["films"] == 20
    with open(tmp_path / "e" / "predictions.csv", newline="") as fh:
        raw = {r["path"]: float(r["probability"]) for r in csv.DictReader(fh)}
    cov = {r[0]: [float(r[3]), 1.0 if r[4] == "female" else 0.0, float(r[5])] for r in rows}
    truth = {r[0]: int(r[1] <= -2.5) for r in rows}
    paths = sorted(raw)
    x = np.array([[float(_logit(np.clip(raw[p], 1e-6, 1 - 1e-6))), *cov[p]] for p in paths])
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(max_iter=1000).fit(scaler.transform(x), [truth[p] for p in paths])
    want = lr.predict_proba(scaler.transform(x))[:, 1]
    got = [fused.probability(raw[p], cov[p]) for p in paths]
    np.testing.assert_allclose(got, want, atol=1e-9)

    films = [tiny.data / p for p in paths[:4]]
    covs = tmp_path / "covs.csv"
    with open(covs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "age", "sex", "weight_kg"])
        w.writerow([films[0], 70, "female", 60])  # row 2: complete
        w.writerow([films[1], "", "female", 60])  # row 3: age missing
        w.writerow([films[3], 70, "female", "heavy"])  # row 4: not a number; films[2] has no row
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "predict",
                *map(str, films),
                "--run",
                str(fr),
                "--engine",
                "torch",
                "--covariates",
                str(covs),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
    assert exc.value.code in (0, None)
    err = capsys.readouterr().err
    with open(tmp_path / "p.csv", newline="") as fh:
        out = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    first = out[films[0].name]
    assert first["answer_basis"] == "image_and_covariates"
    assert float(first["fused_probability"]) == pytest.approx(
        fused.probability(float(first["raw_probability"]), [70, 1.0, 60]), abs=1e-6
    )
    for f in films[1:]:
        assert out[f.name]["answer_basis"] == "image_only" and out[f.name]["fused_probability"] == "", f
    assert "row 3 (" in err and "age missing: answered image-only" in err
    assert f"{films[2]}: no row in {covs}" in err
    assert "row 4: covariate weight_kg 'heavy' is not a number: answered image-only" in err
    # without covariates: every answer image-only, said once
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(films[0]), "--run", str(fr), "--engine", "torch", "--out", str(tmp_path / "q.csv")])
    assert "without them every answer is image-only" in capsys.readouterr().err
    with open(tmp_path / "q.csv", newline="") as fh:
        assert [r["answer_basis"] for r in csv.DictReader(fh)] == ["image_only"]
    # the API: the covariates form field (a JSON object)
    from fastapi.testclient import TestClient

    from kneeosteo.interfaces.web import WebSettings, create_app

    with TestClient(create_app(WebSettings(run=fr, workers=1, queue=2))) as client:
        model_text = client.get("/api/model").text
        assert json.loads(model_text)["fused"]["covariates"] == ["age", "sex", "weight_kg"]
        assert str(ref) not in model_text and str(tmp_path) not in model_text  # no paths to a stranger (issue 28)

        def ask(covariates):
            data = {} if covariates is None else {"covariates": covariates}
            return client.post(
                "/api/predict", files={"file": (films[0].name, films[0].read_bytes(), "image/png")}, data=data
            )

        full = ask(json.dumps({"age": 70, "sex": "female", "weight_kg": 60})).json()
        assert full["answer_basis"] == "image_and_covariates" and full["missing_covariates"] == []
        assert full["fused_probability"] == pytest.approx(fused.probability(full["raw_probability"], [70, 1.0, 60]))
        part = ask(json.dumps({"age": 70})).json()
        assert (part["answer_basis"], part["fused_probability"], part["missing_covariates"]) == (
            "image_only",
            None,
            ["sex", "weight_kg"],
        )
        assert ask(None).json()["answer_basis"] == "image_only"
        bad = ask(json.dumps({"age": "old"}))
        assert bad.status_code == 422 and bad.json()["detail"] == "covariates: covariate age 'old' is not a number"
        assert ask(json.dumps({"height": 1.6})).status_code == 422 and ask("[70]").status_code == 422
        # the page: a field per covariate (built from /api/model), sent with the film to /api/explain
        page = client.get("/").text
        assert 'id="covariates"' in page and 'form.append("covariates", JSON.stringify(covariates))' in page
        shown = client.post(
            "/api/explain",
            files={"file": (films[0].name, films[0].read_bytes(), "image/png")},
            data={"covariates": json.dumps({"age": 70, "sex": "female", "weight_kg": 60})},
        ).json()
        assert shown["answer_basis"] == "image_and_covariates"
        assert shown["fused_probability"] == pytest.approx(full["fused_probability"])
    # a run without a fused model refuses covariates; a fused model of other weights is refused
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(films[0]), "--run", str(run), "--engine", "torch", "--covariates", str(covs)])
    assert exc.value.code == 2
    from kneeosteo.errors import CheckpointError
    from kneeosteo.utils.hashing import sha256_file

    doc = json.loads((fr / "fused.json").read_text())
    (fr / "fused.json").write_text(json.dumps({**doc, "intercept": doc["intercept"] + 1}))  # an edited coefficient
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(films[0]), "--run", str(fr), "--engine", "torch", "--covariates", str(covs)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and "fused.json: sha256 differs" in err
    (fr / "fused.json").write_text(json.dumps({**doc, "weights_sha256": "0" * 64}))  # recorded, but other weights
    with pytest.raises(CheckpointError, match="fitted for weights 000000000000"):
        load_fused(fr, RunDir(fr).config.weights_sha256, sha256_file(fr / "fused.json"))
    planted = tmp_path / "planted"  # a fused.json config.json's record does not know
    planted.mkdir()
    shutil.copy(fr / "fused.json", planted / "fused.json")
    with pytest.raises(CheckpointError, match="not recorded in config.json"):
        load_fused(planted, "x", None)
