"""Run the benchmarks and write results/*.json + RESULTS.md.

    python -m benchmarks.run                      # everything, on KOP (~30 min on an idle 2-core machine)
    python -m benchmarks.run --quick --out /tmp/b # smoke: tiny generated data, ~1 min
    python -m benchmarks.run --only inference,loading
    python benchmarks/run.py ...                  # the same

Sections: ``training`` (naive vs cached epochs on KOP, `make run`), ``inference`` (engines x
backbones x batch 1/32), ``loading`` (decode + preprocess per format). The machine description
and its matmul peak are measured first, every time. Each section writes ``OUT/<section>.json``
as soon as it finishes; RESULTS.md is then rebuilt from every JSON in OUT, so running one
section again updates its table and keeps the others.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, set_threads, write_json  # noqa: E402

SECTIONS = ("loading", "training", "inference")
DEFAULT_OUT = REPO / "docs" / "results" / "benchmarks"
DEFAULT_MD = DEFAULT_OUT / "RESULTS.md"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny generated data, few iterations (~1 min)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for the JSON results (default: {DEFAULT_OUT.relative_to(REPO)}; with --quick a temporary folder)",
    )
    ap.add_argument(
        "--md",
        type=Path,
        default=None,
        help=f"RESULTS.md to write (default: {DEFAULT_MD.relative_to(REPO)} when --out is the default, else OUT/RESULTS.md)",
    )
    ap.add_argument("--data", default=None, help="KOP folder (default: ../shared/datasets/kop)")
    ap.add_argument(
        "--run", default=None, help="trained run for the int8/bf16 accuracy check (default: the bundled model)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default: torch's; 1 with --quick)")
    ap.add_argument("--epochs-naive", type=int, default=2)
    ap.add_argument("--epochs-cached", type=int, default=3)
    ap.add_argument("--no-make-run", action="store_true", help="do not time a full `make run`")
    ap.add_argument("--no-fp32", action="store_true", help="training: skip the fp32 naive/cached rows")
    ap.add_argument(
        "--train-backbones",
        default="efficientnet_lite0,densenet169",
        help="training backbones (random weights where the pretrained file is not on this machine)",
    )
    ap.add_argument("--models", default=None, help="inference backbones (default: efficientnet_lite0,densenet169)")
    ap.add_argument("--engines", default=None, help="inference engines (default: all, see bench_inference.ENGINES)")
    ap.add_argument("--compile-cap", type=float, default=420.0, help="seconds a torch.compile worker may take in all")
    return ap.parse_args(argv)


def output_paths(args) -> tuple[Path, Path]:
    """Where the JSON and RESULTS.md go: a smoke run never overwrites the committed results."""
    out = args.out or (Path(tempfile.mkdtemp(prefix="kneeosteo-bench-quick-")) if args.quick else DEFAULT_OUT)
    md = args.md or (DEFAULT_MD if out.resolve() == DEFAULT_OUT.resolve() else out / "RESULTS.md")
    return out, md


def main(argv=None) -> Path:
    args = parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; choose from {SECTIONS}")
    out, md = output_paths(args)
    out.mkdir(parents=True, exist_ok=True)
    threads = set_threads(args.threads or (1 if args.quick else None))
    common = {
        "quick": args.quick,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    t0 = time.perf_counter()

    from benchmarks import bench_inference, bench_loading, bench_training, machine, report
    from benchmarks.bench_training import KOP

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    log(f"machine: describing and measuring the matmul peak (threads {threads})")
    mach = {**common, **machine.machine_section(quick=args.quick)}
    write_json(out / "machine.json", mach)
    peaks = mach["peak"]
    data = Path(args.data) if args.data else KOP
    with tempfile.TemporaryDirectory(prefix="kneeosteo-bench-") as work:
        work = Path(work)
        trained_run = None
        for name in [s for s in SECTIONS if s in only]:
            log(f"{name}: start")
            if name == "loading":
                doc = bench_loading.run_section(
                    quick=args.quick, kop=data if data.is_dir() else None, workers=2, log=log
                )
            elif name == "training":
                doc = bench_training.run_section(
                    quick=args.quick,
                    data=str(data),
                    epochs_naive=args.epochs_naive,
                    epochs_cached=args.epochs_cached,
                    make_run=not args.no_make_run,
                    fp32=not args.no_fp32,
                    backbones=args.train_backbones.split(","),
                    work=work / "training",
                    log=log,
                )
                trained_run = (doc.get("make_run") or {}).get("run_folder")
            else:
                doc = bench_inference.run_section(
                    quick=args.quick,
                    peaks=peaks,
                    threads=threads,
                    models=args.models.split(",") if args.models else None,
                    engines=args.engines.split(",") if args.engines else None,
                    run=args.run,
                    fallback_run=trained_run,
                    data=str(data) if data.is_dir() else None,
                    work=work / "inference",
                    compile_cap_s=args.compile_cap,
                    log=log,
                )
            doc = {"section": name, **common, "threads": threads, **doc}
            write_json(out / f"{name}.json", doc)
            log(f"{name}: done in {doc.get('wall_seconds')} s -> {out / (name + '.json')}")
    report.write(out, md)
    log(f"wrote {md}")
    return md


if __name__ == "__main__":
    main()
