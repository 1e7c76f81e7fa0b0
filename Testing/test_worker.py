"""The persistent torch worker: one reused thread, jobs in order, progress and errors delivered to the caller."""
import threading
import time

import pytest

from FINESegmentationLib import Segmenter
from FINESegmentationLib.errors import CancelledError, InputError
from FINESegmentationLib.inference import Progress
from FINESegmentationLib.worker import FAILED, FINISHED, PROGRESS, TorchWorker

from conftest import make_ct


@pytest.fixture
def worker():
    w = TorchWorker()
    yield w
    assert w.shutdown(timeout=30), "the worker thread ends when shut down"


def _thread_name(progress, cancel):
    return threading.current_thread().name


def test_every_job_runs_on_the_same_persistent_thread(worker):
    names = [worker.submit(_thread_name).wait() for _ in range(3)]
    thread = worker.thread
    assert names == [worker.name] * 3 and thread is not threading.current_thread()
    worker.submit(_thread_name).wait()
    assert worker.thread is thread and thread.is_alive(), "the thread is reused, not started per job"


def test_jobs_run_one_after_another_in_submission_order(worker):
    gate = threading.Event()
    order = []

    def step(tag, progress, cancel):
        if tag == 0:
            gate.wait(10)
        order.append(tag)
        return tag

    jobs = [worker.submit(step, i) for i in range(4)]
    assert not jobs[3].done
    gate.set()
    assert [j.wait(timeout=10) for j in jobs] == [0, 1, 2, 3] and order == [0, 1, 2, 3]


def test_an_exception_comes_back_as_the_jobs_result_and_the_thread_survives(worker):
    def fail(progress, cancel):
        raise InputError("The volume is empty; load a CT that holds an image.")

    job = worker.submit(fail)
    with pytest.raises(InputError, match="volume is empty"):
        job.wait(timeout=10)
    assert job.done and isinstance(job.error, InputError)
    assert worker.submit(_thread_name).wait(timeout=10) == worker.name, "the next job runs on the same thread"


def _poll_until_finished(job):
    """What a GUI timer sees: poll until the job's last event (FINISHED or FAILED) arrives."""
    events = []
    while not events or events[-1].kind == PROGRESS:
        events += job.poll()
        time.sleep(0.01)
    return events


def test_poll_delivers_progress_then_the_result_without_blocking(worker):
    release = threading.Event()

    def counting(progress, cancel):
        for i in range(3):
            progress(i)
        release.wait(10)
        return "done"

    job = worker.submit(counting)
    events = []
    while len(events) < 3:
        events += job.poll()
    assert [e.value for e in events] == [0, 1, 2] and not job.done and job.poll() == [], "polling a running job returns at once"
    release.set()
    assert [(e.kind, e.value) for e in _poll_until_finished(job)] == [(FINISHED, "done")]

    failed = _poll_until_finished(worker.submit(lambda progress, cancel: 1 / 0))
    assert [e.kind for e in failed] == [FAILED] and isinstance(failed[0].value, ZeroDivisionError), "a bug is delivered, not raised on the worker"


def test_cancel_stops_a_segmentation_within_one_crop_on_the_worker(worker, tiny_checkpoint):
    segmenter = Segmenter(str(tiny_checkpoint), device="cpu", bank="stateless", refine_all=False)
    ct = make_ct(shape=(24, 120, 120), spacing=(3.0, 3.0, 6.0))  # several crops
    started = threading.Event()

    def run(progress, cancel):
        def tick(p):
            started.set()
            progress(p)
            # Hold the worker until the caller has cancelled, so the check before the next crop must see it.
            cancel.wait(10)
        return segmenter.segment(ct, progress=tick, cancel=cancel)

    job = worker.submit(run)
    assert started.wait(30)
    job.cancel()
    with pytest.raises(CancelledError):
        job.wait(timeout=30)
    crops = [e.value for e in job.poll() if e.kind == PROGRESS]
    assert job.cancelled and len(crops) <= 1, "no crop runs after the cancel"


def test_a_job_cancelled_before_it_starts_never_runs(worker):
    gate = threading.Event()
    ran = []
    blocker = worker.submit(lambda progress, cancel: gate.wait(10))
    queued = worker.submit(lambda progress, cancel: ran.append(1))
    queued.cancel()
    gate.set()
    blocker.wait(timeout=10)
    with pytest.raises(CancelledError):
        queued.wait(timeout=10)
    assert ran == []


def test_a_callers_event_is_the_jobs_cancel_flag(worker):
    mine = threading.Event()
    job = worker.submit(lambda progress, cancel: cancel is mine, cancel=mine)
    assert job.wait(timeout=10) is True


def test_shutdown_cancels_queued_jobs_and_a_new_job_starts_a_new_thread(worker):
    started, gate = threading.Event(), threading.Event()

    def block(progress, cancel):
        started.set()
        return cancel.wait(10) and "stopped"

    running = worker.submit(block)
    queued = worker.submit(lambda progress, cancel: gate.set())
    first = worker.thread
    assert started.wait(10)
    assert worker.shutdown(timeout=10)
    assert running.wait(timeout=1) == "stopped", "the running job saw the cancel"
    with pytest.raises(CancelledError):
        queued.wait(timeout=1)
    assert not gate.is_set()
    assert worker.submit(_thread_name).wait(timeout=10) == worker.name and worker.thread is not first


def test_torch_runs_on_the_worker_and_progress_arrives_in_order(worker, tiny_checkpoint):
    segmenter = Segmenter(str(tiny_checkpoint), device="cpu", bank="accumulate", fast=True)
    threads = []

    def run(progress, cancel):
        threads.append(threading.get_ident())
        return segmenter.segment(make_ct(shape=(12, 40, 40)), progress=progress, cancel=cancel)

    seen = []
    result = worker.submit(run).wait(on_progress=seen.append, timeout=60)
    assert threads == [worker.thread.ident] and result.labels.shape == (12, 40, 40)
    assert all(isinstance(p, Progress) for p in seen) and [p.pass_index for p in seen] == sorted(p.pass_index for p in seen)
