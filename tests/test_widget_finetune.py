"""Few-shot path of the Train widget in a real (headless) viewer (issue #15).

A 384 x 384 synthetic image whose nuclei are clicked only inside two "annotated region"
rectangles (192 x 192 each): the export crops one training image per region (one in train,
one held out in val), the Fine-tune tab trains for one epoch from the bundled model and adds the
result to Detect only when it beats the start on the held-out region. The decision's two
branches are checked with given scores; one real tiny run goes end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

import napari_yolocell.shell.detect_widget as wd
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell._worker import Outcome
from napari_yolocell.shell.finetune_panel import FinetuneRun
from napari_yolocell.shell.train_widget import TrainWidget
from napari_yolocell.training.train import TrainResult

TIMEOUT = 300_000
SIDE = 192  # region side = export tile: no padding, cheap training tiles


def _rect(y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    # napari puts pixel centres on whole numbers: pixel i spans [i - 0.5, i + 0.5)
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) - 0.5


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei_image((384, 384), n_nuclei=24, seed=1)


@pytest.fixture
def setup(make_napari_viewer, nuclei, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(nuclei.image, name="cells")
    c = nuclei.centers
    inside = ((c < SIDE).all(axis=1)) | ((c >= SIDE).all(axis=1))  # the two diagonal regions
    viewer.add_points(c[inside] - 0.5, name="corrected")
    viewer.add_shapes(
        [_rect(0, 0, SIDE, SIDE), _rect(SIDE, SIDE, 384, 384)],
        shape_type="rectangle",
        name="annotated region",
    )
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.ex_image.value = viewer.layers["cells"]
    widget.ex_annotations.value = viewer.layers["corrected"]
    widget.ex_region.value = viewer.layers["annotated region"]
    widget.ex_diameter.value = 18.0
    widget.ex_tile.value = SIDE
    errors: list[str] = []
    warnings: list[str] = []
    monkeypatch.setattr(_qt, "show_error", errors.append)
    monkeypatch.setattr(_qt, "show_warning", warnings.append)
    return viewer, widget, errors, warnings


def wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def export(qtbot, widget, out):
    widget.ex_out.value = out
    assert widget.export() is not None
    wait(qtbot, widget)


def test_region_export_crops_each_region_and_holds_one_out(qtbot, setup, tmp_path):
    viewer, widget, errors, warnings = setup
    out = tmp_path / "ds"
    export(qtbot, widget, out)
    assert errors == []
    assert not any("cover only" in w for w in warnings)  # regions are complete: no warning
    assert widget.last_report.n_images == {"train": 1, "val": 1, "test": 0}
    n_clicked = len(viewer.layers["corrected"].data)
    assert 0 < sum(widget.last_report.n_objects.values()) <= n_clicked
    assert widget.finetune.data.value == out  # the Fine-tune tab is ready to go

    # the same layer cannot be both: the user is told, nothing is written
    widget.ex_region.value = widget.ex_annotations.value = viewer.layers["annotated region"]
    widget.ex_out.value = tmp_path / "never"
    assert widget.export() is None
    assert "annotated region" in widget.ex_label.value and not (tmp_path / "never").exists()


def _run(tmp_path, held_out=1, scores=None, cancelled=False):
    best = tmp_path / "run" / "weights" / "best.pt"
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_bytes(b"weights")
    result = TrainResult(best=best, last=best, metrics={}, run_dir=best.parent.parent)
    result.cancelled = cancelled
    return FinetuneRun(result, "nucleus-v5n", tmp_path / "ds", held_out=held_out, scores=scores)


@pytest.mark.parametrize(
    ("new", "added"),
    [
        ({"f1": 0.9, "count_error": 0.05}, True),
        ({"f1": 0.8, "count_error": 0.05}, True),  # same F1, smaller count error
        ({"f1": 0.7, "count_error": 0.01}, False),
    ],
)
def test_new_model_added_to_detect_only_when_it_beats_the_start(setup, tmp_path, new, added):
    viewer, widget, errors, _warnings = setup
    detect = wd.DetectWidget(viewer)
    run = _run(tmp_path, scores=({"f1": 0.8, "count_error": 0.1}, new))
    key = str(run.result.best.resolve())
    try:
        widget.finetune._done(Outcome(value=run))
        text = widget.finetune.label.value
        assert errors == [] and "\n" not in text  # one line
        assert (key in detect.model.choices) is added
        assert f"F1 {new['f1']:.3f} vs 0.800" in text and "1 held-out image" in text
        if added:
            assert "beats nucleus-v5n" in text and "added to Detect" in text
            assert key in widget.finetune.base.choices  # and it can be fine-tuned further
        else:
            assert "NOT better than nucleus-v5n" in text and str(run.result.best) in text
    finally:
        session.forget_session_model(run.result.best)


def test_nothing_held_out_or_cancelled_adds_nothing(setup, tmp_path):
    viewer, widget, _errors, _warnings = setup
    detect = wd.DetectWidget(viewer)
    run = _run(tmp_path, held_out=0)
    widget.finetune._done(Outcome(value=run))
    assert "nothing held out" in widget.finetune.label.value
    assert str(run.result.best) in widget.finetune.label.value
    widget.finetune._done(Outcome(value=_run(tmp_path, cancelled=True)))
    assert "press Resume" in widget.finetune.label.value
    assert str(run.result.best.resolve()) not in detect.model.choices


def test_finetune_cancel_keeps_last_for_resume(qtbot, setup, tmp_path):
    viewer, widget, errors, _warnings = setup
    export(qtbot, widget, tmp_path / "ds")
    panel = widget.finetune
    panel.device.value = "cpu"
    panel.out.value = tmp_path / "runs"
    panel.always.value = True  # the start counts these nuclei right: fine-tune anyway
    assert panel.start(batch=2) is not None
    assert panel.cancel_button.enabled and not panel.run_button.enabled
    assert not widget.train_button.enabled  # one training at a time
    panel.cancel()  # should_stop is true from the first batch on
    wait(qtbot, widget)
    assert errors == []
    run = panel.last_run
    assert run.result.cancelled and run.result.last.is_file() and run.scores is None
    assert "press Resume" in panel.label.value
    assert panel.run_button.enabled and widget.train_button.enabled
    job = panel.job(resume=True)
    assert job["resume"] == run.result.last and job["base"] == run.base


def test_finetune_end_to_end_scores_held_out_region(qtbot, setup, tmp_path, monkeypatch):
    viewer, widget, errors, _warnings = setup
    export(qtbot, widget, tmp_path / "ds")
    panel = widget.finetune
    assert panel.base.value == "nucleus-v5n"  # the bundled default comes first
    panel.max_epochs.value = 1
    panel.device.value = "cpu"
    panel.out.value = tmp_path / "runs"
    panel.always.value = True  # the start counts these nuclei right: fine-tune anyway
    # INT8 quantization after the fine-tune has its own tests (test_quantize); here only its
    # steps reach the progress row, and Cancel reaches it
    calls = []

    def fake_quantize(weights, dataset, progress=None, cancel=None):
        calls.append((weights, callable(cancel)))
        progress("INT8: calibrating on 4 tiles")

    monkeypatch.setattr("napari_yolocell.training.quantize.quantize_after_finetune", fake_quantize)
    seen = []
    show = panel._on_progress
    monkeypatch.setattr(panel, "_on_progress", lambda item: (seen.append(item), show(item)))
    assert panel.start(batch=2, minutes=0.1) is not None  # seconds, not the 1 min minimum
    wait(qtbot, widget)
    assert errors == []
    run = panel.last_run
    try:
        shown = [item.text for item in seen if item.text.startswith("training:")]
        assert shown and all(" of " in t and "/1000" not in t for t in shown)  # time used
        assert any("scoring" in item.text for item in seen)
        assert calls == [(run.result.best, True)]
        assert any(item.text == "INT8: calibrating on 4 tiles" for item in seen)
        assert len(panel.history) == 1 and panel.figure.axes  # one epoch on the live plot
        assert run.held_out == 1 and run.scores is not None
        start, new = run.scores
        assert start["n_true"] == new["n_true"] > 0
        text = panel.label.value
        registered = str(run.result.best.resolve()) in session.session_models()
        assert ("added to Detect as" in text) is registered
        assert ("beats nucleus-v5n" in text) is registered
        assert registered or "NOT better than" in text
        assert "nuclei), each model at the confidence Detect uses" in text
        # what the delivered weights are, measured on the exported training images
        assert any(item.text.startswith("delivered model: ") for item in seen)
        assert "Delivered model: halfway to the start model: the start model counts" in text
    finally:
        if run is not None and run.result.best is not None:
            session.forget_session_model(run.result.best)


def test_a_start_that_counts_the_corrections_right_is_kept_untrained(
    qtbot, setup, tmp_path, monkeypatch
):
    from napari_yolocell.training.fewshot import fewshot_info

    viewer, widget, errors, _warnings = setup
    detect = wd.DetectWidget(viewer)
    export(qtbot, widget, tmp_path / "ds")
    panel = widget.finetune
    panel.device.value = "cpu"
    panel.out.value = tmp_path / "runs"
    assert not panel.always.value  # by default a start at the target is kept
    quantized = []  # the bundled start's INT8 version is reused (test_fewshot)
    monkeypatch.setattr(
        "napari_yolocell.training.quantize.quantize_after_finetune",
        lambda weights, dataset, progress=None, cancel=None: quantized.append(weights),
    )
    seen = []
    show = panel._on_progress
    monkeypatch.setattr(panel, "_on_progress", lambda item: (seen.append(item), show(item)))
    assert panel.start() is not None  # 5 minutes asked; none spent training
    wait(qtbot, widget)
    assert errors == []
    run = panel.last_run
    info = fewshot_info(run.result.run_dir)
    assert info["kept_start"] and info["start_f1"] >= 0.93 and quantized == []
    assert run.scores is None and panel.history == []  # nothing trained, nothing to judge
    assert not any(item.text.startswith("training:") for item in seen)
    text = panel.label.value
    assert text.startswith("nucleus-v5n kept, nothing trained (tick 'fine-tune even if")
    assert "Delivered model: the start model, kept as it is: the start model counts" in text
    assert str(run.result.best.resolve()) not in detect.model.choices  # Detect has it already


def test_three_images_and_their_regions_go_into_one_finetune(
    qtbot, make_napari_viewer, monkeypatch, tmp_path
):
    """One image after another into one dataset; box deletions and clicked nuclei merged;
    every region kept; the held-out part is a whole image or region (issue #20)."""
    from napari_yolocell.shell.finetune_panel import held_out_items
    from napari_yolocell.training.fewshot import prepare_fewshot_dataset

    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    errors: list[str] = []
    monkeypatch.setattr(_qt, "show_error", errors.append)
    monkeypatch.setattr(_qt, "show_warning", lambda _m: None)
    out = tmp_path / "corrections"
    widget.ex_out.value = out
    widget.ex_tile.value = SIDE
    widget.ex_diameter.value = 18.0
    n_true = 0
    for i in range(3):
        cells = make_nuclei_image((SIDE, SIDE), n_nuclei=8, seed=10 + i)
        image = viewer.add_image(cells.image, name=f"img{i}")
        lo, hi = np.clip(cells.centers[:-2] - 9, 0, SIDE), np.clip(cells.centers[:-2] + 9, 0, SIDE)
        boxes = [_rect(*a, *b) for a, b in zip(lo, hi, strict=True)]
        shapes = viewer.add_shapes(boxes, shape_type="rectangle", name=f"boxes{i}")
        shapes.selected_data = {0}
        shapes.remove_selected()  # a false box deleted...
        clicked = viewer.add_points(cells.centers[-2:] - 0.5, name=f"added{i}")  # ...two added
        widget.ex_image.value = image
        widget.ex_annotations.value = shapes
        widget.ex_points.value = clicked
        assert widget.export() is not None
        wait(qtbot, widget)
        assert errors == []
        n_true += len(cells.centers) - 1
    report = widget.last_report
    assert report.totals["n_sources"] == {"train": 2, "val": 1, "test": 0}
    assert "the dataset now holds" in widget.ex_label.value
    assert label_total(out) == n_true  # every image kept, deletions and clicks merged
    assert widget.finetune.data.value == out
    assert len(held_out_items(out)) == 1  # a whole image held out for the verdict
    info = prepare_fewshot_dataset(out, tmp_path / "prep", model_diameter=18.0)
    assert info["n_train"] == 2 and info["n_held_out"] == 1

    # one image, three annotated regions: two train, one held out
    regions = viewer.add_shapes(
        [_rect(0, 0, 96, 96), _rect(96, 96, SIDE, SIDE), _rect(0, 96, 96, SIDE)],
        shape_type="rectangle",
        name="regions",
    )
    widget.ex_region.value = regions
    widget.ex_points.value = None
    widget.ex_out.value = tmp_path / "regions"
    widget.ex_tile.value = 96
    assert widget.export() is not None
    wait(qtbot, widget)
    assert errors == []
    assert widget.last_report.n_sources == {"train": 2, "val": 1, "test": 0}


def label_total(root) -> int:
    return sum(len(p.read_text().splitlines()) for p in root.glob("labels/*/*.txt"))
