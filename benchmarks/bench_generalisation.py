"""Accuracy on other labs' images the models never trained on, at native pixel size.

The bundled models trained on BBBC039 train+val and on ~90 % of the DSB2018 fluorescence and
Kromp 2020 images; the other ~10 % were held out for validation (model selection only). This
script scores those held-out images, each at its native size, with our tiled detection at
default settings, and breaks the score down by source and by nucleus size (median diameter of
the truth boxes), since size is what breaks detectors trained on one lab's data.

    python benchmarks/bench_generalisation.py --data ../shared/data \\
        --holdout /work/work_data/dataset --models v5 v6 classical

``--holdout`` is the dataset folder written by ``scripts/train_bundled_models.py build``; the
held-out image ids are read from the names of its validation images.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from bench_accuracy import _label, _load, write_docs  # same folder: run as a script

SIZE_BINS = (
    (0, 20, "< 20 px"),
    (20, 40, "20-40 px"),
    (40, 60, "40-60 px"),
    (60, 1e9, ">= 60 px"),
)


def holdout_ids(dataset: Path) -> dict[str, list[str]]:
    """Held-out DSB2018 id prefixes and Kromp ids, from the validation image names."""
    dsb, kromp = set(), set()
    for path in (dataset / "images" / "val").iterdir():
        stem = path.stem.rsplit("_y", 1)[0]
        if stem.startswith("dsb_"):
            dsb.add(stem[4:])
        elif stem.startswith("kromp_"):
            kromp.add(stem[6:])
    return {"dsb2018": sorted(dsb), "kromp2020": sorted(kromp)}


def items(data: Path, ids: dict[str, list[str]]) -> list[tuple]:
    """``(image_path, boxes, name, source, median_diameter)`` for the held-out images."""
    import tifffile

    from napari_yolocell.training.annotations import boxes_from_labels

    out = []
    d = data / "dsb2018_stage1_train_fluo"
    with open(d / "counts.csv") as fh:
        full = [r["id"] for r in csv.DictReader(fh)]
    for prefix in ids["dsb2018"]:
        for i in (x for x in full if x.startswith(prefix)):
            boxes = boxes_from_labels(tifffile.imread(d / "labels" / f"{i}.tif"), min_area=9)
            out.append((d / "images" / f"{i}.png", boxes, f"dsb_{i[:12]}", "DSB2018"))
    k = data / "kromp2020_s_bsst265"
    for i in ids["kromp2020"]:
        boxes = boxes_from_labels(tifffile.imread(k / "labels" / f"{i}.tif"), min_area=9)
        out.append((k / "images" / f"{i}.tif", boxes, f"kromp_{i}", "Kromp 2020"))
    return [(*it, _median_diameter(it[1])) for it in out]


def _median_diameter(boxes: np.ndarray) -> float:
    if len(boxes) == 0:
        return 0.0
    return float(np.median(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))))


def score(model: str, chosen: list[tuple], diameter: str | None) -> dict[str, dict]:
    """Scores per group (all, per source, per size bin) for one model."""
    from napari_yolocell.analysis.evaluate import evaluate_model
    from napari_yolocell.engine.detect import DetectParams

    det = _load(model)
    groups = {"all": chosen}
    for src in sorted({it[3] for it in chosen}):
        groups[src] = [it for it in chosen if it[3] == src]
    for lo, hi, label in SIZE_BINS:
        groups[f"nuclei {label}"] = [it for it in chosen if lo <= it[4] < hi]
    params = DetectParams(diameter=None if diameter is None else float(diameter))
    out = {}
    for name, group in groups.items():
        if not group:
            continue
        t0 = time.perf_counter()
        res = evaluate_model(
            det,
            [it[:3] for it in group],
            split=None,
            params=params,
            conf=det.spec.default_conf,
            low_conf=0.01 if det.spec.family != "classical" else 0.0,
            name=_label(model, det),
        )
        res["n"] = len(group)
        out[name] = res
        print(
            f"{model} {name}: F1 {res['f1']:.3f} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    return out


def markdown(all_scores: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| model | images | n images | nuclei | P | R | F1@0.5 | count error | bias |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for groups in all_scores.values():
        for name, r in groups.items():
            lines.append(
                f"| {r['name']} | {name} | {r['n']} | {r['n_true']} | {r['precision']:.3f} "
                f"| {r['recall']:.3f} | {r['f1']:.3f} | {100 * r['count_error']:.1f}% "
                f"| {100 * r['count_bias']:+.1f}% |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    p.add_argument("--holdout", type=Path, required=True, help="dataset folder of the build step")
    p.add_argument("--models", nargs="+", default=["v5", "v6", "classical"])
    p.add_argument("--diameter", default=None, help="pass --diameter to detection (px)")
    p.add_argument("--write-docs", type=Path, default=None, help="update docs/benchmarks.md")
    args = p.parse_args(argv)
    chosen = items(args.data, holdout_ids(args.holdout))
    print(f"{len(chosen)} held-out images", file=sys.stderr)
    scores = {m: score(m, chosen, args.diameter) for m in args.models}
    table = markdown(scores)
    print(table)
    if args.write_docs:
        text = (
            "## Other labs' images, held out from training (bench_generalisation.py)\n\n"
            f"{len(chosen)} DSB2018 and Kromp 2020 images (the ~10 % of each source held out "
            "for validation; never trained on), each at its native size, `yolocell detect` "
            "defaults (automatic nucleus size). Size bins by the image's median nucleus "
            "diameter.\n\n"
            f"{table}\n\nCommand: `python benchmarks/bench_generalisation.py --holdout "
            f"WORK/dataset --models {' '.join(args.models)}`"
        )
        write_docs(
            text,
            args.write_docs,
            section="bench_generalisation",
            insert_before="## Reader (bench_reader.py)",
        )


if __name__ == "__main__":
    main()
