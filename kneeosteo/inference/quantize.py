"""int8 versions of an ONNX export, for throughput only (lossy: see ``predictor.py``).

Static int8 (QDQ, per-channel weights) calibrated on a run's own training images, made on demand
and kept in the cache under a key that names the weights, the calibration files, the quantiser
settings and version; or dynamic int8 (no calibration).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kneeosteo.errors import DataError, ImageReadError, InferenceError
from kneeosteo.inference.export import _P, DEFAULT_OPSET, cached_onnx_path, ensure_onnx, is_sealed, onnx_metadata, seal
from kneeosteo.run import RunDir
from kneeosteo.utils.atomic import write_bytes

__all__ = ["CALIBRATION_IMAGES", "QUANT_MODES", "ensure_int8_onnx", "quantize_onnx"]

log = logging.getLogger(__name__)
QUANT_MODES = ("dynamic", "static")


class _ArrayReader:
    """onnxruntime.quantization CalibrationDataReader over a list of (B, 3, S, S) float32 arrays."""

    def __init__(self, input_name: str, batches):
        self._it = iter([{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - only some calibrators call it
        pass


def quantize_onnx(
    src: str | os.PathLike, out: str | os.PathLike, mode: str = "static", calibration=None, per_channel: bool = True
) -> Path:
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
            quantize_static(
                str(model_in),
                str(tmp),
                _ArrayReader(name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
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


def _calibration_items(run: RunDir, data: str | os.PathLike | None, n: int) -> tuple[Path, list[str]]:
    """Up to ``n`` training-split files of ``run`` (evenly spaced in split order, both classes)."""
    from kneeosteo.data.split import load_split

    tried = [data] if data else [run.config.record.get("data"), os.environ.get("KNEEOSTEO_DATA")]
    tried = [str(t) for t in tried if t]
    root = next((t for t in tried if Path(t).is_dir()), None)
    split = run.split_file
    if root is None or not split.is_file():
        root = " or ".join(tried) or None
        raise InferenceError(
            f"--engine onnxruntime-int8 calibrates on the run's training images, but the data folder "
            f"({root or 'not recorded'}) or {split} is not there; set KNEEOSTEO_DATA to the data folder, "
            f"or use --engine onnxruntime (fp32)"
        )
    try:
        train = load_split(split, root).train
    except DataError as exc:
        raise InferenceError(str(exc)) from exc
    if not train:
        raise InferenceError(f"{split}: no training images to calibrate the int8 model on")
    step = max(1, len(train) // n)
    return Path(root), train[::step][:n]


def ensure_int8_onnx(
    run: str | os.PathLike | RunDir | None, data: str | os.PathLike | None = None, images: int = CALIBRATION_IMAGES
) -> Path:
    """Static int8 version of the run's ONNX export, calibrated on up to ``images`` of its training
    images (data folder: ``data``, else the one recorded in config.json, else $KNEEOSTEO_DATA),
    kept in the cache under a key naming the weights, the calibration files (size, mtime) and the
    quantiser settings and version, so a change of any of them makes a new one."""
    import onnxruntime

    from kneeosteo.data.reader import read_image

    run = RunDir.open(run)
    info = run.info
    root, files = _calibration_items(run, data, images)
    stats = []
    for rel in files:
        try:
            st = (root / rel).stat()
            stats.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            continue
    key = hashlib.sha256(
        json.dumps(
            {
                "model": info.model_id,
                "onnx": onnx_metadata(info),
                "calibration": stats,
                "mode": "static-qdq-u8s8-per-channel-minmax",
                "onnxruntime": onnxruntime.__version__,
                "opset": DEFAULT_OPSET,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    out = cached_onnx_path(info, f".int8-{key}.onnx")
    if is_sealed(out):  # the file we wrote, unchanged since
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
    quantize_onnx(ensure_onnx(run), out, "static", [x[i : i + 8] for i in range(0, len(x), 8)])
    seal(out)
    return out
