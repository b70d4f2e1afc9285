"""A progress bar with "done / total, time left" inside a widget (napari's own bar sits in the
activity panel, collapsed by default, where a biologist does not see it)."""

from __future__ import annotations

import time

from magicgui.widgets import Container, Label, ProgressBar

from napari_yolocell.shell._worker import Progress

__all__ = ["ProgressRow", "duration", "progress_text"]


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 10 min"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_text(done: int, total: int, elapsed: float, unit: str = "tiles") -> str:
    """``"tiles 12 / 40, about 23 s left"`` (no estimate before the first step is done).

    Examples
    --------
    >>> progress_text(10, 40, 5.0)
    'tiles 10 / 40, about 15 s left'
    >>> progress_text(0, 40, 1.0)
    'tiles 0 / 40'
    """
    text = f"{unit} {done:,} / {total:,}" if total else f"{unit} {done:,}"
    if 0 < done < total and elapsed > 0:
        text += f", about {duration(elapsed / done * (total - done))} left"
    return text


class ProgressRow(Container):
    """A bar and a line of text; hidden until :meth:`begin`.

    Parameters
    ----------
    unit : str
        What the steps are (``"tiles"``, ``"images"``, ``"epochs"``).
    """

    def __init__(self, unit: str = "tiles") -> None:
        self.unit = unit
        self.bar = ProgressBar(value=0, min=0, max=0, visible=False)
        self.text = Label(value="", visible=False)
        super().__init__(widgets=[self.bar, self.text], labels=False)
        self.native.layout().setContentsMargins(0, 0, 0, 0)
        self._t0 = time.monotonic()
        self._phase = False  # the last report had its own text (a step such as INT8)
        self.last: Progress | None = None

    def begin(self, text: str = "starting...") -> None:
        """Show a busy bar (total unknown yet) and ``text``."""
        self._t0 = time.monotonic()
        self._phase = False
        self.last = None
        self.bar.max, self.bar.value = 0, 0
        self.text.value = text
        self.bar.visible = self.text.visible = True

    def update(self, item: Progress) -> None:
        """Move the bar to ``item`` and say how much is left.

        A report with its own text (a step before the counted ones, e.g. making a model's
        INT8 version) shows that text; the time-left clock starts again when the counted
        steps follow it.
        """
        self.last = item
        if item.total > 0:
            self.bar.max = item.total
            self.bar.value = min(item.done, item.total)
        elif item.text:
            self.bar.max, self.bar.value = 0, 0  # busy: a step of unknown length
        if item.text:
            self._phase = True
            self.text.value = item.text
            return
        if self._phase:
            self._phase = False
            self._t0 = time.monotonic()
        self.text.value = progress_text(
            item.done, item.total, time.monotonic() - self._t0, self.unit
        )

    def end(self, text: str = "") -> None:
        """Hide the bar; keep ``text`` (how long it took, or why it stopped) if given."""
        self.bar.visible = False
        self.text.value = text
        self.text.visible = bool(text)

    def elapsed(self) -> str:
        """Time since :meth:`begin`, for the final message."""
        return duration(time.monotonic() - self._t0)
