"""Training, the paper protocol on KOP: the naive loop against ours (cached).

Both train the same model (frozen EfficientNet-Lite0 + AM + head) on the same samples per epoch
(every training image and its 5 offline-augmented copies, batch 32, Adam), with the same
precision settings, so the difference is the caching alone:

- **naive**: every epoch decodes each training image, makes its augmented copies, preprocesses
  them and runs the frozen backbone on every batch before the AM/head step (2 decode threads,
  like ``prepare``). Samples come image by image (an image's 6 versions are adjacent), shuffled
  by image.
- **cached** (``kneeosteo train``): ``prepare`` computes the 224-px inputs and the backbone
  features once into the TensorCache; an epoch is then ``run_epoch`` over tensors (AM + head
  only). Epoch times exclude ``prepare``, which is reported on its own: *cold* (empty tensor
  cache; the scan memo is warm, as after ``kneeosteo split``) and *warm* (every entry a hit).

An epoch is a training pass plus a validation pass, as in ``kneeosteo train``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, imagegen, loadavg, section

KOP = (REPO / ".." / "shared" / "datasets" / "kop").resolve()


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _prefetch(pool, fn, items, depth: int):
    """pool.map with at most ``depth`` results in flight (bounded memory)."""
    it = iter(items)
    q = deque(pool.submit(fn, x) for x in islice(it, depth))
    while q:
        f = q.popleft()
        nxt = next(it, None)
        if nxt is not None:
            q.append(pool.submit(fn, nxt))
        yield f.result()


def _setup(cfg, data: Path, split_path: Path):
    """Model, split and preprocessing exactly as ``trainer.train`` builds them."""
    import torch

    from kneeosteo.data.preprocess import Preprocess
    from kneeosteo.data.split import load_split
    from kneeosteo.models import build_model, get_backbone_spec
    from kneeosteo.training.trainer import set_seed

    set_seed(cfg.runtime.seed)
    model, winfo = build_model(
        cfg.model.backbone,
        weights=cfg.model.backbone_weights,
        attention=cfg.model.attention,
        image_size=cfg.data.image_size,
    )
    spec = get_backbone_spec(cfg.model.backbone)
    prep = Preprocess(cfg.data.preprocess, cfg.data.image_size, tuple(spec.mean), tuple(spec.std), cfg.data.clahe)
    sets = load_split(split_path, data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.optimiser.lr, weight_decay=cfg.optimiser.weight_decay)
    return model, winfo, prep, sets, opt


# --------------------------------------------------------------------------------------------
# naive


def naive_epoch(model, optimizer, data: Path, sets, prep, cfg, amp, epoch: int, workers: int = 2) -> dict:
    """One epoch of the naive loop; returns timings and sample counts."""
    import torch
    import torch.nn.functional as F

    from kneeosteo.data.augment import offline_versions
    from kneeosteo.data.reader import ImageReadError, read_image
    from kneeosteo.training.trainer import aug_params

    aug = aug_params(cfg)
    rng = np.random.default_rng(cfg.runtime.seed * 100_003 + epoch)

    def load(item, augment: bool):
        rel, target = item
        try:
            img = read_image(data / rel)
        except ImageReadError:
            return None
        grey = [prep.geometry(img.pixels)]
        if augment:
            grey += [prep.geometry(v) for v in offline_versions(img.pixels, img.content_id, cfg.runtime.seed, aug)]
        return torch.stack(grey), float(target)

    def batches(items, augment):
        buf_x, buf_y = [], []
        with ThreadPoolExecutor(workers) as pool:
            for got in _prefetch(pool, lambda it: load(it, augment), items, depth=2 * workers):
                if got is None:
                    continue
                g, y = got
                buf_x.extend(g)
                buf_y.extend([y] * len(g))
                while len(buf_x) >= cfg.optimiser.batch_size:
                    yield buf_x[: cfg.optimiser.batch_size], buf_y[: cfg.optimiser.batch_size]
                    buf_x, buf_y = buf_x[cfg.optimiser.batch_size :], buf_y[cfg.optimiser.batch_size :]
        if buf_x:
            yield buf_x, buf_y

    def inputs(gs, ys):
        x = prep.normalise(torch.stack(gs))
        if cfg.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.tensor(ys)

    train_items = list(sets.items("train"))
    order = rng.permutation(len(train_items))
    t0 = time.perf_counter()
    model.train()
    n_train = 0
    for gs, ys in batches([train_items[i] for i in order], augment=True):
        if len(gs) < 2:
            continue
        x, y = inputs(gs, ys)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images=x).float()  # frozen backbone runs here, every epoch
            loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n_train += len(gs)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.eval()
    n_val = 0
    with torch.no_grad():
        for gs, ys in batches(list(sets.items("val")), augment=False):
            x, _ = inputs(gs, ys)
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                model(images=x)
            n_val += len(gs)
    val_s = time.perf_counter() - t1
    return _row(epoch, train_s, val_s, n_train, n_val)


def _row(epoch, train_s, val_s, n_train, n_val) -> dict:
    return {
        "epoch": epoch,
        "train_s": round(train_s, 2),
        "val_s": round(val_s, 2),
        "epoch_s": round(train_s + val_s, 2),
        "train_samples": n_train,
        "val_samples": n_val,
        "train_images_per_s": round(n_train / train_s, 2) if train_s > 0 else None,
        "loadavg": loadavg(),
    }


def run_naive(cfg, data, split_path, amp, epochs: int, log=print) -> dict:
    import torch

    model, _, prep, sets, opt = _setup(cfg, data, split_path)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rows = []
    for e in range(1, epochs + 1):
        rows.append(naive_epoch(model, opt, data, sets, prep, cfg, amp, e))
        log(f"  training: naive {'bf16' if amp else 'fp32'} epoch {e}: {rows[-1]['epoch_s']} s")
    return {"epochs": rows, **_summary(rows)}


# --------------------------------------------------------------------------------------------
# cached (ours)


def run_cached(cfg, data, split_path, amp, epochs: int, cache: Path, cold: bool = True, log=print) -> dict:
    """Ours, through the trainer's own functions (prepare_partitions, Batches, run_epoch).
    ``cold``: time prepare on an empty tensor cache first, then again warm; else warm only."""
    import torch

    from kneeosteo.features.cache import backbone_cache_id
    from kneeosteo.training.trainer import Batches, prepare_partitions, run_epoch

    model, winfo, prep, sets, opt = _setup(cfg, data, split_path)
    bid = backbone_cache_id(cfg.model.backbone, model.backbone, winfo.sha256)
    out: dict = {}
    with _env(KNEEOSTEO_CACHE=cache):
        if cold:
            shutil.rmtree(cache / "tensors", ignore_errors=True)
        for kind in ("cold", "warm") if cold else ("warm",):
            t = time.perf_counter()
            parts = prepare_partitions(cfg, data, sets, model.backbone, bid, prep, "cpu")
            out[f"prepare_{kind}_s"] = round(time.perf_counter() - t, 2)
            log(f"  training: cached prepare ({kind}): {out[f'prepare_{kind}_s']} s")
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = {k: Batches(v, prep, None) for k, v in parts.items()}
    rows = []
    for e in range(1, epochs + 1):
        gen = torch.Generator().manual_seed(cfg.runtime.seed * 100_003 + e)
        torch.manual_seed(cfg.runtime.seed * 100_003 + e)
        t = time.perf_counter()
        run_epoch(model, batches["train"], cfg, "cpu", amp, opt, gen)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        run_epoch(model, batches["val"], cfg, "cpu", amp)
        val_s = time.perf_counter() - t
        rows.append(_row(e, train_s, val_s, len(parts["train"]), len(parts["val"])))
        log(f"  training: cached {'bf16' if amp else 'fp32'} epoch {e}: {rows[-1]['epoch_s']} s")
    out.update({"epochs": rows, **_summary(rows)})
    out["tensor_cache_mb"] = round(
        sum(f.stat().st_size for f in (cache / "tensors").rglob("*") if f.is_file()) / 2**20, 1
    )
    return out


def _summary(rows: list[dict]) -> dict:
    ep = [r["epoch_s"] for r in rows]
    ips = [r["train_images_per_s"] for r in rows if r["train_images_per_s"]]
    return {
        "mean_epoch_s": round(float(np.mean(ep)), 2),
        "min_epoch_s": round(float(np.min(ep)), 2),
        "mean_train_images_per_s": round(float(np.mean(ips)), 2) if ips else None,
    }


# --------------------------------------------------------------------------------------------
# make run


def time_make_run(data: Path, work: Path, timeout: float = 3600.0) -> dict:
    """Wall time of ``make run`` end to end (audit, split, train, score) on a cold cache.

    ``-o .venv/.installed`` tells make not to reinstall the package (the stamp may be older than
    an edited pyproject.toml); installation is not part of the job being timed.
    """
    if shutil.which("make") is None:
        return {"skipped": "make not found"}
    out = work / "make-run"
    cmd = ["make", "-o", ".venv/.installed", "run", f"DATA={data}", f"OUT={out}"]
    env = {**os.environ, "KNEEOSTEO_CACHE": str(work / "make-run-cache")}
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "skipped": f"did not finish within {timeout:.0f} s"}
    wall = time.perf_counter() - t
    doc = {
        "command": " ".join(cmd),
        "cache": "cold (empty KNEEOSTEO_CACHE)",
        "exit_status": proc.returncode,
        "wall_s": round(wall, 1),
        "tail": (proc.stdout + proc.stderr).strip().splitlines()[-6:],
    }
    run = next(iter(sorted(out.glob("*-seed*"))), None)
    if run is not None:
        doc["run_folder"] = str(run)
        from kneeosteo.errors import KneeosteoError
        from kneeosteo.run import RunDir

        try:
            record = RunDir(run).config.record
            doc["epochs_run"] = record.get("epochs_run")
            doc["prepare_seconds"] = record.get("prepare_seconds")
        except (OSError, ValueError, KneeosteoError):
            pass
    return doc


# --------------------------------------------------------------------------------------------
# the section


BACKBONES = ("efficientnet_lite0", "densenet169")  # the default model's, and the paper's


def _weights(name: str, wanted: str) -> str:
    """``wanted`` when it is a file or the default weights are on this machine, else "none"
    (random weights: the same timing)."""
    from kneeosteo.experiments.reproduce import weights_available

    if wanted != "default":
        return wanted if Path(wanted).is_file() else "none"
    return wanted if weights_available(name, allow_download=False)[0] else "none"


def _ratios(rows: dict) -> dict:
    out = {}
    for prec in ("bf16", "fp32"):
        n, c = rows.get(f"naive_{prec}"), rows.get(f"cached_{prec}")
        if n and c:
            out[prec] = {
                "epoch_speedup": round(n["mean_epoch_s"] / c["mean_epoch_s"], 2),
                "train_images_per_s_speedup": round(c["mean_train_images_per_s"] / n["mean_train_images_per_s"], 2),
                "projected_30_epochs_naive_s": round(30 * n["mean_epoch_s"], 1),
                "projected_30_epochs_cached_s": round(
                    rows["cached_bf16"].get("prepare_cold_s", 0) + 30 * c["mean_epoch_s"], 1
                ),
            }
    return out


def run_section(
    quick: bool = False,
    data: str | None = None,
    epochs_naive: int = 2,
    epochs_cached: int = 3,
    make_run: bool = True,
    fp32: bool = True,
    backbones=BACKBONES,
    work: Path | None = None,
    log=print,
) -> dict:
    import torch

    from kneeosteo.config import TrainConfig
    from kneeosteo.data.scan import scan_dataset
    from kneeosteo.data.split import make_split, write_split
    from kneeosteo.training.trainer import autocast_dtype

    tmp = tempfile.TemporaryDirectory(prefix="kneeosteo-bench-train-") if work is None else None
    work = Path(tmp.name) if tmp else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    doc: dict = {"notes": []}
    try:
        with section(doc):
            if quick:
                root = imagegen().make_dataset(work / "tiny", n_per_class=10, size=64).root
                cfg = TrainConfig.from_dict(
                    dict(
                        data=str(root),
                        backbone="efficientnet_lite0",
                        backbone_weights="none",
                        copies=1,
                        batch_size=8,
                        image_size=64,
                        device="cpu",
                    )
                )
                epochs_naive = epochs_cached = 1
                data_name, fp32, make_run = "generated tiny set (20 PNGs, 64 px), 1 copy, 64-px inputs", False, False
            else:
                root = Path(data) if data else KOP
                if not root.is_dir():
                    doc["skipped"] = f"KOP not found at {root} (pass --data)"
                    return doc
                cfg = TrainConfig.from_dict(dict(data=str(root), device="cpu"))  # the defaults are the paper protocol
                data_name = f"KOP ({root})"
            cache = work / "cache"
            with _env(KNEEOSTEO_CACHE=cache):  # the scan memo, as `kneeosteo split` leaves it
                split = make_split(scan_dataset(root), seed=0, **({"test_size": 4} if quick else {}))
            split_path = work / "split.json"
            write_split(split, split_path)
            amp = autocast_dtype(cfg.runtime.precision, "cpu")
            doc["setup"] = {
                "data": data_name,
                "copies": cfg.augment.copies,
                "batch_size": cfg.optimiser.batch_size,
                "image_size": cfg.data.image_size,
                "autocast": str(amp) if amp else "fp32",
                "channels_last": cfg.runtime.channels_last,
                "threads": torch.get_num_threads(),
                "epochs_naive": epochs_naive,
                "epochs_cached": epochs_cached,
                "split_sizes": {k: len(split[k]) for k in ("train", "val", "test", "excluded")},
            }
            doc["backbones"] = {}
            for i, name in enumerate(["efficientnet_lite0"] if quick else list(backbones)):
                bcfg = cfg.replace(backbone=name, backbone_weights=_weights(name, cfg.model.backbone_weights))
                log(f"  training: backbone {name} (weights {bcfg.model.backbone_weights})")
                rows = {
                    "cached_bf16": run_cached(bcfg, root, split_path, amp, epochs_cached, cache, log=log),
                    "naive_bf16": run_naive(bcfg, root, split_path, amp, epochs_naive, log),
                }
                if fp32 and i == 0:  # fp32 rows for the default backbone only
                    rows["cached_fp32"] = run_cached(
                        bcfg, root, split_path, None, epochs_cached, cache, cold=False, log=log
                    )
                    rows["naive_fp32"] = run_naive(bcfg, root, split_path, None, max(1, epochs_naive - 1), log)
                doc["backbones"][name] = {"weights": bcfg.model.backbone_weights, "rows": rows, "ratios": _ratios(rows)}
            if make_run:
                log("  training: timing `make run` (cold cache) ...")
                doc["make_run"] = time_make_run(root, work)
            else:
                doc["make_run"] = {"skipped": "--quick" if quick else "--no-make-run"}
    finally:
        if tmp:
            tmp.cleanup()
    return doc
