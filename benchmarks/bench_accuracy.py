"""Accuracy of the bundled models and the classical baseline on BBBC039 (official split).

Runs our own tiled detection (``detect_image``, default settings: the model's calibrated
confidence, tile 640) on every image of the split, full resolution, and scores it against the
bounding boxes of the instance masks (objects under 25 px left out), one-to-one at IoU >= 0.5.

    python benchmarks/bench_accuracy.py --data ../shared/data/bbbc039 --split test
    python benchmarks/bench_accuracy.py --split validation --models v5 v6   # for calibration

Prints a markdown table; ``--json`` writes the full results, ``--plots DIR`` the curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc039"


def _load(name: str):
    """``NAME`` or ``NAME@BACKEND`` (e.g. ``v5@openvino-int8``; default PyTorch)."""
    from napari_yolocell.models.loading import load_detector

    model, _, backend = name.partition("@")
    return load_detector(model, device="cpu", backend=backend or "torch")


def _label(name: str, det) -> str:
    backend = name.partition("@")[2]
    return f"{det.spec.name} ({backend})" if backend else det.spec.name


def run(data: Path, split: str, models: list[str], tile: int = 640) -> list[dict]:
    from napari_yolocell.analysis.evaluate import evaluate_model
    from napari_yolocell.data.public import bbbc039_items
    from napari_yolocell.engine.detect import DetectParams

    items = bbbc039_items(data, split, min_area=25)
    results = []
    for name in models:
        det = _load(name)
        t0 = time.perf_counter()
        # at the model's default confidence: what `yolocell detect` does out of the box
        res = evaluate_model(
            det,
            items,
            split=None,
            params=DetectParams(tile=tile),
            conf=det.spec.default_conf,
            low_conf=0.01 if det.spec.family != "classical" else 0.0,
            name=_label(name, det),
        )
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        print(f"{name}: done in {res['seconds']:.0f} s", file=sys.stderr)
    return results


def markdown(results: list[dict]) -> str:
    head = (
        "| model | conf | P | R | F1@0.5 | mAP50 | mAP50-95 | count error | bias "
        "| best-F1 conf | min-count-error conf | s/image |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['conf']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['f1']:.3f} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} "
            f"| {100 * r['count_error']:.1f}% | {100 * r['count_bias']:+.1f}% "
            f"| {r['conf_best_f1']:.2f} | {r['conf_min_count_error']:.2f} "
            f"| {r['seconds_per_image']:.2f} |"
        )
    return "\n".join(lines)


PEERS = """\
Peer and reference numbers on the same 50 test images (5,498 nuclei; measured by the team,
whole image at native size):

| model | P | R | F1@0.5 | count error |
| --- | ---: | ---: | ---: | ---: |
| peer YOLOv5n fed as its plugin does (uint16 x 255/65535, conf 0.5) | - | 0.000 | 0.000 | 100 % |
| peer YOLOv5n, percentile-normalised to 8 bit, conf 0.5 | 0.977 | 0.924 | 0.950 | 6.8 % |
| peer YOLOv5n, percentile-normalised, conf 0.25 | 0.910 | 0.941 | 0.925 | 5.6 % |
| thesis YOLOv5 (its own data) | 0.763 | 0.734 | 0.748 | - |
"""


def write_docs(
    text: str, path: Path, section: str = "bench_accuracy", insert_before: str | None = None
) -> None:
    """Replace one benchmark's section of docs/benchmarks.md (between its markers).

    Missing markers are added before the heading ``insert_before`` if given, else at the end.
    """
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    doc = path.read_text()
    if start not in doc or end not in doc:
        if insert_before and insert_before in doc:
            doc = doc.replace(insert_before, f"{start}\n{end}\n\n{insert_before}", 1)
        else:
            doc += f"\n{start}\n{end}\n"
    before, rest = doc.split(start, 1)
    after = rest.split(end, 1)[1]
    path.write_text(f"{before}{start}\n{text.rstrip()}\n{end}{after}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the bbbc039 folder")
    p.add_argument("--split", default="test", choices=["training", "validation", "test"])
    p.add_argument("--models", nargs="+", default=["v5", "v6", "classical"])
    p.add_argument("--tile", type=int, default=640)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plots", type=Path, default=None)
    p.add_argument(
        "--write-docs",
        type=Path,
        default=None,
        help="update the accuracy section of this markdown file (docs/benchmarks.md)",
    )
    args = p.parse_args(argv)
    results = run(args.data, args.split, args.models, args.tile)
    title = (
        f"## Accuracy on BBBC039 {args.split} (bench_accuracy.py)\n\n"
        f"{results[0]['n_images']} images, {results[0]['n_true']} nuclei (objects >= 25 px); "
        "our tiled detection at default settings (tile 640, the model's calibrated "
        "confidence), one-to-one matching at IoU >= 0.5. Count error = mean |pred - true| / "
        "true per image; bias = mean signed error.\n"
    )
    table = markdown(results)
    print(title)
    print(table)
    if args.write_docs:
        cmd = (
            f"Command: `python benchmarks/bench_accuracy.py --split {args.split} "
            f"--models {' '.join(args.models)}`\n"
        )
        write_docs(f"{title}\n{table}\n\n{cmd}\n{PEERS}", args.write_docs)
    if args.json:
        keep = (
            "name",
            "conf",
            "precision",
            "recall",
            "f1",
            "mAP50",
            "mAP50-95",
            "count_error",
            "count_bias",
            "conf_best_f1",
            "conf_min_count_error",
            "n_images",
            "n_true",
            "n_pred",
            "seconds_per_image",
        )
        args.json.write_text(
            json.dumps([{k: r.get(k) for k in keep} for r in results], indent=2, default=float)
        )
    if args.plots:
        from napari_yolocell.analysis.plots import save_plots

        save_plots(results, args.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
