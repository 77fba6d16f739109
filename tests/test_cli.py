"""Tests for the `kneeosteo` command line: help, exit codes (0 ok, 2 usage, 1 data error as one
line), and the audit/split commands end to end on a small generated data set."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import imagegen as g
from kneeosteo.data import audit as audit_mod
from kneeosteo.data.shortcut import metadata_only_accuracy
from kneeosteo.interfaces.cli import app, main
from kneeosteo.paths import KAGGLE_HELP

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("audit", "split", "train", "evaluate", "summary", "reproduce", "predict", "explain", "export")
runner = CliRunner()


@pytest.fixture
def fast_shortcut(monkeypatch):
    monkeypatch.setattr(audit_mod, "metadata_only_accuracy", functools.partial(metadata_only_accuracy, repeats=1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "data"
    return g.make_dataset(root, n_per_class=12, exact_duplicates=1, conflict_duplicates=1, near_duplicates=1)


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


# --------------------------------------------------------------------------- help and usage


def test_module_entry_point_help():
    res = subprocess.run(
        [sys.executable, "-m", "kneeosteo", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    for cmd in COMMANDS:
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.stdout and cmd in res.stdout


def test_main_exits_0_on_success():
    assert _main(["split", "--help"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--no-such-option"],
        ["split", "--protocol", "nonsense"],
        ["no-such-command"],
        ["split", "--seed", "abc"],
    ],
)
def test_bad_usage_exits_2(argv, capsys):
    assert runner.invoke(app, argv).exit_code == 2
    assert _main(argv) == 2


def test_bad_protocol_message_names_the_option(tmp_path):
    res = runner.invoke(app, ["split", str(tmp_path), "--protocol", "nonsense"])
    assert res.exit_code == 2
    assert "--protocol" in res.output and "paper" in res.output


@pytest.mark.parametrize(
    "argv, words",
    [
        (["summary", "--backbone", "nope"], "unknown backbone 'nope'"),
        (["train", "{data}", "--epochs", "0"], "epochs = 0"),
        (["train", "{data}", "--precision", "fp8"], "'fp8' is not one of"),  # click's own check
        (["train", "{data}", "--config", "{data}/c.toml"], "precision = 'fp8'"),  # TrainConfig's
    ],
)
def test_bad_setting_is_a_config_error_exit_2_one_line(argv, words, tmp_path, capsys):
    """A ConfigError (a setting out of range or an unknown choice) is bad usage: exit 2, one line."""
    (tmp_path / "c.toml").write_text('precision = "fp8"\n')
    assert (
        _main(
            [a.format(data=tmp_path) for a in argv] + (["--out", str(tmp_path / "run")] if argv[0] == "train" else [])
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- data errors


def test_missing_data_folder_is_one_line_naming_it(capsys):
    assert _main(["audit", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: /nonexistent: data folder not found"]


def test_long_path_with_brackets_stays_one_intact_line(tmp_path, capsys):
    """Neither console wrapping nor Rich markup may mangle the path in the message."""
    bad = str(tmp_path / ("deep/" * 25) / "knee [left] [/b].png")
    assert _main(["audit", bad]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {bad}: data folder not found"]


def test_no_data_anywhere_prints_the_kaggle_help(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./data/kop, no ../shared/datasets/kop
    monkeypatch.delenv("KNEEOSTEO_DATA", raising=False)
    assert _main(["audit"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {KAGGLE_HELP}"
    assert _main(["split", "--out", str(tmp_path / "s.json")]) == 1
    assert "kaggle.com" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_kneeosteo_data_env_is_used(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KNEEOSTEO_DATA", str(dataset.root))
    assert _main(["split", "--out", "s.json", "--test-size", "6"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["data"] == str(dataset.root)


def test_data_set_error_exits_1_naming_the_folder(tmp_path, capsys):
    root = tmp_path / "one-class"
    g.png_grey8(root / "normal" / "a.png")
    assert _main(["split", str(root), "--out", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(root) in err[0] and "osteoporosis" in err[0]


# --------------------------------------------------------------------------- audit and split


def test_audit_command_writes_reports_and_prints_summary(dataset, tmp_path, fast_shortcut):
    out = tmp_path / "audit"
    res = runner.invoke(app, ["audit", str(dataset.root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "audit.json").is_file() and (out / "audit.md").is_file()
    a = json.loads((out / "audit.json").read_text())
    assert a["files_read"] == 12 * 2 + 3
    assert a["exact_duplicates"]["groups"] == 2 and a["exact_duplicates"]["label_conflicts"] == 1
    assert "LABEL CONFLICT" in (out / "audit.md").read_text()
    stdout = res.stdout
    assert "files read: 27 (normal 14, osteoporosis 13); distinct images: 25" in stdout
    assert "exact duplicate groups: 2 (4 files), label conflicts: 1" in stdout
    assert "metadata-only accuracy:" in stdout
    assert f"wrote {out / 'audit.json'} and {out / 'audit.md'}" in stdout


def test_split_command_writes_the_documented_json(dataset, tmp_path):
    out = tmp_path / "split.json"
    res = runner.invoke(app, ["split", str(dataset.root), "--out", str(out), "--test-size", "6", "--seed", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    for key in ("format", "data", "seed", "protocol", "train", "val", "test", "excluded"):
        assert key in doc, key
    assert doc["format"] == "kneeosteo-split/1" and doc["protocol"] == "paper" and doc["seed"] == 1
    assert doc["data"] == str(dataset.root)
    assert len(doc["test"]) == 6
    # 27 files - 1 exact copy - 2 conflicting copies = 24 kept
    assert len(doc["train"]) + len(doc["val"]) + len(doc["test"]) == 24
    assert {e["path"] for e in doc["excluded"]} >= {"osteoporosis/conflict_000.png"}
    assert f"train {len(doc['train'])}, val {len(doc['val'])}, test 6" in res.stdout
    assert (
        "excluded 3 files (duplicates, label conflicts); classes normal, osteoporosis; kept together by: exact duplicates"
        in res.stdout
    )
    assert res.stdout.rstrip().endswith(f"wrote {out}")


def test_split_command_kfold(dataset, tmp_path):
    out = tmp_path / "k.json"
    res = runner.invoke(app, ["split", str(dataset.root), "--out", str(out), "--protocol", "kfold", "--folds", "3"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "kfold" and len(doc["folds"]) == 3
    assert sorted(p for f in doc["folds"] for p in f["test"]) == sorted(doc["content_ids"])
    for k in range(3):
        assert f"fold {k}: train " in res.stdout
