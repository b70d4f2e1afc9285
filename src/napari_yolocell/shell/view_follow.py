"""Call back once the camera has stopped moving (pan / zoom), not on every step of a move.

Large results draw boxes only for the visible region; redrawing a few thousand boxes blocks the
viewer for a moment, so it must not happen in the middle of panning: the call comes
:data:`DELAY_MS` after the last camera event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DELAY_MS", "ViewFollower"]

#: Quiet time after the last camera event before the callback runs.
DELAY_MS = 400


class ViewFollower:
    """Runs ``callback()`` :data:`DELAY_MS` after the camera of ``viewer`` stopped moving.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    callback : callable
        Called without arguments in the GUI thread.
    delay_ms : int
        Quiet time before the call.
    """

    def __init__(self, viewer: Any, callback: Callable[[], None], delay_ms: int = DELAY_MS):
        from qtpy.QtCore import QTimer

        self.callback = callback
        self.timer = QTimer()
        self.timer.setSingleShot(True)
        self.timer.setInterval(int(delay_ms))
        self.timer.timeout.connect(self._fire)
        for event in (viewer.camera.events.center, viewer.camera.events.zoom):
            event.connect(self._moved)
        self._viewer = viewer

    def _moved(self, _event: Any = None) -> None:
        self.timer.start()  # restarts: only the last move of a gesture counts

    def _fire(self) -> None:
        try:
            self.callback()
        except RuntimeError:  # the widget was closed: stop following
            self.disconnect()

    def disconnect(self) -> None:
        """Stop following the camera."""
        self.timer.stop()
        for event in (self._viewer.camera.events.center, self._viewer.camera.events.zoom):
            event.disconnect(self._moved)
