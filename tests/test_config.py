"""The training settings (kneeosteo/config.py): sections that match the TOML tables, the old flat
form still loading to the same config, errors naming ``section.name``, and the `train` command's
options generated from the one table (flag, help, parsing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kneeosteo.config import FLAT, SECTIONS, TrainConfig, load_config, read_settings
from kneeosteo.errors import ConfigError
from kneeosteo.interfaces.cli import app
from kneeosteo.run import RunDir

REPO = Path(__file__).resolve().parent.parent

# a value other than the default for every setting, a consistent config together
CHANGED = {
    "data": "some/data",
    "split": "s.json",
    "fold": 2,
    "positive": "low",
    "labels": "labels.csv",
    "merge": {"osteopenia": "normal"},
    "task": "multiclass",
    "target": "label",
    "aux_target": "t_score",
    "classes": ("normal", "low", "lower"),
    "preprocess": "bone",
    "clahe": True,
    "image_size": 384,
    "backbone": "densenet169",
    "backbone_weights": "none",
    "attention": False,
    "use_backbone": True,
    "finetune": True,
    "trainable_stages": 2,
    "augment": "online",
    "copies": 3,
    "zoom": (0.8, 1.1),
    "crop_fraction": (0.7, 0.9),
    "rotation": 10.0,
    "source_augment": True,
    "epochs": 12,
    "patience": 3,
    "batch_size": 16,
    "lr": 0.001,
    "weight_decay": 0.0,
    "backbone_lr_scale": 0.1,
    "label_smoothing": 0.1,
    "gce_q": 0.0,
    "aux_weight": 0.5,
    "reweight": "none",
    "out": "runs/x",
    "seed": 7,
    "device": "cpu",
    "precision": "fp32",
    "channels_last": False,
    "threshold": 0.4,
    "operating_point": "0.5",
    "coverage": 0.8,
    "domain_acceptance": 0.9,
}


def _toml(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + "}"
    return json.dumps(list(v) if isinstance(v, tuple) else v)


def test_the_table_covers_every_setting_once_and_every_section_is_a_table():
    assert set(CHANGED) == set(FLAT)  # a new setting gets a test value here
    assert {s.section for s in FLAT.values()} == set(SECTIONS)
    assert len({s.qualified for s in FLAT.values()}) == len(FLAT)
    assert all(s.help.strip() for s in FLAT.values())
    flags = [s.flag for s in FLAT.values() if s.flag]
    assert len(flags) == len(set(flags))


def test_sectioned_and_old_flat_files_load_to_the_same_config(tmp_path):
    default = {k: v for k, v in TrainConfig().to_dict().items() if k != "extra"}
    assert all(
        CHANGED[k] != v
        for k, v in default.items()
        if k not in ("target", "use_backbone", "gce_q", "reweight", "operating_point")
    ), "CHANGED changes every setting it can"
    flat = tmp_path / "flat.toml"
    flat.write_text("[train]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in CHANGED.items()))
    bare = tmp_path / "bare.toml"  # flat keys, no table (as config.json's settings)
    bare.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in CHANGED.items()))
    sectioned = tmp_path / "sectioned.toml"
    text = ""
    for section in SECTIONS:
        text += f"[{section}]\n" + "".join(
            f"{s.name} = {_toml(CHANGED[s.key])}\n" for s in FLAT.values() if s.section == section
        )
    sectioned.write_text(text)
    a, b, c = (load_config(p, {}) for p in (flat, bare, sectioned))
    assert a == b == c
    assert a != TrainConfig()
    assert a.to_dict() == {**CHANGED, "extra": {}}  # the flat form is config.json's, unchanged
    assert (a.model.backbone, a.augment.mode, a.data.path, a.runtime.seed) == ("densenet169", "online", "some/data", 7)
    assert read_settings(sectioned) == read_settings(flat) == CHANGED


def test_the_shipped_configs_load_and_are_sectioned():
    """Every file in configs/ is in the sectioned form (the old [train] form is read from generated
    files above and from the ship test's lever file); each loads, and names only what it sets."""
    files = [REPO / "configs" / "paper.toml", *sorted((REPO / "configs" / "levers").glob("*.toml"))]
    files.append(REPO / "configs" / "default_model.toml")
    forms = set()
    for f in files:
        named = read_settings(f)
        cfg = load_config(f, {})
        flat = tmp = cfg.to_dict()
        assert {k: tmp[k] for k in named} == named, f.name
        assert TrainConfig.from_dict(flat) == cfg
        forms.add("[train]" in f.read_text())
    assert forms == {False}


def test_the_bundled_run_and_old_settings_load_flat():
    settings = RunDir.bundled().config.settings
    cfg = TrainConfig.from_dict({k: v for k, v in settings.items() if k in FLAT})
    assert cfg.data.preprocess == settings["preprocess"] and cfg.model.backbone == settings["backbone"]
    assert cfg.replace(seed=3).runtime.seed == 3 and cfg.runtime.seed == settings["seed"]


@pytest.mark.parametrize(
    "values, words",
    [
        ({"backbone": "nope"}, "model.backbone = 'nope'"),
        ({"model": {"backbone": "nope"}}, "model.backbone = 'nope'"),
        ({"epochs": 0}, "optimiser.epochs = 0"),
        ({"augment": {"mode": "twice"}}, "augment.mode = 'twice'"),
        ({"model": {"epochs": 3}}, "unknown setting 'model.epochs'"),
        ({"learning_rate": 0.1}, "unknown setting 'learning_rate'"),
        ({"epochs": 3, "optimiser": {"epochs": 4}}, "optimiser.epochs is given twice"),
        ({"trust": {"coverage": 1.0}}, "trust.coverage = 1.0"),
    ],
)
def test_errors_name_the_setting_by_its_section(values, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("(", r"\(")):
        TrainConfig.from_dict(values)


# --------------------------------------------------------------------------- the command line

runner = CliRunner()


def _train_params():
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in command.params}


def test_train_options_are_the_table():
    params = _train_params()
    own = {"data", "config", "resume", "devices", "nodes", "master"}
    assert set(params) - own == {s.key for s in FLAT.values() if s.flag}
    for s in FLAT.values():
        if s.flag:
            opt = params[s.key]
            assert opt.help.startswith(s.help), s.key
            assert set(s.flag.split("/")) <= set(opt.opts + opt.secondary_opts), s.key
            assert opt.default is None  # not given: the file or the table's default applies
    assert "Default: 30." in params["epochs"].help and "Default: --attention." in params["attention"].help


def test_train_passes_each_option_to_the_config(tmp_path, monkeypatch):
    import kneeosteo.experiments.pipeline as pipeline

    seen = {}

    def fake(cfg, resume=False, console=print):
        seen["cfg"] = cfg
        return tmp_path / "run"

    monkeypatch.setattr(pipeline, "train_and_score", fake)
    data = tmp_path / "data"
    (data / "normal").mkdir(parents=True)
    settings = tmp_path / "s.toml"
    settings.write_text('[optimiser]\nepochs = 9\nlr = 0.01\n[model]\nbackbone = "densenet169"\n')
    argv = ["train", str(data), "--config", str(settings), "--out", str(tmp_path / "run"), "--epochs", "3"]
    argv += ["--zoom", "0.8,1.1", "--no-attention", "--merge", "osteopenia=normal", "--classes", "normal,low"]
    argv += ["--task", "multiclass", "--finetune", "--trainable-stages", "1", "--augment", "none", "--fold", "1"]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.optimiser.epochs == 3 and cfg.optimiser.lr == 0.01  # the command line beats the file
    assert cfg.model.backbone == "densenet169" and cfg.optimiser.patience == 6  # the file, the defaults
    assert cfg.augment.zoom == (0.8, 1.1) and cfg.model.attention is False and cfg.model.finetune
    assert cfg.data.merge == {"osteopenia": "normal"} and cfg.data.classes == ("normal", "low")
    assert (cfg.data.task, cfg.augment.mode, cfg.data.fold, cfg.model.trainable_stages) == ("multiclass", "none", 1, 1)
    assert cfg.data.path == str(data) and cfg.runtime.out == str(tmp_path / "run")

    res = runner.invoke(app, ["train", str(data), "--zoom", "0.8", "--out", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "LOW,HIGH" in res.output


def test_reproduce_shares_the_tables_options():
    import typer.main

    command = typer.main.get_command(app).commands["reproduce"]
    params = {p.name: p for p in command.params}
    for key in ("epochs", "patience", "labels", "merge"):
        assert params[key].help.startswith(FLAT[key].help), key
    assert "--quick: 8" in params["epochs"].help
