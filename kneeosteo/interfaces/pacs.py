"""``kneeosteo pacs``: find knee films in a PACS over DICOMweb, predict, store the results back.

One pass (:func:`run_pacs`):

1. Send what a previous, interrupted pass left in the outbox (``STATE/outbox/MODEL/SOURCE/``:
   the SC and the SR of one film, written there before anything is sent). Their UIDs were made
   once; sending them again stores no second copy.
2. QIDO-RS: the studies (``--since``: StudyDate from that day on); in each, the series. Image
   series of modality DX, CR or RG whose BodyPartExamined is KNEE or absent are knee candidates
   (the model's domain check judges the pixels); another body part or modality is named and
   skipped; a series of more than ``max_instances`` films is named and skipped (a knee study has
   a few). Our own series (Manufacturer ``kneeosteo``) are read, not predicted: a film with an SR
   of this model already in the PACS is done, whatever this machine remembers.
3. For each film not done: WADO-RS fetch, the package's reader, the run's verdict (calibration,
   conformal set, domain check) and Grad-CAM; the SC (in-domain films only) and the SR go into
   the outbox atomically, then STOW-RS: the SC first, the SR last. The SR in the PACS is the mark
   of a finished film, so a crash anywhere loses nothing: the next pass sends the outbox again
   and the film's SR appears exactly once.

Credentials come from ``KNEEOSTEO_PACS_USER`` / ``KNEEOSTEO_PACS_PASSWORD`` or a file holding
``USER:PASSWORD`` on its first line; a URL carrying them is refused. They go into the HTTP
session only: never into a message, a log line or a file we write. A PACS that cannot be reached
or that answers an error stops the pass with one line; what was fetched is kept in the outbox.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from kneeosteo.data.reader import MAX_PIXELS
from kneeosteo.errors import ConfigError, DataError, ImageReadError, KneeosteoError
from kneeosteo.paths import cache_dir

__all__ = ["IMAGE_MODALITIES", "KNEE_PARTS", "Credentials", "PacsError", "PacsPass", "load_credentials", "run_pacs"]

IMAGE_MODALITIES = ("DX", "CR", "RG")  # projection radiographs
KNEE_PARTS = ("KNEE",)  # DICOM PS3.16 body part; absent is accepted (the domain check decides)
OTHER_IMAGES = ("CT", "MR", "US", "MG", "NM", "PT", "XA", "RF", "OT", "SC", "IO", "PX", "ES", "XC", "OP")
USER_ENV, PASSWORD_ENV = "KNEEOSTEO_PACS_USER", "KNEEOSTEO_PACS_PASSWORD"
MAX_INSTANCES = 20
# DICOM JSON tags
MODALITY, BODY_PART, MANUFACTURER_TAG = "00080060", "00180015", "00080070"
SERIES_UID, SOP_UID, STUDY_UID, N_SERIES_INSTANCES = "0020000E", "00080018", "0020000D", "00201209"
ROWS, COLUMNS = "00280010", "00280011"


class PacsError(KneeosteoError):
    """The PACS cannot be reached, or answered an error: one line, nothing half-stored."""


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)  # never in a repr, a log line or a message

    def __str__(self) -> str:
        return f"user {self.user}"


def load_credentials(file: str | os.PathLike | None = None) -> Credentials | None:
    """From ``file`` (first line ``USER:PASSWORD``), else the environment; None: no authentication."""
    if file is not None:
        try:
            line = Path(file).read_text().splitlines()[0].strip() if Path(file).read_text().strip() else ""
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read the credentials file ({exc.strerror or exc})") from exc
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{file}: the first line must be USER:PASSWORD")
        return Credentials(user, password)
    user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    if password and not user:
        raise ConfigError(f"{PASSWORD_ENV} is set but {USER_ENV} is not")
    return Credentials(user, password) if user else None


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"the DICOMweb URL must be http(s)://HOST[:PORT]/PATH, got {_safe(url)!r}")
    if parts.username or parts.password:
        raise ConfigError(f"put the credentials in {USER_ENV}/{PASSWORD_ENV} or --credentials FILE, not in the URL")
    return url.rstrip("/")


def _safe(url: str) -> str:
    """``url`` without any user:password part (for messages)."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()


@dataclass
class PacsPass:
    """What one pass did; ``lines`` are the per-film and per-series messages, in order."""

    studies: int = 0
    stored: int = 0  # films whose SR this pass stored
    resent: int = 0  # of them, from a previous pass's outbox
    already: int = 0  # films with an SR of this model already in the PACS
    out_of_domain: int = 0
    skipped_series: int = 0
    bad_films: int = 0
    objects: int = 0  # DICOM objects stored (SRs and SCs)
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.studies} studies: {self.stored} films stored ({self.resent} from the outbox, "
            f"{self.out_of_domain} out of domain, {self.objects} objects), {self.already} already in the PACS, "
            f"{self.bad_films} films and {self.skipped_series} series skipped"
        )


def _value(item: dict, tag: str) -> str:
    v = item.get(tag, {}).get("Value") or [""]
    return str(v[0]).strip()


class _Pacs:
    """The DICOMweb calls we make, each turning a transport or HTTP failure into a PacsError."""

    def __init__(self, url: str, credentials: Credentials | None, timeout: float):
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if credentials is not None:
            session.auth = (credentials.user, credentials.password)
        self.url, self.timeout = url, timeout
        self.client = DICOMwebClient(url, session=session, timeout=timeout)
        # dicomweb-client retries every failure, a refused connection included, 5 times with waits
        # doubling from 2 s (30 s for a PACS that is down); 3 tries from 1 s still ride out a
        # PACS answering 503 for a moment
        self.client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)

    def call(self, what: str, fn: Callable, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.HTTPError as exc:
            status = getattr(exc.response, "status_code", "?")
            reason = getattr(exc.response, "reason", "") or ""
            hint = " (check the credentials)" if status in (401, 403) else ""
            raise PacsError(f"PACS {self.url}: {what} answered HTTP {status} {reason}{hint}".rstrip()) from None
        except requests.exceptions.Timeout:
            raise PacsError(f"PACS {self.url}: {what} failed: no answer within --timeout {self.timeout:g} s") from None
        except requests.exceptions.RequestException as exc:
            kind = type(exc).__name__
            raise PacsError(f"PACS {self.url}: {what} failed: cannot reach it ({kind})") from None


def _series_verdict(item: dict, max_instances: int) -> str | None:
    """None: a knee candidate; "": silently not ours to predict (an SR, our own output...);
    else the reason it is skipped."""
    modality = _value(item, MODALITY).upper()
    if _value(item, MANUFACTURER_TAG) == "kneeosteo":
        return ""
    if modality not in IMAGE_MODALITIES:
        return f"modality {modality}, not a radiograph; skipped" if modality in OTHER_IMAGES else ""
    part = _value(item, BODY_PART).upper()
    if part and part not in KNEE_PARTS:
        return f"body part {part}, not a knee; skipped"
    n = _value(item, N_SERIES_INSTANCES)
    if n.isdigit() and int(n) > max_instances:
        return (
            f"{n} films, more than --max-instances {max_instances} (a knee study has a few); "
            "skipped, nothing fetched or stored"
        )
    return None


def run_pacs(
    url: str,
    *,
    run: str | os.PathLike | None = None,
    state: str | os.PathLike | None = None,
    credentials: Credentials | None = None,
    since: str | None = None,
    studies: list[str] | None = None,
    max_instances: int = MAX_INSTANCES,
    timeout: float = 60.0,
    device: str = "cpu",
    echo: Callable[[str], None] = print,
    explainer=None,
) -> PacsPass:
    """One pass over the PACS at ``url`` (its DICOMweb root); see the module docstring. One pass
    at a time per ``state`` folder."""
    from kneeosteo.inference.dicom_out import require_extra
    from kneeosteo.inference.explain import Explainer
    from kneeosteo.utils.atomic import ensure_writable

    url = _check_url(url)
    require_extra("dicomweb_client")
    if max_instances < 1:
        raise ConfigError(f"--max-instances must be >= 1, got {max_instances}")
    if since is not None and not (len(since) == 8 and since.isdigit()):
        raise ConfigError(f"--since takes a date as YYYYMMDD, got {since!r}")
    if explainer is None:
        explainer = Explainer(run, device=device)
    if getattr(explainer, "_run", None) is not None:
        raise ConfigError("`kneeosteo pacs` writes reports of binary runs (P(positive)); this run is not binary")

    state = Path(state) if state is not None else cache_dir() / "pacs" / hashlib.sha256(url.encode()).hexdigest()[:12]
    ensure_writable(state)
    with _one_pass_at_a_time(state):
        return _pass(url, explainer, state, credentials, since, studies, max_instances, timeout, echo)


@contextmanager
def _one_pass_at_a_time(state: Path) -> Iterator[None]:
    """Two passes at once (a cron job that overran) would predict the same films twice before
    either SR is in the PACS: the second one stops with one line instead."""
    import fcntl

    fd = os.open(state / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)  # an empty file: nothing is written
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PacsError(f"another `kneeosteo pacs` pass is using {state}; let it finish") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _pass(
    url: str,
    explainer,
    state: Path,
    credentials: Credentials | None,
    since: str | None,
    studies: list[str] | None,
    max_instances: int,
    timeout: float,
    echo: Callable[[str], None],
) -> PacsPass:
    import pydicom

    from kneeosteo.inference.dicom_out import read_sr

    model_id = explainer.info.model_id
    outbox = state / "outbox" / model_id
    outbox.mkdir(parents=True, exist_ok=True)
    pacs = _Pacs(url, credentials, timeout)
    out = PacsPass()

    def send(entry: Path) -> None:
        """The SC (if any), then the SR, of one outbox entry; the entry goes once the SR is stored."""
        for name in ("sc.dcm", "sr.dcm"):
            if (entry / name).is_file():
                ds = pydicom.dcmread(entry / name)
                try:
                    answer = pacs.call("STOW-RS", pacs.client.store_instances, [ds], ds.StudyInstanceUID)
                except PacsError as exc:
                    raise PacsError(
                        f"{exc}; the film's results are kept in {entry} and the next pass sends them"
                    ) from None
                failed = answer.get("FailedSOPSequence") if answer is not None else None
                if failed:
                    raise PacsError(
                        f"PACS {url}: STOW-RS refused {name[:2].upper()} {ds.SOPInstanceUID} "
                        f"(failure reason {failed[0].get('FailureReason', '?')}); "
                        f"kept in {entry}, the next pass sends it again"
                    )
                out.objects += 1
        shutil.rmtree(entry)

    pending = sorted(p for p in outbox.iterdir() if p.is_dir() and not p.name.startswith("."))
    for stale in outbox.glob(".*.tmp"):  # an entry a crash left half-written: never sent, made again
        shutil.rmtree(stale, ignore_errors=True)
    for entry in pending:
        send(entry)
        out.stored += 1
        out.resent += 1
    if pending:
        out.lines.append(f"sent {len(pending)} films' results left in the outbox by an interrupted pass")

    filters = {"StudyDate": f"{since}-"} if since else {}
    found = []
    for uid in studies or [None]:  # --study: only these
        query = {**filters, **({"StudyInstanceUID": uid} if uid else {})}
        found += pacs.call(
            "QIDO-RS (studies)", pacs.client.search_for_studies, search_filters=query or None, get_remaining=True
        )
    fetch_dir = state / "fetch"
    fetch_dir.mkdir(exist_ok=True)
    for study in found:
        study_uid = _value(study, STUDY_UID)
        if not study_uid:
            continue
        out.studies += 1
        series = pacs.call(
            "QIDO-RS (series)",
            pacs.client.search_for_series,
            study_uid,
            fields=["Modality", "BodyPartExamined", "Manufacturer", "NumberOfSeriesRelatedInstances"],
            get_remaining=True,
        )
        done: set[str] = set()
        for s in series:  # our SRs already in the PACS: their films are done
            if _value(s, MANUFACTURER_TAG) == "kneeosteo" and _value(s, MODALITY) == "SR":
                for meta in pacs.call(
                    "WADO-RS (metadata)", pacs.client.retrieve_series_metadata, study_uid, _value(s, SERIES_UID)
                ):
                    found = read_sr(pydicom.Dataset.from_json(meta))
                    if found is not None and found.model_id == model_id:
                        done.add(found.source_sop_uid)
        for s in series:
            series_uid = _value(s, SERIES_UID)
            verdict = _series_verdict(s, max_instances)
            if verdict is not None:
                if verdict:
                    out.skipped_series += 1
                    out.lines.append(f"study {study_uid} series {series_uid}: {verdict}")
                continue
            instances = pacs.call(
                "QIDO-RS (instances)",
                pacs.client.search_for_instances,
                study_uid,
                series_uid,
                fields=["Rows", "Columns"],
                get_remaining=True,
            )
            if len(instances) > max_instances:  # the count QIDO gave for the series may be absent
                out.skipped_series += 1
                out.lines.append(
                    f"study {study_uid} series {series_uid}: {len(instances)} films, more than "
                    f"--max-instances {max_instances}; skipped, nothing fetched or stored"
                )
                continue
            for inst in instances:
                sop = _value(inst, SOP_UID)
                if not sop:
                    continue
                if sop in done:
                    out.already += 1
                    continue
                rows, cols = _value(inst, ROWS), _value(inst, COLUMNS)
                if rows.isdigit() and cols.isdigit() and int(rows) * int(cols) > MAX_PIXELS:
                    out.bad_films += 1
                    out.lines.append(
                        f"study {study_uid} series {series_uid} film {sop}: declares {rows} x {cols} "
                        f"pixels, more than the reader's {MAX_PIXELS:,}; skipped, not fetched"
                    )
                    continue
                status = _one_film(pacs, explainer, study_uid, series_uid, sop, fetch_dir, outbox, out)
                if status is None:
                    continue
                send(outbox / sop)
                out.stored += 1
                out.out_of_domain += status == "out_of_domain"
                echo(
                    f"stored the SR{' and heat map' if status != 'out_of_domain' else ''} of film {sop} "
                    f"(study {study_uid}): {status}"
                )
    shutil.rmtree(fetch_dir, ignore_errors=True)
    return out


def _one_film(
    pacs: _Pacs, explainer, study_uid: str, series_uid: str, sop: str, fetch_dir: Path, outbox: Path, out: PacsPass
) -> str | None:
    """Fetch, predict and put one film's SC and SR into the outbox; its status, or None (named
    in ``out.lines``) when the film cannot be used."""
    from kneeosteo.data.reader import read_image
    from kneeosteo.inference.dicom_out import (
        check_reference,
        heatmap_rgb,
        new_uid,
        secondary_capture,
        structured_report,
    )

    name = f"study {study_uid} series {series_uid} film {sop}"
    ds = pacs.call("WADO-RS (instance)", pacs.client.retrieve_instance, study_uid, series_uid, sop)
    try:
        check_reference(ds, name)
    except DataError as exc:
        out.bad_films += 1
        out.lines.append(str(exc))
        return None
    path = fetch_dir / f"{sop}.dcm"
    try:
        ds.save_as(path, enforce_file_format=True)
        image = read_image(path)  # the package's reader: the pixels `predict` would see
    except (ImageReadError, ValueError, AttributeError) as exc:
        out.bad_films += 1
        out.lines.append(f"{name}: {getattr(exc, 'reason', exc)}; nothing stored for it")
        return None
    finally:
        path.unlink(missing_ok=True)
    verdict = explainer.verdict(image.pixels)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sop}.", suffix=".tmp", dir=outbox))
    try:
        if verdict.status != "out_of_domain":
            ex = explainer.explain(image.pixels)
            verdict = ex.trust or verdict
            caption = f"P({explainer.info.positive}) {verdict.probability:.2f}: {verdict.label} ({verdict.status})"
            sc = secondary_capture(
                ds, heatmap_rgb(image.pixels, ex.gradcam, caption), series_uid=new_uid(), sop_uid=new_uid()
            )
            sc.save_as(tmp / "sc.dcm", enforce_file_format=True)
        sr = structured_report(
            ds, verdict, explainer.info, explainer.threshold, series_uid=new_uid(), sop_uid=new_uid()
        )
        sr.save_as(tmp / "sr.dcm", enforce_file_format=True)
        for f in tmp.iterdir():  # flushed to disk before the rename publishes them
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, outbox / sop)  # the entry appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return verdict.status
