"""Run a core function off the GUI thread: one pattern for progress, Cancel and the outcome.

Every long step of the widgets (detection, a batch, export, import, training, evaluation) goes
through :func:`start`:

- the function runs in a napari worker thread as ``fn(report, cancel)``: ``report(done,
  total, text="", data=None)`` is the one progress channel, ``cancel`` a
  :class:`threading.Event` the core polls (its ``cancel=`` / ``should_stop=`` argument);
- each report reaches the GUI thread as a :class:`Progress` (queued through one Qt signal),
  advances a napari progress bar and is handed to the widget's ``on_progress``;
- the function's end reaches the widget's ``on_done`` as one :class:`Outcome`: its value, the
  exception it raised, or ``cancelled`` when it raised the core's
  :class:`~napari_yolocell.engine.detect.Cancelled`. Nothing is raised into superqt (it would
  reduce a ``RuntimeError`` to a bare warning, and napari would report other errors twice);
- a warning the package itself raises in the worker (e.g. "the INT8 version ... differs from
  FP32: running FP32", told once by the core) is shown as a napari notification, in one line
  (napari's workers only emit their ``warned`` signal); other libraries' warnings are logged.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from napari_yolocell.engine.detect import Cancelled

__all__ = ["Outcome", "Progress", "Task", "outcome_of", "start"]

log = logging.getLogger(__name__)

Report = Callable[..., None]


class Progress(NamedTuple):
    """One progress report: ``done`` of ``total`` steps, a status line, optional data."""

    done: int
    total: int
    text: str = ""
    data: Any = None


@dataclass
class Outcome:
    """How a task ended: its return ``value``, the ``error`` it raised, or ``cancelled``."""

    value: Any = None
    error: BaseException | None = None
    cancelled: bool = False


def outcome_of(
    fn: Callable[[Report, threading.Event], Any], report: Report, cancel: threading.Event
) -> Outcome:
    """Call ``fn(report, cancel)`` and return how it ended (what the worker thread runs)."""
    try:
        return Outcome(value=fn(report, cancel))
    except Cancelled:
        return Outcome(cancelled=True)
    except Exception as exc:  # noqa: BLE001 - every failure is shown to the user
        log.debug("task failed", exc_info=True)
        return Outcome(error=exc)


#: The package's own files: warnings attributed to them are meant for the user.
_PACKAGE = Path(__file__).resolve().parents[1]
_NOT_FOR_USERS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def show_worker_warning(args: tuple) -> None:
    """Show a warning raised in a worker (superqt's ``warned`` arguments, ``showwarning``'s:
    message, category, filename, ...) as a napari notification if the package raised it."""
    message, category, filename = args[0], args[1], str(args[2])
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        ours = False
    if not ours or issubclass(category, _NOT_FOR_USERS):
        log.debug("worker warning: %s", warnings.formatwarning(*args[:4]))
        return
    from napari_yolocell.shell import _qt

    _qt.show_warning(str(message))


def _relay(callback: Callable[[Any], None]):
    """A QObject whose signal carries reports from the worker thread to ``callback``.

    Created in the GUI thread, with a queued connection to its own slot: ``callback`` always
    runs in the GUI thread, in the order of the reports and before the worker's ``returned``.
    """
    from qtpy.QtCore import QObject, Qt, Signal, Slot

    class _Relay(QObject):
        message = Signal(object)

        def __init__(self) -> None:
            super().__init__()
            self.message.connect(self._deliver, Qt.ConnectionType.QueuedConnection)

        @Slot(object)
        def _deliver(self, item: Progress) -> None:
            callback(item)

    return _Relay()


class Task:
    """A started function: :meth:`cancel` it, ask whether it is :attr:`running`."""

    def __init__(
        self,
        fn: Callable[[Report, threading.Event], Any],
        on_done: Callable[[Outcome], None],
        on_progress: Callable[[Progress], None] | None,
        on_finished: Callable[[], None] | None,
        desc: str,
        total: int,
    ) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self.cancel_event = threading.Event()
        self._on_progress = on_progress
        self._on_finished = on_finished
        self._latest: Progress | None = None
        self._updating = False
        self._relay = _relay(self._progress)
        self._warnings = _relay(show_worker_warning)
        self._pbar = progress(total=total, desc=desc)
        self.worker = create_worker(
            outcome_of, fn, self._report, self.cancel_event, _start_thread=False
        )
        self.worker.warned.connect(self._warnings.message.emit)
        self.worker.returned.connect(on_done)
        self.worker.finished.connect(self._finished)
        self.running = True

    def _report(self, done: int, total: int, text: str = "", data: Any = None) -> None:
        # worker thread: only hand the report over
        self._relay.message.emit(Progress(int(done), int(total), text, data))

    def _progress(self, item: Progress) -> None:
        # The widget first: napari's progress bar processes events when it moves, so the next
        # reports (and the outcome) can arrive while the bar is being updated.
        if self._on_progress is not None:
            self._on_progress(item)
        self._latest = item
        if self._updating:  # an outer call is moving the bar: it shows this report too
            return
        self._updating = True
        try:
            while self._latest is not None and self._pbar is not None:
                latest, self._latest = self._latest, None
                if self._pbar.total != latest.total:
                    self._pbar.total = latest.total
                self._pbar.update(latest.done - self._pbar.n)
        finally:
            self._updating = False

    def _finished(self) -> None:
        self.running = False
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._on_finished is not None:
            self._on_finished()

    def cancel(self) -> None:
        """Ask the function to stop (the core polls the event between steps)."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        """Whether Cancel was asked for."""
        return self.cancel_event.is_set()


def start(
    fn: Callable[[Report, threading.Event], Any],
    on_done: Callable[[Outcome], None],
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    desc: str = "",
    total: int = 0,
) -> Task:
    """Run ``fn(report, cancel)`` in a napari worker thread.

    Parameters
    ----------
    fn : callable
        Called in the worker thread with ``report(done, total, text="", data=None)`` and the
        task's cancel :class:`threading.Event`; returns the task's value.
    on_done : callable
        Called in the GUI thread with the :class:`Outcome`.
    on_progress : callable, optional
        Called in the GUI thread with each :class:`Progress`.
    on_finished : callable, optional
        Called in the GUI thread after ``on_done`` (also when it raised): re-enable buttons.
    desc, total : str, int
        The napari progress bar's label and initial total (0 = unknown).

    Returns
    -------
    Task
    """
    task = Task(fn, on_done, on_progress, on_finished, desc, total)
    task.worker.start()
    return task


class OneTaskAtATime:
    """Mixin of a widget that runs one task at a time (Detect, Batch): :attr:`task`,
    :attr:`running` and :meth:`cancel`, which shows ``"cancelling..."`` in :meth:`status_label`."""

    task: Task | None = None

    def status_label(self):
        """The label that tells the user what the task is doing."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the widget's task is running."""
        return self.task is not None and self.task.running

    def cancel(self, _value=None) -> None:
        """Ask the running task to stop at its next check (after the current tiles)."""
        if self.running:
            self.task.cancel()
            self.status_label().value = "cancelling..."
