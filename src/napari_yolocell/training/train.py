"""Train YOLOv5 / YOLOv6 nucleus detectors with ultralytics, offline.

Models are built from the architecture YAMLs shipped with ultralytics (``yolov5n.yaml`` ...
``yolov6x.yaml``) and trained from scratch, or fine-tuned from a ``.pt`` checkpoint. Nothing
is downloaded: ultralytics is imported through
:func:`napari_yolocell.models.ultralytics_env.import_ultralytics`, plots (which fetch a font) are
off, and the AMP self-test (which fetches ``yolo26n.pt``) never downloads its reference model.

Progress is reported through plain callables so the napari widget can draw a live plot and
cancel: ``on_epoch(dict)`` after each validated epoch, ``on_batch(dict)`` after each batch and
``should_stop()`` polled after each batch. A cancelled run keeps a resumable ``last.pt``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from napari_yolocell.io.yolo import locate_splits, read_yolo_dataset
from napari_yolocell.models import safety
from napari_yolocell.models.detector import default_device
from napari_yolocell.models.spec import ModelSpec, WeightsError, write_sidecar
from napari_yolocell.models.ultralytics_env import import_ultralytics

FAMILIES = ("yolov5", "yolov6")
SIZES = ("n", "s", "m", "l", "x")
ARCHITECTURES = tuple(f"{f}{s}" for f in FAMILIES for s in SIZES)

# Fluorescence nuclei are grey, have no "up" and appear at any position; their size is set by
# the magnification, so scale jitter stays moderate. Rotations by 90 degrees are not offered by
# ultralytics (arbitrary angles would inflate the boxes), so flips carry the orientation part.
MICROSCOPY_AUGMENT: dict[str, float] = {
    "hsv_h": 0.0,  # grey images (replicated to RGB): hue and saturation are meaningless
    "hsv_s": 0.0,
    "hsv_v": 0.3,  # brightness jitter: staining and exposure vary between slides
    "degrees": 0.0,
    "translate": 0.1,
    "scale": 0.5,
    "shear": 0.0,
    "perspective": 0.0,
    "flipud": 0.5,
    "fliplr": 0.5,
    "mosaic": 1.0,
    "mixup": 0.0,  # blended nuclei would be ambiguous truth
    "copy_paste": 0.0,
}
NO_AUGMENT: dict[str, float] = {
    **{k: 0.0 for k in MICROSCOPY_AUGMENT},
}

__all__ = [
    "ARCHITECTURES",
    "MICROSCOPY_AUGMENT",
    "TrainResult",
    "TrainingCancelled",
    "augmentation_settings",
    "prepare_data_yaml",
    "train",
    "write_model_sidecar",
]


class TrainingCancelled(Exception):
    """Raised inside the ultralytics loop when ``should_stop()`` returns True."""


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    best : Path or None
        ``weights/best.pt`` (None if no epoch was validated before a cancel).
    last : Path
        ``weights/last.pt``; after a cancel it still holds the optimizer, so ``resume=True``
        continues from it.
    metrics : dict
        Final validation metrics (precision, recall, mAP50, mAP50-95) of ``best``.
    run_dir : Path
        Folder of the run (``results.csv``, ``args.yaml``, ``weights/``).
    cancelled : bool
        True if ``should_stop`` ended the run.
    history : list of dict
        The per-epoch dicts also sent to ``on_epoch``.
    """

    best: Path | None
    last: Path
    metrics: dict[str, float]
    run_dir: Path
    cancelled: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def augmentation_settings(augment: str | dict[str, float] | None) -> dict[str, float]:
    """ultralytics hyper-parameters for an augmentation preset.

    Parameters
    ----------
    augment : {"microscopy", "default", "none"} or dict or None
        ``microscopy``: :data:`MICROSCOPY_AUGMENT`; ``default``: ultralytics' own (natural
        images: colour jitter, no vertical flips); ``none``/None: everything off; a dict is
        applied on top of ``microscopy``.

    Returns
    -------
    dict
        Keyword arguments for ``YOLO.train``.
    """
    if isinstance(augment, dict):
        return {**MICROSCOPY_AUGMENT, **augment}
    if augment in (None, "none", False):
        return dict(NO_AUGMENT)
    if augment == "microscopy":
        return dict(MICROSCOPY_AUGMENT)
    if augment == "default":
        return {}
    raise ValueError(f"augment must be 'microscopy', 'default', 'none' or a dict, not {augment!r}")


# --------------------------------------------------------------------------- data


def prepare_data_yaml(data: str | Path, out_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write a ``data.yaml`` with absolute split paths that ultralytics can always resolve.

    Exports from Roboflow or Colab carry paths (``../train/images``, ``/content/drive/...``)
    that are wrong once the folder is moved; :mod:`napari_yolocell.io.yolo` finds the
    splits again. A dataset without a ``val`` split validates on ``train`` (with a warning).

    Parameters
    ----------
    data : str or Path
        Dataset folder or its ``data.yaml``.
    out_dir : str or Path
        Where to write ``data.resolved.yaml``.

    Returns
    -------
    path : Path
        The written yaml.
    config : dict
        Its content.
    """

    root, names, splits = locate_splits(data)
    if "train" not in splits:
        raise FileNotFoundError(f"no training images found in {data}")
    if "val" not in splits:
        warnings.warn(
            f"{data}: no 'val' split, validating on the training images "
            "(metrics will be optimistic)",
            UserWarning,
            stacklevel=3,
        )
        splits["val"] = splits["train"]
    dataset = read_yolo_dataset(data, splits=("train", "val"), warn=False)
    for problem in dataset.problems:  # ultralytics would silently treat these as background
        warnings.warn(
            f"dataset problem ({problem.kind}, {problem.split}): {problem.message}",
            UserWarning,
            stacklevel=3,
        )
    if not names:
        names = dataset.names or ("nucleus",)
    config: dict[str, Any] = {
        "path": str(root),
        **{k: [str(p) for p in v] if len(v) > 1 else str(v[0]) for k, v in splits.items()},
        "nc": len(names),
        "names": {i: n for i, n in enumerate(names)},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.resolved.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, config


def median_diameter(data: str | Path) -> float | None:
    """Median box diameter ``(h + w) / 2`` in pixels over the training split, or None."""

    try:
        dataset = read_yolo_dataset(data, splits=("train",), warn=False)
    except (FileNotFoundError, ValueError):
        return None
    sizes = [(b[:, 2] - b[:, 0] + b[:, 3] - b[:, 1]) / 2 for b in (s.boxes for s in dataset)]
    sizes = [s for s in sizes if len(s)]
    return float(np.median(np.concatenate(sizes))) if sizes else None


# --------------------------------------------------------------------------- model


def _model_source(model: str | Path) -> tuple[str, str, bool]:
    """(ultralytics source, family, is_checkpoint) for an architecture name or a ``.pt``."""
    text = str(model)
    if text.lower().endswith(".pt"):
        if not Path(text).is_file():  # a bare "yolov5n.pt" would trigger a download
            raise FileNotFoundError(f"checkpoint not found: {text}")
        return text, _family_of(Path(text).name), True
    stem = Path(text).stem if text.lower().endswith((".yaml", ".yml")) else text
    if Path(text).is_file():  # a custom architecture YAML
        return text, _family_of(stem), False
    if stem.lower() not in ARCHITECTURES:
        raise ValueError(
            f"unknown model {model!r}: use one of {', '.join(ARCHITECTURES)}, "
            "an architecture .yaml or a .pt checkpoint"
        )
    return f"{stem.lower()}.yaml", stem[:6].lower(), False


def _family_of(name: str) -> str:
    lower = name.lower()
    return next((f for f in FAMILIES if f in lower), "yolo")


def _checkpoint_family(path: Path) -> str | None:
    """Family recorded in a checkpoint's sidecar, if any (fine-tuning keeps the family)."""
    side = path.with_name(path.stem + ".yolocell.json")
    if side.exists():
        try:
            return json.loads(side.read_text(encoding="utf-8")).get("family")
        except (OSError, ValueError):
            return None
    return None


# GPUs on which ultralytics disables AMP (NaN losses); copied from ultralytics.utils.checks.
_BAD_AMP_GPUS = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
    re.IGNORECASE,
)


def _patch_amp_check() -> None:
    """Make ultralytics' AMP self-test download-free.

    The self-test compares fp16/fp32 outputs of ``yolo26n.pt``, which it downloads if absent.
    Without that file only the known-bad-GPU list is applied (AMP works on every other recent
    NVIDIA GPU); with it, the original test runs.
    """
    import torch
    from ultralytics.engine import trainer as trainer_mod
    from ultralytics.utils import WEIGHTS_DIR

    original = trainer_mod.check_amp
    if getattr(original, "_yolocell_offline", False):
        return

    def offline_check_amp(model, *args, **kwargs):
        device = next(model.parameters()).device
        if device.type != "cuda":
            return False
        if (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file():
            return original(model, *args, **kwargs)
        return not _BAD_AMP_GPUS.search(torch.cuda.get_device_name(device))

    offline_check_amp._yolocell_offline = True  # type: ignore[attr-defined]
    trainer_mod.check_amp = offline_check_amp


# --------------------------------------------------------------------------- callbacks


_METRIC_KEYS = {
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "fitness": "fitness",
}


def _short_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        name = _METRIC_KEYS.get(key, key.split("/", 1)[-1] if key.startswith("val/") else None)
        if key.startswith("val/"):
            name = "val_" + key.split("/", 1)[1]
        if name is not None and value is not None:
            out[name] = float(value)
    return out


def _losses(trainer) -> dict[str, float]:
    try:
        items = trainer.label_loss_items(trainer.tloss, prefix="train")
    except Exception:  # noqa: BLE001 - losses are cosmetic for the progress display
        return {}
    return {k.split("/", 1)[1]: float(v) for k, v in (items or {}).items()}


class _Hooks:
    """ultralytics callbacks that forward progress and poll for cancellation."""

    def __init__(self, on_epoch, on_batch, should_stop, history):
        self.on_epoch, self.on_batch, self.should_stop = on_epoch, on_batch, should_stop
        self.history = history
        self.batch = 0
        self.train_epoch = -1
        self.start = time.time()
        self.cancelled = False

    def register(self, model) -> None:
        model.add_callback("on_train_epoch_start", self.epoch_start)
        model.add_callback("on_train_epoch_end", self.epoch_end)
        model.add_callback("on_train_batch_end", self.batch_end)
        model.add_callback("on_fit_epoch_end", self.fit_epoch_end)

    def epoch_start(self, trainer) -> None:
        self.batch = 0

    def epoch_end(self, trainer) -> None:
        self.train_epoch = trainer.epoch

    def batch_end(self, trainer) -> None:
        self.batch += 1
        if self.on_batch is not None:
            self.on_batch(
                {
                    "epoch": trainer.epoch + 1,
                    "epochs": trainer.epochs,
                    "batch": self.batch,
                    "batches": len(trainer.train_loader),
                }
            )
        if self.should_stop is not None and self.should_stop():
            self.cancelled = True
            _save_cancelled(trainer)
            raise TrainingCancelled

    def fit_epoch_end(self, trainer) -> None:
        # final_eval() re-validates best.pt and fires this hook with epoch + 1: flag it.
        final = trainer.epoch != self.train_epoch
        info = {
            "epoch": self.train_epoch + 1,
            "epochs": trainer.epochs,
            "final": final,
            "time": time.time() - self.start,
            **_losses(trainer),
            **_short_metrics(trainer.metrics),
        }
        if getattr(trainer, "fitness", None) is not None and not final:
            info["fitness"] = float(trainer.fitness)
        if not final:
            self.history.append(info)
        if self.on_epoch is not None:
            self.on_epoch(info)


def _save_cancelled(trainer) -> None:
    """Write a resumable ``last.pt`` now, leaving ``best.pt`` (the best *validated*) alone."""
    best = trainer.best
    trainer.best = trainer.wdir / "_cancelled_unused.pt"
    try:
        trainer.save_model()
    finally:
        trainer.best.unlink(missing_ok=True)
        trainer.best = best


# --------------------------------------------------------------------------- train


def train(
    data: str | Path,
    model: str | Path = "yolov5n",
    epochs: int = 50,
    imgsz: int = 640,
    batch: int = 16,
    patience: int = 50,
    device: str | int | None = None,
    seed: int = 0,
    out: str | Path = "runs/yolocell",
    name: str | None = None,
    resume: bool = False,
    augment: str | dict[str, float] | None = "microscopy",
    workers: int = 0,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    default_conf: float = 0.25,
    callbacks: dict[str, Callable[[Any], None]] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train (or fine-tune, or resume) a YOLOv5 / YOLOv6 detector offline.

    Parameters
    ----------
    data : str or Path
        YOLO dataset folder or its ``data.yaml`` (ours, ultralytics or Roboflow layout).
    model : str or Path
        ``yolov5n/s/m/l/x`` or ``yolov6n/s/m/l/x`` (from scratch, from ultralytics' shipped
        YAML), a custom architecture ``.yaml``, or a ``.pt`` checkpoint to fine-tune.
    epochs, imgsz, batch, patience, seed : int
        As in ultralytics (``patience``: epochs without improvement before early stop).
    device : str, int or None
        ``"cpu"``, ``0``, ``"0,1"``...; None picks the first GPU if any.
    out : str or Path
        Parent folder of run folders.
    name : str, optional
        Run folder name (default: the architecture name, or ``<family>_finetune``; ``2``,
        ``3``... is appended if the folder already holds a run).
    resume : bool
        Continue the run ``out/name`` (or the newest run under ``out``, or the given ``.pt``)
        from its ``last.pt``; training arguments are taken from the checkpoint.
    augment : {"microscopy", "default", "none"} or dict
        Augmentation preset, see :func:`augmentation_settings`.
    workers : int
        Data-loader worker processes; 0 (default) loads in the calling process, which is
        safest inside napari.
    on_epoch : callable, optional
        Called with a dict (epoch, epochs, final, time, box_loss, cls_loss, dfl_loss,
        precision, recall, mAP50, mAP50-95, fitness, val_* losses) after each validated epoch,
        and once more with ``final=True`` for the final validation of ``best.pt``.
    on_batch : callable, optional
        Called with {epoch, epochs, batch, batches} after each training batch.
    should_stop : callable, optional
        Polled after each batch; when it returns True a resumable ``last.pt`` is written and
        training ends (``TrainResult.cancelled``).
    default_conf : float
        Confidence threshold recorded in the model sidecar.
    callbacks : dict, optional
        Extra ultralytics callbacks, ``{event: fn(trainer)}`` (e.g. ``on_fit_epoch_end``).
    **overrides
        Any other ``YOLO.train`` argument (``lr0``, ``close_mosaic``, ``cache``...).

    Returns
    -------
    TrainResult
    """
    import_ultralytics()
    from ultralytics import YOLO

    _patch_amp_check()
    # ultralytics takes torch's device names too ("cuda:0" as well as "0")
    device = default_device() if device is None else str(device)
    history: list[dict[str, Any]] = []
    hooks = _Hooks(on_epoch, on_batch, should_stop, history)

    rebuilt = None  # our own copy of a checkpoint to resume (ultralytics never sees the user's)
    if resume:
        ckpt = _resume_checkpoint(model, out, name)
        run_dir = ckpt.parent.parent
        rebuilt, ckpt_args = _rebuilt_for_resume(ckpt)
        yolo = YOLO(str(rebuilt))  # a file we wrote, from the user's read as data
        hooks.register(yolo)
        for event, fn in (callbacks or {}).items():
            yolo.add_callback(event, fn)
        family = _checkpoint_family(ckpt) or _family_of(str(_train_args(ckpt).get("model", "")))
        data_yaml, _ = prepare_data_yaml(data, run_dir)
        kwargs = {
            "resume": str(rebuilt),
            "data": str(data_yaml),
            "save_dir": str(run_dir),  # the run the user chose, not a folder named in the file
            "device": device,
            "workers": workers,
            "plots": False,
            **overrides,
        }
        imgsz = int(ckpt_args.get("imgsz", imgsz))
    else:
        source, family, is_ckpt = _model_source(model)
        if is_ckpt:
            family = _checkpoint_family(Path(source)) or family
        run_name = name or (f"{family}_finetune" if is_ckpt else Path(source).stem)
        project = Path(out).expanduser().resolve()
        run_dir = fresh_run_dir(project, run_name)
        data_yaml, _ = prepare_data_yaml(data, run_dir)
        yolo = _network_to_train(source, is_ckpt)
        hooks.register(yolo)
        for event, fn in (callbacks or {}).items():
            yolo.add_callback(event, fn)
        kwargs = {
            "data": str(data_yaml),
            "epochs": epochs,
            "imgsz": imgsz,
            "batch": batch,
            "patience": patience,
            "device": device,
            "seed": seed,
            "workers": workers,
            "project": str(project),
            "name": run_dir.name,
            "exist_ok": True,
            "pretrained": is_ckpt,
            "plots": False,
            "amp": device != "cpu",
            **augmentation_settings(augment),
            **overrides,
        }
    try:
        yolo.train(**kwargs)
    except TrainingCancelled:
        _release(yolo.trainer)
    finally:
        if rebuilt is not None:
            shutil.rmtree(rebuilt.parent, ignore_errors=True)
    trainer = yolo.trainer
    run_dir = Path(trainer.save_dir) if trainer is not None else run_dir
    return _finish(run_dir, trainer, hooks, family, data_yaml, imgsz, default_conf)


def _network_to_train(source: str, is_ckpt: bool):
    """A ``YOLO`` around a network we built: from a checkpoint read as data, or from a checked
    architecture. ultralytics never reads the user's file (issue 21)."""
    from napari_yolocell.models import checkpoints

    if not is_ckpt:
        return checkpoints.network_from_yaml(source)
    yolo = checkpoints.load_network(source)
    if checkpoints.network_family(yolo) != "ultralytics":
        raise WeightsError(
            f"cannot fine-tune {source!r}: only ultralytics checkpoints can be trained here"
        )
    return yolo


def _rebuilt_for_resume(ckpt: Path) -> tuple[Path, dict[str, Any]]:
    """Our own resumable copy of ``ckpt`` (read as data, network rebuilt by us), written to a
    private temporary folder; and its training arguments."""
    import tempfile

    import torch

    from napari_yolocell.models import netbuild, pickle_data
    from napari_yolocell.models.user_cache import cache_root, private_dir

    data = safety.read_model_file(ckpt)
    try:
        state = netbuild.resume_checkpoint(data)
    except (pickle_data.PickleDataError, netbuild.ArchitectureError) as err:
        raise WeightsError(f"cannot resume from {str(ckpt)!r}: {err}") from None
    folder = Path(tempfile.mkdtemp(prefix="resume-", dir=private_dir(cache_root() / "resume")))
    target = folder / "last.pt"
    torch.save(state, target)
    return target, state["train_args"]


def _release(trainer) -> None:
    """Free what ultralytics frees at the end of a normal run (loader workers, GPU cache)."""
    if trainer is None:
        return
    for loader in (getattr(trainer, "train_loader", None), getattr(trainer, "test_loader", None)):
        if hasattr(loader, "close"):
            loader.close()
    if hasattr(trainer, "_clear_memory"):
        trainer._clear_memory()


def _train_args(ckpt: Path) -> dict[str, Any]:
    args_file = ckpt.parent.parent / "args.yaml"
    if args_file.exists():
        return yaml.safe_load(args_file.read_text(encoding="utf-8")) or {}
    return {}


def fresh_run_dir(project: Path, name: str) -> Path:
    """``project/name``, or ``name2``, ``name3``... if that folder already holds a run."""
    candidate, n = project / name, 2
    while candidate.exists() and any(candidate.iterdir()):
        candidate, n = project / f"{name}{n}", n + 1
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def _resume_checkpoint(model: str | Path, out: str | Path, name: str | None) -> Path:
    """The ``last.pt`` to resume: an explicit ``.pt``, ``out/name``, or the newest under ``out``."""
    if str(model).lower().endswith(".pt") and Path(model).is_file():
        return Path(model).resolve()
    project = Path(out).expanduser().resolve()
    if name is not None:
        ckpt = project / name / "weights" / "last.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
        return ckpt
    found = sorted(project.glob("*/weights/last.pt"), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"nothing to resume: no */weights/last.pt under {project}")
    return found[-1]


def _finish(run_dir, trainer, hooks, family, data_yaml, imgsz, default_conf) -> TrainResult:
    weights = run_dir / "weights"
    best = weights / "best.pt"
    last = weights / "last.pt"
    if not last.exists():
        raise RuntimeError(f"training produced no checkpoint in {weights}")
    if hooks.cancelled:  # trainer.metrics may be the zero placeholders of an unvalidated epoch
        last_epoch = hooks.history[-1] if hooks.history else {}
        metrics = {k: v for k, v in last_epoch.items() if k in _METRIC_KEYS.values()}
    else:
        metrics = _short_metrics(getattr(trainer, "metrics", None))
    diameter = median_diameter(data_yaml)
    for path in (best, last):
        if path.exists():
            write_model_sidecar(
                path,
                family=family,
                imgsz=imgsz,
                diameter_px=diameter,
                default_conf=default_conf,
                metrics=metrics,
            )
    return TrainResult(
        best=best if best.exists() else None,
        last=last,
        metrics=metrics,
        run_dir=run_dir,
        cancelled=hooks.cancelled,
        history=hooks.history,
    )


def write_model_sidecar(
    weights: str | Path,
    family: str,
    imgsz: int,
    diameter_px: float | None = None,
    default_conf: float = 0.25,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write ``<weights>.yolocell.json`` so :func:`napari_yolocell.models.loading.load_detector`
    feeds the model like its training data (percentile-normalised 8-bit, same scale).

    Parameters
    ----------
    weights : str or Path
        Checkpoint (``best.pt`` -> ``best.yolocell.json``).
    family : str
        ``yolov5`` / ``yolov6``.
    imgsz : int
        Training image size.
    diameter_px : float, optional
        Median nucleus diameter of the training set in pixels (unknown: models' default).
    default_conf : float
        Recommended confidence threshold.
    metrics : dict, optional
        Validation metrics to record.

    Returns
    -------
    Path
        The sidecar file.
    """

    weights = Path(weights)
    spec_kwargs: dict[str, Any] = {
        "name": f"{weights.parent.parent.name}/{weights.stem}",
        "family": family,
        "path": weights,
        "normalize": "percentile",
        "percentiles": (1.0, 99.8),
        "imgsz": int(imgsz),
        "default_conf": float(default_conf),
        "metrics": {k: v for k, v in (metrics or {}).items() if math.isfinite(v)},
        "description": f"trained with napari-yolocell from {family} ({weights.name})",
    }
    if diameter_px is not None and math.isfinite(diameter_px):
        spec_kwargs["diameter_px"] = round(float(diameter_px), 2)
    return write_sidecar(weights, ModelSpec(**spec_kwargs))
