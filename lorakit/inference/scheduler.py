"""The one worker thread that owns the model while the server runs: it gathers the requests
waiting at that moment (a short window, up to ``max_batch``) into one batch whose rows may use
different adapters, and runs admin tasks (adapter loads and deletes) between batches, so they
never race with generation."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .engine import Engine
from .generation import Request

__all__ = ["Job", "Scheduler"]


@dataclass
class Job:
    request: Request | None  # None: an admin task (``task``)
    done: Callable[[Any, BaseException | None], None]
    task: Callable[[], Any] | None = None


class Scheduler:
    """Owns the engine; runs generation batches and admin tasks one at a time on its thread."""

    def __init__(self, engine: Engine, max_batch: int, window_s: float) -> None:
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.q: "queue.Queue[Job]" = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.q.put(job)

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first.request is None:
                self._run_task(first)
                continue
            jobs = [first]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch:  # gather what arrives within the window
                try:
                    job = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job.request is None:  # an admin task waits for this batch, then runs
                    self._run_batch(jobs)
                    jobs = []
                    self._run_task(job)
                    break
                jobs.append(job)
            if jobs:
                self._run_batch(jobs)

    def _run_task(self, job: Job) -> None:
        try:
            job.done(job.task(), None)
        except BaseException as err:  # reported to the caller; the worker lives on
            job.done(None, err)

    def _run_batch(self, jobs: list[Job]) -> None:
        self.batches += 1
        try:
            outputs = self.engine.run([j.request for j in jobs])
        except BaseException as err:
            for j in jobs:
                j.done(None, err)
            return
        for j, out in zip(jobs, outputs):
            j.done(out, None)
