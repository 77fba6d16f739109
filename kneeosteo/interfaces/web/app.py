"""The FastAPI application: the page, the prediction and explanation endpoints, model info and a
health check. Models load once, when the app is made, so a missing model fails `serve` at
start-up, not at the first upload. Inference runs in a BoundedPool: decoding and the network
never block the event loop, and a full pool answers 503 with Retry-After."""

from __future__ import annotations

import html
import re
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from kneeosteo.data import formats
from kneeosteo.errors import ModelError
from kneeosteo.interfaces.web.overlays import encode_b64, grey_png, overlay_png
from kneeosteo.interfaces.web.pool import BoundedPool, PoolFull
from kneeosteo.interfaces.web.uploads import ACCEPT_LIST, ACCEPTED, BodyLimit, decode, display_name, save_upload

__all__ = ["DEFAULT_CAVEAT", "SERVICE_MAX_PIXELS", "WebSettings", "create_app", "card_caveat"]

DEFAULT_CAVEAT = "Research use only — not a diagnostic device."
BUSY = "the server is busy: every worker is in use and the queue is full; try again in a moment"
_CAVEAT_RE = re.compile(r"research use|not a (medical|diagnostic)|not for (clinical|diagnos)", re.I)
# the page loads nothing from anywhere else: the browser enforces what the page promises
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


# The service decodes at most this many pixels per upload (`serve --max-megapixels`), refused from
# the header before anything is decoded. The largest radiographs are ~23 MP (a 24x30 cm
# mammogram at 50 um); knee films from CR/DR panels are 3-15 MP. Decoding costs about 13 bytes a
# pixel (8-bit frame, float32 copy, clipping), so a job at 25 MP stays a fraction of the reader's
# own 100 MP limit; docs/cli.md (`serve`) gives the measured figures.
SERVICE_MAX_PIXELS = 25_000_000
# the served session's batch shift alarm looks at this many of its most recent predictions
RECENT_REQUESTS = 200
SHIFT_REFRESH = 10  # a prediction recomputes the alarm once this many requests arrived since the last time


@dataclass(frozen=True)
class WebSettings:
    run: Path | None = None  # None: the bundled default model
    threshold: float | None = None  # None: the model's
    device: str = "cpu"
    workers: int = 2  # inference threads
    queue: int = 16  # jobs that may wait for a thread; more get 503
    max_upload_bytes: int = 32 * 1000 * 1000
    max_pixels: int = SERVICE_MAX_PIXELS


# What /api/model withholds from a stranger: server paths (the run, the venv, the data and the
# run calibrated from) and the file names of the calibration films. A key's value is set to null
# (the field stays, so a client sees what is withheld); our own phrases in those keys are kept.
_WITHHELD_KEYS = frozenset(
    {
        "data",
        "out",
        "split",
        "labels",
        "path",
        "run",
        "config",
        "resume",
        "onnx",
        "calibration_set",
        "domain_set",
        "cache",
    }
)
_DROPPED_KEYS = frozenset({"content_ids", "command_line", "environment"})
_OWN_PHRASES = frozenset({"validation partition", "training partition (originals)"})


def _looks_like_path(text: str) -> bool:
    return ("/" in text or "\\" in text) and (" " not in text or text.startswith(("/", "./", "../", "~")))


def public_doc(obj, key: str = ""):
    """``obj`` (config.json, metrics, the trust summary) without anything about the server:
    values under path-like keys and path-like strings become null, file-name lists are dropped."""
    if isinstance(obj, dict):
        return {k: public_doc(v, k) for k, v in obj.items() if k not in _DROPPED_KEYS}
    if isinstance(obj, list):
        return [public_doc(v, key) for v in obj]
    if isinstance(obj, str) and ((key in _WITHHELD_KEYS and obj not in _OWN_PHRASES) or _looks_like_path(obj)):
        return None
    return obj


def card_caveat(card: str | None) -> str:
    """The model card's caveat: in its first paragraph that limits its use ('Research use only
    ...'), the bold sentence saying so, else the first such sentence; without Markdown marks.
    The project's standard caveat when the card has none."""
    card = re.sub(r"```.*?(```|$)", "", card or "", flags=re.S)  # code blocks are not prose
    for para in re.split(r"\n\s*\n", card):
        text = " ".join(line.strip().lstrip("#>-+ ") for line in para.splitlines()).strip()
        spans = [s for pair in re.findall(r"\*\*(.+?)\*\*|__(.+?)__", text) for s in pair if s]
        bold = [s for s in spans if _CAVEAT_RE.search(s)]
        sentences = bold or [t for t in re.split(r"(?<=[.!?])\s+", text) if _CAVEAT_RE.search(t)]
        if sentences:
            return re.sub(r"[*_`]", "", sentences[0]).strip()[:300]
    return DEFAULT_CAVEAT


class Prediction(BaseModel):
    filename: str = Field(description="The client's file name, echoed for display only.")
    status: str = Field(
        description="ok; uncertain (the conformal set holds both classes); out_of_domain (the "
        "image does not look like the knee radiographs the model was trained on)."
    )
    probability: float | None = Field(
        description="Calibrated P(positive class), in [0, 1] (the raw one when "
        "`calibrated` is false); a multiclass run: P(label); null for a "
        "regression run."
    )
    raw_probability: float | None = Field(description="The model's own P(positive class), before calibration.")
    label: str = Field(description="The class at the operating threshold; empty when out_of_domain.")
    prediction_set: list[str] = Field(
        description="The conformal prediction set at the run's coverage; empty when out_of_domain."
    )
    domain_score: float | None = Field(
        description="Distance of the image's backbone features from the "
        "training images; null when the run has no domain check."
    )
    domain_threshold: float | None
    calibrated: bool = Field(description="False for a run without trust files (no calibration, no domain check).")
    status_reason: str = Field(
        "",
        description="Why the status is what it is: which domain check failed; both "
        "classes in the set; no signal at the site the run was calibrated "
        "on; a batch shift among this session's recent requests.",
    )
    threshold: float
    positive_class: str
    model_id: str = Field(description="<run name>-<sha256[:12] of the weights>.")
    content_id: str = Field(description="sha256 of the decoded pixels: the same picture in any container has one id.")
    format: str
    width: int
    height: int
    probabilities: dict[str, float] | None = Field(
        None, description="A multiclass run: the calibrated probability of every class (absent otherwise)."
    )
    value: float | None = Field(None, description="A regression run: the predicted T-score or BMD (absent otherwise).")
    interval: list[float | None] | None = Field(
        None,
        description="A regression run: the split-conformal interval [low, high] of the value (null bound: "
        "too few calibration images for the coverage).",
    )
    knees: list[dict] | None = Field(
        None,
        description="A run trained on knee regions: each knee found, left to right (position, joint centre x/y "
        "and plateau width in pixels, the region's box [top, left, side]) with its own answer "
        "(status, probability, label, prediction_set, domain_score); the film's answer above "
        "aggregates them (absent for other runs).",
    )
    knee_reason: str | None = Field(
        None,
        description="A knee run: why no knee was found (the film is then out_of_domain); empty when knees were found.",
    )
    fused_probability: float | None = Field(
        None,
        description="A run with a fused model (`GET /api/model` "
        "`fused`): P(positive) from the image and the covariates sent in the "
        "`covariates` form field; null when one is missing.",
    )
    answer_basis: str = Field(
        "image_only",
        description="What the answer rests on: image_and_covariates (every "
        "covariate the fused model takes was sent) or image_only (never a filled-in value).",
    )
    missing_covariates: list[str] = Field(
        default_factory=list,
        description="The fused model's covariates that were not sent (the answer is then image_only).",
    )


class Explanation(Prediction):
    gradcam_target: str
    gradcam_layer: str
    gradcam_all_zero: bool = Field(description="Nothing in the layer speaks for the target class (a valid answer).")
    image_png: str = Field(description="The decoded radiograph, PNG, base64.")
    gradcam_png: str | None = Field(
        description="Grad-CAM over the radiograph, PNG, base64; null when out_of_domain (a map would explain nothing)."
    )
    attention_png: str | None = Field(
        description="Attention map over the radiograph, PNG, base64; "
        "null without an attention module or when out_of_domain."
    )


class Service:
    """The models and what the endpoints report about them. Grad-CAM hooks into the model, so
    explanations are serialised on their own model copy; predictions run concurrently."""

    def __init__(self, settings: WebSettings):
        from kneeosteo.inference import Explainer, Predictor, RunDir

        self.settings = settings
        run = RunDir.open(settings.run)  # read and verified once, shared by both models
        self.predictor = Predictor(run, threshold=settings.threshold, device=settings.device, batch_size=1)
        self.explainer = Explainer(run, threshold=settings.threshold, device=settings.device)
        self._explain_lock = threading.Lock()
        # the batch shift alarm over this session's recent requests (issue 33): their domain scores
        # and calibrated probabilities, newest last; no image, name or content id is kept
        self._recent: deque[tuple[float | None, float]] = deque(maxlen=RECENT_REQUESTS)
        self._recent_lock = threading.Lock()
        self._shift = None  # (requests seen when computed, BatchShift)
        self._seen = 0
        self.info = self.predictor.info
        self.fused = self.predictor.fused
        card = run.card_file.read_text() if run.card_file.is_file() else None
        self.caveat = card_caveat(card)
        self.model_doc = {
            "model_id": self.info.model_id,
            "backbone": self.info.backbone,
            "threshold": self.info.threshold,
            "classes": {"negative": self.info.negative, "positive": self.info.positive},
            "calibrated": run.trust is not None,
            "trust": None if run.trust is None else public_doc(run.trust.summary()),
            "caveat": self.caveat,
            "card": card,
            "config": public_doc(run.read_json(run.config_file.name)),
            "metrics": public_doc(run.read_json(run.metrics_file.name)),
            # a run that uses covariates: which, and its quoted figure; no file names or paths
            "fused": None
            if self.fused is None
            else {
                "covariates": list(self.fused.covariates),
                "definition": self.fused.definition,
                "films": self.fused.fitted_on.get("films"),
                "positives": self.fused.fitted_on.get("positives"),
                "auc": (self.fused.estimate.get("auc") or {}).get("auc"),
                "how": self.fused.estimate.get("how"),
            },
            "limits": {
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels,
                "workers": settings.workers,
                "queue": settings.queue,
            },
        }

    def predict(self, path: Path, name: str, covariates: dict | None = None) -> dict:
        img = decode(path, name, self.settings.max_pixels)
        return self._answer(img, name, covariates)

    def _answer(self, img, name: str, covariates: dict | None) -> dict:
        """The image model's row, plus the fused model's answer when the run has one."""
        row = self._row(img, name, self.predictor.predict_trusted([img.pixels])[0])
        row["answer_basis"] = "image_only"
        if self.fused is not None:
            row["missing_covariates"] = list(self.fused.covariates)
            raw = row.get("raw_probability")
            if row["status"] != "out_of_domain" and raw is not None:
                row.update(self.fused.answer(raw, covariates or {}, "covariates"))
        return row

    def check_covariates(self, text: str | None) -> dict | None:
        """The ``covariates`` form field (a JSON object) checked before any work: a model without a
        fused model, an unknown name or a value that is not a number is an HTTP 422 naming it."""
        import json

        from kneeosteo.data.reference import covariate_value

        if text is None or not text.strip():
            return None
        if self.fused is None:
            raise HTTPException(422, f"model {self.info.model_id} takes no covariates (it has no fused model)")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise HTTPException(422, 'covariates: send a JSON object, such as {"age": 70, "sex": "female"}')
        unknown = [k for k in doc if k not in self.fused.covariates]
        if unknown:
            raise HTTPException(
                422,
                f"covariates: unknown {', '.join(map(str, unknown))[:100]} "
                f"(the model takes {', '.join(self.fused.covariates)})",
            )
        for k, v in doc.items():
            try:
                covariate_value(k, v)
            except ValueError as exc:
                raise HTTPException(422, f"covariates: {str(exc)[:150]}") from None
        return doc

    def explain(self, path: Path, name: str, covariates: dict | None = None) -> dict:
        img = decode(path, name, self.settings.max_pixels)
        row = self._answer(img, name, covariates)  # what /api/predict gives
        if row["status"] == "out_of_domain":  # no label, so no map of the evidence for one
            return {
                **row,
                "gradcam_target": "",
                "gradcam_layer": self.explainer.layer_name,
                "gradcam_all_zero": False,
                "image_png": encode_b64(grey_png(img.pixels)),
                "gradcam_png": None,
                "attention_png": None,
            }
        with self._explain_lock:
            ex = self.explainer.explain(img.pixels)
        return {
            **row,
            "gradcam_target": ex.target,
            "gradcam_layer": ex.layer,
            "gradcam_all_zero": bool(ex.gradcam_raw.max() <= 0),
            "image_png": encode_b64(grey_png(img.pixels)),
            "gradcam_png": encode_b64(overlay_png(img.pixels, ex.gradcam)),
            "attention_png": None
            if ex.attention is None
            else encode_b64(overlay_png(img.pixels, ex.attention, stretch=True)),
        }

    def batch_shift(self, every: int = 1) -> dict:
        """The alarm over the last ``RECENT_REQUESTS`` predictions of this session, recomputed once
        ``every`` new requests have arrived since the last computation (a permutation test costs
        about a third of a second: predictions refresh it every ``SHIFT_REFRESH`` requests, the
        model panel whenever anything is new)."""
        from kneeosteo.inference.batch import shift_for
        from kneeosteo.trust.shift import MIN_SHIFT_IMAGES

        with self._recent_lock:
            recent, seen = list(self._recent), self._seen
            shift = self._shift
        if shift is None or seen - shift[0] >= every or (seen != shift[0] and len(recent) <= MIN_SHIFT_IMAGES):
            result = shift_for(
                self.predictor.trust, [d for d, _ in recent], [p for _, p in recent], self.predictor.task
            )
            shift = (seen, result)
            with self._recent_lock:
                self._shift = shift
        return {**shift[1].to_dict(), "window": RECENT_REQUESTS, "requests_seen": seen}

    def _row(self, img, name: str, t) -> dict:
        with self._recent_lock:
            self._recent.append((t.to_dict()["domain_score"], t.probability))
            self._seen += 1
        shift = self.batch_shift(SHIFT_REFRESH)
        if shift["verdict"] == "shift" and t.status == "ok":
            from kneeosteo.inference.batch import BATCH_SHIFT_REASON

            t = replace(
                t,
                status="uncertain",
                status_reason=(
                    f"{BATCH_SHIFT_REASON}: this session's last {shift['n']} images differ from the calibration "
                    f"images (p {shift['p_value']:.3g}); the prediction set's coverage does not hold for them"
                ),
            )
        return {
            "filename": name,
            **t.to_dict(),
            "threshold": self.info.threshold,
            "positive_class": self.info.positive,
            "model_id": self.info.model_id,
            "content_id": img.content_id,
            "format": img.meta.format,
            "width": img.meta.width,
            "height": img.meta.height,
        }


def _page(caveat: str, settings: WebSettings) -> str:
    text = resources.files("kneeosteo.interfaces.web").joinpath("static", "index.html").read_text("utf-8")
    return (
        text.replace("__CAVEAT__", html.escape(caveat))
        .replace("__MAX_BYTES__", str(settings.max_upload_bytes))
        .replace("__ACCEPT_LIST__", html.escape(ACCEPT_LIST))
        .replace("__ACCEPTED__", html.escape(ACCEPTED))
    )


Upload = Annotated[UploadFile, File(description=f"The radiograph: {ACCEPTED}.")]


class ErrorBody(BaseModel):
    detail: str = Field(description="What was wrong, in one short line; never a copy of the upload.")


_ERRORS = {
    413: {"model": ErrorBody, "description": "Upload larger than the limit."},
    415: {"model": ErrorBody, "description": f"Not an image this service reads ({formats.describe()})."},
    422: {
        "model": ErrorBody,
        "description": "A recognised image that cannot be decoded (empty, corrupt, "
        "truncated, decompression bomb, more pixels than the service "
        "decodes), or no `file` field holding a file.",
    },
    503: {
        "model": ErrorBody,
        "description": "All workers busy and the queue full; retry after the Retry-After seconds.",
    },
}
SEND_FILE = "send the image as a file in the multipart/form-data field `file` (with a file name)"


def validation_detail(exc: RequestValidationError, limit: int = 300) -> str:
    """One short line for a request FastAPI could not validate. FastAPI's own 422 lists every
    error with its ``input``, which for a form field is the whole upload (a 405 KB upload gave an
    880 KB answer); this names the field and the problem only."""
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "header", "path")]
        field = ".".join(loc) or "request"
        if field == "file":
            problem = (
                "no `file` field"
                if err.get("type") == "missing"
                else "the `file` field is not a file (a plain form field, or a file with an empty name)"
            )
            parts.append(f"{problem}: {SEND_FILE}")
        else:
            parts.append(f"{field}: {str(err.get('msg', 'invalid'))[:100]}")
    text = "; ".join(dict.fromkeys(parts)) or f"invalid request: {SEND_FILE}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ShedWhenFull:
    """ASGI middleware: answer 503 before reading an upload when the pool is already full, so a
    burst costs neither parsing nor temporary files (the pool itself stays the final judge)."""

    def __init__(self, app, pool: BoundedPool, paths: tuple[str, ...]):
        self.app, self.pool, self.paths = app, pool, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths and self.pool.full:
            # no "Connection: close": the server discards the unread body and the client gets the answer
            response = JSONResponse({"detail": BUSY}, 503, headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(settings: WebSettings = WebSettings()) -> FastAPI:
    """The app, with its models loaded (InferenceError when there is no usable model)."""
    service = Service(settings)
    pool = BoundedPool(settings.workers, settings.queue)
    app = FastAPI(title="kneeosteo", version="1", summary="Osteoporosis in knee radiographs. " + service.caveat)
    app.state.service, app.state.pool = service, pool

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_detail(exc)}, 422)

    @app.exception_handler(ModelError)
    async def model_failed(request, exc: ModelError):  # e.g. a non-finite probability: never a label
        return JSONResponse({"detail": " ".join(str(exc).split())}, 500)

    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    page = _page(service.caveat, settings)

    app.add_middleware(ShedWhenFull, pool=pool, paths=("/api/predict", "/api/explain"))

    async def run_job(upload: UploadFile, job: Callable[[Path, str], dict]) -> dict:
        with tempfile.TemporaryDirectory(prefix="kneeosteo-upload-") as tmp:
            path = await save_upload(upload, Path(tmp), settings.max_upload_bytes)
            try:
                return await pool.run(job, path, display_name(upload.filename))
            except PoolFull:  # filled up while this upload arrived
                raise HTTPException(503, BUSY, headers={"Retry-After": "1"}) from None

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(
            page,
            headers={"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
        )

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        return {"status": "ok", "model_id": service.info.model_id, "busy": pool.pending, "capacity": pool.capacity}

    @app.get("/api/model", tags=["model"])
    async def model() -> dict:
        """Model id, threshold, classes, the model card (Markdown) and its caveat, config.json, metrics.json,
        and the batch shift alarm over this session's recent requests (`batch_shift`)."""
        return {**service.model_doc, "batch_shift": service.batch_shift()}

    @app.post("/api/predict", response_model=Prediction, responses=_ERRORS, tags=["model"])
    async def predict(
        file: Upload,
        covariates: Annotated[
            str | None,
            Form(
                description="For a run with a fused model: a JSON object of its covariates, such as "
                '{"age": 70, "sex": "female", "weight_kg": 60}; a missing one gives an image_only answer.'
            ),
        ] = None,
    ):
        """P(osteoporosis), label and threshold for one radiograph (multipart field `file`); with the
        `covariates` field, a run with a fused model also answers from the image and the covariates."""
        cells = service.check_covariates(covariates)
        return await run_job(file, lambda path, name: service.predict(path, name, cells))

    @app.post("/api/explain", response_model=Explanation, responses=_ERRORS, tags=["model"])
    async def explain(
        file: Upload,
        covariates: Annotated[
            str | None, Form(description="As for /api/predict: a JSON object of the fused model's covariates.")
        ] = None,
    ):
        """The prediction plus the radiograph, Grad-CAM and attention overlays as base64 PNGs."""
        cells = service.check_covariates(covariates)
        return await run_job(file, lambda path, name: service.explain(path, name, cells))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    return app
