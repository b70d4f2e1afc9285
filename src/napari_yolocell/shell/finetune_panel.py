"""Fine-tune tab of the Train widget: adapt a model to a lab's corrections in a few minutes.

The biologist corrects Detect's boxes on a few images, exports them (Export tab, optionally
only inside an "annotated region"), then here:

1. :func:`~napari_yolocell.training.fewshot.finetune` starts from the bundled model (or v6, or
   a model of this session) with a time budget in minutes; progress is one figure, the time
   used of the budget (the epoch count of a timed run is only ultralytics' estimate), with the
   live loss / mAP50 plot, Cancel (keeps a resumable ``last.pt``) and Resume (continues within
   what is left of the budget, :func:`~napari_yolocell.training.fewshot.resume_finetune`);
2. the starting and the fine-tuned model are scored on the held-out corrections (val / test
   images that are not copies of training ones,
   :func:`~napari_yolocell.training.fewshot.held_out_split`), each at the confidence Detect
   uses for it (:func:`~napari_yolocell.analysis.finetune_check.judge`);
3. the new model is added to Detect only if it beats the start; otherwise one line says so,
   with both scores and how many held-out nuclei they rest on, and names the file, so it can
   still be added by hand.

Training and evaluation are joined here, in the shell, because the core's layers keep
``training`` and ``analysis`` apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
)

from napari_yolocell.analysis.finetune_check import judge, verdict_of
from napari_yolocell.analysis.plots import plot_training_history
from napari_yolocell.shell import _qt, session
from napari_yolocell.shell._worker import Outcome, Progress, Task
from napari_yolocell.shell.progress_row import ProgressRow, duration
from napari_yolocell.shell.settings import persist
from napari_yolocell.training.fewshot import (
    fewshot_info,
    finetune,
    held_out_split,
    resume_finetune,
    start_kept,
)
from napari_yolocell.training.train import TrainResult

__all__ = ["FinetunePanel", "FinetuneRun", "base_choices", "held_out_items", "run_finetune"]

DEVICES = [("auto", None), ("cpu", "cpu"), ("GPU 0", "0"), ("Apple MPS", "mps")]


@dataclass
class FinetuneRun:
    """What a fine-tune task returns to the GUI thread.

    Attributes
    ----------
    result : TrainResult
        The training run.
    base : str
        The starting model (registry name or ``.pt`` path).
    data : Path
        The corrections dataset (its val split is the held-out part).
    held_out : int
        Held-out (val) images the two models were scored on; 0 when there were none.
    scores : (dict, dict) or None
        :func:`~napari_yolocell.analysis.evaluate.evaluate_model` results of the starting and
        the fine-tuned model; None when not scored (cancelled, nothing held out).
    budget_s, used_s : float
        The time budget and the training time spent so far (a resumed run goes on from it).
    """

    result: TrainResult
    base: str
    data: Path
    held_out: int = 0
    scores: tuple[dict[str, Any], dict[str, Any]] | None = None
    budget_s: float = 0.0
    used_s: float = 0.0


def base_choices(_widget: Any = None) -> list[tuple[str, str]]:
    """``(label, value)`` models to start from: bundled ones and this session's ``.pt`` files.

    The classical detector and exported runtimes (ONNX, OpenVINO) have no trainable weights.
    """
    return [
        (label, value)
        for label, value in session.model_choices()
        if value != "classical"
        and (value not in session.session_models() or str(value).lower().endswith(".pt"))
    ]


def held_out_items(data: str | Path) -> list[tuple[Path, np.ndarray, str]]:
    """``(image path, truth boxes, name)`` of the dataset's held-out images: its val and test
    images that are not copies of training images (never trained on)."""
    held = held_out_split(data)[1]
    return [(s.image_path, s.boxes, Path(s.image_path).name) for s in held]


def run_finetune(
    job: dict[str, Any], report: Callable[..., None], cancel: threading.Event
) -> FinetuneRun:
    """Fine-tune (or resume), then score both models on the held-out images (worker thread).

    Parameters
    ----------
    job : dict
        ``data``, ``base``, ``minutes``, ``epochs`` (cap or None), ``out``, ``device``;
        to resume: ``resume`` (the ``last.pt``), ``budget_s`` and ``used_s`` (so the time left
        and the progress go on from where they stopped); any other ``finetune`` argument.
    report : callable
        ``report(done, total, text, data)``: seconds of the budget used during training (an
        epoch carries its ``on_epoch`` dict as ``data``), then images scored.
    cancel : threading.Event
        Polled after each batch.

    Returns
    -------
    FinetuneRun
    """
    job = dict(job)
    base, data, resume = job.pop("base"), job.pop("data"), job.pop("resume", None)
    minutes = job.pop("minutes")
    budget = float(job.pop("budget_s", 0.0) or (float(minutes) * 60 if minutes else 0.0))
    used = float(job.pop("used_s", 0.0))
    t0 = time.monotonic()

    def spent() -> float:
        return used + time.monotonic() - t0

    def on_epoch(info: dict[str, Any]) -> None:
        if not info.get("final"):  # the re-validation of best.pt is not a new epoch
            report(int(min(spent(), budget)), int(budget), "", info)

    def on_batch(info: dict[str, Any]) -> None:
        report(int(min(spent(), budget)), int(budget), _progress_text(spent(), budget, info))

    def on_status(text: str) -> None:  # the INT8 quantization after training
        report(int(min(spent(), budget)), int(budget), text)

    hooks = {
        "on_epoch": on_epoch,
        "on_batch": on_batch,
        "should_stop": cancel.is_set,
        "on_status": on_status,
    }
    if resume is not None:
        left = (budget - used) / 60 if budget else None
        result = resume_finetune(resume, minutes_left=left, device=job["device"], **hooks)
    else:
        result = finetune(data, model=base, minutes=minutes, **job, **hooks)
    run = FinetuneRun(result, str(base), Path(data), budget_s=budget, used_s=spent())
    if result.cancelled or result.best is None or start_kept(result.run_dir):
        return run
    items = held_out_items(data)
    if not items:
        return run
    report(0, 2 * len(items), "scoring the start and the fine-tuned model on the held-out images")
    verdict = judge(base, result.best, items, progress=partial(_score_progress, report))
    run.held_out, run.scores = len(items), (verdict.start, verdict.tuned)
    return run


def _progress_text(spent: float, budget: float, info: dict[str, Any]) -> str:
    """One stable figure: time used of the budget (a timed run's epoch total is a guess)."""
    if budget:
        return f"training: {duration(spent)} of {duration(budget)} (epoch {info['epoch']})"
    return f"training: epoch {info['epoch']} of {info['epochs']}"


def _score_progress(report: Callable[..., None], done: int, total: int) -> None:
    report(done, total, f"scoring on held-out images: {done} / {total}")


def decision(run: FinetuneRun) -> tuple[bool, str]:
    """Whether to add the fine-tuned model to Detect, and the one line that says why.

    Examples
    --------
    >>> r = TrainResult(best=Path("run/weights/best.pt"), last=Path("last.pt"), metrics={},
    ...                 run_dir=Path("run"))
    >>> decision(FinetuneRun(r, "nucleus-v5n", Path("data")))[0]
    False
    """
    result, base = run.result, run.base
    if result.cancelled:
        left = ""
        if run.budget_s:
            spent, budget = min(run.used_s, run.budget_s), run.budget_s
            left = f" after {duration(spent)} of {duration(budget)}"
            left += f"; {duration(budget - spent)} left"
        return False, f"cancelled{left}; {result.last} kept: press Resume to continue"
    if result.best is None:
        return False, "finished without a best.pt: nothing to add to Detect"
    if start_kept(result.run_dir):
        return False, (
            f"{base} kept, nothing trained (tick 'fine-tune even if it already counts them "
            "right' to train anyway)"
        )
    if run.scores is None:
        return False, (
            f"nothing held out to compare with {base} (export at least 2 images or regions "
            f"with a val fraction above 0): not added to Detect; add {result.best} there by "
            "hand to try it"
        )
    verdict = verdict_of(*run.scores, base)
    verdict.n_images = verdict.n_images or run.held_out
    if verdict.better:
        return True, verdict.line()
    return False, (
        f"{verdict.line()}: not added to Detect (add {result.best} there by hand to use it anyway)"
    )


class FinetunePanel:
    """The Fine-tune tab's controls and logic; its tasks run through the Train widget.

    Parameters
    ----------
    owner : napari_yolocell.shell.train_widget.TrainWidget
        The widget (not imported here: it imports this module). Provides ``_add_tab``,
        ``_start`` (one task per key), ``tasks`` and ``_failed``; its Export tab fills
        :attr:`data`, its ``_update_buttons`` calls :meth:`update_buttons`.
    """

    KEY = "finetune"

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.history: list[dict[str, Any]] = []
        self.last_run: FinetuneRun | None = None
        self.data = FileEdit(
            label="corrections",
            mode="d",
            tooltip="the YOLO dataset exported from your corrections (Export tab)",
        )
        self.base = ComboBox(
            label="start from",
            choices=base_choices,
            tooltip="the model to adapt: the bundled default, v6, or a model of this session",
        )
        self.minutes = FloatSpinBox(
            label="minutes",
            value=5.0,
            min=1.0,  # below, training gets its 20 s floor and the budget would not hold
            max=600.0,
            step=0.5,
            tooltip="time budget of the whole run (preparing, training, checking)",
        )
        self.max_epochs = SpinBox(
            label="max epochs", value=0, min=0, max=10_000, tooltip="0: as many as time allows"
        )
        self.device = ComboBox(label="device", choices=DEVICES)
        self.out = FileEdit(label="runs folder", mode="d", value=Path.home() / "yolocell-runs")
        self.always = CheckBox(
            text="fine-tune even if it already counts them right",
            value=False,
            tooltip="off: when the start model already counts your corrected images at the "
            "target (F1 0.93 or more, count within 5 %), it is kept and nothing is trained, "
            "since a fine-tune on a few images could only make it worse on your other images",
        )
        self.run_button = PushButton(text="Fine-tune")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.resume_button = PushButton(text="Resume")
        self.progress = ProgressRow("s")
        self.label = Label(value="")
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.resume_button.changed.connect(partial(self.start, resume=True))
        buttons = [self.run_button, self.cancel_button, self.resume_button]
        container = owner._add_tab(
            [
                self.data,
                self.base,
                self.minutes,
                self.max_epochs,
                self.device,
                self.out,
                self.always,
                Container(widgets=buttons, layout="horizontal", labels=False),
                self.progress,
                self.label,
            ],
            "Fine-tune",
        )
        _qt.wrap_labels(self.label)
        self.figure, self.canvas = _qt.figure_canvas()
        container.native.layout().addWidget(self.canvas)
        persist(
            "finetune",
            {
                "base": self.base,
                "minutes": self.minutes,
                "max_epochs": self.max_epochs,
                "device": self.device,
                "out": self.out,
                "always": self.always,
            },
        )

    @property
    def task(self) -> Task | None:
        """The running or last fine-tune task."""
        return self.owner.tasks.get(self.KEY)

    def update_buttons(self, training: bool, mine: bool) -> None:
        """Fine-tune / Resume while no training runs (either kind): each takes the machine."""
        self.run_button.enabled = self.resume_button.enabled = not training
        self.cancel_button.enabled = mine

    def job(self, resume: bool = False) -> dict[str, Any]:
        """Arguments of :func:`run_finetune` from the controls.

        Raises
        ------
        ValueError
            No dataset, no model, or nothing to resume.
        """
        common = {"out": Path(self.out.value).expanduser(), "device": self.device.value}
        if resume:
            run = self.last_run
            last = getattr(run.result if run else None, "last", None)
            if run is None or not run.result.cancelled or last is None or not last.is_file():
                raise ValueError("nothing to resume: Cancel a fine-tune first")
            return {
                "data": run.data,
                "base": run.base,
                "minutes": None,
                "resume": last,
                "budget_s": run.budget_s,
                "used_s": run.used_s,
                **common,
            }
        if not self._has_data():
            raise ValueError("choose the corrections dataset (export it in the Export tab)")
        data = Path(self.data.value).expanduser()
        if not data.exists():
            raise ValueError(f"dataset not found: {data}")
        if self.base.value is None:
            raise ValueError("choose the model to start from")
        job = {
            "data": data,
            "base": self.base.value,
            "minutes": float(self.minutes.value),
            "epochs": int(self.max_epochs.value) or None,
            **common,
        }
        if self.always.value:  # never the start kept; whole or halfway as the count says
            job["keep_at_target"] = False
        return job

    def _has_data(self) -> bool:
        return self.data.value is not None and str(self.data.value) not in ("", ".")

    def start(self, _value: Any = None, resume: bool = False, **overrides: Any) -> Task | None:
        """Start (or resume) fine-tuning in a worker; ``overrides`` go to ``finetune``."""
        try:
            job = {**self.job(resume=resume), **overrides}
        except ValueError as exc:
            self.label.value = f"not started: {exc}"
            _qt.show_error(f"Cannot fine-tune: {exc}")
            return None
        if not resume:  # a resumed run continues its plot
            self.history = []
            self._draw_history()
        self.label.value = ""
        self.progress.begin("resuming..." if resume else "preparing the images...")
        task = self.owner._start(
            self.KEY,
            partial(run_finetune, job),
            self._done,
            "Fine-tuning",
            on_progress=self._on_progress,
        )
        if task is None:
            self.progress.end()
        return task

    def cancel(self, _value: Any = None) -> None:
        """Stop after the current batch; ``last.pt`` is kept so Resume can continue."""
        if self.task is not None and self.task.running:
            self.task.cancel()
            self.progress.end("stopping after this batch...")

    def _on_progress(self, item: Progress) -> None:
        if item.data is not None:  # a validated epoch: the live plot
            self.history.append(item.data)
            self._draw_history()
        elif item.text and not (self.task is not None and self.task.cancelled):
            self.progress.update(item)
            self.progress.text.value = item.text  # epoch and time left, or scoring

    def _draw_history(self) -> None:
        plot_training_history(self.history, self.figure)
        self.canvas.draw_idle()

    def _done(self, outcome: Outcome) -> None:
        self.progress.end()
        if self.owner._failed(self.label, "Fine-tuning", outcome):
            return
        run = self.last_run = outcome.value
        add, text = decision(run)
        if add:
            key = session.register_session_model(run.result.best)
            text += f": added to Detect as {session.model_label(key)}"
            _qt.show_info(f"Fine-tuned model added to Detect: {key}")
        elif not run.result.cancelled:
            _qt.show_warning(text)
        if not run.result.cancelled:  # the weights it holds: blended or whole, and why
            info = fewshot_info(run.result.run_dir) or {}
            reason = info.get("blend_reason")
            text += f". Delivered model: {reason}" if reason else ""
            text += f"; {info['lab_conf_reason']}" if info.get("lab_conf_reason") else ""
        self.label.value = text
