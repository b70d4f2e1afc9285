"""The ``yolocell`` command: detect, export, train, evaluate, calibrate, quantize, models.

Results go to stdout (counts, tables); progress bars and messages go to stderr, so
``yolocell detect *.tif > counts.tsv`` gives a clean table. Bad input ends the command with a
one-line ``yolocell: error: ...`` message and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from napari_yolocell.engine.detect import DIAMETER_PIXELS, DetectParams, param_help
from napari_yolocell.engine.normalize import MODES as NORMALIZE_MODES
from napari_yolocell.models.detector import BACKEND_CHOICES, class_names, resolve_class


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# helpers


def _progress_bar(desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(
        total=0,
        desc=desc,
        unit="tile",
        file=sys.stderr,
        disable=disable,
        leave=False,
        dynamic_ncols=True,
    )


def _detect_params(args):
    return DetectParams(
        tile=args.tile,
        overlap=args.overlap,
        conf=args.conf,
        iou=args.iou,
        channel=args.channel,
        normalize=args.normalize,
        diameter=args.diameter if isinstance(args.diameter, float) else None,
        diameter_pixels=getattr(args, "diameter_pixels", "full"),
        planes=getattr(args, "planes", False),
        auto_diameter=args.diameter == "auto",
        batch=args.batch,
        level=args.level,
        min_relative_area=getattr(args, "min_relative_area", 0.0),
    )


def _diameter_arg(text: str) -> float | str:
    """``--diameter``: "auto", "model" or a positive number of pixels."""
    if text.lower() in ("auto", "model"):
        return text.lower()
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, model or a diameter in px, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"diameter must be positive, got {text!r}")
    return value


def _load_detector(model: str | None, device: str | None = None, backend: str = "auto"):
    from napari_yolocell.models.loading import load_detector

    try:
        return load_detector(model or "default", device=device, backend=backend)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from exc


def _counted_classes(detector, args, model: str) -> tuple[int, ...] | None:
    """``--class``: the class ids to count (None: a one-class model counts everything)."""
    try:
        return resolve_class(class_names(detector), getattr(args, "count_class", None), model)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _detect_one(path: Path, detector, params, quiet: bool) -> pd.DataFrame:
    from napari_yolocell.engine.detect import detect_image
    from napari_yolocell.io.images import open_image

    img = open_image(path)
    try:
        bar = _progress_bar(path.name, quiet)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            df = detect_image(
                img.levels if len(img.levels) > 1 else img.data,
                detector,
                params,
                channel_axis=img.channel_axis,
                rgb=img.rgb,
                progress=progress,
                axes=img.axes,
            )
        finally:
            bar.close()
    finally:
        img.close()
    return df


# ---------------------------------------------------------------------------------------------
# detect


def cmd_detect(args) -> int:
    from tqdm import tqdm

    from napari_yolocell.engine.batch import run_batch
    from napari_yolocell.io.images import expand_inputs

    inputs = list(args.images)
    if args.sample:
        from napari_yolocell.data.samples import sample_image_path

        inputs.insert(0, str(sample_image_path()))
    if not inputs:
        raise CliError("no images given (give IMAGE paths, a folder, a glob, or --sample)")
    try:
        paths = expand_inputs(inputs)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from exc
    model = args.model or "default"
    if not args.no_quantize:
        _quantize_on_first_use(model, paths, args)
    detector = _load_detector(model, args.device, args.backend)  # fail fast, one line
    params = _detect_params(args)
    params.classes = _counted_classes(detector, args, model)
    scheduler = args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    errors = args.errors
    if errors is None and (args.out or args.counts):
        anchor = Path(args.out or args.counts)
        errors = str(anchor.with_name(anchor.stem + ".errors.csv"))
    marker_csv = None
    if args.marker_channel is not None:
        if not (args.counts or args.out):
            raise CliError(
                "--marker-channel writes NAME.marker_counts.csv: give --counts (or --out)"
            )
        anchor = Path(args.counts or args.out)
        marker_csv = anchor.with_name(anchor.stem + ".marker_counts.csv")

    # Lines go out in input order as soon as every earlier image is done.
    finished: dict[int, object] = {}
    state = {"next": 0, "total": 0}
    images_bar = tqdm(
        total=len(paths),
        desc="images",
        unit="image",
        file=sys.stderr,
        disable=args.quiet or len(paths) == 1,
        dynamic_ncols=True,
    )
    tiles_bar = _progress_bar("tiles", args.quiet or len(paths) > 1 and args.workers > 1)

    def tile_progress(path: str, done: int, total: int) -> None:
        tiles_bar.set_description(Path(path).name)
        tiles_bar.total = total
        tiles_bar.n = done
        tiles_bar.refresh()

    def on_result(i: int, res) -> None:
        finished[i] = res
        images_bar.update(1)
        while state["next"] in finished:
            r = finished.pop(state["next"])
            state["next"] += 1
            if r.error is not None:
                tqdm.write(f"yolocell: error: {r.error}", file=sys.stderr)
            else:
                state["total"] += r.count
                print(f"{r.image}\t{r.count}", flush=True)

    try:
        results = run_batch(
            [str(p) for p in paths],
            model,
            params,
            out=args.out,
            counts=args.counts,
            errors=errors,
            workers=args.workers,
            scheduler=scheduler,
            device=args.device,
            backend=args.backend,
            on_result=on_result,
            tile_progress=tile_progress,
            measure=args.measure or args.marker_channel is not None,
        )
    finally:
        tiles_bar.close()
        images_bar.close()
    print(f"total\t{state['total']}", flush=True)
    if marker_csv is not None or args.geojson:
        _detect_extras(args, results, marker_csv)
    failed = [r for r in results if r.error is not None]
    if failed:
        where = f" (see {errors})" if errors else ""
        print(
            f"yolocell: error: {len(failed)} of {len(paths)} image(s) failed{where}",
            file=sys.stderr,
        )
        return 1
    return 0


def _detect_extras(args, results, marker_csv: Path | None) -> None:
    """``--marker-channel``: per-image Otsu classification and NAME.marker_counts.csv;
    ``--geojson``: one QuPath FeatureCollection per image (see ``geojson_paths``)."""
    from napari_yolocell.analysis.measure import classify_marker, marker_counts
    from napari_yolocell.io.geojson import detections_to_geojson, geojson_paths, write_geojson
    from napari_yolocell.io.tables import MARKER_COUNT_COLUMNS, write_csv_atomic

    targets = geojson_paths(args.geojson, [r.image for r in results]) if args.geojson else None
    tables = []
    for i, res in enumerate(results):
        if res.error is not None:
            continue
        det = res.detections
        if marker_csv is not None:
            try:
                det = classify_marker(det, args.marker_channel)
            except ValueError as exc:
                raise CliError(f"{res.image}: {exc}") from exc
            if not args.quiet and len(det):
                thr = det.attrs["marker_threshold"]
                print(f"{res.image}: marker threshold {thr:.6g} (Otsu, log)", file=sys.stderr)
            tables.append(marker_counts(det, res.image, n_planes=len(res.counts)))
        if targets is not None:
            write_geojson(targets[i], detections_to_geojson(det))
    if marker_csv is not None:
        table = pd.concat(tables, ignore_index=True) if tables else None
        write_csv_atomic(
            table if table is not None else pd.DataFrame(columns=MARKER_COUNT_COLUMNS), marker_csv
        )


# ---------------------------------------------------------------------------------------------
# export


def _read_table(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError as exc:
        raise CliError(f"{path}: no such file") from exc
    except Exception as exc:
        raise CliError(f"{path}: cannot read CSV: {exc}") from exc


def _points_from_csv(path: str) -> np.ndarray:
    """Points as napari saves them (``axis-0, axis-1``) or as ``y, x`` columns.

    Coordinates are napari's (pixel centres on whole numbers); +0.5 turns them into the
    pixel-edge convention of boxes and detections (pixel ``i`` spans ``[i, i+1)``).
    """
    df = _read_table(path)
    for cols in (["y", "x"], ["axis-0", "axis-1"]):
        if set(cols) <= set(df.columns):
            return df[cols].to_numpy(float) + 0.5
    axes = [c for c in df.columns if c.startswith("axis-")]
    if len(axes) >= 2:  # nD points: the last two axes are y, x
        return df[axes[-2:]].to_numpy(float) + 0.5
    raise CliError(f"{path}: points CSV needs columns y,x (or napari's axis-0,axis-1)")


def _boxes_from_csv(path: str) -> np.ndarray:
    df = _read_table(path)
    if not {"y0", "x0", "y1", "x1"} <= set(df.columns):
        raise CliError(f"{path}: boxes CSV needs columns y0,x0,y1,x1")
    return df[["y0", "x0", "y1", "x1"]].to_numpy(float)


def _plane_2d(path: str, channel: int | None) -> np.ndarray:
    from napari_yolocell.io.images import open_image

    try:
        img = open_image(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    data = img.data
    if img.channel_axis is not None:
        if channel is None:
            raise CliError(f"{path} has {data.shape[img.channel_axis]} channels: choose --channel")
        data = np.take(data, channel, axis=img.channel_axis)
    arr = np.asarray(data)
    if img.rgb:
        arr = arr[..., channel] if channel is not None else arr[..., :3].max(axis=-1)
    img.close()
    if arr.ndim != 2:
        raise CliError(f"{path}: export needs a 2-D image, got shape {arr.shape}")
    return arr


def cmd_export(args) -> int:
    from napari_yolocell.training.annotations import boxes_from_labels, boxes_from_points
    from napari_yolocell.training.dataset import Sample, export_dataset

    image = _plane_2d(args.image, args.channel)
    given = [args.boxes is not None, args.points is not None, args.labels is not None]
    if sum(given) != 1:
        raise CliError("give exactly one of --boxes, --points (with --diameter) or --labels")
    if args.boxes:
        boxes = _boxes_from_csv(args.boxes)
    elif args.points:
        if not args.diameter:
            raise CliError("--points needs --diameter (typical nucleus diameter in px)")
        boxes = boxes_from_points(_points_from_csv(args.points), args.diameter)
    else:
        labels = _plane_2d(args.labels, None)
        if labels.shape != image.shape:
            raise CliError(
                f"{args.labels}: labels shape {labels.shape} does not match the image {image.shape}"
            )
        try:
            boxes = boxes_from_labels(labels, min_area=args.min_area)
        except ValueError as exc:
            raise CliError(f"{args.labels}: {exc}") from exc
    if len(boxes) == 0:
        raise CliError("the annotations hold no objects: nothing to train on")
    fractions = [float(f) for f in args.split.split(",")]
    try:
        rep = export_dataset(
            [Sample(image, boxes, name=Path(args.image).stem)],
            args.out,
            tile=args.tile,
            overlap=args.overlap,
            fractions=fractions,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{rep.path}\t{rep.summary()}")
    return 0


# ---------------------------------------------------------------------------------------------
# train


def cmd_train(args) -> int:
    from napari_yolocell.models import safety
    from napari_yolocell.training.train import train

    if Path(args.model).is_file():  # refuse a hostile .pt before reading any data
        try:
            safety.require_safe(args.model)
        except ValueError as exc:
            raise CliError(str(exc)) from exc

    from napari_yolocell.training.fewshot import finetune, is_bundled

    # a bundled model (default, v5, v6...), or a .pt with a time budget: few-shot fine-tune
    fewshot = not args.resume and (
        is_bundled(args.model)
        or (args.minutes is not None and str(args.model).lower().endswith(".pt"))
    )
    if args.blend is not None and not fewshot:
        raise CliError("--blend applies to fine-tuning (a bundled model, or a .pt with --minutes)")
    if args.blend is not None and not 0.0 <= args.blend <= 1.0:
        raise CliError(f"--blend must be between 0 and 1, got {args.blend}")
    bar, on_epoch = _train_progress(args, fewshot)
    try:
        if fewshot:
            res = finetune(
                args.data,
                model=args.model,
                minutes=args.minutes,
                epochs=args.epochs,
                out=args.out,
                name=args.name,
                imgsz=args.imgsz,
                batch=args.batch if args.batch is not None else 8,
                device=args.device,
                seed=args.seed,
                on_epoch=on_epoch,
                holdout=args.holdout,
                blend=args.blend,
            )
        else:
            extra = {} if args.minutes is None else {"time": args.minutes / 60}
            res = train(
                args.data,
                model=args.model,
                epochs=args.epochs if args.epochs is not None else 50,
                imgsz=args.imgsz,
                batch=args.batch if args.batch is not None else 16,
                patience=args.patience,
                device=args.device,
                seed=args.seed,
                out=args.out,
                name=args.name,
                resume=args.resume,
                on_epoch=on_epoch,
                **extra,
            )
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    if fewshot and res.best is not None and not res.cancelled:
        if _print_blend(res.run_dir, asked=args.blend is not None):  # the start kept: no verdict
            _print_verdict(args, res.best)
    print(f"best\t{res.best}")
    print(f"last\t{res.last}")
    print(f"weights\t{res.best or res.last}")  # last line: the checkpoint to use
    return 0


def _train_progress(args, fewshot: bool):
    """(tqdm bar or None, on_epoch): seconds of the budget for a timed fine-tune (its epoch
    count is only an estimate), epochs otherwise."""
    if args.quiet:
        return None, lambda _info: None
    from tqdm import tqdm

    timed = fewshot and args.minutes is not None
    total = round(args.minutes * 60) if timed else args.epochs or 50
    bar = tqdm(
        total=total,
        desc="fine-tune" if timed else "epochs",
        unit="s" if timed else "epoch",
        file=sys.stderr,
    )

    def on_epoch(info: dict) -> None:
        if timed:
            bar.n = min(total, round(info.get("time", bar.n)))
            bar.set_postfix(epoch=info.get("epoch"), mAP50=f"{info.get('mAP50', 0):.3f}")
        else:
            bar.total = info.get("epochs", bar.total)
            bar.n = info.get("epoch", bar.n)
            bar.set_postfix({k: f"{info[k]:.3f}" for k in ("mAP50",) if k in info})
        bar.refresh()

    return bar, on_epoch


def _print_blend(run_dir, asked: bool = False) -> bool:
    """``blend\t<share of the fine-tuned weights>\t<why>`` and, for a fine-tune delivered
    whole, ``conf\t<its default confidence>\t<why>`` (``fewshot.json``). False when the start
    model was kept (nothing trained, nothing to judge)."""
    from napari_yolocell.training.fewshot import WEIGHT_BLEND, fewshot_info

    info = fewshot_info(run_dir) or {}
    if "blend" in info:
        reason = info.get("blend_reason", "")
        if info.get("kept_start") and not asked:
            reason += f" (--blend {WEIGHT_BLEND:g} fine-tunes anyway)"
        print(f"blend\t{float(info['blend']):g}\t{reason}".rstrip())
    if "lab_conf" in info:
        print(f"conf\t{float(info['lab_conf']):.2f}\t{info.get('lab_conf_reason', '')}".rstrip())
    return not info.get("kept_start")


def _print_verdict(args, best) -> None:
    """Score the start and the fine-tuned model on the held-out images, print both and what
    they mean (nothing held out: say so)."""
    from napari_yolocell.analysis.finetune_check import judge
    from napari_yolocell.training.fewshot import held_out_split

    held = held_out_split(args.data, args.holdout, args.seed)[1]
    if not held:
        print(
            "verdict\tnothing held out to compare with the start model (give a val split that "
            "is not a copy of train, or --holdout K)"
        )
        return
    items = [(s.image_path, s.boxes, Path(s.image_path).name) for s in held]
    try:
        verdict = judge(args.model, best, items)
    except (OSError, ValueError, RuntimeError) as exc:  # the weights line must still come
        print(f"verdict\tnot scored: {exc}")
        return
    for key, r in (("start", verdict.start), ("fine-tuned", verdict.tuned)):
        print(
            f"{key}\tF1 {r['f1']:.3f}\tcount error {100 * r['count_error']:.1f} %\t"
            f"conf {r['conf']:.2f}\t{verdict.n_images} held-out images, {verdict.n_nuclei} nuclei"
        )
    print(f"verdict\t{verdict.line()}")


# ---------------------------------------------------------------------------------------------
# evaluate


def cmd_evaluate(args) -> int:
    from napari_yolocell.analysis.evaluate import compare_models

    params = _detect_params(args)
    wanted = {
        _counted_classes(_load_detector(m, args.device, args.backend), args, m) for m in args.model
    }
    if len(wanted) > 1:
        raise CliError("--class names a different class id in each model: give its number")
    params.classes = wanted.pop()
    try:
        # one low-threshold run per model; P/R/F1 reported at --conf (default: F1-maximising)
        table, results = compare_models(
            args.model,
            args.data,
            split=args.split,
            params=params,
            return_results=True,
            min_area=args.min_area,
            conf=args.conf,
            backend=args.backend,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.json:
        Path(args.json).write_text(
            json.dumps(table.to_dict(orient="records"), indent=2, default=float)
        )
    if args.plots:
        from napari_yolocell.analysis.plots import save_plots

        for p in save_plots(results, args.plots):
            print(f"plot\t{p}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# calibrate


def cmd_calibrate(args) -> int:
    from napari_yolocell.analysis.calibrate import calibrate_by_count, calibrate_by_points

    if (args.count is None) == (args.points is None):
        raise CliError("give exactly one of --count N or --points CSV")
    detector = _load_detector(args.model, args.device, args.backend)
    before = detector.spec.default_conf if args.conf is None else args.conf
    args.conf = 0.05  # one run at a low threshold; every candidate is scored from it
    params = _detect_params(args)
    params.classes = _counted_classes(detector, args, args.model or "default")
    df = _detect_one(Path(args.image), detector, params, args.quiet)
    if args.count is not None:
        cal = calibrate_by_count(df["confidence"].to_numpy(), args.count)
    else:
        cal = calibrate_by_points(df, _points_from_csv(args.points))
    print(cal.summary(before=before))
    print(f"conf\t{cal.conf:.2f}")
    return 0


# ---------------------------------------------------------------------------------------------
# quantize


def _quantize(model: str, images: list[str], force: bool = False, channel=None):
    """INT8 version of ``model`` calibrated on ``images`` (see ``training.quantize``)."""
    from napari_yolocell.training.quantize import quantize_for_user, read_calibration_images

    say = lambda message: print(f"yolocell: {message}", file=sys.stderr)  # noqa: E731
    try:
        calibration = read_calibration_images(images, channel=channel)
        return quantize_for_user(model, calibration, force=force, progress=say)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise CliError(str(exc)) from exc


def _quantize_on_first_use(model: str, paths: list, args) -> None:
    """``detect`` on a CPU with a model that has no INT8 version yet: make it, once, from the
    images about to be detected (``training.quantize.quantize_on_first_use``)."""
    from napari_yolocell.training.quantize import quantize_on_first_use, read_calibration_images

    say = lambda message: print(f"yolocell: {message}", file=sys.stderr)  # noqa: E731
    try:
        quantize_on_first_use(
            model,
            lambda: read_calibration_images([str(p) for p in paths], channel=args.channel),
            backend=args.backend,
            device=args.device,
            progress=say,
        )
    except (FileNotFoundError, ValueError, ImportError) as exc:  # an optimisation only
        print(f"yolocell: INT8 quantization skipped: {exc}", file=sys.stderr)


def cmd_quantize(args) -> int:
    images = args.images
    if not images:
        from napari_yolocell.data.samples import sample_image_path

        images = [str(sample_image_path())]
        print(
            "yolocell: no --images: calibrating on the bundled sample image (U2OS, Hoechst); "
            "the INT8 check then speaks for images like it only",
            file=sys.stderr,
        )
    entry = _quantize(args.model, images, force=args.force, channel=args.channel)
    print(f"int8\t{entry.folder}")
    print(f"used\t{'yes' if entry.used else 'no (FP32 runs)'}")
    return 0


# ---------------------------------------------------------------------------------------------
# models


def cmd_models(args) -> int:
    from napari_yolocell.models import safety
    from napari_yolocell.models.loading import describe_model
    from napari_yolocell.models.registry import list_models

    if args.untrust:
        try:
            removed = safety.untrust(args.untrust)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        if not removed:
            raise CliError(f"hash {args.untrust!r} is not in the trust store")
        print(f"untrusted\t{args.untrust}")
        return 0
    if args.trusted:
        for digest, entry in sorted(safety.trusted_models().items()):
            fields = (entry.get(k, "") for k in ("size", "added", "path"))
            print("\t".join([digest, *map(str, fields)]))
        return 0
    try:
        if args.paths:
            for path in args.paths:
                print(f"{path}\t{describe_model(path)}")
            return 0
        for spec in list_models():
            print(f"{spec.name}\t{spec.family}\t{describe_model(spec.name)}\t{spec.path}")
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def _add_detect_options(
    p: argparse.ArgumentParser, model: bool = True, backend: str = "auto"
) -> None:
    if model:
        p.add_argument(
            "--model",
            default=None,
            help="bundled model name (v5, v6, default), a shipped YAML or a .pt path",
        )
    defaults = DetectParams()
    for name, kind in (("tile", int), ("overlap", int), ("conf", float), ("iou", float)):
        p.add_argument(
            f"--{name}", type=kind, default=getattr(defaults, name), help=param_help(name)
        )
    p.add_argument("--channel", type=int, default=defaults.channel, help=param_help("channel"))
    p.add_argument(
        "--normalize",
        choices=list(NORMALIZE_MODES),
        default=defaults.normalize,
        help=param_help("normalize"),
    )
    p.add_argument(
        "--diameter",
        type=_diameter_arg,
        default="auto",
        help="typical nucleus diameter in px (tiles are resized to the model's scale), in "
        "full-resolution (level 0) pixels also with --level (see --diameter-pixels); "
        "auto (default): measured on each image, resized only when nuclei are far larger "
        "than the model's; model: never resize",
    )
    p.add_argument(
        "--diameter-pixels",
        choices=list(DIAMETER_PIXELS),
        default=defaults.diameter_pixels,
        help=param_help("diameter_pixels"),
    )
    p.add_argument("--planes", action="store_true", help=param_help("planes"))
    p.add_argument("--batch", type=int, default=defaults.batch, help=param_help("batch"))
    p.add_argument("--level", type=int, default=defaults.level, help=param_help("level"))
    p.add_argument(
        "--min-relative-area",
        type=float,
        default=defaults.min_relative_area,
        help=param_help("min_relative_area"),
    )
    p.add_argument("--device", default=None, help="cpu, cuda:0... (default: CUDA if available)")
    p.add_argument(
        "--backend",
        default=backend,
        choices=BACKEND_CHOICES,
        help=f"forward-pass runtime (default {backend}); auto = the fastest installed (on a "
        "CPU: OpenVINO, INT8 when the model has a checked INT8 version)",
    )
    p.add_argument(
        "--class",
        dest="count_class",
        default=None,
        metavar="CLASS",
        help="the class to count (number or name), for models trained on several classes",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--trust",
        action="store_true",
        help="trust the --model .pt file: record its SHA-256 in the user's trust store, so its "
        "pickle may run code (only for files from a source you trust)",
    )


def _trust_models(args) -> None:
    """``--trust``: record the given weights files in the trust store before anything loads."""
    if not getattr(args, "trust", False):
        return
    from napari_yolocell.models import safety

    models = args.model if isinstance(args.model, list) else [args.model]
    for model in models:
        if model and Path(model).is_file():
            digest = safety.trust(model)
            print(f"yolocell: trusted {model} (sha256 {digest})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from napari_yolocell import __version__

    parser = argparse.ArgumentParser(
        prog="yolocell", description="Detect and count cell nuclei with tiled YOLO detectors."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("detect", help="count nuclei in images")
    d.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders or globs")
    _add_detect_options(d)
    d.add_argument("--out", default=None, help="detections CSV")
    d.add_argument("--counts", default=None, help="counts CSV")
    d.add_argument(
        "--errors",
        default=None,
        help="errors CSV (default: beside --out / --counts as NAME.errors.csv)",
    )
    d.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    d.add_argument(
        "--scheduler",
        default=None,
        help="dask.distributed scheduler address (or DASK_SCHEDULER_ADDRESS)",
    )
    d.add_argument("--sample", action="store_true", help="run on the bundled sample image")
    d.add_argument(
        "--measure",
        action="store_true",
        help="add mean_c0.. (mean raw intensity per channel in the box's inscribed ellipse), "
        "area_px and area_um2 (when the pixel size is known) to the detections CSV",
    )
    d.add_argument(
        "--marker-channel",
        type=int,
        default=None,
        metavar="C",
        help="classify nuclei marker-positive/negative by Otsu on log(mean_cC) (per image); "
        "writes NAME.marker_counts.csv beside --counts (implies --measure)",
    )
    d.add_argument(
        "--geojson",
        default=None,
        metavar="FILE",
        help="QuPath GeoJSON of the detections (File > Import objects); several images: "
        "one FILE-stem.IMAGE-stem.geojson each, beside FILE",
    )
    d.add_argument(
        "--no-quantize",
        action="store_true",
        help="do not make an INT8 version of a model that has none (made once, on a CPU)",
    )
    d.set_defaults(func=cmd_detect)

    e = sub.add_parser("export", help="annotations -> YOLO dataset")
    e.add_argument("--image", required=True)
    e.add_argument("--boxes", help="CSV with y0,x0,y1,x1 (e.g. a detections CSV)")
    e.add_argument("--points", help="CSV of nucleus centres (y,x or napari's axis-0,axis-1)")
    e.add_argument("--diameter", type=float, help="nucleus diameter in px for --points")
    e.add_argument("--labels", help="instance-label image (TIFF/PNG), one box per label")
    e.add_argument("--out", required=True, help="output dataset folder (must be empty)")
    e.add_argument("--channel", type=int, default=None)
    e.add_argument("--tile", type=int, default=640)
    e.add_argument("--overlap", type=int, default=64)
    e.add_argument("--split", default="0.7,0.2,0.1", help="train,val,test fractions")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--min-area", type=int, default=0, help="ignore labels smaller than this")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="train a YOLOv5 / YOLOv6 detector")
    t.add_argument("--data", required=True, help="dataset folder or data.yaml")
    t.add_argument(
        "--model",
        default="yolov5n",
        help="yolov5n..x, yolov6n..x (from scratch), or a model to fine-tune: default, v5, v6, "
        "a bundled name or a .pt (few-shot: whole images are rescaled to the model's scale)",
    )
    t.add_argument("--epochs", type=int, default=None, help="default 50 (30 fine-tuning)")
    t.add_argument(
        "--minutes", type=float, default=None, help="time budget; with --epochs: first reached"
    )
    t.add_argument("--imgsz", type=int, default=640)
    t.add_argument("--batch", type=int, default=None, help="default 16 (8 fine-tuning)")
    t.add_argument("--patience", type=int, default=50)
    t.add_argument("--device", default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/yolocell")
    t.add_argument("--name", default=None)
    t.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="fine-tuning: keep K training images back; the start and the fine-tuned model are "
        "scored on them (and on a val split that is not a copy of train)",
    )
    t.add_argument(
        "--blend",
        type=float,
        default=None,
        help="fine-tuning: share of the fine-tuned weights in the delivered model, the rest the "
        "start's (default: 0.5, which keeps what the start counts well; 1, the fine-tune "
        "alone, when the start model miscounts your training images far more than it should; "
        "0, the start model and no training, when it already counts them at the target: the "
        "'blend' line says which and why; give 0.5 to fine-tune anyway)",
    )
    t.add_argument("--resume", action="store_true", help="continue from last.pt")
    t.add_argument("--quiet", action="store_true")
    t.add_argument(
        "--trust",
        action="store_true",
        help="trust the --model .pt file (record its SHA-256), so its pickle may run code",
    )
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("evaluate", help="score and compare models on a labelled set")
    v.add_argument("--data", required=True, help="dataset folder or data.yaml")
    v.add_argument("--split", default="test")
    v.add_argument("--model", action="append", required=True, help="repeat to compare")
    # scores the reference PyTorch forward pass unless a runtime is named
    _add_detect_options(v, model=False, backend="torch")
    v.add_argument("--min-area", type=float, default=0.0, help="ignore truth boxes under this")
    v.add_argument("--json", default=None, help="write the table as JSON")
    v.add_argument("--plots", default=None, help="folder for PR / F1 / count plots (PNG)")
    v.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("calibrate", help="choose the confidence threshold from a known count")
    c.add_argument("image")
    c.add_argument("--count", type=int, default=None, help="known number of nuclei")
    c.add_argument("--points", default=None, help="CSV of clicked nucleus centres")
    _add_detect_options(c)
    c.set_defaults(func=cmd_calibrate)

    q = sub.add_parser(
        "quantize", help="make the INT8 version of a model (once; checked against FP32)"
    )
    q.add_argument("model", metavar="MODEL", help="a .pt (fine-tuned, classic YOLOv5, YOLOv6)")
    q.add_argument(
        "--images",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="images like those you will count (cell type, stain, magnification), to calibrate "
        "and check the INT8 model on: files, folders or globs (default: the sample image)",
    )
    q.add_argument("--channel", type=int, default=None, help="channel of multichannel images")
    q.add_argument("--force", action="store_true", help="quantize again")
    q.set_defaults(func=cmd_quantize)

    m = sub.add_parser("models", help="list bundled models, or describe model files")
    m.add_argument("paths", nargs="*", metavar="MODEL", help=".pt / .onnx / IR folder to describe")
    m.add_argument("--trusted", action="store_true", help="list the trusted weights hashes")
    m.add_argument("--untrust", metavar="HASH", default=None, help="remove a trusted hash")
    m.set_defaults(func=cmd_models)
    return parser


def _one_line_warnings() -> None:
    """Our warnings as one ``warning: ...`` line on stderr (not Python's file:line + source)."""
    import warnings

    shown = warnings.showwarning
    if getattr(shown, "_yolocell", False):  # main() called again in one process
        return
    package = str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None):
        ours = str(filename).startswith(package)
        if ours and issubclass(category, (UserWarning, RuntimeWarning)):
            from tqdm import tqdm

            tqdm.write(f"warning: {message}", file=sys.stderr)  # above any progress bar
        else:
            shown(message, category, filename, lineno, file, line)

    show._yolocell = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_line_warnings()
    try:
        _trust_models(args)
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"yolocell: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yolocell: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
