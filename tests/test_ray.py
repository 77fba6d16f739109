"""The Ray paths on a local instance (ray.init(num_cpus=2)): `reproduce --ray` gives the local
run's tables and cell files, never retrains a finished cell, and resumes a cell whose worker was
killed; `predict --ray` writes the local run's rows and reports the same bad files."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import imagegen
from conftest import require

require(importlib.util.find_spec("ray") is not None, "ray is not installed: pip install 'kneeosteo[ray]'", module=True)

from kneeosteo.config import TrainConfig  # noqa: E402
from kneeosteo.experiments.reproduce import reproduce  # noqa: E402

MODELS = ["fc-efficientnet_lite0", "am-only"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread_env():
    """One PyTorch thread here, as each Ray cell has (its one CPU): the local reference run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grids(ray_instance, one_thread_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    imagegen.make_dataset(root, n_per_class=10, size=48, seed=5)
    mp = pytest.MonkeyPatch()
    mp.setenv("KNEEOSTEO_CACHE", str(tmp_path_factory.mktemp("cache")))  # forwarded to the tasks
    mp.setenv("KNEEOSTEO_OFFLINE", "1")
    base = TrainConfig.from_dict(
        dict(data=str(root), epochs=1, copies=1, batch_size=8, image_size=64, precision="fp32")
    )
    local, on_ray = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    reproduce(root, local, base, MODELS, seeds=SEEDS, test_size=4, console=lambda _: None)
    logs: list[str] = []
    reproduce(root, on_ray, base, MODELS, seeds=SEEDS, test_size=4, console=logs.append, ray="local")
    yield root, base, local, on_ray, logs
    mp.undo()


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _cell_files(out: Path) -> dict[str, object]:
    """Each cell's predictions (bytes), weights (tensors) and epochs (history without its wall times)."""
    from safetensors.numpy import load_file

    found: dict[str, object] = {}
    for p in sorted(out.glob("cells/*/seed*/*")):
        key = str(p.relative_to(out))
        if p.name == "predictions.csv":
            found[key] = p.read_bytes()
        elif p.name == "model.safetensors":
            found[key] = {k: v.tobytes() for k, v in load_file(p).items()}
        elif p.name == "history.csv":
            found[key] = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(p, newline=""))]
    return found


def test_ray_grid_gives_the_local_tables_and_cell_files(grids):
    _, _, local, on_ray, logs = grids
    assert _table(on_ray / "table1.csv") == _table(local / "table1.csv")  # every column but the wall time
    files = _cell_files(local)
    assert len(files) == 3 * len(MODELS) * len(SEEDS)
    assert _cell_files(on_ray) == files  # the same weights, epochs and predictions, byte for byte
    for seed in SEEDS:  # every cell of a seed read the seed's one split
        assert (on_ray / "splits" / f"seed{seed}.json").read_bytes() == (
            local / "splits" / f"seed{seed}.json"
        ).read_bytes()
    finished = [line for line in logs if line.startswith("[")]
    assert len(finished) == len(MODELS) * len(SEEDS)  # one line per finished cell, with its wall time
    assert all(" s on " in line for line in finished)


def test_ray_rerun_submits_no_finished_cell(grids):
    root, base, _, on_ray, _ = grids
    stamps = {p: p.stat().st_mtime_ns for p in on_ray.glob("cells/*/seed*/*") if p.is_file()}
    logs: list[str] = []
    reproduce(root, on_ray, base, MODELS, seeds=SEEDS, test_size=4, console=logs.append, ray="local")
    assert sum("(done, reused)" in line for line in logs) == len(MODELS) * len(SEEDS)
    assert not [line for line in logs if line.startswith("submitted") or line.startswith("[")]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing in any cell was rewritten


def _descendants_named(title: str) -> list[int]:
    """Processes below this one whose command line (Ray's process title) contains ``title``."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if title not in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                continue
            pid = int(d.name)
            while pid > 1:  # walk up the parents to this test process
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    found.append(int(d.name))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_a_cell_whose_worker_dies_is_retried_and_resumes(grids, tmp_path):
    root, base, _, _, _ = grids
    out = tmp_path / "killed"
    logs: list[str] = []
    cfg = base.replace(epochs=8, patience=100)
    run = threading.Thread(
        target=reproduce,
        args=(root, out, cfg, ["am-only"]),
        kwargs=dict(seeds=[0], test_size=4, console=logs.append, ray="local"),
    )
    run.start()
    history = out / "cells" / "am-only" / "seed0" / "history.csv"
    state = out / "cells" / "am-only" / "seed0" / "checkpoint" / "state.json"
    end = time.monotonic() + 240
    # until epoch 1's resume state is saved (history.csv is written just before it: waiting for the
    # history alone let the kill land between the two, and the retry then rightly started afresh)
    while time.monotonic() < end and not (
        state.is_file() and history.is_file() and len(history.read_text().splitlines()) >= 2
    ):
        time.sleep(0.05)
    victims = _descendants_named("ray::cell am-only seed 0")
    assert victims, "no Ray worker running the cell was found"
    epochs_before = len(history.read_text().splitlines()) - 1
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    run.join(300)
    assert not run.is_alive()
    assert epochs_before < 8
    done = [line for line in logs if line.startswith("[1/1] am-only seed 0")]
    assert done and done[0].endswith(", resumed"), logs  # Ray ran the task again; it resumed, not restarted
    assert len(history.read_text().splitlines()) - 1 == 8
    assert (out / "cells" / "am-only" / "seed0" / "metrics.json").is_file() and (out / "table1.csv").is_file()


# ---------------------------------------------------------------------------------- predict --ray
@pytest.fixture(scope="module")
def predict_inputs(tiny, tmp_path_factory):
    """The tiny model's images, some in a sub-folder, some named by a manifest, plus bad files."""
    folder = tmp_path_factory.mktemp("inputs")
    imgs = sorted(Path(tiny.data).rglob("*.png"))
    assert len(imgs) >= 12
    (folder / "sub").mkdir()
    for i, src in enumerate(imgs[:12]):
        shutil.copy(src, (folder / "sub" if i % 3 == 0 else folder) / f"x{i:02d}.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "cut.png").write_bytes(imgs[0].read_bytes()[:200])
    manifest = folder.parent / f"{folder.name}-manifest.csv"
    listed = [str(p) for p in imgs[12:16]] + ["missing.png"]
    manifest.write_text("path\n" + "\n".join(listed) + "\n")
    return [folder, manifest]


def test_predict_ray_writes_the_local_rows_and_reports_the_same_bad_files(ray_instance, tiny, predict_inputs, tmp_path):
    from kneeosteo.inference import Predictor
    from kneeosteo.inference.output import write_predictions
    from kneeosteo.inference.ray_predict import predict_ray

    kwargs = dict(run=tiny.run, batch_size=4)
    predictor = Predictor(**kwargs)
    local = predictor.predict(predict_inputs, progress=False)
    write_predictions(local, tmp_path / "local.csv")
    rows, errors = predict_ray(predict_inputs, tmp_path / "ray.csv", predictor, kwargs, actors=1)
    assert rows == len(local.predictions) == 16
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    assert [(e.path, e.reason) for e in errors] == [(e.path, e.reason) for e in local.errors]
    assert {Path(e.path).name for e in errors} == {"empty.png", "text.png", "cut.png", "missing.png"}


def test_predict_ray_parquet_equals_the_local_parquet(ray_instance, tiny, predict_inputs, tmp_path):
    import pyarrow.parquet as pq

    from kneeosteo.inference import Predictor
    from kneeosteo.inference.output import write_predictions
    from kneeosteo.inference.ray_predict import predict_ray

    kwargs = dict(run=tiny.run, batch_size=4)
    predictor = Predictor(**kwargs)
    write_predictions(predictor.predict(predict_inputs, progress=False), tmp_path / "local.parquet")
    predict_ray(predict_inputs, tmp_path / "ray.parquet", predictor, kwargs, actors=2, cpus_per_actor=0.5)
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert a.num_rows == 16 and a.equals(b)
    assert (tmp_path / "ray.parquet").is_dir() and not list(tmp_path.glob(".*.tmp"))
