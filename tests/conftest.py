"""Shared fixtures: an isolated cache for the session and for each test, the KOP data set and the
bundled model when present, one tiny trained run per session, and `require`, the one way a test
skips for a missing dependency (a failure under CI=true, where .ci/run installs everything)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
KOP_DIR = (REPO / ".." / "shared" / "datasets" / "kop").resolve()
# CI (.ci/run) installs chromium, playwright, the Lite packages, Orthanc and dciodvfy, and has KOP and the bundled model:
# there a missing one is a broken install step, not a reason to skip.
CI = os.environ.get("CI", "").strip().lower() == "true"
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under pytest-xdist


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers) each worker computes on one thread, and so
    do the processes its tests start (OMP_NUM_THREADS is inherited): two workers of two threads each
    on a 2-core machine would oversubscribe it, and spinning OpenMP threads make that slower than
    one worker."""
    if WORKER:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# `make test` hands whole groups of tests to its two xdist workers: a module's tests stay on one
# worker (its module-scoped fixtures are built once), and modules that share an expensive session
# fixture no other module uses share a group. Groups go out longest first, so the last group to
# start is a short one: the order of the groups' wall seconds on one worker (2026-11-30), only an
# order, never an assertion.
SHARED_GROUPS = {"test_browser": "hospital", "test_own_data": "hospital"}
LONGEST_FIRST = (
    "test_ray",
    "test_benchmarks",
    "hospital",
    "test_training",
    "test_faults",
    "test_distributed",
    "test_inference",
    "test_pacs",
    "test_web_hostile",
    "test_reproduce",
    "test_trust_wiring",
    "test_models",
    "test_data_pipeline",
    "test_bad_inputs",
    "test_default_model",
    "test_integrity",
    "test_structure",
    "test_allocator",
    "test_cli",
    "test_web",
    "test_hostile_inputs",
)


def _group(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return SHARED_GROUPS.get(module, module)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist (plain `pytest`, -p no:xdist) it is never called
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler with our groups as scopes, in collection order (xdist's own
    `--dist loadgroup` marks do not reach the scheduler under pytest 9.2, whose node ids ignore
    the suffix xdist 3.8 appends)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    config.option.loadscopereorder = False  # keep LONGEST_FIRST, not xdist's most-tests-first
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(_group(item.nodeid), len(first_seen))

    def rank(item) -> tuple[int, int]:
        group = _group(item.nodeid)
        return (LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)), first_seen[group]

    items[:] = sorted(items, key=rank)  # stable: each module's tests keep their order


def shared_across_workers(tmp_path_factory, name: str, build, load):
    """``build(folder)`` once per test session, whatever the number of xdist workers: the first
    worker to ask builds it under a file lock into a folder all workers see; the others wait, then
    ``load(folder)``. Without xdist: ``build`` into a fresh temporary folder."""
    if not WORKER:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name  # the session's base, above each worker's own
    with FileLock(str(folder) + ".lock"):
        built = folder / ".built"
        if not built.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = build(folder)
            built.touch()
            return result
    return load(folder)


def require(condition, reason: str, *, module: bool = False) -> None:
    """Skip (locally) or fail (under CI=true) when a dependency ``.ci/run`` provides is missing.

    ``module=True`` at module level (a skip or failure for the whole file, at collection)."""
    if condition:
        return
    if CI:
        pytest.fail(f"CI=true, so this is not skipped: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


@pytest.fixture(scope="session", autouse=True)
def _user_process_allocator():
    """The suite's process allocates as `kneeosteo` does (the CLI and train() keep freed memory,
    kneeosteo/utils/allocator.py) from the first test on, not from whichever test first calls them."""
    from kneeosteo.utils.allocator import keep_freed_memory

    keep_freed_memory()


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """KNEEOSTEO_CACHE for the whole session, set before any module- or session-scoped fixture
    runs (they are set up before the per-test one below), so nothing the suite does ever writes
    into (or reads a stale export from) the user's ~/.cache/kneeosteo."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEOSTEO_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own KNEEOSTEO_CACHE, so tests never share or pollute the user's cache."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def kop() -> Path:
    """The KOP data set at ../shared/datasets/kop (relative to the repo root); skips without it
    (fails under CI=true).

    Session-scoped so that module-scoped fixtures (scan KOP once) can use it."""
    require(KOP_DIR.is_dir(), f"KOP data set not found at {KOP_DIR}; tests that need it skip on a fresh clone")
    return KOP_DIR


@pytest.fixture(scope="session")
def kop_scan(kop, tmp_path_factory):
    """KOP scanned once per session (~20-30 s of decoding), into a private cache (shared by the
    xdist workers: the second reads the first one's scan memos)."""
    from kneeosteo.data.scan import scan_dataset

    def scan(cache: Path):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KNEEOSTEO_CACHE", str(cache))
            return scan_dataset(kop)

    return shared_across_workers(tmp_path_factory, "kop-cache", scan, scan)


def has_bundled_model() -> bool:
    from kneeosteo.errors import CheckpointError
    from kneeosteo.run import RunDir

    try:
        RunDir.bundled()
    except CheckpointError:
        return False
    return True


@pytest.fixture(scope="session")
def bundled_run() -> Path:
    """The bundled default model's folder; skips without it (fails under CI=true)."""
    from kneeosteo.run import RunDir

    require(
        has_bundled_model(), "no bundled model in kneeosteo/assets/default_model/ (config.json + model.safetensors) yet"
    )
    return RunDir.bundled().path


PREVIOUS_DEFAULT = Path(__file__).resolve().parent / "data" / "previous_default"


@pytest.fixture(scope="session")
def previous_default() -> Path:
    """The bundled model before the knee-region one (``hybrid-bone224-reweight``, bone preset, whole
    films), kept byte for byte as a run written by an earlier version: its trust.json of format 1,
    its run-folder format 2 and the mirror-comparison orientation check (no learned one)."""
    from kneeosteo.run import RunDir

    return RunDir.open(PREVIOUS_DEFAULT).path


# The session's tiny model: generated 64x64 data, pretrained EfficientNet-Lite0 frozen, trained
# long enough that its probabilities spread over most of [0, 1] (logits about -4..7: an engine
# that answered a constant could not pass the engine-agreement tests), in fp32 so that it is the
# same model whether or not the CPU runs bf16 natively. Shared by test_inference, test_web,
# test_browser and test_benchmarks, which each used to train their own.
TINY_SIZE = 64
TINY_SETTINGS = dict(
    backbone="efficientnet_lite0",
    epochs=20,
    copies=1,
    batch_size=8,
    image_size=TINY_SIZE,
    precision="fp32",
    device="cpu",
    patience=100,
    lr=5e-3,
)


def _train_tiny(root: Path) -> SimpleNamespace:
    import imagegen as g
    from kneeosteo.config import TrainConfig
    from kneeosteo.data.scan import scan_dataset
    from kneeosteo.data.split import make_split, write_split
    from kneeosteo.experiments.pipeline import train_and_score

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KNEEOSTEO_CACHE", str(root / "cache"))
            data = g.make_dataset(root / "data", n_per_class=10, size=TINY_SIZE).root
            write_split(make_split(scan_dataset(data), test_size=4), root / "split.json")
            train_and_score(
                TrainConfig.from_dict(
                    dict(data=str(data), out=str(root / "run"), split=str(root / "split.json"), **TINY_SETTINGS)
                ),
                console=lambda *a: None,
            )
    finally:
        torch.set_num_threads(before)
    return _tiny_namespace(root)


def _tiny_namespace(root: Path) -> SimpleNamespace:
    return SimpleNamespace(
        root=root, data=root / "data", split=root / "split.json", run=root / "run", cache=root / "cache"
    )


@pytest.fixture(scope="session")
def hospital(tmp_path_factory) -> SimpleNamespace:
    """A generated 24-patient export (two knees each, some DICOM, labels.csv with WHO-band labels
    and T-scores), its split, and a 3-class run (``.mc``) and a T-score run (``.reg``) trained on
    it (issue 19: test_own_data, test_browser)."""
    import imagegen as g
    from kneeosteo.config import TrainConfig
    from kneeosteo.data.scan import scan_dataset
    from kneeosteo.data.split import make_split, write_split
    from kneeosteo.experiments.pipeline import train_and_score

    root = tmp_path_factory.mktemp("hospital")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KNEEOSTEO_CACHE", str(root / "cache"))
            data, manifest, rows = g.make_patient_dataset(root / "d", patients=24)
            scan = scan_dataset(data, labels=manifest, require_binary=False)
            write_split(make_split(scan, "paper", seed=0, test_size=12, val_fraction=0.25), root / "split.json")
            common = dict(
                data=str(data),
                labels=str(manifest),
                split=str(root / "split.json"),
                backbone_weights="none",
                image_size=64,
                epochs=12,
                batch_size=8,
                copies=1,
                precision="fp32",
            )
            runs = {
                name: train_and_score(
                    TrainConfig.from_dict(dict(out=str(root / name), **common, **kw)), console=lambda *a: None
                )
                for name, kw in (("mc", {"task": "multiclass"}), ("reg", {"target": "t_score"}))
            }
    finally:
        torch.set_num_threads(before)
    return SimpleNamespace(root=root, data=data, manifest=manifest, rows=rows, **runs)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """The session's tiny trained run: ``.run`` (folder), ``.data``, ``.split``, ``.root``."""
    return shared_across_workers(tmp_path_factory, "tiny-model", _train_tiny, _tiny_namespace)


@pytest.fixture(scope="session")
def tiny_report(tiny, tmp_path_factory) -> Path:
    """`kneeosteo report` of the tiny run (two right images in the gallery), made once per session
    for the report tests and the browser test."""
    from kneeosteo.reporting import write_report

    return shared_across_workers(
        tmp_path_factory,
        "tiny-report",
        lambda folder: write_report(tiny.run, folder / "report.html", data=tiny.data, correct=2),
        lambda folder: folder / "report.html",
    )


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: tiny batches gain nothing from more, and on a shared
    2-core machine OpenMP threads competing with other processes made each step several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
