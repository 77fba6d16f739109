"""Faults: `kill -9` mid-epoch then `--resume`; a disk that fills up mid-run; output folders that
are read-only, full or not folders, refused before any work; ENOSPC inside an atomic write; a
read-only feature cache; damaged checkpoints refused through the CLI; and two source checks:
nothing unpickles, and every file the package writes goes through the atomic helpers.

Every fault ends with the run's own files intact (no data lost): the resumed run's history,
metrics and predictions are byte-for-byte those of a run that was never interrupted. The
docs/reliability.md counts the faults injected here (one per collected case; the
kill -9 test kills twice).
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

import forkrun
from kneeosteo.config import TrainConfig
from kneeosteo.errors import OutputError
from kneeosteo.experiments.pipeline import train_and_score
from kneeosteo.features import cache as cache_mod
from kneeosteo.interfaces.cli import main
from kneeosteo.run import RunDir
from kneeosteo.utils import atomic
from kneeosteo.utils.atomic import atomic_path, write_json
from tinyrun import tiny_run

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "kneeosteo"
# online augmentation: the frozen backbone runs in every epoch, so an epoch lasts long enough to
# be killed in the middle of
SETTINGS = dict(image_size=64, copies=1, augment="online", epochs=6, batch_size=8, patience=100, device="cpu")
RESULTS = ("metrics.json", "predictions.csv")


def _main(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def history(run: Path) -> list[dict]:
    """history.csv without the wall-clock column."""
    with open(run / "history.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def assert_same_results(run: Path, ref: Path) -> None:
    assert history(run) == history(ref)
    for name in RESULTS:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".kneeosteo-probe")]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    """Data, split, a TOML with SETTINGS, and the uninterrupted reference run ``ws.ref`` (one
    thread throughout, like the subprocesses, which get OMP_NUM_THREADS=1)."""
    ws = tiny_run(tmp_path_factory.mktemp("faults"), SETTINGS)
    ws.ref = ws.run
    return ws


# --------------------------------------------------------------------------- kill -9


def _wait_for_epochs(run: Path, n: int, proc, timeout: float = 240) -> list[dict]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.is_alive(), "the run ended before it could be killed"
        try:
            with open(run / "history.csv", newline="") as fh:
                rows = list(csv.DictReader(fh))
        except OSError:
            rows = []
        if len(rows) >= n:
            return rows
        time.sleep(0.01)
    raise AssertionError(f"no epoch {n} within {timeout} s")


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(ws, tmp_path):
    """Each `kneeosteo train` is its own process, forked from a server that imported the package
    once (tests/forkrun.py: the same main() as `python -m kneeosteo`, without re-importing torch
    for every start); SIGKILL is sent to that process's pid."""
    run = tmp_path / "killed"
    env = {**os.environ, "KNEEOSTEO_CACHE": str(ws.cache), "OMP_NUM_THREADS": "1"}
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    fresh = ["train", ws.data, "--split", ws.split, "--config", ws.cfg, "--out", run]
    resume = ["train", "--resume", run]
    killed_after = []
    for cmd, epochs_first in ((fresh, 1), (resume, 3)):  # two kills: in epoch 2, then in epoch 4
        proc = forkrun.start(cmd, env, REPO, out, err)
        try:
            rows = _wait_for_epochs(run, epochs_first, proc)
            time.sleep(float(rows[-1]["seconds"]) / 2)  # half-way through the next epoch
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.join()
        assert proc.exitcode == -signal.SIGKILL
        done = len(history(run))
        assert epochs_first <= done < SETTINGS["epochs"] and not (run / "metrics.json").exists()
        killed_after.append(done)
    # the rest of the run may take 300 s, or 20 times all its epochs at the slowest one measured so far
    with open(run / "history.csv", newline="") as fh:
        slowest = max(float(r["seconds"]) for r in csv.DictReader(fh))
    proc = forkrun.start(resume, env, REPO, out, err)
    proc.join(max(300.0, 20 * SETTINGS["epochs"] * slowest))
    assert proc.exitcode == 0, err.read_text()[-3000:]
    assert re.search(r"resuming after epoch \d", out.read_text())
    assert_same_results(run, ws.ref)
    assert not temporaries(run)
    print(f"\nkill -9 faults injected: 2 (after epochs {killed_after}); data lost: none")


# --------------------------------------------------------------------------- full disk, read-only


def test_disk_full_mid_run_is_one_line_and_resume_completes(ws, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(ws.cache))
    run = tmp_path / "full"
    real_replace, calls = os.replace, {"n": 0}

    def replace(src, dst):
        if Path(dst).name == "history.csv":
            calls["n"] += 1
            if calls["n"] == 3:  # the disk fills up while epoch 3 is saved
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    argv = ["train", ws.data, "--split", ws.split, "--config", ws.cfg, "--out", run]
    assert _main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "history.csv: could not be written (No space left on device)" in err
    assert f"kneeosteo train --resume {run}" in err
    assert len(history(run)) == 2 and not (run / "metrics.json").exists()  # epoch 2's file intact
    assert not temporaries(run)

    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert _main(["train", "--resume", run]) == 0
    assert_same_results(run, ws.ref)


@pytest.mark.parametrize("fault", ["not a folder", "read-only", "full"])
@pytest.mark.parametrize("command", ["train", "reproduce", "predict"])
def test_unwritable_output_is_refused_before_any_work(ws, tmp_path, monkeypatch, capsys, command, fault):
    out = tmp_path / "out"
    if fault == "not a folder":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "out"
    elif fault == "read-only":  # tests run as root, which ignores chmod: make the probe fail instead

        def readonly(*a, **kw):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(atomic, "tempfile", SimpleNamespace(mkstemp=readonly))
    else:
        monkeypatch.setattr(atomic, "shutil", SimpleNamespace(disk_usage=lambda p: SimpleNamespace(free=2**20)))
    argv = {
        "train": ["train", ws.data, "--split", ws.split, "--config", ws.cfg, "--out", out],
        "reproduce": ["reproduce", ws.data, "--out", out, "--models", "am-only", "--seeds", "1"],
        "predict": ["predict", ws.data, "--run", ws.ref, "--out", out / "p.csv"],
    }[command]
    assert _main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err, err
    assert {"not a folder": "is a file, not a folder", "read-only": "Read-only file system", "full": "only 1 MiB free"}[
        fault
    ] in err
    # refused up front, before the work each command would have left in the cache: train and
    # reproduce compute features (tensors/) first, predict exports the run to ONNX (onnx/) for
    # its default engine; nothing at all was written there
    cache = Path(os.environ["KNEEOSTEO_CACHE"])
    assert not (cache / "tensors").exists() and not (cache / "onnx").exists()
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))


@pytest.mark.parametrize("command", ["audit", "split"])
def test_audit_and_split_unwritable_output_is_one_line(ws, tmp_path, capsys, command):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / ("audit" if command == "audit" else "split.json")
    code = None
    try:
        code = _main([command, ws.data, "--out", out])
    finally:
        err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "a-file" in err


@pytest.mark.parametrize("where", ["writer", "fsync", "rename"])
def test_enospc_during_an_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, where):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.8})
    before = target.read_bytes()
    full = OSError(errno.ENOSPC, "No space left on device")

    def fail(*a, **kw):
        raise full

    if where == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", fail)
    elif where == "rename":
        monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OutputError, match=r"metrics\.json: could not be written \(No space left on device\)"):
        if where == "writer":
            with atomic_path(target) as tmp:
                tmp.write_bytes(b'{"accuracy": 0.')  # half a file, then the disk is full
                raise full
        else:
            write_json(target, {"accuracy": 0.9})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    with pytest.raises(ValueError):  # other errors pass through untouched
        with atomic_path(target):
            raise ValueError("a bug, not a disk problem")


def test_read_only_cache_costs_speed_not_the_run(ws, tmp_path, monkeypatch, caplog, one_thread):
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(tmp_path / "ro-cache"))

    @contextmanager
    def readonly(target):
        raise OSError(errno.EROFS, "Read-only file system")
        yield

    monkeypatch.setattr(cache_mod, "atomic_path", readonly)
    cfg = TrainConfig.from_dict(
        dict(data=str(ws.data), out=str(tmp_path / "run"), split=str(ws.split), **{**SETTINGS, "epochs": 1})
    )
    run = train_and_score(cfg, console=lambda *a: None)
    assert (run / "metrics.json").is_file()
    assert not list((tmp_path / "ro-cache").rglob("*.safetensors"))
    warnings = [r.message for r in caplog.records if "cannot be written" in r.message]
    assert 1 <= len(warnings) <= 4  # once per cache object, not once per entry


def test_a_read_only_cache_warns_once_even_when_threads_fail_together(tmp_path, monkeypatch, caplog):
    """prepare writes from a thread pool: eight writers failing at the same moment must give one
    warning, not eight (a race on the 'already warned' flag made the count depend on timing)."""
    import threading

    import torch

    gate = threading.Barrier(8)

    @contextmanager
    def readonly(target):
        gate.wait(timeout=10)  # every writer is past the 'already failed?' check before any fails
        raise OSError(errno.EROFS, "Read-only file system")
        yield

    monkeypatch.setattr(cache_mod, "atomic_path", readonly)
    cache = cache_mod.TensorCache(tmp_path / "ro")
    threads = [threading.Thread(target=cache.put, args=(f"{i:064x}", {"x": torch.zeros(2)})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and cache.write_error and "Read-only" in cache.write_error


def test_resume_state_is_one_atomic_file(ws, tmp_path, one_thread, monkeypatch):
    """A kill between writing the weights and state.json must not pair epoch k's weights with
    epoch k-1's state: the state travels inside last.safetensors."""
    monkeypatch.setenv("KNEEOSTEO_CACHE", str(ws.cache))
    cfg = TrainConfig.from_dict(
        dict(data=str(ws.data), out=str(tmp_path / "run"), split=str(ws.split), **{**SETTINGS, "epochs": 3})
    )
    run = train_and_score(cfg, console=lambda *a: None)
    state_json = RunDir(run).state_json
    assert state_json == run / "checkpoint" / "state.json" and RunDir(run).state_file.is_file()
    state = json.loads(state_json.read_text())
    stale = {**state, "epoch": 2, "history": state["history"][:2]}
    write_json(state_json, stale)  # as if killed before state.json was renamed
    for name in RESULTS:
        (run / name).unlink()
    train_and_score(cfg.replace(epochs=SETTINGS["epochs"]), resume=True, console=lambda *a: None)
    assert_same_results(run, ws.ref)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("damage", ["truncated", "tampered", "config mismatch"])
def test_damaged_checkpoint_is_refused_by_predict(ws, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(ws.ref, run)
    weights, config = run / "model.safetensors", run / "config.json"
    raw = bytearray(weights.read_bytes())
    if damage == "truncated":
        weights.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "tampered":
        raw[-20] ^= 0x01
        weights.write_bytes(bytes(raw))
    else:
        doc = json.loads(config.read_text())
        doc["identity"]["model"]["head"]["hidden"] = [512, 256, 128, 64]
        config.write_text(json.dumps(doc))
    assert _main(["predict", "--run", run, ws.data / "normal" / "normal_000.png"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors" in err, err
    assert {"truncated": "truncated", "tampered": "sha256", "config mismatch": "head.hidden"}[damage] in err


def test_damaged_checkpoint_is_refused_by_evaluate(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws.ref, run)
    (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:1000])
    code = None
    try:
        code = _main(["evaluate", run])
    except Exception:  # noqa: BLE001 - the traceback this test is about
        pass
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "model.safetensors" in err


# --------------------------------------------------------------------------- source checks


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_nothing_unpickles():
    """Model and cache files are safetensors/JSON; the one torch.load (third-party .pth backbone
    weights) is weights_only=True. Any pickle-based loader is a code-execution hole."""
    banned = re.compile(
        r"\bpickle\.loads?\(|\bcPickle\b|\bdill\.|\bcloudpickle\b|\bjoblib\.load\(|allow_pickle\s*=\s*True"
        r"|\bpd\.read_pickle\(|\bread_pickle\(|\btorch\.package\b|\bshelve\.open\("
    )
    found = []
    for path, text in _sources():
        for n, line in enumerate(text.splitlines(), 1):
            if banned.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : text.find(")", m.start()) + 1]
            if "weights_only=True" not in call:
                found.append(f"{path.relative_to(REPO)}: {call}")
    assert not found, "unpickling code:\n" + "\n".join(found)


# write calls -> which argument is the destination (None: the receiver, as in Path.write_text)
_WRITERS = {
    "write_text": None,
    "write_bytes": None,
    "savefig": 0,
    "save": 0,
    "to_csv": 0,
    "save_file": 1,
    "open": 0,
    "copy": 1,
    "copy2": 1,
    "copyfile": 1,
    "copyfileobj": 1,
    "move": 1,
    "rename": 1,
    "replace": 1,
    "copytree": 1,
}
_NOT_WRITES = {("os", "replace"), ("os", "rename")}  # atomic.py's own final step only (checked apart)


def _call_name(func) -> tuple[str | None, str | None]:
    """(owner, name) of a call: ``shutil.copy`` -> ("shutil", "copy"), ``x.save`` -> (None, "save")."""
    import ast

    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    return None, None


def _unsafe_writes(source: str) -> list[tuple[int, str]]:
    """Calls that write a file whose destination is not the temporary path atomic_path handed out
    (``with atomic_path(final) as tmp``: ``tmp`` or ``str(tmp)``) nor an in-memory buffer."""
    import ast

    tree = ast.parse(source)
    safe: set[str] = set()
    helpers: set[str] = set()  # the atomic helpers themselves (write_text, write_json, ... from utils.atomic)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("utils.atomic"):
            helpers.update(a.asname or a.name for a in node.names)
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                ctx = item.context_expr
                if (
                    isinstance(ctx, ast.Call)
                    and _call_name(ctx.func)[1] == "atomic_path"
                    and isinstance(item.optional_vars, ast.Name)
                ):
                    safe.add(item.optional_vars.id)
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _call_name(node.value.func)[1] in ("BytesIO", "StringIO")
        ):
            safe.update(t.id for t in node.targets if isinstance(t, ast.Name))

    def is_safe(expr) -> bool:
        if isinstance(expr, ast.Call) and _call_name(expr.func) in ((None, "str"), ("os", "fspath")) and expr.args:
            expr = expr.args[0]
        return isinstance(expr, ast.Name) and expr.id in safe

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        owner, name = _call_name(node.func)
        if name not in _WRITERS or (owner, name) in _NOT_WRITES:
            continue
        if (owner is None and isinstance(node.func, ast.Name) and name in helpers) or owner == "atomic":
            continue  # utils.atomic.write_text(final, ...): writes a temporary, then renames
        if name == "open":  # only opened for writing: a mode with w, a, x or +
            mode = (
                node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            )
            if not (isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+")):
                continue
        if name in (
            "copy",
            "copy2",
            "copyfile",
            "copyfileobj",
            "move",
            "copytree",
            "rename",
            "replace",
        ) and owner not in ("shutil", "os"):
            continue  # str.replace, dict.copy, ...
        if name == "save" and owner in ("self",):
            continue
        where = _WRITERS[name]
        if where is None:
            dest = node.func.value if isinstance(node.func, ast.Attribute) else None
        else:
            dest = node.args[where] if len(node.args) > where else None
        if dest is None or not is_safe(dest):
            found.append((node.lineno, ast.unparse(node)[:120]))
    return found


def test_every_file_the_package_writes_goes_through_the_atomic_helpers():
    """Every call that writes a file (Path.write_*, open for writing, savefig, Image/np/torch/onnx
    .save, save_file, to_csv, shutil.copy*/move, os.rename/replace) must write the temporary path
    that utils.atomic.atomic_path hands out (``with atomic_path(final) as tmp``), or an in-memory
    buffer, never a final name. Parsed, not grepped: a line that merely mentions "tmp" is no
    exemption, and a write of another kind is not missed."""
    found = []
    for path, text in _sources():
        if path.name == "atomic.py":
            continue
        found += [f"{path.relative_to(REPO)}:{n}: {call}" for n, call in _unsafe_writes(text)]
    assert not found, "direct writes:\n" + "\n".join(found)


def test_the_write_check_catches_what_a_grep_missed():
    bad = [
        "from PIL import Image\ndef f(img, out):\n    Image.fromarray(img).save(out / 'x.png')\n",
        "import shutil\ndef f(src, dst):\n    shutil.copy(src, dst)\n",
        "def f(final, text):\n    with atomic_path(final) as tmp:\n        final.write_text(text)  # tmp\n",
        "def f(fig, path):\n    with atomic_path(path) as tmp:\n        fig.savefig(str(tmp).replace('.tmp', ''))\n",
        "def f(p):\n    with open(p, 'wb') as fh:\n        fh.write(b'x')\n",
        "import numpy as np\ndef f(p, a):\n    np.save(p, a)\n",
        "def f(p, text):\n    write_text(p, text)\n",  # a write_text that is not the atomic helper
    ]
    for src in bad:
        assert _unsafe_writes(src), src
    good = [
        "def f(fig, path):\n    with atomic_path(path) as tmp:\n        fig.savefig(tmp, format='png')\n",
        "def f(t, path):\n    with atomic_path(path) as tmp:\n        save_file(t, str(tmp), metadata={})\n",
        "import io\ndef f(img):\n    buf = io.BytesIO()\n    img.save(buf, format='PNG')\n",
        "def f(p):\n    with open(p, 'rb') as fh:\n        return fh.read()\n",
        "def f(s):\n    return s.replace('a', 'b')\n",
        "from kneeosteo.utils.atomic import write_text\ndef f(p, text):\n    write_text(p, text)\n",
    ]
    for src in good:
        assert not _unsafe_writes(src), src
