"""The `kneeosteo` command line: one obvious entry point per task.

Exit codes: 0 success, 2 bad usage (typer/click), 1 a data or model error, reported as one line
naming the culprit.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kneeosteo.paths import KAGGLE_HELP, find_data_dir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Osteoporosis detection in knee radiographs: audit, split, train, evaluate.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


class CliError(Exception):
    """An expected failure: printed as one line, exit code 1."""


def _data(path: Optional[Path]) -> Path:
    found = find_data_dir(str(path) if path else None)
    if found is None:
        raise CliError(f"{path}: data folder not found" if path else KAGGLE_HELP)
    return found


DataArg = typer.Argument(None, help="Data folder with class sub-folders (default: $KNEEOSTEO_DATA, ./data/kop, ../shared/datasets/kop).")


@app.command()
def audit(
    data: Optional[Path] = DataArg,
    out: Path = typer.Option(Path("out/audit"), "--out", help="Folder for audit.json and audit.md."),
    positive: str = typer.Option("osteoporosis", help="Name of the positive class folder."),
    near_threshold: int = typer.Option(6, help="pHash Hamming distance (bits of 64) for near duplicates."),
    seed: int = typer.Option(0, help="Seed of the shortcut check's cross-validation."),
):
    """Count, de-duplicate and check a data set for label shortcuts; writes audit.json and audit.md."""
    from kneeosteo.data.audit import build_audit, summary_lines, write_audit
    from kneeosteo.data.scan import scan_dataset

    scan = scan_dataset(_data(data), positive=positive, require_binary=False)
    report = build_audit(scan, near_threshold=near_threshold, seed=seed)
    paths = write_audit(report, out)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {paths[0]} and {paths[1]}")


@app.command()
def split(
    data: Optional[Path] = DataArg,
    out: Path = typer.Option(Path("out/split.json"), "--out", help="Where to write the split JSON."),
    protocol: str = typer.Option("paper", help="paper: 72-image stratified test set, 10% validation; kfold: K folds."),
    folds: int = typer.Option(5, help="Number of folds for --protocol kfold."),
    seed: int = typer.Option(0, help="Random seed."),
    test_size: int = typer.Option(72, help="Test images for --protocol paper (the paper's 72)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of the non-test images used for validation."),
    positive: str = typer.Option("osteoporosis", help="Name of the positive class folder."),
    near_threshold: int = typer.Option(6, help="pHash distance that makes two images one leakage group."),
):
    """De-duplicate, then split into train/val/test with no picture shared between partitions."""
    from kneeosteo.data.scan import scan_dataset
    from kneeosteo.data.split import make_split, write_split

    if protocol not in ("paper", "kfold"):
        raise typer.BadParameter("use 'paper' or 'kfold'", param_hint="--protocol")
    scan = scan_dataset(_data(data), positive=positive)
    doc = make_split(scan, protocol, seed, test_size, val_fraction, folds, near_threshold)
    write_split(doc, out)
    parts = doc["folds"] if protocol == "kfold" else [doc]
    for k, p in enumerate(parts):
        tag = f"fold {k}: " if protocol == "kfold" else ""
        print(tag + ", ".join(f"{name} {len(p[name])}" for name in ("train", "val", "test")))
    print(f"excluded {len(doc['excluded'])} files (duplicates, label conflicts); wrote {out}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    from kneeosteo.data.reader import ImageReadError
    from kneeosteo.data.scan import DataError

    try:
        app(args=argv, standalone_mode=True)
    except (CliError, DataError, ImageReadError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, markup=True)
        sys.exit(1)
