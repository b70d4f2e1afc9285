"""Write an ultralytics-ready YOLO dataset from images and their boxes.

Layout written (the layout ultralytics expects)::

    OUT/images/{train,val,test}/NAME.png   8-bit, normalised like detection normalises
    OUT/labels/{train,val,test}/NAME.txt   one line per object: ``class cx cy w h`` in [0, 1]
    OUT/data.yaml                          path, train, val, test, nc, names
    OUT/dataset.json                       how it was made (normalisation, tiles, counts)

Images are normalised with the same percentile clip as detection (``normalize.py``) and stored
as lossless 8-bit PNG, so a model trained here sees at detection time what it saw in training,
whatever the bit depth of the source. Images larger than ``tile`` are cut into training tiles;
smaller ones are padded (never resized: nuclei must keep their pixel size).

A biologist corrects several images one after the other: ``append=True`` adds each export to
the dataset already in the folder (``dataset.json`` records every source region's split, so
the splits stay balanced by image or region: :func:`extend_splits`); exporting an image again
replaces only that image's tiles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from napari_yolocell.engine.normalize import percentile_range, to_uint8
from napari_yolocell.engine.tiling import tile_grid
from napari_yolocell.training.annotations import annotation_boxes, clip_boxes

__all__ = [
    "ExportReport",
    "Sample",
    "coverage_warning",
    "assign_splits",
    "check_out_folder",
    "crop_boxes",
    "crop_to_regions",
    "export_dataset",
    "extend_splits",
    "is_dataset",
    "merge_samples",
    "plane_samples",
    "safe_name",
    "samples_from_annotations",
    "yolo_lines",
]

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One annotated image.

    Parameters
    ----------
    image : (H, W) or (H, W, 3) array
    boxes : (N, 4) array of ``y0, x0, y1, x1`` pixels (exclusive ends)
    name : str
        File-name stem for what is written.
    classes : (N,) int array, optional (default all 0)
    group : str, optional
        Samples of one group always land in one split (e.g. fields of one well).
    split : {"train", "val", "test"}, optional
        Force the split (e.g. an official split); overrides the random assignment.
    complete : bool
        Every nucleus in ``image`` is annotated (a crop to an annotated region,
        :func:`crop_to_regions`): the partial-annotation check (:func:`coverage_warning`) is
        skipped, since few boxes or a few clustered boxes are then the truth.
    """

    image: np.ndarray
    boxes: np.ndarray
    name: str
    classes: np.ndarray | None = None
    group: str | None = None
    split: str | None = None
    complete: bool = False


@dataclass
class ExportReport:
    """What :func:`export_dataset` wrote and what it had to drop."""

    path: Path
    n_images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    n_objects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    n_sources: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    warnings: list[str] = field(default_factory=list)
    #: With ``append``: the dataset's totals after this export (tiles, objects, sources).
    totals: dict[str, dict[str, int]] | None = None

    def summary(self) -> str:
        rows = [
            f"{s}: {self.n_images[s]} images, {self.n_objects[s]} objects "
            f"from {self.n_sources[s]} source regions"
            for s in SPLITS
        ]
        text = "; ".join(rows)
        if self.totals is not None:
            now = ", ".join(
                f"{s} {self.totals['n_images'][s]} images ({self.totals['n_sources'][s]} "
                "source regions)"
                for s in SPLITS
            )
            text = f"added {text}; the dataset now holds {now}"
        return text


#: Below this share of the image inside the annotated extent, an export warns of partial
#: annotation (every nucleus outside it is taught as background).
MIN_ANNOTATED_SHARE = 0.5


def coverage_warning(sample: Sample, min_share: float = MIN_ANNOTATED_SHARE) -> str | None:
    """A warning when the annotations cover only part of the sample's image, else None.

    The annotated extent is the rectangle around all boxes, widened by one median box side on
    each edge (nuclei near an annotated region's rim); an image whose extent covers less than
    ``min_share`` of its area was most likely annotated only in part. YOLO learns every
    unannotated nucleus as background, so such a model learns to miss nuclei.

    Examples
    --------
    >>> img = np.zeros((100, 100))
    >>> coverage_warning(Sample(img, np.array([[0, 0, 10, 10], [80, 80, 90, 90]]), "a")) is None
    True
    >>> coverage_warning(Sample(img, np.array([[0, 0, 10, 10]]), "a"))[:30]
    'a: annotations cover only ~4 %'
    """
    h, w = np.asarray(sample.image).shape[:2]
    boxes = np.asarray(sample.boxes, dtype=float).reshape(-1, 4)
    if len(boxes) == 0:
        return (
            f"{sample.name}: no annotations: the whole image is taught as background "
            "(annotate every nucleus, or leave this image out)"
        )
    pad = float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    y0, x0 = max(0.0, boxes[:, 0].min() - pad), max(0.0, boxes[:, 1].min() - pad)
    y1, x1 = min(float(h), boxes[:, 2].max() + pad), min(float(w), boxes[:, 3].max() + pad)
    share = max(0.0, y1 - y0) * max(0.0, x1 - x0) / max(1.0, float(h * w))
    if share >= min_share:
        return None
    return (
        f"{sample.name}: annotations cover only ~{share * 100:.0f} % of the image; unannotated "
        "nuclei are taught as background: annotate every nucleus, or draw rectangles around "
        "the annotated part (an 'annotated region' Shapes layer) so only they are exported"
    )


def yolo_lines(boxes: np.ndarray, classes: np.ndarray, height: int, width: int) -> list[str]:
    """YOLO label lines ``class cx cy w h`` (normalised to [0, 1]) for boxes in pixels.

    Examples
    --------
    >>> yolo_lines(np.array([[10, 20, 30, 60]]), np.array([0]), 100, 200)
    ['0 0.200000 0.200000 0.200000 0.200000']
    """
    lines = []
    for (y0, x0, y1, x1), c in zip(np.asarray(boxes, float), classes, strict=True):
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        w, h = (x1 - x0) / width, (y1 - y0) / height
        lines.append(f"{int(c)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def assign_splits(
    groups: Sequence[str], fractions: Sequence[float] = (0.7, 0.2, 0.1), seed: int = 0
) -> dict[str, str]:
    """Assign each distinct group to train/val/test with the given fractions (seeded).

    Counts are rounded so that every split with a non-zero fraction gets at least one group
    when there are enough groups (val from 2 groups on, test from 3); the remainder goes to
    train. Val comes first because a few-shot run needs held-out images to show that the
    fine-tuned model beats its start.

    Examples
    --------
    >>> sorted(assign_splits(["a", "b"]).values())
    ['train', 'val']
    """
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    target = _split_counts(len(order), fractions)
    n_val, n_test = target["val"], target["test"]
    out = {}
    for i, g in enumerate(order):
        out[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


#: Test gets a group of its own only from this many groups on: with fewer (a few images or
#: regions for a fine-tune), every group but the held-out val one is worth more in training.
MIN_GROUPS_FOR_TEST = 5


def _split_counts(n: int, fractions: Sequence[float]) -> dict[str, int]:
    """How many of ``n`` groups go to train, val and test (see :func:`assign_splits`)."""
    frac = np.asarray(fractions, dtype=float)
    if frac.shape != (3,) or np.any(frac < 0) or frac.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    frac = frac / frac.sum()
    n_val = int(round(frac[1] * n))
    n_test = int(round(frac[2] * n))
    if n >= 2 and frac[0] > 0:  # keep one group for training
        n_val = max(n_val, 1 if frac[1] > 0 else 0)
    if n >= MIN_GROUPS_FOR_TEST:
        n_test = max(n_test, 1 if frac[2] > 0 else 0)
    n_val, n_test = min(n_val, n), min(n_test, max(n - n_val, 0))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def extend_splits(
    existing: dict[str, str] | Counter,
    groups: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
) -> dict[str, str]:
    """Splits of new groups added to a dataset whose groups already have theirs.

    Each new group (in a seeded order) goes where the dataset is furthest below the split
    counts of :func:`assign_splits` for the new total; ties go to train. Exporting one image
    after another thus gives train, val, train...: never a folder of training images only.

    Parameters
    ----------
    existing : dict of group -> split, or Counter of split -> count
        The dataset's groups (or only how many each split has).
    groups : sequence of str
        Groups to place; one already in ``existing`` (a mapping) keeps its split.

    Examples
    --------
    >>> extend_splits({"a": "train"}, ["b"])
    {'b': 'val'}
    >>> extend_splits({"a": "train", "b": "val"}, ["c"])
    {'c': 'train'}
    """
    known = existing if isinstance(existing, dict) and not isinstance(existing, Counter) else {}
    counts = Counter(known.values()) if known else Counter(existing)
    out = {g: known[g] for g in set(groups) if g in known}
    new = sorted(set(groups) - set(out))
    order = [new[i] for i in np.random.default_rng(seed).permutation(len(new))]
    target = _split_counts(sum(counts.values()) + len(order), fractions)
    for g in order:
        split = max(SPLITS, key=lambda s: target[s] - counts[s])  # first of the ties: train
        out[g] = split
        counts[split] += 1
    return out


def merge_samples(samples: Sequence[Sample], extra: Sequence[Sample]) -> list[Sample]:
    """Samples with the boxes of a second annotation layer of the same image(s) added.

    Box deletions live in one layer (Shapes), clicked nuclei often in another (Points): both
    go into one export. An ``extra`` box whose centre lies inside a box of the same sample
    marks a nucleus already there and is left out; ``extra`` samples of names not in
    ``samples`` (another plane or region) are added as they are.
    """
    by_name = {s.name: s for s in extra}
    out = []
    for s in samples:
        other = by_name.pop(s.name, None)
        if other is None or not len(other.boxes):
            out.append(s)
            continue
        boxes = np.asarray(s.boxes, float).reshape(-1, 4)
        new = np.asarray(other.boxes, float).reshape(-1, 4)
        cy, cx = (new[:, 0] + new[:, 2]) / 2, (new[:, 1] + new[:, 3]) / 2
        inside = (
            (cy[:, None] >= boxes[None, :, 0])
            & (cy[:, None] < boxes[None, :, 2])
            & (cx[:, None] >= boxes[None, :, 1])
            & (cx[:, None] < boxes[None, :, 3])
        ).any(axis=1)
        classes = None
        if s.classes is not None or other.classes is not None:
            a = np.zeros(len(boxes), int) if s.classes is None else np.asarray(s.classes)
            b = np.zeros(len(new), int) if other.classes is None else np.asarray(other.classes)
            classes = np.concatenate([a, b[~inside]])
        merged = np.concatenate([boxes, new[~inside]])
        out.append(dataclasses.replace(s, boxes=merged, classes=classes))
    return out + list(by_name.values())


def crop_boxes(
    boxes: np.ndarray, window: tuple[int, int, int, int], min_fraction: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to a window, in window coordinates.

    A box cut by the window edge is kept only if at least ``min_fraction`` of its area lies
    inside: smaller fragments would teach the model to fire on slivers of nuclei.

    Returns
    -------
    boxes : (K, 4) array in window coordinates
    keep : (N,) bool array
    """
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    y0, x0, y1, x1 = window
    inter = np.column_stack(
        [
            np.maximum(b[:, 0], y0),
            np.maximum(b[:, 1], x0),
            np.minimum(b[:, 2], y1),
            np.minimum(b[:, 3], x1),
        ]
    )
    ih = np.clip(inter[:, 2] - inter[:, 0], 0, None)
    iw = np.clip(inter[:, 3] - inter[:, 1], 0, None)
    area = np.clip((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-9, None)
    keep = (ih >= 1) & (iw >= 1) & (ih * iw / area >= min_fraction)
    return inter[keep] - np.array([y0, x0, y0, x0], dtype=float), keep


def crop_to_regions(
    sample: Sample, rectangles: np.ndarray, min_fraction: float = 0.4
) -> list[Sample]:
    """One complete sample per annotated region: the image inside each rectangle, with its boxes.

    A biologist who corrects only part of an image marks that part with a rectangle; exporting
    only the inside means the unannotated rest is never taught as background.

    Parameters
    ----------
    sample : Sample
        The whole image and its boxes.
    rectangles : (R, 4) array
        Regions as ``y0, x0, y1, x1`` pixels (exclusive ends); rounded to whole pixels and
        clipped to the image. A region wholly outside the image is skipped.
    min_fraction : float
        A box cut by a region's edge is kept (clipped) if at least this fraction of its area
        is inside, as for training tiles (:func:`crop_boxes`).

    Returns
    -------
    list of Sample
        Named ``<name>_r<k>``, marked ``complete`` (no partial-annotation warning), with the
        sample's ``group`` and ``split`` (none: each region may land in its own split).

    Examples
    --------
    >>> s = Sample(np.zeros((100, 100)), np.array([[10, 10, 20, 20], [60, 60, 70, 70]]), "a")
    >>> [(c.name, c.image.shape, c.boxes.tolist()) for c in crop_to_regions(s, [[0, 0, 50, 40]])]
    [('a_r0', (50, 40), [[10.0, 10.0, 20.0, 20.0]])]
    """
    image = np.asarray(sample.image)
    h, w = image.shape[:2]
    crops = []
    for k, (y0, x0, y1, x1) in enumerate(np.asarray(rectangles, dtype=float).reshape(-1, 4)):
        win = (
            int(np.clip(round(y0), 0, h)),
            int(np.clip(round(x0), 0, w)),
            int(np.clip(round(y1), 0, h)),
            int(np.clip(round(x1), 0, w)),
        )
        if win[2] - win[0] < 1 or win[3] - win[1] < 1:
            continue
        boxes, keep = crop_boxes(sample.boxes, win, min_fraction)
        classes = None if sample.classes is None else np.asarray(sample.classes)[keep]
        crops.append(
            Sample(
                image=image[win[0] : win[2], win[1] : win[3]],
                boxes=boxes,
                name=f"{sample.name}_r{k}",
                classes=classes,
                group=sample.group,
                split=sample.split,
                complete=True,
            )
        )
    return crops


def _normalise(image: np.ndarray, normalize: str, percentiles: Sequence[float]) -> np.ndarray:
    img = np.asarray(image)
    if normalize == "percentile":
        lo, hi = percentile_range(img, *percentiles)
        return to_uint8(img, lo, hi)
    if normalize == "none":
        if img.dtype != np.uint8:
            raise ValueError(
                f"normalize='none' keeps pixels as they are and needs 8-bit images, got {img.dtype}"
            )
        return img
    raise ValueError(f"unknown normalize {normalize!r}: use 'percentile' or 'none'")


def _regions(shape: tuple[int, int], block: int | None) -> list[tuple[int, int, int, int]]:
    """Non-overlapping blocks of an image; tiles are cut inside a block, never across two."""
    h, w = shape
    if block is None or (block >= h and block >= w):
        return [(0, 0, h, w)]
    return [
        (y, x, min(y + block, h), min(x + block, w))
        for y in range(0, h, block)
        for x in range(0, w, block)
    ]


def _pad_long_side(crop: np.ndarray, tile: int) -> np.ndarray:
    """Zero-pad the longer side up to ``tile``: ultralytics resizes every training image so
    its longer side equals ``imgsz``; padding keeps the nuclei at their pixel size."""
    h, w = crop.shape[:2]
    shape = (tile, w) if h >= w else (h, tile)
    padded = np.zeros(shape + crop.shape[2:], dtype=crop.dtype)
    padded[:h, :w] = crop
    return padded


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(img)).save(path, compress_level=1)


def check_out_folder(
    out: str | os.PathLike | None,
    overwrite: bool = False,
    overwrite_hint: str = "pass overwrite=True (--overwrite)",
) -> Path:
    """The dataset folder :func:`export_dataset` may write: absent, empty, or ``overwrite``.

    Parameters
    ----------
    out : path or None
        Output folder (None, empty or ``.``: none chosen).
    overwrite : bool
        Allow a non-empty folder (it is replaced).
    overwrite_hint : str
        How the user allows it, for the message (the widget names its check box).

    Returns
    -------
    Path
        ``out``, expanded.

    Raises
    ------
    ValueError
        No folder given.
    FileExistsError
        ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    if out is None or not str(out).strip() or str(out) == ".":
        raise ValueError("choose an output folder")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty (it may already hold a dataset); choose an empty folder or "
            f"{overwrite_hint} to replace it"
        )
    return out


def safe_name(name: str) -> str:
    """``name`` as a file-name stem: runs of other characters than ``A-Za-z0-9_.-`` -> ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"


def plane_samples(
    image: Any, name: str, boxes: dict[int, np.ndarray], *, rgb: bool = False
) -> list[Sample]:
    """One :class:`Sample` per annotated plane of an image (stack).

    Parameters
    ----------
    image : array-like
        ``(..., Y, X)``, or ``(..., Y, X, 3|4)`` when ``rgb``; only annotated planes are read.
    name : str
        File-name stem of the written tiles (made safe; ``_p<k>`` is appended per plane of
        a stack).
    boxes : dict of int to (N, 4) array
        Boxes by flat plane index, see
        :func:`~napari_yolocell.training.annotations.annotation_boxes`.
    rgb : bool
        Whether the last axis of ``image`` is colour.

    Returns
    -------
    list of Sample, by plane.
    """
    plane_shape = tuple(image.shape[:-3] if rgb else image.shape[:-2])
    base = safe_name(name)
    samples = []
    for plane, plane_boxes in sorted(boxes.items()):
        index = np.unravel_index(plane, plane_shape) if plane_shape else ()
        pixels = np.asarray(image[index])
        samples.append(
            Sample(
                image=pixels, boxes=plane_boxes, name=f"{base}_p{plane}" if plane_shape else base
            )
        )
    return samples


def samples_from_annotations(
    image: Any,
    image_name: str,
    kind: str,
    annotations: Any,
    *,
    rgb: bool = False,
    ann_name: str = "annotations",
    regions: Any = None,
    region_options: dict[str, Any] | None = None,
    **options: Any,
) -> list[Sample]:
    """Samples of an image and its napari annotation layer (Shapes, Points or Labels data).

    With ``regions`` (an "annotated region" Shapes layer), only the image inside its shapes is
    exported, each one as its own sample (:func:`crop_to_regions`); annotations outside every
    region are left out, and so are planes without a region.

    Parameters
    ----------
    image : array-like
        Full-resolution image data: ``(..., Y, X)`` or ``(..., Y, X, 3|4)`` when ``rgb``.
    image_name : str
        File-name stem of the written tiles, see :func:`plane_samples`.
    kind : {"shapes", "points", "labels"}
        Annotation layer type.
    annotations : list of arrays, or array
        The layer's data, in napari data coordinates.
    rgb : bool
        Whether the last axis of ``image`` is colour.
    ann_name : str
        The annotation layer's name, for the messages.
    regions : list of arrays, optional
        The region layer's ``Shapes.data`` (each shape's bounding box is a region), in napari
        data coordinates.
    region_options : dict, optional
        ``shape_types``, ``name`` and the region layer's ``ann_scale`` / ``ann_translate``
        (the image transforms are taken from ``options``).
    **options
        ``diameter``, ``shape_types`` and the layer transforms of
        :func:`~napari_yolocell.training.annotations.annotation_boxes`.

    Returns
    -------
    list of Sample, one per annotated plane.

    Raises
    ------
    ValueError
        See :func:`~napari_yolocell.training.annotations.annotation_boxes`.
    """
    shape = tuple(int(n) for n in (image.shape[:-1] if rgb else image.shape))
    boxes = annotation_boxes(kind, annotations, shape, name=ann_name, **options)
    if regions is None:
        return plane_samples(image, image_name, boxes, rgb=rgb)
    image_tf = {k: options[k] for k in ("image_scale", "image_translate") if k in options}
    rects = annotation_boxes(
        "shapes",
        regions,
        shape,
        **{"name": "annotated region", **image_tf, **(region_options or {})},
    )
    # A plane with a region but no boxes is kept: the region says it holds no nucleus.
    planes = {p: boxes.get(p, np.zeros((0, 4))) for p in rects}
    samples = plane_samples(image, image_name, planes, rgb=rgb)
    return [
        crop
        for s, p in zip(samples, sorted(planes), strict=True)
        for crop in crop_to_regions(s, rects[p])
    ]


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder to ``out``; an old ``out`` is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_dataset(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a dataset written by :func:`export_dataset` (it can be added to)."""
    out = Path(out).expanduser()
    return (out / "data.yaml").is_file() and (out / "dataset.json").is_file()


def _existing_sources(out: Path) -> dict[str, str] | Counter:
    """The dataset's groups and their splits (older datasets: how many per split)."""
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    if isinstance(meta.get("sources"), dict):
        return dict(meta["sources"])
    return Counter({k: int(v) for k, v in (meta.get("n_sources") or {}).items()})


def _drop_sample_files(root: Path, name: str) -> int:
    """Remove the tiles (images and labels) of one sample name; returns how many tiles."""
    n = 0
    for sp in SPLITS:
        for png in (root / "images" / sp).glob(f"{_glob_escape(name)}_y*_x*.png"):
            png.unlink()
            (root / "labels" / sp / f"{png.stem}.txt").unlink(missing_ok=True)
            n += 1
    return n


def _glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def _count_dataset(root: Path) -> dict[str, dict[str, int]]:
    """Tiles and objects per split of a written dataset."""
    images, objects = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    for sp in SPLITS:
        for png in (root / "images" / sp).glob("*.png"):
            images[sp] += 1
            label = root / "labels" / sp / f"{png.stem}.txt"
            if label.is_file():
                objects[sp] += sum(1 for ln in label.read_text().splitlines() if ln.strip())
    return {"n_images": images, "n_objects": objects}


def export_dataset(
    samples: Sequence[Sample],
    out: str | os.PathLike,
    *,
    tile: int = 640,
    overlap: int = 64,
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
    names: Sequence[str] = ("nucleus",),
    min_fraction: float = 0.4,
    normalize: str = "percentile",
    percentiles: Sequence[float] = (1.0, 99.8),
    pad: bool = True,
    region: int | None = None,
    min_regions: int = 10,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    append: bool = False,
) -> ExportReport:
    """Write samples as a YOLO dataset (see module docstring for the layout).

    Parameters
    ----------
    samples : sequence of Sample
    out : path
        Output folder; must be empty or absent unless ``overwrite`` (or ``append`` to a
        dataset there). Everything is written to a temporary sibling folder first and renamed
        into place, so a crash leaves no half dataset (and an appended one as it was).
    tile, overlap : int
        Training tile size and overlap in pixels. Images larger than ``tile`` are cut.
    fractions : (train, val, test)
        Split fractions by source region (default 70/20/10); ``Sample.split`` overrides.
    min_fraction : float
        A box cut by a tile edge is kept if at least this fraction of its area is inside.
    normalize : {"percentile", "none"}
        ``percentile``: clip to ``percentiles`` of each source image, map to 0..255 (the
        detection default). ``none``: 8-bit images are written as they are.
    pad : bool
        Zero-pad the longer side of images smaller than ``tile`` up to ``tile`` (ultralytics
        would otherwise upscale them, changing the nucleus size the model learns). Train with
        ``imgsz=tile``.
    region : int, optional
        Block size (px) to split large images into independent regions, so several splits can
        come from one big image without leakage. Default: chosen so that there are at least
        ``min_regions`` regions in all.
    append : bool
        When ``out`` holds a dataset (:func:`is_dataset`), add these samples to it: the
        dataset's source regions keep their splits, new ones are placed by
        :func:`extend_splits`; a sample exported before (same name) has its tiles replaced.
        Without a dataset there, a new one is written.
    """
    if not samples:
        raise ValueError("no samples to export")
    if tile < 32:
        raise ValueError(f"tile must be >= 32 px, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap}")
    out = Path(out).expanduser().absolute()
    adding = append and not overwrite and is_dataset(out)
    if not adding:
        check_out_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")

    if region is None and len(samples) < min_regions:
        # Few (large) images: cut them into blocks so val/test come from other regions.
        total_px = sum(s.image.shape[0] * s.image.shape[1] for s in samples)
        side = int(np.sqrt(total_px / min_regions))
        region = max(tile, (side // tile) * tile) if side >= tile else None

    # Decide the regions and their groups first, so splits are known before writing.
    plan = []
    for s in samples:
        img = np.asarray(s.image)
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
            raise ValueError(
                f"{s.name}: image must be 2-D (H, W) or RGB (H, W, 3), got shape {img.shape}; "
                "choose a channel/plane first"
            )
        regs = _regions(img.shape[:2], region)
        base = s.group or s.name
        for k, reg in enumerate(regs):
            plan.append((s, reg, base if len(regs) == 1 else f"{base}#r{k}"))
    free_groups = [g for s, _, g in plan if s.split is None]
    existing = _existing_sources(out) if adding else {}
    if adding:
        split_of = extend_splits(existing, free_groups, fractions, seed) if free_groups else {}
    else:
        split_of = assign_splits(free_groups, fractions, seed) if free_groups else {}

    opts = {
        "tile": tile,
        "overlap": overlap,
        "pad": pad,
        "normalize": normalize,
        "percentiles": percentiles,
        "min_fraction": min_fraction,
        "progress": progress,
        "seed": seed,
        "fractions": fractions,
    }
    report = ExportReport(path=out)
    try:
        if adding:
            shutil.copytree(out, tmp)
            replaced = [s.name for s in samples if _drop_sample_files(tmp, s.name)]
            if replaced:
                report.warnings.append(
                    f"exported again, earlier tiles replaced: {', '.join(sorted(set(replaced)))}"
                )
        for sp in SPLITS:
            (tmp / "images" / sp).mkdir(parents=True, exist_ok=True)
            (tmp / "labels" / sp).mkdir(parents=True, exist_ok=True)
        sources = _write_plan(plan, split_of, tmp, report, opts)
        for sp in SPLITS:
            report.n_sources[sp] = sum(1 for split, _ in sources if split == sp)
        mapping = dict(existing) if isinstance(existing, dict) else {}
        mapping.update({grp: split for split, grp in sources})
        totals = _count_dataset(tmp)
        if isinstance(existing, Counter):  # an older dataset: its sources by count only
            counts = Counter(existing) + Counter(mapping.values())
        else:
            counts = Counter(mapping.values())
        totals["n_sources"] = {sp: int(counts.get(sp, 0)) for sp in SPLITS}
        if adding:
            report.totals = totals
        _check_splits(totals["n_images"], report)
        _write_yaml_and_meta(tmp, out, names, totals, mapping, report, opts)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_plan(plan, split_of, tmp: Path, report: ExportReport, opts: dict) -> set:
    """Normalise each source once and write its tiles; returns the ``(split, group)`` set."""
    norm_cache: dict[int, np.ndarray] = {}
    seen_sources: set[tuple[str, str]] = set()
    tile, overlap, pad = opts["tile"], opts["overlap"], opts["pad"]
    for i, (s, reg, grp) in enumerate(plan):
        split = s.split or split_of[grp]
        if split not in SPLITS:
            raise ValueError(f"{s.name}: split must be one of {SPLITS}, got {split!r}")
        if id(s) not in norm_cache:
            norm_cache.clear()  # one source image in memory at a time
            norm_cache[id(s)] = _normalise(s.image, opts["normalize"], opts["percentiles"])
            classes = np.zeros(len(s.boxes), int) if s.classes is None else s.classes
            boxes, keep, rep = clip_boxes(s.boxes, s.image.shape[:2])
            cls_kept = np.asarray(classes)[keep]
            if rep.messages:
                report.warnings.append(f"{s.name}: {rep.summary()}")
            partial = None if s.complete else coverage_warning(s)
            if partial is not None:
                report.warnings.append(partial)
        img8 = norm_cache[id(s)]
        seen_sources.add((split, grp))
        ry0, rx0, ry1, rx1 = reg
        for t in tile_grid((ry1 - ry0, rx1 - rx0), tile=tile, overlap=overlap):
            win = (ry0 + t.y0, rx0 + t.x0, ry0 + t.y1, rx0 + t.x1)
            crop = img8[win[0] : win[2], win[1] : win[3]]
            tb, tkeep = crop_boxes(boxes, win, opts["min_fraction"])
            if pad and max(crop.shape[:2]) < tile:
                crop = _pad_long_side(crop, tile)
            name = f"{s.name}_y{win[0]}_x{win[1]}"
            _write_png(tmp / "images" / split / f"{name}.png", crop)
            lines = yolo_lines(tb, cls_kept[tkeep], crop.shape[0], crop.shape[1])
            (tmp / "labels" / split / f"{name}.txt").write_text(
                "\n".join(lines) + ("\n" if lines else "")
            )
            report.n_images[split] += 1
            report.n_objects[split] += len(lines)
        if opts["progress"] is not None:
            opts["progress"](i + 1, len(plan))
    return seen_sources


def _check_splits(n_images: dict[str, int], report: ExportReport) -> None:
    """Refuse a dataset without training tiles; warn of an empty val or test split."""
    if n_images["train"] == 0:
        raise ValueError("the train split is empty: give more images or other fractions")
    if n_images["val"] == 0:
        report.warnings.append(
            "the val split is empty: training will validate on its own training images, "
            "so its scores look better than they are (raise 'val fraction' or add images)"
        )
    if n_images["test"] == 0:
        report.warnings.append(
            "the test split is empty: Evaluate has no independent images to score"
        )


def _write_yaml_and_meta(tmp, out, names, totals, mapping, report, opts) -> None:
    """``data.yaml`` and ``dataset.json`` of the whole dataset (after an append: all of it)."""
    n_images = totals["n_images"]
    data = {
        "path": str(out),
        "train": "images/train",
        "val": "images/val" if n_images["val"] else "images/train",
        "test": "images/test" if n_images["test"] else None,
        "nc": len(names),
        "names": {i: n for i, n in enumerate(names)},
    }
    if data["test"] is None:
        del data["test"]
    (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    meta = {
        "normalize": opts["normalize"],
        "percentiles": list(opts["percentiles"]),
        "tile": opts["tile"],
        "overlap": opts["overlap"],
        "min_fraction": opts["min_fraction"],
        "seed": opts["seed"],
        "fractions": list(opts["fractions"]),
        **totals,
        "sources": mapping,
        "warnings": report.warnings,
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
