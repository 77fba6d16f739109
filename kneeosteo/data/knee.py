"""Find the knee joints on a frontal radiograph without labels, and cut each one out at a fixed
anatomical scale.

Films come framed every way: a close single knee, a knee at the top of a long shin, a whole leg
in a wide film, and (from other sites) both knees side by side. A network given the whole film
sees the knee at a different size and place on every framing, and sees the framing itself (a
cue to the film's source). :func:`find_knees` locates each joint by classic image analysis (no
label and no trained model is involved, so nothing can leak from the classes), and
:func:`knee_roi` cuts a square centred on the joint whose side is ``ROI_SCALE`` times the
tibial plateau's width, so every knee reaches the network at the same anatomical scale.

How (at ``WORK_SIDE`` px on the longest side; the idea of anatomical proposals from intensity
profiles is Tiulpin et al.'s KneeLocalizer, SCIA 2017, whose detector then scores proposals with
a trained HOG-SVM; here no trained part is used):

1. Body: grey above the midpoint of the film's darkest grey and Otsu's threshold (Otsu alone
   splits soft tissue from bone where the body fills most of the film).
2. Legs: the columns holding body in at least ``LEG_ROWS`` of the rows form runs; each run at
   least ``MIN_LEG`` of the film's width is a leg. A run may hold two touching knees: it is split
   where the band below its joint row holds two knee-wide bone runs with soft tissue between.
3. Joint row: the joint space is a thin dark band across the knee; a morphological black-hat
   with a vertical line taller than the band lifts it; the row with the largest mean response
   over the leg's central half is the joint row, if that response is at least ``MIN_VALLEY`` and
   ``MIN_PEAK`` times the median row's.
4. Plateau and condyles: in a band of rows just below (above) the dark band's reach, the
   outermost grey edges at least ``EDGE_SHARE`` of the strongest, away from the skin, are the
   tibial plateau's (femoral condyles') margins; the joint centre's column is the mean of the
   two midpoints, the plateau width the larger of the two widths.
5. Two knees (``left`` and ``right`` by their place in the image; one knee: ``single``) are
   believed only as a pair: plateaus within a factor 1.6, joints level within a plateau width.

A film where any step fails (no body/bone contrast, no leg, no joint space, a plateau too small
for the film, two knees that are no pair) gets no knee and a reason, never a guess. It is no
non-knee detector: photographs and CT/MR pictures can yield a "knee"; the domain check refuses
those. Measured against hand marks on KOP films: README, "Knee localisation and per-knee answers".
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kneeosteo.data.bone import _clear_edge_bands
from kneeosteo.data.reader import to_uint8

__all__ = ["LOCALISER_VERSION", "ROI_SCALE", "ROI_SIDE", "Knee", "KneeSearch", "find_knees", "knee_roi"]

LOCALISER_VERSION = 1  # raise on any change that moves a knee: the 'knee' preset's cache key holds it

WORK_SIDE = 512  # the search runs at this longest side; positions are returned in original pixels
ROI_SCALE = 2.0  # the region's side as a multiple of the tibial plateau's width
ROI_SIDE = 448  # default side (px) a region is resampled to
LEG_ROWS = 0.3  # a leg column holds body in at least this share of the rows
MIN_LEG = 0.08  # a leg is at least this share of the film's width
MIN_PLATEAU = 0.08  # a plateau narrower than this share of the film's longest side is not a knee
MIN_VALLEY = 0.02  # the joint space's mean black-hat response (grey, 0-1) is at least this deep
MIN_PEAK = 4.0  # ... and this many times the median row's (noise has no row that stands out)
JOINT_KERNEL = 0.15  # the black-hat's vertical line, as a share of the leg's width
PLATEAU_BAND = (0.01, 0.05)  # the rows below the joint row where the plateau's edges are read (x leg width)
EDGE_SHARE = 0.35  # a plateau edge is the outermost grey edge at least this share of the strongest
SKIN_MARGIN = 0.06  # edges this close (x leg width) to the leg's outline are the skin's, not the bone's


@dataclass(frozen=True)
class Knee:
    """One knee joint: ``position`` (``left``/``right`` in the image, ``single`` when the film has
    one), the joint centre (``x``, ``y``) and the tibial plateau's width, in original pixels."""

    position: str
    x: float
    y: float
    plateau_width: float

    def box(self, scale: float = ROI_SCALE) -> tuple[float, float, float]:
        """The region's ``(top, left, side)`` in original pixels (it may reach past the film)."""
        side = scale * self.plateau_width
        return self.y - side / 2, self.x - side / 2, side

    def to_dict(self) -> dict:
        top, left, side = self.box()
        return {
            "position": self.position,
            "x": round(self.x, 1),
            "y": round(self.y, 1),
            "plateau_width": round(self.plateau_width, 1),
            "box": [round(top, 1), round(left, 1), round(side, 1)],
        }


@dataclass(frozen=True)
class KneeSearch:
    """What :func:`find_knees` found: the knees left to right, or none and ``reason`` why."""

    knees: tuple[Knee, ...]
    reason: str = ""


def _none(reason: str) -> KneeSearch:
    return KneeSearch((), reason)


def _otsu(values: np.ndarray) -> float:
    t, _ = cv2.threshold(values.reshape(-1, 1).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def _smooth(v: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.5:
        return v.astype(np.float64)
    return cv2.GaussianBlur(v.astype(np.float64).reshape(1, -1), (0, 0), sigma).reshape(-1)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    d = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _extent(mask_row: np.ndarray) -> tuple[int, int] | None:
    idx = np.flatnonzero(mask_row)
    return (int(idx[0]), int(idx[-1]) + 1) if idx.size else None


def _joint_row(grey: np.ndarray, body: np.ndarray, a: int, b: int) -> tuple[int, float, int, int] | str:
    """The joint row of the leg in columns [a, b), the leg's width there and the dark band's reach
    above and below the row (rows), or why not.

    The joint space is a thin dark band across the knee: a morphological black-hat with a
    vertical line (taller than the band) lifts exactly such bands; each row's score is its mean
    over the central half of the leg, and the best row must stand out from the rest."""
    h = grey.shape[0]
    leg = body[:, a:b]
    present = leg.mean(axis=1) > 0.05
    if present.sum() < 8:
        return "no leg in the film's rows"
    widths = np.zeros(h)
    centres = np.full(h, np.nan)
    for y in np.flatnonzero(present):
        e = _extent(leg[y])
        widths[y], centres[y] = e[1] - e[0], a + (e[0] + e[1]) / 2
    leg_w = float(np.median(widths[present]))
    length = max(5, round(JOINT_KERNEL * leg_w) | 1)
    hat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (1, length)))
    score = np.zeros(h)
    margin = length // 2 + 1
    for y in range(margin, h - margin):
        if not present[y]:
            continue
        half = 0.25 * widths[y]
        lo, hi = round(centres[y] - half), round(centres[y] + half) + 1
        score[y] = hat[y, lo:hi].mean()
    score = _smooth(score, 0.002 * h + 0.5)
    row = int(np.argmax(score))
    if score[row] < MIN_VALLEY or score[row] < MIN_PEAK * float(np.median(score[present])):
        return "no joint space (a dark band across the leg)"
    # the band's own extent: rows on either side until the response halves
    below = next((i for i in range(row, h) if score[i] < 0.5 * score[row]), h) - row
    above = row - next((i for i in range(row, -1, -1) if score[i] < 0.5 * score[row]), -1)
    return row, float(widths[row]), above, below


def _outermost_peak(g: np.ndarray) -> int:
    """The first (outermost) local maximum of ``g`` that reaches ``EDGE_SHARE`` of its largest value."""
    top = float(g.max())
    if top <= 0:
        return int(np.argmax(g))
    for i in range(len(g)):
        if g[i] >= EDGE_SHARE * top and (i == len(g) - 1 or g[i] >= g[i + 1]) and (i == 0 or g[i] >= g[i - 1]):
            return i
    return int(np.argmax(g))


def _plateau(
    grey: np.ndarray, body: np.ndarray, row: int, reach: int, a: int, b: int, leg_w: float, above: bool = False
) -> tuple[float, float] | None:
    """(left, right) of the tibial plateau: the outermost strong rising and falling grey edges of
    a band of rows just below the joint space (``reach`` rows below ``row``), inside the leg (away
    from its skin); ``above``: of the femoral condyles, in the same band above the joint space."""
    h = grey.shape[0]
    d0 = reach + max(1, round(PLATEAU_BAND[0] * leg_w))
    d1 = d0 + max(2, round(PLATEAU_BAND[1] * leg_w))
    y0, y1 = (max(0, row - d1), max(0, row - d0)) if above else (min(h - 1, row + d0), min(h, row + d1))
    if y1 <= y0:
        return None
    prof = grey[y0:y1, a:b].mean(axis=0)
    e = _extent(body[y0:y1, a:b].any(axis=0))
    if e is None:
        return None
    m = round(SKIN_MARGIN * leg_w)
    lo, hi = e[0] + m, e[1] - m
    if hi - lo < 8:
        return None
    g = np.gradient(_smooth(prof, 0.01 * leg_w + 0.5))
    mid = (lo + hi) // 2
    left = lo + _outermost_peak(g[lo:mid])
    right = hi - 1 - _outermost_peak(-g[mid:hi][::-1])
    return float(a + left), float(a + right + 1)


def _knee_in(grey: np.ndarray, body: np.ndarray, a: int, b: int, side: int) -> tuple[float, int, float] | str:
    """The knee of the leg in columns [a, b): (centre column, joint row, plateau width), or why none."""
    j = _joint_row(grey, body, a, b)
    if isinstance(j, str):
        return j
    row, leg_w, above, below = j
    edges = _plateau(grey, body, row, below, a, b, leg_w)
    if edges is None:
        return "no tibial plateau below the joint space"
    left, right = edges
    condyles = _plateau(grey, body, row, above, a, b, leg_w, above=True)
    centre = (left + right) / 2 if condyles is None else (left + right + sum(condyles)) / 4
    width = right - left if condyles is None else max(right - left, condyles[1] - condyles[0])
    if width < MIN_PLATEAU * side:
        return f"the plateau found ({width / side:.0%} of the film) is too small for a knee"
    return centre, row, width


def _two_legs(grey: np.ndarray, body: np.ndarray, a: int, b: int, side: int) -> list[tuple[int, int]]:
    """[a, b) split in two where it holds two knees side by side with no background between them
    (touching legs, or two films put together): below the joint row, two bone runs (brighter
    than Otsu's threshold over the band) each a knee wide, with soft tissue between them."""
    j = _joint_row(grey, body, a, b)
    if isinstance(j, str):
        return [(a, b)]
    row, leg_w, _, below = j
    h = grey.shape[0]
    y0 = min(h - 1, row + below + max(1, int(0.01 * leg_w)))
    y1 = min(h, y0 + max(2, int(0.06 * leg_w)))
    prof = _smooth(grey[y0:y1, a:b].mean(axis=0), 0.005 * side + 0.5)
    t = _otsu(np.clip(prof * 255, 0, 255)) / 255
    runs = [(s0, s1) for s0, s1 in _runs(prof > t) if s1 - s0 >= MIN_PLATEAU * side]
    if len(runs) != 2:
        return [(a, b)]
    (l0, l1), (r0, r1) = runs
    if r0 - l1 < 0.02 * side or max(l1 - l0, r1 - r0) > 2 * min(l1 - l0, r1 - r0):
        return [(a, b)]
    m = a + (l1 + r0) // 2
    return [(a, m), (m, b)]


def _a_pair(knees: list) -> bool:
    """Two knees found side by side are believed only as a pair: both found, similar plateau widths
    (within a factor 1.6) and joint rows within one plateau width of each other."""
    if len(knees) != 2 or any(isinstance(k, str) for k in knees):
        return False
    (_, r1, w1), (_, r2, w2) = knees
    return max(w1, w2) <= 1.6 * min(w1, w2) and abs(r1 - r2) <= max(w1, w2)


def find_knees(pixels: np.ndarray) -> KneeSearch:
    """The knee joints of a canonical greyscale film (float [0, 1] or uint8, H x W), left to right."""
    img = pixels if pixels.dtype == np.uint8 else to_uint8(pixels)
    h, w = img.shape
    if min(h, w) < 32:
        return _none("the image is too small to find a knee")
    scale = WORK_SIDE / max(h, w)
    small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    small = _clear_edge_bands(small)
    sh, sw = small.shape
    grey = cv2.GaussianBlur(small, (0, 0), 0.003 * max(sh, sw)).astype(np.float32) / 255
    # the body: above the midpoint of the film's darkest grey and Otsu's threshold (Otsu alone
    # splits soft tissue from bone where the body fills most of the film)
    t1 = (_otsu(grey * 255) / 255 + float(np.percentile(grey, 1))) / 2
    body = (grey > t1) & (small < 250)
    if body.mean() < 0.02 or np.ptp(grey[body]) < 0.05:
        return _none("no body/bone contrast")
    cols = _smooth(body.mean(axis=0), 0.01 * sw)
    legs = [(a, b) for a, b in _runs(cols >= LEG_ROWS) if b - a >= MIN_LEG * sw]
    if not legs:
        return _none("no leg (no column band of body)")
    side = max(sh, sw)
    found, reasons = [], []
    for a, b in legs:
        parts = _two_legs(grey, body, a, b, side)
        knees = [_knee_in(grey, body, pa, pb, side) for pa, pb in parts]
        if len(parts) == 2 and not _a_pair(knees):
            knees = [_knee_in(grey, body, a, b, side)]
        for k in knees:
            (reasons if isinstance(k, str) else found).append(k)
    found = sorted((x / scale, (row + 0.5) / scale, width / scale) for x, row, width in found)
    if not found:
        return _none("; ".join(dict.fromkeys(reasons)))
    if len(found) > 2:
        return _none(f"{len(found)} knee-like regions (a film holds one or two knees)")
    if len(found) == 2 and not _a_pair([(x, y, pw) for x, y, pw in found]):
        return _none("two knee-like regions that are no pair (different sizes, or joints at different heights)")
    names = ("single",) if len(found) == 1 else ("left", "right")
    return KneeSearch(tuple(Knee(n, x, y, pw) for n, (x, y, pw) in zip(names, found)))


def knee_roi(pixels: np.ndarray, knee: Knee, side: int = ROI_SIDE, scale: float = ROI_SCALE) -> np.ndarray:
    """The knee's square region, ``side`` x ``side`` float32 in [0, 1]; what lies past the film is black."""
    top, left, size = knee.box(scale)
    f = side / size
    # the affine map original -> region: x' = (x - left) * f, y' = (y - top) * f (pixel centres)
    m = np.array([[f, 0, -left * f + 0.5 * f - 0.5], [0, f, -top * f + 0.5 * f - 0.5]], dtype=np.float64)
    src = np.ascontiguousarray(pixels, dtype=np.float32)
    if f < 1:  # shrinking: average first so that fine texture does not alias
        k = 1.0 / f
        src = cv2.GaussianBlur(src, (0, 0), 0.5 * k) if k > 1.5 else src
    out = cv2.warpAffine(src, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.clip(out, 0.0, 1.0)
