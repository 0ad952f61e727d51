"""One thread for the app's model work, with requests coalesced to the latest slider position.

The HTTP handlers run in many threads; the models run in this one, a job at a time, in arrival order. A job
submitted with a `key` (a view's slider moves) that finds a job of the same key still waiting takes that job's
place instead of queuing behind it: the waiting callers are answered with the newer job's result. So a
slider dragged faster than pictures compute never builds a backlog: at most one move per view waits, and it
is always the latest position. At most `max_pending` jobs wait; more is `Busy` (the page retries).
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from isda_viz.errors import IsdaVizError


class Busy(Exception):
    """The queue is full: `max_pending` jobs are waiting."""


class Stopped(Exception):
    """The worker was stopped before the job ran."""


class _Job:
    def __init__(self, run: Callable[[], Any], key):
        self.run, self.key = run, key
        self.futures: list[Future] = []


class Worker:
    """Runs submitted callables one at a time in its own thread (see the module's docstring).

    `computed` counts jobs run, `coalesced` the submissions that replaced a waiting job instead of queuing."""

    def __init__(self, max_pending: int = 64, name: str = "isda-viz explore worker",
                 on_start: Callable[[], None] | None = None):
        """`on_start`: run first in the worker's own thread (per-thread settings, such as torch's threads)."""
        self.max_pending = max_pending
        self._on_start = on_start
        self.computed = self.coalesced = 0
        self._queue: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[], Any], key=None) -> Future:
        """A future of `run()`'s result (or its exception). With a `key`, a waiting job of the same key is
        replaced by this one and its callers get this one's result."""
        future: Future = Future()
        with self._condition:
            if self._stopped:
                raise Stopped("the app is stopping")
            if key is not None:
                for job in self._queue:
                    if job.key == key:
                        job.run = run
                        job.futures.append(future)
                        self.coalesced += 1
                        return future
            if len(self._queue) >= self.max_pending:
                raise Busy(f"{self.max_pending} requests are already waiting")
            job = _Job(run, key)
            job.futures.append(future)
            self._queue.append(job)
            self._condition.notify()
        return future

    @property
    def pending(self) -> int:
        """Jobs waiting (not the one running)."""
        with self._condition:
            return len(self._queue)

    def stop(self, timeout: float | None = 30) -> None:
        """Fail every waiting job with `Stopped`, let the running one finish, and end the thread."""
        with self._condition:
            self._stopped = True
            waiting = list(self._queue)
            self._queue.clear()
            self._condition.notify_all()
        for job in waiting:
            for future in job.futures:
                future.set_exception(Stopped("the app is stopping"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            with self._condition:
                while not self._queue and not self._stopped:
                    self._condition.wait()
                if self._stopped:
                    return
                job = self._queue.popleft()
                run = job.run   # later submissions of this key queue anew: this job has left the queue
            try:
                result = run()
            except Exception as e:  # answered to the callers; the worker keeps serving
                if not _expected(e):
                    traceback.print_exc(file=sys.stderr)
                for future in job.futures:
                    future.set_exception(e)
            else:
                for future in job.futures:
                    future.set_result(result)
            self.computed += 1


def _expected(error: Exception) -> bool:
    """Errors that are the caller's (bad input, a dropped view): answered, not printed."""
    return isinstance(error, (IsdaVizError, KeyError))
