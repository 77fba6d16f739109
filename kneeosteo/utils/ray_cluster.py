"""Connecting to Ray (the optional ``kneeosteo[ray]`` extra) for ``reproduce --ray`` and ``predict --ray``.

Ray is imported only here and only when asked for, so kneeosteo works without it; without it,
``--ray`` is one line naming the install command. ``--ray`` alone (or ``--ray local``) starts a
local Ray instance with this machine's cores and stops it afterwards; ``--ray auto`` joins the
cluster this machine belongs to (``ray start``); ``--ray HOST:PORT`` joins the cluster whose head
listens there, ``--ray ray://HOST:10001`` through Ray Client. Tasks see the driver's
``KNEEOSTEO_*`` environment (cache, offline mode), forwarded explicitly because a cluster's
workers were started by someone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator

from kneeosteo.errors import ConfigError, KneeosteoError

__all__ = ["INSTALL_HINT", "LOCAL", "check_address", "is_address", "connect", "forwarded_env", "import_ray", "task_env"]

INSTALL_HINT = "pip install 'kneeosteo[ray]'"
LOCAL = "local"
_ADDRESS = re.compile(r"^(auto|local|ray://[A-Za-z0-9.\-\[\]:]+:\d+|[A-Za-z0-9.\-\[\]:]+:\d+)$")
_FORWARDED = (
    "KNEEOSTEO_CACHE",
    "KNEEOSTEO_OFFLINE",
    "KNEEOSTEO_DATA",
    "HF_HUB_CACHE",
    "TORCH_HOME",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
)
log = logging.getLogger(__name__)


def import_ray():
    """The ray module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise KneeosteoError(f"--ray needs Ray, which is not installed ({exc}); {INSTALL_HINT}") from exc
    return ray


def is_address(text: str) -> bool:
    return bool(_ADDRESS.match(text))


def check_address(address: str | None) -> str:
    """``None``/``local``: a local instance; ``auto``; ``HOST:PORT``; ``ray://HOST:PORT``. Anything
    else (a folder name swallowed by ``--ray``, say) is refused with the way out."""
    address = LOCAL if address in (None, "") else address
    if not _ADDRESS.match(address):
        raise ConfigError(
            f"--ray {address!r}: not a Ray address (local, auto, HOST:PORT or ray://HOST:PORT); "
            "write --ray=local for a local instance"
        )
    return address


@contextlib.contextmanager
def connect(address: str | None = None) -> Iterator[object]:
    """Yield the ray module, connected: an instance already initialised in this process is used as
    it is (and left running); otherwise start a local one or join ``address``, and disconnect after."""
    ray = import_ray()
    address = check_address(address)
    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    try:
        if address == LOCAL:
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise KneeosteoError(
            f"--ray {address}: cannot start or reach Ray ({' '.join(str(exc).split())[:300]})"
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def forwarded_env() -> dict[str, str]:
    """The driver's settings a task must share (cache folder, offline mode, CPU capability caps)."""
    return {k: os.environ[k] for k in _FORWARDED if k in os.environ}


@contextlib.contextmanager
def task_env(env: dict[str, str]) -> Iterator[None]:
    """Inside a task: the driver's variables set for the task's duration, the worker's restored after
    (a Ray worker process runs many tasks, possibly of other drivers)."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
