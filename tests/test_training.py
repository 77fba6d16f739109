"""Training end to end on tiny generated data: run folder contents, evaluation, determinism,
the frozen backbone and its feature cache, cache keys, resume after a crash, early stopping,
the ``summary`` command and config files.

Kept under ~90 s on two CPU cores: 16 images per class at 64x64, one augmented copy, three
epochs, and one trained reference run (module fixture) that most tests compare against.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import imagegen as g
from kneeosteo.config import TrainConfig, load_config
from kneeosteo.data.augment import AugmentParams
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.split import make_split, write_split
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.evaluation.evaluate import evaluate_run
from kneeosteo.experiments.pipeline import train_and_score
from kneeosteo.features.cache import TensorCache, backbone_cache_id, cache_key
from kneeosteo.features.prepare import prepare
from kneeosteo.interfaces.cli import app
from kneeosteo.models import build_model
from kneeosteo.run import RunDir
from kneeosteo.training import trainer
from kneeosteo.training.trainer import HISTORY_FIELDS, train

SIZE = 64
N_PER_CLASS = 16
TEST_SIZE = 8
EPOCHS = 3
METRIC_KEYS = ("sensitivity", "specificity", "precision", "fpr", "accuracy", "f1", "loss", "auc")
PNGS = ("accuracy.png", "loss.png", "confusion_matrix.png", "roc.png")


# --------------------------------------------------------------------------- helpers


def make_cfg(ws, out, **kw) -> TrainConfig:
    base = dict(
        data=str(ws.data),
        out=str(out),
        split=str(ws.split),
        image_size=SIZE,
        copies=1,
        epochs=EPOCHS,
        patience=100,
        batch_size=8,
        seed=0,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def quiet(*_args, **_kw) -> None:
    pass


def history(run: Path, with_seconds: bool = False) -> list[dict]:
    """history.csv rows; ``seconds`` is wall-clock time, the one column that may differ."""
    with open(run / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows if with_seconds else [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def predictions(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def weights_contents(run: Path) -> str:
    """What the run's weights file stores: ``full`` or ``without-frozen-backbone``."""
    from safetensors import safe_open

    with safe_open(str(RunDir(run).weights_file), framework="pt") as fh:
        return fh.metadata()["contents"]


def cache_files(root: Path) -> list[Path]:
    return sorted((root / "tensors").rglob("*.safetensors")) if (root / "tensors").exists() else []


def train_counting(cfg: TrainConfig, mp: pytest.MonkeyPatch, resume: bool = False) -> SimpleNamespace:
    """Train while recording the trainer's tensor caches (hits/misses) and the live model."""
    caches, models = [], []

    class CountingCache(TensorCache):
        def __init__(self, root):
            super().__init__(root)
            caches.append(self)

    real = trainer.run_epoch

    def spy(model, *args, **kw):
        models.append(model)
        return real(model, *args, **kw)

    mp.setattr(trainer, "TensorCache", CountingCache)
    mp.setattr(trainer, "run_epoch", spy)
    try:
        run = train_and_score(cfg, resume=resume, console=quiet)
    finally:
        mp.undo()
    return SimpleNamespace(
        run=run, hits=sum(c.hits for c in caches), misses=sum(c.misses for c in caches), model=models[-1]
    )


def full_forward_probs(run: Path, data: Path, paths: list[str], cache_root: Path) -> np.ndarray:
    """P(positive) from the reloaded model running its own backbone on the images (no cached features)."""
    model = RunDir(run).load_model()
    prep = RunDir(run).config.preprocess
    ps = prepare([(p, 0) for p in paths], data, prep, TensorCache(cache_root), label="check")
    with torch.no_grad():
        return torch.sigmoid(model(images=prep.normalise(ps.grey.float())).float()).double().numpy()


# --------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    """Generated data sets and a paper-protocol split.

    Module-scoped fixtures are set up before conftest's per-test KNEEOSTEO_CACHE, so they point
    the cache at their own folder (never the user's ~/.cache); tests get conftest's fresh one."""
    root = tmp_path_factory.mktemp("training")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(root / "cache"))
        data = g.make_dataset(root / "data", n_per_class=N_PER_CLASS, size=SIZE, seed=0).root
        other = g.make_dataset(root / "other", n_per_class=6, size=SIZE, seed=7).root
        doc = make_split(scan_dataset(data), "paper", seed=0, test_size=TEST_SIZE, val_fraction=0.25)
        write_split(doc, root / "split.json")
        yield SimpleNamespace(
            root=root, data=data, other=other, split=root / "split.json", doc=doc, cache=root / "cache"
        )


@pytest.fixture(scope="module")
def runs(ws):
    """Reference run A, then B = A again in the same (own) cache, both with counted cache use."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KNEEOSTEO_CACHE", str(ws.root / "cache_ab"))
        a = train_counting(make_cfg(ws, ws.root / "run_a"), pytest.MonkeyPatch())
        a.files = cache_files(ws.root / "cache_ab")
        b = train_counting(make_cfg(ws, ws.root / "run_b"), pytest.MonkeyPatch())
        b.files = cache_files(ws.root / "cache_ab")
    return SimpleNamespace(a=a, b=b)


# --------------------------------------------------------------------------- 1. train -> evaluate


def test_train_writes_a_complete_run_folder(ws, runs):
    run = runs.a.run
    doc = ws.doc
    config = RunDir(run).config
    cfg, rec = config.settings, config.record
    assert json.loads((run / "config.json").read_text())["settings"] == cfg
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["seed"] == 0
    assert config.backbone == "efficientnet_lite0"
    assert rec["split_sizes"] == {p: len(doc[p]) for p in ("train", "val", "test")}
    assert rec["split_sizes"]["test"] == TEST_SIZE
    assert rec["train_samples"] == 2 * len(doc["train"])  # original + 1 offline copy each
    wi = rec["backbone_weights"]
    assert wi["pretrained"] is True and len(wi["sha256"]) == 64
    assert rec["best_epoch"] >= 1 and rec["epochs_run"] == EPOCHS
    assert (run / "model.safetensors").stat().st_size > 0

    with open(run / "history.csv", newline="") as fh:
        assert next(csv.reader(fh)) == list(HISTORY_FIELDS)
    rows = history(run, with_seconds=True)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    for r in rows:
        for k in HISTORY_FIELDS:
            assert math.isfinite(float(r[k])), (k, r)

    metrics = json.loads((run / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert set(metrics[k]) >= {"value", "ci_low", "ci_high"}, k
    counts = metrics["counts"]
    assert sum(counts[k] for k in ("tp", "fp", "fn", "tn")) == TEST_SIZE

    preds = predictions(run / "predictions.csv")
    assert list(preds[0]) == ["path", "label", "probability", "prediction"]
    assert sorted(r["path"] for r in preds) == sorted(doc["test"])  # relative to DATA
    threshold = config.threshold
    assert threshold == cfg["threshold"]
    for r in preds:
        assert (ws.data / r["path"]).is_file()
        assert int(r["label"]) == int(r["path"].split("/")[0] == "osteoporosis")
        assert int(r["prediction"]) == int(float(r["probability"]) >= threshold)
    # the confusion counts are those of predictions.csv
    tp = sum(int(r["label"]) == 1 and int(r["prediction"]) == 1 for r in preds)
    tn = sum(int(r["label"]) == 0 and int(r["prediction"]) == 0 for r in preds)
    assert (counts["tp"], counts["tn"]) == (tp, tn)

    for name in PNGS:
        data = (run / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name


def test_evaluate_run_reproduces_the_test_metrics(ws, runs, tmp_path):
    run = runs.a.run
    saved_metrics = (run / "metrics.json").read_text()
    saved_preds = (run / "predictions.csv").read_text()
    # default target: the run's own split, written into the run folder (fresh per-test cache:
    # the backbone features are recomputed, not read back)
    m, where = evaluate_run(run)
    assert where == run
    assert m["accuracy"]["value"] == json.loads(saved_metrics)["accuracy"]["value"]
    assert (run / "predictions.csv").read_text() == saved_preds
    assert (run / "metrics.json").read_text() == saved_metrics

    out = tmp_path / "other_eval"
    m, where = evaluate_run(run, data=ws.other, out=out)
    assert where == out
    files = sorted(p.relative_to(ws.other).as_posix() for p in ws.other.rglob("*.png"))
    preds = predictions(out / "predictions.csv")
    assert sorted(r["path"] for r in preds) == files
    assert m["n"] == len(files) == sum(m["counts"].values())
    for name in ("metrics.json", "confusion_matrix.png", "roc.png"):
        assert (out / name).stat().st_size > 0


# --------------------------------------------------------------------------- 2. determinism


def test_same_seed_same_run_other_seed_other_run(ws, runs):
    a, b = runs.a.run, runs.b.run
    assert history(a) == history(b)
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()
    assert (a / "metrics.json").read_text() == (b / "metrics.json").read_text()

    c = train_and_score(make_cfg(ws, ws.root / "run_c", seed=1), console=quiet)
    pa = [float(r["probability"]) for r in predictions(a / "predictions.csv")]
    pc = [float(r["probability"]) for r in predictions(c / "predictions.csv")]
    assert pa != pc
    assert history(a) != history(c)


# --------------------------------------------------------------------------- 3. frozen backbone


def test_backbone_stays_frozen_and_features_come_from_the_cache(ws, runs, tmp_path):
    fresh, info = build_model("efficientnet_lite0")
    ref = fresh.backbone.state_dict()
    # the live model at the end of training (BatchNorm statistics included) ...
    live = runs.a.model.backbone.state_dict()
    # ... and the reloaded one
    model = RunDir(runs.a.run).load_model()
    assert weights_contents(runs.a.run) == "without-frozen-backbone"  # only AM + head were stored
    assert model.preprocess["input_size"] == SIZE  # the resolution it was trained at
    assert RunDir(runs.a.run).config.preprocess.size == SIZE
    assert RunDir(runs.a.run).config.record["backbone_weights"]["sha256"] == info.sha256
    assert model.backbone_weights.sha256 == info.sha256
    for state in (live, model.backbone.state_dict()):
        assert state.keys() == ref.keys()
        for k, v in ref.items():
            assert torch.equal(state[k].cpu(), v), k
    assert not any(p.requires_grad for p in runs.a.model.backbone.parameters())
    assert all(p.requires_grad for p in runs.a.model.head.parameters())

    # the cached features are the pretrained backbone's: same probabilities from a full forward
    preds = predictions(runs.a.run / "predictions.csv")
    full = full_forward_probs(runs.a.run, ws.data, [r["path"] for r in preds], tmp_path / "check")
    np.testing.assert_allclose([float(r["probability"]) for r in preds], full, atol=2e-5)

    # cache use: run A filled an empty cache (one entry per input tensor and per feature
    # tensor), the identical run B only read it
    d = ws.doc
    n_entries = 2 * (2 * len(d["train"]) + len(d["val"]) + len(d["test"]))
    assert runs.a.hits == 0 and runs.a.misses == n_entries == len(runs.a.files)
    assert runs.b.misses == 0 and runs.b.hits == n_entries
    assert runs.b.files == runs.a.files


def test_random_backbone_features_are_not_shared_across_seeds(ws, tmp_path):
    """With backbone_weights='none' the backbone is a seed-dependent random init, so a run with
    seed 1 must not reuse features that seed 0's (different) backbone wrote into the cache."""
    kw = dict(backbone_weights="none", augment="none", epochs=1)
    train_and_score(make_cfg(ws, tmp_path / "s0", **kw), console=quiet)
    run = train_and_score(make_cfg(ws, tmp_path / "s1", seed=1, **kw), console=quiet)
    preds = predictions(run / "predictions.csv")
    full = full_forward_probs(run, ws.data, [r["path"] for r in preds], tmp_path / "check")
    np.testing.assert_allclose([float(r["probability"]) for r in preds], full, atol=2e-5)


# --------------------------------------------------------------------------- 4. cache keys


class StubBackbone(nn.Module):
    """A cheap stand-in for a backbone: pooled (B, 3) features."""

    def forward(self, x):
        return x.float().mean(dim=(2, 3))


def test_cache_keys_name_everything_that_shapes_the_tensors(ws, tmp_path):
    items = [(p, int(p.startswith("osteoporosis"))) for p in ws.doc["test"][:4]]
    aug = AugmentParams(copies=1)
    base = dict(prep=Preprocess("paper", 32), augment=aug, seed=0, backbone_id="stub:a")

    def run(**change):
        kw = {**base, **change}
        cache = TensorCache(tmp_path / "c")
        ps = prepare(items, ws.data, kw.pop("prep"), cache, backbone=StubBackbone(), label="t", **kw)
        return ps, cache

    first, c = run()
    n = len(items)
    assert (c.hits, c.misses) == (0, 4 * n)  # per image: input, input-aug, and their features
    again, c = run()
    assert (c.hits, c.misses) == (4 * n, 0)
    assert torch.equal(first.grey, again.grey) and torch.equal(first.features, again.features)

    # a change in preprocessing misses everything; in augmentation only the augmented copy
    # (and its features), plus one look for the augmentation's 512-px working copy (kept only
    # when a scan decoded the image, features.prepare.precache); in the backbone only the features
    for change, misses in (
        (dict(prep=Preprocess("robust", 32)), 4 * n),
        (dict(prep=Preprocess("paper", 48)), 4 * n),
        (dict(prep=Preprocess("paper", 32, clahe=True)), 4 * n),
        (dict(augment=AugmentParams(copies=1, rotation=5.0)), 3 * n),
        (dict(augment=AugmentParams(copies=1, zoom=(1.0, 1.1))), 3 * n),
        (dict(seed=1), 3 * n),
        (dict(backbone_id="stub:b"), 2 * n),
    ):
        _, c = run(**change)
        assert c.misses == misses, change
    changed, _ = run(seed=1)
    assert not torch.equal(changed.grey, first.grey)

    k = dict(kind="features", input="x", backbone="efficientnet_lite0:abc")
    assert cache_key(**k) == cache_key(**dict(reversed(k.items())))
    assert cache_key(**k) != cache_key(**{**k, "backbone": "efficientnet_lite0:abd"})
    assert cache_key(**k) != cache_key(**{**k, "backbone": "densenet169:abc"})
    p = Preprocess("paper", 64)
    assert (
        len(
            {
                p.key(),
                Preprocess("robust", 64).key(),
                Preprocess("paper", 65).key(),
                Preprocess("paper", 64, mean=(0.5, 0.5, 0.5)).key(),
            }
        )
        == 4
    )
    assert AugmentParams(copies=2).key() != AugmentParams(copies=1).key()

    # the backbone id: the weights file's sha256 when there is one, else the module's own state
    torch.manual_seed(0)
    r0 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    torch.manual_seed(1)
    r1 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert backbone_cache_id("b", r0, "f" * 64) == "b:" + "f" * 64
    assert backbone_cache_id("b", r0, None) != backbone_cache_id("b", r1, None)
    assert backbone_cache_id("b", r0, None) == backbone_cache_id("b", r0.to(memory_format=torch.channels_last), None)


@pytest.mark.parametrize("where", ["tensor bytes", "header", "truncated"])
def test_damaged_cache_entry_is_detected_deleted_and_recomputed(ws, tmp_path, where):
    cache = TensorCache(tmp_path / "c")
    t = {"grey": torch.arange(4096, dtype=torch.float32).reshape(1, 64, 64)}
    cache.put("ab" * 32, t)
    path = cache._path("ab" * 32)
    assert torch.equal(cache.get("ab" * 32)["grey"], t["grey"])
    raw = bytearray(path.read_bytes())
    if where == "tensor bytes":
        raw[-100] ^= 0xFF
    elif where == "header":
        raw[12] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    cache.hits = cache.misses = 0
    assert cache.get("ab" * 32) is None
    assert not path.exists() and (cache.hits, cache.misses) == (0, 1)

    # through prepare: a damaged entry is recomputed to the same tensors and rewritten
    items = [(p, 0) for p in ws.doc["test"][:2]]
    prep = Preprocess("paper", 32)
    c1 = TensorCache(tmp_path / "p")
    first = prepare(items, ws.data, prep, c1, backbone=StubBackbone(), backbone_id="stub", label="t")
    files = sorted((tmp_path / "p").rglob("*.safetensors"))
    assert len(files) == 4
    for f in files:
        raw = bytearray(f.read_bytes())
        raw[-3] ^= 0x55
        f.write_bytes(bytes(raw))
    c2 = TensorCache(tmp_path / "p")
    again = prepare(items, ws.data, prep, c2, backbone=StubBackbone(), backbone_id="stub", label="t")
    assert c2.hits == 0 and c2.misses == 4
    assert torch.equal(first.grey, again.grey) and torch.equal(first.features, again.features)
    c3 = TensorCache(tmp_path / "p")
    prepare(items, ws.data, prep, c3, backbone=StubBackbone(), backbone_id="stub", label="t")
    assert (c3.hits, c3.misses) == (4, 0)


# --------------------------------------------------------------------------- 5. resume


def test_resume_continues_as_if_never_stopped(ws, runs, tmp_path):
    a = runs.a.run
    out = tmp_path / "resumed"
    train(make_cfg(ws, out, epochs=2), console=quiet)
    assert len(history(out)) == 2
    train_and_score(make_cfg(ws, out, epochs=EPOCHS), resume=True, console=quiet)
    assert history(out) == history(a)
    assert (out / "metrics.json").read_text() == (a / "metrics.json").read_text()
    assert (out / "predictions.csv").read_text() == (a / "predictions.csv").read_text()
    assert RunDir(out).config.record["best_epoch"] == RunDir(a).config.record["best_epoch"]


def test_resume_after_a_crash_through_the_cli(ws, runs, tmp_path, monkeypatch):
    a = runs.a.run
    out = tmp_path / "crashed"
    real = trainer.run_epoch
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # train of epoch 3 (train and val are separate calls)
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "run_epoch", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(ws, out), console=quiet)
    assert len(history(out)) == 2 and not (out / "metrics.json").exists()
    monkeypatch.setattr(trainer, "run_epoch", real)

    result = CliRunner().invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "resuming after epoch 2" in result.output
    assert history(out) == history(a)
    assert (out / "metrics.json").read_text() == (a / "metrics.json").read_text()
    assert (out / "predictions.csv").read_text() == (a / "predictions.csv").read_text()


REAL_RUN_EPOCH = trainer.run_epoch


def _scripted_val_losses(
    monkeypatch, losses: dict[int, float], snapshots: dict[int, dict], crash_in: int | None = None
):
    """run_epoch with the real training step, validation loss ``losses[epoch]`` (parsed from the
    epoch's description), the model's trainable state recorded after each epoch in ``snapshots``,
    and a crash in the training pass of epoch ``crash_in``."""
    real = REAL_RUN_EPOCH

    def scripted(model, batches, cfg, device, amp, optimizer=None, generator=None, desc="", **kw):
        epoch = int(desc.split()[1])
        if optimizer is not None:
            if epoch == crash_in:
                raise RuntimeError("simulated crash")
            return real(model, batches, cfg, device, amp, optimizer, generator, desc, **kw)
        _, acc, probs = real(model, batches, cfg, device, amp, desc=desc)
        snapshots[epoch] = {
            k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")
        }
        return losses[epoch], acc, probs

    monkeypatch.setattr(trainer, "run_epoch", scripted)


def test_resume_restores_the_early_stopping_state(ws, tmp_path, monkeypatch):
    """Patience 2; validation loss best at epoch 2, worse at 3 (crash during epoch 4), worse at 4:
    an uninterrupted run stops after epoch 4 with epoch 2's weights, and so must the resumed one.
    A resume that forgot best_val_loss would call epoch 4 an improvement, one that forgot the
    bad-epoch count would go on to epoch 5 (and its better loss), one that forgot best_epoch
    would record 0; each changes the history, the record or the saved weights."""
    losses = {1: 0.9, 2: 0.7, 3: 0.8, 4: 0.75, 5: 0.5, 6: 0.4, 7: 0.3, 8: 0.2}
    kw = dict(augment="none", epochs=8, patience=2)
    whole: dict[int, dict] = {}
    _scripted_val_losses(monkeypatch, losses, whole)
    ref = train(make_cfg(ws, tmp_path / "whole", **kw), console=quiet).run.path

    parts: dict[int, dict] = {}
    out = tmp_path / "resumed"
    _scripted_val_losses(monkeypatch, losses, parts, crash_in=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(ws, out, **kw), console=quiet)
    assert len(history(out)) == 3 and RunDir(out).config.record.get("best_epoch") is None
    _scripted_val_losses(monkeypatch, losses, parts)
    logs = []
    result = train(make_cfg(ws, out, **kw), resume=True, console=logs.append)
    assert "resuming after epoch 3" in logs

    rows = history(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # stopped by patience, as uninterrupted
    assert history(out) == history(ref)
    record, want = RunDir(out).config.record, RunDir(ref).config.record
    assert (record["best_epoch"], record["epochs_run"]) == (want["best_epoch"], want["epochs_run"]) == (2, 4)
    # the saved model is epoch 2's (trained before the crash), the same as the uninterrupted run's
    for model in (RunDir(out).load_model(), result.model):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in parts[2].items())
        assert all(torch.equal(state[k], v) for k, v in whole[2].items())
        assert not all(torch.equal(state[k], v) for k, v in parts[4].items())


def test_resume_keeps_the_fold_of_a_kfold_split(ws, tmp_path, monkeypatch):
    doc = make_split(scan_dataset(ws.data), "kfold", seed=0, folds=4, val_fraction=0.25)
    write_split(doc, tmp_path / "folds.json")
    assert doc["folds"][2]["test"] != doc["folds"][0]["test"]
    calls = {"n": 0}

    def stub(model, batches, cfg, device, amp, optimizer=None, generator=None, desc=""):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return 0.5, 0.5, np.full(len(batches.data), 0.5)

    monkeypatch.setattr(trainer, "run_epoch", stub)
    out = tmp_path / "fold2"
    cfg = make_cfg(ws, out, split=str(tmp_path / "folds.json"), fold=2, augment="none", epochs=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, console=quiet)
    train_and_score(cfg, resume=True, console=quiet)
    preds = predictions(out / "predictions.csv")
    assert sorted(r["path"] for r in preds) == sorted(doc["folds"][2]["test"])
    sizes = RunDir(out).config.record["split_sizes"]
    assert sizes == {p: len(doc["folds"][2][p]) for p in ("train", "val", "test")}


# --------------------------------------------------------------------------- 6. early stopping


def test_early_stopping_keeps_the_best_epoch(ws, tmp_path, monkeypatch):
    real = trainer.run_epoch
    val_losses = iter([0.9, 0.7, 0.8, 0.6, 0.5])  # rises at epoch 3: patience 1 stops there
    snapshots: list[dict] = []

    def scripted(model, batches, cfg, device, amp, optimizer=None, generator=None, desc=""):
        if optimizer is not None:
            return real(model, batches, cfg, device, amp, optimizer, generator, desc)
        _, acc, probs = real(model, batches, cfg, device, amp, desc=desc)
        snapshots.append(
            {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        )
        return next(val_losses), acc, probs

    monkeypatch.setattr(trainer, "run_epoch", scripted)
    result = train(make_cfg(ws, tmp_path / "es", augment="none", epochs=5, patience=1), console=quiet)
    out = result.run.path
    assert not result.run.metrics_file.exists()  # train does not score: train_and_score does
    rows = history(out)
    assert len(rows) == 3 and len(snapshots) == 3
    assert [(h["epoch"], h["val_loss"]) for h in result.history] == [
        (int(r["epoch"]), float(r["val_loss"])) for r in rows
    ]  # the history returned is history.csv's
    run = RunDir(out).config.record
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert run["best_epoch"] == int(best["epoch"]) == 2
    assert run["epochs_run"] == 3
    # the saved model is the best epoch's, not the last one's
    for model in (RunDir(out).load_model(), result.model):  # the reloaded and the returned model
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in snapshots[1].items())
        assert not all(torch.equal(state[k], v) for k, v in snapshots[2].items())


# --------------------------------------------------------------------------- 7. summary


def test_summary_lists_the_layers():
    result = CliRunner().invoke(app, ["summary", "--backbone", "efficientnet_lite0"])
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.output
    for word in ("HybridModel", "AttentionModule", "ClassifierHead", "Total params", "Trainable params"):
        assert word in out, word
    assert any(ch.isdigit() for ch in out.split("Total params", 1)[1][:40])


# --------------------------------------------------------------------------- 8. config files


def test_config_precedence_and_unknown_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 7\nlr = 0.01\nbackbone = "densenet169"\nzoom = [0.8, 1.1]\n')
    cfg = load_config(path, {"epochs": 3, "lr": None, "seed": 5})
    assert cfg.optimiser.epochs == 3  # the command line beats the file
    assert cfg.optimiser.lr == 0.01 and cfg.model.backbone == "densenet169"  # the file beats the defaults
    assert cfg.augment.zoom == (0.8, 1.1) and isinstance(cfg.augment.zoom, tuple)
    assert (
        cfg.runtime.seed == 5 and cfg.optimiser.batch_size == TrainConfig().optimiser.batch_size
    )  # defaults otherwise

    table = tmp_path / "table.toml"
    table.write_text("[train]\npatience = 2\n")
    assert load_config(table, {}).optimiser.patience == 2
    assert load_config(None, {}) == TrainConfig()

    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 2\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad, {})
    with pytest.raises(ConfigError, match="epoks"):
        load_config(None, {"epoks": 3})


# --------------------------------------------------------------------------- auxiliary target


def _aux_split(ws, tmp_path: Path) -> tuple[Path, dict[str, float]]:
    """The reference split with a T-score for every other training film (osteoporosis -3.2 + a
    little, normal -0.5 + a little), as a site's few measured films would give one."""
    doc = json.loads(ws.split.read_text())
    values = {
        p: round((-3.2 if p.startswith("osteoporosis/") else -0.5) + 0.1 * (k % 5), 2)
        for k, p in enumerate(doc["train"])
        if k % 2 == 0
    }
    doc["values"] = {p: {"t_score": v} for p, v in values.items()}
    out = tmp_path / "split_aux.json"
    out.write_text(json.dumps(doc))
    return out, values


def test_aux_target_shapes_the_shared_layers_and_nothing_else(ws, runs, tmp_path):
    """--aux-target t_score: with weight 0 the run is the plain run bit for bit (the auxiliary head
    is drawn after every other layer and its loss adds nothing), with weight 1 its gradient reaches
    the layers the two outputs share, so the predictions change; the run records the films that had
    a value and their standardisation, saves the auxiliary head and reloads it."""
    split, values = _aux_split(ws, tmp_path)
    zero = train_and_score(
        make_cfg(ws, tmp_path / "aux0", split=str(split), aux_target="t_score", aux_weight=0.0), console=quiet
    )
    one = train_and_score(make_cfg(ws, tmp_path / "aux1", split=str(split), aux_target="t_score"), console=quiet)
    plain = (runs.a.run / "predictions.csv").read_text()
    assert (zero / "predictions.csv").read_text() == plain
    assert (one / "predictions.csv").read_text() != plain
    rec = RunDir(one).config.record["aux_target"]
    known = np.array(list(values.values()))
    assert rec["films_with_value"] == len(values) and rec["weight"] == 1.0
    assert rec["mean"] == pytest.approx(known.mean(), abs=1e-4) and rec["sd"] == pytest.approx(known.std(), abs=1e-4)
    model = RunDir(one).load_model()
    assert model.head.config()["aux_outputs"] == 1
    rows = predictions(one / "predictions.csv")
    probs = full_forward_probs(one, ws.data, [r["path"] for r in rows], tmp_path / "c")
    np.testing.assert_allclose(probs, [float(r["probability"]) for r in rows], atol=1e-5)


def test_aux_loss_counts_only_films_with_a_value():
    pred = torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    z = torch.tensor([1.0, float("nan"), -1.0])
    loss = trainer.aux_loss_sum(pred, z)
    assert loss.item() == pytest.approx(0.25)  # (0.5 - 1)^2 + 0 + (-1 + 1)^2: the NaN row adds nothing
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([-1.0, 0.0, 0.0])  # and gets no gradient
    assert trainer.aux_loss_sum(pred, torch.full((3,), float("nan"))).item() == 0.0


def test_aux_target_settings_and_too_few_values_are_refused(ws, tmp_path):
    with pytest.raises(ConfigError, match="data.aux_target = 'age': choose one of none, t_score, bmd"):
        TrainConfig.from_dict(dict(aux_target="age"))
    with pytest.raises(ConfigError, match="aux_target = 't_score' is for a classification task"):
        TrainConfig.from_dict(dict(aux_target="t_score", target="bmd", labels="x.csv"))
    with pytest.raises(ConfigError, match="optimiser.aux_weight"):
        TrainConfig.from_dict(dict(aux_target="t_score", aux_weight=-1.0))
    with pytest.raises(DataError, match="0 training film\\(s\\) have a t_score value; at least 2"):
        train_and_score(make_cfg(ws, tmp_path / "none", aux_target="t_score"), console=quiet)


# --------------------------------------------------------------------------- fine-tuning lever


def test_partial_finetune_trains_only_the_last_stage_and_reloads(ws, tmp_path):
    """--finetune --trainable-stages 1 --backbone-lr-scale 0.1 --augment online --source-augment:
    the frozen stages keep their pretrained weights, the last stage learns, no BatchNorm statistic
    moves, the backbone's Adam group runs at lr x 0.1, and the saved run reloads to the same outputs."""
    cfg = make_cfg(
        ws,
        tmp_path / "ft",
        finetune=True,
        trainable_stages=1,
        backbone_lr_scale=0.1,
        augment="online",
        source_augment=True,
        epochs=2,
        precision="fp32",
    )
    seen = {}
    real = trainer.param_groups

    def spy(model, c):
        seen["groups"] = [(len(g["params"]), g.get("lr")) for g in real(model, c)]
        return real(model, c)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "param_groups", spy)
        run = train_and_score(cfg, console=quiet)
    pretrained, _ = build_model("efficientnet_lite0", attention=True)
    before = pretrained.backbone.state_dict()
    saved = RunDir(run).load_model().backbone.state_dict()
    last = ("blocks.6.", "conv_head.", "bn2.")
    for k, v in before.items():
        if "running_" in k or "num_batches" in k or not k.startswith(last):
            assert torch.equal(saved[k], v), k  # frozen weights and every BN statistic unchanged
    assert any(
        not torch.equal(saved[k], v)
        for k, v in before.items()
        if k.startswith(last) and "running_" not in k and "num_batches" not in k
    )
    assert seen["groups"][1][1] == pytest.approx(cfg.optimiser.lr * 0.1) and seen["groups"][0][1] is None
    assert weights_contents(run) == "full"
    assert json.loads((run / "config.json").read_text())["identity"]["model"]["trainable_stages"] == 1
    rows = predictions(run / "predictions.csv")
    names = [r["path"] for r in rows]
    probs = full_forward_probs(run, ws.data, names, tmp_path / "c")
    np.testing.assert_allclose(probs, [float(r["probability"]) for r in rows], atol=1e-5)


def test_finetune_settings_are_checked():
    with pytest.raises(ConfigError, match="trainable_stages = 2 needs model.finetune"):
        TrainConfig.from_dict(dict(trainable_stages=2))
    with pytest.raises(ConfigError, match="source_augment = true needs augment.mode = online"):
        TrainConfig.from_dict(dict(source_augment=True))
    with pytest.raises(ConfigError, match="trainable_stages = 9: efficientnet_lite0 offers 1-8"):
        build_model("efficientnet_lite0", weights="none", finetune=True, trainable_stages=9)
    with pytest.raises(ConfigError, match="vgg19 offers none"):
        build_model("vgg19", weights="none", finetune=True, trainable_stages=1)


def test_runs_and_metrics_record_their_compute_path(ws, runs, monkeypatch):
    """Results are identical on the same path only, so each run says which path it took."""
    from kneeosteo.utils.compute_path import bf16_native, cells_paths, compute_path, path_label

    run = RunDir(runs.a.run)
    env = run.config.record["environment"]
    here = compute_path()
    assert env["cpu_capability"] == here["cpu_capability"] and env["cpu_flags"] == here["cpu_flags"]
    m = json.loads(run.metrics_file.read_text())
    assert m["computed_with"]["training"]["precision"] == str(run.config.record["autocast"])
    assert m["computed_with"]["scoring"]["cpu_capability"] == here["cpu_capability"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the forced AVX2 path never claims native bf16
    assert bf16_native() is False and compute_path()["onednn_max_cpu_isa"] == "AVX2"
    assert path_label("torch.bfloat16", "AVX512") == "bf16 on AVX512" and path_label("fp32", "AVX2") == "fp32 on AVX2"
    recs = [{"autocast": "fp32", "environment": {"cpu_capability": "AVX2"}}] * 2 + [
        {"autocast": "torch.bfloat16", "environment": {"cpu_capability": "AVX512"}}
    ]
    assert cells_paths(recs) == {"fp32 on AVX2": 2, "bf16 on AVX512": 1}
