"""Where a user's INT8 model lives, whether it passed its check, and telling the user once.

:func:`napari_yolocell.training.quantize.quantize_for_user` quantizes a model the user runs
(a fine-tune, a foreign checkpoint) and writes it beside the model's pickle-free entry::

    <cache>/<sha256 of the weights>/
        torch-v1/                 (models.torch_cache)
        openvino-v1/              (models.export_cache, FP32)
        openvino-int8-v2/         model.xml  model.bin  meta.json  check.json

``check.json`` records the INT8 model against FP32 on the calibration tiles
(:class:`napari_yolocell.training.quantize.Int8Check`). The loader runs the INT8 model only
when that check passed; otherwise FP32 runs and the user is told once per process. Like every
cache entry, the folder is built in a private temporary folder, signed with the user's key
(:func:`~napari_yolocell.models.user_cache.sign_folder`, check included) and renamed into
place; an entry whose signature fails is treated as missing (quantized again).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_yolocell.models.user_cache import (
    cache_root,
    entry_tempdir,
    sign_folder,
    verify_folder,
    weights_sha256,
)

#: Bump when the quantization recipe changes: older INT8 entries are then ignored.
#: 2: the head's decoding kept in FP32 (issue 23). 3: activation ranges without the most
#: extreme calibration tiles (``training.quantize._advanced``).
INT8_VERSION = 3
CHECK_FILE = "check.json"

_TOLD: set[str] = set()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Int8Entry:
    """A cached INT8 model and its check against FP32.

    Attributes
    ----------
    folder : pathlib.Path
        OpenVINO IR folder.
    check : dict
        The recorded :class:`~napari_yolocell.training.quantize.Int8Check` fields.
    """

    folder: Path
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def used(self) -> bool:
        """Whether the INT8 model passed its check (else FP32 runs)."""
        return bool(self.check.get("passed"))


def int8_dir(spec, root: Path | None = None) -> Path:
    """Folder of the INT8 version of ``spec``'s weights (keyed by their SHA-256)."""
    key = weights_sha256(spec.path, spec.sha256)
    return (root or cache_root()) / key / f"openvino-int8-v{INT8_VERSION}"


def _purpose(folder: Path) -> str:
    """What the signature binds the entry to: this recipe and these weights."""
    return f"{folder.name}:{folder.parent.name}"


def lookup(spec, root: Path | None = None) -> Int8Entry | None:
    """The cached INT8 entry of ``spec``; None if never quantized, damaged or not ours."""
    if spec.path is None or not Path(spec.path).is_file():
        return None
    folder = int8_dir(spec, root)
    if not (folder / "model.xml").is_file() or not verify_folder(folder, _purpose(folder)):
        return None
    try:
        check = json.loads((folder / CHECK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Int8Entry(folder, check) if isinstance(check, dict) else None


def new_entry(spec, root: Path | None = None) -> Path:
    """A private temporary folder to build ``spec``'s INT8 entry in (:func:`install` it)."""
    final = int8_dir(spec, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    return entry_tempdir(final)


def install(spec, tmp: Path, check: dict[str, Any], root: Path | None = None) -> Int8Entry:
    """Add the check to a built entry, sign it and rename it into place."""
    final = int8_dir(spec, root)
    (Path(tmp) / CHECK_FILE).write_text(json.dumps(check, indent=2) + "\n", encoding="utf-8")
    sign_folder(tmp, _purpose(final))
    if final.exists():  # quantized again (--force): the new entry replaces the old
        shutil.rmtree(final)
    os.replace(tmp, final)
    return Int8Entry(final, dict(check))


def adopt(source, spec, root: Path | None = None) -> Int8Entry | None:
    """Make a bundled model's INT8 folder the cached INT8 entry of a copy of its weights.

    A fine-tune that gave its start model back (``training.fewshot``) delivers a byte-identical
    copy of the start's ``.pt``; the copy then runs the INT8 version released and checked with
    the start, as Detect runs the start itself, instead of one quantized anew. The shipped
    files are checked against the registry's hashes, copied and signed as the user's entry.

    Parameters
    ----------
    source : ModelSpec
        The bundled model (its ``int8`` folder and the hash of its unpacked weights).
    spec : ModelSpec
        The copy (``path``: its ``.pt``).
    root : Path, optional
        Cache root (default: the user's).

    Returns
    -------
    Int8Entry or None
        None when ``source`` ships no INT8 folder or ``spec``'s weights are not its copy.
    """
    from napari_yolocell.models.integrity import verify_folder as verify_shipped

    expected = source.unpacked_sha256 or source.sha256
    if not source.int8 or not expected or spec.path is None:
        return None
    if weights_sha256(spec.path) != expected.lower():
        return None
    shipped = Path(source.int8["dir"])
    files = source.int8.get("sha256") or {}
    verify_shipped(shipped, files)
    tmp = new_entry(spec, root)
    try:
        for name in files:
            shutil.copyfile(shipped / name, tmp / name)
        return install(spec, tmp, {"passed": True, "adopted_from": source.name}, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def record(spec, check: dict[str, Any], root: Path | None = None) -> Int8Entry:
    """Replace the check of an existing entry (and sign it again)."""
    folder = int8_dir(spec, root)
    (folder / CHECK_FILE).write_text(json.dumps(check, indent=2) + "\n", encoding="utf-8")
    sign_folder(folder, _purpose(folder))
    return Int8Entry(folder, dict(check))


def tell_fp32_once(spec, entry: Int8Entry) -> None:
    """Warn (once per process and model) that a failed INT8 model is not used."""
    key = str(entry.folder)
    with _LOCK:
        if key in _TOLD:
            return
        _TOLD.add(key)
    change = entry.check.get("count_change", 0.0)
    hint = (
        ""
        if searched(entry)
        else f"; `yolocell quantize {spec.path or spec.name}` searches a mixed-precision version"
    )
    warnings.warn(
        f"the INT8 version of {spec.name!r} differs from FP32 on its calibration images "
        f"(count {change:+.1%}, F1 agreement {entry.check.get('f1', 0):.3f}): running FP32" + hint,
        RuntimeWarning,
        stacklevel=3,
    )


def searched(entry: Int8Entry) -> bool:
    """Whether ``entry`` came out of the mixed-precision search (nothing more to try)."""
    return entry.check.get("recipe") == "mixed"


def cpu_gains_from_int8() -> bool:
    """Whether OpenVINO's CPU plugin runs INT8 kernels on this machine (AVX2 / VNNI / AMX)."""
    try:
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no OpenVINO, or a CPU plugin that cannot say: assume no gain
        return False
    return "INT8" in [str(c).upper() for c in caps]
