"""Where the model looks: Grad-CAM on the backbone's last feature map and the attention
module's spatial map, both brought back onto the original radiograph's pixel grid.

Grad-CAM explains the osteoporosis (positive) logit by default, whatever the prediction: one
fixed question makes maps of different images comparable. ``target="negative"`` or
``"predicted"`` explain another class; for the negative class the single logit's sign is flipped
(``BinaryClassifierOutputTarget(0)``), because a binary model with one logit has no separate
"normal" output. An all-zero Grad-CAM map is a valid answer: nothing in the last feature map
speaks for the target class (its raw maximum in the JSON is then 0). The frozen backbone needs no parameter gradients: the input is made to require
grad, so autograd records the backbone and Grad-CAM gets d(logit)/d(activations); the loaded
model is not modified (its parameter .grad fields are cleared again afterwards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kneeosteo.data.knee import Knee
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.inference.knees import film_verdict, no_knee_verdict
from kneeosteo.inference.predictor import task_verdicts
from kneeosteo.models import get_backbone_spec
from kneeosteo.run import ModelInfo, RunDir
from kneeosteo.tasks import task_for
from kneeosteo.trust import TrustBundle, TrustedPrediction, untrusted_prediction

__all__ = ["Explainer", "Explanation", "gradcam_layer", "map_stats", "to_image_shape", "to_knee_region"]

TARGETS = ("positive", "negative", "predicted")


def gradcam_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the feature map Grad-CAM should use for this HybridModel."""
    if model.backbone is None:  # AM-only ablation: the AM's conv stack, before its attention
        return "attention.features", model.attention.features
    name = get_backbone_spec(model.backbone_name).gradcam_layer  # the registry entry says which
    if name is not None:
        return "backbone." + name, model.backbone.get_submodule(name)
    convs = [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{model.backbone_name}: no Conv2d layer for Grad-CAM")
    return "backbone." + convs[-1][0], convs[-1][1]


def to_image_shape(m: np.ndarray, shape: tuple[int, int], prep: Preprocess) -> np.ndarray:
    """A map over the network input (any resolution) -> (H, W) over the original image, undoing
    the preprocessing geometry: 'paper' stretched, so stretch back; 'robust' letterboxed, so crop
    the padding away first (``Preprocess.content_box``, the arithmetic ``geometry`` uses)."""
    s = prep.size
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)
    h, w = shape
    top, left, nh, nw = prep.content_box(h, w)  # the whole square for 'paper'
    t = t[..., top : top + nh, left : left + nw]
    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return np.clip(np.nan_to_num(t[0, 0].numpy()), 0.0, 1.0)


def to_knee_region(m: np.ndarray, shape: tuple[int, int], knee: Knee) -> np.ndarray:
    """A map over a knee run's input (the knee's square region, any resolution) -> (H, W) over
    the whole film: the map resampled onto the region's box (``Knee.box``), zero outside it and
    where the box reaches past the film."""
    h, w = shape
    top, left, side = knee.box()
    src = np.ascontiguousarray(m, dtype=np.float32)
    f = src.shape[0] / side  # map cells per film pixel
    # film pixel (x, y) -> map (x', y') = ((x + 0.5) - left) * f - 0.5, pixel centres aligned
    mat = np.array([[f, 0, (0.5 - left) * f - 0.5], [0, f, (0.5 - top) * f - 0.5]], dtype=np.float64)
    out = cv2.warpAffine(
        src, mat, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5  # pixel centres inside the box keep the map
    inside = ((ys >= top) & (ys < top + side))[:, None] & ((xs >= left) & (xs < left + side))[None, :]
    return np.where(inside, np.clip(np.nan_to_num(out), 0.0, 1.0), np.float32(0))


def map_stats(m: np.ndarray) -> dict:
    """min/max/mean/std of a map and where its maximum is: ``[row, column]``, or for a knee run's
    raw maps (one per knee, stacked) ``[knee, row, column]``."""
    return {
        "shape": list(m.shape),
        "min": float(m.min()),
        "max": float(m.max()),
        "mean": float(m.mean()),
        "std": float(m.std()),
        "argmax": [int(i) for i in np.unravel_index(int(np.argmax(m)), m.shape)],
    }


@dataclass
class Explanation:
    probability: float  # calibrated P(positive) (the raw one for a run without trust files)
    positive: str
    label: str  # empty when the image is out of domain
    target: str  # the class Grad-CAM explains
    layer: str  # Grad-CAM's layer
    gradcam: np.ndarray  # (H, W) in [0, 1], normalised per image (grad-cam's convention)
    attention: np.ndarray | None  # (H, W) in [0, 1], the AM's sigmoid weights (None: no AM)
    gradcam_raw: np.ndarray  # ReLU(sum_k w_k A_k) on the feature-map grid, before normalising
    attention_raw: np.ndarray | None  # the AM's spatial map on its own grid
    trust: TrustedPrediction | None = None  # status, prediction set, domain score (issue 15)

    def stats(self) -> dict:
        """JSON-able: the prediction's fields (status, probability, raw_probability, label,
        prediction_set, domain_score, domain_threshold, calibrated), and min/max/mean/std/argmax
        of each map (raw and on the image)."""
        out = {
            **({} if self.trust is None else self.trust.to_dict()),
            "probability": self.probability,
            "positive_class": self.positive,
            "label": self.label,
            "gradcam_target": self.target,
            "gradcam_layer": self.layer,
            "gradcam": {"raw": map_stats(self.gradcam_raw), "image": map_stats(self.gradcam)},
            "attention": None,
        }
        if self.attention is not None:
            out["attention"] = {"raw": map_stats(self.attention_raw), "image": map_stats(self.attention)}
        return out


class _LogitNet(nn.Module):
    """(B, 1) logits, the shape grad-cam's targets expect; the input requires grad (see module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not images.requires_grad:
            images = images.detach().requires_grad_(True)
        out = self.model(images=images).float()
        return out if out.dim() == 2 else out.unsqueeze(1)  # a multiclass model's (B, K) logits stay as they are


class Explainer:
    """Grad-CAM + attention maps for single images with a trained run (PyTorch only)."""

    def __init__(
        self,
        run: str | os.PathLike | None = None,
        *,
        target: str = "positive",
        threshold: float | None = None,
        device: str = "cpu",
    ):
        run = RunDir.open(run)
        self._run = None if task_for(run.config).has_threshold else run  # other answers need the run's record
        self._setup(
            run.load_model(device), run.info, target, threshold, device, run.trust if self._run is None else None
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        info: ModelInfo,
        *,
        target: str = "positive",
        threshold: float | None = None,
        device: str = "cpu",
        trust: TrustBundle | None = None,
    ) -> Explainer:
        self = cls.__new__(cls)
        self._run = None
        self._setup(model.eval(), info, target, threshold, device, trust)
        return self

    def _setup(self, model, info, target, threshold, device, trust=None):
        if target not in TARGETS:
            raise ValueError(f"unknown Grad-CAM target {target!r} (choose from {TARGETS})")
        self.model, self.info, self.target, self.device = model, info, target, device
        if threshold is None:  # a run with trust files: its operating threshold, on the calibrated probability
            self.threshold = info.threshold if trust is None else trust.threshold
        else:
            self.threshold = float(threshold)
        self.trust = trust if (trust is None or threshold is None) else replace(trust, threshold=self.threshold)
        self.layer_name, self.layer = gradcam_layer(model)

    def verdict(self, pixels: np.ndarray) -> TrustedPrediction:
        """The prediction's fields for one image (what ``predict`` gives for it); a knee run's film:
        each knee's, aggregated (:mod:`kneeosteo.inference.knees`)."""
        if self.info.preprocess.preset == "knee":
            return self._knees(pixels)[2]
        return self._verdict_of(self.info.preprocess(pixels)[None], pixels)

    def _knees(self, pixels: np.ndarray):
        """A knee run: (the knee search, each knee's input, the film's verdict)."""
        search, inputs = self.info.preprocess.knee_views(pixels)
        if not inputs:
            return search, inputs, no_knee_verdict(search, calibrated=self.trust is not None or self._run is not None)
        per_knee = [self._verdict_of(x[None], pixels) for x in inputs]
        classes = tuple(self._run.config.classes) if self._run is not None else (self.info.negative, self.info.positive)
        return search, inputs, film_verdict(search, per_knee, classes, self.threshold)

    def _verdict_of(self, x: torch.Tensor, pixels: np.ndarray) -> TrustedPrediction:
        x = x.to(self.device)
        if self._run is not None:
            with torch.no_grad():
                out, feats = self.model.logit_and_features(x)
            feats = None if feats is None else feats.float().double().cpu().numpy()
            return task_verdicts(self._run, out.float().double().cpu().numpy(), feats, [pixels])[0]
        with torch.no_grad():
            z, feats = self.model.logit_and_features(x)
            mirrored = None
            if self.trust is not None and self.trust.needs_mirror and feats is not None:
                mirrored = self.model.logit_and_features(torch.flip(x, dims=[-2]))[1][0].double().cpu().numpy()
        z = float(z.float()[0])
        if self.trust is None:
            return untrusted_prediction(z, self.threshold, (self.info.negative, self.info.positive))
        return self.trust.predict(
            z, None if feats is None else feats[0].double().cpu().numpy(), pixels, mirrored=mirrored
        )

    def explain(self, pixels: np.ndarray, target: str | None = None) -> Explanation:
        """Canonical greyscale (H, W) in [0, 1] -> maps on that (H, W) grid.

        ``target`` overrides the explainer's: positive, negative or predicted."""
        from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

        target = target or self.target
        if target not in TARGETS:
            raise ValueError(f"unknown Grad-CAM target {target!r} (choose from {TARGETS})")
        prep = self.info.preprocess
        if prep.preset == "knee":
            search, inputs, verdict = self._knees(pixels)
        else:
            search, inputs, verdict = None, [prep(pixels)], self.verdict(pixels)
        if self._run is not None:  # multiclass: the predicted class's logit; regression: the value itself
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            classes = self._run.config.classes
            probs = [p for _, p in verdict.probabilities]
            cls = task_for(self._run.config).explained_output(probs)  # the top class, in domain or not
            targets = [ClassifierOutputTarget(cls)]
            explained = classes[cls] if classes else f"{self._run.config.target} (what raises it)"
        elif target == "predicted":
            cls = int(verdict.probability >= self.threshold)
        else:
            cls = int(target == "positive")
        if self._run is None:
            targets = [BinaryClassifierOutputTarget(cls)]
            explained = self.info.positive if cls else self.info.negative
        maps = [self._gradcam(x[None].to(self.device), targets) for x in inputs]
        shape = pixels.shape
        if search is None:
            norm, raw, am_raw = maps[0]
            gradcam = to_image_shape(norm, shape, prep)
            attention = None if am_raw is None else to_image_shape(am_raw, shape, prep)
        else:
            # a knee run: each knee's map drawn at its region on the whole film (zero elsewhere);
            # the raw maps are one per knee, stacked (none found: a zero map)
            has_am = self.model.attention is not None
            gradcam = np.zeros(shape, np.float32)
            attention = np.zeros(shape, np.float32) if has_am else None
            for knee, (norm, _, am) in zip(search.knees, maps):
                np.maximum(gradcam, to_knee_region(norm, shape, knee), out=gradcam)
                if attention is not None:
                    np.maximum(attention, to_knee_region(am, shape, knee), out=attention)
            raw = np.stack([r for _, r, _ in maps]) if maps else np.zeros((1, 1), np.float32)
            am_raw = (np.stack([a for _, _, a in maps]) if maps else np.zeros((1, 1), np.float32)) if has_am else None
        return Explanation(
            verdict.probability,
            self.info.positive,
            verdict.label,
            explained,
            self.layer_name,
            gradcam,
            attention,
            raw,
            am_raw,
            verdict,
        )

    def _gradcam(self, x: torch.Tensor, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One input's (normalised Grad-CAM, raw Grad-CAM, attention map), on the network's grids."""
        from pytorch_grad_cam import GradCAM

        cam = GradCAM(model=_LogitNet(self.model), target_layers=[self.layer])
        try:
            with torch.enable_grad():
                norm = cam(input_tensor=x, targets=targets)[0]
            ag = cam.activations_and_grads
            raw = cam.get_cam_image(x, self.layer, targets, ag.activations[0].numpy(), ag.gradients[0].numpy())
            raw = np.maximum(raw[0], 0).astype(np.float32)
        finally:
            cam.activations_and_grads.release()
            self.model.zero_grad(set_to_none=True)
        am = None if self.model.attention is None else self.model.attention.last_spatial_map[0, 0].cpu().numpy()
        return norm, raw, am
