"""Which kind of network a weights file holds, and loading it without trusting its pickle.

Three checkpoint families count nuclei here:

- ``"ultralytics"``: YOLOv5u / YOLOv6 / v8... trained with the ``ultralytics`` package (ours);
- ``"yolov5-classic"``: the ultralytics/yolov5 repository (:mod:`~napari_yolocell.models.classic`);
- ``"yolov6-meituan"``: the meituan/YOLOv6 repository (:mod:`~napari_yolocell.models.meituan`).

The family is read from the names of the pickle's classes (no object is built for that).
Weights that are bundled (hash-checked) or in the user's trust store load as they always did
(``ultralytics.YOLO``); any other file goes through
:func:`napari_yolocell.models.safety.safe_load` first.
"""

from __future__ import annotations

import threading
from pathlib import Path

from napari_yolocell.models import classic, meituan, safety
from napari_yolocell.models.spec import WeightsError
from napari_yolocell.models.ultralytics_env import import_ultralytics, load_ultralytics

#: How each family is shown to users.
FAMILY_LABELS = {
    "ultralytics": "YOLOv5u/YOLOv6 (ultralytics)",
    "yolov5-classic": "YOLOv5 (ultralytics/yolov5)",
    "yolov6-meituan": "YOLOv6 (meituan)",
}

_OTHER_TASKS = {
    "SegmentationModel": "segmentation",
    "ClassificationModel": "classification",
    "ClassificationModelBase": "classification",
    "PoseModel": "pose",
    "OBBModel": "oriented-box",
    "WorldModel": "open-vocabulary",
    "RTDETRDetectionModel": "RT-DETR",
}


def checkpoint_family(path: str | Path) -> str:
    """The family of a ``.pt`` checkpoint, from its pickle's class names.

    Raises
    ------
    WeightsError
        Unreadable file, a checkpoint of another task (segmentation, classification...), or
        no known detection model class in it.
    """
    names = safety.checkpoint_globals(path)
    classes = {n.rpartition(".")[2]: n for n in names}
    for cls, task in _OTHER_TASKS.items():
        if cls in classes and classes[cls].startswith(("ultralytics.", "models.")):
            raise WeightsError(
                f"{str(path)!r} is a {task} checkpoint, not a detection model: only detection "
                "models can count nuclei"
            )
    if "ultralytics.nn.tasks.DetectionModel" in names:
        return "ultralytics"
    if "models.yolo.DetectionModel" in names or "models.yolo.Model" in names:
        return "yolov5-classic"
    if "yolov6.models.yolo.Model" in names:
        return "yolov6-meituan"
    raise WeightsError(
        f"{str(path)!r} holds no known detection model (ultralytics, yolov5 or meituan YOLOv6 "
        "checkpoint expected)"
    )


_PATCH_LOCK = threading.Lock()


def _yolo_from_checkpoint(path: Path, ckpt: dict):
    """An ``ultralytics.YOLO`` built from an already (safely) loaded checkpoint dict.

    ``YOLO(path)`` itself would ``torch.load`` the file with ``weights_only=False``; its loader
    is pointed at ``ckpt`` for the duration of the call instead.
    """
    import_ultralytics()
    import ultralytics.nn.tasks as tasks

    with _PATCH_LOCK:
        original = tasks.torch_safe_load
        tasks.torch_safe_load = lambda weight, *args, **kwargs: (ckpt, weight)
        try:
            return load_ultralytics(path)
        finally:
            tasks.torch_safe_load = original


def load_network(path: str | Path, trusted: bool = False):
    """Load a checkpoint's network for inference.

    Parameters
    ----------
    path : str or Path
        ``.pt`` checkpoint, or an ultralytics architecture YAML.
    trusted : bool
        The file is bundled (hash-checked) or its hash is in the trust store: an ultralytics
        checkpoint is then loaded as ultralytics does (full unpickling).

    Returns
    -------
    ultralytics.YOLO or classic.ObjectnessToScores
        A ``YOLO`` for ultralytics checkpoints; for classic YOLOv5 and meituan YOLOv6 a
        ``torch.nn.Module`` with ``(N, 4 + nc, anchors)`` output and ``names``/``stride``/
        ``family`` attributes.

    Raises
    ------
    UntrustedModelError
        The pickle references code off the allow-list (and the file is not trusted).
    WeightsError
        Unreadable file, another task, unsupported architecture.
    """
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_ultralytics(path)
    trusted = trusted or safety.is_trusted(safety.file_sha256(path))
    if not trusted:  # before anything else reads the file: a refusal names the global
        safety.check_file(path)
    family = checkpoint_family(path)
    if family == "ultralytics":
        if trusted:
            return load_ultralytics(path)
        return _yolo_from_checkpoint(path, safety.safe_load(path))
    try:
        if family == "yolov5-classic":
            net, names, stride = classic.build(safety.safe_load(path), path)
        else:
            ckpt = safety.safe_load(path, standins=meituan.standins())
            net = meituan.build(ckpt, path)
            names = getattr(net, "names", None) or [str(i) for i in range(int(net.nc))]
            names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else names
            stride = int(max(float(s) for s in net.stride))
    except (safety.UntrustedModelError, WeightsError):
        raise
    except Exception as err:  # an architecture we cannot rebuild: one line naming the file
        raise WeightsError(f"cannot load model weights {str(path)!r}: {err}") from err
    wrapped = classic.ObjectnessToScores(net, {int(k): str(v) for k, v in names.items()}, stride)
    wrapped.family = family
    return wrapped.eval()


def network_family(model) -> str:
    """Family of a loaded network (see :data:`FAMILY_LABELS`)."""
    return getattr(model, "family", "ultralytics")
