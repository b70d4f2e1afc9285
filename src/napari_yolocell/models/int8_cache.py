"""Where a user's INT8 model lives, whether it passed its check, and telling the user once.

:func:`napari_yolocell.training.quantize.quantize_for_user` quantizes a model the user runs
(a fine-tune, a foreign checkpoint) and writes it beside the model's pickle-free entry::

    <cache>/<sha256 of the weights>/
        torch-v1/                 (models.torch_cache)
        openvino-v1/              (models.export_cache, FP32)
        openvino-int8-v2/         model.xml  model.bin  meta.json  check.json

``check.json`` records the INT8 model against FP32 on the calibration tiles
(:class:`napari_yolocell.training.quantize.Int8Check`). The loader runs the INT8 model only
when that check passed; otherwise FP32 runs and the user is told once per process.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_yolocell.models.user_cache import cache_root, weights_sha256

#: Bump when the quantization recipe changes: older INT8 entries are then ignored.
#: 2: the head's decoding kept in FP32 (issue 23).
INT8_VERSION = 2
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


def lookup(spec, root: Path | None = None) -> Int8Entry | None:
    """The cached INT8 entry of ``spec``, or None if it was never quantized (or is damaged)."""
    if spec.path is None or not Path(spec.path).is_file():
        return None
    folder = int8_dir(spec, root)
    try:
        check = json.loads((folder / CHECK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (folder / "model.xml").is_file() or not isinstance(check, dict):
        return None
    return Int8Entry(folder, check)


def record(spec, check: dict[str, Any], root: Path | None = None) -> Int8Entry:
    """Write the check of a freshly quantized model (last, so a crash leaves no entry)."""
    folder = int8_dir(spec, root)
    tmp = folder / f".{CHECK_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(check, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CHECK_FILE)
    return Int8Entry(folder, dict(check))


def tell_fp32_once(spec, entry: Int8Entry) -> None:
    """Warn (once per process and model) that a failed INT8 model is not used."""
    key = str(entry.folder)
    with _LOCK:
        if key in _TOLD:
            return
        _TOLD.add(key)
    change = entry.check.get("count_change", 0.0)
    warnings.warn(
        f"the INT8 version of {spec.name!r} differs from FP32 on its calibration images "
        f"(count {change:+.1%}, F1 agreement {entry.check.get('f1', 0):.3f}): running FP32",
        RuntimeWarning,
        stacklevel=3,
    )


def cpu_gains_from_int8() -> bool:
    """Whether OpenVINO's CPU plugin runs INT8 kernels on this machine (AVX2 / VNNI / AMX)."""
    try:
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # no OpenVINO, or a CPU plugin that cannot say: assume no gain
        return False
    return "INT8" in [str(c).upper() for c in caps]
