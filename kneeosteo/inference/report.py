"""Files written by `kneeosteo explain`: a three-panel PNG and a JSON of map statistics."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kneeosteo.errors import OutputError
from kneeosteo.inference.explain import Explanation
from kneeosteo.utils.atomic import atomic_path, write_json
from kneeosteo.utils.text import printable

log = logging.getLogger(__name__)

__all__ = ["OUT_OF_DOMAIN_TEXT", "render_png", "verdict_text", "write_explanation"]


def title_text(name: str) -> str:
    """A file name as a figure title: undecodable bytes and control or bidi characters escaped
    (``printable``), dollar signs escaped so matplotlib never parses the name as mathtext."""
    return printable(name).replace("$", r"\$")


OUT_OF_DOMAIN_TEXT = "this does not look like a knee radiograph the model knows"


def verdict_text(ex: Explanation, threshold: float) -> str:
    """The figure's verdict line: status first; no label for an out-of-domain image."""
    t = ex.trust
    if t is not None and t.status == "out_of_domain":
        why = t.knee_reason or OUT_OF_DOMAIN_TEXT  # a knee run's film with no knee: why none was found
        return f"out of domain: {why} (no label; the maps explain nothing)"
    cal = "" if t is None or t.calibrated else " (uncalibrated)"
    status = "" if t is None else f"{t.status}: "
    return f"{status}P({ex.positive}) = {ex.probability:.3f}{cal} -> {ex.label} (threshold {threshold:g})"


DISPLAY_SIDE = 1024  # a panel is about 400 px wide: more only costs memory (RGBA float64 per overlay)


def _for_display(m: np.ndarray | None, factor: int) -> np.ndarray | None:
    """Block mean of a float map for drawing only (the JSON statistics use the full map)."""
    if m is None or factor <= 1:
        return m
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).reduce(factor))


def render_png(pixels: np.ndarray, ex: Explanation, path: Path, title: str, threshold: float) -> None:
    """Radiograph | Grad-CAM overlay | attention overlay, probability and label in the title
    (``title`` is shown as plain text, see ``title_text``). Images with a side over
    ``DISPLAY_SIDE`` are drawn from block means (the panels are far smaller anyway)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    factor = -(-max(pixels.shape) // DISPLAY_SIDE)
    pixels = _for_display(pixels, factor)
    gradcam, attention = _for_display(ex.gradcam, factor), _for_display(ex.attention, factor)

    fig = Figure(figsize=(13, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax in axes:
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
    axes[0].set_title("radiograph")
    im = axes[1].imshow(gradcam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    note = "" if ex.gradcam_raw.max() > 0 else f"\nall zero: nothing in this layer speaks for {ex.target}"
    axes[1].set_title(f"Grad-CAM ({ex.target}, {ex.layer}){note}", fontsize=9)
    if attention is not None:
        # the AM's sigmoid weights often span a narrow band: scale the colours to this map
        im = axes[2].imshow(attention, cmap="jet", alpha=0.45)
        fig.colorbar(im, ax=axes[2], shrink=0.8)
        axes[2].set_title("attention module, spatial map", fontsize=9)
    else:
        axes[2].set_title("no attention module (ablation)", fontsize=9)
    fig.suptitle(f"{title_text(title)}\n{verdict_text(ex, threshold)}", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_explanation(pixels: np.ndarray, ex: Explanation, out_dir: Path, name: str, extra: dict) -> tuple[Path, Path]:
    """``out_dir/name.png`` and ``out_dir/name.json`` (``extra``: path, content id, model, ...)."""
    png, js = out_dir / f"{name}.png", out_dir / f"{name}.json"
    render_png(pixels, ex, png, Path(extra.get("path", name)).name, extra.get("threshold", 0.5))
    write_json(js, {**extra, "image_shape": list(pixels.shape), **ex.stats()})
    return png, js


def explain_files(explainer, inputs, out_dir: str | Path, progress: bool = True):
    """Explain every image among ``inputs`` (files/folders, as for predict) into ``out_dir``.

    Returns ``(written [(image, png, json)], errors [ImageReadError])``. Output names are the
    image's stem, with ``-2``, ``-3``... when two inputs share one.
    """
    from kneeosteo.data.reader import ImageReadError, read_image
    from kneeosteo.inference.inputs import collect_inputs
    from kneeosteo.utils.progress import progress_bar

    out_dir = Path(out_dir)
    files, errors = collect_inputs(inputs)
    written, used = [], set()
    for path in progress_bar(files, "explain", total=len(files)) if progress else files:
        try:
            img = read_image(path)
        except ImageReadError as exc:
            errors.append(exc)
            continue
        name, k = path.stem or "image", 1
        while name in used:
            k += 1
            name = f"{path.stem}-{k}"
        used.add(name)
        try:
            ex = explainer.explain(img.pixels)
            extra = {
                "path": str(path),
                "content_id": img.content_id,
                "model": explainer.info.model_id,
                "threshold": explainer.threshold,
            }
            written.append((path, *write_explanation(img.pixels, ex, out_dir, name, extra)))
        except OutputError:  # the output folder itself: every other image would fail the same way
            raise
        except Exception as exc:  # one image's failure never drops the others, nor the error list
            log.debug("explaining %s failed", path, exc_info=True)
            errors.append(ImageReadError(path, f"could not be explained ({type(exc).__name__}: {exc})"))
    return written, errors
