"""The pickle-free form of a checkpoint: made once, loaded on every later run (issues #14, #21).

A ``.pt`` checkpoint is a pickle. The first time a checkpoint that is not bundled is loaded
for PyTorch, it is read as data (:func:`napari_yolocell.models.safety.read_model_file`), its
network rebuilt by us (:mod:`~napari_yolocell.models.netbuild`), and converted into
``<cache>/<SHA-256 of the .pt>/torch-v1/``:

- ``weights.safetensors``: every parameter and buffer (raw tensors; nothing in it can run);
- ``model.json``: the family, the architecture (the ultralytics model YAML, the classic YOLOv5
  YAML, or for meituan YOLOv6 the module tree, whose classes come from a fixed allow-list),
  class names, stride, the checkpoint's ``"yolocell"`` settings and training arguments, the
  SHA-256 of ``weights.safetensors`` and of the JSON body itself.

Later loads rebuild the network from the JSON (the architecture checked again, by the same
schema) and read the weights with ``safetensors.torch.load_file``: the ``.pt`` is hashed (to
find its entry), never parsed again. Every entry is signed with the user's secret key
(:func:`~napari_yolocell.models.user_cache.sign_folder`); one that fails its signature (planted,
edited, copied from someone else) or cannot be rebuilt is deleted and made again from the
checkpoint. An entry is written to a private temporary folder and renamed into place
(``os.replace``) only after the rebuilt network has given the same output as the loaded one.
The network handed on is always the one rebuilt from the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from napari_yolocell.models import classic, meituan, netbuild, pickle_data, safety
from napari_yolocell.models.checkpoints import load_network, network_family, network_from_checkpoint
from napari_yolocell.models.integrity import file_sha256
from napari_yolocell.models.spec import WeightsError
from napari_yolocell.models.user_cache import (
    cache_root,
    entry_tempdir,
    sign_folder,
    verify_folder,
)

#: Bump when the stored form changes: older entries are then ignored.
CACHE_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"
_FORMAT = "napari-yolocell pickle-free network"
#: Largest model.json read (architectures and module trees are a few hundred KB at most).
_MAX_JSON_BYTES = 8 * 1024 * 1024


class CacheEntryError(ValueError):
    """A cache entry that is damaged, stale, not ours, or does not rebuild its network."""


def cache_dir(key: str, root: Path | None = None) -> Path:
    """Folder of the pickle-free form of the weights whose SHA-256 is ``key``."""
    return (root or cache_root()) / key / f"torch-v{CACHE_VERSION}"


def _purpose(key: str) -> str:
    return f"torch-v{CACHE_VERSION}:{key}"


def load_network_cached(
    path: str | Path, trusted: bool = False, root: Path | None = None, sha256: str | None = None
):
    """:func:`~napari_yolocell.models.checkpoints.load_network` through the pickle-free cache.

    Parameters
    ----------
    path : str or Path
        ``.pt`` checkpoint (an architecture YAML is passed to ``load_network`` as it is).
    trusted : bool
        Lift the refusal of unknown globals when the checkpoint itself must be read.
    root : pathlib.Path, optional
        Cache folder (default :func:`~napari_yolocell.models.user_cache.cache_root`).
    sha256 : str, optional
        The hash the file's bytes must have.

    Returns
    -------
    ultralytics.YOLO or classic.ObjectnessToScores
        The network rebuilt from the (signed) cache entry.

    Raises
    ------
    UntrustedModelError, WeightsError
        As ``load_network``, when the checkpoint has to be read.
    """
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_network(path)
    try:
        data = pickle_data.read_bytes(path)  # read once: hashed and parsed from these bytes
    except pickle_data.PickleDataError as err:
        raise WeightsError(f"cannot read model weights {str(path)!r}: {err}") from None
    key = hashlib.sha256(data).hexdigest()
    if sha256 and key != sha256.lower():
        raise WeightsError(f"SHA-256 mismatch for model weights {str(path)!r}; it was not loaded")
    folder = cache_dir(key, root)
    if folder.exists() or folder.is_symlink():
        try:
            return rebuild(folder, path, key)
        except Exception as err:  # damaged, planted or stale entry: never used, made again
            warnings.warn(
                f"ignoring the damaged cached form of {str(path)!r} ({_short(err)}); rebuilding it",
                RuntimeWarning,
                stacklevel=2,
            )
            _remove(folder)
    ckpt = safety.read_model_file(path, data=data, trusted=trusted)
    model = network_from_checkpoint(ckpt, path)
    del ckpt, data
    try:
        return store(model, folder, key, path)
    except Exception as err:  # an architecture we cannot describe: rebuilt from the .pt each time
        warnings.warn(
            f"cannot cache {str(path)!r} in a pickle-free form ({_short(err)}); "
            "it is read from the checkpoint at every load",
            RuntimeWarning,
            stacklevel=2,
        )
    return model


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:200]}"


def _remove(folder: Path) -> None:
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def store(model, folder: Path, key: str, path: str | Path):
    """Write the signed pickle-free form of a network to ``folder``; return it rebuilt from there.

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
    tmp = entry_tempdir(folder)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        body["files"] = {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)}
        _write_json(tmp / MODEL_FILE, body)
        sign_folder(tmp, _purpose(key))
        again = rebuild(tmp, path, key)
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        expected, got = _raw_output(model, x), _raw_output(again, x)
        if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
            raise ValueError("the network rebuilt from its cached form gives other outputs")
        if folder.exists() or folder.is_symlink():  # a damaged entry left behind
            _remove(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # else another process stored the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return again


def describe(model) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON body and the tensors of a network we built (see the module docstring).

    Raises
    ------
    ValueError
        A network this cache cannot describe.
    """
    family = network_family(model)
    body: dict[str, Any] = {"format": _FORMAT, "version": CACHE_VERSION, "family": family}
    if family == "ultralytics":
        net = model.model
        ckpt = model.ckpt if isinstance(getattr(model, "ckpt", None), dict) else {}
        body["architecture"] = {"yaml": _json_plain(net.yaml)}
        body["batchnorm"] = _batchnorm(net)
        body["yolocell"] = netbuild.checkpoint_settings(ckpt.get("yolocell"))
        body["names"] = {str(k): str(v) for k, v in dict(net.names).items()}
        tensors = net.state_dict()
    else:
        net = model.net
        body["names"] = {str(k): str(v) for k, v in dict(model.names).items()}
        body["stride"] = [float(s) for s in model.stride.tolist()]
        if family == "yolov5-classic":
            body["architecture"] = {"yaml": _json_plain(net.yaml)}
            body["batchnorm"] = _batchnorm(net)
            body["head_stride"] = [float(s) for s in net.model[-1].stride.tolist()]
            tensors = net.state_dict()
        else:
            tensors = {}
            body["architecture"] = {"tree": _tree(net, "", tensors)}
    body["tensors"] = sorted(tensors)
    return body, {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _batchnorm(net) -> dict[str, dict[str, float | None]]:
    from torch import nn

    return {
        name: {"eps": float(m.eps), "momentum": None if m.momentum is None else float(m.momentum)}
        for name, m in net.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }


def rebuild(folder: Path, path: str | Path, key: str):
    """The network stored in ``folder``, as :func:`load_network` would return it.

    Raises
    ------
    CacheEntryError
        Not signed by this user for these weights, missing or damaged files, or an
        architecture outside the schema or that does not take the stored weights.
    """
    from safetensors.torch import load_file

    if not verify_folder(folder, _purpose(key)):
        raise CacheEntryError("not signed by this user's cache key (planted or edited)")
    try:
        raw = pickle_data.read_bytes(folder / MODEL_FILE, limit=_MAX_JSON_BYTES)
        body = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as err:
        raise CacheEntryError(f"unreadable {MODEL_FILE}: {type(err).__name__}") from None
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
    rebuilder = _REBUILDERS.get(body.get("family"))
    if rebuilder is None:
        raise CacheEntryError("an unknown model family")
    try:
        return rebuilder(body, tensors, Path(path))
    except CacheEntryError:
        raise
    except Exception as err:  # any mismatch between architecture and weights
        raise CacheEntryError(_short(err)) from None


def _rebuild_ultralytics(body: dict, tensors: dict, path: Path):
    try:
        net = netbuild.build_ultralytics(
            body["architecture"]["yaml"], tensors, body.get("batchnorm") or {}, body["names"]
        )
    except netbuild.ArchitectureError as err:
        raise CacheEntryError(f"architecture not allowed: {err}") from None
    net.names = {int(k): str(v) for k, v in body["names"].items()}
    return netbuild.yolo_from_network(net, netbuild.checkpoint_settings(body.get("yolocell")))


def check_ultralytics_yaml(yaml: dict) -> None:
    """Refuse an architecture outside the schema (see :func:`netbuild.check_ultralytics_yaml`).

    Raises
    ------
    ValueError
        Names what is refused.
    """
    try:
        netbuild.check_ultralytics_yaml(yaml)
    except netbuild.ArchitectureError as err:
        raise ValueError(f"model YAML not allowed: {err}") from None


def _rebuild_classic(body: dict, tensors: dict, path: Path):
    import torch

    try:
        cfg = netbuild.check_classic_yaml(body["architecture"]["yaml"])
    except netbuild.ArchitectureError as err:
        raise CacheEntryError(f"architecture not allowed: {err}") from None
    net = classic.ClassicYolov5(cfg)
    net.load_state_dict(tensors, strict=True)
    netbuild.apply_batchnorm_settings(net, body.get("batchnorm") or {})
    stride = torch.tensor([float(s) for s in body["head_stride"]])
    if stride.shape != (net.model[-1].nl,) or not bool(((stride >= 1) & (stride <= 128)).all()):
        raise CacheEntryError("strides out of range")
    net.model[-1].stride = stride
    return _wrap(net.eval(), body)


def _rebuild_meituan(body: dict, tensors: dict, path: Path):
    try:
        tree = _decode_tree(body["architecture"]["tree"])
        net = netbuild.build_tree(tree, tensors, meituan.standins())
    except netbuild.ArchitectureError as err:
        raise CacheEntryError(f"module tree not allowed: {err}") from None
    net = meituan.build({"model": net}, "cache entry")
    return _wrap(net.eval(), body)


_REBUILDERS = {
    "ultralytics": _rebuild_ultralytics,
    "yolov5-classic": _rebuild_classic,
    "yolov6-meituan": _rebuild_meituan,
}


def _wrap(net, body: dict):
    names = netbuild.class_names({int(k): v for k, v in body["names"].items()}, 1)
    stride = max(float(s) for s in body["stride"])
    if not 1 <= stride <= 128:
        raise CacheEntryError("strides out of range")
    wrapped = classic.ObjectnessToScores(net, names, int(stride))
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


def _tree(module, prefix: str, tensors: dict) -> dict[str, Any]:
    """A module, its settings and its children, as JSON; its tensors go to ``tensors``."""
    import torch

    cls = type(module)
    origin = getattr(cls, "origin", None)
    if origin in meituan.standins():
        kind = origin
    elif netbuild.torch_module_class(f"torch.nn.{cls.__name__}") is cls:
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
        node["params"][name] = None if param is None else True
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


def _encode(value: Any) -> Any:
    """A module attribute as JSON, keeping tuples, dicts with any keys and small tensors."""
    import torch

    if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        if value.numel() > 4096:
            raise ValueError(f"a {tuple(value.shape)} tensor attribute is too large to cache")
        dtype = str(value.dtype).removeprefix("torch.")
        return {"tensor": value.detach().cpu().tolist(), "dtype": dtype}
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise ValueError(f"a {type(value).__name__} attribute cannot be cached")


_DTYPES = ("float32", "float16", "float64", "int64", "int32", "uint8", "bool")


def _decode_tree(node: Any, depth: int = 0) -> dict:
    """A stored module tree with its attributes decoded (tensors as ``{"tensor_ref": t}``)."""
    if depth > 48 or not isinstance(node, dict):
        raise CacheEntryError("a module tree that is not one")
    out = dict(node)
    attrs = node.get("attrs")
    if not isinstance(attrs, dict):
        raise CacheEntryError("module attributes that are not a mapping")
    out["attrs"] = {}
    for key, value in attrs.items():
        decoded = _decode(value)
        out["attrs"][key] = {"tensor_ref": decoded} if _is_tensor(decoded) else decoded
    children = node.get("children")
    if not isinstance(children, dict):
        raise CacheEntryError("sub-modules that are not a mapping")
    out["children"] = {
        k: None if c is None else _decode_tree(c, depth + 1) for k, c in children.items()
    }
    return out


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _decode(value: Any, depth: int = 0) -> Any:
    import torch

    if depth > 8:
        raise CacheEntryError("an attribute nested too deeply")
    if isinstance(value, list):
        return [_decode(v, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        if value.get("dtype") not in _DTYPES:
            raise CacheEntryError("an unknown tensor type")
        data = torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
        if data.numel() > 4096:
            raise CacheEntryError("a large tensor attribute")
        return data
    if "tuple" in value:
        return tuple(_decode(v, depth + 1) for v in value["tuple"])
    if "dict" in value:
        return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in value["dict"]}
    raise CacheEntryError("an unknown attribute encoding")
