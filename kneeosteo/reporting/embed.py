"""Everything the report puts inline: figure files and pictures as ``data:`` URIs (the page makes no
request of its own), and the Jinja2 environment that renders it with autoescaping on, so a file
name or a setting can never inject markup."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["data_uri", "file_uri", "image_uri", "render"]


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode("ascii")


def file_uri(path: Path) -> str | None:
    """A PNG/JPEG file inline, or None when it is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return data_uri(path.read_bytes(), mime)


def image_uri(rgb: np.ndarray, quality: int = 85) -> str:
    """(H, W) or (H, W, 3) uint8 as an inline JPEG (photographic panels: a fifth of PNG's size)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=quality)
    return data_uri(buf.getvalue(), "image/jpeg")


def render(template: str, **context) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kneeosteo.reporting", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["ci"] = _ci
    return env.get_template(template).render(**context)


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _ci(m: dict | None, digits: int = 3) -> str:
    """A metrics.json entry ``{value, ci_low, ci_high}`` as ``v [lo, hi]``."""
    if not m:
        return "-"
    v, lo, hi = m.get("value"), m.get("ci_low"), m.get("ci_high")
    if lo is None or hi is None:
        return _num(v, digits)
    return f"{_num(v, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"
