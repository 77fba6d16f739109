"""ONNX export of the whole network (backbone, AM, head, sigmoid) and an ONNX Runtime wrapper.

The graph takes *normalised* images (B, 3, S, S) and returns P(positive) (B,); the batch axis
is dynamic. Everything else a caller needs (preprocessing, threshold, classes, model id) is in
the model's metadata_props under ``kneeosteo.*``, so an .onnx file can be used on its own.
The legacy TorchScript-based exporter (``dynamo=False``) is used: the dynamo exporter needs
onnxscript, and the traced graph of this plain CNN is exact.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kneeosteo.data.preprocess import Preprocess
from kneeosteo.inference.runinfo import InferenceError, ModelInfo, load_model, resolve_run, run_info
from kneeosteo.utils.atomic import write_bytes

__all__ = ["DEFAULT_OPSET", "QUANT_MODES", "OnnxModel", "ProbabilityNet", "ensure_onnx", "ensure_int8_onnx",
           "export_onnx", "onnx_metadata", "quantize_onnx"]

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17
_P = "kneeosteo."


class ProbabilityNet(nn.Module):
    """images -> sigmoid(logit): the exported graph, so ONNX users get probabilities directly."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images=images).float())


def onnx_metadata(info: ModelInfo) -> dict[str, str]:
    p = info.preprocess
    return {
        _P + "model_id": info.model_id,
        _P + "backbone": info.backbone,
        _P + "preprocess": json.dumps(asdict(p)),
        _P + "threshold": repr(info.threshold),
        _P + "classes": json.dumps([info.negative, info.positive]),
        _P + "input": (f"images: float32 (B, 3, {p.size}, {p.size}); read the radiograph as greyscale "
                       f"in [0, 1], apply the '{p.preset}' geometry (paper: stretch to {p.size}x{p.size}; "
                       f"robust: letterbox onto a black square), CLAHE={p.clahe}, copy to 3 channels, "
                       f"then (x - mean) / std with mean={list(p.mean)}, std={list(p.std)}"),
        _P + "output": f"probability: float32 (B,), P({info.positive})",
    }


def export_onnx(run: str | os.PathLike | None, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
                verify: bool = True) -> Path:
    """Export ``run`` (None: the bundled model) to ``out``, check it with onnx.checker and, when
    onnxruntime is installed and ``verify``, compare it with PyTorch on random inputs."""
    import onnx

    if opset < 17:
        raise ValueError(f"opset {opset} is too old; use 17 or newer")
    run = resolve_run(run)
    info = run_info(run)
    net = ProbabilityNet(load_model(run, "cpu")).eval()
    s = info.preprocess.size
    example = torch.zeros(2, 3, s, s)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from shape checks that are constant here
        torch.onnx.export(net, (example,), buf, input_names=["images"], output_names=["probability"],
                          dynamic_axes={"images": {0: "batch"}, "probability": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = (f"kneeosteo hybrid model {info.model_id}: normalised knee radiographs -> "
                        f"P({info.positive}). See metadata_props kneeosteo.* for the preprocessing.")
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
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = net(x).double().numpy()
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
            raise InferenceError(f"{model if not isinstance(model, bytes) else 'model'}: not a loadable "
                                 f"ONNX model ({type(exc).__name__}: {exc})") from exc
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = _info_from_metadata(meta, model) if require_metadata else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]


def _info_from_metadata(meta: dict[str, str], origin) -> ModelInfo:
    try:
        p = json.loads(meta[_P + "preprocess"])
        negative, positive = json.loads(meta[_P + "classes"])
        prep = Preprocess(p["preset"], int(p["size"]), tuple(p["mean"]), tuple(p["std"]), bool(p["clahe"]))
        return ModelInfo(meta[_P + "model_id"], prep, float(meta[_P + "threshold"]), negative, positive,
                         meta.get(_P + "backbone", ""))
    except (KeyError, ValueError, TypeError) as exc:
        raise InferenceError(f"{origin}: no kneeosteo metadata ({type(exc).__name__}: {exc}); "
                             "export it with `kneeosteo export`") from exc


def ensure_onnx(run: str | os.PathLike | None) -> Path:
    """RUN/model.onnx when it was exported from these weights, else an export kept in the cache
    (made now if needed): the run folder may be read-only, e.g. the bundled model."""
    from kneeosteo.paths import cache_dir

    run = resolve_run(run)
    info = run_info(run)
    local = run / "model.onnx"
    if _matches(local, info):
        return local
    cached = cache_dir() / "onnx" / (re.sub(r"[^A-Za-z0-9._-]", "_", info.model_id) + ".onnx")
    if not _matches(cached, info):
        log.info("exporting %s to %s", run, cached)
        export_onnx(run, cached)
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


# --------------------------------------------------------------------------------------------
# int8 quantisation

QUANT_MODES = ("dynamic", "static")


class _ArrayReader:
    """onnxruntime.quantization CalibrationDataReader over a list of (B, 3, S, S) float32 arrays."""

    def __init__(self, input_name: str, batches):
        self._it = iter([{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - only some calibrators call it
        pass


def quantize_onnx(src: str | os.PathLike, out: str | os.PathLike, mode: str = "static", calibration=None,
                  per_channel: bool = True) -> Path:
    """int8 copy of the float ONNX model ``src`` (metadata_props kept).

    ``static``: weights and activations int8 (QDQ, per-channel weights, MinMax ranges from the
    ``calibration`` batches: normalised (B, 3, S, S) inputs, preferably real radiographs);
    ONNX Runtime then runs the convolutions as int8 kernels (VNNI/AMX). ``dynamic``: weights int8,
    activation ranges computed per call; needs no calibration, but ONNX Runtime's dynamic path
    (ConvInteger) is often *slower* than fp32 for convolutions, so measure before using it.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantisation mode {mode!r} (choose from {QUANT_MODES})")
    src, out = Path(src), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out.parent))  # private: parallel runs don't collide
    pre, tmp = work / "pre.onnx", work / "int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns (on the root logger) for every 1-D weight it keeps per-tensor
    try:
        try:  # shape inference + graph optimisation first, as ONNX Runtime recommends
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            model_in = pre
        except Exception as exc:  # pragma: no cover - optional step
            log.info("quant_pre_process failed (%s); quantising the model as exported", exc)
            model_in = src
        if mode == "dynamic":
            quantize_dynamic(str(model_in), str(tmp), per_channel=per_channel, weight_type=QuantType.QInt8)
        else:
            if not calibration:
                raise ValueError("static int8 quantisation needs calibration batches")
            name = onnx.load(str(src), load_external_data=False).graph.input[0].name
            quantize_static(str(model_in), str(tmp), _ArrayReader(name, calibration), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        del proto.metadata_props[:]
        for k, v in {**meta, _P + "quantization": json.dumps({"mode": mode, "per_channel": per_channel})}.items():
            proto.metadata_props.add(key=k, value=v)
        write_bytes(out, proto.SerializeToString())
    finally:
        root.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)
    return out


CALIBRATION_IMAGES = 64


def _calibration_items(run: Path, data: str | os.PathLike | None, n: int) -> tuple[Path, list[str]]:
    """Up to ``n`` training-split files of ``run`` (evenly spaced in split order, both classes)."""
    from kneeosteo.data.scan import DataError
    from kneeosteo.data.split import load_split

    doc = json.loads((run / "config.json").read_text())
    tried = [data] if data else [doc.get("run", {}).get("data"), os.environ.get("KNEEOSTEO_DATA")]
    tried = [str(t) for t in tried if t]
    root = next((t for t in tried if Path(t).is_dir()), None)
    split = run / "split.json"
    if root is None or not split.is_file():
        root = " or ".join(tried) or None
        raise InferenceError(
            f"--engine onnxruntime-int8 calibrates on the run's training images, but the data folder "
            f"({root or 'not recorded'}) or {split} is not there; set KNEEOSTEO_DATA to the data folder, "
            f"or use --engine onnxruntime (fp32)")
    try:
        train = load_split(split, root).train
    except DataError as exc:
        raise InferenceError(str(exc)) from exc
    if not train:
        raise InferenceError(f"{split}: no training images to calibrate the int8 model on")
    step = max(1, len(train) // n)
    return Path(root), train[::step][:n]


def ensure_int8_onnx(run: str | os.PathLike | None, data: str | os.PathLike | None = None,
                     images: int = CALIBRATION_IMAGES) -> Path:
    """Static int8 version of the run's ONNX export, calibrated on up to ``images`` of its training
    images (data folder: ``data``, else the one recorded in config.json, else $KNEEOSTEO_DATA),
    kept in the cache under a key naming the weights, the calibration files (size, mtime) and the
    quantiser settings and version, so a change of any of them makes a new one."""
    import hashlib

    import onnxruntime

    from kneeosteo.data.reader import ImageReadError, read_image
    from kneeosteo.paths import cache_dir

    run = resolve_run(run)
    info = run_info(run)
    root, files = _calibration_items(run, data, images)
    stats = []
    for rel in files:
        try:
            st = (root / rel).stat()
            stats.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            continue
    key = hashlib.sha256(json.dumps({
        "model": info.model_id, "onnx": onnx_metadata(info), "calibration": stats, "mode": "static-qdq-u8s8-per-channel-minmax",
        "onnxruntime": onnxruntime.__version__, "opset": DEFAULT_OPSET}, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir() / "onnx" / (re.sub(r"[^A-Za-z0-9._-]", "_", info.model_id) + f".int8-{key}.onnx")
    if out.is_file():
        return out
    xs = []
    for rel, *_ in stats:
        try:
            xs.append(info.preprocess(read_image(root / rel).pixels).numpy())
        except ImageReadError:
            continue
    if not xs:
        raise InferenceError(f"{root}: none of the calibration images could be read")
    x = np.stack(xs).astype(np.float32)
    log.info("quantising %s to int8 (%d calibration images) into %s", run, len(x), out)
    return quantize_onnx(ensure_onnx(run), out, "static", [x[i : i + 8] for i in range(0, len(x), 8)])
