"""Benchmark tiled detection on a large synthetic BigTIFF.

Variants, each run in its own subprocess so peak RSS (``ru_maxrss``) is per variant:

a. ``bare``   - batched forward pass only, over tiles cut and normalised beforehand (in RAM);
                the ceiling any tiling engine can reach with this model.
b. ``engine`` - :func:`napari_yolocell.engine.detect.detect_image` end to end from the lazy BigTIFF
                (read tiles, normalise, forward, exact border merge).
c. ``sahi``   - SAHI ``get_sliced_prediction`` with the same ultralytics model on the same
                normalised image (loaded whole, as SAHI needs); skipped if SAHI is missing.
d. ``default`` - (b) with the runtime `yolocell detect` uses by default on a CPU (``auto``:
                OpenVINO, INT8 for the bundled models).

(a) and (b) use ``--backend`` (default PyTorch, as SAHI does), so ``--backend openvino-int8
--variants bare,engine`` gives the engine's overhead over the bare INT8 forward pass.

Timings exclude imports and model loading; each variant warms the model up on one tile first
and reports the best of ``--repeat`` runs (the CPU may be shared).
With an untrained architecture (``--model yolov5n.yaml``) the counts are meaningless: rerun with
trained weights (``--model path/to/best.pt``) to compare counts.

Usage::

    python benchmarks/bench_detect.py --size 4096 --model yolov5n.yaml
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("bare", "engine", "sahi", "default")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _best_of(fn, repeat: int) -> tuple[float, object]:
    """Fastest of ``repeat`` timed calls (the CPU may be shared) and the last result."""
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _setup(args, backend: str = "torch"):
    """Open the TIFF lazily, load the detector and resolve the engine's parameters."""
    from napari_yolocell.engine.detect import DetectParams, resolve_params
    from napari_yolocell.io.tiff import open_tiff
    from napari_yolocell.models.loading import load_detector

    image = open_tiff(args.tiff)
    detector = load_detector(args.model, device=args.device, backend=backend)
    params, _ = resolve_params(DetectParams(tile=args.tile, batch=args.batch), detector.spec)
    detector.predict(
        [np.zeros((args.tile, args.tile, 3), np.uint8)], params.conf, params.iou, params.max_det
    )  # warm-up: predictor setup is not part of the timing
    return image, detector, params


def _value_range(image, params) -> tuple[float, float]:
    from napari_yolocell.engine.normalize import percentile_range

    return percentile_range(image.levels[min(1, len(image.levels) - 1)], *params.percentiles)


def run_bare(args) -> dict:
    """(a) Forward pass only, over pre-cut, pre-normalised tiles."""
    from napari_yolocell.engine.normalize import to_uint8
    from napari_yolocell.engine.tiling import tile_grid

    image, detector, params = _setup(args, args.backend)
    lo, hi = _value_range(image, params)
    plane = image.levels[0]
    tiles = tile_grid(plane.shape[-2:], params.tile, params.overlap)
    # the tiles the engine hands this detector: grey (H, W) where it takes them (OpenVINO
    # feeds those to the network as uint8), else three identical channels
    grey = getattr(detector, "grey_tiles", False)
    inputs = [to_uint8(np.asarray(plane[t.slices]), lo, hi) for t in tiles]
    if not grey:
        inputs = [np.repeat(u8[..., None], 3, axis=2) for u8 in inputs]
    if getattr(detector, "needs_overview", False):  # classical: plane-wide threshold
        detector.prepare(to_uint8(np.asarray(image.levels[-1]), lo, hi))

    def forward() -> int:
        count = 0
        for i in range(0, len(inputs), params.batch):
            out = detector.predict(
                inputs[i : i + params.batch], params.conf, params.iou, params.max_det
            )
            count += sum(len(b) for b in out)
        return count

    seconds, count = _best_of(forward, args.repeat)
    return {"seconds": seconds, "count": count, "tiles": len(tiles)}


def run_engine(args) -> dict:
    """(b) Our engine end to end from the lazy BigTIFF."""
    from napari_yolocell.engine.detect import detect_image

    image, detector, params = _setup(args, args.backend)
    seconds, df = _best_of(lambda: detect_image(image.levels, detector, params), args.repeat)
    return {"seconds": seconds, "count": len(df)}


def run_default(args) -> dict:
    """(d) Our engine with the default CPU runtime (``backend="auto"``)."""
    from napari_yolocell.engine.detect import detect_image

    image, detector, params = _setup(args, backend="auto")
    seconds, df = _best_of(lambda: detect_image(image.levels, detector, params), args.repeat)
    return {"seconds": seconds, "count": len(df), "runtime": type(detector).__name__}


def run_sahi(args) -> dict:
    """(c) SAHI sliced prediction with the same ultralytics model."""
    try:
        from sahi import AutoDetectionModel
        from sahi.predict import get_sliced_prediction
    except ImportError:
        return {"skipped": "sahi not installed"}
    from napari_yolocell.engine.normalize import to_uint8

    image, detector, params = _setup(args)
    model = AutoDetectionModel.from_pretrained(
        model_type="ultralytics",
        model=detector.model,
        confidence_threshold=params.conf,
        device=detector.device,
        image_size=params.tile,
    )

    def sliced():
        # SAHI needs the whole image in memory: reading + normalising it is part of its cost.
        lo, hi = _value_range(image, params)
        grey = to_uint8(np.asarray(image.levels[0]), lo, hi)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        return get_sliced_prediction(
            rgb,
            model,
            slice_height=params.tile,
            slice_width=params.tile,
            overlap_height_ratio=params.overlap / params.tile,
            overlap_width_ratio=params.overlap / params.tile,
            perform_standard_pred=False,
            postprocess_class_agnostic=True,
            verbose=0,
            batch_size=params.batch,
        )

    seconds, result = _best_of(sliced, args.repeat)
    return {"seconds": seconds, "count": len(result.object_prediction_list)}


def _run_variant(args) -> None:
    runners = {"bare": run_bare, "engine": run_engine, "sahi": run_sahi, "default": run_default}
    result = runners[args.variant](args)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _spawn(args, variant: str, tiff: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--tiff",
        str(tiff),
        "--model",
        args.model,
        "--tile",
        str(args.tile),
        "--batch",
        str(args.batch),
        "--repeat",
        str(args.repeat),
        "--backend",
        args.backend,
    ]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


LABELS = {
    "bare": "(a) bare batched forward, pre-cut tiles",
    "engine": "(b) napari-yolocell detect_image, lazy BigTIFF",
    "sahi": "(c) SAHI get_sliced_prediction",
    "default": "(d) detect_image with the default CPU runtime (auto)",
}


def format_table(results: dict, size: int) -> str:
    """Markdown table of the variants with throughput and ratios."""
    mpix = size * size / 1e6
    lines = [
        "| variant | seconds | MPix/s | peak RSS (MB) | count |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, res in results.items():
        if "skipped" in res:
            lines.append(f"| {LABELS[name]} | skipped ({res['skipped']}) | | | |")
            continue
        lines.append(
            f"| {LABELS[name]} | {res['seconds']:.1f} | {mpix / res['seconds']:.2f} | "
            f"{res['peak_rss_mb']:.0f} | {res['count']} |"
        )
    secs = {k: v.get("seconds") for k, v in results.items()}
    if secs.get("bare") and secs.get("engine"):
        lines.append(f"\nratio b/a (engine overhead): {secs['engine'] / secs['bare']:.2f}")
    if secs.get("engine") and secs.get("sahi"):
        lines.append(f"ratio c/b (SAHI vs engine): {secs['sahi'] / secs['engine']:.2f}")
    if secs.get("default") and secs.get("sahi"):
        lines.append(
            f"ratio c/d (SAHI vs engine, default runtimes): {secs['sahi'] / secs['default']:.2f}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="image side in pixels")
    parser.add_argument("--model", default="default", help="model name, YAML or .pt")
    parser.add_argument("--tile", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda:0 (default: auto)")
    parser.add_argument(
        "--backend", default="torch", help="runtime of variants a and b (default torch)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per variant (best)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tiff", default=None, help="use this TIFF instead of a synthetic one")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        _run_variant(args)
        return
    truth = "unknown"
    with tempfile.TemporaryDirectory() as tmp:
        tiff = Path(args.tiff) if args.tiff else Path(tmp) / "bench.tif"
        if not args.tiff:
            from napari_yolocell.data.synthetic_tiff import write_synthetic_tiff

            truth = len(
                write_synthetic_tiff(tiff, shape=(args.size, args.size), tile=512, levels=3)
            )
        results = {v: _spawn(args, v, tiff) for v in args.variants.split(",")}
    print(
        f"\nsize {args.size}x{args.size}, model {args.model}, tile {args.tile}, "
        f"batch {args.batch}, a/b backend {args.backend}, true nuclei {truth}\n"
    )
    print(format_table(results, args.size))


if __name__ == "__main__":
    main()
