"""One persistent thread for all torch work, and the handle a GUI polls to follow a job.

Why one thread that lives as long as the Slicer session: cuDNN and the CUDA
caching allocator keep per-thread state (plans, streams), so running every
forward pass on the same thread reuses it, and the GUI thread never blocks on
the network. The GUI submits a job and polls it (in Slicer, from a ``qt.QTimer``);
nothing here needs Qt, so the same code runs in tests and in a plain console.

A job function is called as ``fn(*args, progress=..., cancel=..., **kwargs)``, the
engine's own convention (``Segmenter.segment`` takes the same two keywords):
``progress`` queues whatever it is given for the GUI, ``cancel`` is a
``threading.Event`` the job checks. Whatever the function returns or raises is
delivered to the thread that polls or waits, never raised on the worker.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .errors import CancelledError

logger = logging.getLogger(__name__)

PROGRESS = "progress"
FINISHED = "finished"
FAILED = "failed"


@dataclass(frozen=True)
class JobEvent:
    """What a job reports: ``kind`` is PROGRESS (``value`` as the job gave it), FINISHED (the result) or FAILED (the exception)."""

    kind: str
    value: Any


class Job:
    """A unit of work for the :class:`TorchWorker`, and the caller's handle on it."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, cancel: threading.Event | None = None) -> None:
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self.cancel_event = cancel if cancel is not None else threading.Event()
        self._events: queue.SimpleQueue[JobEvent] = queue.SimpleQueue()
        self._finished = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Ask the job to stop; the engine checks between crops, so it stops within one crop."""
        self.cancel_event.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, CancelledError)

    def report(self, value: Any) -> None:
        """Called on the worker thread by the job function; queued for the thread that polls."""
        self._events.put(JobEvent(PROGRESS, value))

    def poll(self) -> list[JobEvent]:
        """Everything reported since the last poll, without blocking; the last event of a job is FINISHED or FAILED."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, on_progress: Callable[[Any], None] | None = None, timeout: float | None = None) -> Any:
        """Block until the job ends, calling ``on_progress`` on *this* thread; return its result or raise its error.

        Used by scripts and batch runs: callbacks then run on the caller's thread, as
        they would in a single-threaded call, while the torch work stays on the worker.
        ``timeout``: the longest wait for the next event, in seconds (None: no limit).
        """
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"The job did not finish within {timeout} s.") from None
            if event.kind == PROGRESS:
                if on_progress is not None:
                    on_progress(event.value)
            elif event.kind == FINISHED:
                return event.value
            else:
                raise event.value

    def _run(self) -> None:
        try:
            if self.cancel_event.is_set():
                raise CancelledError("Cancelled before it started; nothing was changed.")
            self.result = self._fn(*self._args, progress=self.report, cancel=self.cancel_event, **self._kwargs)
        except BaseException as error:  # noqa: BLE001 - every failure belongs to the caller, not to the worker thread
            if not isinstance(error, CancelledError):
                logger.debug("Job %s failed.", getattr(self._fn, "__name__", self._fn), exc_info=True)
            self.error = error
            self._finished.set()
            self._events.put(JobEvent(FAILED, error))
        else:
            self._finished.set()
            self._events.put(JobEvent(FINISHED, self.result))


class TorchWorker:
    """A single persistent thread that runs jobs one after another, in submission order.

    The thread starts with the first job and is reused for every later one; it is a
    daemon so a job that is still running cannot keep the application from quitting.
    """

    def __init__(self, name: str = "FINESegmentation torch worker") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._current: Job | None = None

    def submit(self, fn: Callable[..., Any], *args: Any, cancel: threading.Event | None = None, **kwargs: Any) -> Job:
        """Queue ``fn(*args, progress=..., cancel=..., **kwargs)``; returns its :class:`Job` at once.

        ``cancel``: an event of the caller's to use as the job's cancel flag (a new one otherwise).
        """
        job = Job(fn, args, kwargs, cancel)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, args=(self._jobs,), name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put(job)
        return job

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def cancel_all(self) -> None:
        """Cancel the running job and every queued one (each then ends as cancelled)."""
        current = self._current
        if current is not None:
            current.cancel()
        pending = []
        while True:
            try:
                pending.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None:
                job.cancel()
            self._jobs.put(job)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Cancel everything, let the thread finish and end; True when it has ended within ``timeout``."""
        self.cancel_all()
        with self._lock:
            thread = self._thread
            self._thread = None
            if thread is None:
                return True
            # The ending thread keeps its own queue, so a thread stuck in a job cannot take later jobs.
            self._jobs.put(None)
            self._jobs = queue.SimpleQueue()
        thread.join(timeout)
        return not thread.is_alive()

    def _loop(self, jobs: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            self._current = job
            try:
                job._run()
            finally:
                self._current = None
