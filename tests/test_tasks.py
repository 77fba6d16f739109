"""The task objects (kneeosteo/tasks): one name read in one place, each class's behaviour, and
older configs (a regression stored as task binary + a number target) reading as the same task."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kneeosteo.config import TrainConfig
from kneeosteo.errors import ConfigError
from kneeosteo.run import RunDir
from kneeosteo.tasks import Binary, Multiclass, Regression, Task, task_for, task_named


def test_a_number_target_makes_the_config_a_regression_whatever_task_says():
    for stored in ("binary", "multiclass", "regression"):  # older runs stored task binary with target t_score
        cfg = TrainConfig.from_dict(dict(task=stored, target="t_score", labels="labels.csv"))
        assert cfg.data.task == "regression" and task_for(cfg.data) == Regression("t_score")
    assert (
        task_for(TrainConfig().data) == Binary()
        and task_for(TrainConfig.from_dict(dict(task="multiclass")).data) == Multiclass()
    )
    assert task_for(TrainConfig.from_dict(dict(target="bmd", labels="l.csv")).data) != Regression("t_score")


def test_unknown_or_incomplete_tasks_are_config_errors():
    with pytest.raises(ConfigError, match="needs a number target"):
        TrainConfig.from_dict(dict(task="regression"))
    with pytest.raises(ConfigError, match="task"):
        TrainConfig.from_dict(dict(task="ordinal"))
    with pytest.raises(ConfigError, match="unknown task 'ordinal'"):
        task_named("ordinal")
    with pytest.raises(ConfigError, match="binary task only"):
        TrainConfig.from_dict(dict(task="multiclass", operating_point="youden"))


def test_each_task_answers_for_its_classes():
    classes = ("normal", "osteopenia", "osteoporosis")
    b, m, r = Binary(), Multiclass(), Regression("t_score")
    assert [t.outputs(3) for t in (b, m, r)] == [1, 3, 1]
    assert b.run_classes(("osteoporosis", "normal"), "osteoporosis") == ("normal", "osteoporosis")
    assert m.run_classes(classes, "") == classes and r.run_classes(classes, "") == ()
    assert (b.merge_positive("osteoporosis"), m.merge_positive("osteoporosis")) == ("osteoporosis", None)
    assert (b.require_binary, m.require_binary, r.require_binary) == (True, False, False)
    assert (b.expected_classes(classes), m.expected_classes(classes)) == (None, list(classes))
    with pytest.raises(ConfigError, match="3 classes"):
        b.check_split_classes(classes)
    with pytest.raises(ConfigError, match="one class"):
        m.check_split_classes(("normal",))
    m.check_split_classes(classes)
    assert b.head_scaling(np.zeros(4)) is None  # the paper's one-logit head is kept as built
    assert m.head_scaling(np.zeros(4)) == (0.0, 1.0)
    assert r.head_scaling(np.array([-3.0, -1.0])) == (-2.0, 1.0)
    assert r.head_scaling(np.array([-2.0, -2.0])) == (-2.0, 1.0)  # no spread: unit scale, not 0


def test_answers_and_hits():
    import torch

    z = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    assert torch.allclose(Binary().answer_of(z[:, 1]), torch.sigmoid(z[:, 1]))
    assert torch.allclose(Multiclass().answer_of(z), torch.softmax(z, dim=-1))
    assert torch.equal(Regression("bmd").answer_of(z[:, 0]), z[:, 0])
    assert Binary().correct(np.array([0.7, 0.2]), np.array([1.0, 1.0])).tolist() == [True, False]
    assert Multiclass().correct(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1.0, 1.0])).tolist() == [True, False]
    assert Regression("t_score").correct(np.array([-2.0, 0.0]), np.array([-2.4, -1.0])).tolist() == [True, False]


def test_the_bundled_run_is_binary_and_its_model_config_keeps_the_papers_format():
    run = RunDir.bundled()
    assert task_for(run.config) == Binary()
    model = run.load_model("cpu")
    assert model.task == Binary() and "task" not in model.model_config()


def test_building_a_task_does_not_import_torch():
    code = "import sys; from kneeosteo.tasks import task_named; task_named('binary'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_task_models_config_names_it_except_the_papers_binary_model():
    from kneeosteo.models.hybrid import build_model_from_config

    assert [t.model_entry() for t in (Binary(), Multiclass(), Regression("bmd"))] == [
        {},
        {"task": "multiclass"},
        {"task": "regression"},
    ]
    config = RunDir.bundled().config.model
    for task in (Multiclass(), Regression("t_score")):
        rebuilt = build_model_from_config({**config, **task.model_entry()})  # the name round-trips through the config
        assert type(rebuilt.task) is type(task) and rebuilt.model_config()["task"] == task.name


def test_each_tasks_predictions_csv_columns_and_formatting():
    paths = ["a.png", "b.png"]
    header, rows = Binary().prediction_table(paths, np.array([1, 0]), np.array([0.5, 0.25]), threshold=0.5)
    assert header == ("path", "label", "probability", "prediction")  # the paper's file, unchanged
    assert rows == [("a.png", 1, "0.500000", 1), ("b.png", 0, "0.250000", 0)]
    header, rows = Multiclass().prediction_table(
        paths, np.array([2, 0]), np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]), ("normal", "osteopenia", "osteoporosis")
    )
    assert header == ("path", "label", "prediction", "p_normal", "p_osteopenia", "p_osteoporosis")
    assert rows[0] == ("a.png", "osteoporosis", "osteoporosis", "0.100000", "0.200000", "0.700000")
    assert rows[1][1:3] == ("normal", "normal")
    truth, values = np.array([-2.5, 0.125]), np.array([-2.0, 0.0])
    header, rows = Regression("t_score").prediction_table(paths, truth, values, interval=(values - 1, values + 1))
    assert header == ("path", "t_score", "prediction", "interval_low", "interval_high")
    assert rows[0] == ("a.png", "-2.5000", "-2.0000", "-3.0000", "-1.0000")
    assert Regression("bmd").prediction_table(paths, truth, values)[1][1][3:] == ("nan", "nan")  # no interval fitted


# ------------------------------------------------------------------ what each task owns (issue 29)
ALL_TASKS = (Binary(), Multiclass(), Regression("t_score"))


def test_each_tasks_metrics_are_evaluations_numbers_for_its_answers():
    from sklearn.metrics import roc_auc_score

    from kneeosteo.evaluation.metrics import metrics_with_ci
    from kneeosteo.evaluation.multiclass import multiclass_metrics_with_ci
    from kneeosteo.evaluation.regression import regression_metrics_with_ci
    from kneeosteo.evaluation.task_scoring import task_metrics

    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.3, 0.6, 0.9])
    m = task_metrics(Binary(), y, p, threshold=0.5)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p))  # the binary metrics include the AUC
    assert m["sensitivity"]["value"] == pytest.approx(3 / 4) and m["specificity"]["value"] == pytest.approx(3 / 4)
    assert m == metrics_with_ci(y, p, threshold=0.5)
    at = task_metrics(Binary(), y, p, threshold=0.75)  # the threshold reaches the counts
    assert (at["sensitivity"]["value"], at["specificity"]["value"]) == pytest.approx((2 / 4, 1.0))
    classes = ("normal", "osteopenia", "osteoporosis")
    yk = np.array([0, 1, 2, 0, 1, 2])
    q = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.2, 0.6, 0.2], [0.5, 0.1, 0.4]])
    mk = task_metrics(Multiclass(), yk, q, classes)
    assert set(mk["per_class"]) == set(classes) and mk == multiclass_metrics_with_ci(yk, q, list(classes))
    t, v = np.array([-2.6, -1.2, 0.3, -3.0, -0.5]), np.array([-2.0, -1.5, 0.0, -2.8, -0.9])
    for target in ("t_score", "bmd"):
        mr = task_metrics(Regression(target), t, v)
        assert mr["mae"]["value"] == pytest.approx(np.abs(v - t).mean())
        assert mr == regression_metrics_with_ci(t, v, target=target)  # the task's target picks the WHO bands
    assert "who_classification" in task_metrics(Regression("t_score"), t, v)
    assert "who_classification" not in task_metrics(Regression("bmd"), t, v)


def test_each_tasks_prediction_fields_and_rows():
    classes = ("normal", "osteopenia", "osteoporosis")
    assert Binary().prediction_fields(classes) == ("path", "label", "probability", "prediction")
    fields = Multiclass().prediction_fields(classes)
    assert fields[:3] == ("path", "label", "prediction") and fields[3:] == tuple(f"p_{c}" for c in classes)
    assert Regression("bmd").prediction_fields() == ("path", "bmd", "prediction", "interval_low", "interval_high")
    assert Binary().format_row("a.png", 1, 0.4999996, threshold=0.5) == ("a.png", 1, "0.500000", 0)  # called on p
    assert Multiclass().format_row("a.png", 1, np.array([0.2, 0.3, 0.5]), classes)[1:3] == (
        "osteopenia",
        "osteoporosis",
    )
    assert Regression("t_score").format_row("a.png", -2.5, -2.25, low=-3.0, high=-1.5) == (
        "a.png",
        "-2.5000",
        "-2.2500",
        "-3.0000",
        "-1.5000",
    )
    for task in ALL_TASKS:  # every row is as wide as the header
        answers = np.full((2, 3), 1 / 3) if task.scoring == "classes" else np.array([0.2, 0.7])
        header, rows = task.prediction_table(["a", "b"], np.array([0, 1]), answers, classes)
        assert all(len(r) == len(header) for r in rows)


def test_each_task_declares_what_its_runs_offer():
    b, m, r = ALL_TASKS
    flags = (
        "has_threshold",
        "paper_metrics",
        "supports_shortcut_probes",
        "supports_clinical_baselines",
        "supports_report",
        "supports_onnx_export",
        "supports_dicom_sr",
        "supports_shift_alarm",
    )
    assert all(getattr(b, f) is True for f in flags)  # the paper's binary model: everything
    for task in (m, r):  # no threshold, no P(positive): none of the binary model's features yet
        assert not any(getattr(task, f) for f in flags), task
    assert (b.scoring, m.scoring, r.scoring) == ("probability", "classes", "value")
    assert (b.conformal_output, m.conformal_output, r.conformal_output) == ("sets", "sets", "intervals")
    assert all(Task.__dict__[f].__class__ is bool for f in flags)  # the base says no: a new task opts in


def test_every_tasks_scoring_has_its_entries_in_the_tables():
    from kneeosteo.choices import TASK_NAMES
    from kneeosteo.evaluation.compare import PAIRED_TESTS
    from kneeosteo.evaluation.task_scoring import SCORING
    from kneeosteo.inference.predictor import _VERDICTS

    tasks = [task_named(n, "t_score" if n == "regression" else "label") for n in TASK_NAMES]
    for task in tasks:
        entry = SCORING[task.scoring]
        assert task.scoring in PAIRED_TESTS and entry.metrics is not None
        if not task.paper_metrics:  # scored, printed and answered by task_scoring, not evaluate.score
            assert None not in (entry.answers, entry.score, entry.table)
        if not task.has_operating_point:  # predict's answers of a task run
            assert task.scoring in _VERDICTS


def test_each_tasks_comparison_and_explained_output():
    mc = {"pvalue": 0.25, "b": 3, "c": 1}
    lines = Binary().comparison_lines(
        {"accuracy_a": 0.75, "accuracy_b": 0.5, "mcnemar": mc, "delong": {"auc_a": 0.8, "auc_b": 0.6, "pvalue": 0.04}}
    )
    assert lines == [
        "accuracy 0.750 vs 0.500: exact McNemar p = 0.25 (b 3, c 1)",
        "AUC 0.800 vs 0.600: DeLong p = 0.04",
    ]
    c = {
        "accuracy_a": 0.5,
        "accuracy_b": 0.5,
        "mcnemar_correct": mc,
        "stuart_maxwell": {"statistic": 1.0, "df": 2, "p_value": 0.6},
        "per_class": {"normal": {"pvalue": 1.0}, "osteoporosis": {"pvalue": 0.5}},
    }
    lines = Multiclass().comparison_lines(c)
    assert len(lines) == 4 and lines[-1] == "  osteoporosis: one-vs-rest McNemar p = 0.5"
    c = {"mae_a": 0.5, "mae_b": 0.75, "wilcoxon_abs_errors": {"p_value": 0.125}}
    assert Regression("t_score").comparison_lines(c) == [
        "MAE 0.500 vs 0.750: Wilcoxon signed-rank on absolute errors p = 0.125"
    ]
    assert Multiclass().explained_output([0.2, 0.5, 0.3]) == 1 and Multiclass().explained_output([]) == 0
    assert Regression("t_score").explained_output([]) == 0


def test_the_shift_alarm_asks_the_task():
    from kneeosteo.inference.batch import shift_for

    shift = shift_for(None, [0.1, 0.2], [0.3, 0.4], Multiclass())
    assert shift.verdict == "unavailable" and shift.note == "the alarm covers binary runs; this is a multiclass run"
    assert "no trust files" in shift_for(None, [0.1], [0.3], Binary()).note  # binary: on to the trust files
