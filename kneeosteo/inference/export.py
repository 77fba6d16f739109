"""ONNX export of the whole network (backbone, AM, head, sigmoid) and an ONNX Runtime wrapper.
(int8 versions of an export: ``quantize.py``.)

The graph takes *normalised* images (B, 3, S, S) and returns P(positive) (B,), the logit (B,)
and the frozen backbone's features (B, D) for the domain check; the batch axis is dynamic. Everything else a caller needs (preprocessing, threshold, classes, model id) is in
the model's metadata_props under ``kneeosteo.*``, so an .onnx file can be used on its own.
The legacy TorchScript-based exporter (``dynamo=False``) is used: the dynamo exporter needs
onnxscript, and the traced graph of this plain CNN is exact.

Torch is imported where a model is exported (the graph's modules: ``export_nets``), not to run
an export: ``OnnxModel`` and ``ensure_onnx`` with its export in the cache need only ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kneeosteo.data.preprocess import Preprocess
from kneeosteo.errors import ConfigError, InferenceError
from kneeosteo.paths import cache_dir
from kneeosteo.run import ModelInfo, RunDir
from kneeosteo.tasks import task_for
from kneeosteo.utils.atomic import write_bytes
from kneeosteo.utils.hashing import sha256_file

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_OPSET",
    "OnnxModel",
    "cached_onnx_path",
    "ensure_onnx",
    "export_onnx",
    "is_sealed",
    "onnx_metadata",
    "seal",
]

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17
_P = "kneeosteo."


def onnx_metadata(info: ModelInfo) -> dict[str, str]:
    p = info.preprocess
    return {
        _P + "model_id": info.model_id,
        _P + "backbone": info.backbone,
        _P + "preprocess": json.dumps(asdict(p)),
        _P + "threshold": repr(info.threshold),
        _P + "weights_sha256": info.weights_sha256,
        _P + "classes": json.dumps([info.negative, info.positive]),
        _P + "input": (
            f"images: float32 (B, 3, {p.size}, {p.size}); read the radiograph as greyscale "
            f"in [0, 1], apply the '{p.preset}' geometry (paper: stretch to {p.size}x{p.size}; "
            f"robust: letterbox onto a black square; bone: black out all but "
            f"kneeosteo.data.bone.bone_mask's region, then letterbox), CLAHE={p.clahe}, copy to 3 channels, "
            f"then (x - mean) / std with mean={list(p.mean)}, std={list(p.std)}"
        ),
        _P + "output": f"probability: float32 (B,), P({info.positive}); logit: float32 (B,); features: float32 "
        f"(B, D), the frozen backbone's pooled features (for the domain check; absent without a "
        f"backbone)",
    }


def binary_only(run: RunDir) -> None:
    """The ONNX export carries one probability and one logit: the paper's binary model."""
    if not task_for(run.config).supports_onnx_export:
        raise ConfigError(f"{run.path}: a {run.config.task} run has no ONNX export yet; predict with --engine torch")


def export_onnx(
    run: str | os.PathLike | None, out: str | os.PathLike, opset: int = DEFAULT_OPSET, verify: bool = True
) -> Path:
    """Export ``run`` (None: the bundled model) to ``out``, check it with onnx.checker and, when
    onnxruntime is installed and ``verify``, compare it with PyTorch on random inputs."""
    import onnx
    import torch

    from kneeosteo.inference.export_nets import ExportNet

    if opset < 17:
        raise ValueError(f"opset {opset} is too old; use 17 or newer")
    run = RunDir.open(run)
    binary_only(run)
    info = run.info
    net = ExportNet(run.load_model("cpu")).eval()
    s = info.preprocess.size
    example = torch.zeros(2, 3, s, s)
    buf = io.BytesIO()
    names = net.output_names()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from shape checks that are constant here
        torch.onnx.export(
            net,
            (example,),
            buf,
            input_names=["images"],
            output_names=names,
            dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = (
        f"kneeosteo hybrid model {info.model_id}: normalised knee radiographs -> "
        f"P({info.positive}). See metadata_props kneeosteo.* for the preprocessing."
    )
    del proto.metadata_props[:]
    for k, v in onnx_metadata(info).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    if verify:
        _verify(data, net, s)
    write_bytes(out, data)
    return Path(out)


def _verify(data: bytes, net: nn.Module, size: int, tol: float = 1e-4) -> None:
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("onnxruntime not installed: the export was checked, but not run")
        return
    import torch

    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x)[0].double().numpy()
    got = OnnxModel(data, require_metadata=False)(x.numpy()).astype(np.float64)
    diff = float(np.max(np.abs(got - want)))
    if not diff <= tol:
        raise InferenceError(f"the ONNX export disagrees with PyTorch: max |difference| {diff:.2e} > {tol}")


class OnnxModel:
    """An ONNX Runtime session on an exported model, with the metadata read back as ModelInfo."""

    def __init__(self, model: str | os.PathLike | bytes, require_metadata: bool = True, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InferenceError("--engine onnxruntime needs the onnxruntime package: pip install onnxruntime") from exc
        src = model if isinstance(model, bytes) else str(model)
        opts = ort.SessionOptions()
        if threads:  # default: ONNX Runtime's own choice (one thread per physical core)
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise InferenceError(
                f"{model if not isinstance(model, bytes) else 'model'}: not a loadable "
                f"ONNX model ({type(exc).__name__}: {exc})"
            ) from exc
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = _info_from_metadata(meta, model) if require_metadata else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """P(positive) (B,)."""
        return self.outputs(images)[0]

    def outputs(self, images: np.ndarray) -> list[np.ndarray]:
        """Every output: probability, then logit and features in an export made by this version."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


def __getattr__(name: str):
    """The exported graph's modules (torch), where older code imports them from."""
    if name in ("ExportNet", "ProbabilityNet"):
        from kneeosteo.inference import export_nets

        return getattr(export_nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _info_from_metadata(meta: dict[str, str], origin) -> ModelInfo:
    try:
        p = json.loads(meta[_P + "preprocess"])
        negative, positive = json.loads(meta[_P + "classes"])
        prep = Preprocess(p["preset"], int(p["size"]), tuple(p["mean"]), tuple(p["std"]), bool(p["clahe"]))
        return ModelInfo(
            meta[_P + "model_id"],
            prep,
            float(meta[_P + "threshold"]),
            negative,
            positive,
            meta.get(_P + "backbone", ""),
            meta.get(_P + "weights_sha256", ""),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise InferenceError(
            f"{origin}: no kneeosteo metadata ({type(exc).__name__}: {exc}); export it with `kneeosteo export`"
        ) from exc


def cached_onnx_path(info: ModelInfo, suffix: str = ".onnx") -> Path:
    """Where exports of the exact weights ``info`` names are kept in the cache (full sha256 in the name)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", info.model_id.rsplit("-", 1)[0])
    return cache_dir() / "onnx" / f"{name}-{info.weights_sha256 or info.model_id}{suffix}"


def seal(path: Path) -> None:
    """Record an export's own sha256 beside it (``NAME.sha256``), written when we write the export."""
    write_bytes(path.with_name(path.name + ".sha256"), (sha256_file(path) + "\n").encode())


def is_sealed(path: Path) -> bool:
    """The file is the one we wrote: its sha256 is the one recorded beside it when it was written."""
    side = path.with_name(path.name + ".sha256")
    try:
        return path.is_file() and side.is_file() and side.read_text().strip() == sha256_file(path)
    except OSError:
        return False


def ensure_onnx(run: str | os.PathLike | RunDir | None) -> Path:
    """The run's ONNX export, kept in the cache (made now if needed; the run folder may be
    read-only, e.g. the bundled model). It is trusted only if it is the file we wrote (sha256
    recorded beside it) and was exported from these exact weights with these settings; anything
    else (a damaged, swapped or stale file) is exported again. A ``model.onnx`` lying in the run
    folder is never used: it could have been planted there."""
    run = RunDir.open(run)
    binary_only(run)
    info = run.info  # verifies the weights' sha256 on the way
    cached = cached_onnx_path(info)
    if not (is_sealed(cached) and _matches(cached, info)):
        if cached.exists():
            log.warning("%s is not the export kneeosteo wrote for these weights; exporting again", cached)
        log.info("exporting %s to %s", run, cached)
        export_onnx(run, cached)
        seal(cached)
    return cached


def _matches(path: Path, info: ModelInfo) -> bool:
    """Exported from these weights with these settings (a threshold edited since also counts)."""
    if not path.is_file():
        return False
    try:
        meta = OnnxModel(path).session.get_modelmeta().custom_metadata_map
    except InferenceError:
        return False
    return all(meta.get(k) == v for k, v in onnx_metadata(info).items())
