"""Scale benchmark: backends on a gigapixel BigTIFF, many-image batches, resume.

Parts (``--parts a,b,c``):

a. Whole slide: a synthetic tiled, pyramidal, zlib BigTIFF (default 32768 x 32768 = 1 gigapixel)
   with known nuclei is counted end to end with each backend (torch, onnxruntime, openvino),
   each in a fresh subprocess: seconds, Mpx/s, peak RSS (``VmHWM``), count vs truth, skipped
   tiles, and the ratio to the bare forward pass of the same tiles with the same backend
   (tiles read and normalised outside the timed region; only ``Detector.predict`` is timed).
b. Many images: a folder of ``--n-images`` 1-megapixel TIFFs counted with ``yolocell detect``
   in one process and with ``--workers 2``: images/s.
c. Resume: the single-process run of (b) is SIGKILLed once half of its part files exist, then
   started again; its CSVs must equal the uninterrupted run's byte for byte.

Model loading and the one-off export (cached) are excluded from (a) timings (warm-up), not from
(b)/(c) wall times. The table is printed and written between ``<!-- bench_scale:start -->`` and
``<!-- bench_scale:end -->`` in ``docs/benchmarks.md`` (other sections are kept).

Usage::

    python benchmarks/bench_scale.py                       # full size (long)
    python benchmarks/bench_scale.py --size 4096 --n-images 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("torch", "onnxruntime", "openvino", "openvino-int8")
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench_scale:start -->", "<!-- bench_scale:end -->"
TARGETS = {"overhead": 1.15, "gigapixel_s": 90.0, "rss_mb": 1500.0}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``) in MB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------
# (a) whole slide, one backend per subprocess


def _variant(args) -> dict:
    from napari_yolocell.engine.detect import DetectParams, detect_image, resolve_params
    from napari_yolocell.engine.normalize import percentile_range, to_uint8
    from napari_yolocell.engine.tiling import tile_grid
    from napari_yolocell.io.tiff import open_tiff
    from napari_yolocell.models.detector import as_rgb
    from napari_yolocell.models.loading import load_detector

    image = open_tiff(args.tiff)
    detector = load_detector(args.model, device="cpu", backend=args.backend)
    params, _ = resolve_params(DetectParams(tile=args.tile, batch=args.batch), detector.spec)
    warm = [np.zeros((args.tile, args.tile, 3), np.uint8)] * args.batch
    detector.predict(warm, params.conf, params.iou, params.max_det)  # compile / set up
    plane = image.levels[0]
    tiles = tile_grid(plane.shape[-2:], params.tile, params.overlap)
    if args.variant == "engine":
        start = time.perf_counter()
        df = detect_image(image.levels, detector, DetectParams(tile=args.tile, batch=args.batch))
        return {
            "seconds": time.perf_counter() - start,
            "count": len(df),
            "tiles": len(tiles),
            "skipped": int(df.attrs.get("skipped_tiles", 0)),
            "rss_mb": peak_rss_mb(),
        }
    # bare: forward passes (Detector.predict) alone, timed on an even sample of the tiles that
    # hold nuclei (the ones the engine runs); tiles read and normalised untimed.
    import pandas as pd

    truth = pd.read_csv(args.truth)
    cy = np.asarray(truth["y"]) // 1
    cx = np.asarray(truth["x"]) // 1
    busy = [t for t in tiles if ((cy >= t.y0) & (cy < t.y1) & (cx >= t.x0) & (cx < t.x1)).any()]
    n = min(len(busy), max(params.batch, args.bare_sample // params.batch * params.batch))
    sample = [busy[int(i)] for i in np.linspace(0, len(busy) - 1, n)] if busy else []
    stats = image.levels[min(len(image.levels) - 1, 2)]
    lo, hi = percentile_range(stats, *params.percentiles)
    seconds = 0.0
    for i in range(0, len(sample), params.batch):
        # the tiles as the engine hands them over: grey where the detector takes grey
        batch = [
            to_uint8(np.asarray(plane[t.slices]), lo, hi) for t in sample[i : i + params.batch]
        ]
        if not getattr(detector, "grey_tiles", False):
            batch = [as_rgb(t) for t in batch]
        start = time.perf_counter()
        detector.predict(batch, params.conf, params.iou, params.max_det)
        seconds += time.perf_counter() - start
    return {
        "per_tile_s": seconds / max(1, len(sample)),
        "sampled": len(sample),
        "rss_mb": peak_rss_mb(),
    }


def _spawn_variant(args, variant: str, backend: str, tiff: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--backend",
        backend,
        "--tiff",
        str(tiff),
        "--model",
        args.model,
        "--tile",
        str(args.tile),
        "--batch",
        str(args.batch),
        "--truth",
        str(tiff.with_suffix(".truth.csv")),
        "--bare-sample",
        str(args.bare_sample),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_a(args, work: Path) -> tuple[str, dict]:
    import pandas as pd

    from napari_yolocell.data.synthetic_tiff import write_synthetic_tiff

    tiff = args.slide or work / "slide.tif"
    levels = max(1, int(np.log2(args.size / 1024)) + 1)
    start = time.perf_counter()
    if args.slide and tiff.exists() and tiff.with_suffix(".truth.csv").exists():
        table = pd.read_csv(tiff.with_suffix(".truth.csv"))  # kept from an earlier run
    else:
        table = write_synthetic_tiff(
            tiff, shape=(args.size, args.size), tile=512, levels=levels, tissue=args.tissue
        )
        table.to_csv(tiff.with_suffix(".truth.csv"), index=False)
    truth = len(table)
    print(
        f"(a) wrote {tiff.stat().st_size / 1e6:.0f} MB TIFF, {truth} nuclei, "
        f"tissue {args.tissue:.0%} of the slide, in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    mpx = args.size * args.size / 1e6
    rows = [
        f"Slide: {args.size} x {args.size} uint16, tiled 512, {levels} levels, zlib; nuclei "
        f"on ~{args.tissue:.0%} of it (slide-like tissue blobs), tile {args.tile}, batch "
        f"{args.batch}. Bare forward = `Detector.predict` time per tile, measured on "
        f"{args.bare_sample} tiles sampled evenly among those holding nuclei, times the "
        "tiles the engine ran.",
        "",
        "| backend | seconds | Mpx/s | peak RSS (MB) | count (truth) | tiles run / skipped | "
        "bare forward (s) | end-to-end / bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    results = {}
    for backend in args.backends:
        engine = _spawn_variant(args, "engine", backend, tiff)
        bare = _spawn_variant(args, "bare", backend, tiff)
        results[backend] = {"engine": engine, "bare": bare}
        if "error" in engine or "error" in bare:
            rows.append(
                f"| {backend} | failed: {engine.get('error') or bare.get('error')} | | | | | | |"
            )
            continue
        run = engine["tiles"] - engine["skipped"]
        bare_s = bare["per_tile_s"] * run
        ratio = engine["seconds"] / bare_s
        rows.append(
            f"| {backend} | {engine['seconds']:.1f} | {mpx / engine['seconds']:.2f} | "
            f"{engine['rss_mb']:.0f} | {engine['count']} ({truth}) | {run} / "
            f"{engine['skipped']} | {bare_s:.1f} | {ratio:.2f} |"
        )
        print(rows[-1], file=sys.stderr)
    if not args.slide:
        tiff.unlink(missing_ok=True)
        tiff.with_suffix(".truth.csv").unlink(missing_ok=True)
    return "\n".join(rows), {"truth": truth, "results": results}


# ---------------------------------------------------------------------------------------------
# (b) many images, (c) resume


def _write_images(folder: Path, n: int) -> None:
    import tifffile

    from napari_yolocell.data.synthetic import make_nuclei_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tifffile.imwrite(folder / f"img{i:04d}.tif", make_nuclei_image((1024, 1024), seed=i).image)


def _detect_cmd(args, folder: Path, out: Path, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "napari_yolocell.cli",
        "detect",
        str(folder),
        "--out",
        str(out),
        "--counts",
        str(out.with_suffix(".counts.csv")),
        "--model",
        args.model,
        "--backend",
        args.batch_backend,
        "--workers",
        str(workers),
        "--quiet",
        "--tile",
        str(args.tile),
        "--batch",
        str(args.batch),
    ]


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def part_b(args, work: Path) -> tuple[str, dict]:
    folder = work / "images"
    _write_images(folder, args.n_images)
    rows = ["| run | seconds | images/s |", "| --- | ---: | ---: |"]
    info = {}
    for workers in (1, 2):
        out = work / f"b_w{workers}.csv"
        seconds = _timed(_detect_cmd(args, folder, out, workers))
        info[workers] = seconds
        rows.append(
            f"| `yolocell detect` --workers {workers} ({args.batch_backend}) | "
            f"{seconds:.1f} | {args.n_images / seconds:.2f} |"
        )
        print(rows[-1], file=sys.stderr)
    return "\n".join(rows), info


def part_c(args, work: Path) -> tuple[str, dict]:
    folder = work / "images"
    reference = work / "b_w1.csv"
    if not reference.exists():
        raise SystemExit("part c needs part b's uninterrupted single-process run")
    out = work / "c.csv"
    parts = Path(f"{out}.parts")
    proc = subprocess.Popen(
        _detect_cmd(args, folder, out, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    half = args.n_images // 2
    while proc.poll() is None and (len(list(parts.glob("*.json"))) if parts.exists() else 0) < half:
        time.sleep(0.05)
    killed_at = len(list(parts.glob("*.json"))) if parts.exists() else 0
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seconds = _timed(_detect_cmd(args, folder, out, 1))
    same = all(
        (a.read_bytes() == b.read_bytes())
        for a, b in [
            (reference, out),
            (reference.with_suffix(".counts.csv"), out.with_suffix(".counts.csv")),
        ]
    )
    row = (
        f"killed (SIGKILL) after {killed_at}/{args.n_images} images, resumed in "
        f"{seconds:.1f} s: detections and counts CSVs "
        f"{'identical' if same else 'DIFFERENT'} to the uninterrupted run"
    )
    print(row, file=sys.stderr)
    return row, {"killed_at": killed_at, "identical": same, "resume_s": seconds}


# ---------------------------------------------------------------------------------------------


def update_docs(section: str, path: Path = DOCS) -> None:
    """Replace (or append) the bench_scale section of ``docs/benchmarks.md``."""
    block = f"{START}\n{section.strip()}\n{END}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = re.sub(
            re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL
        )
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def _resolve_model(args) -> str:
    from napari_yolocell.models.registry import resolve_model

    try:
        resolve_model(args.model)
        return args.model
    except (ValueError, FileNotFoundError) as err:
        if not args.fallback:
            raise SystemExit(f"model {args.model!r} unavailable ({err}); give --fallback") from err
        print(f"model {args.model!r} unavailable, using {args.fallback}", file=sys.stderr)
        return args.fallback


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32768, help="slide side (px) for part a")
    parser.add_argument("--n-images", type=int, default=500, help="1-Mpx images for parts b/c")
    parser.add_argument("--model", default="default", help="model name or .pt")
    parser.add_argument("--fallback", default=None, help=".pt used if --model is unavailable")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batch-backend", default="auto", help="backend of parts b and c")
    parser.add_argument(
        "--tissue",
        type=float,
        default=0.5,
        help="fraction of the slide covered by nuclei (1 = dense everywhere)",
    )
    parser.add_argument(
        "--bare-sample", type=int, default=240, help="tiles timed for the bare forward pass"
    )
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    parser.add_argument(
        "--slide",
        type=Path,
        default=None,
        help="keep the part-a slide here (and its .truth.csv); reused if both exist",
    )
    parser.add_argument("--tile", type=int, default=640)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: temp)")
    parser.add_argument("--no-docs", action="store_true", help="do not update the docs")
    parser.add_argument("--variant", choices=("engine", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--tiff", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(_variant(args)))
        return
    args.model = _resolve_model(args)
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        sections = [
            f"Machine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs; model `{Path(args.model).name}`, tile {args.tile}, "
            f"batch {args.batch}. Targets: end-to-end <= {TARGETS['overhead']}x bare "
            f"forward, 1 gigapixel <= {TARGETS['gigapixel_s']:.0f} s with the fastest "
            f"backend, peak RSS < {TARGETS['rss_mb']:.0f} MB."
        ]
        if "a" in parts:
            table, _ = part_a(args, work)
            sections.append(
                f"**(a) {args.size} x {args.size} synthetic BigTIFF** "
                f"({args.size**2 / 1e9:.2f} gigapixel, zlib, 512 px tiles, "
                f"pyramid):\n\n{table}"
            )
        if "b" in parts or "c" in parts:
            table, _ = part_b(args, work)
            sections.append(f"**(b) {args.n_images} images of 1024 x 1024:**\n\n{table}")
        if "c" in parts:
            row, _ = part_c(args, work)
            sections.append(f"**(c) resume:** {row}.")
    text = "## Scale (bench_scale.py)\n\n" + "\n\n".join(sections)
    text += (
        f"\n\nCommand: `python benchmarks/bench_scale.py --size {args.size} --n-images "
        f"{args.n_images} --tissue {args.tissue} --parts {args.parts}`"
    )
    print(text)
    if not args.no_docs:
        update_docs(text)


if __name__ == "__main__":
    main()
