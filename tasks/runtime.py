"""One asyncio loop per worker process, shared by every job that process plays.

Celery's threads pool gives each job a thread; that thread submits the job's coroutine to this
loop and blocks on it. One loop means one LiveKit FFI runtime and one set of sockets for all
rooms, instead of one process (and ~100 MB) per stream. Re-created after fork, so a prefork
pool (plain `celery worker -P prefork`) works as well, with one loop per child.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="avatarq-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the shared loop; on timeout the coroutine is cancelled, then re-raised."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise


_lock = threading.Lock()
_runtime: tuple[int, LoopThread] | None = None


def get_loop_thread() -> LoopThread:
    """This process's loop thread, started on first use (and again in a forked child)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime[0] != os.getpid():
            _runtime = (os.getpid(), LoopThread())
        return _runtime[1]
