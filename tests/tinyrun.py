"""A tiny generated data set, its split and one reference training run, for the test modules that
compare other runs (torchrun, resumed after a fault, benchmark engines) against it.

Trained with one intra-op thread, like the subprocesses those tests start, so the reference is
computed the same way as what it is compared with.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import imagegen as g
from kneeosteo.config import TrainConfig
from kneeosteo.data.scan import scan_dataset
from kneeosteo.data.split import make_split, write_split
from kneeosteo.experiments.pipeline import train_and_score


def tiny_run(
    root: Path,
    settings: dict,
    *,
    n_per_class: int = 12,
    size: int = 64,
    run_name: str = "ref",
    split_kw: dict | None = None,
) -> SimpleNamespace:
    """Data under ``root/data``, ``root/split.json``, ``root/cfg.toml`` (``settings`` as TOML) and a
    run at ``root/run_name`` trained and scored with ``settings`` (``.run`` is its folder, with
    metrics.json and predictions.csv); the feature cache is ``root/cache``."""
    cache = root / "cache"
    split_kw = {"test_size": 6, "val_fraction": 0.25} if split_kw is None else split_kw
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KNEEOSTEO_CACHE", str(cache))
            data = g.make_dataset(root / "data", n_per_class=n_per_class, size=size).root
            split = root / "split.json"
            write_split(make_split(scan_dataset(data), "paper", seed=0, **split_kw), split)
            cfg = root / "cfg.toml"
            cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
            run = train_and_score(
                TrainConfig.from_dict(dict(data=str(data), out=str(root / run_name), split=str(split), **settings)),
                console=lambda *a: None,
            )
    finally:
        torch.set_num_threads(before)
    return SimpleNamespace(root=root, data=data, split=split, cfg=cfg, run=run, cache=cache)
