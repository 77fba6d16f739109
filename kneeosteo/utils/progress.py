"""Progress bars via tqdm; silent when stderr is not a terminal (CI logs, tests)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_bar(iterable, desc: str, total: int | None = None, **kwargs):
    disable = os.environ.get("KNEEOSTEO_PROGRESS") != "1" and not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
