"""The CLI in fresh processes that start without re-importing torch: each is forked from a
multiprocessing fork server that imported the package once (`python -m kneeosteo` pays several
seconds of imports per start). For tests about what happens to a process (kill -9, resume), not
about how it starts: the child is a separate process with its own pid, signals and exit status.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

PRELOAD = ["forkrun", "kneeosteo.interfaces.cli", "kneeosteo.experiments.pipeline"]


def _cli(argv: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    """The child: environment, cwd and stdout/stderr (files) as a subprocess would get them,
    one intra-op thread, then the CLI's main(); its SystemExit code is the exit status."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    from kneeosteo.interfaces.cli import main

    main(argv)


def context() -> multiprocessing.context.BaseContext:
    """The fork-server context, its server importing PRELOAD when it first starts."""
    ctx = multiprocessing.get_context("forkserver")
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start(argv, env: dict, cwd, stdout, stderr) -> multiprocessing.Process:
    """Start ``kneeosteo ARGV`` (as `python -m kneeosteo ARGV` would run it) in a forked process."""
    proc = context().Process(
        target=_cli, args=([str(a) for a in argv], dict(env), str(cwd), str(stdout), str(stderr)), daemon=True
    )
    proc.start()
    return proc
