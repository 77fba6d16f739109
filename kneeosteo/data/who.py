"""The WHO T-score bands (normal / osteopenia / osteoporosis) as one table.

The WHO definition (Kanis 1994) classes a DXA T-score ``T`` as

=============  ==================  =====
band           T-score             index
=============  ==================  =====
normal         T >= -1.0           0
osteopenia     -2.5 < T < -1.0     1
osteoporosis   T <= -2.5           2
=============  ==================  =====

so a T-score of exactly -1.0 is *normal* and one of exactly -2.5 is *osteoporosis*. Everything
below (:data:`WHO_CLASSES`, :data:`WHO_CUTOFFS`, :func:`who_band_index`, :func:`severity_order`)
is read from :data:`WHO_BANDS`; the index is the band's rank in severity, which is also the class
index a multiclass model uses for these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["WHO_BANDS", "WHO_CLASSES", "WHO_CUTOFFS", "severity_order", "who_band", "who_band_index"]

#: ``(name, upper cut-off, upper cut-off inclusive)`` in severity order: a T-score belongs to a band
#: past a cut-off when it lies below it (or on it, where the cut-off is inclusive). The least severe
#: band has no upper cut-off (``None``).
WHO_BANDS: tuple[tuple[str, float | None, bool], ...] = (
    ("normal", None, False),
    ("osteopenia", -1.0, False),  # T < -1.0
    ("osteoporosis", -2.5, True),  # T <= -2.5
)

WHO_CLASSES: tuple[str, ...] = tuple(name for name, _, _ in WHO_BANDS)
WHO_CUTOFFS: tuple[float, ...] = tuple(cut for _, cut, _ in WHO_BANDS if cut is not None)


def who_band_index(t_scores) -> np.ndarray:
    """Band index of each T-score (0 normal, 1 osteopenia, 2 osteoporosis), same shape as the
    input (a 0-d array for a scalar).

    A NaN or infinite T-score raises ``ValueError`` rather than getting a sentinel band: a
    missing reference value must be dropped by the caller, not scored as a class.
    """
    t = np.asarray(t_scores, dtype=np.float64)
    bad = ~np.isfinite(t)
    if bad.any():
        raise ValueError(f"T-scores must be finite; {int(bad.sum())} of {t.size} are NaN or infinite")
    index = np.zeros(t.shape, dtype=np.int64)
    for _, cut, inclusive in WHO_BANDS[1:]:
        index += (t <= cut) if inclusive else (t < cut)
    return index


def who_band(t: float) -> str:
    """The WHO band name of one T-score (``"normal"``, ``"osteopenia"`` or ``"osteoporosis"``)."""
    if np.ndim(t) != 0:
        raise ValueError(f"who_band takes one T-score; use who_band_index for arrays (got shape {np.shape(t)})")
    return WHO_CLASSES[int(who_band_index(t))]


def severity_order(names: Iterable[str]) -> list[str]:
    """Class names in a fixed order: the WHO names in severity order first (normal, osteopenia,
    osteoporosis), then any other names alphabetically.

    Used to fix the class index order of a multiclass task whatever order the folders were
    listed in. Names are matched to the WHO names case-insensitively and returned as given
    (``"Osteopenia"`` sorts as osteopenia); duplicates are dropped.
    """
    rank = {name: i for i, name in enumerate(WHO_CLASSES)}
    unique = list(dict.fromkeys(str(n) for n in names))
    return sorted(unique, key=lambda n: (rank.get(n.lower(), math.inf), n))
