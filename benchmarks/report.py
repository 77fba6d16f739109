"""RESULTS.md from the JSON files a benchmark run wrote (machine.json + one per section)."""

from __future__ import annotations

import json
from pathlib import Path

# benchmark engine -> the `kneeosteo predict --engine` that runs the same thing
PREDICT_ENGINE = {
    "torch-cl-fp32": "torch",
    "torch-cl-bf16": "torch-bf16",
    "ort-fp32": "onnxruntime",
    "ort-int8-static": "onnxruntime-int8",
}
AGREE_TOL = 1e-3


def _load(out: Path, name: str) -> dict | None:
    p = out / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _f(x, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) and abs(x) < 10**-nd:
            return f"{x:.2g}"
        return f"{x:,.{nd}f}"
    return str(x)


def _load_note(doc: dict) -> str:
    s, e = doc.get("loadavg_start") or [], doc.get("loadavg_end") or []
    q = " **(--quick smoke run: not representative)**" if doc.get("quick") else ""
    return (
        f"_Measured {doc.get('started', '?')}, {doc.get('wall_seconds', '?')} s; load average (1/5/15 min) "
        f"at start {s}, at end {e}; threads {doc.get('threads', '?')}._{q}"
    )


def machine_md(m: dict) -> list[str]:
    v = m.get("versions", {})
    pk = m.get("peak", {})

    def peak(dt):
        p = pk.get(dt) or {}
        if not p.get("available"):
            return f"n/a ({p.get('reason', '?')})"
        if p.get("emulated"):
            return f"{_f(p.get('best_gflops'))} GFLOP/s (emulated: no native bf16; {p.get('n')}x{p.get('n')}, {p.get('reps')} run(s))"
        return f"{_f(p.get('best_gflops'))} GFLOP/s"

    n = (pk.get("fp32") or {}).get("n", "?")
    return [
        "## Machine",
        "",
        f"- Date: {m.get('date')}; command: `{m.get('command')}`",
        f"- CPU: {m.get('cpu_model')} ({', '.join(m.get('cpu_flags', []))}); {m.get('usable_cpus')} usable of "
        f"{m.get('logical_cpus')} logical CPUs; {m.get('memory_gb')} GB RAM; torch threads {m.get('torch_threads')}",
        f"- Software: Python {v.get('python')}, torch {v.get('torch')}, torchvision {v.get('torchvision')}, "
        f"onnxruntime {v.get('onnxruntime')}, onnx {v.get('onnx')}, numpy {v.get('numpy')}, pillow {v.get('pillow')}, "
        f"pydicom {v.get('pydicom')}; {m.get('platform')}",
        f"- Measured peak ({n}x{n} matmul, best of {(pk.get('fp32') or {}).get('reps', '?')}, same threads): "
        f"fp32 {peak('fp32')}, bf16 {peak('bf16')}, int8 (torch._int_mm) {peak('int8')}",
        f"- Load average when the peak was measured: {m.get('loadavg')} (more than {m.get('usable_cpus')} means "
        "other work shared the CPUs and every number below is pessimistic)",
        "",
    ]


def _share(rows: dict, prec: str) -> float:
    """A cached epoch (the AM + head step alone) as a fraction of a naive one."""
    return rows[f"cached_{prec}"]["mean_epoch_s"] / rows[f"naive_{prec}"]["mean_epoch_s"]


def training_md(t: dict) -> list[str]:
    lines = ["## Training (paper protocol, naive loop vs cached)", "", _load_note(t), ""]
    if t.get("skipped"):
        return lines + [f"Skipped: {t['skipped']}", ""]
    s = t.get("setup", {})
    lines += [
        f"Data: {s.get('data')}; split {s.get('split_sizes')}; {s.get('copies')} augmented copies per training "
        f"image, batch {s.get('batch_size')}, {s.get('image_size')} px, autocast {s.get('autocast')}, channels-last "
        f"{s.get('channels_last')}. An epoch = training pass + validation pass. Naive: decode + augment + "
        "preprocess + frozen backbone every epoch; cached (ours, `kneeosteo train`): `prepare` once, then AM + "
        "head on cached tensors.",
        "",
        "| backbone (weights) | loop | precision | prepare cold (s) | prepare warm (s) | epochs | epoch (s, mean) | epoch (s, min) | train images/s | train samples |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for bb, b in (t.get("backbones") or {}).items():
        for key, r in (b.get("rows") or {}).items():
            loop, prec = key.split("_")
            ep = r.get("epochs") or [{}]
            lines.append(
                f"| {bb} ({b.get('weights')}) | {loop} | {prec} | {_f(r.get('prepare_cold_s'))} | "
                f"{_f(r.get('prepare_warm_s'))} | {len(r.get('epochs', []))} | {_f(r.get('mean_epoch_s'))} | "
                f"{_f(r.get('min_epoch_s'))} | {_f(r.get('mean_train_images_per_s'))} | {ep[0].get('train_samples')} |"
            )
        for prec, r in (b.get("ratios") or {}).items():
            ratios.append(
                f"- **{bb}, {prec}: cached epochs are {r['epoch_speedup']}x faster than naive** (train images/s "
                f"{r['train_images_per_s_speedup']}x; the AM + head step alone, a cached epoch, is "
                f"{100 * _share(b['rows'], prec):.0f}% of a naive epoch); 30 epochs projected: naive {_f(r['projected_30_epochs_naive_s'])} s, "
                f"cached {_f(r['projected_30_epochs_cached_s'])} s including the cold prepare."
            )
    lines += [""] + ratios
    mr = t.get("make_run") or {}
    if mr.get("skipped"):
        lines.append(f"- `make run`: not timed ({mr['skipped']}).")
    else:
        lines.append(
            f"- **`make run` (audit + split + train with early stopping + test scoring), cold cache: "
            f"{_f(mr.get('wall_s'))} s = {_f((mr.get('wall_s') or 0) / 60)} min** (exit {mr.get('exit_status')}; "
            f"{mr.get('epochs_run')} epochs, prepare {mr.get('prepare_seconds')} s); `{mr.get('command')}`"
        )
    return lines + [""]


def inference_md(d: dict) -> list[str]:
    st = d.get("settings", {})
    lines = [
        "## Inference",
        "",
        _load_note(d),
        "",
        f"Whole hybrid model (backbone + AM + head + sigmoid), random weights, {st.get('image_size')} px, "
        f"threads {st.get('threads')}; latency = one call on a batch, after warm-up (first call reported "
        f"separately); images/s = images / total timed seconds. Peak RSS = the process's VmHWM while that batch "
        "size ran, Δ = above the same process with torch/ORT imported but no model. GFLOP/s = FLOPs per image "
        "(convolutions + matmuls) x images/s, against the measured matmul peak of the engine's compute type "
        "(int8: the torch._int_mm peak). |Δp| = largest probability difference from torch eager fp32 on 8 "
        "generated radiographs.",
        "",
    ]
    for name, m in (d.get("models") or {}).items():
        lines += [
            f"### {name}: {m['flops_per_image'] / 1e9:.2f} GFLOP per {st.get('image_size')}-px image, "
            f"{m.get('params', 0) / 1e6:.1f} M parameters",
            "",
            "| engine | batch | images/s | p50 (ms) | p95 (ms) | first call (s) | peak RSS (MB) | Δ RSS (MB) | GFLOP/s | % of peak | max abs Δp vs fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        skipped = []
        for eng, r in m.get("engines", {}).items():
            if "batches" not in r:
                skipped.append(f"- {eng}: {r.get('skipped')}")
                continue
            label = f"{eng} (emulated{', 1 call' if r.get('timed_once') else ''})" if r.get("bf16_emulated") else eng
            for b, row in r["batches"].items():
                lines.append(
                    f"| {label} | {b} | {_f(row.get('images_per_s'))} | {_f(row.get('p50_ms'))} | "
                    f"{_f(row.get('p95_ms'))} | {_f(row.get('first_call_s'), 2)} | {_f(row.get('peak_rss_mb'), 0)} | "
                    f"{_f(row.get('peak_rss_delta_mb'), 0)} | {_f(row.get('gflops'))} | "
                    f"{_f(row.get('pct_of_peak'))}% {row.get('peak_kind', '')} | {_f(r.get('max_abs_dp_vs_fp32'), 4)} |"
                )
        lines.append("")
        if skipped:
            lines += ["Not measured:", *skipped, ""]
        lines += _fastest(m, d.get("int8_accuracy_kop") or {})
    lines += _int8_md(d.get("int8_accuracy_kop") or {})
    for note in d.get("notes", []):
        lines.append(f"- {note}")
    return lines + [""]


def _disagrees(eng: str, m: dict, kop: dict) -> str | None:
    """Why ``eng`` is not faithful to fp32 (random-weight check here, trained model on KOP), or None."""
    dp = (m.get("engines", {}).get(eng) or {}).get("max_abs_dp_vs_fp32")
    if dp is not None and dp > AGREE_TOL:
        return f"|Δp| {dp:.2g} on generated images"
    k = (kop.get("engines") or {}).get(eng) or {}
    if k.get("max_abs_dp_vs_torch_fp32", 0) > AGREE_TOL:
        return f"|Δp| {k['max_abs_dp_vs_torch_fp32']:.2g} on the KOP test split"
    return None


def _fastest(m: dict, kop: dict) -> list[str]:
    """Per batch size: the fastest engine `predict` offers that agrees with fp32 within 1e-3, from
    the interleaved head-to-head when there is one (robust to load changes), else the rows above."""
    out = []
    h2h = (m.get("head_to_head") or {}).get("batches") or {}
    if h2h:
        engines = list(next(iter(h2h.values())))
        out += [
            f"Head-to-head, interleaved (engines loaded side by side and called in turn, so load changes "
            f"hit all alike; median of {', '.join(f'{v} rounds at batch {k}' for k, v in m['head_to_head']['rounds'].items())}), "
            "images/s:",
            "",
            "| batch | " + " | ".join(engines) + " |",
            "|---:|" + "---:|" * len(engines),
        ]
        for b, rows in h2h.items():
            out.append(f"| {b} | " + " | ".join(_f(rows[e]["images_per_s"]) for e in engines) + " |")
        out.append("")
        left_out = (m.get("head_to_head") or {}).get("skipped") or {}
        if isinstance(left_out, dict) and left_out:
            out += ["Left out of the head-to-head: " + "; ".join(f"{e} ({why})" for e, why in left_out.items()), ""]
    for b in ("1", "32"):
        cands = {}
        for eng in PREDICT_ENGINE:
            row = (
                (h2h.get(b) or {}).get(eng)
                if h2h
                else ((m.get("engines", {}).get(eng) or {}).get("batches") or {}).get(b)
            )
            if row:
                cands[eng] = row["images_per_s"]
        if not cands:
            continue
        fastest = max(cands, key=cands.get)
        ok = {e: v for e, v in cands.items() if _disagrees(e, m, kop) is None}
        line = f"- batch {b}: fastest overall {fastest} ({_f(cands[fastest])} images/s)"
        if fastest not in ok:
            line += f", but it is lossy ({_disagrees(fastest, m, kop)})"
        if ok:
            best = max(ok, key=ok.get)
            line += (
                f"; fastest `predict` engine within |Δp| <= {AGREE_TOL:g} of fp32: **{PREDICT_ENGINE[best]}** "
                f"({best}, {_f(ok[best])} images/s)"
            )
        out.append(line)
    return out + [""] if out else []


def _int8_md(k: dict) -> list[str]:
    lines = ["### Accuracy change of int8 (and bf16) on the KOP test split", ""]
    if k.get("skipped"):
        return lines + [f"Not measured: {k['skipped']}", ""]
    lines += [
        f"Model {k.get('model_id')} ({k.get('source')}), {k.get('test_images')} test images, threshold "
        f"{k.get('threshold')}; static int8 calibrated on {k.get('calibration')}.",
        "",
        "| engine | accuracy | max abs Δp vs torch fp32 | mean abs Δp | label flips |",
        "|---|---:|---:|---:|---:|",
    ]
    for eng, r in (k.get("engines") or {}).items():
        if r.get("skipped"):
            lines.append(f"| {eng} | not measured: {r['skipped']} | | | |")
            continue
        lines.append(
            f"| {eng} | {r['accuracy']:.4f} | {r['max_abs_dp_vs_torch_fp32']:.2e} | "
            f"{r['mean_abs_dp_vs_torch_fp32']:.2e} | {r['label_flips_vs_torch_fp32']} |"
        )
    return lines + [""]


def loading_md(d: dict) -> list[str]:
    st = d.get("settings", {})
    lines = [
        "## Data loading (decode + preprocess)",
        "",
        _load_note(d),
        "",
        f"read_image + Preprocess({st.get('preprocess')}) per file; generated files {st.get('width')}x{st.get('height')}, "
        f"{st.get('images_per_format')} per format; {st.get('timing')} ({st.get('repeats')}). The DataLoader rows "
        "include starting the worker processes, as every epoch of a non-persistent loader does.",
        "",
        "| format | images | MP/image | MB/image | serial (images/s) | 2 threads (images/s) | DataLoader, 2 workers (images/s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d.get("rows", []):
        lines.append(
            f"| {r['format']} | {r['images']} | {r['megapixels_per_image']} | {r['mb_per_image']} | "
            f"{_f(r.get('serial_images_per_s'))} | {_f(r.get('threads2_images_per_s'))} | "
            f"{_f(r.get('dataloader2_images_per_s'))} |"
        )
    return lines + [""]


def render(out: Path) -> str:
    m = _load(out, "machine")
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.run` (see `benchmarks/run.py`) from the JSON files in "
        "`docs/results/benchmarks/`; regenerate with the same command. Every section records the load average "
        "at its start and end: this machine is shared, and a load average above the CPU count means the "
        "numbers were taken while other jobs competed for the cores.",
        "",
    ]
    if m:
        lines += machine_md(m)
    for name, fn in (("training", training_md), ("inference", inference_md), ("loading", loading_md)):
        doc = _load(out, name)
        lines += fn(doc) if doc else [f"## {name.title()}", "", "Not run yet.", ""]
    for name, title in (
        ("fp32_path.md", "Compute paths and the fp32 levers (issue 17)"),
        ("make_run_paths.md", "`make run` per compute path (issue 17)"),
        ("predict_paths.md", "`predict` per compute path: share of the fp32 peak (issue 17)"),
    ):
        if (out / name).is_file():  # written by benchmarks/bench_fp32_path.py and by hand from timed make runs
            body = (out / name).read_text().strip().split("\n", 1)[-1].strip()  # its own title dropped
            lines += [f"## {title}", "", body, ""]
    if (out / "scaling.md").is_file():  # written by benchmarks/bench_scaling.py (issue 18)
        lines += [
            "## Scaling out (Ray, archive-size audit and split)",
            "",
            (out / "scaling.md").read_text().strip(),
            "",
        ]
    if (out / "load_test.md").is_file():  # written by benchmarks/load_test.py, owned elsewhere
        lines += ["## Load test (serve)", "", (out / "load_test.md").read_text().strip(), ""]
    elif (out / "load_test.json").is_file():
        lines += ["## Load test (serve)", "", "See `results/load_test.json`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write(out: Path, md: Path) -> Path:
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(render(out))
    return md


if __name__ == "__main__":
    import sys

    src = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent.parent / "docs" / "results" / "benchmarks"
    )
    print(render(src))
