"""Which kind of network a weights file holds, and loading it without running its pickle.

Three checkpoint families count nuclei here:

- ``"ultralytics"``: YOLOv5u / YOLOv6 / v8... trained with the ``ultralytics`` package (ours);
- ``"yolov5-classic"``: the ultralytics/yolov5 repository (:mod:`~napari_yolocell.models.classic`);
- ``"yolov6-meituan"``: the meituan/YOLOv6 repository (:mod:`~napari_yolocell.models.meituan`).

Every checkpoint, bundled, trusted or not, is read once as data
(:func:`napari_yolocell.models.safety.read_model_file`) and its network rebuilt by us from a
validated architecture (:mod:`~napari_yolocell.models.netbuild`); ultralytics receives that
network, never the file. An architecture YAML is read with ``yaml.safe_load`` and checked the
same way.
"""

from __future__ import annotations

from pathlib import Path

from napari_yolocell.models import classic, netbuild, pickle_data, safety
from napari_yolocell.models.spec import WeightsError

#: How each family is shown to users.
FAMILY_LABELS = {
    "ultralytics": "YOLOv5u/YOLOv6 (ultralytics)",
    "yolov5-classic": "YOLOv5 (ultralytics/yolov5)",
    "yolov6-meituan": "YOLOv6 (meituan)",
}


def checkpoint_family(path: str | Path) -> str:
    """The family of a ``.pt`` checkpoint, from its model record (read as data).

    Raises
    ------
    WeightsError
        Unreadable file, a checkpoint of another task (segmentation, classification...), or
        no known detection model class in it.
    """
    ckpt = safety.read_model_file(path, trusted=True)
    try:
        return netbuild.family_of(ckpt.root)
    except pickle_data.PickleDataError as err:
        raise WeightsError(f"cannot load model weights {str(path)!r}: {err}") from None


def _is_yaml(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml")


def architecture_yaml(path: str | Path) -> dict:
    """A checked architecture: a YAML file read as data, or one shipped with ultralytics.

    Raises
    ------
    WeightsError
        Unreadable, or outside the schema of :mod:`~napari_yolocell.models.netbuild`.
    """
    path = Path(path)
    try:
        if path.exists() or path.is_symlink() or len(path.parts) > 1:
            return netbuild.read_architecture_yaml(path)
        return netbuild.shipped_architecture(path.name)
    except netbuild.ArchitectureError as err:
        raise WeightsError(str(err)) from None


def network_from_yaml(path: str | Path):
    """An untrained ``ultralytics.YOLO`` of a checked architecture (random weights)."""
    cfg = architecture_yaml(path)
    return netbuild.yolo_from_network(netbuild.untrained_network(cfg))


def load_network(path: str | Path, trusted: bool = False, sha256: str | None = None):
    """Load a checkpoint's network for inference, reading the file once, as data.

    Parameters
    ----------
    path : str or Path
        ``.pt`` checkpoint, or an ultralytics architecture YAML (checked, random weights).
    trusted : bool
        Lift the refusal of unknown globals (the file is still read as data only).
    sha256 : str, optional
        The hash the bytes read must have (bundled weights).

    Returns
    -------
    ultralytics.YOLO or classic.ObjectnessToScores
        A ``YOLO`` around a ``DetectionModel`` we built for ultralytics checkpoints; for classic
        YOLOv5 and meituan YOLOv6 a ``torch.nn.Module`` with ``(N, 4 + nc, anchors)`` output and
        ``names``/``stride``/``family`` attributes.

    Raises
    ------
    UntrustedModelError
        The pickle names a global no supported checkpoint holds (and the file is not trusted).
    WeightsError
        Unreadable file, another task, an architecture outside the schema (one line).
    """
    path = Path(path)
    if _is_yaml(path):
        return network_from_yaml(path)
    ckpt = safety.read_model_file(path, expected_sha256=sha256, trusted=trusted)
    return network_from_checkpoint(ckpt, path)


def network_from_checkpoint(ckpt: pickle_data.Checkpoint, path: str | Path):
    """The network of a checkpoint read as data (see :func:`load_network`)."""
    try:
        family = netbuild.family_of(ckpt.root)
        if family == "ultralytics":
            parts = netbuild.ultralytics_parts(ckpt)
            net = netbuild.build_ultralytics(
                parts["yaml"], parts["state"], parts["bn"], parts["names"]
            )
            return netbuild.yolo_from_network(net, parts["settings"])
        if family == "yolov5-classic":
            net, names, stride = netbuild.classic_network(ckpt)
        else:
            net = netbuild.meituan_network(ckpt)
            nc = int(getattr(net, "nc", 1)) if isinstance(getattr(net, "nc", 1), int) else 1
            names = netbuild.class_names(getattr(net, "names", None), nc)
            stride = int(max(float(s) for s in net.stride))
    except (pickle_data.PickleDataError, netbuild.ArchitectureError) as err:
        raise WeightsError(f"cannot load model weights {str(path)!r}: {err}") from None
    except (ValueError, TypeError, RuntimeError, KeyError, AttributeError, IndexError) as err:
        # a module tree that does not run: one line, naming the file only
        raise WeightsError(
            f"cannot load model weights {str(path)!r}: the network cannot be rebuilt "
            f"({type(err).__name__})"
        ) from None
    wrapped = classic.ObjectnessToScores(net, names, stride)
    wrapped.family = family
    return wrapped.eval()


def network_family(model) -> str:
    """Family of a loaded network (see :data:`FAMILY_LABELS`)."""
    return getattr(model, "family", "ultralytics")
