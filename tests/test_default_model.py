"""The default model's settings (issue 13): the two config files, the metadata reweighting
against the source shortcut, and `reproduce` with a model given as a settings file."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import imagegen as g
from kneeosteo.config import TrainConfig, load_config
from kneeosteo.data.reader import ImageMeta
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.shortcut import metadata_weights
from kneeosteo.data.split import make_split, write_split
from kneeosteo.features.prepare import PreparedSet
from kneeosteo.interfaces.cli import app
from kneeosteo.run import RunDir
from kneeosteo.training.trainer import Batches, run_epoch

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "paper.toml"
DEFAULT = REPO / "configs" / "default_model.toml"


def test_paper_config_is_the_paper_protocol_and_make_run_uses_it():
    """`make run` keeps the paper's protocol: the hybrid, 224-px stretch, 5 offline copies."""
    cfg = load_config(PAPER, {})
    assert (cfg.model.attention, cfg.model.use_backbone, cfg.model.finetune) == (True, True, False)
    assert (cfg.data.preprocess, cfg.data.image_size, cfg.augment.mode, cfg.augment.copies) == (
        "paper",
        224,
        "offline",
        5,
    )
    assert cfg.optimiser.reweight == "none" and cfg.model.backbone == "efficientnet_lite0"
    assert "--config configs/paper.toml" in (REPO / "Makefile").read_text()
    # what paper.toml does not set is the dataclass default, and those are the paper's too
    assert asdict(cfg) == asdict(TrainConfig.from_dict(cfg.to_dict()))


def test_default_config_describes_the_bundled_model_and_the_readme_gives_its_command():
    """configs/default_model.toml is what the bundled model was trained with (every setting the file
    names), and the docs (Commands, `train`) give the command that trains it on another split."""
    from kneeosteo.config import read_settings
    from kneeosteo.run import RunDir

    named = read_settings(DEFAULT)
    bundled = RunDir.bundled().config.settings
    cfg = load_config(DEFAULT, {})
    assert named  # the file names the settings, it does not lean on defaults
    for key in named:
        got = bundled[key]
        assert (tuple(got) if isinstance(got, list) else got) == cfg.to_dict()[key], key
    assert bundled.get("reweight", "none") == cfg.optimiser.reweight  # newer than the bundled run: its default applies
    docs = (REPO / "docs" / "cli.md").read_text()
    assert "kneeosteo train DATA --config configs/default_model.toml --split S --out RUN" in docs


def _meta(fmt: str) -> ImageMeta:
    return ImageMeta(path="x", format=fmt, mode="L", width=100, height=100, bit_depth=8, file_size=1000, channels=1)


def test_metadata_weights_upweight_the_images_the_metadata_gets_wrong():
    # the format gives the label away for 36 of 40 images; 4 break the rule
    y = np.array([i % 2 for i in range(40)])
    rebels = {0, 1, 2, 3}
    metas = [_meta(("JPEG" if t else "PNG") if i not in rebels else ("PNG" if t else "JPEG")) for i, t in enumerate(y)]
    w = metadata_weights(metas, y, seed=0)
    assert w.shape == (40,) and w.mean() == pytest.approx(1.0)
    assert w[list(rebels)].min() > 3 * np.median(w)  # the images against the shortcut count most
    assert w.max() / w.min() <= 10 + 1e-9  # clipped at 10 (before the scaling to mean 1)
    assert np.array_equal(metadata_weights(metas[:6], y[:6]), np.ones(6))  # too few to fit: no weighting


def test_loss_weights_reach_the_training_loss():
    """Weights 2 everywhere must double the training loss; weights 0 on one class must leave only
    the other class's loss (a weight computed but never passed to the loss fails both)."""
    torch.manual_seed(0)
    n = 8
    data = PreparedSet(
        torch.rand(n, 1, 8, 8, dtype=torch.float16),
        torch.tensor([0.0, 1.0] * 4),
        [f"{i}.png" for i in range(n)],
        [0] * n,
        torch.randn(n, 4),
    )
    model = torch.nn.Sequential()

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, images=None, features=None):
            return self.lin(features).squeeze(-1)

    model = Linear()
    cfg = TrainConfig.from_dict(dict(batch_size=n, channels_last=False))
    from kneeosteo.data.preprocess import Preprocess

    prep = Preprocess("paper", 8)

    def loss_with(weights):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the same model every call
        b = Batches(data, prep, weights=weights)
        return run_epoch(model, b, cfg, "cpu", None, opt, torch.Generator().manual_seed(0))[0]

    plain = loss_with(None)
    assert loss_with(torch.full((n,), 2.0)) == pytest.approx(2 * plain, rel=1e-6)
    with torch.no_grad():
        logits = model(features=data.features)
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.targets, reduction="none")
    only_pos = loss_with(data.targets.clone())
    assert only_pos == pytest.approx(float((per * data.targets).mean()), rel=1e-6)
    # the trainer trains with the configured robust loss (GCE here), not plain cross-entropy
    cfg.optimiser.gce_q = 0.7
    p_target = torch.where(data.targets == 1, torch.sigmoid(logits), 1 - torch.sigmoid(logits))
    assert loss_with(None) == pytest.approx(float(((1 - p_target**0.7) / 0.7).mean()), rel=1e-5)
    # ... while its validation pass (no optimizer) scores the task's own loss on the labels as given
    assert run_epoch(model, Batches(data, prep), cfg, "cpu", None, None, torch.Generator())[0] == pytest.approx(
        plain, rel=1e-6
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("default-model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(root / "cache"))
        data = g.make_dataset(root / "data", n_per_class=8, size=48, seed=5).root
        write_split(
            make_split(scan_dataset(data), "paper", seed=0, test_size=4, val_fraction=0.25), root / "split.json"
        )
    return root, data


def test_the_readme_command_trains_the_default_model(small, tmp_path):
    """`kneeosteo train DATA --config configs/default_model.toml --split S --out RUN`, verbatim but
    for two epochs at 96 px: the run is the default model's architecture, probed."""
    root, data = small
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(data),
            "--config",
            str(DEFAULT),
            "--split",
            str(root / "split.json"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--image-size",
            "96",
        ],
    )
    assert res.exit_code == 0, res.output
    rd = RunDir.open(out)
    want = load_config(DEFAULT, {})
    for key in ("attention", "augment", "copies", "reweight", "preprocess"):
        assert rd.config.settings[key] == want.to_dict()[key], key
    assert (rd.config.preprocess.preset, rd.config.preprocess.size) == (want.data.preprocess, 96)
    m = json.loads(rd.metrics_file.read_text())
    assert "shortcut_probes" in m and "shortcut-adversarial accuracy" in res.output


def test_reproduce_trains_a_settings_file_as_a_model(small, tmp_path):
    from kneeosteo.experiments.reproduce import reproduce

    root, data = small
    lever = tmp_path / "fc-robust64.toml"
    lever.write_text(
        '[train]\nattention = false\npreprocess = "robust"\nimage_size = 64\naugment = "none"\n'
        'epochs = 1\nreweight = "metadata"\n'
    )
    rows = reproduce(
        data,
        tmp_path / "grid",
        TrainConfig.from_dict(dict(data=str(data), epochs=1, image_size=64, copies=1)),
        ["fc-efficientnet_lite0", str(lever)],
        seeds=[0],
        test_size=4,
        console=lambda *a: None,
    )
    assert [r["model"] for r in rows] == ["fc-efficientnet_lite0", "fc-robust64"]
    cell = RunDir.open(tmp_path / "grid" / "cells" / "fc-robust64" / "seed0")
    s = cell.config.settings
    assert (s["attention"], s["preprocess"], s["reweight"], s["augment"]) == (False, "robust", "metadata", "none")
    w = cell.config.record["reweight"]  # the weights were fitted and used: their range is recorded
    assert 0 < w["min"] <= 1 <= w["max"] <= 10
    assert s["seed"] == 0 and Path(s["split"]).name == "seed0.json"  # the grid's split, not the file's
