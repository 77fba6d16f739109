"""Measure the knee localiser against the hand marks, and draw its worst cases.

Usage: python scripts/knee_localisation.py DATA MARKS_CSV [--split dev|test|all] [--gallery OUT_PNG]
       [--all-films] [--pairs] [--regions OUT_PNG]

MARKS_CSV (tests/data/knee_marks.csv) holds, per film, the joint centre and the tibial plateau's
margins marked by hand (original pixels) and whether it was used to develop the localiser
(``dev``) or held back (``test``). Prints per split: the films, how many got a knee, the joint
centre's error as a fraction of the marked plateau width (median, 95th percentile, maximum,
share within 10%), the plateau width's relative error, and the worst films. ``--all-films``
also runs the localiser on every readable image of DATA and counts the films with none found
(no marks needed). ``--pairs``: two-knee films built from pairs of marked films (the second
mirrored, scaled to the first's plateau width and shifted so the joints are level, side by side,
touching), both knees measured. ``--gallery``: the worst films of the chosen split, marked (green) against
found (red), with the region the preset cuts (yellow). ``--regions``: one film per framing and class with
its region's box, next to the region the ``knee`` preset gives the network.
"""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path

import cv2
import numpy as np

from kneeosteo.data.knee import find_knees
from kneeosteo.data.reader import read_image, to_uint8
from kneeosteo.utils.atomic import atomic_path


def measure(data: Path, rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        path = data / r["path"]
        if hashlib.sha256(path.read_bytes()).hexdigest() != r["sha256"]:
            raise SystemExit(f"{path}: not the marked file (sha256 differs)")
        img = read_image(path)
        found = find_knees(img.pixels)
        mx, my = float(r["joint_x"]), float(r["joint_y"])
        pw = float(r["plateau_right_x"]) - float(r["plateau_left_x"])
        rec = {**r, "pixels": img.pixels, "found": found, "marked_width": pw}
        if found.knees:
            k = min(found.knees, key=lambda k: (k.x - mx) ** 2 + (k.y - my) ** 2)
            rec["error"] = float(np.hypot(k.x - mx, k.y - my) / pw)
            rec["width_error"] = float(k.plateau_width / pw - 1)
            rec["knee"] = k
        else:
            rec["error"], rec["width_error"], rec["knee"] = float("inf"), float("nan"), None
        out.append(rec)
    return out


def side_by_side(a: dict, b: dict) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Film ``a`` on the left and film ``b`` mirrored on the right, touching (no gap), ``b`` scaled
    to ``a``'s marked plateau width and shifted so the two joints are level (as one patient's
    knees on one standing film would be): a two-knee film, and its two marked knees (joint x,
    joint y, plateau width) in its pixels."""
    pa, pb = a["pixels"], b["pixels"]
    f = a["marked_width"] / b["marked_width"]
    pb = cv2.resize(pb, (max(1, round(pb.shape[1] * f)), max(1, round(pb.shape[0] * f))), interpolation=cv2.INTER_AREA)[
        :, ::-1
    ]
    ya, yb = float(a["joint_y"]), float(b["joint_y"]) * f
    oa = max(0, round(yb - ya))
    ob = oa + round(ya - yb)
    h = max(oa + pa.shape[0], ob + pb.shape[0])
    film = np.zeros((h, pa.shape[1] + pb.shape[1]), np.float32)
    film[oa : oa + pa.shape[0], : pa.shape[1]] = pa
    film[ob : ob + pb.shape[0], pa.shape[1] :] = pb
    ka = (float(a["joint_x"]), ya + oa, a["marked_width"])
    kb = (film.shape[1] - float(b["joint_x"]) * f, yb + ob, b["marked_width"] * f)
    return film, [ka, kb]


def pairs(recs: list[dict]) -> str:
    """Two-knee films from consecutive marked films: both knees found, each on its side, errors."""
    n = both = sides = 0
    errs, refused = [], []
    for a, b in zip(recs[0::2], recs[1::2]):
        film, marks = side_by_side(a, b)
        search = find_knees(film)
        found = search.knees
        n += 1
        if len(found) != 2:
            refused.append(f"{a['path']} + {b['path']}: {search.reason or len(found)}")
            continue
        both += 1
        sides += (
            found[0].position == "left" and found[1].position == "right" and found[0].x < film.shape[1] / 2 < found[1].x
        )
        errs += [float(np.hypot(k.x - mx, k.y - my) / pw) for k, (mx, my, pw) in zip(found, marks)]
    e = np.array(errs) if errs else np.array([np.inf])
    return (
        f"two-knee films (pairs, the right one mirrored, scaled and shifted to the left one's knee, touching): {n}; both knees found on {both}, "
        f"left/right right on {sides}; joint-centre error / plateau width over {len(errs)} knees: "
        f"median {np.median(e):.3f}, max {e.max():.3f}, within 0.10: {(e <= 0.10).sum()}"
        + "".join(f"\n  not two knees: {r}" for r in refused)
    )


def summary(recs: list[dict], name: str) -> str:
    e = np.array([r["error"] for r in recs])
    we = np.array([r["width_error"] for r in recs if r["knee"] is not None])
    found = int(np.isfinite(e).sum())
    lines = [
        f"{name}: {len(recs)} films, knee found on {found}",
        f"  joint-centre error / plateau width: median {np.median(e):.3f}, p95 {np.percentile(e, 95):.3f}, "
        f"max {e.max():.3f}; within 0.10: {(e <= 0.10).sum()}/{len(e)} ({(e <= 0.10).mean():.1%})",
        f"  plateau width error: median {np.median(we):+.3f}, median |.| {np.median(np.abs(we)):.3f}, "
        f"max |.| {np.abs(we).max():.3f}"
        if we.size
        else "  plateau width: -",
    ]
    worst = sorted(recs, key=lambda r: -r["error"])[:5]
    lines.append("  worst: " + ", ".join(f"{r['path']} ({r['error']:.2f})" for r in worst))
    return "\n".join(lines)


def gallery(recs: list[dict], out: Path, n: int = 8, tile: int = 300) -> None:
    tiles = []
    for r in sorted(recs, key=lambda r: -r["error"])[:n]:
        u8 = to_uint8(r["pixels"])
        h, w = u8.shape
        s = tile / max(h, w)
        t = cv2.cvtColor(
            cv2.resize(u8, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA),
            cv2.COLOR_GRAY2BGR,
        )
        pad = np.zeros((tile, tile, 3), np.uint8)
        pad[: t.shape[0], : t.shape[1]] = t
        mx, my = float(r["joint_x"]) * s, float(r["joint_y"]) * s
        cv2.line(
            pad,
            (round(float(r["plateau_left_x"]) * s), round(my)),
            (round(float(r["plateau_right_x"]) * s), round(my)),
            (0, 255, 0),
            1,
        )
        cv2.circle(pad, (round(mx), round(my)), 3, (0, 255, 0), -1)
        k = r["knee"]
        if k is not None:
            top, left, side = k.box()
            cv2.rectangle(
                pad,
                (round(left * s), round(top * s)),
                (round((left + side) * s), round((top + side) * s)),
                (0, 255, 255),
                1,
            )
            cv2.circle(pad, (round(k.x * s), round(k.y * s)), 3, (0, 0, 255), -1)
        label = (
            f"{r['split']} {Path(r['path']).name} err {r['error']:.2f}"
            if k is not None
            else f"{r['split']} {Path(r['path']).name}: none"
        )
        cv2.putText(pad, label, (3, tile - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
        tiles.append(pad)
    while len(tiles) % 4:
        tiles.append(np.zeros((tile, tile, 3), np.uint8))
    grid = np.vstack([np.hstack(tiles[i : i + 4]) for i in range(0, len(tiles), 4)])
    with atomic_path(out) as tmp:
        cv2.imwrite(str(tmp) + ".png", grid)
        Path(str(tmp) + ".png").replace(tmp)


def regions(recs: list[dict], out: Path, tile: int = 200) -> None:
    """One film per framing and class (the first of each), drawn with its region's box, next to
    the region the 'knee' preset gives the network (at ``tile`` px)."""
    from kneeosteo.data.knee import knee_roi

    chosen, seen = [], set()
    for r in recs:
        key = (r["framing"], r["path"].split("/")[0])
        if key not in seen and r["knee"] is not None:
            seen.add(key)
            chosen.append(r)
    pairs_ = []
    for r in chosen:
        u8 = to_uint8(r["pixels"])
        h, w = u8.shape
        s = tile / max(h, w)
        t = cv2.cvtColor(
            cv2.resize(u8, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA),
            cv2.COLOR_GRAY2BGR,
        )
        film = np.zeros((tile, tile, 3), np.uint8)
        film[: t.shape[0], : t.shape[1]] = t
        top, left, side = r["knee"].box()
        cv2.rectangle(
            film,
            (round(left * s), round(top * s)),
            (round((left + side) * s), round((top + side) * s)),
            (0, 255, 255),
            1,
        )
        cv2.putText(
            film,
            f"{Path(r['path']).name} ({r['framing']})",
            (3, tile - 6),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.38,
            (0, 255, 255),
            1,
        )
        roi = cv2.cvtColor(to_uint8(knee_roi(r["pixels"], r["knee"], tile)), cv2.COLOR_GRAY2BGR)
        pairs_.append(np.hstack([film, roi]))
    while len(pairs_) % 2:
        pairs_.append(np.zeros_like(pairs_[0]))
    grid = np.vstack(
        [np.hstack([pairs_[i], np.full((tile, 6, 3), 255, np.uint8), pairs_[i + 1]]) for i in range(0, len(pairs_), 2)]
    )
    with atomic_path(out) as tmp:
        cv2.imwrite(str(tmp) + ".png", grid)
        Path(str(tmp) + ".png").replace(tmp)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    data, marks = Path(argv[0]), Path(argv[1])
    split = argv[argv.index("--split") + 1] if "--split" in argv else "all"
    rows = list(csv.DictReader(marks.open()))
    recs = measure(data, rows)
    for name in ("dev", "test", "all") if split == "all" else (split,):
        chosen = [r for r in recs if name == "all" or r["split"] == name]
        print(summary(chosen, name))
        for framing in sorted({r["framing"] for r in chosen}):
            sub = [r for r in chosen if r["framing"] == framing]
            e = np.array([r["error"] for r in sub])
            print(f"    {framing}: {len(sub)} films, within 0.10: {(e <= 0.10).sum()}, max {e.max():.3f}")
    if "--regions" in argv:
        regions([r for r in recs if split == "all" or r["split"] == split], Path(argv[argv.index("--regions") + 1]))
    if "--pairs" in argv:
        for name in ("dev", "test") if split == "all" else (split,):
            print(name, pairs([r for r in recs if r["split"] == name]))
    if "--gallery" in argv:
        gallery([r for r in recs if split == "all" or r["split"] == split], Path(argv[argv.index("--gallery") + 1]))
    if "--all-films" in argv:
        none, counts = [], {}
        files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        for p in files:
            f = find_knees(read_image(p).pixels)
            counts[len(f.knees)] = counts.get(len(f.knees), 0) + 1
            if not f.knees:
                none.append(f"{p.relative_to(data)}: {f.reason}")
        print(f"all films: {len(files)}, knees found per film: {dict(sorted(counts.items()))}")
        for line in none:
            print("  none:", line)


if __name__ == "__main__":
    main(sys.argv[1:])
