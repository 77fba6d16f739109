"""Using a trained model: batch prediction (PyTorch or ONNX Runtime), Grad-CAM and attention
explanations, ONNX export (and its int8 versions). Models come from run folders
(:class:`kneeosteo.run.RunDir`; ``None`` means the bundled default model).

The names below are loaded on first use (PEP 562), so ``from kneeosteo.inference import
Predictor`` does not bring in torch with the explainer and the exporter: prediction with ONNX
Runtime runs without it (issue 29)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kneeosteo.utils.lazy import lazy_names

if TYPE_CHECKING:
    from kneeosteo.errors import InferenceError
    from kneeosteo.inference.explain import Explainer, Explanation
    from kneeosteo.inference.export import OnnxModel, export_onnx
    from kneeosteo.inference.inputs import collect_inputs
    from kneeosteo.inference.predictor import COLUMNS, ENGINES, Prediction, PredictionResult, Predictor
    from kneeosteo.run import ModelInfo, RunDir

_WHERE = {
    "COLUMNS": "kneeosteo.inference.predictor",
    "ENGINES": "kneeosteo.inference.predictor",
    "Explainer": "kneeosteo.inference.explain",
    "Explanation": "kneeosteo.inference.explain",
    "InferenceError": "kneeosteo.errors",
    "ModelInfo": "kneeosteo.run",
    "OnnxModel": "kneeosteo.inference.export",
    "Prediction": "kneeosteo.inference.predictor",
    "PredictionResult": "kneeosteo.inference.predictor",
    "Predictor": "kneeosteo.inference.predictor",
    "RunDir": "kneeosteo.run",
    "collect_inputs": "kneeosteo.inference.inputs",
    "export_onnx": "kneeosteo.inference.export",
}

__all__ = [
    "COLUMNS",
    "ENGINES",
    "Explainer",
    "Explanation",
    "InferenceError",
    "ModelInfo",
    "OnnxModel",
    "Prediction",
    "PredictionResult",
    "Predictor",
    "RunDir",
    "collect_inputs",
    "export_onnx",
]


__getattr__, __dir__ = lazy_names(__name__, globals(), _WHERE)
