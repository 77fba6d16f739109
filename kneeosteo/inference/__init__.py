"""Using a trained model: batch prediction (PyTorch or ONNX Runtime), Grad-CAM and attention
explanations, ONNX export, and the bundled default model."""

from kneeosteo.inference.bundled import bundled_run_dir, has_bundled_model
from kneeosteo.inference.explain import Explainer, Explanation
from kneeosteo.inference.export import OnnxModel, export_onnx
from kneeosteo.inference.inputs import collect_inputs
from kneeosteo.inference.predictor import COLUMNS, ENGINES, Prediction, PredictionResult, Predictor
from kneeosteo.inference.runinfo import InferenceError, ModelInfo, resolve_run, run_info

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
    "bundled_run_dir",
    "collect_inputs",
    "export_onnx",
    "has_bundled_model",
    "resolve_run",
    "run_info",
]
