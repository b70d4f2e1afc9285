"""The widgets' shared worker: reports, Cancel and one outcome, in order, in the GUI thread."""

from __future__ import annotations

import threading

import pytest

from napari_yolocell.engine.batch import BatchCancelled
from napari_yolocell.engine.detect import Cancelled, DetectionCancelled
from napari_yolocell.shell._worker import Outcome, outcome_of, start

TIMEOUT = 10_000


def test_one_cancel_type_for_the_core():
    assert DetectionCancelled is Cancelled and BatchCancelled is Cancelled


def test_outcome_of_value_error_and_cancel():
    reports = []

    def work(report, cancel):
        for i in range(3):
            report(i + 1, 3, f"step {i + 1}")
        return "done"

    assert outcome_of(work, lambda *a: reports.append(a), threading.Event()) == Outcome("done")
    assert reports == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]

    def fail(report, cancel):
        raise RuntimeError("boom")

    outcome = outcome_of(fail, print, threading.Event())
    assert isinstance(outcome.error, RuntimeError) and not outcome.cancelled

    def stop(report, cancel):
        if cancel.is_set():
            raise BatchCancelled("batch cancelled")
        return "not cancelled"

    event = threading.Event()
    event.set()
    assert outcome_of(stop, print, event) == Outcome(cancelled=True)


@pytest.mark.parametrize("many", [3, 500])
def test_reports_reach_the_gui_thread_in_order_before_the_outcome(qtbot, make_napari_viewer, many):
    make_napari_viewer()  # napari's progress bars process events when they move
    gui, log, finished = threading.get_ident(), [], []

    def work(report, cancel):
        for i in range(many):
            report(i + 1, many, "", i)
        return threading.get_ident()

    task = start(
        work,
        lambda outcome: log.append(("done", outcome.value)),
        on_progress=lambda p: log.append((p.data, threading.get_ident())),
        on_finished=lambda: finished.append(True),
        desc="test",
    )
    qtbot.waitUntil(lambda: not task.running, timeout=TIMEOUT)
    assert [item for item, _ in log[:-1]] == list(range(many))
    assert {thread for _, thread in log[:-1]} == {gui}  # progress handled in the GUI thread
    assert log[-1][0] == "done" and log[-1][1] != gui  # the function ran in a worker thread
    assert finished == [True]


def test_cancel_sets_the_event_the_core_polls(qtbot, make_napari_viewer):
    make_napari_viewer()
    outcomes, started = [], threading.Event()

    def work(report, cancel):
        started.set()
        while not cancel.wait(0.01):
            pass
        raise Cancelled("cancelled")

    task = start(work, outcomes.append)
    assert started.wait(5)
    assert task.running and not task.cancelled
    task.cancel()
    qtbot.waitUntil(lambda: not task.running, timeout=TIMEOUT)
    assert task.cancelled and outcomes == [Outcome(cancelled=True)]
