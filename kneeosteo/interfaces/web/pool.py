"""A bounded worker pool: a fixed number of inference threads and a fixed number of waiting
jobs. A request that finds it full is refused at once (503) instead of queueing without bound,
so a burst costs the clients a retry, not the server its memory or its latency."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["BoundedPool", "PoolFull"]

T = TypeVar("T")


class PoolFull(RuntimeError):
    """Every worker is busy and the waiting line is full."""


class BoundedPool:
    """``workers`` jobs run at once, up to ``queue`` more wait; the count covers a job until it
    has finished in its thread, even when the request that asked for it has gone away."""

    def __init__(self, workers: int, queue: int):
        if workers < 1 or queue < 0:
            raise ValueError(f"need workers >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers, self.queue = workers, queue
        self.capacity = workers + queue
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kneeosteo-web")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    @property
    def full(self) -> bool:
        return self._pending >= self.capacity

    def submit(self, fn: Callable[..., T], *args) -> Future:
        """Start ``fn(*args)`` in a worker, or raise PoolFull; thread-safe."""
        with self._lock:
            if self._pending >= self.capacity:
                raise PoolFull(f"{self._pending} jobs running or waiting (limit {self.capacity})")
            self._pending += 1
        try:
            fut = self._executor.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        fut.add_done_callback(self._release)
        return fut

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def _release(self, _fut) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
