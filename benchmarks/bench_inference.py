"""Inference: one network, several engines, batch 1 and 32.

The timed network is what ``kneeosteo predict`` runs: the whole hybrid model (backbone + AM +
head + sigmoid) on normalised (B, 3, S, S) inputs, random weights (``weights='none'``; timing
does not depend on the values). Each (model, engine) pair runs in its own process, so peak
memory is that engine's alone (VmHWM is reset between the two batch sizes) and a crash or a
compile that runs too long only loses that row, with the reason recorded.

GFLOP/s = FLOPs per image (torch.utils.flop_counter: convolutions and matmuls, 2 per MAC)
x images/s, compared with the matmul peak of the engine's compute type measured in the same run.
The int8 accuracy change is measured on KOP's test split with a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, latency_stats, proc_status_kb, reset_peak_rss, section, time_calls

MODELS = ("efficientnet_lite0", "densenet169")
BATCHES = (1, 32)
AGREE_N = 8  # images in the fixed batch every engine's probabilities are compared on

# name -> (family, options, compute type for the peak comparison)
ENGINES: dict[str, dict] = {
    "torch-eager-fp32": {"family": "torch", "channels_last": False, "bf16": False, "compile": False, "peak": "fp32"},
    "torch-cl-fp32": {"family": "torch", "channels_last": True, "bf16": False, "compile": False, "peak": "fp32"},
    "torch-cl-bf16": {"family": "torch", "channels_last": True, "bf16": True, "compile": False, "peak": "bf16"},
    "torch-compile-fp32": {"family": "torch", "channels_last": True, "bf16": False, "compile": True, "peak": "fp32"},
    "torch-compile-bf16": {"family": "torch", "channels_last": True, "bf16": True, "compile": True, "peak": "bf16"},
    "ort-fp32": {"family": "ort", "file": "fp32", "peak": "fp32"},
    "ort-int8-dynamic": {"family": "ort", "file": "int8-dynamic", "peak": "int8"},
    "ort-int8-static": {"family": "ort", "file": "int8-static", "peak": "int8"},
}
REFERENCE = "torch-eager-fp32"


# --------------------------------------------------------------------------------------------
# inputs, model, FLOPs


def sample_inputs(n: int, size: int, mean=(0.5,) * 3, std=(0.5,) * 3, seed: int = 0) -> np.ndarray:
    """Radiograph-like normalised inputs (generated pictures, the tests' generator), float32."""
    from benchmarks.common import imagegen
    from kneeosteo.data.preprocess import Preprocess

    g = imagegen()
    prep = Preprocess("paper", size, tuple(mean), tuple(std))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pic = g.picture(size + 13 * (i % 5), size + 7 * (i % 3), variant=seed * 1000 + i)
        pic = np.clip(pic + rng.normal(0, 0.02, pic.shape), 0, 1)
        out.append(prep(pic.astype(np.float32)).numpy())
    return np.stack(out).astype(np.float32)


def build_net(name: str, state_path: Path | None = None):
    import torch

    from kneeosteo.inference.export import ProbabilityNet
    from kneeosteo.models import build_model

    torch.manual_seed(0)
    model, _ = build_model(name, weights="none")
    if state_path is not None:
        model.load_state_dict(torch.load(state_path, weights_only=True))
    return ProbabilityNet(model).eval()


def count_flops(net, size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    return int(fc.get_total_flops())


def export_files(name: str, net, size: int, work: Path, calib: np.ndarray) -> dict:
    """model.onnx (fp32) and its two int8 versions for ``net``; failures are recorded, not raised."""
    import io
    import warnings

    import onnx
    import torch

    from kneeosteo.inference.export import DEFAULT_OPSET
    from kneeosteo.inference.quantize import quantize_onnx

    files, errors, seconds = {}, {}, {}
    fp32 = work / f"{name}.fp32.onnx"
    t = time.perf_counter()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(2, 3, size, size),),
            buf,
            input_names=["images"],
            output_names=["probability"],
            dynamic_axes={"images": {0: "batch"}, "probability": {0: "batch"}},
            opset_version=DEFAULT_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.save(onnx.load_from_string(buf.getvalue()), str(fp32))
    files["fp32"], seconds["export"] = str(fp32), round(time.perf_counter() - t, 2)
    for mode in ("dynamic", "static"):
        t = time.perf_counter()
        try:
            batches = [calib[i : i + 4] for i in range(0, len(calib), 4)]
            files[f"int8-{mode}"] = str(quantize_onnx(fp32, work / f"{name}.int8-{mode}.onnx", mode, batches))
            seconds[f"quantize_{mode}"] = round(time.perf_counter() - t, 2)
        except Exception as exc:
            errors[f"int8-{mode}"] = f"{type(exc).__name__}: {exc}"[:300]
    return {"files": files, "errors": errors, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# the worker: one (model, engine) in its own process


def _make_runner(spec: dict):
    """Build the engine; returns (run(np_batch) -> np probabilities, info dict)."""
    import torch

    eng = ENGINES[spec["engine"]]
    threads = spec["threads"]
    torch.set_num_threads(threads)
    if eng["family"] == "ort":
        from kneeosteo.inference.export import OnnxModel

        path = spec["files"].get(eng["file"])
        if path is None:
            raise RuntimeError(spec["file_errors"].get(eng["file"], "model file not made"))
        sess = OnnxModel(path, require_metadata=False, threads=threads)
        return (lambda x: sess(x)), {}
    net = build_net(spec["model"], Path(spec["state"]))
    if eng["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if eng["channels_last"] else torch.contiguous_format
    if eng["compile"]:
        net = torch.compile(net)
    bf16 = eng["bf16"]

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(t).float().numpy()

    return run, {}


def worker(spec: dict) -> dict:
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401  imports first: the baseline is a process with its libraries loaded

    import kneeosteo.inference.export  # noqa: F401
    import kneeosteo.models  # noqa: F401

    base_kb = proc_status_kb("VmRSS")
    out: dict = {"engine": spec["engine"], "model": spec["model"], "baseline_rss_mb": round((base_kb or 0) / 1024, 1)}
    t = time.perf_counter()
    run, info = _make_runner(spec)
    out["load_seconds"] = round(time.perf_counter() - t, 2)
    out.update(info)
    size = spec["image_size"]
    rng = np.random.default_rng(1)
    agree_x = np.load(spec["agree_inputs"])
    out["batches"] = {}
    for batch in spec["batches"]:
        resettable = reset_peak_rss()
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        row: dict = {}
        t = time.perf_counter()
        run(x)  # first call: compiles / plans for this shape
        row["first_call_s"] = round(time.perf_counter() - t, 3)
        if spec.get("once"):  # one timed call, no warm-up (see run_section: emulated bf16 in --quick)
            warmup, min_iters, max_iters = 0, 1, 1
        else:
            warmup = spec["warmup"] if batch == 1 else 1
            min_iters = spec["min_iters"] if batch == 1 else max(3, spec["min_iters"] * 2 // 5)
            max_iters = spec["max_iters"]
        times = time_calls(
            lambda: run(x),  # noqa: B023 (timed here, before x changes)
            warmup=warmup,
            min_iters=min_iters,
            max_iters=max_iters,
            target_s=spec["target_s"],
        )
        row.update(latency_stats(times, batch))
        hwm = proc_status_kb("VmHWM")
        row["peak_rss_mb"] = round((hwm or 0) / 1024, 1)
        row["peak_rss_delta_mb"] = round(((hwm or 0) - (base_kb or 0)) / 1024, 1)
        row["peak_reset"] = resettable
        out["batches"][str(batch)] = row
    probs = np.concatenate([run(agree_x[i : i + 1]) for i in range(len(agree_x))]).astype(np.float64)
    out["agree_probs"] = probs.tolist()
    return out


def _in_process(spec: dict) -> dict:
    import torch

    before = torch.get_num_threads()
    try:
        return worker(spec)
    except Exception as exc:
        return {
            "engine": spec["engine"],
            "model": spec["model"],
            "skipped": f"failed: {type(exc).__name__}: {exc}"[:400],
        }
    finally:
        torch.set_num_threads(before)


HEAD_TO_HEAD = ("torch-cl-fp32", "torch-cl-bf16", "ort-fp32", "ort-int8-static")


def head_to_head(base_spec: dict, engines=HEAD_TO_HEAD, rounds: dict | None = None, pause_s: float = 0.2) -> dict:
    """The engines `predict` offers, loaded side by side in this process and called in turn
    (round-robin, the starting engine rotating), so a change of machine load during the run
    hits all of them alike; the per-engine rows above run minutes apart and can be skewed by
    it. ``pause_s`` (untimed) between calls lets the previous engine's thread pool stop
    spinning: ONNX Runtime's and OpenMP's idle threads spin-wait for a while, and an engine
    started while the other's threads still spin on the same 2 cores runs several times slower.
    Returns the median latency per engine and batch size."""
    rounds = rounds or {1: 30, 32: 6}
    runners, out = {}, {"rounds": {str(k): v for k, v in rounds.items()}, "pause_s": pause_s, "batches": {}}
    for eng in engines:
        try:
            runners[eng] = _make_runner({**base_spec, "engine": eng})[0]
        except Exception as exc:
            out.setdefault("skipped", {})[eng] = f"{type(exc).__name__}: {exc}"[:200]
    size = base_spec["image_size"]
    rng = np.random.default_rng(3)
    names = list(runners)
    for batch, n in rounds.items():
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        for name in names:  # warm-up: first-call planning and compilation out of the way
            runners[name](x)
            runners[name](x)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(n):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                time.sleep(pause_s)
                t = time.perf_counter()
                runners[name](x)
                times[name].append(time.perf_counter() - t)
        out["batches"][str(batch)] = {
            name: {
                "p50_ms": round(1e3 * float(np.median(ts)), 3),
                "images_per_s": round(batch / float(np.median(ts)), 3),
                "calls": len(ts),
            }
            for name, ts in times.items()
        }
    return out


def _run_worker(spec: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
        path = fh.name
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_inference", "--worker", path],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired:
        return {
            "engine": spec["engine"],
            "model": spec["model"],
            "skipped": f"did not finish within the {timeout:.0f} s cap",
        }
    finally:
        os.unlink(path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "engine": spec["engine"],
            "model": spec["model"],
            "skipped": f"failed (exit {proc.returncode}): " + " | ".join(tail)[-400:],
        }
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# int8 accuracy on KOP


def find_model_run(explicit: str | None, fallback: str | None = None) -> tuple[Path | None, str]:
    """``--run`` when given, else the bundled model, else ``fallback`` (the run `make run` made in
    this benchmark); (None, reason) when there is none."""
    from kneeosteo.errors import CheckpointError
    from kneeosteo.run import RunDir

    def usable(run):
        return RunDir(run).is_run() and RunDir(run).weights_file.is_file()

    if explicit:
        run = Path(explicit)
        if usable(run):
            return run, f"--run {run}"
        return None, f"--run {run}: not a finished run folder (config.json/model.safetensors missing)"
    try:
        return RunDir.bundled().path, "bundled default model"
    except CheckpointError:
        pass
    if fallback and usable(Path(fallback)):
        return Path(fallback), "the run `make run` made in this benchmark"
    return None, "no --run given, no bundled model (kneeosteo/assets/default_model/), no `make run` output"


def int8_accuracy(
    run: Path | None, why: str, data: Path | None, work: Path, threads: int, limit: int | None = None
) -> dict:
    """Test-split probabilities of the trained model: torch fp32 vs ORT fp32 vs ORT int8."""
    if run is None:
        return {"skipped": why}
    import torch

    from kneeosteo.data.reader import ImageReadError, read_image
    from kneeosteo.data.split import load_split
    from kneeosteo.inference.export import OnnxModel, export_onnx
    from kneeosteo.inference.quantize import quantize_onnx
    from kneeosteo.run import RunDir

    rd = RunDir(run)
    data = Path(data or rd.config.record.get("data") or rd.config.settings.get("data") or "")
    split = rd.split_file
    if not data.is_dir() or not split.is_file():
        return {"skipped": f"{run}: data folder {data} or split.json not found", "model_run": str(run)}
    info = rd.info
    sets = load_split(split, data)
    test = sets.items("test")[:limit] if limit else sets.items("test")
    calib_items = sets.items("train")[: 64 if not limit else 8]

    def load(items):
        xs, ys = [], []
        for rel, y in items:
            try:
                xs.append(info.preprocess(read_image(data / rel).pixels).numpy())
                ys.append(y)
            except ImageReadError:
                continue
        return np.stack(xs).astype(np.float32), np.array(ys)

    if not test or not calib_items:
        return {"skipped": f"{run}: empty test or training split", "model_run": str(run)}
    try:
        x, y = load(test)
        calib, _ = load(calib_items)
    except ValueError:  # np.stack of nothing: no file of the split could be read
        return {"skipped": f"{run}: the split's images are not readable under {data}", "model_run": str(run)}
    fp32 = export_onnx(run, work / "kop.fp32.onnx")
    model = rd.load_model("cpu")
    with torch.inference_mode():
        p_torch = np.concatenate(
            [torch.sigmoid(model(images=torch.from_numpy(x[i : i + 16])).float()).numpy() for i in range(0, len(x), 16)]
        ).astype(np.float64)
    out = {
        "model_run": str(run),
        "source": why,
        "model_id": info.model_id,
        "test_images": int(len(x)),
        "threshold": info.threshold,
        "calibration": f"{len(calib)} training-split images (static)",
        "engines": {},
    }

    def score(p):
        acc = float(((p >= info.threshold) == (y == 1)).mean())
        return {
            "accuracy": round(acc, 4),
            "max_abs_dp_vs_torch_fp32": float(np.max(np.abs(p - p_torch))),
            "mean_abs_dp_vs_torch_fp32": float(np.mean(np.abs(p - p_torch))),
            "label_flips_vs_torch_fp32": int(((p >= info.threshold) != (p_torch >= info.threshold)).sum()),
        }

    out["engines"]["torch-fp32"] = score(p_torch)
    sessions = {"ort-fp32": fp32}
    for mode in ("dynamic", "static"):
        try:
            sessions[f"ort-int8-{mode}"] = quantize_onnx(
                fp32, work / f"kop.int8-{mode}.onnx", mode, [calib[i : i + 8] for i in range(0, len(calib), 8)]
            )
        except Exception as exc:
            out["engines"][f"ort-int8-{mode}"] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
    for name, path in sessions.items():
        sess = OnnxModel(path, threads=threads)
        p = np.concatenate([sess(x[i : i + 16]) for i in range(0, len(x), 16)]).astype(np.float64)
        out["engines"][name] = score(p)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        m = model.to(memory_format=torch.channels_last)
        p = np.concatenate(
            [
                torch.sigmoid(
                    m(images=torch.from_numpy(x[i : i + 16]).contiguous(memory_format=torch.channels_last)).float()
                ).numpy()
                for i in range(0, len(x), 16)
            ]
        ).astype(np.float64)
    out["engines"]["torch-cl-bf16"] = score(p)
    # the model's own sensitivity, for scale: fp32, inputs moved by uniform noise of +-1 grey level
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        xn = torch.from_numpy(x)
        xn = xn + (torch.rand(xn.shape, generator=g) - 0.5) * 2 * (1 / 255) / torch.tensor(info.preprocess.std).view(
            3, 1, 1
        )
        p = np.concatenate(
            [torch.sigmoid(model(images=xn[i : i + 16]).float()).numpy() for i in range(0, len(xn), 16)]
        ).astype(np.float64)
    out["engines"]["torch-fp32, input +-1 grey level noise (reference)"] = score(p)
    return out


# --------------------------------------------------------------------------------------------
# the section


def run_section(
    quick: bool = False,
    peaks: dict | None = None,
    threads: int | None = None,
    models=None,
    engines=None,
    run: str | None = None,
    data: str | None = None,
    work: Path | None = None,
    compile_cap_s: float = 420.0,
    isolate: bool | None = None,
    fallback_run: str | None = None,
    log=print,
) -> dict:
    """``isolate`` (default: not with ``quick``): one process per (model, engine), so the peak
    memory is that engine's own; in-process rows (the smoke run) report a cumulative peak."""
    import torch

    threads = threads or torch.get_num_threads()
    models = list(models or (("efficientnet_lite0",) if quick else MODELS))
    engines = list(engines or ENGINES)
    size = (
        48 if quick else 224
    )  # --quick: small (at 32 px ONNX Runtime's static int8 session rejects a late depthwise conv's input shape)
    settings = {
        "image_size": size,
        "batches": list(BATCHES),
        "threads": threads,
        "warmup": 1 if quick else 3,
        "min_iters": 3 if quick else 20,
        "max_iters": 20 if quick else 300,
        "target_s": 0.3 if quick else 8.0,
    }
    isolate = (not quick) if isolate is None else isolate
    if quick:  # compiling takes minutes here: more than the whole smoke run may spend
        engines = [e for e in engines if not ENGINES[e].get("compile")]
    from benchmarks.machine import bf16_native

    emulated = not bf16_native()
    settings["bf16_native"] = not emulated
    # --quick where bf16 is emulated (~30x slower than fp32 here: 5 s per batch of 32 on a loaded
    # 2-core machine): the bf16 rows are timed with one call per batch size (still built, run and
    # compared with fp32 like every other row) and left out of the head-to-head.
    once = quick and emulated
    doc: dict = {"settings": settings, "models": {}, "notes": []}
    tmp = tempfile.TemporaryDirectory(prefix="kneeosteo-bench-inf-") if work is None else None
    work = Path(tmp.name) if tmp else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        with section(doc):
            for name in models:
                net = build_net(name)
                mean, std = net.model.spec.mean, net.model.spec.std
                state = work / f"{name}.pt"
                torch.save(net.model.state_dict(), state)
                agree_x = sample_inputs(AGREE_N, size, mean, std, seed=1)
                np.save(work / f"{name}.agree.npy", agree_x)
                calib = sample_inputs(8 if quick else 32, size, mean, std, seed=2)
                mdoc: dict = {
                    "flops_per_image": count_flops(net, size),
                    "params": sum(p.numel() for p in net.parameters()),
                }
                del net
                ex = export_files(name, build_net(name, state), size, work, calib)
                mdoc["export"] = {"seconds": ex["seconds"], "errors": ex["errors"]}
                mdoc["engines"] = {}
                for eng in engines:
                    spec = {
                        "engine": eng,
                        "model": name,
                        "state": str(state),
                        "files": ex["files"],
                        "file_errors": ex["errors"],
                        "agree_inputs": str(work / f"{name}.agree.npy"),
                        "batches": list(BATCHES),
                        **settings,
                        "once": once and bool(ENGINES[eng].get("bf16")),
                    }
                    cap = (60 if quick else compile_cap_s) if ENGINES[eng].get("compile") else (120 if quick else 900)
                    log(f"  inference: {name} {eng} ...")
                    res = _run_worker(spec, cap) if isolate else _in_process(spec)
                    if ENGINES[eng].get("bf16"):
                        res["bf16_emulated"] = emulated
                        res["timed_once"] = spec["once"]
                    mdoc["engines"][eng] = res
                _derive(mdoc, peaks or {})
                log(f"  inference: {name} head-to-head (interleaved) ...")
                left_out = [e for e in HEAD_TO_HEAD if once and ENGINES[e].get("bf16")]
                try:
                    mdoc["head_to_head"] = head_to_head(
                        {
                            "model": name,
                            "state": str(state),
                            "files": ex["files"],
                            "file_errors": ex["errors"],
                            "threads": threads,
                            "image_size": size,
                        },
                        engines=[e for e in HEAD_TO_HEAD if e not in left_out],
                        rounds={1: 3, 32: 2} if quick else {1: 30, 32: 6},
                        pause_s=0.05 if quick else 0.2,
                    )
                    for e in left_out:
                        mdoc["head_to_head"].setdefault("skipped", {})[e] = "--quick: bf16 is emulated on this CPU"
                except Exception as exc:
                    mdoc["head_to_head"] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
                doc["models"][name] = mdoc
            if quick:
                doc["notes"].append(
                    "torch.compile rows skipped in --quick (compilation alone exceeds the smoke budget)"
                )
            if not isolate:
                doc["notes"].append("engines ran in one process: peak RSS is cumulative, not per engine")
            if emulated:
                doc["notes"].append(
                    "bf16 is emulated on this CPU (no AVX-512 BF16/AMX, or PyTorch capped at AVX2): "
                    "the bf16 rows time the emulation"
                    + (
                        "; --quick timed them with one call per batch size and left them out of the head-to-head"
                        if once
                        else ""
                    )
                )
            doc["int8_accuracy_kop"] = _kop_accuracy(quick, run, data, work, threads, fallback_run)
    finally:
        if tmp:
            tmp.cleanup()
    return doc


def _kop_accuracy(quick, run, data, work, threads, fallback=None) -> dict:
    if quick and not run:
        return {"skipped": "--quick: needs a trained run (pass --run)"}
    path, why = find_model_run(run, fallback)
    try:
        return int8_accuracy(path, why, Path(data) if data else None, work, threads, limit=8 if quick else None)
    except Exception as exc:  # report, do not lose the timing rows
        return {"skipped": f"failed: {type(exc).__name__}: {exc}"[:400]}


def _derive(mdoc: dict, peaks: dict) -> None:
    """GFLOP/s, % of the measured peak, agreement with the fp32 reference."""
    flops = mdoc["flops_per_image"]
    ref = mdoc["engines"].get(REFERENCE, {}).get("agree_probs")
    for eng, res in mdoc["engines"].items():
        if "batches" not in res:
            continue
        kind = ENGINES[eng]["peak"]
        peak = (peaks.get(kind) or {}).get("best_gflops") if (peaks.get(kind) or {}).get("available") else None
        for row in res["batches"].values():
            ips = row.get("images_per_s") or 0
            row["gflops"] = round(flops * ips / 1e9, 2)
            row["peak_kind"] = kind
            row["pct_of_peak"] = round(100 * row["gflops"] / peak, 2) if peak else None
        if ref is not None and res.get("agree_probs") is not None:
            res["max_abs_dp_vs_fp32"] = float(np.max(np.abs(np.array(res["agree_probs"]) - np.array(ref))))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        print(json.dumps(worker(spec)))


if __name__ == "__main__":
    main()
