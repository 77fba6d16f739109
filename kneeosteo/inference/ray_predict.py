"""`predict INPUT... --ray [ADDRESS] --out preds.parquet|csv`: Ray Data over the file list.

The files (folders searched, manifests expanded: :func:`~kneeosteo.inference.inputs.collect_inputs`)
are cut into the batches a local run would use, so every image meets the network in the same
batch and gets the same bits. Each batch is one row of a Ray dataset:

1. read tasks decode the batch's files, hash their pixels (content id), preprocess them exactly as
   the model's run does and apply the trust bundle's pixel check where the pixels are (the
   network never needs the full-size image);
2. an actor pool runs the network: each actor loads the model once (the ONNX Runtime engine by
   default, as locally) and turns a batch into its rows, bad files into error rows;
3. the driver streams the rows, in input order, into the output (CSV: one file; Parquet: a folder
   of part files), and collects the bad files' reasons to report as a local run does.

Memory stays bounded: Ray Data streams (a few batches in flight per stage), the driver writes rows
as they come and keeps only the file list and the bad files' reasons.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from kneeosteo.errors import ConfigError, ImageReadError
from kneeosteo.inference.inputs import collect_inputs
from kneeosteo.inference.output import STREAM_SUFFIXES, PredictionWriter
from kneeosteo.inference.predictor import Prediction, Predictor
from kneeosteo.utils.ray_cluster import connect, forwarded_env

__all__ = ["READ_CPUS", "predict_ray"]

READ_CPUS = 0.5  # what a read task asks for: decoding is light next to the network, and a
# local instance on few cores must keep room for the actors


def _read_batch(row: dict, preprocess, limits) -> dict:
    """Read task: one batch of files -> the network's inputs (bytes) and what each file gave."""
    import torch

    from kneeosteo.data.reader import read_image
    from kneeosteo.trust.domain import pixel_problems

    files = json.loads(row["paths"])
    items, xs = [], []
    for path in files:
        try:
            img = read_image(path)
            items.append(
                {
                    "path": path,
                    "content_id": img.content_id,
                    "pixel_reasons": None if limits is None else pixel_problems(img.pixels, None, limits),
                }
            )
            xs.append(preprocess(img.pixels))
        except ImageReadError as exc:
            items.append({"path": path, "error": exc.reason})
    x = torch.stack(xs).numpy().astype(np.float32, copy=False) if xs else np.zeros((0,), np.float32)
    return {"batch": row["batch"], "items": json.dumps(items), "shape": json.dumps(list(x.shape)), "x": x.tobytes()}


class _Network:
    """Actor: the model, loaded once; a batch of read files -> one output row per file."""

    def __init__(self, predictor_kwargs: dict, env: dict, threads: int):
        import torch

        os.environ.update(env)  # this actor's process serves this job only
        torch.set_num_threads(threads)
        self.predictor = Predictor(**predictor_kwargs)

    def __call__(self, batch: dict) -> dict:
        out_batch, kinds, rows = [], [], []
        for k, items, shape, blob in zip(batch["batch"], batch["items"], batch["shape"], batch["x"]):
            items = json.loads(items)
            good = [it for it in items if "error" not in it]
            verdicts = []
            if good:
                x = np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape)).copy()
                reasons = [it["pixel_reasons"] for it in good]
                verdicts = self.predictor.assess(
                    x, [None] * len(good), None if any(r is None for r in reasons) else reasons
                )
            v = iter(verdicts)
            for it in items:
                out_batch.append(int(k))
                if "error" in it:
                    kinds.append("error")
                    rows.append(json.dumps({"path": it["path"], "reason": it["error"]}))
                else:
                    kinds.append("ok")
                    p = self.predictor.row(it["path"], it["content_id"], next(v))
                    rows.append(json.dumps(p.as_row()))
        return {
            "batch": np.array(out_batch, dtype=np.int64),
            "kind": np.array(kinds, dtype=object),
            "row": np.array(rows, dtype=object),
        }


def _prediction(row: dict) -> Prediction:
    row["prediction_set"] = tuple(row["prediction_set"])
    return Prediction(**row)


def predict_ray(
    inputs: Iterable,
    out: str | os.PathLike,
    predictor: Predictor,
    predictor_kwargs: dict,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    progress: bool = False,
) -> tuple[int, list[ImageReadError]]:
    """Predict ``inputs`` on Ray into ``out`` (.csv or .parquet); returns (rows written, errors in
    input order). ``predictor`` (already loaded by the caller, so a bad model fails once, here)
    gives the preprocessing and pixel limits; each actor builds its own from ``predictor_kwargs``."""
    out = Path(out)
    if out.suffix.lower() not in STREAM_SUFFIXES:
        raise ConfigError(
            f"{out}: predict --ray writes {' or '.join(STREAM_SUFFIXES)} (rows are streamed, a JSON document is not)"
        )
    if predictor.knee_run:  # its read tasks make one input per film; a knee run needs one per knee
        raise ConfigError("predict --ray does not score a knee run (preset 'knee') knee by knee; predict without --ray")
    if cpus_per_actor <= 0 or (actors is not None and actors < 1):
        raise ConfigError("--actors must be >= 1 and --cpus-per-actor > 0")
    files, errors = collect_inputs(inputs)
    bs = predictor.batch_size
    kwargs = dict(predictor_kwargs)
    for key in ("run", "onnx"):  # an actor may run in another working directory
        if kwargs.get(key) is not None:
            kwargs[key] = str(Path(kwargs[key]).resolve())
    limits = predictor.pixel_limits
    with connect(address) as ray, PredictionWriter(out) as writer:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows in input order, as a local run writes them
        ctx.enable_progress_bars = progress
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines: not ours to print
        if not files:
            return 0, errors
        n_actors = actors or max(1, int((ray.cluster_resources().get("CPU", 1) - READ_CPUS) // cpus_per_actor))
        items = [
            {"batch": k, "paths": json.dumps([str(p) for p in files[i : i + bs]])}
            for k, i in enumerate(range(0, len(files), bs))
        ]
        ds = ray.data.from_items(items)
        ds = ds.map(
            _read_batch, fn_kwargs={"preprocess": predictor.info.preprocess, "limits": limits}, num_cpus=READ_CPUS
        )
        ds = ds.map_batches(
            _Network,
            batch_size=1,
            batch_format="numpy",
            num_cpus=cpus_per_actor,
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            fn_constructor_kwargs={
                "predictor_kwargs": kwargs,
                "env": forwarded_env(),
                "threads": max(1, int(round(cpus_per_actor))),
            },
        )
        last = -1
        for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
            if len(b["batch"]) and int(b["batch"][0]) < last:  # preserve_order is what makes the rows match
                raise RuntimeError("Ray Data returned batches out of order")
            last = int(b["batch"][-1]) if len(b["batch"]) else last
            preds = []
            for kind, row in zip(b["kind"], b["row"]):
                row = json.loads(row)
                if kind == "ok":
                    preds.append(_prediction(row))
                else:
                    errors.append(ImageReadError(row["path"], row["reason"]))
            writer.write(preds)
        return writer.rows, errors
