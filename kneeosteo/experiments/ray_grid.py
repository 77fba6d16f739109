"""`reproduce --ray [ADDRESS]`: every (model, seed[, fold]) cell of the grid as one Ray task.

The cells are those of :mod:`kneeosteo.experiments.reproduce` and each task runs the same
:func:`~kneeosteo.experiments.reproduce.run_cell` (handed in by ``reproduce``, which imports this
module, never the other way round), so the contract is unchanged: a finished cell
(its ``metrics.json``) is never submitted again, an interrupted one resumes from its last epoch
(also when Ray retries a task whose worker died), every cell of a seed reads the seed's split,
written by the driver before any task starts. Cells write into the output folder, which must be
storage every worker sees (an NFS/SMB mount, the same path on every node).

A task asks for ``cpus_per_cell`` CPUs (its PyTorch threads) and one GPU when the grid runs on
CUDA (``--device cuda``, or ``auto`` on a cluster that has GPUs); Ray places the tasks. Cells
are submitted model by model, so cells that run at the same time belong to different seeds and
do not compute the same frozen features twice. The driver prints one line per finished cell
with its wall time and keeps a bar for the grid.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kneeosteo.config import TrainConfig
from kneeosteo.errors import ConfigError, KneeosteoError
from kneeosteo.utils.progress import progress_bar
from kneeosteo.utils.ray_cluster import connect, forwarded_env, task_env

__all__ = ["MAX_RETRIES", "GridReport", "cell_resources", "run_cells_ray"]

MAX_RETRIES = 3  # a task whose worker or node dies is run again this often; each retry resumes the cell


@dataclass
class GridReport:
    submitted: int  # cells sent to Ray (the finished ones never are)
    reused: int
    results: dict[str, dict]  # cell label -> what its task returned (seconds, host, resumed)


Cell = Any  # kneeosteo.experiments.reproduce.Cell: .model (.key), .seed, .fold, .path, .run


def _label(c: Cell) -> str:
    return f"{c.model.key} seed {c.seed}" + (f" fold {c.fold}" if c.fold is not None else "")


def _cell_task(
    run_cell: Callable, cell: Cell, base: TrainConfig, split_path: str, random_init: bool, env: dict, threads: int
) -> dict:
    """Runs in a Ray worker: one cell, with the driver's cache/offline settings and ``threads``."""
    import torch

    with task_env(env):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        resumed = (cell.path / "checkpoint" / "state.json").is_file() and not cell.run.metrics_file.is_file()
        t = time.perf_counter()
        try:
            seconds = run_cell(cell, base, Path(split_path), random_init)
        except KneeosteoError as exc:  # the user's or a file's fault: reported by the driver, one line
            return {"error": type(exc).__name__, "message": str(exc)}
        finally:
            torch.set_num_threads(before)
        return {
            "seconds": seconds,
            "wall": time.perf_counter() - t,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "resumed": resumed,
        }


def cell_resources(ray, base: TrainConfig, cpus_per_cell: float) -> tuple[float, float]:
    """(CPUs, GPUs) one cell asks Ray for."""
    if cpus_per_cell <= 0:
        raise ConfigError(f"--cpus-per-cell must be > 0, got {cpus_per_cell}")
    if base.runtime.device == "cuda":
        return cpus_per_cell, 1.0
    if base.runtime.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0:
        return cpus_per_cell, 1.0
    return cpus_per_cell, 0.0


def _error_class(name: str) -> type[KneeosteoError]:
    import kneeosteo.errors as errors

    cls = getattr(errors, name, KneeosteoError)
    return (
        cls
        if isinstance(cls, type)
        and issubclass(cls, KneeosteoError)
        and name not in ("ImageReadError", "NotAnImageError", "BackboneWeightsError")
        else KneeosteoError
    )


def run_cells_ray(
    run_cell: Callable,
    cells: list[Cell],
    base: TrainConfig,
    splits: dict[int, Path],
    random_init: set[str],
    address: str | None = None,
    cpus_per_cell: float = 1.0,
    console=print,
) -> GridReport:
    """Run the unfinished ``cells`` with ``run_cell(cell, base, split_path, random_init)`` as Ray
    tasks (see the module docstring); returns what ran."""
    with connect(address) as ray:
        from ray.exceptions import RayError, RayTaskError

        cpus, gpus = cell_resources(ray, base, cpus_per_cell)
        threads = max(1, int(round(cpus)))
        remote = ray.remote(_cell_task)
        env = forwarded_env()
        done = [c for c in cells if c.run.metrics_file.is_file()]
        for c in done:
            console(f"{_label(c)} (done, reused)")
        keys = {m: i for i, m in enumerate(dict.fromkeys(c.model.key for c in cells))}
        todo = sorted(
            (c for c in cells if not c.run.metrics_file.is_file()),
            key=lambda c: (keys[c.model.key], c.seed, -1 if c.fold is None else c.fold),
        )
        refs = {}
        for c in todo:
            ref = remote.options(
                num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False, name=f"cell {_label(c)}"
            ).remote(run_cell, c, base, str(Path(splits[c.seed]).resolve()), c.model.key in random_init, env, threads)
            refs[ref] = c
        if todo:
            console(
                f"submitted {len(todo)} cells to Ray ({cpus:g} CPU{'s' if cpus != 1 else ''}"
                f"{f', {gpus:g} GPU' if gpus else ''} each; cluster: {ray.cluster_resources().get('CPU', 0):g} CPUs)"
            )
        results: dict[str, dict] = {}
        bar = progress_bar(None, "grid", total=len(cells), unit="cell")
        bar.update(len(done))
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    c = refs.pop(ref)
                    try:
                        res = ray.get(ref)
                    except RayTaskError:
                        raise  # a bug in the cell's code: keep its traceback
                    except RayError as exc:  # the worker or node died more than MAX_RETRIES times
                        raise KneeosteoError(
                            f"cell {_label(c)}: its Ray worker died {MAX_RETRIES + 1} times ({type(exc).__name__}); "
                            "rerun the command: finished cells are kept and this one resumes"
                        ) from exc
                    if "error" in res:
                        raise _error_class(res["error"])(f"cell {_label(c)}: {res['message']}")
                    results[_label(c)] = res
                    note = ", resumed" if res["resumed"] else ""
                    console(
                        f"[{len(done) + len(results)}/{len(cells)}] {_label(c)}: {res['wall']:.0f} s "
                        f"on {res['host']}{note}"
                    )
                    bar.update(1)
        finally:
            bar.close()
            for ref in refs:  # an error stopped the grid: the rest stop too (and resume on the next run)
                ray.cancel(ref)
    return GridReport(submitted=len(todo), reused=len(done), results=results)
