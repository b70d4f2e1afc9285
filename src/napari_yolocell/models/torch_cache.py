"""The pickle-free form of a checkpoint: made once, loaded on every later run (issue #14).

A ``.pt`` checkpoint is a pickle. The first time a checkpoint that is not bundled is loaded
for PyTorch (through :func:`napari_yolocell.models.safety.safe_load`, or fully when the user
trusts it), its network is converted into ``<cache>/<SHA-256 of the .pt>/torch-v1/``:

- ``weights.safetensors``: every parameter and buffer (raw tensors; nothing in it can run);
- ``model.json``: the family, the architecture (the ultralytics model YAML, the classic YOLOv5
  YAML, or for meituan YOLOv6 the module tree, whose classes come from a fixed allow-list),
  class names, stride, the checkpoint's ``"yolocell"`` settings and training arguments, the
  SHA-256 of ``weights.safetensors`` and of the JSON body itself.

Later loads rebuild the network from the JSON and read the weights with
``safetensors.torch.load_file``: the ``.pt`` is hashed (to find its entry), never unpickled
again. An entry is written to a temporary folder and renamed into place (``os.replace``) only
after the rebuilt network has given the same output as the loaded one; an entry that fails its
hashes or cannot be rebuilt is deleted and made again from the checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from napari_yolocell.models import classic, meituan
from napari_yolocell.models.checkpoints import _yolo_from_checkpoint, load_network, network_family
from napari_yolocell.models.integrity import file_sha256
from napari_yolocell.models.ultralytics_env import import_ultralytics
from napari_yolocell.models.user_cache import cache_root, weights_sha256

#: Bump when the stored form changes: older entries are then ignored.
CACHE_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"
_FORMAT = "napari-yolocell pickle-free network"
_SCALARS = (bool, int, float, str, type(None))
#: Largest tensor kept in the JSON (attributes such as strides; weights go to safetensors).
_MAX_JSON_TENSOR = 4096


class CacheEntryError(ValueError):
    """A cache entry that is damaged, stale or does not rebuild the network it describes."""


def cache_dir(key: str, root: Path | None = None) -> Path:
    """Folder of the pickle-free form of the weights whose SHA-256 is ``key``."""
    return (root or cache_root()) / key / f"torch-v{CACHE_VERSION}"


def load_network_cached(path: str | Path, trusted: bool = False, root: Path | None = None):
    """:func:`~napari_yolocell.models.checkpoints.load_network` through the pickle-free cache.

    Parameters
    ----------
    path : str or Path
        ``.pt`` checkpoint (an architecture YAML is passed to ``load_network`` as it is).
    trusted : bool
        Passed to ``load_network`` when the checkpoint itself must be read.
    root : pathlib.Path, optional
        Cache folder (default :func:`~napari_yolocell.models.user_cache.cache_root`).

    Returns
    -------
    ultralytics.YOLO or classic.ObjectnessToScores
        What ``load_network`` returns, rebuilt from the cache when an entry exists.

    Raises
    ------
    UntrustedModelError, WeightsError
        As ``load_network``, when the checkpoint has to be read.
    """
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_network(path)
    key = weights_sha256(path)
    folder = cache_dir(key, root)
    if folder.is_dir():
        try:
            return rebuild(folder, path, key)
        except Exception as err:  # damaged or stale entry: never used, made again below
            warnings.warn(
                f"ignoring the damaged cached form of {str(path)!r} ({err}); rebuilding it",
                RuntimeWarning,
                stacklevel=2,
            )
            shutil.rmtree(folder, ignore_errors=True)
    model = load_network(path, trusted=trusted)
    try:
        store(model, folder, key, path)
    except Exception as err:  # an architecture we cannot describe: load from the .pt each time
        warnings.warn(
            f"cannot cache {str(path)!r} in a pickle-free form ({type(err).__name__}: {err}); "
            "it is read from the checkpoint at every load",
            RuntimeWarning,
            stacklevel=2,
        )
    return model


def store(model, folder: Path, key: str, path: str | Path) -> Path:
    """Write the pickle-free form of a loaded network to ``folder``, atomically.

    The entry is renamed into place only after the network rebuilt from it gives the same
    raw output as ``model``.

    Raises
    ------
    ValueError
        The network holds something this cache cannot describe, or the rebuilt network
        differs from ``model``.
    """
    import torch
    from safetensors.torch import save_file

    body, tensors = describe(model)
    body["source_sha256"] = key
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by all
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        body["files"] = {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)}
        _write_json(tmp / MODEL_FILE, body)
        again = rebuild(tmp, path, key)
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        expected, got = _raw_output(model, x), _raw_output(again, x)
        if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
            raise ValueError("the network rebuilt from its cached form gives other outputs")
        if folder.is_dir():  # a damaged entry left behind
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # else another process stored the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def describe(model) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON body and the tensors of a loaded network (see the module docstring).

    Raises
    ------
    ValueError
        A network this cache cannot describe (custom classes, large non-weight tensors...).
    """
    family = network_family(model)
    body: dict[str, Any] = {"format": _FORMAT, "version": CACHE_VERSION, "family": family}
    if family == "ultralytics":
        net = model.model
        if f"{type(net).__module__}.{type(net).__qualname__}" != (
            "ultralytics.nn.tasks.DetectionModel"
        ):
            raise ValueError(f"{type(net).__qualname__} networks are not cached")
        ckpt = model.ckpt if isinstance(getattr(model, "ckpt", None), dict) else {}
        settings = ckpt.get("yolocell")
        body["architecture"] = {"yaml": _json_plain(net.yaml)}
        body["modules"] = _module_scalars(net)
        body["train_args"] = json.loads(json.dumps(ckpt.get("train_args") or {}, default=str))
        body["yolocell"] = _json_plain(settings) if isinstance(settings, dict) else None
        body["names"] = _encode(dict(net.names))
        body["stride"] = [float(s) for s in net.stride.tolist()]
        tensors = net.state_dict()
    else:
        net = model.net
        body["names"] = _encode(dict(model.names))
        body["stride"] = [float(s) for s in model.stride.tolist()]
        body["yolocell"] = None
        if family == "yolov5-classic":
            body["architecture"] = {"yaml": _json_plain(net.yaml)}
            body["modules"] = _module_scalars(net)
            body["head_stride"] = [float(s) for s in net.model[-1].stride.tolist()]
            tensors = net.state_dict()
        else:
            tensors = {}
            body["architecture"] = {"tree": _tree(net, "", tensors)}
    body["tensors"] = sorted(tensors)
    return body, {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def rebuild(folder: Path, path: str | Path, key: str):
    """The network stored in ``folder``, as :func:`load_network` would return it.

    Raises
    ------
    CacheEntryError
        Missing or damaged files (hash mismatch, bad JSON), an entry for other weights, or an
        architecture that does not take the stored weights.
    """
    from safetensors.torch import load_file

    try:
        text = (folder / MODEL_FILE).read_text(encoding="utf-8")
        body = json.loads(text)
    except (OSError, ValueError) as err:
        raise CacheEntryError(f"unreadable {MODEL_FILE}: {err}") from err
    if not isinstance(body, dict) or body.get("body_sha256") != _body_sha256(body):
        raise CacheEntryError(f"{MODEL_FILE} does not match its hash")
    if body.get("format") != _FORMAT or body.get("version") != CACHE_VERSION:
        raise CacheEntryError("written by another version")
    if body.get("source_sha256") != key:
        raise CacheEntryError("the entry belongs to other weights")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or file_sha256(weights) != body["files"][WEIGHTS_FILE]:
        raise CacheEntryError(f"{WEIGHTS_FILE} is missing or does not match its hash")
    tensors = load_file(str(weights))
    if sorted(tensors) != body["tensors"]:
        raise CacheEntryError("the stored tensors are not the ones listed")
    try:
        return _REBUILDERS[body["family"]](body, tensors, Path(path))
    except CacheEntryError:
        raise
    except Exception as err:  # any mismatch between architecture and weights
        raise CacheEntryError(f"{type(err).__name__}: {err}") from err


def _rebuild_ultralytics(body: dict, tensors: dict, path: Path):
    import torch

    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    yaml = copy.deepcopy(body["architecture"]["yaml"])
    check_ultralytics_yaml(yaml)
    net = DetectionModel(
        cfg=yaml, ch=int(yaml.get("channels", 3)), nc=yaml.get("nc"), verbose=False
    )
    net.load_state_dict(tensors, strict=True)
    _restore_scalars(net, body["modules"])
    net.names = _decode(body["names"])
    net.stride = torch.tensor(body["stride"])
    ckpt = {"model": net, "train_args": body["train_args"]}
    if body.get("yolocell") is not None:
        ckpt["yolocell"] = body["yolocell"]
    return _yolo_from_checkpoint(path, ckpt)


#: Activations an ultralytics model YAML may set: ultralytics ``eval``s this string.
_ACTIVATIONS = frozenset(
    {
        "nn.SiLU()",
        "nn.ReLU()",
        "nn.ReLU6()",
        "nn.LeakyReLU()",
        "nn.LeakyReLU(0.1)",
        "nn.Hardswish()",
        "nn.Mish()",
        "nn.GELU()",
        "nn.Identity()",
    }
)


def check_ultralytics_yaml(yaml: dict) -> None:
    """Refuse a model YAML that would make ultralytics run anything but its layer classes.

    The YAML comes from the checkpoint (untrusted data): ultralytics' ``parse_model``
    ``eval``s its ``activation`` and looks each layer's name up in its own module namespace,
    which also holds functions (``torch_safe_load``...). Only known activations and
    ``torch.nn`` / ultralytics ``nn.Module`` classes pass.

    Raises
    ------
    ValueError
        Names what is refused.
    """
    import torch

    import_ultralytics()
    import ultralytics.nn.tasks as tasks

    act = yaml.get("activation")
    if act is not None and act not in _ACTIVATIONS:
        raise ValueError(f"model YAML activation {act!r} is not allowed")
    layers = yaml.get("backbone", []) + yaml.get("head", [])
    if not layers or not all(isinstance(x, list) and len(x) == 4 for x in layers):
        raise ValueError("model YAML layers must be [from, number, module, args] lists")
    for _, _, name, _ in layers:
        if not isinstance(name, str):
            raise ValueError(f"model YAML module {name!r} is not a name")
        if name.startswith("nn."):
            cls = getattr(torch.nn, name[3:], None)
        else:
            cls = vars(tasks).get(name)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ValueError(f"model YAML module {name!r} is not a network layer class")


def _rebuild_classic(body: dict, tensors: dict, path: Path):
    import torch

    net = classic.ClassicYolov5(copy.deepcopy(body["architecture"]["yaml"]))
    net.load_state_dict(tensors, strict=True)
    _restore_scalars(net, body["modules"])
    net.model[-1].stride = torch.tensor(body["head_stride"])
    return _wrap(net.eval(), body)


def _rebuild_meituan(body: dict, tensors: dict, path: Path):
    classes = {name: cls for name, cls in meituan.standins().items()}
    net = _build_tree(body["architecture"]["tree"], "", tensors, classes)
    return _wrap(net.eval(), body)


_REBUILDERS = {
    "ultralytics": _rebuild_ultralytics,
    "yolov5-classic": _rebuild_classic,
    "yolov6-meituan": _rebuild_meituan,
}


def _wrap(net, body: dict):
    names = {int(k): str(v) for k, v in _decode(body["names"]).items()}
    wrapped = classic.ObjectnessToScores(net, names, int(max(body["stride"])))
    wrapped.family = body["family"]
    return wrapped.eval()


def _raw_output(model, x):
    import torch

    net = getattr(model, "model", model) if network_family(model) == "ultralytics" else model
    with torch.inference_mode():
        out = net(x)
    return (out[0] if isinstance(out, (list, tuple)) else out).float()


def _body_sha256(body: dict) -> str:
    rest = {k: v for k, v in body.items() if k != "body_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _write_json(target: Path, body: dict) -> None:
    body["body_sha256"] = _body_sha256(body)
    target.write_text(json.dumps(body, sort_keys=True), encoding="utf-8")


def _json_plain(value: Any) -> Any:
    """``value`` as plain JSON data (a YAML dict); raises ValueError if it is not."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"not JSON data: {err}") from err


def _class_name(module) -> str:
    cls = type(module)
    return getattr(cls, "origin", None) or f"{cls.__module__}.{cls.__qualname__}"


def _module_scalars(net) -> dict[str, dict[str, Any]]:
    """Per module: its class and its plain settings (BatchNorm eps, head sizes...)."""
    out = {}
    for name, module in net.named_modules():
        attrs = {
            k: v
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, _SCALARS)
        }
        out[name] = {"type": _class_name(module), "attrs": attrs}
    return out


def _restore_scalars(net, modules: dict[str, dict[str, Any]]) -> None:
    """Check the rebuilt modules are the stored ones and give them the stored settings."""
    rebuilt = dict(net.named_modules())
    if set(rebuilt) != set(modules):
        raise CacheEntryError("the rebuilt network has other modules than the stored one")
    for name, entry in modules.items():
        module = rebuilt[name]
        if _class_name(module) != entry["type"]:
            raise CacheEntryError(
                f"module {name!r} is a {_class_name(module)}, not {entry['type']}"
            )
        for attr, value in entry["attrs"].items():
            if isinstance(vars(module).get(attr, ()), _SCALARS):
                module.__dict__[attr] = value


def _torch_nn_class(name: str):
    import torch

    cls = getattr(torch.nn, name.removeprefix("torch.nn."), None)
    if (
        name.startswith("torch.nn.")
        and isinstance(cls, type)
        and issubclass(cls, torch.nn.Module)
        and cls.__module__.startswith("torch.nn.modules.")
    ):
        return cls
    return None


def _tree(module, prefix: str, tensors: dict) -> dict[str, Any]:
    """A module, its settings and its children, as JSON; its tensors go to ``tensors``."""
    import torch

    cls = type(module)
    origin = getattr(cls, "origin", None)
    if origin in meituan.standins():
        kind = origin
    elif _torch_nn_class(f"torch.nn.{cls.__name__}") is cls:
        kind = f"torch.nn.{cls.__name__}"
    else:
        raise ValueError(f"module class {cls.__qualname__} cannot be cached")
    node: dict[str, Any] = {
        "type": kind,
        "attrs": {
            k: _encode(v)
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training"
        },
        "params": {},
        "buffers": {},
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": {},
    }
    for name, param in module._parameters.items():
        node["params"][name] = None if param is None else bool(param.requires_grad)
        if param is not None:
            tensors[prefix + name] = param
    for name, buf in module._buffers.items():
        node["buffers"][name] = buf is not None
        if isinstance(buf, torch.Tensor):
            tensors[prefix + name] = buf
    for name, child in module._modules.items():
        node["children"][name] = (
            None if child is None else _tree(child, f"{prefix}{name}.", tensors)
        )
    return node


def _build_tree(node: dict, prefix: str, tensors: dict, classes: dict[str, type]):
    """Inverse of :func:`_tree`: only allow-listed classes, no constructor runs."""
    from torch import nn

    cls = classes.get(node["type"]) or _torch_nn_class(node["type"])
    if cls is None:
        raise CacheEntryError(f"module class {node['type']!r} is not allowed")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.training = False
    for key, value in node["attrs"].items():
        if key.startswith("_") or key == "training":
            raise CacheEntryError(f"attribute {key!r} cannot be set")
        module.__dict__[key] = _decode(value)
    for name, grad in node["params"].items():
        module._parameters[name] = (
            None if grad is None else nn.Parameter(tensors[prefix + name], requires_grad=grad)
        )
    for name, present in node["buffers"].items():
        module._buffers[name] = tensors[prefix + name] if present else None
    module._non_persistent_buffers_set = set(node["non_persistent"])
    for name, child in node["children"].items():
        module._modules[name] = (
            None if child is None else _build_tree(child, f"{prefix}{name}.", tensors, classes)
        )
    return module


def _encode(value: Any) -> Any:
    """A module attribute as JSON, keeping tuples, dicts with any keys and small tensors."""
    import torch

    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        if value.numel() > _MAX_JSON_TENSOR:
            raise ValueError(f"a {tuple(value.shape)} tensor attribute is too large to cache")
        dtype = str(value.dtype).removeprefix("torch.")
        return {"tensor": value.detach().cpu().tolist(), "dtype": dtype}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise ValueError(f"a {type(value).__name__} attribute cannot be cached")


def _decode(value: Any) -> Any:
    import torch

    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        dtype = getattr(torch, str(value["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CacheEntryError(f"unknown tensor type {value['dtype']!r}")
        return torch.tensor(value["tensor"], dtype=dtype)
    if "size" in value:
        return torch.Size(value["size"])
    if "tuple" in value:
        return tuple(_decode(v) for v in value["tuple"])
    if "dict" in value:
        return {_decode(k): _decode(v) for k, v in value["dict"]}
    raise CacheEntryError(f"unknown attribute encoding {sorted(value)}")
