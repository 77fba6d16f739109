"""``kneeosteo report``: the evidence about a run (or a ``reproduce`` grid) on one self-contained
HTML page a reviewer can read offline and print, optionally printed to PDF by headless Chromium.

Layer: above inference (it explains images with ``inference.explain``), below interfaces.
"""

from __future__ import annotations

from pathlib import Path

from kneeosteo.utils.atomic import write_text

__all__ = ["write_report"]


def write_report(
    path: str | Path,
    out: str | Path,
    *,
    pdf: str | Path | None = None,
    data: str | Path | None = None,
    correct: int = 4,
    seed: int = 0,
) -> Path:
    """Write the report of ``path`` (a run folder or a ``reproduce`` folder) to ``out`` (HTML) and,
    with ``pdf``, print it there. ``data`` overrides the run's recorded data folder; ``correct``
    is how many right test images join the error gallery; ``seed`` seeds the randomised twin of
    the saliency check. Returns the HTML path."""
    from kneeosteo.reporting.embed import render
    from kneeosteo.reporting.grid_report import grid_context, is_grid
    from kneeosteo.reporting.run_report import run_context

    if pdf is not None:  # a missing Chromium fails before minutes of work, not after
        from kneeosteo.reporting.pdf import require_chromium

        require_chromium()
    path, out = Path(path), Path(out)
    if is_grid(path):
        html = render("grid.html.j2", **grid_context(path))
    else:
        html = render("run.html.j2", **run_context(path, data=data, correct=correct, seed=seed))
    write_text(out, html)
    if pdf is not None:
        from kneeosteo.reporting.pdf import print_pdf

        print_pdf(out, Path(pdf))
    return out
