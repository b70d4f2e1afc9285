"""Fine-tune the bundled nucleus detector on five public sources, balanced, in resumable chunks.

The bundled v5n was trained on BBBC039, DSB2018 and Kromp only and over-counts on other labs'
images (issue #19). This script continues it on all five sources with every source an equal
share of each epoch (``training/balanced.py``) and microscopy augmentation
(``training/augment.py``), on a CPU, as chunks of a fixed number of minutes::

    # 1. tiles at the model's scale, fixed per-source test / val / train splits (deterministic)
    python scripts/train_multisource.py build --data ../shared/data --work work_multi
    # 2. one chunk (repeat to continue; each chunk is a warm restart of the cosine schedule)
    nice python scripts/train_multisource.py chunk --work work_multi --run all --minutes 100
    nice python scripts/train_multisource.py chunk --work work_multi --run loso-bitdepth \
        --exclude bitdepth --minutes 60
    # 3. score the held-out test images of each source at ``yolocell detect`` defaults
    python scripts/train_multisource.py eval --data ../shared/data --work work_multi \
        --models default training_state/all/best.fp16.pt

What a chunk needs to continue is small and committed: ``training_state/RUN/`` holds the run's
settings and history (``state.json``) and the fp16 EMA weights at the end of the last chunk
(``last.fp16.pt``) and of the best validation so far (``best.fp16.pt``), ~5 MB each. A chunk
starts from ``last.fp16.pt`` with a fresh AdamW state and a new cosine cycle (warm restart).

Splits (by image, fixed by a hash of the file name, so every run and session agrees):
BBBC039 uses its official split (test never trained); every other source keeps 15 % of its
images as test and 10 % as val. Leave-one-source-out runs (``--exclude``) never draw the
excluded source and validate without it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SOURCES = ("bbbc039", "dsb", "kromp", "bitdepth", "mnfinder")
TILE = 640
MAX_DIAMETER = 45.0  # nuclei larger than this are scaled to a diameter in [20, 45] px
TEST_FRACTION = 0.15
VAL_FRACTION = 0.10
VAL_PER_SOURCE = 25
STATE = Path(__file__).resolve().parents[1] / "training_state"
SEED = 0


def split_of(name: str) -> str:
    """``test`` / ``val`` / ``train`` from a stable hash of the image name."""
    u = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < TEST_FRACTION:
        return "test"
    return "val" if u < TEST_FRACTION + VAL_FRACTION else "train"


def median_diameter(boxes: np.ndarray) -> float:
    if len(boxes) == 0:
        return 0.0
    return float(np.median(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))))


def source_items(data: Path, source: str) -> list[dict]:
    """Every labelled image of a source: ``path``, ``labels``, ``name``, ``split``."""
    rows: list[dict] = []
    if source == "bbbc039":
        b = data / "bbbc039"
        for split_file, split in (("training", "train"), ("validation", "val"), ("test", "test")):
            for stem in (b / "split" / f"{split_file}.txt").read_text().split():
                rows.append(
                    {
                        "path": str(b / "images" / f"{stem}.tif"),
                        "labels": str(b / "masks" / f"{stem}.png"),
                        "name": stem[8:14] + "_" + stem[-2:],
                        "split": split,
                    }
                )
        return rows
    folder, key, ext = {
        "dsb": ("dsb2018_stage1_train_fluo", "id", ".png"),
        "kromp": ("kromp2020_s_bsst265", "id", ".tif"),
        "bitdepth": ("bitdepth_nucseg_2021", "image", ""),
        "mnfinder": ("mnfinder_2023", "image", ""),
    }[source]
    d = data / folder
    with open(d / "counts.csv") as fh:
        for r in csv.DictReader(fh):
            name = r[key]
            label = name if ext == "" else f"{name}.tif"
            rows.append(
                {
                    "path": str(d / "images" / f"{name}{ext}"),
                    "labels": str(d / "labels" / label),
                    "name": Path(name).stem[:40],
                    "split": split_of(f"{source}/{name}"),
                }
            )
    return rows


def truth_boxes(source: str, item: dict, clean: bool = False) -> np.ndarray:
    """Truth boxes ``y0 x0 y1 x1`` of an image (instance masks -> boxes).

    ``clean`` drops label fragments (:func:`drop_fragments`) for training; scores are always
    against the labels as published.
    """
    import tifffile
    from PIL import Image

    from napari_yolocell.data.public import bbbc039_instances
    from napari_yolocell.training.annotations import boxes_from_labels

    if source == "bbbc039":
        inst = bbbc039_instances(np.asarray(Image.open(item["labels"])))
        boxes = boxes_from_labels(inst, min_area=25)
    else:
        boxes = boxes_from_labels(tifffile.imread(item["labels"]), min_area=9)
    return drop_fragments(boxes) if clean else boxes


def drop_fragments(boxes: np.ndarray, size: float = 0.35, inside: float = 0.8) -> np.ndarray:
    """Boxes without label fragments: objects under ``size`` x the image's median diameter that
    lie at least ``inside`` within another box (pieces of a nucleus given their own label id,
    5 % of BitDepth's boxes; teaching them as nuclei teaches double counts)."""
    b = np.asarray(boxes, float)
    if len(b) < 3:
        return b
    side = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    keep = np.ones(len(b), bool)
    for i in np.flatnonzero(side < size * np.median(side)):
        lo = np.maximum(b[i, :2], b[:, :2])
        hi = np.minimum(b[i, 2:], b[:, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        inter[i] = 0
        if (inter >= inside * side[i] ** 2).any():
            keep[i] = False
    return b[keep]


def read_grey(path: str) -> np.ndarray:
    from napari_yolocell.analysis.evaluate import _read_image

    img = np.asarray(_read_image(path))
    if img.ndim == 3:  # colour-stored grey images: the nuclear channel is the maximum
        img = img[..., :3].max(axis=-1)
    return img


# --------------------------------------------------------------------------- build


def cmd_build(args) -> None:
    from skimage.transform import rescale

    from napari_yolocell.training.dataset import Sample, export_dataset

    data = Path(args.data)
    rng = np.random.default_rng(SEED)
    samples, manifest = [], []
    for source in SOURCES:
        for item in source_items(data, source):
            manifest.append({"source": source, **item})
            if item["split"] == "test":
                continue
            img = read_grey(item["path"])
            boxes = truth_boxes(source, item, clean=True)
            d = median_diameter(boxes)
            factor = 1.0
            if d > MAX_DIAMETER:
                factor = rng.uniform(20.0, MAX_DIAMETER) / d
                img = rescale(
                    img.astype(np.float32), factor, anti_aliasing=True, preserve_range=True
                ).astype(img.dtype)
                boxes = boxes * factor
            manifest[-1]["scale"] = factor
            samples.append(Sample(img, boxes, name=f"{source}_{item['name']}", split=item["split"]))
    work = Path(args.work)
    rep = export_dataset(
        samples,
        work / "dataset",
        tile=TILE,
        overlap=64,
        seed=SEED,
        overwrite=args.overwrite,
        min_fraction=0.4,
    )
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(rep.summary())
    tiles = work / "dataset" / "images"
    for split in ("train", "val"):
        counts = {s: len(list((tiles / split).glob(f"{s}_*.png"))) for s in SOURCES}
        print(split, counts)


# --------------------------------------------------------------------------- chunks


def _data_yaml(work: Path, run: str, exclude: list[str]) -> Path:
    """data.yaml of a run: all training tiles (the sampler skips excluded sources), val without
    the excluded sources."""
    import yaml

    ds = work / "dataset" / "images"
    val = []
    for source in SOURCES:  # at most VAL_PER_SOURCE tiles each, so no source rules best.pt
        if source not in exclude:
            tiles = sorted((ds / "val").glob(f"{source}_*.png"))
            step = max(1, len(tiles) // VAL_PER_SOURCE)
            val += tiles[::step][:VAL_PER_SOURCE]
    lists = work / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    val_txt = lists / f"{run}_val.txt"
    val_txt.write_text("\n".join(str(p) for p in val) + "\n")
    cfg = {
        "path": str(work / "dataset"),
        "train": str(ds / "train"),
        "val": str(val_txt),
        "nc": 1,
        "names": {0: "nucleus"},
    }
    out = lists / f"{run}.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _load_state(run: str) -> dict:
    path = STATE / run / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(run: str, state: dict) -> None:
    folder = STATE / run
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, folder / "state.json")


def _fp16(src: Path, dst: Path, info: dict) -> None:
    """EMA weights of an ultralytics checkpoint in fp16, without optimizer (~5 MB)."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]).half()
    for p in model.parameters():
        p.requires_grad = False
    slim = {
        "model": model,
        "ema": None,
        "optimizer": None,
        "epoch": -1,
        "updates": None,
        "train_args": {},
        "date": ckpt.get("date"),
        "version": ckpt.get("version"),
        "license": "AGPL-3.0",
        "yolocell": {"family": "yolov5", **info},
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    torch.save(slim, tmp)
    os.replace(tmp, dst)


def cmd_chunk(args) -> None:
    from napari_yolocell.models.ultralytics_env import import_ultralytics
    from napari_yolocell.training.balanced import DEFAULT_PER_SOURCE, balanced_trainer
    from napari_yolocell.training.fewshot import resolve_base_weights
    from napari_yolocell.training.train import MICROSCOPY_AUGMENT

    import_ultralytics()
    from ultralytics import YOLO

    work = Path(args.work).absolute()
    state = _load_state(args.run)
    exclude = sorted(set(args.exclude or state.get("exclude", [])))
    if state and exclude != state.get("exclude", []):
        sys.exit(f"run {args.run} excludes {state.get('exclude')}, not {exclude}")
    chunk = len(state.get("chunks", []))
    last = STATE / args.run / "last.fp16.pt"
    if last.exists():
        start = last
    elif args.init:  # a new run that branches off another run's weights
        start = Path(args.init)
    else:
        start = resolve_base_weights("default")[0]
    print(f"run {args.run}, chunk {chunk + 1}, from {start}, excluding {exclude or 'nothing'}")
    per_source = args.per_source or state.get("per_source", DEFAULT_PER_SOURCE)
    shares = {"*": per_source, **dict(_share(x) for x in args.share or [])}
    boost = tuple(args.small_boost) if args.small_boost else None
    trainer = balanced_trainer(shares, seed=SEED + chunk, exclude=exclude, small_boost=boost)
    augment = {**MICROSCOPY_AUGMENT, "hsv_v": 0.4}
    if args.mosaic is not None:
        augment["mosaic"] = args.mosaic
    model = YOLO(str(start))
    t0 = time.time()
    name = f"{args.run}-c{chunk + 1}"
    model.train(
        trainer=trainer,
        data=str(_data_yaml(work, args.run, exclude)),
        epochs=1000,  # time mode fits the epochs (and the cosine cycle) to the budget
        time=args.minutes / 60,
        imgsz=TILE,
        batch=args.batch,
        nbs=args.batch,  # one optimizer step per batch: a few hundred tiles an epoch
        workers=args.workers,
        device="cpu",
        optimizer=args.optimizer,
        lr0=args.lr0,
        lrf=0.1,
        cos_lr=True,
        warmup_epochs=0.3,
        close_mosaic=0,
        patience=1000,
        pretrained=True,
        plots=False,
        amp=False,
        cache="ram",
        seed=SEED + chunk,
        deterministic=False,
        project=str(work / "runs"),
        name=name,
        exist_ok=True,
        **augment,
    )
    run_dir = work / "runs" / name
    results = _history(run_dir / "results.csv")
    fitness = [0.1 * r["mAP50"] + 0.9 * r["mAP50-95"] for r in results]
    best_fit = max(fitness) if fitness else float("nan")
    info = {"run": args.run, "chunk": chunk + 1, "exclude": exclude}
    _fp16(run_dir / "weights" / "last.pt", last, info)
    prev_best = state.get("best_fitness", -1.0)
    if best_fit > prev_best and (run_dir / "weights" / "best.pt").exists():
        _fp16(run_dir / "weights" / "best.pt", STATE / args.run / "best.fp16.pt", info)
        state["best_fitness"] = best_fit
        state["best_chunk"] = chunk + 1
    state.update(
        {
            "exclude": exclude,
            "per_source": per_source,
            "tile": TILE,
            "sources": [s for s in SOURCES if s not in exclude],
        }
    )
    state.setdefault("chunks", []).append(
        {
            "minutes": round((time.time() - t0) / 60, 1),
            "epochs": len(results),
            "lr0": args.lr0,
            "optimizer": args.optimizer,
            "start": str(start),
            "shares": shares,
            "small_boost": boost,
            "mosaic": augment["mosaic"],
            "best_fitness": round(best_fit, 4),
            "last": results[-1] if results else {},
            "finished": time.strftime("%Y-%m-%d %H:%M"),
        }
    )
    _save_state(args.run, state)
    print(json.dumps(state["chunks"][-1], indent=1))


def _share(text: str) -> tuple[str, int]:
    """``bbbc039=90`` -> ("bbbc039", 90)."""
    source, _, n = text.partition("=")
    if source not in SOURCES or not n.isdigit():
        sys.exit(f"--share takes SOURCE=N with SOURCE in {', '.join(SOURCES)}, got {text!r}")
    return source, int(n)


def _history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path) as fh:
        for r in csv.DictReader(fh):
            r = {k.strip(): v for k, v in r.items()}
            out.append(
                {
                    "epoch": int(float(r["epoch"])),
                    "mAP50": float(r["metrics/mAP50(B)"]),
                    "mAP50-95": float(r["metrics/mAP50-95(B)"]),
                    "precision": float(r["metrics/precision(B)"]),
                    "recall": float(r["metrics/recall(B)"]),
                }
            )
    return out


# --------------------------------------------------------------------------- eval


def test_items(data: Path, source: str, whole: bool = False) -> list[tuple[str, np.ndarray, str]]:
    """``(path, truth boxes, name)`` of a source's test images (every image with ``whole``)."""
    out = []
    for item in source_items(data, source):
        if whole or item["split"] == "test":
            out.append((item["path"], truth_boxes(source, item), item["name"]))
    return out


CORRUPTIONS = [
    *("blur", "noise", "gamma", "jpeg"),
    *("downscale", "illumination", "saturate", "quantise"),
]


def corrupt(img: np.ndarray, effect: str, name: str) -> np.ndarray:
    """The image as detection normalises it (8 bit), with one training augmentation applied at
    probability 1 (seeded by the image's name): how much each effect costs a model at test
    time, the measure of what training with it buys."""
    from napari_yolocell.engine.normalize import normalize_image
    from napari_yolocell.training.augment import PHOTOMETRIC_DEFAULTS, MicroscopyAugment

    probs = {k: float(k == effect) for k in PHOTOMETRIC_DEFAULTS}
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    aug = MicroscopyAugment(probs, seed=seed)
    aug._pipeline.set_random_seed(seed)  # albumentations draws its own parameters
    return aug.apply(normalize_image(img))


def cmd_eval(args) -> None:
    from napari_yolocell.analysis.evaluate import evaluate_predictions
    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models.loading import load_detector
    from napari_yolocell.models.spec import ModelSpec

    data = Path(args.data)
    rows = []
    for model in args.models:
        if model.endswith(".fp16.pt"):  # our training state: the bundled model's settings
            ref = load_detector("default", backend="torch").spec
            spec = ModelSpec(
                path=Path(model),
                family="yolov5",
                diameter_px=ref.diameter_px,
                imgsz=ref.imgsz,
                default_conf=args.conf or ref.default_conf,
                percentiles=ref.percentiles,
                normalize=ref.normalize,
                name=Path(model).parent.name,
            )
            det = load_detector(spec, backend=args.backend)
        else:
            det = load_detector(model, backend=args.backend)
        conf = args.conf or float(det.spec.default_conf)
        for source in args.sources:
            whole = source in (args.whole or [])
            items = test_items(data, source, whole=whole)
            per_image = []
            for path, truth, name in items:
                img = read_grey(path)
                if args.corrupt:
                    img = corrupt(img, args.corrupt, name)
                df = detect_image(img, det, DetectParams(conf=0.01))
                per_image.append(
                    (
                        df[["y0", "x0", "y1", "x1"]].to_numpy(float),
                        df["confidence"].to_numpy(float),
                        truth,
                        name,
                    )
                )
            for c in sorted({conf, *args.extra_confs}):
                r = evaluate_predictions(per_image, conf=c, name=model, conf_grid=[c])
                rows.append(
                    {
                        "model": Path(model).parent.name if model.endswith(".pt") else model,
                        "source": source
                        + (" (all" if whole else " (test")
                        + (f", {args.corrupt})" if args.corrupt else ")"),
                        "images": len(items),
                        "conf": c,
                        "f1": r["f1"],
                        "count_error": r["count_error"],
                        "bias": r.get("count_bias", float("nan")),
                    }
                )
                print(
                    f"{rows[-1]['model']:>16} {rows[-1]['source']:>18} n={len(items):3d} "
                    f"conf={c:.2f} F1={r['f1']:.3f} count_err={100 * r['count_error']:.1f}%",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


# --------------------------------------------------------------------------- bundle

PKG = Path(__file__).resolve().parents[1] / "src" / "napari_yolocell" / "models" / "weights"
BUNDLED = "nucleus-v5n"
CONF_GRID = np.round(np.arange(0.05, 0.71, 0.01), 2)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _val_detections(det, data: Path) -> dict[str, list]:
    """Low-confidence detections on every source's val images (whole, native size, defaults)."""
    from napari_yolocell.engine.detect import DetectParams, detect_image

    out: dict[str, list] = {}
    for source in SOURCES:
        for item in source_items(data, source):
            if item["split"] != "val":
                continue
            df = detect_image(read_grey(item["path"]), det, DetectParams(conf=0.01))
            out.setdefault(source, []).append(
                (
                    df[["y0", "x0", "y1", "x1"]].to_numpy(float),
                    df["confidence"].to_numpy(float),
                    truth_boxes(source, item),
                    item["name"],
                )
            )
    return out


def pooled_conf(per_source: dict[str, list]) -> tuple[float, dict]:
    """The default confidence: lowest mean count error over sources among the thresholds whose
    mean F1 over sources is within 0.005 of the best (every source weighs the same)."""
    from napari_yolocell.analysis.evaluate import evaluate_predictions

    f1, err = [], []
    for items in per_source.values():
        c = evaluate_predictions(items, conf=None, conf_grid=list(CONF_GRID))["curves"]
        f1.append(np.asarray(c["f1"], float))
        err.append(np.asarray(c["count_error"], float))
    mean_f1, mean_err = np.mean(f1, axis=0), np.mean(err, axis=0)
    ok = mean_f1 >= np.nanmax(mean_f1) - 0.005
    best = int(np.flatnonzero(ok)[np.nanargmin(mean_err[ok])])
    metrics = {
        "data": "val images of BBBC039, DSB2018, Kromp, BitDepth, MNFinder (whole, native size), "
        "mean over sources",
        "f1": round(float(mean_f1[best]), 4),
        "count_error": round(float(mean_err[best]), 4),
        "per_source": {
            s: {"f1": round(float(f[best]), 4), "count_error": round(float(e[best]), 4)}
            for s, f, e in zip(per_source, f1, err, strict=True)
        },
    }
    return float(CONF_GRID[best]), metrics


def _int8(pt: Path, data: Path) -> dict:
    """INT8 OpenVINO version calibrated on training images of every source (at model scale)."""
    from napari_yolocell.models.export_cache import cached_export
    from napari_yolocell.models.integrity import folder_hashes
    from napari_yolocell.models.spec import ModelSpec
    from napari_yolocell.training.quantize import (
        calibration_tiles,
        check_int8,
        quantize_openvino,
    )

    rng = np.random.default_rng(SEED)
    images = []
    for source in SOURCES:
        train = [i for i in source_items(data, source) if i["split"] == "train"]
        for item in rng.choice(train, min(12, len(train)), replace=False):
            img = read_grey(item["path"])
            d = median_diameter(truth_boxes(source, item))
            if d > MAX_DIAMETER:  # at the scale detection runs them (auto shrinks big nuclei)
                from skimage.transform import rescale

                img = rescale(img.astype(np.float32), 30.0 / d, preserve_range=True)
            images.append(img)
    tiles = calibration_tiles(images, tile=TILE, per_image=2, seed=SEED, scales=(1.0, 0.5))
    fp32 = cached_export(ModelSpec(name=BUNDLED, path=pt), "openvino")
    out = PKG / (pt.stem + "-int8")
    quantize_openvino(fp32, tiles, out)
    check = check_int8(fp32, out, tiles)
    print(f"INT8: {len(tiles)} calibration tiles from {len(images)} images; {check.describe()}")
    if not check.passed:
        sys.exit("INT8 check against FP32 failed: not bundled")
    return {"dir": out.name, "sha256": folder_hashes(out)}


def cmd_bundle(args) -> None:
    """The run's best weights become the bundled default, with a pooled default confidence and
    an INT8 version; the registry gets the new SHA-256s."""
    import torch

    from napari_yolocell.models.loading import clear_cache, load_detector
    from napari_yolocell.models.spec import ModelSpec

    src = Path(args.weights) if args.weights else STATE / args.run / "best.fp16.pt"
    dst = PKG / "nucleus_v5n.pt"
    ckpt = torch.load(src, map_location="cpu", weights_only=False)  # our own training output
    state = _load_state(args.run) if args.run else {}
    ckpt["yolocell"] = {
        "family": "yolov5",
        "trained_epochs": sum(c["epochs"] for c in state.get("chunks", [])),
    }
    tmp = dst.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, dst)
    reg_path = PKG / "registry.json"
    reg = json.loads(reg_path.read_text())
    entry = next(e for e in reg["models"] if e["name"] == BUNDLED)
    clear_cache()
    spec_kwargs = {k: entry[k] for k in ("family", "normalize", "diameter_px", "imgsz")}
    spec = ModelSpec(name=BUNDLED, path=dst, percentiles=tuple(entry["percentiles"]), **spec_kwargs)
    det = load_detector(spec, backend="torch")
    conf, metrics = pooled_conf(_val_detections(det, Path(args.data)))
    print(f"default confidence {conf:.2f}: {json.dumps(metrics)}")
    entry.update(
        {
            "sha256": sha256(dst),
            "default_conf": conf,
            "metrics": metrics,
            "description": "yolov5n trained on BBBC039, DSB2018 and Kromp 2020, then fine-tuned "
            "on those and BitDepth_NucSeg and MNFinder, every source an equal share, with "
            "microscopy augmentation (see docs/models.md)",
        }
    )
    if not args.no_int8:
        entry["int8"] = _int8(dst, Path(args.data))
    tmp = reg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(reg, indent=2) + "\n")
    os.replace(tmp, reg_path)
    print(json.dumps(entry, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="tiles at the model's scale, fixed splits")
    b.add_argument("--data", required=True)
    b.add_argument("--work", required=True)
    b.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("chunk", help="train one chunk of a run (continues the run's last weights)")
    c.add_argument("--work", required=True)
    c.add_argument("--run", required=True, help="run name (training_state/RUN)")
    c.add_argument("--minutes", type=float, required=True)
    c.add_argument("--exclude", nargs="*", choices=SOURCES, default=None)
    c.add_argument("--per-source", type=int, default=None, help="tiles per source per epoch")
    c.add_argument(
        "--share", nargs="*", metavar="SOURCE=N", help="another share for a source (this chunk)"
    )
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--lr0", type=float, default=0.0002)
    c.add_argument("--optimizer", default="AdamW", choices=["AdamW", "SGD"])
    c.add_argument(
        "--small-boost",
        nargs=2,
        type=float,
        metavar=("SIZE", "POWER"),
        help="raise the classification targets of boxes under SIZE px to target**POWER",
    )
    c.add_argument("--init", default=None, help="weights a new run starts from (default: bundled)")
    c.add_argument(
        "--mosaic",
        type=float,
        default=None,
        help="mosaic probability for this chunk (default: MICROSCOPY_AUGMENT's, 1.0); 0 "
        "finishes on whole tiles at their own scale, as detection sees them",
    )
    e = sub.add_parser("eval", help="F1 / count error on each source's test images")
    e.add_argument("--data", required=True)
    e.add_argument("--work", default=None)
    e.add_argument("--models", nargs="+", required=True)
    e.add_argument("--sources", nargs="+", default=list(SOURCES))
    e.add_argument("--whole", nargs="*", help="sources scored on every image (LOSO)")
    e.add_argument("--backend", default="torch")
    e.add_argument("--conf", type=float, default=None)
    e.add_argument("--extra-confs", type=float, nargs="*", default=[])
    e.add_argument("--out", default=None)
    e.add_argument(
        "--corrupt",
        default=None,
        choices=CORRUPTIONS,
        help="apply one training augmentation to every test image (robustness table)",
    )
    u = sub.add_parser("bundle", help="make a run's best weights the bundled default")
    u.add_argument("--data", required=True)
    u.add_argument("--run", default="all")
    u.add_argument("--weights", default=None, help="default: training_state/RUN/best.fp16.pt")
    u.add_argument("--no-int8", action="store_true")
    args = p.parse_args(argv)
    commands = {"build": cmd_build, "chunk": cmd_chunk, "eval": cmd_eval, "bundle": cmd_bundle}
    commands[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
