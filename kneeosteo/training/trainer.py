"""`kneeosteo train`: the paper's protocol, from a data folder to a scored run folder.

With the backbone frozen, its features are computed once and cached (``prepare``), so an
epoch only runs the attention module and the head; bf16 autocast and channels-last make that
part as fast as the CPU allows. Every epoch's state is saved, so ``--resume`` continues after
a crash (even ``kill -9`` mid-epoch) with the same result an uninterrupted run would have
given. Under ``torchrun`` the same loop runs data-parallel (``distributed.py``): rank 0 writes
every file, the others only compute.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kneeosteo import __version__
from kneeosteo.config import TrainConfig
from kneeosteo.data.augment import AugmentParams, augment_batch, source_augment_batch
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.scan import file_meta, scan_dataset
from kneeosteo.data.shortcut import metadata_weights
from kneeosteo.data.split import SplitSets, load_split, make_split, write_split
from kneeosteo.errors import ConfigError, DataError
from kneeosteo.features.cache import TensorCache, backbone_cache_id
from kneeosteo.features.prepare import PreparedSet, precache, prepare
from kneeosteo.models import build_model, get_backbone_spec
from kneeosteo.models.head import ClassifierHead
from kneeosteo.paths import cache_dir
from kneeosteo.run import RunDir
from kneeosteo.tasks import Binary, Task, task_for
from kneeosteo.training import distributed
from kneeosteo.training.distributed import Dist
from kneeosteo.utils.allocator import keep_freed_memory
from kneeosteo.utils.atomic import atomic_path, ensure_writable, remove_temporaries, write_json, write_text
from kneeosteo.utils.compute_path import bf16_native, compute_path
from kneeosteo.utils.csvfile import write_csv
from kneeosteo.utils.progress import progress_bar

log = logging.getLogger(__name__)
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return name


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """bf16 where the hardware runs it natively (AVX-512 BF16/AMX CPUs, Ampere+ GPUs), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if bf16_native() else None


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def resolve_split(cfg: TrainConfig, data: Path, split_file: Path, prep: Preprocess | None = None) -> SplitSets:
    """The split file given, else a fresh paper-protocol split saved as ``split_file``. The scan
    that makes it decodes every image; with ``prep`` it keeps what ``prepare`` will need of each
    (``features.prepare.precache``), so no image is decoded twice in one run."""
    if cfg.data.split:
        return task_sets(load_split(cfg.data.split, data, cfg.data.fold, target=cfg.data.target), cfg)
    hook = None
    if prep is not None:
        cache = TensorCache(cache_dir() / "tensors")
        hook = lambda info, img: precache(info["content_id"], img.pixels, prep, cache)  # noqa: E731
    scan = scan_dataset(data, positive=cfg.data.positive, on_image=hook, **cfg.scan_options())
    doc = make_split(scan, "paper", seed=cfg.runtime.seed)
    write_split(doc, split_file)
    return task_sets(load_split(split_file, data), cfg)


def task_sets(sets: SplitSets, cfg: TrainConfig) -> SplitSets:
    """The split as the task sees it: ``--merge`` applied (a split file keeps the original
    classes), and a binary task checked to have two classes."""
    task = task_for(cfg.data)
    if cfg.data.merge:
        sets = sets.merged(cfg.data.merge, task.merge_positive(cfg.data.positive))
    task.check_split_classes(sets.classes)
    return sets


@dataclass
class Batches:
    """Tensors of one partition ready for the model."""

    data: PreparedSet
    prep: Preprocess

    online: AugmentParams | None = None  # draw a fresh augmentation per batch (--augment online)
    source: bool = False  # with online: also source_augment_batch (--source-augment)
    weights: torch.Tensor | None = None  # per-row loss weights (--reweight metadata), None = all 1
    aux: torch.Tensor | None = None  # per-row standardised auxiliary target (--aux-target), NaN = unknown

    def aux_targets(self, idx: torch.Tensor, device: str) -> torch.Tensor | None:
        return None if self.aux is None else self.aux[idx].to(device)

    def loss_weights(self, idx: torch.Tensor, device: str) -> torch.Tensor | None:
        return None if self.weights is None else self.weights[idx].to(device)

    def inputs(self, idx: torch.Tensor, channels_last: bool, device: str, rng: np.random.Generator | None = None):
        grey = self.data.grey[idx].float()
        augmented = self.online is not None and rng is not None
        if augmented:
            grey = augment_batch(grey, rng, self.online)
            if self.source:
                grey = source_augment_batch(grey, rng)
        x = self.prep.normalise(grey).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # cached features describe the un-augmented input; with online augmentation the frozen
        # backbone must see the augmented pixels, so it runs live
        feats = None if (self.data.features is None or augmented) else self.data.features[idx].to(device)
        return x, feats, self.data.targets[idx].to(device)


def run_epoch(
    model,
    batches: Batches,
    cfg: TrainConfig,
    device: str,
    amp,
    optimizer=None,
    generator: torch.Generator | None = None,
    desc: str = "",
    ctx: Dist | None = None,
) -> tuple[float, float, np.ndarray]:
    """One pass; trains when ``optimizer`` is given. Returns mean loss, accuracy, probabilities.

    With ``ctx.world > 1`` every rank draws the same permutation and trains on its slice of each
    batch; the loss is scaled so that DDP's gradient average equals one process's batch mean.
    """
    world = ctx.world if (ctx is not None and optimizer is not None) else 1
    n = len(batches.data)
    train = optimizer is not None
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))) if train else None
    model.train(train)
    task = getattr(getattr(model, "module", model), "task", None) or Binary()
    total, correct, probs = 0.0, 0, None
    steps = range(0, n, cfg.optimiser.batch_size)
    for start in progress_bar(steps, desc, total=len(steps)):
        idx = order[start : start + cfg.optimiser.batch_size]
        if train and len(idx) < max(2, world):  # BatchNorm cannot train on a single sample
            continue
        batch_n = len(idx)
        x, feats, y = batches.inputs(idx, cfg.runtime.channels_last, device, rng)
        w = batches.loss_weights(idx, device) if train else None
        z = batches.aux_targets(idx, device) if train else None
        if world > 1:  # every rank prepares the whole batch (online augmentation draws per image), keeps its rows
            rows = ctx.piece(batch_n)
            idx, x, y = idx[rows], x[rows], y[rows]
            feats = None if feats is None else feats[rows]
            w = None if w is None else w[rows]
            z = None if z is None else z[rows]
        with torch.set_grad_enabled(train), torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            aux_sum = None
            if z is not None:  # the auxiliary target (--aux-target): its head shares the layers below
                logits, aux_out = model(images=x, features=feats, with_aux=True)
                logits = logits.float()
                aux_sum = cfg.optimiser.aux_weight * aux_loss_sum(aux_out, z)
            else:
                logits = model(images=x, features=feats).float()
            # validation loss: the task's own loss on the labels as given (early stopping compares like with like)
            robust = {"smoothing": cfg.optimiser.label_smoothing, "gce_q": cfg.optimiser.gce_q} if train else {}
            if world > 1:
                summed = task.loss(logits, y, w, reduction="sum", **robust)
                if aux_sum is not None:
                    summed = summed + aux_sum
                loss = summed * (world / batch_n)
            else:
                loss = task.loss(logits, y, w, **robust)
                if aux_sum is not None:  # summed over the rows that have a value, per row of the batch
                    loss = loss + aux_sum / batch_n
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        p = task.answer_of(logits.detach()).double().cpu().numpy()
        if probs is None:
            probs = np.zeros((n, *p.shape[1:]), dtype=np.float64)
        probs[idx.numpy()] = p
        total += float(summed.detach()) if world > 1 else float(loss.detach()) * len(idx)
        correct += int(task.correct(p, y.cpu().numpy(), cfg.trust.threshold).sum())
    if world > 1:
        ctx.batch = None
        total, correct = ctx.all_sum(total, correct)
    return total / n, correct / n, (np.zeros(n) if probs is None else probs)


def aux_loss_sum(pred: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Squared error of the auxiliary output on the standardised target, summed over the rows that
    have one (``z`` NaN: no value, no loss and no gradient); 0 for a batch with none."""
    known = ~torch.isnan(z)
    return ((pred.float()[known] - z[known]) ** 2).sum()


def aux_targets(sets: SplitSets, train: PreparedSet, name: str) -> tuple[torch.Tensor, dict]:
    """The training rows' ``name`` values (the split's ``values``: a manifest column or a reference
    T-score), standardised with the known films' mean and standard deviation; NaN where a film has
    none. Augmented copies share their source's value. Also a summary for the run's record."""
    raw = {p: sets.values.get(p, {}).get(name) for p in dict.fromkeys(train.paths)}
    known = {p: float(v) for p, v in raw.items() if v is not None and math.isfinite(float(v))}
    if len(known) < 2:
        raise DataError(
            f"data.aux_target = {name}: {len(known)} training film(s) have a {name} value; at least 2 are needed "
            "(give the column in the label manifest, or train on a split whose values hold it)"
        )
    vals = np.array(list(known.values()))
    mean, sd = float(vals.mean()), float(vals.std())
    sd = sd if sd > 0 else 1.0
    rows = torch.tensor([(known[p] - mean) / sd if p in known else math.nan for p in train.paths], dtype=torch.float32)
    summary = {"target": name, "films_with_value": len(known), "mean": round(mean, 4), "sd": round(sd, 4)}
    return rows, summary


def _save_state(run: RunDir, model, optimizer, state: dict) -> None:
    """Everything --resume needs in ONE atomic file (weights, Adam moments, and the JSON state in
    its metadata), so a kill between two writes cannot pair one epoch's weights with another
    epoch's state; state.json is a readable copy."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):  # indexed like _load_state: by position among the parameters
        for name, v in optimizer.state.get(p, {}).items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(v)
    with atomic_path(run.state_file) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"state": json.dumps(state)},
        )
    write_json(run.state_json, state)


def _load_state(run: RunDir, model, optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(run.state_file), "pt") as fh:
        embedded = (fh.metadata() or {}).get("state")
    state = json.loads(embedded) if embedded else json.loads(run.state_json.read_text())
    tensors = load_file(str(run.state_file))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        # moments go where the parameter is (a resume on CUDA); Adam keeps ``step`` on the CPU
        st = {k: v if k == "step" else v.to(device=p.device, dtype=p.dtype) for k, v in st.items()}
        if st:
            optimizer.state[p] = st
    return state


def environment() -> dict:
    return {
        "kneeosteo": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **compute_path(),  # cpu_capability, onednn_max_cpu_isa, cpu_flags, bf16_native, forced_below_cpu
        "threads": torch.get_num_threads(),
    }


def aug_params(cfg: TrainConfig) -> AugmentParams:
    return AugmentParams(
        cfg.augment.copies, tuple(cfg.augment.zoom), tuple(cfg.augment.crop_fraction), cfg.augment.rotation
    )


def prepare_partitions(
    cfg: TrainConfig,
    data: Path,
    sets: SplitSets,
    backbone,
    backbone_id: str | None,
    prep: Preprocess,
    device: str,
    parts=("train", "val", "test"),
    ctx: Dist | None = None,
) -> dict[str, PreparedSet]:
    """Partitions as tensors; under DDP each rank first computes its shard into the shared cache."""
    if ctx is not None and ctx.world > 1:
        distributed.warm_cache(
            ctx, sets, lambda shard, ps: prepare_partitions(cfg, data, shard, backbone, backbone_id, prep, device, ps)
        )
    cache = TensorCache(cache_dir() / "tensors")
    aug = aug_params(cfg)
    out = {}
    for part in parts:
        out[part] = prepare(
            sets.items(part),
            data,
            prep,
            cache,
            augment=aug if (part == "train" and cfg.augment.mode == "offline") else None,
            seed=cfg.runtime.seed,
            backbone=backbone,
            backbone_id=backbone_id,
            device=device,
            label=part,
        )
    log.info("tensor cache: %d hits, %d misses", cache.hits, cache.misses)
    return out


def _split_sets(cfg: TrainConfig, data: Path, run: RunDir, resume: bool, ctx: Dist, prep: Preprocess) -> SplitSets:
    """The run's split; rank 0 writes split.json, the other ranks read what it wrote."""
    if resume and run.split_file.exists():  # the split file copied at the start, same fold
        return task_sets(load_split(run.split_file, data, cfg.data.fold, target=cfg.data.target), cfg)
    if ctx.is_main:
        sets = resolve_split(cfg, data, run.split_file, prep)
        if cfg.data.split and not run.split_file.exists():
            write_text(run.split_file, Path(cfg.data.split).read_text())
    ctx.barrier()
    return (
        sets
        if ctx.is_main
        else task_sets(load_split(cfg.data.split or run.split_file, data, cfg.data.fold, target=cfg.data.target), cfg)
    )


@dataclass
class TrainResult:
    """What training leaves for its caller to score: the run folder, the best epoch's model
    (on ``device``), the prepared test partition, the training originals (no augmented copies;
    for the shortcut probes) and the split."""

    run: RunDir
    model: torch.nn.Module
    test: PreparedSet
    train: PreparedSet
    sets: SplitSets
    history: list[dict]
    device: str
    ctx: Dist

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main


@dataclass
class _Setup:
    run: RunDir
    data: Path
    device: str
    amp: torch.dtype | None
    ctx: Dist
    sets: SplitSets
    model: torch.nn.Module
    prep: Preprocess
    parts: dict[str, PreparedSet]
    settings: dict
    record: dict
    weights: torch.Tensor | None = None  # training rows' loss weights (--reweight)
    aux: torch.Tensor | None = None  # training rows' standardised auxiliary target (--aux-target)


def _setup(cfg: TrainConfig, resume: bool) -> _Setup:
    """Folder, device, split, model, and the partitions as tensors (cached features)."""
    data = Path(cfg.data.path) if cfg.data.path else None
    if data is None or not data.is_dir():
        raise DataError(f"{cfg.data.path}: data folder not found")
    run = RunDir(ensure_writable(cfg.runtime.out))  # a read-only or full disk fails now, not after the first epoch
    device = resolve_device(cfg.runtime.device)
    ctx = distributed.context(device)
    if resume and ctx.is_main:  # what a kill -9 in the middle of a write left behind
        for folder in (run.path, run.checkpoint_dir):
            remove_temporaries(folder)
    amp = autocast_dtype(cfg.runtime.precision, device)
    set_seed(cfg.runtime.seed)
    # the model first: missing backbone weights fail in a second, before the data is scanned
    # (the split's own seeded generator is independent of the initialisation drawn here)
    model, winfo = build_model(
        cfg.model.backbone,
        weights=cfg.model.backbone_weights,
        attention=cfg.model.attention,
        use_backbone=cfg.model.use_backbone,
        finetune=cfg.model.finetune,
        image_size=cfg.data.image_size,
        trainable_stages=cfg.model.trainable_stages,
        task=cfg.data.task,
        aux_outputs=int(cfg.data.aux_target != "none"),
    )
    model.to(device)
    spec = get_backbone_spec(cfg.model.backbone)
    prep = Preprocess(cfg.data.preprocess, cfg.data.image_size, tuple(spec.mean), tuple(spec.std), cfg.data.clahe)
    sets = _split_sets(cfg, data, run, resume, ctx, prep)
    task = task_for(cfg.data)
    outputs = task.outputs(len(sets.classes))
    scaling = task.head_scaling(np.array([v for _, v in sets.items("train")], dtype=np.float64))
    if scaling is not None:  # K logits, or a value in target units; the head drawn from the run's seed
        shift, scale = scaling
        torch.manual_seed(cfg.runtime.seed)
        model.head = ClassifierHead(
            model.head.in_features,
            model.head.hidden,
            model.head.dropout,
            outputs,
            round(shift, 6),
            round(scale, 6),
            aux_outputs=int(cfg.data.aux_target != "none"),
        ).to(device)
    cache_backbone = cfg.model.use_backbone and not cfg.model.finetune
    backbone_id = backbone_cache_id(cfg.model.backbone, model.backbone, winfo.sha256) if cache_backbone else None
    t0 = time.perf_counter()
    parts = prepare_partitions(
        cfg, data, sets, model.backbone if cache_backbone else None, backbone_id, prep, device, ctx=ctx
    )
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    record = {
        "data": str(data),
        "split_sizes": {p: len(getattr(sets, p)) for p in ("train", "val", "test")},
        "train_samples": len(parts["train"]),
        "backbone_weights": winfo.to_dict(),
        "autocast": str(amp) if amp else "fp32",
        "device_used": device,
        "processes": ctx.world,
        "environment": environment(),
        "prepare_seconds": round(time.perf_counter() - t0, 1),
        "command_line": shlex.join(sys.argv),  # the process's: `kneeosteo train ...`, or the reproduce grid's
    }
    weights = None
    if cfg.optimiser.reweight == "metadata":
        weights, record["reweight"] = _metadata_weights(data, parts["train"], cfg.runtime.seed)
    aux = None
    if cfg.data.aux_target != "none":
        aux, record["aux_target"] = aux_targets(sets, parts["train"], cfg.data.aux_target)
        record["aux_target"]["weight"] = cfg.optimiser.aux_weight
    return _Setup(
        run,
        data,
        device,
        amp,
        ctx,
        sets,
        model,
        prep,
        parts,
        {**cfg.to_dict(), "data": str(data)},
        record,
        weights,
        aux,
    )


def _metadata_weights(data: Path, train: PreparedSet, seed: int) -> tuple[torch.Tensor, dict]:
    """Per-row loss weights against the metadata shortcut (``data.shortcut.metadata_weights``), fitted
    on the training originals; augmented copies share their source's weight. Also a summary for the record."""
    paths = list(dict.fromkeys(train.paths))
    metas = [file_meta(data / p) for p in paths]
    target = dict(zip(train.paths, train.targets.numpy().astype(int)))
    w = metadata_weights(metas, [target[p] for p in paths], seed=seed)
    by_path = dict(zip(paths, w))
    rows = torch.tensor([by_path[p] for p in train.paths], dtype=torch.float32)
    summary = {
        "method": "1 / P(own label | file metadata), out-of-fold forest, clipped at 10, mean 1",
        "min": round(float(w.min()), 4),
        "max": round(float(w.max()), 4),
        "share_above_2": round(float((w > 2).mean()), 4),
    }
    return rows, summary


def _save_model(s: _Setup, cfg: TrainConfig) -> None:
    s.run.save_model(
        s.model,
        s.prep,
        run_classes(s.sets, task_for(cfg.data)),
        cfg.trust.threshold,
        s.settings,
        s.record,
        task=cfg.data.task,
        target=cfg.data.target,
    )


def run_classes(sets: SplitSets, task: Task) -> tuple[str, ...]:
    """The classes a run's identity records: (negative, positive), the K classes in index order,
    or none for a regression."""
    return task.run_classes(sets.classes, sets.positive)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters for Adam; a fine-tuned backbone's in a group of its own at
    ``lr * backbone_lr_scale`` (discriminative learning rates). Empty groups are left out."""
    backbone = {id(p) for p in model.backbone.parameters()} if getattr(model, "backbone", None) is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in backbone]},
        {
            "params": [p for p in trainable if id(p) in backbone],
            "lr": cfg.optimiser.lr * cfg.optimiser.backbone_lr_scale,
        },
    ]
    return [g for g in groups if g["params"]]


def _fit(s: _Setup, cfg: TrainConfig, resume: bool, console) -> dict:
    """The epochs: train, validate, keep the best by validation loss, save state every epoch."""
    net = distributed.data_parallel(s.model, s.ctx, s.device) if s.ctx.world > 1 else s.model
    optimizer = torch.optim.Adam(
        param_groups(s.model, cfg), lr=cfg.optimiser.lr, weight_decay=cfg.optimiser.weight_decay
    )
    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0, "history": []}
    if resume and s.run.state_file.exists():
        state = _load_state(s.run, s.model, optimizer)
        console(f"resuming after epoch {state['epoch']}")
    online = aug_params(cfg) if cfg.augment.mode == "online" else None
    batches = {
        k: Batches(v, s.prep, online if k == "train" else None, cfg.augment.source_augment and k == "train")
        for k, v in s.parts.items()
    }
    batches["train"].weights = s.weights
    batches["train"].aux = s.aux
    sharded = {"ctx": s.ctx} if s.ctx.world > 1 else {}
    while state["epoch"] < cfg.optimiser.epochs and state["bad_epochs"] < cfg.optimiser.patience:
        epoch = state["epoch"] + 1
        gen = torch.Generator().manual_seed(cfg.runtime.seed * 100_003 + epoch)
        torch.manual_seed(cfg.runtime.seed * 100_003 + epoch)  # dropout masks: a function of (seed, epoch)
        t = time.perf_counter()
        tl, ta, _ = run_epoch(
            net, batches["train"], cfg, s.device, s.amp, optimizer, gen, f"epoch {epoch} train", **sharded
        )
        vl, va, _ = run_epoch(s.model, batches["val"], cfg, s.device, s.amp, desc=f"epoch {epoch} val")
        row = {
            "epoch": epoch,
            "train_loss": round(tl, 6),
            "train_accuracy": round(ta, 6),
            "val_loss": round(vl, 6),
            "val_accuracy": round(va, 6),
            "lr": cfg.optimiser.lr,
            "seconds": round(time.perf_counter() - t, 2),
        }
        state["history"].append(row)
        console(
            f"epoch {epoch:3d}  train loss {tl:.4f} acc {ta:.3f}  val loss {vl:.4f} acc {va:.3f}  ({row['seconds']:.1f}s)"
        )
        improved = vl < state["best_val_loss"] - 1e-6
        if improved:
            state.update(best_val_loss=vl, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        if s.ctx.is_main:
            if improved:
                _save_model(s, cfg)
            write_csv(s.run.history_file, HISTORY_FIELDS, state["history"])
            _save_state(s.run, s.model, optimizer, state)
    return state


def train(cfg: TrainConfig, resume: bool = False, console=print) -> TrainResult:
    """Train on the split and keep the best epoch by validation loss; the caller scores the test set
    (``kneeosteo.experiments.pipeline.train_and_score``)."""
    keep_freed_memory()  # each step's activations reuse the last step's pages (utils/allocator.py)
    s = _setup(cfg, resume)
    if not s.ctx.is_main:
        console = _silent
    if not resume and s.ctx.is_main:
        _save_model(s, cfg)  # config.json exists from the start, for --resume
    state = _fit(s, cfg, resume, console)
    if s.ctx.is_main:
        s.run.update_record(best_epoch=state["best_epoch"], epochs_run=state["epoch"])
        console(f"best epoch {state['best_epoch']} (val loss {state['best_val_loss']:.4f}); scoring the test set")
    best = s.run.load_model(s.device) if s.ctx.is_main else s.model
    return TrainResult(
        s.run, best, s.parts["test"], s.parts["train"].originals(), s.sets, state["history"], s.device, s.ctx
    )


def _silent(*_args, **_kw) -> None:
    pass
