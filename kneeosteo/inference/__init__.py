"""Using a trained model: batch prediction (PyTorch or ONNX Runtime), Grad-CAM and attention
explanations, ONNX export (and its int8 versions). Models come from run folders
(:class:`kneeosteo.run.RunDir`; ``None`` means the bundled default model)."""

from kneeosteo.errors import InferenceError
from kneeosteo.inference.explain import Explainer, Explanation
from kneeosteo.inference.export import OnnxModel, export_onnx
from kneeosteo.inference.inputs import collect_inputs
from kneeosteo.inference.predictor import COLUMNS, ENGINES, Prediction, PredictionResult, Predictor
from kneeosteo.run import ModelInfo, RunDir

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
