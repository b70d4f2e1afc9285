"""Dim nuclei next to saturated ones: alternatives to the percentile 1-99.8 stretch (issue #20).

The bundled model (default runtime, automatic size, its default confidence) detects each image
of a source once per variant; only the intensities it sees change:

* ``percentile``: today's normalisation (clip to the 1 / 99.8 percentiles, stretch to 8 bit);
* ``gamma 0.5`` / ``log``: ``sqrt(img - min)`` / ``log(1 + img - min)`` first, then the same
  stretch (dim nuclei are lifted relative to saturated ones);
* ``clahe``: the percentile stretch, then contrast-limited adaptive histogram equalisation
  (``skimage.exposure.equalize_adapthist``, kernel 1/8 of the image, clip 0.01), i.e. contrast
  adapted per region; detected with ``normalize="none"``.

Scored one-to-one at IoU 0.5 (truth objects >= 25 px), F1 / count error (bias).

    python benchmarks/bench_normalize.py --sources bitdepth mnfinder
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from bench_heldout import DEFAULT_DATA, items


def variants() -> dict:
    from skimage.exposure import equalize_adapthist

    from napari_yolocell.engine.normalize import percentile_range, to_uint8

    def shift(img):
        return img - float(img.min())

    def clahe(img):
        lo, hi = percentile_range(img, 1.0, 99.8)
        eq = equalize_adapthist(to_uint8(img, lo, hi), kernel_size=max(8, min(img.shape) // 8))
        return (eq * 255).round().astype(np.uint8)

    return {
        "percentile": (lambda img: img, "percentile"),
        "gamma 0.5": (lambda img: np.sqrt(shift(img)), "percentile"),
        "log": (lambda img: np.log1p(shift(img)), "percentile"),
        "clahe": (clahe, "none"),
    }


def grey(path: Path) -> np.ndarray:
    from napari_yolocell.analysis.evaluate import _read_image

    img = np.asarray(_read_image(path), dtype=np.float32)
    return img.max(axis=-1) if img.ndim == 3 else img


def main(argv=None) -> None:
    from napari_yolocell.analysis.evaluate import evaluate_predictions
    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models.loading import load_detector

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sources", nargs="+", default=["bitdepth", "mnfinder"])
    p.add_argument("--model", default="default")
    p.add_argument("--only", nargs="*", default=None, help="variants to run")
    args = p.parse_args(argv)
    det = load_detector(args.model, device="cpu", backend="auto")
    conf = float(det.spec.default_conf)
    chosen = {k: v for k, v in variants().items() if not args.only or k in args.only}
    print(f"| variant ({args.model}, conf {conf:.2f}) | " + " | ".join(args.sources) + " |")
    print("| --- | " + " | ".join("---:" for _ in args.sources) + " |")
    for name, (fn, normalize) in chosen.items():
        cells = []
        for source in args.sources:
            t0, per = time.perf_counter(), []
            for path, truth, image_name in items(args.data, source):
                img = fn(grey(path))
                df = detect_image(img, det, DetectParams(conf=conf, normalize=normalize))
                per.append(
                    (
                        df[["y0", "x0", "y1", "x1"]].to_numpy(float),
                        df["confidence"].to_numpy(float),
                        truth,
                        image_name,
                    )
                )
            r = evaluate_predictions(per, conf=0.0, conf_grid=[0.0])
            cells.append(
                f"{r['f1']:.3f} / {100 * r['count_error']:.1f}% ({100 * r['count_bias']:+.0f}%)"
            )
            print(f"{name} {source}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
