"""The cached training step on each compute path, where its time goes, and what the levers do.

Issue 17: on a 2-core CPU without AVX-512/bf16 the cached epoch (attention module + head on
cached features) was slow and spent a quarter of its CPU time in the kernel. This measures that
step, per path and lever, each variant in a fresh process (allocator and OpenMP settings only
act from process start):

- wall, user and sys seconds of an epoch of ``--steps`` optimiser steps (batch 32, 224 px,
  channels-last: what ``run_epoch`` does for the paper protocol's ~46 batches), minor page faults
  and context switches (``getrusage``);
- the step's FLOPs counted by ``torch.utils.flop_counter`` (forward + backward) and the share of
  this process's measured fp32 (or bf16) matmul peak the step reaches;
- a ``torch.profiler`` table of the baseline: the top operators' shares of self CPU time.

Variants: the path (native, or forced to AVX2 with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``) x precision, then on the AVX2 fp32 path: glibc malloc kept from
returning memory to the kernel (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_``), jemalloc and
tcmalloc (``LD_PRELOAD``, where the Debian packages are installed), OpenMP threads that sleep at
once instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), one thread, batch 64.

    python benchmarks/bench_fp32_path.py [--steps 46] [--repeats 2] [--quick]

Run it on an otherwise idle machine; it records the load average before and after each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_fp32_path.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, loadavg, now_iso, write_results  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
GLIBC_KEEP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**34), "MALLOC_TOP_PAD_": str(2**28)}
LIBS = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}


def variants(quick: bool) -> list[dict]:
    """(name, environment, precision, threads, batch) of every measured variant."""
    v = [
        dict(name="native path, bf16", env={}, precision="bf16"),
        dict(name="native path, fp32", env={}, precision="fp32"),
        dict(name="native path, bf16 + glibc malloc keeps memory", env=GLIBC_KEEP, precision="bf16"),
        dict(name="native path, fp32 + glibc malloc keeps memory", env=GLIBC_KEEP, precision="fp32"),
        dict(name="AVX2 fp32 (baseline)", env=AVX2, precision="fp32"),
        dict(name="AVX2 fp32 + glibc malloc keeps memory", env={**AVX2, **GLIBC_KEEP}, precision="fp32"),
        dict(name="AVX2 fp32 + OMP_WAIT_POLICY=PASSIVE", env={**AVX2, "OMP_WAIT_POLICY": "PASSIVE"}, precision="fp32"),
        dict(name="AVX2 fp32, 1 thread", env=AVX2, precision="fp32", threads=1),
        dict(name="AVX2 fp32, batch 64", env=AVX2, precision="fp32", batch=64),
        dict(
            name="AVX2 fp32 + glibc malloc keeps memory + index-free max-pool",
            env={**AVX2, **GLIBC_KEEP},
            precision="fp32",
            pool="index-free",
        ),
    ]
    for lib, path in LIBS.items():
        if Path(path).is_file():
            v.append(dict(name=f"AVX2 fp32 + {lib}", env={**AVX2, "LD_PRELOAD": path}, precision="fp32"))
    return (
        [x for x in v if x["name"] in ("native path, bf16", "native path, fp32", "AVX2 fp32 (baseline)")]
        if quick
        else v
    )


# ------------------------------------------------------------------ one variant, in its own process


def _step_flops(step_once) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step_once()
    return int(fc.get_total_flops())


def measure(
    precision: str, batch: int, steps: int, size: int = 224, profile: bool = False, pool: str = "max_pool2d"
) -> dict:
    """One epoch of ``steps`` AM + head optimiser steps, after two warm-up steps."""
    import torch

    from benchmarks.bench_am_step import step_fn
    from benchmarks.machine import matmul_peak
    from kneeosteo.utils.compute_path import compute_path

    step = step_fn("ours", precision, batch, size, pool=pool)
    step()
    step()
    flops = _step_flops(step)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = matmul_peak(precision, n=2048, reps=3)
    out = {
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "path": compute_path(),
        "wall_s": round(wall, 2),
        "user_s": round(r1.ru_utime - r0.ru_utime, 2),
        "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
        "minor_faults": r1.ru_minflt - r0.ru_minflt,
        "voluntary_switches": r1.ru_nvcsw - r0.ru_nvcsw,
        "involuntary_switches": r1.ru_nivcsw - r0.ru_nivcsw,
        "step_ms": round(1000 * wall / steps, 1),
        "step_gflop": round(flops / 1e9, 2),
        "gflops": round(flops * steps / wall / 1e9, 1),
        "peak_gflops": peak.get("best_gflops"),
    }
    cpu = out["user_s"] + out["sys_s"]
    out["sys_share"] = round(out["sys_s"] / cpu, 3) if cpu else None
    out["share_of_peak"] = round(out["gflops"] / out["peak_gflops"], 3) if out["peak_gflops"] else None
    if profile:
        out["profile"] = _profile(step, min(steps, 10))
    return out


def _profile(step, steps: int, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [
        {"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:top]
    ]


# ------------------------------------------------------------------ the driver


def run_variant(v: dict, steps: int, profile: bool) -> dict:
    env = {**os.environ, **v["env"], "PYTHONPATH": str(REPO)}
    threads = v.get("threads", 2)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        json.dumps(
            {
                "precision": v["precision"],
                "batch": v.get("batch", 32),
                "steps": steps,
                "profile": profile,
                "pool": v.get("pool", "max_pool2d"),
            }
        ),
    ]
    before = loadavg()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"name": v["name"], "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "name": v["name"],
        "env": v["env"],
        **row,
        "measured": now_iso(),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }


def run(steps: int, repeats: int, quick: bool, only: str | None = None, keep: list[dict] | None = None) -> dict:
    """Every variant (``only``: those whose name contains it; rows of ``keep`` with other names stay)."""
    doc = {"started": now_iso(), "steps": steps, "repeats": repeats, "rows": []}
    chosen = [v for v in variants(quick) if only is None or only in v["name"]]
    for v in variants(quick):
        if v not in chosen:
            old = next((r for r in keep or [] if r.get("name") == v["name"]), None)
            if old is not None:
                doc["rows"].append(old)
            continue
        reps = [run_variant(v, steps, profile=(v["name"] == "AVX2 fp32 (baseline)" and r == 0)) for r in range(repeats)]
        ok = [r for r in reps if "error" not in r]
        if not ok:
            doc["rows"].append(reps[0])
            continue
        best = min(ok, key=lambda r: r["wall_s"])  # the least disturbed repeat
        best["wall_s_all"] = [r["wall_s"] for r in ok]
        prof = next((r["profile"] for r in ok if "profile" in r), None)
        if prof:
            best["profile"] = prof
        doc["rows"].append(best)
    doc["finished"] = now_iso()
    return doc


def markdown(doc: dict) -> str:
    lines = [
        "# The cached training step per compute path, and the fp32 levers",
        "",
        f"Last run {doc['started']} to {doc['finished']}; rows kept by --only from earlier runs keep their own "
        f"date (column measured; unknown for rows from before the column existed). AM + head optimiser steps, "
        f"224 px, channels-last, each variant in a fresh process (this run: {doc['steps']} steps, best of "
        f"{doc['repeats']}; column steps); load average before/after each.",
        "",
        "| variant | step ms | steps | wall s | user s | sys s | sys share | minor faults | GFLOP/s | share of peak | load | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    base = None
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |||||||||||")
            continue
        lines.append(
            f"| {r['name']} | {r['step_ms']} | {r.get('steps', '?')} | {r['wall_s']} | {r['user_s']} | {r['sys_s']} | "
            f"{r['sys_share']} | {r['minor_faults']} | {r['gflops']} | {r['share_of_peak']} of {r['peak_gflops']} | "
            f"{r['loadavg_before'][0]} / {r['loadavg_after'][0]} | {(r.get('measured') or 'unknown')[:16]} |"
        )
        base = r if r["name"] == "AVX2 fp32 (baseline)" else base
    if base and base.get("profile"):
        lines += [
            "",
            f"Profile of the AVX2 fp32 baseline (self CPU time; step {base['step_gflop']} GFLOP forward + backward):",
            "",
            "| operator | share | calls |",
            "|---|---:|---:|",
        ]
        lines += [f"| {p['op']} | {p['self_cpu_share']:.1%} | {p['calls']} |" for p in base["profile"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=46)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="three variants, for a smoke test")
    ap.add_argument(
        "--only", help="measure only the variants whose name contains this; keep the others' rows from --out"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "benchmarks" / "fp32_path.json")
    args = ap.parse_args(argv)
    if args.one:
        import torch

        a = json.loads(args.one)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(
            json.dumps(
                measure(a["precision"], a["batch"], a["steps"], profile=a["profile"], pool=a.get("pool", "max_pool2d"))
            )
        )
        return None
    keep = json.loads(args.out.read_text())["rows"] if (args.only and args.out.is_file()) else None
    doc = run(args.steps, args.repeats, args.quick, args.only, keep)
    return write_results(args.out, doc, markdown)


if __name__ == "__main__":
    main()
