"""One owner thread per device: every torch operation for a device runs on it.

The seeds' discipline, kept in Python: a CUDA context is bound to the thread that uses it,
so loads, forwards and frees for one device all go through the same thread, and the event
loop never blocks on torch. Work is submitted as plain callables and comes back as futures.

`on_start` runs first on the thread, before any job: for a GPU it makes that GPU the thread's
current device (`torch.cuda.set_device`), so whatever uses the current device (new streams,
`synchronize`, extension kernels, `empty_cache`) acts on this GPU, not on GPU 0. If it fails,
every job fails with its error: nothing may run on the wrong device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class DeviceWorker:
    """A named thread that runs submitted callables in order, one at a time."""

    def __init__(self, name: str, on_start: Callable[[], None] | None = None) -> None:
        self.name = name
        self._on_start = on_start
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError(f"device worker {self.name} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run on the owner thread; the caller's event loop stays free meanwhile."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    @property
    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self, timeout: float | None = None) -> None:
        """Finish queued work, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        if not self.is_current:
            self._thread.join(timeout)

    def _run(self) -> None:
        start_failure: BaseException | None = None
        if self._on_start is not None:
            try:
                self._on_start()
            except BaseException as exc:  # every job is answered with it below
                start_failure = exc
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if start_failure is not None:
                self._refuse(job[0], start_failure)
            else:
                self._run_one(*job)
            # Nothing of a finished job may stay referenced from this loop while it waits for the
            # next: a load's result (a whole model) would outlive its unload.
            del job

    def _refuse(self, future: concurrent.futures.Future[Any], cause: BaseException) -> None:
        if future.set_running_or_notify_cancel():
            error = RuntimeError(f"device worker {self.name} could not start: {cause!r}")
            error.__cause__ = cause
            future.set_exception(error)

    @staticmethod
    def _run_one(
        future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting caller, never lost
            future.set_exception(exc)
        else:
            future.set_result(result)
