"""INT8 against FP32 for every kind of model: ms per tile, count and F1 on a held-out source.

For each model (the bundled default, a fine-tuned model, a classic YOLOv5 and a meituan YOLOv6
checkpoint) and each of OpenVINO FP32 and INT8, one subprocess (so runtimes and thread pools do
not interfere) measures on the scored images of one source:

- ``ms/tile``: the bare forward pass plus decoding (``Detector.predict``) over the engine's
  own tiles, cut and normalised beforehand, batch 8, best of ``--repeat``;
- ``engine/bare``: ``detect_image`` end to end over the same images divided by that bare time
  (issue 23: <= 1.15 on every backend);
- count and F1 (IoU 0.5, objects >= 25 px) at the model's default confidence.

The user's models are quantized the way a user gets them (:func:`quantize_for_user`),
calibrated on ``--shots`` images of the same source that are not scored (for the fine-tune,
its own training images). With ``--finetune MINUTES`` the fine-tuned model is made first
(``yolocell train --model default`` on those shots, as ``bench_fewshot.py`` does).
The last lines give each model's detection time over the first model's (the bundled default),
as ``backend="auto"`` runs them (issue 23: a fine-tuned model <= 1.2).

Usage::

    python benchmarks/bench_int8.py --source mnfinder --finetune 2 \\
        --models default ../shared/data/fixtures/nuclephaser_dapi_v5/dapi_v5.pt \\
        ../shared/data/fixtures/meituan_yolov6n_bbbc039/yolov6n_bbbc039_meituan.pt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heldout import DEFAULT_DATA, items  # noqa: E402

BACKENDS = ("openvino", "openvino-int8")


def _read(item) -> np.ndarray:
    import tifffile

    image = tifffile.imread(item[0])
    return image.max(axis=-1) if image.ndim == 3 else image


def _split(source: str, data: Path, shots: int, n_images: int, seed: int):
    """(calibration items, scored items): the user's images and the held-out ones."""
    its = items(data, source)
    rng = np.random.default_rng(seed)
    pick = set(rng.choice(len(its), shots, replace=False).tolist())
    rest = [it for i, it in enumerate(its) if i not in pick]
    return [it for i, it in enumerate(its) if i in pick], rest[:n_images]


def _engine_tiles(images: list[np.ndarray], detector, params) -> list[np.ndarray]:
    """The uint8 tiles ``detect_image`` runs for these images (same grid, normalisation)."""
    from napari_yolocell.engine.normalize import percentile_range, to_uint8
    from napari_yolocell.engine.tiling import tile_grid

    tiles = []
    for image in images:
        u8 = to_uint8(image, *percentile_range(image, *params.percentiles))
        tiles.extend(u8[t.slices] for t in tile_grid(u8.shape, params.tile, params.overlap))
    return tiles


def _best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_one(args) -> dict:
    """One (model, backend) in this process: timings, count, F1."""
    from napari_yolocell.analysis.evaluate import evaluate_predictions
    from napari_yolocell.engine.detect import DetectParams, detect_image, resolve_params
    from napari_yolocell.models.loading import load_detector

    _, scored = _split(args.source, args.data, args.shots, args.n_images, args.seed)
    images = [_read(it) for it in scored]
    detector = load_detector(args.model, device="cpu", backend=args.backend)
    params, _ = resolve_params(DetectParams(diameter=None, auto_diameter=False), detector.spec)
    tiles = _engine_tiles(images, detector, params)
    batches = [tiles[i : i + params.batch] for i in range(0, len(tiles), params.batch)]
    run = lambda b: detector.predict(b, params.conf, params.iou, params.max_det)  # noqa: E731
    run(batches[0])  # warm-up: compiles the shapes
    engine_params = DetectParams(auto_diameter=False)
    bare = engine = float("inf")
    for _ in range(max(1, args.repeat)):  # alternated: a shared CPU's load drifts
        seconds, _ = _best_of(lambda: [run(b) for b in batches], 1)
        bare = min(bare, seconds)
        seconds, frames = _best_of(
            lambda: [detect_image(im, detector, engine_params) for im in images], 1
        )
        engine = min(engine, seconds)
    per = [
        (
            df[["y0", "x0", "y1", "x1"]].to_numpy(float),
            df["confidence"].to_numpy(float),
            it[1],
            it[2],
        )
        for df, it in zip(frames, scored, strict=True)
    ]
    scores = evaluate_predictions(per, conf=0.0, conf_grid=[0.0])
    return {
        "folder": str(getattr(detector, "folder", "")),
        "tiles": len(tiles),
        "ms_tile": 1000 * bare / len(tiles),
        "engine_s": engine,
        "bare_s": bare,
        "count": int(sum(len(df) for df in frames)),
        "truth": int(sum(len(it[1]) for it in scored)),
        "f1": float(scores["f1"]),
    }


def _spawn(args, model: str, backend: str) -> dict:
    cmd = [sys.executable, __file__, "--one", model, "--backend", backend]
    cmd += ["--source", args.source, "--data", str(args.data), "--shots", str(args.shots)]
    cmd += ["--n-images", str(args.n_images), "--seed", str(args.seed)]
    cmd += ["--repeat", str(args.repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _finetune(args, calibration) -> str:
    from bench_fewshot import finetune_cli, write_dataset

    work = Path(args.work) / f"{args.source}_seed{args.seed}"
    data = write_dataset(calibration, work / "data")
    weights, minutes = finetune_cli(data, work / "runs", args.finetune, "default")
    print(f"fine-tuned in {minutes:.1f} min: {weights}", file=sys.stderr)
    return str(weights)


def _quantize(model: str, calibration, force: bool = False) -> dict:
    """The user's INT8 version, made as ``yolocell quantize`` makes it (timed)."""
    from napari_yolocell.models.registry import resolve_model
    from napari_yolocell.training.quantize import quantize_for_user

    if resolve_model(model).int8:
        return {"quantize_s": None, "check": "bundled"}
    start = time.perf_counter()
    entry = quantize_for_user(model, [_read(it) for it in calibration], force=force)
    return {"quantize_s": time.perf_counter() - start, "check": entry.check}


def format_table(rows: list[dict]) -> str:
    lines = [
        "| model | backend | ms / tile | engine / bare | count (truth) | F1 | INT8 check |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['backend']} | failed: {r['error']} | | | | |")
            continue
        check = r.get("check") or ""
        if isinstance(check, dict):
            used = "used" if check.get("passed") else "not used"
            if check.get("recipe") == "mixed":
                used += f" (mixed: {check.get('fp32_quantization_points')} points FP32)"
            minutes = (r.get("quantize_s") or 0) / 60
            check = f"{check['count_change']:+.2%}, F1 {check['f1']:.4f}: {used}, {minutes:.1f} min"
        lines.append(
            f"| {r['label']} | {r['backend']} | {r['ms_tile']:.1f} | "
            f"{r['engine_s'] / r['bare_s']:.2f} | {r['count']} ({r['truth']}) | "
            f"{r['f1']:.3f} | {check} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["default"])
    p.add_argument("--source", default="mnfinder", help="held-out source (bench_heldout names)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--shots", type=int, default=3, help="the user's images: calibration")
    p.add_argument("--n-images", type=int, default=12, help="scored images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--finetune", type=float, default=None, metavar="MINUTES")
    p.add_argument("--work", default="/tmp/yolocell_int8")
    p.add_argument("--force", action="store_true", help="quantize the user's models again")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="openvino", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        args.model = args.one
        print(json.dumps(run_one(args)))
        return
    calibration, scored = _split(args.source, args.data, args.shots, args.n_images, args.seed)
    models = list(args.models)
    if args.finetune:
        models.insert(1, _finetune(args, calibration))
    rows = []
    for model in models:
        label = Path(model).name if Path(model).exists() else model
        quantized = _quantize(model, calibration, args.force)
        for backend in BACKENDS:
            row = {"label": label, "backend": backend, **_spawn(args, model, backend)}
            if backend == "openvino-int8":
                row.update(quantized)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\nsource {args.source}: {len(scored)} scored images, {args.shots} calibration images\n")
    print(format_table(rows))
    auto = [r for r in rows if r["backend"] == "openvino-int8" and "error" not in r]
    if len(auto) > 1:  # what backend="auto" runs: INT8, or FP32 where the check failed
        print(f"\ndetection time (engine, auto) relative to {auto[0]['label']}:")
        for r in auto[1:]:
            print(f"- {r['label']}: {r['engine_s'] / auto[0]['engine_s']:.2f}")
        print("(issue 23: a fine-tuned model <= 1.2)")


if __name__ == "__main__":
    main()
