"""Helpers shared by the benchmark sections: timing loops, percentiles, memory, load average."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"


def imagegen():
    """tests/imagegen.py (the generators the test suite uses) without making tests/ a package."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import imagegen as g

    return g


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


@contextmanager
def section(doc: dict):
    """Record start/end time and the 1/5/15-min load average around a section, so a run taken
    while something else used the CPUs shows it."""
    doc["started"] = now_iso()
    doc["loadavg_start"] = loadavg()
    t0 = time.perf_counter()
    try:
        yield doc
    finally:
        doc["wall_seconds"] = round(time.perf_counter() - t0, 2)
        doc["loadavg_end"] = loadavg()
        doc["finished"] = now_iso()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), no numpy needed."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_calls(
    fn: Callable[[], object], *, warmup: int = 2, min_iters: int = 10, max_iters: int = 200, target_s: float = 10.0
) -> list[float]:
    """Per-call wall times (s) after ``warmup`` untimed calls. Runs at least ``min_iters`` calls,
    then keeps going until ``target_s`` seconds are spent or ``max_iters`` is reached."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < target_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def latency_stats(times: list[float], batch: int) -> dict:
    """p50/p95/mean per call (ms) and throughput (images/s = images / total timed seconds)."""
    total = sum(times)
    return {
        "iterations": len(times),
        "p50_ms": round(percentile(times, 50) * 1e3, 3),
        "p95_ms": round(percentile(times, 95) * 1e3, 3),
        "mean_ms": round(statistics.fmean(times) * 1e3, 3),
        "images_per_s": round(batch * len(times) / total, 3) if total > 0 else None,
    }


def proc_status_kb(field: str) -> int | None:
    """VmRSS / VmHWM (peak resident set) of this process in kB, from /proc (Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def set_threads(n: int | None) -> int:
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def write_results(out: Path, doc: dict, markdown: Callable[[dict], str]) -> Path:
    """``out`` (JSON) and its Markdown twin beside it; prints the Markdown and returns its path."""
    write_json(out, doc)
    md, text = out.with_suffix(".md"), markdown(doc)
    md.write_text(text)
    print(text)
    return md
