"""Few-shot adaptation, leave-one-source-out: 3 corrected images of a new lab -> the rest of it.

For each held-out source (never seen by the bundled models): pick 3 images (fixed seed), write
them as a plain YOLO dataset like a user would bring (whole images, percentile-normalised 8-bit
PNG, in ``images/train`` and again in ``images/val``, labels beside them, ``data.yaml``), run

    yolocell train --data DIR --model default --minutes 5 --out OUT

as a subprocess (checking that its LAST line is ``weights\\t<best.pt>``), then score the
starting model and the fine-tuned one on the source's other images at detection defaults
(default runtime: INT8 on a CPU for both, the fine-tuned one quantized after its fine-tune;
the automatic size: the fine-tuned model detects at the lab's scale it remembers).

    python benchmarks/bench_fewshot.py --sources bitdepth mnfinder --minutes 5 --seed 1

Sources: ``bitdepth``, ``mnfinder`` (never trained on by the bundled models), and image groups
of DSB2018 and Kromp 2020 standing in for one lab each (``bench_heldout.GROUPS``, e.g.
``dsb-696x520``, ``kromp-cytospin63x``; the bundled models saw other images of these sources).

``--set freeze=10`` (repeatable) changes a few-shot training setting
(``training.fewshot.FEWSHOT_SETTINGS``) for an experiment; ``--set blend=1`` the share of the
fine-tuned weights in the delivered model (``yolocell train --blend``; by default the
fine-tune chooses it, ``training.fewshot.choose_blend``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_heldout import DEFAULT_DATA, detect_cached, items, lever_filter

N_SHOTS = 3


def write_dataset(chosen: list[tuple], out: Path) -> Path:
    """The 3 images as a plain YOLO dataset (what a user exports from napari or Roboflow)."""
    import tifffile
    from PIL import Image

    from napari_yolocell.engine.normalize import percentile_range, to_uint8

    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    for path, boxes, name in chosen:
        img = tifffile.imread(path) if str(path).endswith(".tif") else np.asarray(Image.open(path))
        img = img[..., :3].max(axis=-1) if img.ndim == 3 else img  # RGB(A)-stored grey
        lo, hi = percentile_range(img, 1.0, 99.8)
        png = to_uint8(img, lo, hi)
        h, w = png.shape
        lines = [
            f"0 {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} "
            f"{(y1 - y0) / h:.6f}"
            for y0, x0, y1, x1 in boxes
        ]
        for split in ("train", "val"):
            Image.fromarray(png).save(out / "images" / split / f"{name}.png")
            (out / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (out / "data.yaml").write_text(
        f"path: {out}\ntrain: images/train\nval: images/val\nnc: 1\nnames: ['nucleus']\n"
    )
    return out


def finetune_cli(
    data: Path, out: Path, minutes: float, model: str, settings: dict | None = None
) -> tuple[Path, float]:
    """Run ``yolocell train``; returns (weights path from the last line, wall minutes)."""
    launcher = ["-m", "napari_yolocell.cli"]
    settings = dict(settings or {})
    blend = ["--blend", str(settings.pop("blend"))] if "blend" in settings else []
    if settings:  # an experiment: the same CLI with other few-shot settings
        launcher = [
            "-c",
            "import sys, napari_yolocell.training.fewshot as f; "
            f"f.FEWSHOT_SETTINGS.update({settings!r}); "
            "from napari_yolocell.cli import main; sys.exit(main(sys.argv[1:]))",
        ]
    cmd = [
        sys.executable,
        *launcher,
        "train",
        "--data",
        str(data),
        "--model",
        model,
        "--minutes",
        str(minutes),
        "--out",
        str(out),
        "--quiet",
        *blend,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = (time.perf_counter() - t0) / 60
    (out / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stdout + "\n---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"yolocell train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    key, _, path = last.partition("\t")
    assert key == "weights", f"last line is not 'weights\\t...': {last!r}"
    return Path(path), wall


def score(det, tag: str, rest: list[tuple], cache: Path) -> dict:
    from napari_yolocell.analysis.evaluate import evaluate_predictions

    conf = float(det.spec.default_conf)
    per = []
    for it in rest:
        b, s, _ = detect_cached(det, tag, it, cache)
        kb, ks = lever_filter(b, s, conf)
        per.append((kb, ks, it[1], it[2]))
    r = evaluate_predictions(per, conf=0.0, conf_grid=[0.0])
    return {k: r[k] for k in ("f1", "count_error", "count_bias", "precision", "recall")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sources", nargs="+", default=["bitdepth", "mnfinder"])
    p.add_argument("--model", default="default")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/yolocell_fewshot"))
    p.add_argument("--cache", type=Path, default=Path("/tmp/yolocell_heldout"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    settings = {k: _value(v) for k, _, v in (s.partition("=") for s in args.set)}

    from napari_yolocell.models.loading import load_detector

    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for source in args.sources:
        its = items(args.data, source)
        rng = np.random.default_rng(args.seed)
        pick = set(rng.choice(len(its), N_SHOTS, replace=False).tolist())
        shots = [it for i, it in enumerate(its) if i in pick]
        rest = [it for i, it in enumerate(its) if i not in pick]
        tag = "_".join(f"{k}{v}" for k, v in settings.items())
        work = args.work / f"{source}_seed{args.seed}{'_' + tag if tag else ''}"
        data = write_dataset(shots, work / "data")
        weights, wall = finetune_cli(data, work / "runs", args.minutes, args.model, settings)
        before = load_detector(args.model, device="cpu", backend="auto")
        tuned = load_detector(weights, device="cpu", backend="auto")
        row = {
            "source": source,
            "shots": [it[2] for it in shots],
            "n_rest": len(rest),
            "n_true": int(sum(len(it[1]) for it in rest)),
            "minutes": wall,
            "before": score(before, args.model, rest, args.cache),
            "after": score(tuned, f"ft_{source}_s{args.seed}_{int(time.time())}", rest, args.cache),
            "weights": str(weights),
            "settings": settings,
            "tuned_backend": type(tuned).__name__,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| source | shots -> scored | before F1 / count error (bias) | after | minutes |")
    print("| --- | --- | --- | --- | ---: |")
    for r in rows:
        b, a = r["before"], r["after"]
        print(
            f"| {r['source']} | 3 -> {r['n_rest']} images ({r['n_true']} nuclei) "
            f"| {b['f1']:.3f} / {100 * b['count_error']:.1f}% ({100 * b['count_bias']:+.1f}%) "
            f"| {a['f1']:.3f} / {100 * a['count_error']:.1f}% ({100 * a['count_bias']:+.1f}%) "
            f"| {r['minutes']:.1f} |"
        )


def _value(text: str):
    """``10`` -> 10, ``0.5`` -> 0.5, anything else stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    main()
