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
from kneeosteo.tasks import Binary, Multiclass, Regression, task_for, task_named


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
