"""`predict --workers N`: the same rows as one process, N times the cores.

The file list is cut into runs of whole batches, one per worker process, so every image is
predicted in exactly the batch it would have had in one process (convolution kernels, hence the
last digits of a probability, depend on the batch); the workers' results are concatenated back
in input order. Each worker loads the model once and uses its share of the CPU threads.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kneeosteo.inference.inputs import collect_inputs
from kneeosteo.inference.predictor import PredictionResult, Predictor

__all__ = ["predict_sharded", "shard_files"]

_PREDICTOR: Predictor | None = None


def shard_files(files: list[Path], workers: int, batch_size: int) -> list[list[Path]]:
    """Consecutive runs of whole batches, as even as batches allow; never an empty shard."""
    n_batches = -(-len(files) // batch_size)
    per = -(-n_batches // max(1, workers)) * batch_size
    return [files[i : i + per] for i in range(0, len(files), per)] if files else []


def _start(kwargs: dict, threads: int) -> None:
    import torch

    global _PREDICTOR
    torch.set_num_threads(threads)
    _PREDICTOR = Predictor(**kwargs)


def _predict(files: list[Path]) -> PredictionResult:
    return _PREDICTOR.predict(files, progress=False)


def predict_sharded(inputs, workers: int, **predictor_kwargs) -> PredictionResult:
    """Like ``Predictor(**predictor_kwargs).predict(inputs)``, over ``workers`` processes."""
    files, errors = collect_inputs(inputs)
    shards = shard_files(files, workers, predictor_kwargs.get("batch_size", 16))
    merged = PredictionResult(errors=list(errors))
    if not shards:
        return merged
    threads = max(1, (os.cpu_count() or 1) // len(shards))
    # spawn, not fork: forking a process whose OpenMP/torch threads are running can deadlock
    with ProcessPoolExecutor(
        len(shards),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(predictor_kwargs, threads),
    ) as pool:
        for part in pool.map(_predict, shards):
            merged.predictions.extend(part.predictions)
            merged.errors.extend(part.errors)
    return merged
