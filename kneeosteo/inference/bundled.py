"""The default model shipped inside the package, so `kneeosteo predict x.png` works on a fresh
install. It lives in ``kneeosteo/assets/default_model/`` (config.json, model.safetensors,
MODEL_CARD.md, metrics.json, split.json) and is located with importlib.resources, so it is
found wherever the package is installed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kneeosteo.inference.runinfo import InferenceError

__all__ = ["BUNDLED_FILES", "bundled_run_dir", "has_bundled_model"]

BUNDLED_FILES = ("config.json", "model.safetensors")


def _asset_dir():
    return resources.files("kneeosteo").joinpath("assets", "default_model")


def bundled_run_dir() -> Path:
    """The bundled model's folder; InferenceError (with the remedy) when it is not installed."""
    folder = _asset_dir()
    missing = [f for f in BUNDLED_FILES if not folder.joinpath(f).is_file()]
    if missing:
        raise InferenceError(
            f"no bundled default model in this installation ({', '.join(missing)} missing in "
            f"kneeosteo/assets/default_model/); pass --run RUN, a folder written by `kneeosteo train`"
        )
    if not isinstance(folder, Path):  # e.g. a zipped install: the checkpoint loader needs real files
        raise InferenceError("the bundled default model is not on the file system (zipped install?); "
                             "pass --run RUN")
    return folder


def has_bundled_model() -> bool:
    try:
        bundled_run_dir()
    except InferenceError:
        return False
    return True
