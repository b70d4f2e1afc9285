"""Read a YOLO detection/segmentation dataset (ultralytics layout or a Roboflow export).

The reader is deliberately forgiving about *where* things are (Roboflow's ``../train/images``
paths, Colab paths in ``data.yaml``, ``valid`` vs ``val``) and deliberately strict about *what*
it finds: label files without an image, images whose label file has a different name and
malformed label lines are collected in :attr:`YoloDataset.problems` and announced with a
warning instead of being dropped silently.

Boxes are returned as ``(N, 4)`` float arrays ``y0, x0, y1, x1`` in pixels of the image as
stored (y0/x0 inclusive top-left edge, y1/x1 exclusive bottom-right edge), i.e. the same
convention as the detection DataFrame.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from napari_yolocell.io.images import open_image
from napari_yolocell.io.tiff import is_tiff_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".dng", ".mpo", ".pfm")
SPLITS = ("train", "val", "test")
# Folder names used for each split by ultralytics, Roboflow and hand-made datasets.
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# Roboflow renames ``name.png`` to ``name_png.rf.<hash>.jpg``; its label keeps that stem.
_ROBOFLOW_STEM = re.compile(r"^(?P<stem>.+)_(?P<ext>[A-Za-z0-9]+)\.rf\.[0-9A-Za-z]+$")

__all__ = [
    "DatasetProblem",
    "YoloDataset",
    "YoloSample",
    "image_size",
    "load_image",
    "locate_splits",
    "parse_label_file",
    "read_yolo_dataset",
]


@dataclass(frozen=True)
class DatasetProblem:
    """One thing that is wrong (or suspicious) in a dataset.

    Attributes
    ----------
    kind : str
        ``orphan_label`` (label file without image), ``name_mismatch`` (image and label paired
        only through Roboflow's renaming, or not at all), ``bad_label_line``,
        ``unreadable_image``, ``duplicate_stem``, ``missing_split``.
    split : str
        Split the problem belongs to (``""`` when not split-specific).
    path : Path or None
        File concerned.
    message : str
        Human-readable explanation.
    """

    kind: str
    split: str
    path: Path | None
    message: str


@dataclass
class YoloSample:
    """One image of a YOLO dataset with its boxes.

    Attributes
    ----------
    image_path : Path
        Image file.
    split : str
        ``train``, ``val`` or ``test``.
    boxes : numpy.ndarray
        ``(N, 4)`` float64 ``y0, x0, y1, x1`` in pixels.
    classes : numpy.ndarray
        ``(N,)`` int class ids.
    shape : tuple of int
        Image ``(height, width)``.
    label_path : Path or None
        Label file used (None: no label file, i.e. zero objects).
    names : tuple of str
        Class names of the dataset (index = class id).
    polygon : numpy.ndarray
        ``(N,)`` bool, True where the box was derived from a polygon line.
    """

    image_path: Path
    split: str
    boxes: np.ndarray
    classes: np.ndarray
    shape: tuple[int, int]
    label_path: Path | None = None
    names: tuple[str, ...] = ()
    polygon: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def n_objects(self) -> int:
        """Number of labelled objects."""
        return int(len(self.boxes))

    @property
    def class_names(self) -> list[str]:
        """Class name per box (``str(id)`` for ids outside ``names``)."""
        return [_class_name(int(c), self.names) for c in self.classes]


@dataclass
class YoloDataset(Sequence):
    """A YOLO dataset read from disk; behaves as a sequence of :class:`YoloSample`.

    Attributes
    ----------
    root : Path
        Dataset folder.
    samples : list of YoloSample
        All images of all splits.
    names : tuple of str
        Class names.
    problems : list of DatasetProblem
        Everything found wrong while reading.
    yaml_path : Path or None
        The ``data.yaml`` used, if any.
    """

    root: Path
    samples: list[YoloSample]
    names: tuple[str, ...]
    problems: list[DatasetProblem] = field(default_factory=list)
    yaml_path: Path | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.samples[index]

    def __iter__(self) -> Iterator[YoloSample]:
        return iter(self.samples)

    @property
    def splits(self) -> list[str]:
        """Splits that hold at least one image, in train/val/test order."""
        present = {s.split for s in self.samples}
        return [s for s in SPLITS if s in present]

    def split(self, name: str) -> list[YoloSample]:
        """Samples of one split (``valid``/``validation`` are accepted for ``val``)."""
        name = _canonical_split(name)
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {"images": n, "objects": n}}`` for the splits present."""
        return {
            sp: {
                "images": len(self.split(sp)),
                "objects": sum(s.n_objects for s in self.split(sp)),
            }
            for sp in self.splits
        }

    def class_counts(self) -> dict[str, int]:
        """Objects per class name over all splits."""
        out: dict[str, int] = {}
        for s in self.samples:
            for n in s.class_names:
                out[n] = out.get(n, 0) + 1
        return out

    def problems_of(self, kind: str) -> list[DatasetProblem]:
        """Problems of one kind."""
        return [p for p in self.problems if p.kind == kind]

    def problem_summary(self) -> str:
        """One line: how many problems of each kind, and the first one ("" when none)."""
        if not self.problems:
            return ""
        kinds: dict[str, int] = {}
        for p in self.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        listing = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"{len(self.problems)} problem(s) ({listing}); first: {self.problems[0].message}"

    def unique_images(self, limit: int | None = None) -> list[YoloSample]:
        """Samples with each image file once, in order; at most ``limit`` of them.

        A split may reuse another's folder (our exports point ``val`` at ``train`` when ``val``
        is empty), so the same file can appear under two splits.
        """
        out, seen = [], set()
        for sample in self.samples:
            key = Path(sample.image_path).resolve()
            if key in seen:
                continue
            seen.add(key)
            out.append(sample)
            if limit is not None and len(out) >= limit:
                break
        return out


# --------------------------------------------------------------------------- reading


def read_yolo_dataset(
    path: str | Path,
    splits: Sequence[str] = SPLITS,
    match_roboflow_names: bool = True,
    warn: bool = True,
) -> YoloDataset:
    """Read a YOLO dataset folder or its ``data.yaml``.

    Parameters
    ----------
    path : str or Path
        Dataset folder (with ``data.yaml`` or a conventional layout) or a ``*.yaml`` file.
    splits : sequence of str
        Splits to read.
    match_roboflow_names : bool
        Pair an image ``name.png`` with a lone label ``name_png.rf.<hash>.txt`` (Roboflow
        renames files on export but not always consistently). Such pairs are still reported as
        ``name_mismatch`` problems. If False they stay unpaired: the image gets zero objects
        and the label is reported as an orphan.
    warn : bool
        Emit one ``UserWarning`` per problem kind and split.

    Returns
    -------
    YoloDataset
        The samples, class names and the list of problems found.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist or no split folder with images can be found.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"YOLO dataset not found: {path}")
    yaml_path = path if path.is_file() else _find_yaml(path)
    root = yaml_path.parent if yaml_path is not None else path
    cfg = _read_yaml(yaml_path) if yaml_path is not None else {}
    names = _parse_names(cfg.get("names"), cfg.get("nc"))

    problems: list[DatasetProblem] = []
    samples: list[YoloSample] = []
    for split in (_canonical_split(s) for s in splits):
        image_files = _split_images(cfg, root, split)
        if image_files is None:
            if split in cfg:
                problems.append(
                    DatasetProblem(
                        "missing_split",
                        split,
                        None,
                        f"data.yaml names a {split!r} split ({cfg[split]!r}) but no such folder "
                        f"exists near {root}",
                    )
                )
            continue
        samples += _read_split(split, image_files, names, match_roboflow_names, problems)
    # A split may reuse another's folder (e.g. `val: images/train` when there is no val set):
    # each image counts once, in the first split that lists it.
    seen: set[Path] = set()
    unique = []
    for s in samples:
        key = Path(s.image_path).resolve()
        if key not in seen:
            seen.add(key)
            unique.append(s)
    samples = unique
    if not samples and not problems:
        raise FileNotFoundError(f"no YOLO images found under {root}")
    if not names:
        top = max((int(c) for s in samples for c in s.classes), default=-1)
        names = tuple(str(i) for i in range(top + 1))
        for s in samples:
            s.names = names
    if warn:
        _warn_problems(problems)
    return YoloDataset(
        root=root, samples=samples, names=names, problems=problems, yaml_path=yaml_path
    )


def _find_yaml(folder: Path) -> Path | None:
    for name in ("data.yaml", "data.yml", "dataset.yaml", "datav8.yaml"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    return found[0] if found else None


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a YOLO data.yaml (expected a mapping)")
    if "valid" in cfg and "val" not in cfg:
        cfg["val"] = cfg["valid"]
    return cfg


def _parse_names(names: Any, nc: Any) -> tuple[str, ...]:
    if isinstance(names, dict):
        top = max(int(k) for k in names) if names else -1
        return tuple(str(names.get(i, names.get(str(i), i))) for i in range(top + 1))
    if isinstance(names, (list, tuple)):
        return tuple(str(n) for n in names)
    if nc is not None:
        return tuple(str(i) for i in range(int(nc)))
    return ()


def _canonical_split(name: str) -> str:
    for canon, aliases in SPLIT_ALIASES.items():
        if name in aliases:
            return canon
    return name


def _split_locations(cfg: dict[str, Any], root: Path, split: str) -> list[Path] | None:
    """Folders (or ``.txt`` image lists) of one split: ``data.yaml`` if it resolves, else the
    conventional ``images/<split>`` or ``<split>/images`` folders."""
    entry = cfg.get(split)
    if entry:
        base = _resolve_base(cfg.get("path"), root)
        items = entry if isinstance(entry, (list, tuple)) else [entry]
        located = [_resolve_entry(str(item), base, root) for item in items]
        located = [p for p in located if p is not None]
        if located:
            return located
    for folder in _conventional_dirs(root, split):
        if folder.is_dir():
            return [folder.resolve()]
    return None


def _split_images(cfg: dict[str, Any], root: Path, split: str) -> list[Path] | None:
    """Image files of one split, or None if the split cannot be found."""
    locations = _split_locations(cfg, root, split)
    if locations is None:
        return None
    base = _resolve_base(cfg.get("path"), root)
    return sorted({f for loc in locations for f in _list_images(loc, base)})


def locate_splits(
    path: str | Path, splits: Sequence[str] = SPLITS
) -> tuple[Path, tuple[str, ...], dict[str, list[Path]]]:
    """Resolve where each split of a dataset really is (without reading labels).

    Parameters
    ----------
    path : str or Path
        Dataset folder or ``data.yaml``.
    splits : sequence of str
        Splits to look for.

    Returns
    -------
    root : Path
        Dataset folder.
    names : tuple of str
        Class names from ``data.yaml`` (empty if unknown).
    locations : dict
        ``{split: [absolute folder or list file, ...]}`` for the splits found.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"YOLO dataset not found: {path}")
    yaml_path = path if path.is_file() else _find_yaml(path)
    root = (yaml_path.parent if yaml_path is not None else path).resolve()
    cfg = _read_yaml(yaml_path) if yaml_path is not None else {}
    found = {}
    for split in (_canonical_split(s) for s in splits):
        locations = _split_locations(cfg, root, split)
        if locations:
            found[split] = locations
    return root, _parse_names(cfg.get("names"), cfg.get("nc")), found


def _resolve_base(path_entry: Any, root: Path) -> Path:
    if path_entry:
        p = Path(str(path_entry)).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            return p
    return root


def _resolve_entry(item: str, base: Path, root: Path) -> Path | None:
    """Find a split folder (or list file); tolerate Roboflow ``../x`` and foreign absolute paths."""
    p = Path(item).expanduser()
    candidates = [p] if p.is_absolute() else [base / p, root / p]
    # Roboflow writes ``../train/images`` relative to a folder *inside* the dataset; exports
    # moved elsewhere (or Colab paths) are found again by their trailing components.
    parts = [q for q in p.parts if q not in ("..", ".", p.anchor)]
    candidates += [root.joinpath(*parts[i:]) for i in range(len(parts))]
    for c in candidates:
        if c.exists():
            return c.resolve()
    return None


def _conventional_dirs(root: Path, split: str) -> list[Path]:
    dirs = []
    for alias in SPLIT_ALIASES.get(split, (split,)):
        dirs += [root / "images" / alias, root / alias / "images"]
    return dirs


def _list_images(location: Path, base: Path) -> list[Path]:
    if location.is_file():  # ultralytics also accepts a .txt list of image paths
        lines = location.read_text(encoding="utf-8").splitlines()
        paths = [Path(s.strip()) for s in lines if s.strip()]
        return [p if p.is_absolute() else (base / p).resolve() for p in paths]
    return sorted(
        p for p in location.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _label_dir_for(image: Path) -> Path:
    """ultralytics rule: the last ``images`` component of the path becomes ``labels``."""
    parts = list(image.parent.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return image.parent  # labels next to images (some hand-made datasets)


def _read_split(
    split: str,
    image_files: list[Path],
    names: tuple[str, ...],
    match_roboflow: bool,
    problems: list[DatasetProblem],
) -> list[YoloSample]:
    label_dirs = sorted({_label_dir_for(p) for p in image_files})
    labels = {p: p.stem for d in label_dirs if d.is_dir() for p in sorted(d.rglob("*.txt"))}
    by_stem: dict[tuple[Path, str], Path] = {(p.parent, s): p for p, s in labels.items()}
    _report_duplicate_stems(split, image_files, problems)

    pairs: dict[Path, Path | None] = {}
    for img in image_files:
        pairs[img] = by_stem.get((_label_dir_for(img), img.stem))
    unused = set(labels) - {lp for lp in pairs.values() if lp is not None}
    _pair_roboflow_names(split, pairs, unused, match_roboflow, problems)
    for lp in sorted(unused):
        problems.append(
            DatasetProblem(
                "orphan_label",
                split,
                lp,
                f"label file {lp.name} has no image with the same name in {split!r}; its objects "
                "are not used",
            )
        )

    samples = []
    for img, lp in pairs.items():
        sample = _make_sample(img, lp, split, names, problems)
        if sample is not None:
            samples.append(sample)
    return samples


def _report_duplicate_stems(split: str, files: list[Path], problems: list[DatasetProblem]):
    seen: dict[tuple[Path, str], Path] = {}
    for p in files:
        key = (p.parent, p.stem)
        if key in seen:
            problems.append(
                DatasetProblem(
                    "duplicate_stem",
                    split,
                    p,
                    f"{p.name} and {seen[key].name} share one label file name",
                )
            )
        seen[key] = p


def _pair_roboflow_names(
    split: str,
    pairs: dict[Path, Path | None],
    unused: set[Path],
    enabled: bool,
    problems: list[DatasetProblem],
) -> None:
    """Pair unlabelled images with lone ``<stem>_<ext>.rf.<hash>`` labels (and report it)."""
    candidates: dict[tuple[Path, str], list[Path]] = {}
    for lp in unused:
        m = _ROBOFLOW_STEM.match(lp.stem)
        if m:
            candidates.setdefault((lp.parent, m["stem"]), []).append(lp)
    for img, lp in pairs.items():
        if lp is not None:
            continue
        found = candidates.get((_label_dir_for(img), img.stem), [])
        if len(found) != 1:
            continue
        label = found[0]
        if enabled:
            pairs[img] = label
            unused.discard(label)
            msg = (
                f"image {img.name} has no label file of the same name; paired with "
                f"Roboflow-renamed {label.name}"
            )
        else:
            msg = (
                f"image {img.name} has no label file of the same name (a Roboflow-renamed "
                f"{label.name} exists but match_roboflow_names=False): read as 0 objects"
            )
        problems.append(DatasetProblem("name_mismatch", split, img, msg))


def _make_sample(
    img: Path,
    label: Path | None,
    split: str,
    names: tuple[str, ...],
    problems: list[DatasetProblem],
) -> YoloSample | None:
    try:
        shape = image_size(img)
    except Exception as exc:  # corrupt / unsupported file: report, keep going
        problems.append(DatasetProblem("unreadable_image", split, img, f"cannot read: {exc}"))
        return None
    boxes = np.zeros((0, 4))
    classes = np.zeros(0, int)
    polygon = np.zeros(0, bool)
    if label is not None:
        norm, classes, polygon, bad = parse_label_file(label)
        for lineno, text in bad:
            problems.append(
                DatasetProblem("bad_label_line", split, label, f"{label.name}:{lineno}: {text}")
            )
        h, w = shape
        boxes = norm * np.array([h, w, h, w], dtype=float)
        out_of_range = [int(c) for c in classes if names and not 0 <= c < len(names)]
        if out_of_range:
            problems.append(
                DatasetProblem(
                    "bad_label_line",
                    split,
                    label,
                    f"{label.name}: class ids {sorted(set(out_of_range))} outside names "
                    f"(nc={len(names)})",
                )
            )
    return YoloSample(
        image_path=img,
        split=split,
        boxes=boxes,
        classes=classes,
        shape=shape,
        label_path=label,
        names=names,
        polygon=polygon,
    )


def parse_label_file(
    path: str | Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Parse a YOLO label file with box lines and/or polygon lines.

    Parameters
    ----------
    path : str or Path
        ``*.txt`` label file: ``cls cx cy w h`` (box) or ``cls x1 y1 x2 y2 ...`` (polygon, as
        written by segmentation exports) per line, coordinates normalised to 0..1.

    Returns
    -------
    boxes : numpy.ndarray
        ``(N, 4)`` normalised ``y0, x0, y1, x1`` (clipped to 0..1).
    classes : numpy.ndarray
        ``(N,)`` int class ids.
    polygon : numpy.ndarray
        ``(N,)`` bool, True for boxes derived from polygons.
    bad : list of (int, str)
        ``(line number, reason)`` for lines that could not be used.
    """
    boxes, classes, polygon, bad = [], [], [], []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            bad.append((lineno, f"not numeric: {line.strip()[:60]!r}"))
            continue
        parsed = _parse_line(values)
        if isinstance(parsed, str):
            bad.append((lineno, parsed))
            continue
        box, is_poly = parsed
        boxes.append(box)
        classes.append(int(values[0]))
        polygon.append(is_poly)
    return (
        np.asarray(boxes, float).reshape(-1, 4),
        np.asarray(classes, int),
        np.asarray(polygon, bool),
        bad,
    )


def _parse_line(values: list[float]) -> tuple[list[float], bool] | str:
    """One label line -> (normalised y0, x0, y1, x1; is_polygon) or a reason string."""
    cls, coords = values[0], np.asarray(values[1:])
    if cls < 0 or cls != int(cls):
        return f"class id {cls:g} is not a non-negative integer"
    if len(coords) == 4:
        cx, cy, w, h = coords
        if w <= 0 or h <= 0:
            return f"box with non-positive size w={w:g} h={h:g}"
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        is_poly = False
    elif len(coords) >= 6 and len(coords) % 2 == 0:
        xs, ys = coords[0::2], coords[1::2]
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        if x1 <= x0 or y1 <= y0:
            return "degenerate polygon (zero width or height)"
        is_poly = True
    else:
        return f"{len(values)} values: neither 'cls cx cy w h' nor 'cls x1 y1 x2 y2 x3 y3 ...'"
    if min(x0, y0) < -0.01 or max(x1, y1) > 1.01:  # small overshoot is common rounding
        return f"coordinates outside 0..1: x {x0:.3f}..{x1:.3f}, y {y0:.3f}..{y1:.3f}"
    return [float(np.clip(v, 0, 1)) for v in (y0, x0, y1, x1)], is_poly


def _warn_problems(problems: list[DatasetProblem]) -> None:
    groups: dict[tuple[str, str], list[DatasetProblem]] = {}
    for p in problems:
        groups.setdefault((p.kind, p.split), []).append(p)
    for (kind, split), items in groups.items():
        example = items[0].message
        more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
        warnings.warn(
            f"YOLO dataset, split {split!r}: {len(items)} x {kind}: {example}{more}",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- images


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image without decoding its pixels.

    PIL reads only the header; EXIF rotation is applied like ultralytics does, because labels
    refer to the upright image. TIFFs PIL cannot open (e.g. 16-bit multichannel) are measured
    by :func:`~napari_yolocell.io.images.open_image`, which reads TIFF headers only.
    """
    path = Path(path)
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            if im.format in ("JPEG", "MPO") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return int(h), int(w)
    except Exception:
        if not is_tiff_path(path):
            raise
    opened = open_image(path)
    try:
        shape = opened.data.shape
        return int(shape[opened.axes.index("Y")]), int(shape[opened.axes.index("X")])
    finally:
        opened.close()


def load_image(path: str | Path) -> np.ndarray:
    """Read a dataset image as a numpy array (upright; TIFFs keep their dtype).

    TIFFs are read by :func:`~napari_yolocell.io.images.open_image` (full resolution); other
    formats by PIL with the EXIF rotation applied, as ultralytics does (labels refer to the
    upright image).
    """
    path = Path(path)
    if is_tiff_path(path):
        opened = open_image(path)
        try:
            return np.asarray(opened.data)
        finally:
            opened.close()
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode not in ("L", "RGB", "I;16", "I", "F"):
            im = im.convert("RGB")
        return np.asarray(im)


def _class_name(cls: int, names: Sequence[str]) -> str:
    return str(names[cls]) if 0 <= cls < len(names) else str(cls)
