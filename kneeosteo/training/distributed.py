"""Data-parallel training on PyTorch's own engine: ``torchrun`` starts the processes,
DistributedDataParallel averages the gradients, gloo (CPU) or NCCL (CUDA) carries them.

Every rank computes the same per-epoch permutation and trains on its slice of each global
batch, so N processes run the optimisation of one process with the same ``batch_size``. Two
head layers would otherwise see only a rank's slice, and are swapped for global-batch versions:
BatchNorm normalises the gathered batch (``nn.SyncBatchNorm`` refuses CPU tensors), and
dropout draws the whole batch's mask from the identically seeded generator and keeps its rows.
N processes then match one up to floating-point summation order (docs/scaling.md).
"""

from __future__ import annotations

import datetime
import inspect
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kneeosteo.errors import ConfigError, DataError, KneeosteoError

__all__ = [
    "Dist",
    "context",
    "data_parallel",
    "is_main_process",
    "launch",
    "launch_if_asked",
    "relaunch_args",
    "under_torchrun",
    "warm_cache",
]

TIMEOUT = datetime.timedelta(hours=2)  # ranks wait this long for each other (feature extraction)


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Dist:
    """This process's place in the job; ``world == 1`` is plain single-process training."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    batch: tuple[list[int], int] | None = None  # (rows per rank, first row of ours) of the global batch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def piece(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (shares differ by at most one)."""
        sizes = [n // self.world + (r < n % self.world) for r in range(self.world)]
        start = sum(sizes[: self.rank])
        self.batch = (sizes, start)
        return slice(start, start + sizes[self.rank])


_CTX: Dist | None = None


def context(device: str = "cpu") -> Dist:
    """The job's Dist, joining the process group on first use when torchrun started us."""
    global _CTX
    if _CTX is not None:
        return _CTX
    if not under_torchrun():
        _CTX = Dist()
        return _CTX
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)  # "cuda" now means this rank's GPU
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    _CTX = Dist(dist.get_rank(), dist.get_world_size(), local)
    return _CTX


def warm_cache(ctx: Dist, sets, prepare_parts) -> None:
    """Each rank fills the shared tensor cache with items ``rank::world`` of every partition;
    afterwards every rank loads all of them from the cache (entries are written atomically)."""
    if ctx.world == 1:
        return
    shard = replace(sets, **{p: getattr(sets, p)[ctx.rank :: ctx.world] for p in ("train", "val", "test")})
    for part in ("train", "val", "test"):
        try:
            prepare_parts(shard, (part,))
        except DataError:  # this rank's shard is empty or unreadable; the full pass after the barrier
            pass  # reports the files (or the empty partition) once, on every rank
    ctx.barrier()


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-shaped row blocks; backward sums every rank's gradient for our block."""

    @staticmethod
    def forward(fctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        blocks = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(blocks, x.contiguous())
        fctx.rank, fctx.rows = rank, x.shape[0]
        return torch.cat(blocks)

    @staticmethod
    def backward(fctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[fctx.rank * fctx.rows : (fctx.rank + 1) * fctx.rows], None, None


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the whole global batch: gather every rank's rows, normalise them exactly as
    one process would, keep ours. Identical statistics and running averages on all ranks; plain
    BatchNorm1d in eval mode or outside a sharded batch."""

    def __init__(self, bn: nn.BatchNorm1d, ctx: Dist):
        super().__init__(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device=bn.weight.device if bn.affine else None,
        )
        self.load_state_dict(bn.state_dict())
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.ctx.batch is None:
            return super().forward(x)
        sizes, start = self.ctx.batch
        m = max(sizes)  # all_gather needs equal shapes: pad, gather, drop the padding
        rows = _GatherRows.apply(F.pad(x, (0, 0, 0, m - x.shape[0])), self.ctx.rank, self.ctx.world)
        full = torch.cat([rows[r * m : r * m + n] for r, n in enumerate(sizes)])
        return super().forward(full)[start : start + x.shape[0]]


class GlobalDropout(nn.Dropout):
    """Dropout whose mask is the one a single process would draw for the whole global batch:
    every rank's generator is seeded alike, draws the full mask and keeps its own rows."""

    def __init__(self, drop: nn.Dropout, ctx: Dist):
        super().__init__(drop.p, drop.inplace)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.ctx.batch is None:
            return super().forward(x)
        sizes, start = self.ctx.batch
        # the same calls as ATen's CPU dropout: empty_like -> bernoulli_(1-p) -> div_(1-p) -> mul
        noise = x.new_empty((sum(sizes), *x.shape[1:])).bernoulli_(1 - self.p).div_(1 - self.p)
        return x * noise[start : start + x.shape[0]]


def _globalise(module: nn.Module, ctx: Dist) -> None:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            setattr(module, name, GlobalBatchNorm(child, ctx))
        elif type(child) is nn.Dropout:
            setattr(module, name, GlobalDropout(child, ctx))
        else:
            _globalise(child, ctx)


def data_parallel(model: nn.Module, ctx: Dist, device: str) -> nn.Module:
    """``model`` wrapped in DDP, its head made global-batch; call before building the optimiser
    (the swap makes new parameter tensors). The frozen backbone has no gradients to average."""
    _globalise(model.head, ctx)
    ddp = nn.parallel.DistributedDataParallel
    kw = {"device_ids": [ctx.local_rank]} if device == "cuda" else {}
    # buffers: the head's running statistics are computed identically on every rank, and the
    # frozen backbone's never change, so re-broadcasting them each step is wasted traffic
    sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    )
    return ddp(model, **{sync: False}, **kw)


def relaunch_args(cli) -> list[str]:
    """The running command's arguments, rebuilt from the CLI's parsed values (``cli``: its typer
    Context), since ``sys.argv`` is the test runner's when the CLI is called in-process."""
    out = [cli.info_name]
    for p in cli.command.params:
        v = cli.params.get(p.name)
        if v is None or (v is False and not getattr(p, "secondary_opts", None)):
            continue
        if p.param_type_name == "argument":
            out += [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        elif getattr(p, "is_flag", False):
            out.append(p.opts[0] if v else p.secondary_opts[0])
        elif isinstance(v, (list, tuple)):  # a repeatable option (--merge A=B --merge C=D); none given: ()
            for x in v:
                out += [p.opts[0], str(x)]
        else:
            out += [p.opts[0], str(v)]
    return out


def launch(args: list[str], devices: int, nodes: int = 1, master: str | None = None) -> int:
    """Run ``kneeosteo ARGS`` under torchrun: ``devices`` processes here, on ``nodes`` machines
    (each runs the same command; ``master`` HOST:PORT is one of them). Returns the exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(devices)]
    if nodes > 1:
        if not master:
            raise ConfigError("--nodes > 1 needs --master HOST:PORT (the same on every node)")
        cmd += ["--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", master, "--rdzv_id", "kneeosteo"]
    else:
        cmd += ["--standalone"]
    return subprocess.call(cmd + ["-m", "kneeosteo", *args])


def launch_if_asked(cli, devices: int, nodes: int = 1, master: str | None = None) -> bool:
    """Re-run the current CLI command under torchrun when more than one process is asked for
    and we are not one of torchrun's workers already. True: it ran (and succeeded) there."""
    if devices * nodes == 1 or under_torchrun():
        return False
    code = launch(relaunch_args(cli), devices, nodes, master)
    if code != 0:
        raise KneeosteoError(f"distributed run failed (torchrun exit status {code}); the first error is above")
    return True
