"""Automatic nucleus size on dim + saturated images: the Otsu estimate and alternatives (issue #20).

``engine/size.estimate_diameter`` thresholds the image with Otsu: when some nuclei saturate, the
threshold lands between them and the background and dim nuclei vanish (or shrink), so the
estimate follows the bright ones. Each variant here changes only the intensity the threshold
sees (a monotone transform, so the nuclei keep their shape):

* ``otsu``: the current estimate;
* ``log``: Otsu of ``log(1 + img - min)``;
* ``rank``: Otsu of the histogram-equalised image (intensity ranks: independent of how bright);
* ``sqrt``: Otsu of ``sqrt(img - min)`` (gamma 0.5).

Each is read on the strided overview detection uses and compared with the truth (median box
diameter ``sqrt(w * h)`` of the labelled nuclei); what matters for detection is the decision
``estimate > AUTO_HIGH x model diameter`` (resize or not), scored against the same decision
from the truth.

    python benchmarks/bench_size.py --sources bitdepth mnfinder dsb2018 kromp bbbc039-test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from bench_heldout import DEFAULT_DATA, items

MODEL_DIAMETER = 23.0  # the bundled v5n's training diameter (registry)


def variants() -> dict:
    from skimage.exposure import equalize_hist

    def shift(img):
        return img - float(np.nanmin(img))

    return {
        "otsu": lambda img: img,
        "log": lambda img: np.log1p(shift(img)),
        "sqrt": lambda img: np.sqrt(shift(img)),
        "rank": lambda img: equalize_hist(img, nbins=1024),
    }


def overview(img: np.ndarray) -> tuple[np.ndarray, int]:
    """The strided overview :func:`napari_yolocell.engine.detect.measure_diameter` reads."""
    from napari_yolocell.engine.size import AUTO_HIGH

    k = max(1, int(AUTO_HIGH * MODEL_DIAMETER / 16))
    return np.asarray(img[::k, ::k], dtype=np.float32), k


FOLDERS = {"dsb2018": "dsb2018_stage1_train_fluo", "kromp": "kromp2020_s_bsst265"}


def source_items(data: Path, source: str) -> list[tuple[Path, np.ndarray, str]]:
    """bench_heldout's sources, plus DSB2018 (fluorescence) and Kromp 2020 (``id`` rows)."""
    if source not in FOLDERS:
        return items(data, source)
    import csv

    import tifffile

    from napari_yolocell.training.annotations import boxes_from_labels

    folder = data / FOLDERS[source]
    with open(folder / "counts.csv") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)]
    out = []
    for name in ids:
        image = next(iter(sorted((folder / "images").glob(f"{name}.*"))), None)
        if image is None:
            continue
        boxes = boxes_from_labels(tifffile.imread(folder / "labels" / f"{name}.tif"), min_area=25)
        out.append((image, boxes, name))
    return out


def grey(path: Path) -> np.ndarray:
    from napari_yolocell.analysis.evaluate import _read_image

    img = np.asarray(_read_image(path), dtype=np.float32)
    return img.max(axis=-1) if img.ndim == 3 else img


def main(argv=None) -> None:
    from napari_yolocell.engine.size import AUTO_HIGH, estimate_diameter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sources", nargs="+", default=["bitdepth", "mnfinder", "bbbc039-test"])
    args = p.parse_args(argv)
    fns = variants()
    high = AUTO_HIGH * MODEL_DIAMETER
    print(
        "| source (images) | truth median px | "
        + " | ".join(f"{v}: est/truth median (10-90 %), decisions right" for v in fns)
        + " |"
    )
    print("| --- | ---: | " + " | ".join("---" for _ in fns) + " |")
    for source in args.sources:
        its = source_items(args.data, source)
        truth, est = [], {v: [] for v in fns}
        for path, boxes, _ in its:
            if not len(boxes):
                continue
            d = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
            truth.append(float(np.median(d)))
            ov, k = overview(grey(path))
            for v, fn in fns.items():
                e = estimate_diameter(fn(ov))
                est[v].append(np.nan if e is None else e * k)
        t = np.asarray(truth)
        cells = []
        for v in fns:
            e = np.asarray(est[v])
            r = e / t
            right = np.mean((np.nan_to_num(e) > high) == (t > high))
            cells.append(
                f"{np.nanmedian(r):.2f} ({np.nanpercentile(r, 10):.2f}-"
                f"{np.nanpercentile(r, 90):.2f}), {100 * right:.0f} %"
            )
        print(f"| {source} ({len(t)}) | {np.median(t):.0f} | " + " | ".join(cells) + " |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
