"""P(osteoporosis) for radiograph files, from a trained run (PyTorch) or its ONNX export
(ONNX Runtime). All engines share the run's own preprocessing, so they give the same rows.

Engines (``engine=``; ``kneeosteo predict --engine``):

- ``auto`` (default): ``onnxruntime`` on the CPU, ``torch`` on CUDA. ONNX Runtime fp32 was the
  fastest engine that agrees with PyTorch fp32 (|dp| < 1e-3) on both backbones, at batch 1 and
  32 (``docs/results/benchmarks/RESULTS.md``, ``python -m benchmarks.run``).
- ``torch``: PyTorch fp32, channels-last, under ``inference_mode`` (the reference).
- ``onnxruntime``: ONNX Runtime fp32 on the model's export (``onnx=`` file or made on demand).
- ``torch-bf16`` and ``onnxruntime-int8`` (static int8, QDQ, calibrated on the run's training
  images, made on demand and cached) are *lossy*: on the bundled model they moved test-split
  probabilities by tenths and flipped labels, because that model reacts to input changes as
  small as one grey level (``docs/results/benchmarks/engine_flips_default_model.json``). They are never the default, and
  choosing one logs a warning.

Images are read and preprocessed in a few threads (decoders release the GIL) and run through
the network in batches; unreadable files are collected, not fatal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kneeosteo.data.knee import KneeSearch
from kneeosteo.data.reader import ImageReadError, LoadedImage, read_image
from kneeosteo.data.who import who_band
from kneeosteo.errors import ConfigError, InferenceError
from kneeosteo.inference.inputs import collect_inputs
from kneeosteo.inference.knees import film_verdict, no_knee_verdict
from kneeosteo.run import ModelInfo, RunDir
from kneeosteo.tasks import Binary, task_for
from kneeosteo.trust import TrustedPrediction, pixel_problems, untrusted_prediction
from kneeosteo.utils.progress import progress_bar

if TYPE_CHECKING:  # torch is imported by the torch engines only: ONNX Runtime predicts without it
    import torch

__all__ = [
    "COLUMNS",
    "CPU_DEFAULT_ENGINE",
    "ENGINES",
    "LOSSY_ENGINES",
    "Prediction",
    "PredictionResult",
    "Predictor",
    "resolve_engine",
]

# issue 15's fields, then the threshold and model; a run without trust files: calibrated false
COLUMNS = (
    "path",
    "content_id",
    "status",
    "probability",
    "raw_probability",
    "label",
    "prediction_set",
    "domain_score",
    "domain_threshold",
    "calibrated",
    "threshold",
    "model",
    # a multiclass run's class probabilities; a regression's value and conformal interval (else empty)
    "probabilities",
    "value",
    "interval_low",
    "interval_high",
    # a knee run (preset 'knee', issue 32): each knee's region and answer; why none was found
    "knees",
    "knee_reason",
    # why the status is what it is (issue 33): last, so the columns before it keep their places
    "status_reason",
    # a run with a fused model (issue 31, `evaluate --store-fused`): its answer from the image and the
    # covariates, and what each answer rests on (image_only | image_and_covariates)
    "fused_probability",
    "answer_basis",
)
ENGINES = ("auto", "torch", "torch-bf16", "onnxruntime", "onnxruntime-int8")
CPU_DEFAULT_ENGINE = "onnxruntime"  # the numbers behind it: docs/results/benchmarks/RESULTS.md
LOSSY_ENGINES = ("torch-bf16", "onnxruntime-int8")
log = logging.getLogger(__name__)


def resolve_engine(engine: str, device: str = "cpu", onnx=None) -> str:
    """The concrete engine ``auto`` stands for: onnxruntime on the CPU (or when an .onnx file is
    given), torch elsewhere (ONNX Runtime here runs on the CPU only)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if engine != "auto":
        return engine
    if onnx is not None:
        return "onnxruntime"
    return CPU_DEFAULT_ENGINE if device == "cpu" else "torch"


@dataclass(frozen=True)
class Prediction:
    path: str
    content_id: str
    status: str  # ok | uncertain | out_of_domain
    probability: float  # calibrated P(positive class) (the raw one when not calibrated)
    raw_probability: float
    label: str  # empty when out_of_domain
    prediction_set: tuple[str, ...]
    domain_score: float | None  # None: the run has no domain check
    domain_threshold: float | None
    calibrated: bool
    threshold: float
    model: str
    probabilities: dict[str, float] | None = None  # multiclass: P(class) per class, calibrated
    value: float | None = None  # regression: the predicted T-score or BMD
    interval_low: float | None = None  # its split-conformal interval
    interval_high: float | None = None
    knees: tuple[dict, ...] | None = None  # a knee run: per knee, left to right (kneeosteo.inference.knees)
    knee_reason: str = ""  # a knee run's film with no knee found: why
    status_reason: str = ""  # which domain check failed; both classes in the set; no signal; batch shift
    fused_probability: float | None = None  # the run's fused model (image + covariates), when given them all
    answer_basis: str = "image_only"  # image_only | image_and_covariates: never a filled-in covariate

    def as_row(self) -> dict:
        row = asdict(self)
        row["prediction_set"] = list(self.prediction_set)
        row["knees"] = None if self.knees is None else [dict(k) for k in self.knees]
        return row


@dataclass
class PredictionResult:
    predictions: list[Prediction] = field(default_factory=list)
    errors: list[ImageReadError] = field(default_factory=list)  # .path, .reason
    batch_shift: dict | None = None  # the batch shift alarm's record (kneeosteo.inference.batch), once assessed


class Predictor:
    """Load a model once, then predict many files.

    ``engine="torch"``: the run's checkpoint (``run=None``: the bundled default model), fp32,
    channels-last, under ``inference_mode``; ``"torch-bf16"`` adds bf16 autocast.
    ``engine="onnxruntime"``: the network runs in ONNX Runtime from ``onnx`` (an exported file,
    whose metadata carries preprocessing, threshold and classes, so no run folder is needed) or,
    without it, from the run's export, made on demand and kept in the cache;
    ``"onnxruntime-int8"`` likewise with the static int8 version (``onnx`` must then be an int8
    file). ``"auto"`` (default) picks one of them, see :func:`resolve_engine`; ``self.engine`` is
    the engine used. Preprocessing gives the same values as training's in every engine (bit for
    bit): the torch engines run training's own code, ONNX Runtime its NumPy form
    (:meth:`Preprocess.array`), so ``predict`` with it never imports torch.
    """

    def __init__(
        self,
        run: str | os.PathLike | None = None,
        *,
        engine: str = "auto",
        onnx: str | os.PathLike | None = None,
        threshold: float | None = None,
        batch_size: int = 16,
        device: str = "cpu",
    ):
        # one RunDir: its config (the weights' sha256 checked) is read once, not once per question
        opened = RunDir.open(run) if (run is not None or onnx is None) else None
        if onnx is None and not task_for(opened.config).supports_onnx_export:
            if engine not in ("auto", "torch"):  # the ONNX export and int8 cover the paper's binary model
                raise ConfigError(
                    f"--engine {engine}: a {opened.config.task} run predicts with "
                    "--engine torch (ONNX export covers binary models only)"
                )
            engine = "torch"
        engine = resolve_engine(engine, device, onnx)
        if engine in LOSSY_ENGINES:
            log.warning(
                "--engine %s is lossy: probabilities can differ from fp32 by tenths on a sensitive model "
                "(docs/results/benchmarks/RESULTS.md); use it for throughput, not for reported results",
                engine,
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must lie in [0, 1], got {threshold}")
        self.engine, self.batch_size, self.device = engine, batch_size, device
        self._model = self._session = None
        self._autocast = None
        self.run: RunDir | None
        if engine.startswith("torch"):
            import torch

            self._autocast = torch.bfloat16 if engine == "torch-bf16" else None
            self.run = opened if opened is not None else RunDir.open(run)
            info = self.run.info
            self._model = self.run.load_model(device).to(memory_format=torch.channels_last)
        else:
            from kneeosteo.inference.export import OnnxModel, ensure_onnx
            from kneeosteo.inference.quantize import ensure_int8_onnx

            int8 = engine == "onnxruntime-int8"
            self.run = opened
            if onnx is None:
                onnx = ensure_int8_onnx(self.run) if int8 else ensure_onnx(self.run)
            self._session = OnnxModel(onnx)
            if int8 and "kneeosteo.quantization" not in self._session.session.get_modelmeta().custom_metadata_map:
                raise InferenceError(
                    f"{onnx}: not an int8 model (no kneeosteo.quantization metadata); use --engine onnxruntime for it"
                )
            info = self._session.info
            if self.run is not None and (
                self.run.model_id != info.model_id or self.run.config.weights_sha256 != info.weights_sha256
            ):
                raise InferenceError(f"{onnx}: exported from model {info.model_id}, not from {self.run.path}")
        self.info: ModelInfo = info if threshold is None else replace(info, threshold=float(threshold))
        self.task = Binary() if self.run is None else task_for(self.run.config)
        # a task answered at an operating threshold applies the run's bundle here; the others' trust: task_verdicts
        self.trust = self.run.trust if self.run is not None and self.task.has_operating_point else None
        if self.trust is not None:  # the operating threshold is on the calibrated probability
            if threshold is None:
                self.info = replace(self.info, threshold=self.trust.threshold)
            else:
                self.trust = replace(self.trust, threshold=float(threshold))
        from kneeosteo.models.fused import load_fused

        # the run's fused model (image + covariates), checked against its weights; None for most runs
        self.fused = (
            load_fused(
                self.run.path, self.run.config.weights_sha256, (self.run.config.record.get("fused") or {}).get("sha256")
            )
            if self.run is not None and self.task.supports_clinical_baselines
            else None
        )
        if (
            self.trust is not None
            and self.trust.domain is not None
            and self._session is not None
            and "features" not in self._session.output_names
        ):
            raise InferenceError(
                f"{onnx}: an export without the features output, which this run's domain check "
                "needs; export it again with this version (`kneeosteo export`)"
            )

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def forward(self, images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normalised (B, 3, S, S) inputs -> (P(positive), logits, backbone features or None), float64."""
        feats = None
        if self._session is not None:
            outs = self._session.outputs(np.asarray(images, dtype=np.float32))
            p = outs[0].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):  # an export older than the logit output
                z = outs[1].astype(np.float64) if len(outs) > 1 else np.log(p) - np.log1p(-p)
            feats = outs[2].astype(np.float64) if len(outs) > 2 else None
        else:
            import torch

            x = (
                torch.as_tensor(images, dtype=torch.float32)
                .to(self.device)
                .contiguous(memory_format=torch.channels_last)
            )
            with (
                torch.inference_mode(),
                torch.autocast(
                    torch.device(self.device).type,
                    dtype=self._autocast or torch.float32,
                    enabled=self._autocast is not None,
                ),
            ):
                logits, f = self._model.logit_and_features(x)
                feats = None if f is None else f.float().double().cpu().numpy()
                z = logits.float().double().cpu().numpy()
                p = self.task.answer_of(logits).double().cpu().numpy()
        if not np.isfinite(p).all():  # never a label: a NaN is "normal" at any threshold
            raise InferenceError(
                f"model {self.model_id} gave a non-finite probability; its weights or preprocessing are broken"
            )
        return p, z, feats

    def probabilities(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Normalised (B, 3, S, S) inputs -> raw P(positive) as float64 (B,)."""
        return self.forward(images)[0]

    def assess(
        self, images, pixels: Sequence[np.ndarray | None], pixel_reasons: Sequence[list[str]] | None = None
    ) -> list[TrustedPrediction]:
        """Normalised inputs and each image's canonical pixels -> one TrustedPrediction each:
        calibrated, thresholded, with its conformal set and domain verdict (a run without trust
        files: the raw probability at the run's threshold, ``calibrated`` False). Where the pixels
        were checked elsewhere (``predict --ray``'s read tasks), ``pixel_reasons`` replaces them."""
        p, z, feats = self.forward(images)
        if not self.task.has_operating_point:
            return task_verdicts(self.run, z, feats, pixels, pixel_reasons)
        if self.trust is None:
            return [untrusted_prediction(zi, self.threshold, (self.info.negative, self.info.positive)) for zi in z]
        mirrored = None
        if self.trust.needs_mirror and feats is not None:  # an older run's orientation check: one more pass, mirrored
            mirrored = self.forward(_upside_down(images))[2]
        return [
            self.trust.predict(
                z[i],
                None if feats is None else feats[i],
                pixels[i],
                None if pixel_reasons is None else pixel_reasons[i],
                None if mirrored is None else mirrored[i],
            )
            for i in range(len(z))
        ]

    @property
    def pixel_limits(self):
        """The pixel check's limits (:class:`kneeosteo.trust.domain.PixelLimits`), None without trust files."""
        return None if self.trust is None else self.trust.pixel_limits

    def predict_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Canonical greyscale images (H, W) in [0, 1] -> raw P(positive), batched. A knee run:
        each film's is the mean of its knees' (as :func:`~kneeosteo.inference.knees.film_verdict`
        aggregates them), NaN for a film on which no knee is found (``predict_trusted`` says why)."""
        if self.knee_run:
            views = [self.inputs(p)[1] for p in pixels]
            flat = [x for v in views for x in v]
            batches = [flat[i : i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
            probs = iter(np.concatenate([self.probabilities(self._stack(b)) for b in batches]) if flat else [])
            return np.array([np.mean([next(probs) for _ in v]) if v else np.nan for v in views], dtype=np.float64)
        out = [
            self.probabilities(self._stack([self.inputs(p) for p in pixels[i : i + self.batch_size]]))
            for i in range(0, len(pixels), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros(0)

    @property
    def knee_run(self) -> bool:
        """A run trained on knee regions: every film is scored knee by knee (issue 32)."""
        return self.info.preprocess.preset == "knee"

    def inputs(self, pixels: np.ndarray):
        """One film's network input, preprocessed as the engine takes it: a torch tensor for the
        torch engines, a NumPy array (no torch imported, the same values) for ONNX Runtime; a knee
        run: ``(KneeSearch, [one input per knee])``."""
        prep = self.info.preprocess
        if self._session is None:
            return prep.knee_views(pixels) if self.knee_run else prep(pixels)
        return prep.knee_views_array(pixels) if self.knee_run else prep.array(pixels)

    def _stack(self, inputs: Sequence):
        """Single inputs -> one (B, 3, S, S) batch of the engine's array type."""
        if self._session is not None:
            return np.stack(inputs)
        import torch

        return torch.stack(list(inputs))

    def assess_films(
        self, views: Sequence[tuple[KneeSearch, list]], pixels: Sequence[np.ndarray]
    ) -> list[TrustedPrediction]:
        """A knee run: each film's knees (``Preprocess.knee_views``) scored in one batch, then each
        film's answer aggregated from its knees' (:func:`kneeosteo.inference.knees.film_verdict`);
        a film with no knee is ``out_of_domain`` with the reason."""
        inputs = [x for _, xs in views for x in xs]
        film_px = [px for (_, xs), px in zip(views, pixels) for _ in xs]
        reasons = None
        limits = self.pixel_limits
        if limits is not None and limits.film_checks:
            # the film checks see the whole film: bone regions side by side are the knees this run
            # scores one by one (as many as were found), not a second film pasted beside the first
            reasons = [
                pixel_problems(px, limits=replace(limits, max_bone_columns=max(limits.max_bone_columns, len(xs))))
                for (_, xs), px in zip(views, pixels)
                for _ in xs
            ]
        answers = iter(self.assess(self._stack(inputs), film_px, reasons) if inputs else [])
        classes = (
            (self.info.negative, self.info.positive) if self.task.has_threshold else tuple(self.run.config.classes)
        )
        out = []
        for search, xs in views:
            if not xs:
                out.append(no_knee_verdict(search, calibrated=self.trust is not None))
            else:
                out.append(film_verdict(search, [next(answers) for _ in xs], classes, self.threshold))
        return out

    def predict_trusted(self, pixels: Sequence[np.ndarray]) -> list[TrustedPrediction]:
        """Canonical greyscale images (H, W) in [0, 1] -> TrustedPrediction each, batched."""
        out: list[TrustedPrediction] = []
        for i in range(0, len(pixels), self.batch_size):
            chunk = pixels[i : i + self.batch_size]
            if self.knee_run:
                out.extend(self.assess_films([self.inputs(p) for p in chunk], chunk))
            else:
                out.extend(self.assess(self._stack([self.inputs(p) for p in chunk]), chunk))
        return out

    def predict(self, inputs: Iterable[str | os.PathLike], progress: bool = True) -> PredictionResult:
        """Files and folders (recursed) -> one Prediction per readable image, errors for the rest."""
        files, errors = collect_inputs(inputs)
        result = PredictionResult(errors=errors)

        def load(path: Path):
            try:
                img = read_image(path)
                _ = img.content_id  # hash in the worker thread too (cached on the image)
                return img, self.inputs(img.pixels)
            except ImageReadError as exc:
                return exc, None

        batches = range(0, len(files), self.batch_size)
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            for start in progress_bar(batches, "predict", total=len(batches), unit="batch") if progress else batches:
                chunk = files[start : start + self.batch_size]
                loaded = list(pool.map(load, chunk))
                good = [(p, img, x) for p, (img, x) in zip(chunk, loaded) if isinstance(img, LoadedImage)]
                result.errors.extend(img for img, _ in loaded if isinstance(img, ImageReadError))
                if not good:
                    continue
                film_px = [img.pixels for _, img, _ in good]
                verdicts = (
                    self.assess_films([x for _, _, x in good], film_px)
                    if self.knee_run
                    else self.assess(self._stack([x for _, _, x in good]), film_px)
                )
                result.predictions.extend(self.row(p, img.content_id, t) for (p, img, _), t in zip(good, verdicts))
        return result

    def row(self, path: Path | str, content_id: str, t: TrustedPrediction) -> Prediction:
        """The output row of one image's verdict."""
        d = t.to_dict()
        lo, hi = t.interval if t.interval else (None, None)
        return Prediction(
            str(path),
            content_id,
            t.status,
            t.probability,
            t.raw_probability,
            t.label,
            t.prediction_set,
            d["domain_score"],
            d["domain_threshold"],
            t.calibrated,
            self.threshold,
            self.model_id,
            dict(t.probabilities) or None,
            d.get("value"),
            lo,
            hi,
            tuple(d["knees"]) if "knees" in d else None,
            t.knee_reason,
            t.status_reason,
        )


def _upside_down(images):
    """The batch flipped top to bottom (the orientation check's second pass), in its own array type."""
    if isinstance(images, np.ndarray):
        return np.ascontiguousarray(images[..., ::-1, :])
    import torch

    return torch.flip(torch.as_tensor(images), dims=[-2])


def task_verdicts(
    run: RunDir,
    outputs: np.ndarray,
    features: np.ndarray | None = None,
    pixels: Sequence[np.ndarray | None] | None = None,
    pixel_reasons: Sequence[list[str]] | None = None,
) -> list[TrustedPrediction]:
    """A multiclass or regression run's answers as TrustedPredictions: the top class with every
    class's calibrated probability and the conformal set (``uncertain`` when it is not one
    class), or the value with its conformal interval (the label: its WHO band for a T-score).
    The run's domain check (``RunDir.domain``; pixel checks alone without one) makes an image
    ``out_of_domain``: no label, no set, the numbers still shown, as for a binary run."""
    # here, not at the top: it brings scikit-learn, matplotlib and torchvision, which a binary run never needs
    from kneeosteo.evaluation.task_scoring import task_answers

    cfg = run.config
    a = task_answers(run, outputs)
    check = run.domain
    n = len(outputs)
    verdicts = []
    for i in range(n):
        px = None if pixels is None else pixels[i]
        reasons = None if pixel_reasons is None else pixel_reasons[i]
        if check is None or features is None:
            why = list(reasons) if reasons is not None else ([] if px is None else pixel_problems(px))
            verdicts.append((float("nan"), float("nan"), not why, "; ".join(why)))
        else:
            v = check.assess(np.asarray(features[i], dtype=np.float64)[None, :], px, pixel_reasons=reasons)
            verdicts.append((v.score, v.threshold, v.ok, "; ".join(v.reasons)))
    return _VERDICTS[task_for(cfg).scoring](cfg, a, verdicts)


def _class_verdicts(cfg, a: dict, verdicts: list[tuple]) -> list[TrustedPrediction]:
    """The top class, every class's probability and the conformal set (multiclass)."""
    out = []
    for i, q in enumerate(a["probabilities"]):
        score, thr, ok, why = verdicts[i]
        k = int(np.argmax(q))
        pset = () if a["sets"] is None else tuple(c for c, inside in zip(cfg.classes, a["sets"][i]) if inside)
        status = (
            "out_of_domain" if not ok else ("ok" if a["sets"] is None or pset == (cfg.classes[k],) else "uncertain")
        )
        reason = (
            (why or "out of domain")
            if not ok
            else (
                "in domain; no prediction sets (uncalibrated run)"
                if a["sets"] is None
                else "in domain; one class in the prediction set"
                if pset == (cfg.classes[k],)
                else "the most probable class is not the one class in the prediction set"
                if len(pset) == 1
                else f"{len(pset)} classes in the prediction set"
            )
        )
        out.append(
            TrustedPrediction(
                status,
                float(q[k]),
                float(q[k]),
                cfg.classes[k] if ok else "",
                pset if ok else (),
                score,
                thr,
                a["calibrated"],
                tuple((c, float(v)) for c, v in zip(cfg.classes, q)),
                status_reason=reason,
            )
        )
    return out


def _value_verdicts(cfg, a: dict, verdicts: list[tuple]) -> list[TrustedPrediction]:
    """The value with its conformal interval; a T-score's label is its WHO band (regression)."""
    out = []
    for i, v in enumerate(a["values"]):
        score, thr, ok, why = verdicts[i]
        label = who_band(float(v)) if (cfg.target == "t_score" and ok) else ""
        interval = () if a["interval"] is None else (float(a["interval"][0][i]), float(a["interval"][1][i]))
        out.append(
            TrustedPrediction(
                "ok" if ok else "out_of_domain",
                float("nan"),
                float("nan"),
                label,
                (),
                score,
                thr,
                a["interval"] is not None,
                (),
                float(v),
                interval,
                status_reason="in domain" if ok else (why or "out of domain"),
            )
        )
    return out


# a task run's answers as TrustedPredictions, for each kind of answer (Task.scoring) but the binary
# one (the trust bundle's, Predictor.assess)
_VERDICTS = {"classes": _class_verdicts, "value": _value_verdicts}
