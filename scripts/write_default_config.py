"""Write configs/default_model.toml for a run about to be bundled as the default model.

Usage: python scripts/write_default_config.py RUN LEVER_TOML [OUT_TOML]

RUN: the run being bundled (its config.json's settings are what it was trained with); LEVER_TOML:
the settings file of the grid row it comes from (e.g. configs/levers/knee384.toml): its keys are
the ones the new file names, each with RUN's value (so limits the grid imposed, such as
``--epochs 8 --patience 3``, are written as they were trained, not as the lever file says), and
the trust settings RUN was calibrated with (operating point, coverage, domain acceptance).
OUT_TOML: default configs/default_model.toml. The comment header says what the model is and by
which rule it was chosen; every figure in it is read from RUN's files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kneeosteo.config import FLAT, SECTIONS, load_config, read_settings
from kneeosteo.data import knee as knee_mod
from kneeosteo.run import RunDir
from kneeosteo.utils.atomic import write_text

ROOT = Path(__file__).resolve().parent.parent
TRUST_KEYS = ("operating_point", "coverage", "domain_acceptance")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float | str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise SystemExit(f"cannot write {v!r} ({type(v).__name__}) as a TOML value")


def header(rd: RunDir, lever: Path) -> str:
    s = rd.config.settings
    prep = rd.config.preprocess
    model = "the hybrid (frozen {b} + attention module + FC head)" if s["attention"] else "{b} + FC head"
    region = (
        "each knee joint's region: every knee found by the label-free localiser\n"
        f"# (kneeosteo.data.knee), a square of {knee_mod.ROI_SCALE:g} tibial plateau widths around the joint, "
        f"at {prep.size} px"
        if prep.preset == "knee"
        else f"the `{prep.preset}` preset at {prep.size} px"
    )
    weighted = (
        ",\n# each training film weighted by 1 / P(its label | file metadata) against the source shortcut"
        if s.get("reweight") == "metadata"
        else ""
    )
    where = lever.relative_to(ROOT) if lever.is_relative_to(ROOT) else lever
    return (
        f"# The bundled default model: {model.format(b=s['backbone'])}\n"
        f"# shown {region};\n# {s.get('copies')} offline copies per training film{weighted};\n"
        f"# at most {s['epochs']} epochs, patience {s['patience']} (the limits it was trained with).\n"
        "# Chosen by the rule in research/DEFAULT_CHOICE.md (2026-12-07 03:05: the five-seed grid on the\n"
        f"# held-out source, `reproduce --protocol holdout-reference`, {lever.stem} against the previous\n"
        "# default's settings; the bundled weights are its seed-0 cell, never the best seed).\n"
        f"# The keys of {where}, with the values the bundled run was trained with.\n"
        "# The paper's own protocol is configs/paper.toml (`make run`). Train this on any split:\n"
        "#   kneeosteo train DATA --config configs/default_model.toml --split S --out RUN\n"
    )


def sectioned(keys: list[str], values: dict) -> str:
    """The settings ``keys`` (flat) with their ``values`` as TOML tables, one per section
    (``[data]``, ``[model]``, ...: kneeosteo.config's order), each key under its own name there."""
    tables: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for k in keys:
        s = FLAT[k]
        tables[s.section].append(f"{s.name} = {toml_value(values[k])}\n")
    return "\n".join(f"[{name}]\n" + "".join(lines) for name, lines in tables.items() if lines)


def main(run: str, lever: str, out: str | None = None) -> None:
    rd = RunDir.open(Path(run))
    lever_path = Path(lever).resolve()
    keys = list(read_settings(lever_path))  # either form of settings file, flat keys in its order
    # and the trust settings the bundled run was calibrated with (`calibrate` records them), so
    # that training with this file fits the same trust pieces
    keys += [k for k in TRUST_KEYS if k not in keys]
    settings = rd.config.settings
    missing = [k for k in keys if k not in settings]
    if missing:
        raise SystemExit(f"{run}: its settings do not record {missing}")
    body = sectioned(keys, settings)
    dest = Path(out) if out else ROOT / "configs" / "default_model.toml"
    text = header(rd, lever_path) + body
    write_text(dest, text)
    cfg = load_config(dest, {})  # the file reads back as the run's settings
    flat = cfg.to_dict()
    for k in keys:
        got = tuple(flat[k]) if isinstance(flat[k], list) else flat[k]
        want = tuple(settings[k]) if isinstance(settings[k], list) else settings[k]
        if got != want:
            raise SystemExit(f"{dest}: {k} reads back as {got!r}, the run has {want!r}")
    print(f"wrote {dest} ({len(keys)} settings of {run})")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
