"""Qt and napari helpers shared by the widgets: tabs, labels, messages, dialogs, layer lists.

Widgets call these through the module (``_qt.show_error(...)``), so a test replaces one
function here (a dialog, the notifications) for every widget at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_yolocell.models.safety import UntrustedModelError, trust
from napari_yolocell.shell.layers import SOURCE_KEY, view_to_table

if TYPE_CHECKING:
    from magicgui.widgets import Container, Label
    from qtpy.QtWidgets import QTabWidget, QWidget

__all__ = [
    "add_tabs",
    "cell_tooltips",
    "fit_table",
    "ask_axis_meaning",
    "colour_legend",
    "confirm_untrusted",
    "error_text",
    "figure_canvas",
    "heading",
    "is_result",
    "layer_kind",
    "layers_of",
    "save_file_dialog",
    "show_error",
    "show_info",
    "show_warning",
    "trusted_after_asking",
    "visible_region",
    "wrap_labels",
]


# --------------------------------------------------------------------------- messages


def error_text(exc: BaseException) -> str:
    """One line for the user: the message of expected errors, ``Type: message`` otherwise.

    ``ValueError`` and ``OSError`` (file not found, exists...) carry messages written for the
    user; anything else is unexpected and its type helps a bug report.
    """
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


def _first_line(message: str) -> str:
    lines = [line for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else str(message)


def show_error(message: str) -> None:
    """Notify napari of an error, in one line."""
    from napari.utils.notifications import show_error as notify

    notify(_first_line(message))


def show_info(message: str) -> None:
    """Notify napari of an information, in one line."""
    from napari.utils.notifications import show_info as notify

    notify(_first_line(message))


def show_warning(message: str) -> None:
    """Notify napari of a warning, in one line."""
    from napari.utils.notifications import show_warning as notify

    notify(_first_line(message))


# --------------------------------------------------------------------------- dialogs


def save_file_dialog(parent: QWidget | None, title: str, default: str, filter: str) -> str:
    """Ask for a file to write; ``""`` when the user cancels."""
    from qtpy.QtWidgets import QFileDialog

    path, _ = QFileDialog.getSaveFileName(parent, title, default, filter)
    return path


UNTRUSTED_TITLE = "Untrusted model file"


def untrusted_text(path: Path, size: int, sha256: str, references: str = "") -> str:
    """The trust dialog's text: what the file references, where it is, its size and hash."""
    what = f"Its pickle references {references!r}, which " if references else "It "
    return (
        f"{what}could run code on your computer when the file is loaded. Load it only if "
        "you trust where it comes from.\n\n"
        f"File: {path}\nSize: {size:,} bytes\nSHA-256: {sha256}\n\nTrust it and run?"
    )


def confirm_untrusted(
    path: Path,
    size: int,
    sha256: str,
    parent: QWidget | None = None,
    references: str = "",
) -> bool:
    """Ask whether to trust a weights file that can run code when loaded; True for yes.

    ``references``: the Python global its pickle names that is off the allow-list (what the
    command line's refusal names too), e.g. ``io.open``.
    """
    from qtpy.QtWidgets import QMessageBox

    answer = QMessageBox.question(
        parent,
        UNTRUSTED_TITLE,
        untrusted_text(path, size, sha256, references),
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No,
    )
    return answer == QMessageBox.StandardButton.Yes


def ask_axis_meaning(name: str, n: int, parent: QWidget | None = None) -> str | int | None:
    """Ask what the unlabelled first axis (2-4 long) of layer ``name`` holds.

    Returns
    -------
    str, int or None
        ``"planes"``, the nuclear stain's channel number, or None when the user cancels.
    """
    from qtpy.QtWidgets import QMessageBox

    box = QMessageBox(parent)
    box.setWindowTitle("Channels or planes?")
    box.setText(
        f"The first axis of {name!r} has {n} entries and the file does not say what they "
        "are. Channels (a nuclear stain and markers): which one holds the nuclei? Or planes "
        "(Z, T...) to count one by one?"
    )
    answers = {box.addButton("Planes", QMessageBox.ButtonRole.AcceptRole): "planes"}
    for c in range(n):
        answers[box.addButton(f"Channel {c}", QMessageBox.ButtonRole.AcceptRole)] = c
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.exec()
    return answers.get(box.clickedButton())


def trusted_after_asking(exc: BaseException | None, parent: QWidget | None = None) -> bool:
    """For an :class:`~napari_yolocell.models.safety.UntrustedModelError`, ask the user.

    Returns True when the user trusted the file (it is recorded in the trust store: load it
    again); False for any other error, or when the user said no (show the error).
    """
    if not isinstance(exc, UntrustedModelError):
        return False
    if not confirm_untrusted(exc.path, exc.size, exc.sha256, parent, references=exc.global_name):
        return False
    trust(exc.path)
    return True


# --------------------------------------------------------------------------- layout


def add_tabs(container: Container, pages: Sequence[tuple[str, Container]]) -> QTabWidget:
    """Show ``pages`` as tabs of ``container`` (which must have ``labels=False``).

    The pages stay magicgui children of ``container`` (so ``reset_choices`` and attribute
    access reach them); only their Qt widgets move into a ``QTabWidget``, each in its own
    vertical scroll area (a long tab scrolls under a tab bar that stays in sight).
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QTabWidget

    container.extend([page for _, page in pages])
    tabs = QTabWidget()
    for title, page in pages:
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        page.native.layout().addStretch()  # rows stay together at the top of a tall tab
        scroll.setWidget(page.native)  # re-parenting takes it out of the container's layout
        # as wide as the page needs: no horizontal scrolling, nothing cut off on the right
        scroll.setMinimumWidth(
            page.native.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width()
        )
        # a dock stacked with another (Detect over Train) keeps a usable height
        scroll.setMinimumHeight(min(page.native.minimumSizeHint().height(), MIN_TAB_HEIGHT))
        tabs.addTab(scroll, title)
    container.native.layout().addWidget(tabs)
    container.native.layout().setContentsMargins(0, 0, 0, 0)
    return tabs


#: Lowest height of a tab's scroll area, so a dock sharing the side with others stays usable.
MIN_TAB_HEIGHT = 420


def fit_table(table: Any, stretch: Sequence[int] = ()) -> None:
    """Columns as wide as their contents, ``stretch`` ones sharing the rest; no sideways
    scrolling (a count column never hides behind a scroll bar); long texts elided in the
    middle and wrapped, whole in their tooltips (:func:`cell_tooltips`)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QHeaderView

    view = table.native
    header = view.horizontalHeader()
    for column in range(view.columnCount()):
        mode = QHeaderView.ResizeMode.Stretch if column in stretch else None
        header.setSectionResizeMode(column, mode or QHeaderView.ResizeMode.ResizeToContents)
    header.setStretchLastSection(not stretch)
    view.verticalHeader().setVisible(False)
    view.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    view.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    view.setWordWrap(True)


def cell_tooltips(table: Any) -> None:
    """Every cell's full text as its tooltip (names and errors cut by the column width)."""
    view = table.native
    for row in range(view.rowCount()):
        for column in range(view.columnCount()):
            item = view.item(row, column)
            if item is not None:
                item.setToolTip(item.text())
    view.resizeRowsToContents()


def wrap_labels(*labels: Label) -> None:
    """Let long messages wrap at the dock's width instead of widening it."""
    from qtpy.QtWidgets import QSizePolicy

    for label in labels:
        label.native.setWordWrap(True)
        label.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)


def heading(text: str) -> Label:
    """A bold section title spanning the dock's width."""
    from magicgui.widgets import Label

    label = Label(value=text)
    font = label.native.font()
    font.setBold(True)
    label.native.setFont(font)
    return label


def colour_legend(colormap: str, low: str, high: str, stops: int = 9) -> Label:
    """A one-line colour bar (``low`` text on the left, ``high`` on the right) of ``colormap``.

    Drawn with a Qt style-sheet gradient: no image file, and it scales with the dock.
    """
    import numpy as np
    from magicgui.widgets import Label
    from napari.utils.colormaps import ensure_colormap

    cmap = ensure_colormap(colormap)
    colours = cmap.map(np.linspace(0, 1, stops))
    gradient = ", ".join(
        f"stop:{i / (stops - 1):.3f} rgb({int(r * 255)}, {int(g * 255)}, {int(b * 255)})"
        for i, (r, g, b, _a) in enumerate(colours)
    )
    label = Label(value=f"{low} \N{RIGHTWARDS ARROW} {high}")
    label.native.setStyleSheet(
        "QLabel { color: white; font-weight: bold; padding: 1px 4px; border-radius: 3px;"
        f" background: qlineargradient(x1:0, y1:0, x2:1, y2:0, {gradient}); }}"
    )
    label.tooltip = (
        f"Boxes and points are coloured by the model's confidence ({colormap} colour map): "
        "dark blue = unsure, red = sure."
    )
    return label


def figure_canvas(figure: Any = None, min_height: int = 220) -> tuple[Any, Any]:
    """A matplotlib figure (new unless given) and its Qt canvas."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    figure = figure if figure is not None else Figure(figsize=(5, 3), layout="constrained")
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(min_height)
    return figure, canvas


# --------------------------------------------------------------------------- layers


def is_result(layer: Any) -> bool:
    """Whether ``layer`` is a detection result (boxes or nuclei) of the Detect widget."""
    return SOURCE_KEY in getattr(layer, "metadata", {})


def layer_kind(layer: Any) -> str:
    """``"image"``, ``"shapes"``, ``"points"``, ``"labels"`` or ``""`` for other layers."""
    from napari.layers import Image, Labels, Points, Shapes

    for cls, kind in ((Image, "image"), (Shapes, "shapes"), (Points, "points"), (Labels, "labels")):
        if isinstance(layer, cls):
            return kind
    return ""


def layers_of(viewer: Any, *kinds: str, results: bool = True) -> list[tuple[str, Any]]:
    """``(name, layer)`` choices of the viewer's layers of the given kinds.

    ``results=False`` leaves out the Detect widget's result layers (not ROIs or clicks).
    """
    return [
        (layer.name, layer)
        for layer in viewer.layers
        if layer_kind(layer) in kinds and (results or not is_result(layer))
    ]


def visible_region(
    viewer: Any, scale: Sequence[float] | None, translate: Sequence[float] | None
) -> tuple[float, float, float, float] | None:
    """Visible (y0, x0, y1, x1) of an image (``scale``, ``translate``) in table coordinates.

    From the public camera (centre, zoom) and canvas (viewbox size) models, so it is right
    before the canvas has drawn; None in a 3-D view or when Y/X are not the displayed axes.
    """
    import numpy as np

    dims = viewer.dims
    displayed, yx_axes = list(dims.displayed), [dims.ndim - 2, dims.ndim - 1]
    if dims.ndisplay != 2 or sorted(displayed) != yx_axes:
        return None
    centre = np.asarray(viewer.camera.center, float)[-2:]
    size = np.asarray(viewer.canvas.viewbox_size(viewer.layers), float)
    half = size / max(float(viewer.camera.zoom), 1e-12) / 2
    if displayed != yx_axes:  # transposed view: put (y, x) back in order
        centre, half = centre[::-1], half[::-1]
    return view_to_table(centre, half, scale, translate)
