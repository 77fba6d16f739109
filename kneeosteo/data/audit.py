"""`kneeosteo audit`: what is really in a data set, before anyone trains on it.

Reports counts, formats, sizes, exact and near duplicates (and duplicates carrying both labels),
unreadable files, and the metadata-only shortcut accuracy.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from kneeosteo.data.duplicates import (
    NEAR_DUP_THRESHOLD,
    deduplicate,
    exact_groups,
    is_conflict,
    leakage_groups,
    near_duplicate_clusters,
)
from kneeosteo.data.grouping import KEY_SOURCES, dicom_patient_ids, group_summary
from kneeosteo.data.scan import Scan
from kneeosteo.data.shortcut import metadata_only_accuracy
from kneeosteo.utils.atomic import write_json, write_text
from kneeosteo.utils.text import printable


def _dist(values: list[float]) -> dict:
    if not values:
        return {}
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return {"min": float(q[0]), "q1": float(q[1]), "median": float(q[2]), "q3": float(q[3]), "max": float(q[4])}


def _column_summary(recs) -> dict:
    """The manifest's numbers (distribution per class) and its text columns (most common values)."""
    out: dict = {"numbers": {}, "text": {}}
    for col in sorted({c for r in recs for c in r.values}):
        out["numbers"][col] = {
            label: _dist([r.values[col] for r in recs if r.label == label and col in r.values])
            for label in sorted({r.label for r in recs})
        }
    for col in sorted({c for r in recs for c in r.info}):
        counts = Counter(r.info[col] for r in recs if col in r.info)
        out["text"][col] = {"distinct": len(counts), "most_common": dict(counts.most_common(10))}
    return out


def split_check(scan: Scan, split_file: str | Path) -> dict:
    """Does the split file keep every patient in one partition? ``flag`` says what is wrong."""
    import json

    from kneeosteo.data.split import load_split, patient_leaks

    doc = json.loads(Path(split_file).read_text())
    sets = load_split(split_file, scan.root)
    leaks = patient_leaks(sets, scan.records)
    key = doc.get("group_key")
    patient_sources = [k for k in (key or []) if k in KEY_SOURCES]
    carried = [
        s
        for s, n in (
            ("DICOM PatientID", dicom_patient_ids(scan.records)),
            ("manifest patient_id", sum(1 for r in scan.records if r.patient_id)),
        )
        if n
    ]
    flag = ""
    if carried and not patient_sources:
        flag = (
            f"split made without patient ids ({'group_key not recorded' if key is None else 'group_key: ' + ', '.join(key)})"
            f" although the files carry {' and '.join(carried)}"
        )
    if leaks:
        flag = (flag + "; " if flag else "") + f"{len(leaks)} patient(s) span two or more partitions"
    return {
        "file": str(split_file),
        "group_key": key,
        "patients_spanning_partitions": len(leaks),
        "leaks": leaks[:100],
        "flag": flag,
    }


def reference_check(scan: Scan, reference) -> dict:
    """How the scan's labels agree with a reference manifest (``data/reference.py``), per binary
    definition: the table, the disagreeing files, the files with no single truth."""
    from kneeosteo.data.reference import agreement

    return {**reference.summary(), **agreement(reference, {r.path: r.label for r in scan.records}, scan.positive)}


def build_audit(
    scan: Scan, near_threshold: int = NEAR_DUP_THRESHOLD, seed: int = 0, split: str | Path | None = None, reference=None
) -> dict:
    """The audit document; ``split``: also check that split file for patients on both sides;
    ``reference``: a :class:`~kneeosteo.data.reference.Reference` the labels are checked against."""
    recs = scan.records
    per_class = {}
    for label in scan.classes:
        rs = [r for r in recs if r.label == label]
        per_class[label] = {
            "images": len(rs),
            "formats": dict(Counter(r.meta.format for r in rs)),
            "modes": dict(Counter(r.meta.mode for r in rs)),
            "width": _dist([r.meta.width for r in rs]),
            "height": _dist([r.meta.height for r in rs]),
            "aspect_ratio": _dist([r.meta.width / r.meta.height for r in rs]),
            "file_size": _dist([r.meta.file_size for r in rs]),
        }
    groups = exact_groups(recs)
    conflicts = [g for g in groups if is_conflict(g)]
    clusters = near_duplicate_clusters(recs, near_threshold)
    dedup = sorted(deduplicate(recs)[0], key=lambda r: r.path)  # what the shortcut check sees
    lg = leakage_groups(dedup, near_threshold)
    shortcut = metadata_only_accuracy(dedup, [lg[r.path] for r in dedup], seed=seed)
    members = lambda g: [{"path": r.path, "label": r.label} for r in g]  # noqa: E731
    return {
        "data": str(scan.root),
        "classes": scan.classes,
        "positive_class": scan.positive,
        "files_read": len(recs),
        "distinct_images": len({r.content_id for r in recs}),
        "per_class": per_class,
        "exact_duplicates": {
            "groups": len(groups),
            "files_involved": sum(len(g) for g in groups),
            "label_conflicts": len(conflicts),
            "list": [
                {"content_id": g[0].content_id, "conflict": is_conflict(g), "members": members(g)} for g in groups
            ],
        },
        "near_duplicates": {
            "method": "pHash (imagehash.phash, 64 bits), connected components",
            "threshold_bits": near_threshold,
            "clusters": len(clusters),
            "list": [{"cross_label": is_conflict(g), "members": members(g)} for g in clusters],
        },
        "unreadable": scan.unreadable,
        "skipped_not_images": scan.skipped,
        "shortcut_metadata_only": shortcut,
        "labels_from": scan.manifest or "class folders",
        "merge": scan.merge,
        "manifest_rows_left_out": scan.left_out,
        "columns": _column_summary(recs),
        "patients": group_summary(recs),
        **({"split_check": split_check(scan, split)} if split is not None else {}),
        **({"reference": reference_check(scan, reference)} if reference is not None else {}),
    }


_MARKUP = re.compile(r"([\\`*<>\[\]|&])")


def _md(text) -> str:
    """User text (a label, a column, a patient id, a reason quoting them) as Markdown text: control
    characters shown escaped, and HTML, links, emphasis and table pipes taken literally."""
    return _MARKUP.sub(r"\\\1", printable(str(text)))


def _code(text) -> str:
    """A name as a Markdown code span that no backtick in it can end early."""
    t = printable(str(text))
    fence = "`" * (max((len(r) for r in re.findall("`+", t)), default=0) + 1)
    return f"{fence} {t} {fence}" if len(fence) > 1 else f"`{t}`"


def render_markdown(a: dict) -> str:
    lines = [f"# Audit of {_code(a['data'])}", ""]
    lines += [
        f"- files read: {a['files_read']}, distinct images (by decoded pixels): {a['distinct_images']}",
        f"- unreadable files: {len(a['unreadable'])}; skipped (not images): {len(a['skipped_not_images'])}",
        "",
        "## Per class",
        "",
        "| class | images | formats | modes | width median [min-max] | height median [min-max] | aspect median |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, c in a["per_class"].items():
        w, h, ar = c["width"], c["height"], c["aspect_ratio"]
        fmt = ", ".join(f"{k} {v}" for k, v in sorted(c["formats"].items()))
        mode = ", ".join(f"{k} {v}" for k, v in sorted(c["modes"].items()))
        if not w:
            lines.append(f"| {_md(label)} | 0 | | | | | |")
            continue
        lines.append(
            f"| {_md(label)} | {c['images']} | {fmt} | {mode} | {w['median']:.0f} [{w['min']:.0f}-{w['max']:.0f}] "
            f"| {h['median']:.0f} [{h['min']:.0f}-{h['max']:.0f}] | {ar['median']:.3f} |"
        )
    ex = a["exact_duplicates"]
    lines += ["", "## Exact duplicates (same decoded pixels)", ""]
    lines.append(
        f"{ex['groups']} groups, {ex['files_involved']} files; **{ex['label_conflicts']} groups carry both labels**."
    )
    lines.append("")
    for g in ex["list"]:
        tag = "**LABEL CONFLICT** " if g["conflict"] else ""
        lines.append(f"- {tag}" + ", ".join(_code(m["path"]) for m in g["members"]))
    nd = a["near_duplicates"]
    lines += ["", f"## Near duplicates ({nd['method']}, <= {nd['threshold_bits']} bits)", ""]
    lines.append(f"{nd['clusters']} clusters of different pictures within the threshold.")
    lines.append("")
    for g in nd["list"]:
        tag = "(cross-label) " if g["cross_label"] else ""
        lines.append(f"- {tag}" + ", ".join(f"{_code(m['path'])} ({_md(m['label'])})" for m in g["members"]))
    lines += ["", "## Labels and patients", ""]
    lines.append(
        f"labels from: {_code(a['labels_from'])}"
        + (f"; merged: {', '.join(f'{_md(k)} -> {_md(v)}' for k, v in a['merge'].items())}" if a["merge"] else "")
    )
    pt = a["patients"]
    per = pt.get("images_per_patient")
    lines.append(
        f"patients: {pt['patients']} ({', '.join(f'{k} {v}' for k, v in pt['key_sources'].items()) or 'no patient ids'}); "
        f"images without a patient id: {pt['images_without_patient']}"
        + (
            f"; images per patient median {per['median']:g} [{per['min']}-{per['max']}], "
            f"{per['patients_with_2_or_more']} patients with 2 or more"
            if per
            else ""
        )
    )
    for col, by_class in a["columns"]["numbers"].items():
        lines.append(
            f"- {_md(col)}: "
            + "; ".join(
                f"{_md(lab)} median {d['median']:.2f} [{d['min']:.2f}, {d['max']:.2f}]"
                for lab, d in by_class.items()
                if d
            )
        )
    for col, t in a["columns"]["text"].items():
        lines.append(
            f"- {_md(col)}: {t['distinct']} distinct; "
            + ", ".join(f"{_md(k)} {v}" for k, v in t["most_common"].items())
        )
    if a["manifest_rows_left_out"]:
        lines += ["", f"### Manifest rows left out ({len(a['manifest_rows_left_out'])})", ""]
        lines += [f"- row {m['row']} {_code(m['path'])}: {_md(m['reason'])}" for m in a["manifest_rows_left_out"]]
    if "split_check" in a:
        sc = a["split_check"]
        lines += ["", f"### Split check: {_code(sc['file'])}", ""]
        lines.append(
            f"**{sc['flag']}**"
            if sc["flag"]
            else f"every patient in one partition (group key: {', '.join(sc['group_key'] or ['not recorded'])})"
        )
        for leak in sc["leaks"][:20]:
            lines.append(
                f"- {_md(leak['key'])}: "
                + "; ".join(f"{p}: {_md(', '.join(v))}" for p, v in leak["partitions"].items())
            )
    if "reference" in a:
        lines += reference_lines(a["reference"], a["positive_class"])
    lines += ["", "## Unreadable files", ""]
    lines += [f"- {_code(u['path'])}: {_md(u['reason'])}" for u in a["unreadable"]] or ["none"]
    s = a["shortcut_metadata_only"]
    lines += ["", "## Shortcut check: label from file metadata only", ""]
    if s.get("accuracy") is None:
        lines.append(f"not computed: {s.get('reason')}")
    else:
        lo, hi = s["accuracy_ci95"]
        lines += [
            f"{s['classifier']} on {s['n']} de-duplicated images, features {', '.join(s['features'])}:",
            "",
            f"**accuracy {s['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), AUC {s['auc']:.3f}**; "
            f"majority-class baseline {s['majority_baseline']:.3f}. Most used: {', '.join(s['top_features'])}.",
            "",
            "An image model must beat this by a clear margin before it can be said to look at bone.",
        ]
    return "\n".join(lines) + "\n"


def reference_lines(ref: dict, positive: str) -> list[str]:
    """The audit's reference section: agreement per definition, disagreeing and multi-truth files."""
    lines = [
        "",
        f"## Labels against the reference `{ref['file']}`",
        "",
        f"{ref['rows']} rows for {ref['files']} files; {ref['files_with_single_truth']} files in the data with a "
        f"single truth are compared; {len(ref['multi_truth'])} file(s) with no single truth are excluded from "
        f"training and scoring whenever this reference is used; {len(ref['not_in_data'])} reference file(s) "
        "not among the data's files.",
        "",
        f"| definition | label '{positive}' agrees with the reference | share | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in ref["definitions"].values():
        t = d["table"]
        share = "" if d["share"] is None else f"{d['share']:.3f}"
        lines.append(
            f"| {d['meaning']} | {d['agree']} of {d['of']} | {share} | {t['tp']} | {t['fp']} | {t['fn']} | {t['tn']} |"
        )
    lines += [
        "",
        "Folder label by WHO band: "
        + "; ".join(
            f"{lab}: " + ", ".join(f"{b} {n}" for b, n in bands.items())
            for lab, bands in sorted(ref["folder_by_band"].items())
        ),
    ]
    for name, d in ref["definitions"].items():
        lines += ["", f"### Files whose label disagrees ({name}: {len(d['disagreeing'])})", ""]
        lines += [
            f"- `{m['path']}`: label {m['folder']}, reference {m['band']}"
            + ("" if m["t_score"] is None else f" (T {m['t_score']:g})")
            for m in d["disagreeing"]
        ] or ["none"]
    lines += ["", f"### Files with no single truth (excluded: {len(ref['multi_truth'])})", ""]
    lines += [f"- `{m['path']}`: {m['reason']}" for m in ref["multi_truth"]] or ["none"]
    if ref["not_in_data"]:
        lines += ["", f"### Reference files not in the data ({len(ref['not_in_data'])})", ""]
        lines += [f"- `{p}`" for p in ref["not_in_data"]]
    return lines


def summary_lines(a: dict) -> list[str]:
    ex, nd, s = a["exact_duplicates"], a["near_duplicates"], a["shortcut_metadata_only"]
    counts = ", ".join(f"{k} {v['images']}" for k, v in a["per_class"].items())
    out = [
        f"files read: {a['files_read']} ({counts}); distinct images: {a['distinct_images']}",
        f"exact duplicate groups: {ex['groups']} ({ex['files_involved']} files), label conflicts: {ex['label_conflicts']}",
        f"near-duplicate clusters (pHash <= {nd['threshold_bits']} bits): {nd['clusters']}",
        f"unreadable: {len(a['unreadable'])}, skipped non-images: {len(a['skipped_not_images'])}",
        f"patients: {a['patients']['patients']} (images without a patient id: {a['patients']['images_without_patient']})",
    ]
    if a["manifest_rows_left_out"]:
        out.append(f"manifest rows left out: {len(a['manifest_rows_left_out'])} (reasons in audit.md)")
    if a.get("split_check", {}).get("flag"):
        out.append(f"SPLIT CHECK: {a['split_check']['flag']}")
    ref = a.get("reference")
    if ref:
        for d in ref["definitions"].values():
            out.append(
                f"labels vs reference, {d['meaning']}: {d['agree']} of {d['of']} agree "
                f"({len(d['disagreeing'])} disagree)"
            )
        out.append(
            f"reference files with no single truth (excluded): {len(ref['multi_truth'])}"
            + (f" ({', '.join(m['path'] for m in ref['multi_truth'])})" if ref["multi_truth"] else "")
        )
    if s.get("accuracy") is not None:
        lo, hi = s["accuracy_ci95"]
        out.append(f"metadata-only accuracy: {s['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), AUC {s['auc']:.3f}")
    return out


def write_audit(a: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    write_json(out_dir / "audit.json", a)
    # File names that are not valid UTF-8 arrive as lone surrogates (os.fsdecode); show their
    # bytes as \xNN instead of crashing on encoding the report.
    md = render_markdown(a).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    write_text(out_dir / "audit.md", md)
    return out_dir / "audit.json", out_dir / "audit.md"
