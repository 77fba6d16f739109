"""The `kneeosteo` command line: one obvious entry point per task.

Exit codes: 0 success, 2 bad usage (click's usage errors and :class:`~kneeosteo.errors.ConfigError`),
1 any other :class:`~kneeosteo.errors.KneeosteoError` (data, model, output). ``main`` catches the
one root and prints one line naming the culprit; anything else is a bug and keeps its traceback.
Choices offered here are the ones the config validates (``kneeosteo.config``, the registries).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import typing
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from kneeosteo.choices import CLASSIFICATION_TASKS
from kneeosteo.config import FLAT, Setting
from kneeosteo.data import formats
from kneeosteo.data.manifest import TARGETS
from kneeosteo.data.reference import DEFINITIONS
from kneeosteo.errors import DataError, KneeosteoError, OutputError
from kneeosteo.paths import KAGGLE_HELP, find_data_dir
from kneeosteo.utils.text import printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Osteoporosis detection in knee radiographs: audit, split, train, evaluate.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _data(path: Path | None) -> Path:
    found = find_data_dir(str(path) if path else None)
    if found is None:
        raise DataError(f"{path}: data folder not found" if path else KAGGLE_HELP)
    return found


def _choice(options):
    """A value parser that accepts only ``options`` (click exits 2 with the list otherwise); a
    function returning them is called only when a value is parsed (the backbone registry imports
    torch, which ``--help`` should not wait for)."""

    def parse(value: str) -> str:
        allowed = [str(o) for o in (options() if callable(options) else options)]
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(allowed)}")
        return value

    return parse


def _backbones() -> list[str]:
    from kneeosteo.models import list_backbones

    return list_backbones()


PROTOCOLS = ("paper", "kfold", "holdout-reference")  # kneeosteo.data.split.PROTOCOLS (not imported: sklearn)


# the training settings' help, written once in kneeosteo.config; other commands that take the
# same thing say it the same way
OPERATING_POINT_HELP = FLAT["operating_point"].help
COVERAGE_HELP = FLAT["coverage"].help
ACCEPTANCE_HELP = FLAT["domain_acceptance"].help
DataArg = typer.Argument(
    None, help="Data folder with class sub-folders (default: $KNEEOSTEO_DATA, ./data/kop, ../shared/datasets/kop)."
)
PositiveOpt = typer.Option(FLAT["positive"].default, help=FLAT["positive"].help)
RAY_HELP = (
    "Run on Ray: --ray alone (or --ray local) starts a local Ray instance with this machine's cores; "
    "--ray auto joins this machine's cluster; --ray HOST:PORT or ray://HOST:PORT another one. "
    "Needs pip install 'kneeosteo\\[ray]'."
)


def RayOpt():
    return typer.Option(None, "--ray", metavar="[ADDRESS]", help=RAY_HELP)


def ray_flag(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional address (click options cannot): a bare ``--ray`` (last, or
    followed by an option or by anything that is not an address, such as an input folder) becomes
    ``--ray=local``."""
    from kneeosteo.utils.ray_cluster import is_address

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-") or not is_address(out[i + 1])):
            out[i] = "--ray=local"
    return out


LABELS_HELP = FLAT["labels"].help
MERGE_HELP = FLAT["merge"].help
TASK_HELP = FLAT["task"].help
TARGET_HELP = FLAT["target"].help
CLASSES_HELP = FLAT["classes"].help


def LabelsOpt():
    return typer.Option(None, "--labels", help=LABELS_HELP)


REFERENCE_HELP = (
    "Reference manifest (CSV: path,t_score[,diagnosis,source_id,age,sex,weight_kg,...]; a file may "
    "have several rows): the measured truth the labels are checked against. See README 'Reference labels'."
)
DEFINITION_HELP = "Binary truth from the reference: osteoporosis (T <= -2.5, WHO) or low_bone_mass (T < -1)."


def ReferenceOpt():
    return typer.Option(None, "--reference", help=REFERENCE_HELP)


def MergeOpt():
    return typer.Option(None, "--merge", help=MERGE_HELP)


def _classes(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


NearOpt = typer.Option(
    6,
    help="pHash Hamming distance (bits of 64) at or below which two images are near "
    "duplicates, i.e. one leakage group.",
)


@app.command()
def audit(
    data: Path | None = DataArg,
    out: Path = typer.Option(Path("out/audit"), "--out", help="Folder for audit.json and audit.md."),
    positive: str = PositiveOpt,
    near_threshold: int = NearOpt,
    seed: int = typer.Option(0, help="Seed of the shortcut check's cross-validation."),
    labels: Path | None = LabelsOpt(),
    merge: list[str] | None = MergeOpt(),
    target: str = typer.Option("label", parser=_choice(TARGETS), help=TARGET_HELP),
    split_file: Path | None = typer.Option(
        None, "--split", help="Also check this split file: does any patient span two partitions?"
    ),
    reference: Path | None = ReferenceOpt(),
):
    """Count, de-duplicate and check a data set for label shortcuts and patients; writes audit.json and audit.md."""
    from kneeosteo.data.audit import build_audit, summary_lines, write_audit
    from kneeosteo.data.reference import read_reference
    from kneeosteo.data.scan import scan_dataset
    from kneeosteo.utils.atomic import ensure_writable

    ensure_writable(out)  # fail before the scan, not after it
    root = _data(data)
    ref = read_reference(reference, root) if reference is not None else None  # a bad reference fails before the scan
    scan = scan_dataset(root, positive=positive, require_binary=False, labels=labels, merge=merge, target=target)
    report = build_audit(scan, near_threshold=near_threshold, seed=seed, split=split_file, reference=ref)
    paths = write_audit(report, out)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {paths[0]} and {paths[1]}")


@app.command()
def split(
    data: Path | None = DataArg,
    out: Path = typer.Option(Path("out/split.json"), "--out", help="Where to write the split JSON."),
    protocol: str = typer.Option(
        "paper",
        parser=_choice(PROTOCOLS),
        help="paper: 72-image stratified test set, 10% validation; kfold: K folds; holdout-reference: test = the --reference films scored against their T-score truth, train/val = the rest.",
    ),
    folds: int = typer.Option(5, help="Number of folds for --protocol kfold."),
    seed: int = typer.Option(0, help="Random seed."),
    test_size: int = typer.Option(72, help="Test images for --protocol paper (the paper's 72)."),
    val_fraction: float = typer.Option(0.1, help="Fraction of the non-test images used for validation."),
    positive: str = PositiveOpt,
    near_threshold: int = NearOpt,
    labels: Path | None = LabelsOpt(),
    merge: list[str] | None = MergeOpt(),
    task: str = typer.Option("binary", parser=_choice(CLASSIFICATION_TASKS), help=TASK_HELP),
    target: str = typer.Option("label", parser=_choice(TARGETS), help=TARGET_HELP),
    classes: str | None = typer.Option(None, help=CLASSES_HELP),
    reference: Path | None = ReferenceOpt(),
    definition: str = typer.Option("osteoporosis", parser=_choice(DEFINITIONS), help=DEFINITION_HELP),
):
    """De-duplicate, then split into train/val/test with no picture or patient shared between partitions."""
    from kneeosteo.data.reference import read_reference
    from kneeosteo.data.scan import scan_dataset
    from kneeosteo.data.split import make_split, write_split
    from kneeosteo.tasks import task_named
    from kneeosteo.utils.atomic import ensure_writable

    ensure_writable(out.parent)
    root = _data(data)
    ref = read_reference(reference, root) if reference is not None else None
    scan = scan_dataset(
        root,
        positive=positive,
        labels=labels,
        merge=merge,
        target=target,
        classes=_classes(classes),
        require_binary=task_named(task, target).require_binary,
    )
    doc = make_split(
        scan, protocol, seed, test_size, val_fraction, folds, near_threshold, reference=ref, definition=definition
    )
    write_split(doc, out)
    parts = doc["folds"] if protocol == "kfold" else [doc]
    for k, p in enumerate(parts):
        tag = f"fold {k}: " if protocol == "kfold" else ""
        print(tag + ", ".join(f"{name} {len(p[name])}" for name in ("train", "val", "test")))
    if "reference" in doc:
        print(
            f"held out: {len(doc['test'])} reference films, truth {doc['reference']['meaning']}; "
            f"{len(doc['reference']['multi_truth'])} reference file(s) with no single truth excluded"
        )
    why = "duplicates, label conflicts" + (", links to held-out films, no single truth" if "reference" in doc else "")
    print(
        f"excluded {len(doc['excluded'])} files ({why}); classes {', '.join(doc['classes'])}; "
        f"kept together by: {', '.join(doc['group_key'])} ({doc['groups']} groups)"
    )
    if scan.left_out:
        print(f"left out {len(scan.left_out)} manifest row(s); `kneeosteo audit --labels` lists why")
    print(f"wrote {out}")


def _pair(text: str | None, name: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter("give two numbers as LOW,HIGH", param_hint=name) from None
    return lo, hi


def _shown_default(s: Setting) -> str | None:
    """The default as ``--help`` shows it, from the settings table (None: nothing to show)."""
    v = s.default
    if v is None or v == () or v == {}:
        return None
    if isinstance(v, bool):
        on, _, off = (s.flag or "").partition("/")
        return on if v else off
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _setting_option(s: Setting, note: str | None) -> inspect.Parameter:
    """One training setting as a typer option: its flag, help and choices from the table; None
    (not given) by default, so a settings file or the table's default applies."""
    base = [t for t in typing.get_args(s.type) if t is not type(None)] or [s.type]  # int | None -> int
    annotation: Any = {"pair": str, "names": str, "repeat": list[str], "path": Path}.get(
        s.parse or "", base[0] if base[0] in (bool, int, float, str) else str
    )
    shown = _shown_default(s)
    option = typer.Option(
        None,
        s.flag or "",
        help=s.help + (f" {note}" if note else "") + (f" Default: {shown}." if shown else ""),
        show_default=False,
        metavar=s.metavar,
        parser=_choice(s.choices) if s.choices else None,
    )
    return inspect.Parameter(s.key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation | None)


def _from_option(s: Setting, value: Any) -> Any:
    if value is None:
        return None
    if s.parse == "pair":
        return _pair(value, (s.flag or "").split("/")[0])
    if s.parse == "names":
        return _classes(value)
    if s.parse == "repeat":
        return list(value) or None
    if s.parse == "path":
        return str(value)
    return value


def setting_options(*keys: str, notes: dict[str, str] | None = None):
    """A command decorator: the command's ``settings`` parameter becomes one option per training
    setting named (flat keys; none named: every setting that has a flag), generated from the table
    in :mod:`kneeosteo.config`, and receives the given ones as ``{flat key: value}``."""
    rows = [FLAT[k] for k in keys] if keys else [s for s in FLAT.values() if s.flag]

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        params = list(sig.parameters.values())
        at = [p.name for p in params].index("settings")
        generated = [_setting_option(s, (notes or {}).get(s.key)) for s in rows]
        params = params[:at] + generated + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[at + 1 :]]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            given = {s.key: _from_option(s, kwargs.pop(s.key, None)) for s in rows}
            return fn(*args, **kwargs, settings={k: v for k, v in given.items() if v is not None})

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def ConfigOpt(help: str):
    return typer.Option(None, "--config", help=help)


@app.command()
@setting_options()
def train(
    ctx: typer.Context,
    data: Path | None = DataArg,
    settings: dict | None = None,
    config: Path | None = ConfigOpt(
        "TOML file with any of these settings, in \\[data], \\[model], \\[augment], \\[optimiser], \\[runtime] "
        "and \\[trust] tables (configs/paper.toml), or the old flat \\[train] table."
    ),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the interrupted run in this folder."),
    devices: int = typer.Option(
        1,
        min=1,
        help="Data-parallel processes on this machine (one per GPU, or CPU processes): torchrun + DistributedDataParallel.",
    ),
    nodes: int = typer.Option(1, min=1, help="Machines; run the same command on each, with --master."),
    master: str | None = typer.Option(None, help="HOST:PORT of the rendezvous (one of the --nodes machines)."),
):
    """Train the hybrid model (or an ablation) and score it on the held-out test set."""
    from kneeosteo.config import load_config
    from kneeosteo.experiments.pipeline import train_and_score
    from kneeosteo.run import RunDir

    if resume is not None:
        stored = RunDir.open(resume).config.settings
        base = {k: v for k, v in stored.items() if k in FLAT or k == "extra"}
        cfg = load_config(None, {**base, "out": str(resume)})
    else:
        given = dict(settings or {})
        if data or not config:
            given["data"] = str(_data(data))
        cfg = load_config(config, given)
        if cfg.data.path is None:
            cfg.data.path = str(_data(None))
    from kneeosteo.training.distributed import is_main_process, launch_if_asked
    from kneeosteo.utils.atomic import ensure_writable

    out = cfg.runtime.out
    ensure_writable(out)  # a read-only or full disk fails now, not after the features
    if launch_if_asked(ctx, devices, nodes, master):
        return
    try:
        run = train_and_score(cfg, resume=resume is not None)
    except OutputError as exc:
        if RunDir(out).is_run():
            raise OutputError(f"{exc}; fix that, then continue with `kneeosteo train --resume {out}`") from exc
        raise
    if is_main_process():
        print(f"run written to {run}")


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A run folder written by `kneeosteo train`."),
    data: Path | None = typer.Argument(None, help="Score on every image of this class-folder data set instead."),
    split_file: Path | None = typer.Option(None, "--split", help="Score on the test part of this split file."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Where to write metrics.json etc. (default: the run folder; RUN/evaluations/NAME for DATA or --split).",
    ),
    threshold: float | None = typer.Option(None, help="Decision threshold (default: the run's, 0.5)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    probes: bool = typer.Option(
        True,
        "--probes/--no-probes",
        help="Run the shortcut probes (shortcut-adversarial accuracy, occlusion AUCs, source probe).",
    ),
    labels: Path | None = LabelsOpt(),
    reference: Path | None = ReferenceOpt(),
    covariates: str | None = typer.Option(
        None,
        help="Comma-separated covariate columns of --reference (such as age,sex,weight_kg): also score the clinical logistic, the OST index and the fused model beside the image model.",
    ),
    definition: str | None = typer.Option(
        None, parser=_choice(DEFINITIONS), help=DEFINITION_HELP + " Default: the split's, else osteoporosis."
    ),
    store_fused: bool = typer.Option(
        False,
        "--store-fused",
        help="With --reference/--covariates: fit the fused model (image + covariates) on those films and store it in the run (fused.json), so predict and the API use the covariates. Its quality figure is the cross-fitted one: the films it is fitted on no longer test it.",
    ),
):
    """Score a trained run: the paper's metrics with 95% intervals, the shortcut probes, predictions.csv and figures."""
    from kneeosteo.evaluation.evaluate import evaluate_run
    from kneeosteo.evaluation.metrics import format_table
    from kneeosteo.evaluation.probes import format_probes
    from kneeosteo.evaluation.task_scoring import format_task_metrics
    from kneeosteo.tasks import task_named

    if labels is not None and data is None:
        raise typer.BadParameter("--labels describes a data folder: give DATA too", param_hint="--labels")
    names = None
    if covariates is not None or reference is not None:
        from kneeosteo.evaluation.clinical import parse_covariates

        if reference is None or covariates is None:
            raise typer.BadParameter("--reference and --covariates go together", param_hint="--covariates")
        names = parse_covariates(covariates)
    metrics, where = evaluate_run(
        run,
        data,
        split_file,
        out,
        device=device,
        threshold=threshold,
        probes=probes,
        labels=labels,
        reference=reference,
        covariates=names,
        definition=definition,
        store_fused=store_fused,
    )
    if not task_named(str(metrics.get("task", "binary"))).paper_metrics:
        print(format_task_metrics(run.name, metrics))
        print(f"wrote metrics.json, predictions.csv and figures to {where}")
        return
    print(format_table({run.name: metrics}))
    if probes:
        print(format_probes(metrics["shortcut_probes"]))
    for line in trust_summary(metrics["trust"]):
        print(line)
    if "clinical" in metrics:
        from kneeosteo.evaluation.clinical import format_comparison

        for line in format_comparison(metrics["clinical"]):
            print(line)
        if metrics["clinical"].get("stored_fused"):
            print(
                f"stored the fused model (fitted on these {metrics['clinical']['n']} films) in "
                f"{metrics['clinical']['stored_fused']}"
            )
    print(f"wrote metrics.json, predictions.csv and figures to {where}")


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="A scored run folder (or an `evaluate` output folder inside one)."),
    run_b: Path = typer.Argument(..., help="Another, scored on the same test images."),
    out: Path | None = typer.Option(None, "--out", help="Also write the tests as JSON here."),
    reference: Path | None = ReferenceOpt(),
    covariates: str | None = typer.Option(
        None,
        help="Comma-separated covariate columns of --reference (such as age,sex,weight_kg): also print the clinical logistic, the OST index and each run fused with the covariates, on the films the reference covers.",
    ),
    definition: str = typer.Option("osteoporosis", parser=_choice(DEFINITIONS), help=DEFINITION_HELP),
):
    """Paired tests of two runs on the same test images: McNemar + DeLong (binary), Stuart-Maxwell + per-class McNemar (multiclass), Wilcoxon on absolute errors (regression)."""
    from kneeosteo.evaluation.compare import clinical_beside, compare_runs, format_comparison
    from kneeosteo.utils.atomic import write_json

    names = None
    if covariates is not None or reference is not None:
        from kneeosteo.evaluation.clinical import parse_covariates

        if reference is None or covariates is None:
            raise typer.BadParameter("--reference and --covariates go together", param_hint="--covariates")
        names = parse_covariates(covariates)
    result = compare_runs(run_a, run_b)
    print(format_comparison(result))
    if names:
        from kneeosteo.evaluation.clinical import format_comparison as format_clinical

        result["clinical"] = clinical_beside(run_a, run_b, reference, names, definition)
        for line in format_clinical(result["clinical"]):
            print(line)
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")


@app.command()
def report(
    path: Path = typer.Argument(..., help="A run folder, or a `reproduce` output folder."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write (self-contained: inline figures, no network)."),
    pdf: Path | None = typer.Option(None, "--pdf", help="Also print it to this PDF with headless Chromium."),
    data: Path | None = typer.Option(None, "--data", help="The data folder (default: the one the run recorded)."),
    correct: int = typer.Option(4, min=0, help="Correctly classified test images shown beside every wrong one."),
    seed: int = typer.Option(0, min=0, help="Seed of the randomised twin in the saliency sanity check."),
):
    """One page of evidence a reviewer asks for: data flow, audit, metrics, calibration, probes, explanations, checklist."""
    from kneeosteo.reporting import write_report

    html = write_report(path, out, pdf=pdf, data=data, correct=correct, seed=seed)
    print(f"wrote {html}" + (f" and {pdf}" if pdf else ""))


@app.command()
def calibrate(
    run: Path = typer.Argument(..., help="A run folder (read only; never changed)."),
    data: Path | None = typer.Argument(
        None,
        help="A site's labelled class folders: fit on every image of it. Without it: the run's own split (or --split).",
    ),
    out: Path = typer.Option(..., "--out", help="The new run folder (weights copied byte for byte, a new model id)."),
    split_file: Path | None = typer.Option(
        None,
        "--split",
        help="Fit as training does, on this split's validation part (domain check on its training part).",
    ),
    operating_point: str = typer.Option("0.5", "--operating-point", help=OPERATING_POINT_HELP),
    coverage: float = typer.Option(0.9, help=COVERAGE_HELP),
    domain_acceptance: float = typer.Option(0.95, help=ACCEPTANCE_HELP),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    labels: Path | None = LabelsOpt(),
    class_conditional: bool = typer.Option(
        False,
        "--class-conditional",
        help="Mondrian conformal sets: one quantile "
        "per class, so the coverage holds within each class (needs more films "
        "of each class: at 0.9, at least 9 per class for a one-class answer).",
    ),
):
    """Fit temperature, operating threshold, conformal sets and domain threshold into a NEW run folder.

    With SITE data (labelled films of one site), first print the site check: the run's own AUC
    (with interval), ECE, calibration slope, set coverage and accuracy there; an AUC interval that
    holds 0.5 is 'no signal at this site' and the new run marks every prediction uncertain."""
    from kneeosteo.experiments.trust_fit import calibrate_run, check_new_run_folder, site_check_lines, trust_line
    from kneeosteo.tasks import task_for
    from kneeosteo.trust.conformal import _check_coverage
    from kneeosteo.trust.operating_point import parse_operating_point
    from kneeosteo.utils.atomic import ensure_writable

    parse_operating_point(operating_point)
    _check_coverage(coverage)
    if not 0 < domain_acceptance < 1:
        raise typer.BadParameter("must lie in (0, 1), such as 0.95", param_hint="--domain-acceptance")
    check_new_run_folder(run, out)  # before ensure_writable creates it
    ensure_writable(out)
    new = calibrate_run(
        run,
        out,
        data,
        split_file,
        operating_point=operating_point,
        coverage=coverage,
        acceptance=domain_acceptance,
        device=device,
        labels=labels,
        class_conditional=class_conditional,
    )
    if not task_for(new.config).has_operating_point:
        from kneeosteo.experiments.task_trust import task_trust_line

        print(task_trust_line(new.trust))
    else:
        if new.trust.site_check is not None:
            print("\n".join(site_check_lines(new.trust.site_check)))
        print(trust_line(new.trust))
    print(f"wrote {new.path} (model {new.model_id}); {run} is unchanged")


def trust_summary(t: dict) -> list[str]:
    """evaluate's lines about trust (metrics.json's ``trust`` block)."""

    def ece(block):
        e = block.get("ece")
        return "-" if e is None else f"{e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"

    lines = [f"calibration (raw): ECE {ece(t['raw'])}, Brier {t['raw']['brier']:.3f}"]
    if not t["calibrated"]:
        return lines + [
            "this run has no trust files: probabilities are uncalibrated, no domain check "
            "(add them with `kneeosteo calibrate`)"
        ]
    c = t["calibrated_probabilities"]
    lines.append(
        f"calibration (calibrated): ECE {ece(c)}, Brier {c['brier']:.3f}, slope {c.get('slope', float('nan')):.3f}"
    )
    at = t["at_operating_threshold"]
    lines.append(
        f"at the operating threshold {t['threshold']:.4g} ({t['operating_point']}): sensitivity "
        f"{at['sensitivity']['value']:.3f}, specificity {at['specificity']['value']:.3f}"
    )
    lines.append(
        f"conformal coverage {t['conformal_coverage']:.3f} (target {t['coverage']:g}), abstention "
        f"{t['abstention_rate']:.3f}; domain acceptance {t.get('domain_acceptance_by_features', float('nan')):.3f}"
    )
    per = t.get("conformal_coverage_per_class")
    if per:
        kind = "Mondrian sets" if t.get("class_conditional") else "one quantile for both classes"
        lines.append(
            "coverage per class ("
            + kind
            + "): "
            + ", ".join(f"{c} {'-' if v is None else format(v, '.3f')}" for c, v in per.items())
        )
    folder = t.get("conformal_coverage_folder_labels")
    if folder:
        lines.append(
            f"conformal coverage of the films' folder labels (the truth the sets were calibrated on): "
            f"{folder['covered']} of {folder['n']} ({folder['coverage']:.3f}); the figure above is against the "
            "truth these films are scored against"
        )
    shift = t.get("batch_shift")
    if shift:
        p = "" if shift.get("p_value") is None else f", KS {shift['statistic']:.3f}, p {shift['p_value']:.3g}"
        lines.append(f"batch shift over these {shift['n']} images: {shift['verdict']}{p}")
    site = t.get("site_check")
    if site:
        lines.append(f"site check (when calibrated): {site['verdict']}: {site['reason']}")
    return lines


@app.command()
def summary(
    backbone: str = typer.Option(FLAT["backbone"].default, help=FLAT["backbone"].help),
    attention: bool = typer.Option(
        FLAT["attention"].default, "--attention/--no-attention", help=FLAT["attention"].help
    ),
    depth: int = typer.Option(3, help="How deep to expand nested modules."),
):
    """Print the network layer by layer with output shapes and parameters (the paper's Fig. 1 and 2)."""
    import torch
    from torchinfo import summary as torchinfo_summary

    from kneeosteo.models import build_model

    model, _ = build_model(backbone, weights="none", attention=attention)
    model.eval()
    x = torch.zeros(1, 3, 224, 224)
    print(
        torchinfo_summary(
            model,
            input_data={"images": x},
            depth=depth,
            verbose=0,
            col_names=("output_size", "num_params", "trainable"),
        )
    )


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(
        ..., metavar="INPUT", help=f"Image files or folders (searched recursively): {formats.describe()}."
    ),
    run: Path | None = typer.Option(
        None, "--run", help="Run folder from `kneeosteo train` (default: the bundled model)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="preds.csv, preds.json or preds.parquet (a folder of Parquet part files; needs pyarrow) (default: a table on stdout).",
    ),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Decision threshold (default: the model's)."),
    engine: str = typer.Option(
        "auto",
        help="auto (default: onnxruntime on the CPU, the fastest engine that matches fp32, see docs/results/benchmarks/RESULTS.md; torch on CUDA), torch (PyTorch fp32), onnxruntime (fp32, runs the model's ONNX export); lossy, for throughput only: torch-bf16 (bf16 autocast), onnxruntime-int8 (static int8, calibrated on the run's training images).",
    ),
    onnx_file: Path | None = typer.Option(
        None,
        "--onnx",
        help="Exported .onnx for --engine onnxruntime (default: export the run on demand, kept in the cache).",
    ),
    batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu or cuda (torch engine)."),
    workers: int = typer.Option(
        1, min=1, help="Processes sharing the files (whole batches each); same rows as one, in input order."
    ),
    ray: str | None = RayOpt(),
    actors: int | None = typer.Option(
        None,
        min=1,
        help="With --ray: model actors (default: the cluster's CPUs, less the read tasks', / --cpus-per-actor).",
    ),
    cpus_per_actor: float = typer.Option(
        1.0, min=0.01, help="With --ray: CPUs each model actor asks for (its threads)."
    ),
    dicom_out: Path | None = typer.Option(
        None,
        "--dicom-out",
        help="Also write, per DICOM input (and per other input listed in --dicom-manifest), a DICOM SR and (in domain) a heat-map Secondary Capture into this folder (research use only; needs the pacs extra).",
    ),
    dicom_manifest: Path | None = typer.Option(
        None,
        "--dicom-manifest",
        help="With --dicom-out, for inputs that are not DICOM (PNG, JPEG...): a CSV with path, PatientID, PatientName, StudyInstanceUID (required) and PatientBirthDate, PatientSex, StudyDate, StudyTime, StudyID, AccessionNumber, ReferringPhysicianName, StudyDescription, Laterality (optional, empty if blank); each listed film is also written as a DICOM Secondary Capture (derived, research use only, new UIDs) that its SR references. A film without a valid row is named and gets none.",
    ),
    covariates: Path | None = typer.Option(
        None,
        "--covariates",
        help="For a run with a fused model (fused.json, `evaluate --store-fused`): a CSV with path and the model's covariate columns; adds fused_probability, and answer_basis image_and_covariates (image_only where a value is missing, named on stderr).",
    ),
):
    """P(osteoporosis) per image, as path,content_id,probability,label,threshold,model; unreadable files are listed at the end."""
    from kneeosteo.inference import ENGINES, Predictor
    from kneeosteo.inference.output import OUTPUT_SUFFIXES, format_table, write_predictions

    if out is not None and out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise typer.BadParameter(f"{out}: use a .csv, .json or .parquet file name", param_hint="--out")
    if ray is not None:
        from kneeosteo.inference.output import STREAM_SUFFIXES
        from kneeosteo.utils.ray_cluster import check_address, import_ray

        if out is None or out.suffix.lower() not in STREAM_SUFFIXES:
            raise typer.BadParameter(
                "--ray streams its rows into --out preds.parquet (a folder of part files) or preds.csv",
                param_hint="--out",
            )
        if workers > 1:
            raise typer.BadParameter(
                "--ray and --workers are two ways to share the files; choose one", param_hint="--ray"
            )
        check_address(ray)
        import_ray()  # not installed: one line, before the model is loaded
    if engine not in ENGINES:
        raise typer.BadParameter(f"use one of {', '.join(ENGINES)}", param_hint="--engine")
    if onnx_file is not None and engine != "onnxruntime":
        raise typer.BadParameter("--onnx needs --engine onnxruntime", param_hint="--onnx")
    if dicom_out is not None and (ray is not None or workers > 1):
        raise typer.BadParameter(
            "--dicom-out writes from this one process: drop --ray/--workers", param_hint="--dicom-out"
        )
    from kneeosteo.inference.output import check_output
    from kneeosteo.utils.atomic import ensure_writable

    if dicom_manifest is not None and dicom_out is None:
        raise typer.BadParameter(
            "--dicom-manifest gives patient and study data for --dicom-out: give that too",
            param_hint="--dicom-manifest",
        )
    patients = None
    if dicom_out is not None:
        from kneeosteo.inference.dicom_out import read_dicom_manifest, require_extra

        require_extra()  # before the images are read
        ensure_writable(dicom_out)
        if dicom_manifest is not None:
            patients = read_dicom_manifest(dicom_manifest)  # a bad header: one line, before the images
    if out is not None:
        check_output(out, inputs)  # never replaces what we did not write, nor an input
        ensure_writable(out.parent)  # before reading thousands of images, not after
    kwargs = dict(run=run, engine=engine, onnx=onnx_file, threshold=threshold, batch_size=batch_size, device=device)
    predictor = Predictor(**kwargs)  # loaded here even with --workers/--ray: a bad model fails once, clearly
    table = None
    if covariates is not None:
        if predictor.fused is None:
            raise typer.BadParameter(
                f"model {predictor.model_id} has no fused model (fused.json) to take covariates; "
                "fit one with `kneeosteo evaluate RUN --reference R --covariates ... "
                "--store-fused`",
                param_hint="--covariates",
            )
        if ray is not None:
            raise typer.BadParameter("--covariates is applied in this process: drop --ray", param_hint="--covariates")
        from kneeosteo.inference.covariates import read_covariates

        table = read_covariates(covariates, predictor.fused.covariates)  # before the images are read
    if dicom_out is not None and (predictor.run is None or not predictor.task.supports_dicom_sr):
        raise typer.BadParameter(
            "DICOM reports are written for a binary run folder (--run), whose model also draws the heat map",
            param_hint="--dicom-out",
        )
    if ray is not None:
        from kneeosteo.inference.ray_predict import predict_ray

        rows, errors = predict_ray(
            inputs, out, predictor, kwargs, address=ray, actors=actors, cpus_per_actor=cpus_per_actor
        )
        print(f"wrote {rows} predictions to {out} (model {predictor.model_id})")
        print("batch shift: not assessed with --ray (the rows are streamed out as they come)")
        for err in errors:
            typer.echo(printable(f"{err.path}: {err.reason}"), err=True)
        if not rows:
            raise DataError(
                f"no image could be read ({len(errors)} unreadable, see above)"
                if errors
                else "no image found in the inputs"
            )
        return
    if workers > 1:
        from kneeosteo.inference.sharded import predict_sharded

        result = predict_sharded(inputs, workers, **kwargs)
    else:
        result = predictor.predict(inputs)
    from kneeosteo.inference.batch import assess_batch

    shift = assess_batch(result, predictor.trust, predictor.task)  # before writing: a shift changes the rows
    fused_notes = []
    if predictor.fused is not None:
        from kneeosteo.inference.covariates import apply_covariates

        if table is None:
            fused_notes = [
                f"model {predictor.model_id} takes covariates ({', '.join(predictor.fused.covariates)}; "
                "--covariates FILE.csv): without them every answer is image-only"
            ]
        else:
            result.predictions, fused_notes = apply_covariates(
                result.predictions, predictor.fused, table, str(covariates)
            )
    if out is not None:
        write_predictions(result, out)
        print(f"wrote {len(result.predictions)} predictions to {out} (model {predictor.model_id})")
        print(shift.line())
    elif result.predictions:
        print(format_table(result))
        typer.echo(shift.line(), err=True)
    for err in result.errors:
        typer.echo(printable(f"{err.path}: {err.reason}"), err=True)
    for line in fused_notes:
        typer.echo(printable(line), err=True)
    if not result.predictions:
        raise DataError(
            f"no image could be read ({len(result.errors)} unreadable, see above)"
            if result.errors
            else "no image found in the inputs"
        )
    if dicom_out is not None:
        from kneeosteo.inference import Explainer
        from kneeosteo.inference.dicom_out import write_dicom_results

        explainer = Explainer(predictor.run.path, threshold=threshold, device=device)
        written, skipped = write_dicom_results(result.predictions, explainer, dicom_out, patients)
        for line in skipped:
            typer.echo(printable(line), err=True)
        print(f"wrote {len(written)} DICOM objects to {dicom_out}")


@app.command()
def explain(
    images: list[Path] = typer.Argument(
        ..., metavar="IMAGE", help=f"Image files or folders (searched recursively): {formats.describe()}."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder for NAME.png (radiograph, Grad-CAM, attention) and NAME.json per image."
    ),
    run: Path | None = typer.Option(
        None, "--run", help="Run folder from `kneeosteo train` (default: the bundled model)."
    ),
    target: str = typer.Option(
        "positive",
        parser=_choice(("positive", "negative", "predicted")),
        help="Grad-CAM class: positive (osteoporosis; maps comparable across images), negative or predicted.",
    ),
    threshold: float | None = typer.Option(
        None, min=0.0, max=1.0, help="Decision threshold for the label (default: the model's)."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda."),
):
    """Grad-CAM on the backbone's last feature map and the attention module's spatial map, per image."""
    from kneeosteo.inference import Explainer
    from kneeosteo.inference.report import explain_files

    written, errors = explain_files(Explainer(run, target=target, threshold=threshold, device=device), images, out)
    for _, png, js in written:
        print(printable(f"wrote {png} and {js.name}"))
    for err in errors:
        typer.echo(printable(f"{err.path}: {err.reason}"), err=True)
    if not written:
        raise DataError(
            f"no image could be read ({len(errors)} unreadable, see above)"
            if errors
            else "no image found in the inputs"
        )


@app.command()
def export(
    run: Path | None = typer.Option(
        None, "--run", help="Run folder from `kneeosteo train` (default: the bundled model)."
    ),
    fmt: str = typer.Option("onnx", "--format", parser=_choice(("onnx",)), help="Export format: onnx."),
    out: Path = typer.Option(..., "--out", help="Output file, e.g. model.onnx."),
    opset: int = typer.Option(17, min=17, help="ONNX opset."),
):
    """Export backbone + attention module + head (probability output, dynamic batch) to ONNX, checked with onnx.checker."""
    from kneeosteo.inference import export_onnx

    path = export_onnx(run, out, opset=opset)
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {opset}); onnx.checker passed; "
        f"use it with `kneeosteo predict --engine onnxruntime --onnx {path} IMAGE...`"
    )


@app.command()
@setting_options(
    "epochs",
    "patience",
    "labels",
    "merge",
    notes={
        "epochs": "Per cell, settings-file models included; --quick: 8.",
        "patience": "Settings-file models included; --quick: 3.",
    },
)
def reproduce(
    ctx: typer.Context,
    data: Path | None = DataArg,
    out: Path = typer.Option(Path("runs/reproduce"), "--out", help="Output folder (cells, splits, table1.*)."),
    seeds: int = typer.Option(5, help="Number of seeds (0..N-1); each seed is one split shared by all models."),
    models: str | None = typer.Option(
        None,
        help="Comma-separated model ids (default: all; see --list-models), or settings files (configs/default_model.toml): such a model trains exactly the file's settings.",
    ),
    protocol: str = typer.Option(
        "paper",
        parser=_choice(PROTOCOLS),
        help="paper (72-image test set per seed), kfold (every image tested once per repeat) or holdout-reference (test = the --reference films, scored against their T-score truth, the same every seed).",
    ),
    folds: int = typer.Option(5, help="Folds for --protocol kfold."),
    test_size: int = typer.Option(72, help="Test images per seed for --protocol paper."),
    quick: bool = typer.Option(
        False, "--quick", help="Offline backbone only, 3 seeds, at most 8 epochs: under 20 min on 2 CPU cores."
    ),
    settings: dict | None = None,
    allow_random_init: bool = typer.Option(
        False, "--allow-random-init", help="Run models without pretrained weights, marked 'random init'."
    ),
    list_models: bool = typer.Option(False, "--list-models", help="Print the known model ids and exit."),
    config: Path | None = ConfigOpt("TOML training settings shared by all cells (as for `kneeosteo train --config`)."),
    devices: int = typer.Option(
        1, min=1, help="Data-parallel processes per cell on this machine (torchrun + DistributedDataParallel)."
    ),
    nodes: int = typer.Option(1, min=1, help="Machines; run the same command on each, with --master."),
    master: str | None = typer.Option(None, help="HOST:PORT of the rendezvous (one of the --nodes machines)."),
    ray: str | None = RayOpt(),
    cpus_per_cell: float = typer.Option(
        1.0, min=0.01, help="With --ray: CPUs each cell asks for (its PyTorch threads)."
    ),
    reference: Path | None = ReferenceOpt(),
    definition: str = typer.Option("osteoporosis", parser=_choice(DEFINITIONS), help=DEFINITION_HELP),
    covariates: str | None = typer.Option(
        None,
        help="With --protocol holdout-reference: covariate columns of --reference (such as age,sex,weight_kg); writes clinical.md beside table1 (clinical logistic, OST, each model fused).",
    ),
):
    """Table I done honestly: baselines, hybrids and ablations on the same splits, over seeds, with paired tests."""
    from kneeosteo.config import load_config
    from kneeosteo.data.audit import build_audit
    from kneeosteo.data.scan import scan_dataset
    from kneeosteo.experiments.reproduce import default_models, model_catalogue, quick_display_only
    from kneeosteo.experiments.reproduce import reproduce as run_reproduce

    if list_models:
        for key, spec in model_catalogue().items():
            print(f"{key:28s} {spec.title}")
        return
    from kneeosteo.training.distributed import is_main_process, launch_if_asked
    from kneeosteo.utils.atomic import ensure_writable

    ensure_writable(out)  # before the audit and hours of training
    if ray is not None:
        from kneeosteo.utils.ray_cluster import check_address, import_ray

        check_address(ray)
        import_ray()  # not installed: one line, before the audit
        if devices > 1 or nodes > 1:
            raise typer.BadParameter("--ray runs each cell as one Ray task; drop --devices/--nodes", param_hint="--ray")
    if launch_if_asked(ctx, devices, nodes, master):
        return
    from kneeosteo.evaluation.clinical import parse_covariates

    root = _data(data)
    if (protocol == "holdout-reference") != (reference is not None):
        raise typer.BadParameter("--protocol holdout-reference and --reference go together", param_hint="--reference")
    n_seeds = 3 if quick and seeds == 5 else seeds
    given = {"data": str(root), **(settings or {})}
    if quick:
        given.setdefault("epochs", 8)
        given.setdefault("patience", 3)
    base = load_config(config, given)
    explicit = {k for k in ("epochs", "patience") if k in given}
    chosen = models.split(",") if models else default_models(quick)
    scan = scan_dataset(root, positive=base.data.positive, **base.scan_options())
    shortcut = build_audit(scan)["shortcut_metadata_only"]
    run_reproduce(
        root,
        out,
        base,
        chosen,
        list(range(n_seeds)),
        protocol,
        folds,
        allow_random_init,
        shortcut,
        test_size=test_size,
        display_only=tuple(quick_display_only(chosen)) if quick else (),
        ray=ray,
        cpus_per_cell=cpus_per_cell,
        reference=reference,
        definition=definition,
        covariates=parse_covariates(covariates) if covariates else None,
        limits={k: v for k, v in given.items() if k in explicit},
    )
    if not is_main_process():
        return
    print((out / "table1.md").read_text())
    if covariates:
        print((out / "clinical.md").read_text())
    print(f"wrote {out}/table1.md, table1.csv, table1.png" + (", clinical.md" if covariates else ""))


@app.command()
def serve(
    run: Path | None = typer.Option(
        None, "--run", help="Run folder from `kneeosteo train` (default: the bundled model)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (default loopback: only this computer)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    workers: int = typer.Option(2, min=1, help="Inference threads."),
    queue: int = typer.Option(
        16, min=0, help="Requests that may wait for a thread; beyond that: 503 with Retry-After."
    ),
    max_upload_mb: float = typer.Option(32.0, min=0.001, help="Largest accepted upload in MB (larger: 413)."),
    max_megapixels: float = typer.Option(
        25.0,
        min=0.000001,
        help="Most pixels an upload may declare, in millions (more: 422, refused from the header before decoding).",
    ),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Decision threshold (default: the model's)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
):
    """Web page and HTTP API: upload a radiograph, get P(osteoporosis) with Grad-CAM and attention overlays."""
    try:
        import uvicorn

        from kneeosteo.interfaces.web import WebSettings, create_app
        from kneeosteo.interfaces.web.server import is_loopback, uvicorn_options
    except ImportError as exc:
        raise KneeosteoError(
            f"`serve` needs FastAPI, uvicorn and python-multipart ({exc}); pip install fastapi uvicorn python-multipart"
        ) from exc
    web = create_app(
        WebSettings(
            run=run,
            threshold=threshold,
            device=device,
            workers=workers,
            queue=queue,
            max_upload_bytes=int(max_upload_mb * 1e6),
            max_pixels=int(max_megapixels * 1e6),
        )
    )
    if device == "cpu":  # the workers share the cores instead of each claiming all of them
        import os

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if not is_loopback(host):
        typer.echo(
            f"warning: listening on {host}: anyone who can reach this address can upload images; "
            "there is no authentication",
            err=True,
        )
    typer.echo(f"kneeosteo: model {web.state.service.info.model_id} on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(
        web, host=host, port=port, log_level="info", **uvicorn_options()
    )  # stalled clients closed: docs/cli.md (serve)


@app.command()
def pacs(
    url: str = typer.Argument(..., help="The PACS's DICOMweb root, such as http://127.0.0.1:8042/dicom-web (Orthanc)."),
    run: Path | None = typer.Option(None, "--run", help="Binary run folder (default: the bundled model)."),
    state: Path | None = typer.Option(
        None,
        "--state",
        help="Folder for the outbox of results not yet stored "
        "(default: in the cache, one per URL). Keep it between passes.",
    ),
    credentials: Path | None = typer.Option(
        None,
        "--credentials",
        help="File whose first line is USER:PASSWORD (default: $KNEEOSTEO_PACS_USER and $KNEEOSTEO_PACS_PASSWORD).",
    ),
    since: str | None = typer.Option(None, help="Only studies of this day (YYYYMMDD) or later."),
    study: list[str] | None = typer.Option(None, "--study", help="Only this study (StudyInstanceUID; repeatable)."),
    max_instances: int = typer.Option(
        20, min=1, help="Skip a series with more films than this (a knee study has a few)."
    ),
    timeout: float = typer.Option(60.0, min=0.1, help="Seconds to wait for each PACS answer."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
):
    """Find knee films in a PACS (QIDO-RS, WADO-RS), predict, and store a DICOM SR and a heat-map Secondary Capture per film back (STOW-RS). Research use only."""
    from kneeosteo.interfaces.pacs import load_credentials, run_pacs

    done = run_pacs(
        url,
        run=run,
        state=state,
        credentials=load_credentials(credentials),
        since=since,
        studies=study,
        max_instances=max_instances,
        timeout=timeout,
        device=device,
        echo=lambda line: print(printable(line)),
    )
    for line in done.lines:
        typer.echo(printable(line), err=True)
    print(done.summary())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: a usage error or a KneeosteoError is one line on stderr (exit 2 or 1)."""
    import importlib

    from kneeosteo.utils.allocator import keep_freed_memory

    click_errors = importlib.import_module(typer.BadParameter.__module__)  # typer's own copy of click's
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    keep_freed_memory()  # no page faults per training step (kneeosteo/utils/allocator.py)
    try:
        code = app(args=ray_flag(sys.argv[1:] if argv is None else argv), prog_name="kneeosteo", standalone_mode=False)
    except click_errors.NoArgsIsHelpError:  # typer has printed the help already
        sys.exit(2)
    except click_errors.UsageError as exc:  # bad option, missing argument, a choice not offered
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _error(f"{_one_line(exc.format_message())}{where}", 2)
    except typer.Abort:  # Ctrl-C
        _error("interrupted", 130)
    except KneeosteoError as exc:
        _error(_one_line(str(exc)), exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _error(message: str, code: int) -> None:
    # escape: a path such as "knee [left].png" is not Rich markup; soft_wrap: keep the
    # promised single line (Rich would otherwise fold long paths at the console width)
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)
