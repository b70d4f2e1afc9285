"""Our own networks, built from a validated architecture and a checkpoint read as data.

A checkpoint read by :mod:`~napari_yolocell.models.pickle_data` is inert records. This module
turns one into a runnable network without letting the file choose any code:

- :func:`check_ultralytics_yaml` / :func:`check_classic_yaml`: one schema for an architecture,
  checked at every nesting level: closed lists of top-level keys, layer modules and activation
  strings; layer arguments are numbers, booleans or a few fixed words; bounded layers, repeats,
  channels, scales, kernel sizes; nothing is ever ``eval``-ed. A model YAML given by path goes
  through the same check (:func:`read_architecture_yaml`);
- the parameter count of an ultralytics architecture is taken on PyTorch's ``meta`` device
  (no memory) before the network is built for real (:data:`MAX_PARAMETERS`);
- module trees (meituan YOLOv6) are rebuilt from a closed list of classes, with plain, bounded
  attributes only (:func:`build_tree`);
- tensors come from their storage bytes with their sizes checked (:func:`pickle_data.tensor`).

ultralytics only ever receives a ``DetectionModel`` built here (:func:`yolo_from_network`), never
a path to the user's file, so a later ``predict``, ``train`` or ``val`` cannot re-read it.
"""

from __future__ import annotations

import copy
import math
import re
import threading
from pathlib import Path
from typing import Any

from napari_yolocell.models.pickle_data import (
    Checkpoint,
    PickleDataError,
    Record,
    TensorRef,
    tensor,
)

#: Most parameters of a network we build (the largest released YOLO detector, YOLOv6-x, has
#: 173 M); checked without allocating memory.
MAX_PARAMETERS = 200_000_000
MAX_LAYERS = 64
MAX_REPEATS = 32
MAX_CHANNELS = 4096
MAX_CLASSES = 1000

ULTRALYTICS_ROOT = "ultralytics.nn.tasks.DetectionModel"
CLASSIC_ROOTS = ("models.yolo.DetectionModel", "models.yolo.Model")
MEITUAN_ROOT = "yolov6.models.yolo.Model"

#: Layer modules an ultralytics detection YAML may name (detection heads: ``Detect`` only).
ULTRALYTICS_MODULES = frozenset(
    {
        "Conv",
        "DWConv",
        "GhostConv",
        "Focus",
        "ConvTranspose",
        "Concat",
        "Bottleneck",
        "BottleneckCSP",
        "C1",
        "C2",
        "C2f",
        "C3",
        "C3x",
        "C3k2",
        "C3Ghost",
        "RepC3",
        "SPP",
        "SPPF",
        "SPPELAN",
        "RepNCSPELAN4",
        "ELAN1",
        "ADown",
        "AConv",
        "SCDown",
        "C2fCIB",
        "C2PSA",
        "PSA",
        "A2C2f",
        "Detect",
        "nn.Upsample",
        "nn.ConvTranspose2d",
        "nn.Identity",
    }
)
#: Layer modules of classic yolov5 architectures (:mod:`~napari_yolocell.models.classic`).
CLASSIC_MODULES = frozenset(
    {"Conv", "C3", "Bottleneck", "BottleneckCSP", "Focus", "SPP", "SPPF", "Concat"}
    | {"nn.Upsample", "Detect"}
)
#: The default-activation strings a YAML may set (ultralytics evaluates this exact string).
ACTIVATIONS = frozenset(
    f"{prefix}{act}"
    for prefix in ("nn.", "torch.nn.")
    for act in (
        "SiLU()",
        "ReLU()",
        "ReLU6()",
        "LeakyReLU()",
        "LeakyReLU(0.1)",
        "Hardswish()",
        "Mish()",
        "GELU()",
        "Identity()",
    )
)
#: Words a layer argument may be (ultralytics reads them as variables or literals).
_ARG_WORDS = frozenset({"nc", "anchors", "None", "nearest", "bilinear"})
_YAML_KEYS = frozenset(
    {
        "nc",
        "scales",
        "scale",
        "depth_multiple",
        "width_multiple",
        "max_channels",
        "activation",
        "backbone",
        "head",
        "ch",
        "channels",
        "yaml_file",
        "anchors",
        "reg_max",
        "end2end",
    }
)


class ArchitectureError(ValueError):
    """An architecture outside the schema (the message names the offending part only)."""


# ---------------------------------------------------------------------------------------------
# Architecture schema


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArchitectureError(f"{what} must be a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise ArchitectureError(f"{what} is out of range [{low}, {high}]")
    return value


def _check_from(f: Any, index: int) -> None:
    items = f if isinstance(f, list) else [f]
    if not items or len(items) > 8:
        raise ArchitectureError(f"layer {index}: 'from' must name 1 to 8 layers")
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int) or not -index - 1 <= x < index:
            raise ArchitectureError(f"layer {index}: 'from' must name earlier layers")
    if index == 0 and items != [-1]:
        raise ArchitectureError("layer 0 must take the input (from -1)")


def _check_args(args: Any, index: int) -> None:
    if not isinstance(args, list) or len(args) > 8:
        raise ArchitectureError(f"layer {index}: arguments must be a list of at most 8 values")
    for j, a in enumerate(args):
        if isinstance(a, str):
            if a not in _ARG_WORDS:
                raise ArchitectureError(f"layer {index}: argument {j} is not an allowed word")
        elif isinstance(a, list):  # SPP kernel sizes, anchors
            if len(a) > 16 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in a
            ):
                raise ArchitectureError(f"layer {index}: argument {j} must be a list of numbers")
            for x in a:
                _number(x, f"layer {index} argument {j}", 0, 1024)
        elif a is None or isinstance(a, bool):
            continue
        else:
            high = MAX_CHANNELS if j == 0 else 64
            _number(a, f"layer {index} argument {j}", -1, high)


def _check_layers(layers: Any, modules: frozenset[str]) -> None:
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise ArchitectureError(f"an architecture needs 1 to {MAX_LAYERS} layers")
    for i, layer in enumerate(layers):
        if not (isinstance(layer, list) and len(layer) == 4):
            raise ArchitectureError(f"layer {i} must be [from, repeats, module, args]")
        f, n, m, args = layer
        _check_from(f, i)
        _number(n, f"layer {i} repeats", 1, MAX_REPEATS)
        if isinstance(n, float):
            raise ArchitectureError(f"layer {i} repeats must be an integer")
        if not isinstance(m, str) or m not in modules:
            raise ArchitectureError(f"layer {i}: module is not one of the allowed layer types")
        _check_args(args, i)
    if layers[-1][2] != "Detect":
        raise ArchitectureError("the last layer must be the Detect head")
    if any(layer[2] == "Detect" for layer in layers[:-1]):
        raise ArchitectureError("Detect may only be the last layer")


def _check_common(yaml: Any, modules: frozenset[str]) -> dict:
    if not isinstance(yaml, dict):
        raise ArchitectureError("an architecture must be a mapping")
    unknown = set(yaml) - _YAML_KEYS
    if unknown:
        raise ArchitectureError(f"architecture keys not allowed: {sorted(map(str, unknown))[:3]}")
    _number(yaml.get("nc", 1), "nc", 1, MAX_CLASSES)
    act = yaml.get("activation")
    if act is not None and act not in ACTIVATIONS:
        raise ArchitectureError("the activation is not one of the allowed ones")
    for key in ("depth_multiple", "width_multiple"):
        if key in yaml:
            _number(yaml[key], key, 0.01, 2.0)
    if "max_channels" in yaml:
        _number(yaml["max_channels"], "max_channels", 8, MAX_CHANNELS)
    for key in ("ch", "channels"):
        if key in yaml and yaml[key] not in (1, 3):
            raise ArchitectureError(f"{key} must be 1 or 3")
    if "reg_max" in yaml:
        _number(yaml["reg_max"], "reg_max", 1, 64)
    if "end2end" in yaml and not isinstance(yaml["end2end"], bool):
        raise ArchitectureError("end2end must be true or false")
    if "yaml_file" in yaml and not isinstance(yaml["yaml_file"], str):
        raise ArchitectureError("yaml_file must be text")
    backbone, head = yaml.get("backbone"), yaml.get("head")
    if not isinstance(backbone, list) or not isinstance(head, list):
        raise ArchitectureError("an architecture needs backbone and head lists")
    _check_layers(backbone + head, modules)
    return copy.deepcopy(yaml)


def check_ultralytics_yaml(yaml: Any) -> dict:
    """A checked copy of an ultralytics detection architecture (raises :class:`ArchitectureError`).

    Beyond the schema, its parameters are counted on the ``meta`` device (no memory) and must
    stay under :data:`MAX_PARAMETERS`.
    """
    out = _check_common(yaml, ULTRALYTICS_MODULES)
    scales, scale = out.get("scales"), out.get("scale")
    if scales is not None:
        if not isinstance(scales, dict) or not 1 <= len(scales) <= 8:
            raise ArchitectureError("scales must map up to 8 names to [depth, width, channels]")
        for name, triple in scales.items():
            if not (isinstance(name, str) and isinstance(triple, list) and len(triple) == 3):
                raise ArchitectureError("scales must map names to [depth, width, channels]")
            _number(triple[0], "scale depth", 0.01, 2.0)
            _number(triple[1], "scale width", 0.01, 2.0)
            _number(triple[2], "scale channels", 8, MAX_CHANNELS)
        if scale is not None and scale not in scales:
            raise ArchitectureError("scale names none of the scales")
    elif scale is not None and not isinstance(scale, str):
        raise ArchitectureError("scale must be text")
    if "anchors" in out:
        raise ArchitectureError("anchors belong to classic yolov5 architectures")
    _count_parameters(out)
    return out


_BUILD_LOCK = threading.Lock()


def _count_parameters(yaml: dict) -> int:
    """Parameters of the architecture, built on the ``meta`` device (no memory used)."""
    import torch

    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics.nn.tasks import parse_model

    try:
        with _BUILD_LOCK, torch.device("meta"):
            layers, _ = parse_model(
                copy.deepcopy(yaml), ch=int(yaml.get("channels", 3)), verbose=False
            )
    except ArchitectureError:
        raise
    except Exception as err:  # layer arguments that do not fit the layer
        raise ArchitectureError(f"the layers do not fit together ({type(err).__name__})") from None
    count = sum(p.numel() for p in layers.parameters())
    if count > MAX_PARAMETERS:
        raise ArchitectureError(
            f"{count / 1e6:.0f} M parameters, over the {MAX_PARAMETERS // 1_000_000} M limit"
        )
    return count


def check_classic_yaml(yaml: Any) -> dict:
    """A checked copy of a classic yolov5 architecture (raises :class:`ArchitectureError`)."""
    out = _check_common(yaml, CLASSIC_MODULES)
    for key in ("depth_multiple", "width_multiple"):
        if key not in out:
            raise ArchitectureError(f"a yolov5 architecture needs {key}")
    anchors = out.get("anchors")
    if not (isinstance(anchors, list) and 1 <= len(anchors) <= 5):
        raise ArchitectureError("anchors must be 1 to 5 lists of numbers")
    for level in anchors:
        if not (isinstance(level, list) and 2 <= len(level) <= 20 and len(level) % 2 == 0):
            raise ArchitectureError("anchors must be lists of width, height pairs")
        for x in level:
            _number(x, "anchor", 0, 4096)
    if len({len(level) for level in anchors}) != 1:
        raise ArchitectureError("every anchor level needs the same number of anchors")
    if out.get("activation"):
        raise ArchitectureError("custom activations of yolov5 architectures are not supported")
    return out


def read_architecture_yaml(path: str | Path) -> dict:
    """A model YAML file read as data (``yaml.safe_load``) and checked like any architecture.

    Raises
    ------
    ArchitectureError
        Unreadable, too large, or outside the schema (names the file).
    """
    import yaml as pyyaml

    from napari_yolocell.models.pickle_data import read_bytes

    path = Path(path)
    try:
        text = read_bytes(path, limit=256 * 1024).decode("utf-8")
        data = pyyaml.safe_load(text)
        return check_ultralytics_yaml(data)
    except (ArchitectureError, PickleDataError) as err:
        raise ArchitectureError(f"refusing model architecture {str(path)!r}: {err}") from None
    except (UnicodeDecodeError, pyyaml.YAMLError, RecursionError):
        raise ArchitectureError(
            f"cannot read model architecture {str(path)!r}: not a YAML mapping"
        ) from None


def shipped_architecture(name: str) -> dict:
    """A detection architecture shipped with ultralytics (``"yolov5n.yaml"``), checked.

    Looked up inside the ultralytics package only (never the working directory).
    """
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics.nn.tasks import yaml_model_load
    from ultralytics.utils import ROOT

    stem = Path(name).stem.lower()
    match = re.fullmatch(r"yolov(\d+)([nslmx])", stem)
    if match is None:
        raise ArchitectureError(f"unknown architecture {name!r} (yolov5n ... yolov6x expected)")
    family = f"yolov{match.group(1)}"
    folder = Path(ROOT) / "cfg" / "models" / f"v{match.group(1)}"
    if not (folder / f"{family}.yaml").is_file():
        raise ArchitectureError(f"unknown architecture {name!r}")
    # yaml_model_load maps yolov5n.yaml to yolov5.yaml with scale "n" (an absolute path here)
    return check_ultralytics_yaml(yaml_model_load(str(folder / f"{stem}.yaml")))


def untrained_network(cfg: dict):
    """A ``DetectionModel`` of a checked architecture, with random weights."""
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    cfg = check_ultralytics_yaml(cfg)
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    with _BUILD_LOCK:
        net = DetectionModel(cfg=copy.deepcopy(cfg), ch=int(cfg.get("channels", 3)), verbose=False)
    net.yaml = cfg
    net.args = {}
    return net.float().eval()


# ---------------------------------------------------------------------------------------------
# Module records -> trees, tensors, plain values


#: Most values converted from one record tree: shared sub-lists (a DAG through the memo) would
#: otherwise expand exponentially.
MAX_VALUES = 1_000_000


#: Most module visits in one network (YOLOv5x has ~700 modules).
MAX_MODULES = 50_000


class _Budget:
    """Counts values visited while converting; refuses past ``limit``."""

    def __init__(self, limit: int = MAX_VALUES) -> None:
        self.left = limit

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise PickleDataError("a checkpoint with too many values (shared structures)")


def _plain(value: Any, depth: int = 0, budget: _Budget | None = None) -> Any:
    """Plain JSON-like data of a record-free value; raises PickleDataError on anything else."""
    budget = _Budget() if budget is None else budget
    budget.spend()
    if depth > 32:
        raise PickleDataError("data nested too deeply")
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, depth + 1, budget) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v, depth + 1, budget) for k, v in value.items()}
    raise PickleDataError("a value that is not plain data")


def plain_or_none(value: Any) -> Any:
    """``value`` as plain data, or None if it holds records or tensors (training arguments...)."""
    try:
        return _plain(value)
    except PickleDataError:
        return None


def _module_state(record: Any, depth: int) -> dict:
    if depth > 48:
        raise PickleDataError("modules nested too deeply")
    if not isinstance(record, Record) or not isinstance(record.state, dict) or record.args:
        raise PickleDataError("a network module that is not a plain module record")
    return record.state


def module_tree(record: Any, ckpt: Checkpoint) -> tuple[dict, dict]:
    """A module record as a tree node (the JSON form of :mod:`torch_cache`) and its tensors
    (``{"prefix.name": tensor}``, built from the storage bytes)."""
    tensors: dict = {}
    return _tree(record, ckpt, "", tensors, 0), tensors


def _tree(record: Any, ckpt: Checkpoint, prefix: str, tensors: dict, depth: int, seen=None) -> dict:
    seen = _Budget(MAX_MODULES) if seen is None else seen
    seen.spend()  # shared modules (one SiLU in every Conv) are fine; an exponential DAG is not
    state = _module_state(record, depth)
    node: dict[str, Any] = {
        "type": record.name,
        "attrs": {},
        "params": {},
        "buffers": {},
        "non_persistent": [],
        "children": {},
    }
    for key, value in state.items():
        if not isinstance(key, str) or key.startswith("_") or key == "training":
            continue
        if isinstance(value, TensorRef):
            if _numel(value) <= 4096:  # larger ones are caches (anchors) rebuilt at run time
                node["attrs"][key] = {"tensor_ref": tensor(ckpt, value)}
        else:
            node["attrs"][key] = plain_or_none(value) if not isinstance(value, Record) else None
    for kind, target in (("_parameters", "params"), ("_buffers", "buffers")):
        entries = state.get(kind) or {}
        if not isinstance(entries, dict):
            raise PickleDataError("module tensors that are not a mapping")
        for name, ref in entries.items():
            if not isinstance(name, str) or not (ref is None or isinstance(ref, TensorRef)):
                raise PickleDataError("a module tensor that is not a tensor")
            node[target][name] = None if ref is None else (True if kind == "_parameters" else True)
            if ref is not None:
                tensors[prefix + name] = tensor(ckpt, ref)
    hidden = state.get("_non_persistent_buffers_set") or set()
    node["non_persistent"] = sorted(str(x) for x in hidden) if isinstance(hidden, set) else []
    children = state.get("_modules") or {}
    if not isinstance(children, dict):
        raise PickleDataError("sub-modules that are not a mapping")
    for name, child in children.items():
        if not isinstance(name, str) or not name.isidentifier() and not name.isdigit():
            raise PickleDataError("a sub-module with an invalid name")
        node["children"][name] = (
            None
            if child is None
            else _tree(child, ckpt, f"{prefix}{name}.", tensors, depth + 1, seen)
        )
    return node


def _numel(ref: TensorRef) -> int:
    n = 1
    for s in ref.size:
        n *= s
    return n


def state_dict_of(node: dict, tensors: dict, prefix: str = "") -> dict:
    """The state dict (persistent buffers included, as ``nn.Module.state_dict``) of a tree."""
    out = {}
    for name, present in node["params"].items():
        if present:
            out[prefix + name] = tensors[prefix + name]
    for name, present in node["buffers"].items():
        if present and name not in node["non_persistent"]:
            out[prefix + name] = tensors[prefix + name]
    for name, child in node["children"].items():
        if child is not None:
            out.update(state_dict_of(child, tensors, f"{prefix}{name}."))
    return out


def batchnorm_settings(node: dict, prefix: str = "") -> dict[str, dict[str, float]]:
    """``eps`` / ``momentum`` of every BatchNorm (not in the state dict; yolov5 sets 1e-3)."""
    out = {}
    if node["type"].rpartition(".")[2] == "BatchNorm2d":
        attrs = node["attrs"]
        eps = attrs.get("eps")
        mom = attrs.get("momentum")
        out[prefix.rstrip(".")] = {
            "eps": float(_number(eps, "BatchNorm eps", 1e-12, 1.0)),
            "momentum": None if mom is None else float(_number(mom, "momentum", 0, 1)),
        }
    for name, child in node["children"].items():
        if child is not None:
            out.update(batchnorm_settings(child, f"{prefix}{name}."))
    return out


def apply_batchnorm_settings(net, settings: dict[str, dict[str, float]]) -> None:
    """Give the rebuilt BatchNorms their stored ``eps`` / ``momentum``."""
    from torch import nn

    for name, values in settings.items():
        module = net.get_submodule(name)
        if not isinstance(module, nn.BatchNorm2d):
            raise ArchitectureError("stored BatchNorm settings for a module that is not one")
        eps = values.get("eps")
        module.eps = float(_number(eps, "BatchNorm eps", 1e-12, 1.0))
        mom = values.get("momentum")
        module.momentum = None if mom is None else float(_number(mom, "momentum", 0, 1))


def class_names(value: Any, nc: int) -> dict[int, str]:
    """Class names as ``{int: str}`` (a list or a dict of them); generic names otherwise."""
    if isinstance(value, (list, tuple)):
        value = dict(enumerate(value))
    ok = (
        isinstance(value, dict)
        and 0 < len(value) <= MAX_CLASSES
        and all(isinstance(k, int) and not isinstance(k, bool) for k in value)
        and all(isinstance(v, (str, int)) and len(str(v)) <= 200 for v in value.values())
    )
    if not ok:
        return {i: str(i) for i in range(max(1, min(int(nc), MAX_CLASSES)))}
    return {int(k): str(v) for k, v in value.items()}


#: Settings a checkpoint's ``"yolocell"`` entry may give (others are dropped): name -> check.
_SETTINGS = {
    "name": lambda v: isinstance(v, str) and len(v) <= 200,
    "family": lambda v: isinstance(v, str) and len(v) <= 32,
    "description": lambda v: isinstance(v, str) and len(v) <= 2000,
    "normalize": lambda v: v in ("percentile", "none"),
    "percentiles": lambda v: (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(_finite(x) and 0 <= x <= 100 for x in v)
    ),
    "diameter_px": lambda v: _finite(v) and 0.5 <= v <= 10_000,
    "imgsz": lambda v: isinstance(v, int) and not isinstance(v, bool) and 32 <= v <= 8192,
    "default_conf": lambda v: _finite(v) and 0 <= v <= 1,
    "metrics": lambda v: (
        isinstance(v, dict)
        and len(v) <= 64
        and all(isinstance(k, str) and len(k) <= 64 and _finite(x) for k, x in v.items())
    ),
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def checkpoint_settings(value: Any) -> dict[str, Any] | None:
    """A checkpoint's ``"yolocell"`` settings, only the known keys with valid values."""
    value = plain_or_none(value)
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if k in _SETTINGS and _SETTINGS[k](v)} or None


# ---------------------------------------------------------------------------------------------
# Module trees -> networks (closed class lists)

#: ``torch.nn`` classes a module tree may hold.
TORCH_MODULES = {
    f"torch.nn.modules.{path}": name
    for path, name in (
        ("conv.Conv2d", "Conv2d"),
        ("conv.ConvTranspose2d", "ConvTranspose2d"),
        ("batchnorm.BatchNorm2d", "BatchNorm2d"),
        ("activation.ReLU", "ReLU"),
        ("activation.ReLU6", "ReLU6"),
        ("activation.SiLU", "SiLU"),
        ("activation.Hardswish", "Hardswish"),
        ("activation.LeakyReLU", "LeakyReLU"),
        ("activation.Sigmoid", "Sigmoid"),
        ("linear.Identity", "Identity"),
        ("pooling.MaxPool2d", "MaxPool2d"),
        ("container.Sequential", "Sequential"),
        ("container.ModuleList", "ModuleList"),
        ("upsampling.Upsample", "Upsample"),
    )
}
_SHORT_TORCH = {f"torch.nn.{name}": name for name in TORCH_MODULES.values()}


def torch_module_class(name: str):
    """The ``torch.nn`` class of a closed-list name (full or ``torch.nn.X``), else None."""
    from torch import nn

    short = TORCH_MODULES.get(name) or _SHORT_TORCH.get(name)
    return getattr(nn, short) if short else None


def _check_attr(cls: type, key: str, value: Any, depth: int = 0) -> Any:
    """A module attribute that is plain, bounded and does not hide a method of the class."""
    if not key.isidentifier() or key.startswith("_") or key == "training":
        raise ArchitectureError("a module attribute with a reserved name")
    found = getattr(cls, key, None)
    if found is not None and not isinstance(found, (bool, int, float, str, tuple)):
        raise ArchitectureError("a module attribute that would replace a method")
    return _bounded(value, depth)


def _bounded(value: Any, depth: int = 0) -> Any:
    import torch

    if depth > 4:
        raise ArchitectureError("a module attribute nested too deeply")
    if isinstance(value, torch.Tensor):
        if value.numel() > 4096:
            raise ArchitectureError("a large tensor module attribute")
        return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if abs(value) > 1 << 20:
            raise ArchitectureError("a module attribute out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e6:
            raise ArchitectureError("a module attribute out of range")
        return value
    if isinstance(value, str):
        if len(value) > 64:
            raise ArchitectureError("a module attribute too long")
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > 16:
            raise ArchitectureError("a module attribute too long")
        return type(value)(_bounded(v, depth + 1) for v in value)
    if isinstance(value, dict):
        if len(value) > 16:
            raise ArchitectureError("a module attribute too long")
        return {_bounded(k, depth + 1): _bounded(v, depth + 1) for k, v in value.items()}
    raise ArchitectureError("a module attribute that is not plain data")


def _check_torch_layer(module) -> None:
    """Bounds that keep a forward pass small (up-sampling, pooling, strides)."""
    from torch import nn

    if isinstance(module, nn.Upsample):
        factor = module.__dict__.get("scale_factor")
        factors = factor if isinstance(factor, tuple) else (factor,)
        if module.__dict__.get("size") is not None or not all(
            _finite(f) and 0 < f <= 8 for f in factors
        ):
            raise ArchitectureError("an up-sampling layer beyond x8")
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d)):
        for key in ("stride", "dilation", "kernel_size", "padding"):
            value = module.__dict__.get(key, 1)
            values = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(v, int) and 0 <= v <= 64 for v in values):
                raise ArchitectureError("a convolution or pooling setting out of range")
        if module.__dict__.get("padding_mode", "zeros") != "zeros":
            raise ArchitectureError("a convolution padding mode other than zeros")


def build_tree(
    node: dict, tensors: dict, classes: dict[str, type], prefix: str = "", depth: int = 0
):
    """A module tree (see :func:`module_tree`) as modules of the closed class lists.

    No constructor runs: each module is ``nn.Module.__init__``-ed and given its checked
    attributes, parameters and buffers.
    """
    import torch
    from torch import nn

    if depth > 48:
        raise ArchitectureError("modules nested too deeply")
    cls = classes.get(node["type"]) or torch_module_class(node["type"])
    if cls is None:
        raise ArchitectureError("a module class outside the supported list")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.training = False
    for key, value in node["attrs"].items():
        if isinstance(value, dict) and "tensor_ref" in value:
            value = value["tensor_ref"]
        module.__dict__[key] = _check_attr(cls, key, value)
    for name, grad in node["params"].items():
        if not name.isidentifier():
            raise ArchitectureError("a parameter with an invalid name")
        t = tensors.get(prefix + name) if grad is not None else None
        if grad is not None and not isinstance(t, torch.Tensor):
            raise ArchitectureError("a parameter without its tensor")
        module._parameters[name] = None if t is None else nn.Parameter(t, requires_grad=False)
    for name, present in node["buffers"].items():
        if not name.isidentifier():
            raise ArchitectureError("a buffer with an invalid name")
        t = tensors.get(prefix + name) if present else None
        if present and not isinstance(t, torch.Tensor):
            raise ArchitectureError("a buffer without its tensor")
        module._buffers[name] = t
    module._non_persistent_buffers_set = {str(x) for x in node["non_persistent"]}
    for name, child in node["children"].items():
        module._modules[name] = (
            None
            if child is None
            else build_tree(child, tensors, classes, f"{prefix}{name}.", depth + 1)
        )
    _check_torch_layer(module)
    return module


# ---------------------------------------------------------------------------------------------
# Networks of each family


def family_of(root: Any) -> str:
    """``"ultralytics"``, ``"yolov5-classic"`` or ``"yolov6-meituan"`` from the model record.

    Raises
    ------
    PickleDataError
        No detection model record in the checkpoint (names the kind found, if any).
    """
    model = _model_record(root)
    if model.name == ULTRALYTICS_ROOT:
        return "ultralytics"
    if model.name in CLASSIC_ROOTS:
        return "yolov5-classic"
    if model.name == MEITUAN_ROOT:
        return "yolov6-meituan"
    short = model.name.rpartition(".")[2]
    if short in _OTHER_TASKS:
        raise PickleDataError(
            f"a {_OTHER_TASKS[short]} checkpoint, not a detection model: only detection models "
            "can count nuclei"
        )
    raise PickleDataError(
        "no known detection model (ultralytics, yolov5 or meituan YOLOv6 checkpoint expected)"
    )


_OTHER_TASKS = {
    "SegmentationModel": "segmentation",
    "ClassificationModel": "classification",
    "PoseModel": "pose",
    "OBBModel": "oriented-box",
    "WorldModel": "open-vocabulary",
    "RTDETRDetectionModel": "RT-DETR",
}


def _model_record(root: Any) -> Record:
    if not isinstance(root, dict):
        raise PickleDataError("not a checkpoint dictionary")
    model = root.get("ema") if isinstance(root.get("ema"), Record) else root.get("model")
    if not isinstance(model, Record):
        raise PickleDataError(
            "no known detection model (ultralytics, yolov5 or meituan YOLOv6 checkpoint expected)"
        )
    return model


def build_ultralytics(yaml: Any, state: dict, bn: dict, names: Any):
    """A ``DetectionModel`` of a checked architecture with the given weights (float32, eval)."""
    import torch

    from napari_yolocell.models.ultralytics_env import import_ultralytics

    cfg = check_ultralytics_yaml(yaml)
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    with _BUILD_LOCK:
        net = DetectionModel(cfg=copy.deepcopy(cfg), ch=int(cfg.get("channels", 3)), verbose=False)
    net.yaml = cfg
    try:
        net.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True
        )
    except RuntimeError:
        raise ArchitectureError("the weights do not fit the architecture") from None
    apply_batchnorm_settings(net, bn)
    net.names = class_names(names, int(cfg.get("nc", 1)))
    net.args = {}
    net.stride = net.stride.to(torch.float32)
    return net.float().eval()


def ultralytics_parts(ckpt: Checkpoint) -> dict[str, Any]:
    """Architecture, weights and settings of an ultralytics checkpoint read as data."""
    model = _model_record(ckpt.root)
    node, tensors = module_tree(model, ckpt)
    return {
        "yaml": plain_or_none(model.state.get("yaml")),
        "state": state_dict_of(node, tensors),
        "bn": batchnorm_settings(node),
        "names": plain_or_none(model.state.get("names")),
        "settings": checkpoint_settings(ckpt.root.get("yolocell")),
    }


def classic_network(ckpt: Checkpoint):
    """(network, names, stride) of a classic yolov5 checkpoint read as data."""
    import torch

    from napari_yolocell.models import classic

    model = _model_record(ckpt.root)
    if model.name != "models.yolo.DetectionModel":
        raise PickleDataError("a yolov5 model that is not a detection model")
    cfg = check_classic_yaml(plain_or_none(model.state.get("yaml")))
    node, tensors = module_tree(model, ckpt)
    with _BUILD_LOCK:
        net = classic.ClassicYolov5(cfg)
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in state_dict_of(node, tensors).items()
    }
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ArchitectureError("the weights do not fit the stored architecture") from None
    apply_batchnorm_settings(net, batchnorm_settings(node))
    stride = node["attrs"].get("stride")
    stride = stride.get("tensor_ref") if isinstance(stride, dict) else None
    head = net.model[-1]
    if not (
        isinstance(stride, torch.Tensor)
        and stride.shape == (head.nl,)
        and bool(((stride >= 1) & (stride <= 128)).all())
    ):
        raise ArchitectureError("the model's strides are missing or out of range")
    head.stride = stride.float().clone()
    names = class_names(plain_or_none(model.state.get("names")), head.nc)
    return net.eval(), names, int(head.stride.max())


def meituan_network(ckpt: Checkpoint):
    """The network of a meituan YOLOv6 checkpoint read as data (closed class list)."""
    from napari_yolocell.models import meituan

    model = _model_record(ckpt.root)
    node, tensors = module_tree(model, ckpt)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    for child in _walk(node):
        for key, value in child["attrs"].items():
            if isinstance(value, dict) and "tensor_ref" in value:
                child["attrs"][key] = {"tensor_ref": value["tensor_ref"].float()}
    net = build_tree(node, tensors, meituan.standins())
    return meituan.build({"model": net}, "checkpoint")


def _walk(node: dict):
    yield node
    for child in node["children"].values():
        if child is not None:
            yield from _walk(child)


_PATCH_LOCK = threading.Lock()


def yolo_from_network(net, settings: dict | None = None, train_args: dict | None = None):
    """An ``ultralytics.YOLO`` around a ``DetectionModel`` we built; no file is read.

    ``YOLO(name)`` loads through ``ultralytics.nn.tasks.torch_safe_load``; for this call it
    returns our checkpoint dict instead, under a name that is no file.
    """
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    ultralytics = import_ultralytics()
    import ultralytics.nn.tasks as tasks

    ckpt: dict[str, Any] = {"model": net, "train_args": dict(train_args or {})}
    if settings:
        ckpt["yolocell"] = settings
    with _PATCH_LOCK:
        original = tasks.torch_safe_load
        tasks.torch_safe_load = lambda weight, *args, **kwargs: (ckpt, weight)
        try:
            yolo = ultralytics.YOLO("yolocell-built-network.pt", task="detect")
        finally:
            tasks.torch_safe_load = original
    yolo.ckpt = ckpt
    return yolo


# ---------------------------------------------------------------------------------------------
# Resuming a training run: a checkpoint of ours, rebuilt from the user's as data

#: Training arguments never taken from a checkpoint: files to read, folders to write, models.
_PATH_ARGS = frozenset(
    {
        "model",
        "data",
        "cfg",
        "tracker",
        "source",
        "project",
        "name",
        "save_dir",
        "resume",
        "pretrained",
        "distill_model",
        "augmentations",
        "device",
    }
)
_STOPPER_KEYS = frozenset({"best_fitness", "best_epoch", "patience", "possible_stop"})


def _with_tensors(value: Any, ckpt: Checkpoint, depth: int = 0, budget=None) -> Any:
    """Plain data in which tensor references become tensors; records are refused."""
    budget = _Budget() if budget is None else budget
    budget.spend()
    if depth > 16:
        raise PickleDataError("training state nested too deeply")
    if isinstance(value, TensorRef):
        return tensor(ckpt, value)
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_with_tensors(v, ckpt, depth + 1, budget) for v in value)
    if isinstance(value, dict):
        return {k: _with_tensors(v, ckpt, depth + 1, budget) for k, v in value.items()}
    raise PickleDataError("training state that is not plain data")


def training_arguments(value: Any) -> dict[str, Any]:
    """A checkpoint's ``train_args`` reduced to known ultralytics settings with plain values."""
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics.cfg import DEFAULT_CFG_DICT

    value = plain_or_none(value)
    if not isinstance(value, dict):
        return {}
    out = {}
    for key, item in value.items():
        if key not in DEFAULT_CFG_DICT or key in _PATH_ARGS:
            continue
        default = DEFAULT_CFG_DICT[key]
        same = (
            default is None
            or isinstance(item, type(default))
            or (isinstance(default, float) and isinstance(item, int))
        )
        if (
            same
            and (not isinstance(item, str) or len(item) <= 64)
            and not isinstance(item, (dict, list))
        ):
            out[key] = item
    return out


def resume_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """What ultralytics needs to resume, rebuilt from a checkpoint read as data.

    The network is ours (checked architecture, weights from the storage bytes); the optimizer,
    scaler and early-stopping state are plain numbers and tensors; training arguments are
    :func:`training_arguments`.

    Raises
    ------
    PickleDataError, ArchitectureError
        Not an ultralytics training checkpoint that can be resumed.
    """
    if family_of(ckpt.root) != "ultralytics":
        raise PickleDataError("only ultralytics training checkpoints can be resumed")
    root = ckpt.root
    parts = ultralytics_parts(ckpt)
    net = build_ultralytics(parts["yaml"], parts["state"], parts["bn"], parts["names"])
    args = training_arguments(root.get("train_args"))
    net.args = args
    epoch, updates = root.get("epoch"), root.get("updates")
    if not (isinstance(epoch, int) and 0 <= epoch < 100_000):
        raise PickleDataError("a checkpoint without a valid epoch")
    optimizer = _with_tensors(root.get("optimizer"), ckpt)
    if not (isinstance(optimizer, dict) and set(optimizer) <= {"state", "param_groups"}):
        raise PickleDataError("a checkpoint without a resumable optimizer state")
    scaler = _with_tensors(root.get("scaler"), ckpt) if root.get("scaler") else None
    stopper = plain_or_none(root.get("stopper")) or {}
    best = root.get("best_fitness")
    return {
        "epoch": epoch,
        "best_fitness": float(best) if _finite(best) else None,
        "model": None,
        "ema": net.half(),
        "updates": updates if isinstance(updates, int) else 0,
        "optimizer": optimizer,
        "scaler": scaler if isinstance(scaler, dict) else None,
        "stopper": {k: v for k, v in stopper.items() if k in _STOPPER_KEYS and _finite(v)}
        if isinstance(stopper, dict)
        else {},
        "train_args": args,
        "yolocell": parts["settings"],
    }
