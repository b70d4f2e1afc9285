"""Benchmark: lazy opening of a large pyramidal BigTIFF vs reading it whole.

Writes a 16384 x 16384 uint16 tiled (512 px), zlib-compressed BigTIFF with a 4-level SubIFD
pyramid of synthetic nuclei (unless ``--path`` points at an existing file), then measures in a
FRESH subprocess per variant: open time, time to the first 1024 x 1024 full-resolution region,
and the child's peak RSS (its own ``VmHWM`` from /proc, else ``ru_maxrss``, at exit, imports
included; ``ru_maxrss`` alone would inherit the parent's peak across fork+exec). Prints a
markdown table.

Then the cold open as napari does it: ``npe2.read`` in a fresh process (npe2 imported and its
plugins discovered first, as in a running napari), so the plugin's own imports count: our
reader, and napari-tiff when it is installed. Median of ``--cold-repeat`` processes per reader,
run alternately.

    python benchmarks/bench_reader.py [--path big.tif] [--size 16384] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
variant, path = sys.argv[1], sys.argv[2]
# imports are the baseline, not part of the timing (the cold open below counts them); dask's
# first compute imports dask.distributed when it is installed
import numpy as np, tifffile, zarr, dask.array  # noqa: E401
try:
    import distributed  # noqa: F401
except ImportError:
    pass
if variant != "tifffile.imread (whole file)":
    from napari_yolocell.shell.reader import read_tiff
    from napari_yolocell.io.tiff import open_tiff
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
if variant == "import only":
    region = None
elif variant == "open_tiff (core)":
    image = open_tiff(path)
    t1 = time.perf_counter()
    region = np.asarray(image.levels[0][8192:9216, 8192:9216])
elif variant == "napari reader (read_tiff, incl. contrast limits)":
    data, kwargs, _ = read_tiff(path)[0]
    t1 = time.perf_counter()
    region = np.asarray(data[0][8192:9216, 8192:9216])
else:
    full = tifffile.imread(path)
    t1 = time.perf_counter()
    region = full[8192:9216, 8192:9216].copy()
t2 = time.perf_counter()
if region is None:
    t1 = t2 = t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
try:
    # ru_maxrss survives fork+exec (it may report the parent's peak); VmHWM is this image's own.
    with open("/proc/self/status") as fh:
        rss = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) / 1024
except (OSError, StopIteration):
    pass
print(json.dumps({"open_s": t1 - t0, "first_tile_s": t2 - t0, "rss_mb": rss,
                  "rss_imports_mb": rss_imports}))
"""

# npe2.read in a fresh process; npe2 itself is imported and its plugins discovered first (napari
# has done both before it opens a file), so the time is the plugin's imports + open + reading.
COLD_CHILD = r"""
import json, sys, time
plugin, path = sys.argv[1], sys.argv[2]
import npe2
npe2.PluginManager.instance().discover()
before = set(sys.modules)
t0 = time.perf_counter()
layers = npe2.read([path], stack=False, plugin_name=plugin)
t1 = time.perf_counter()
heavy = ("numpy", "tifffile", "zarr", "dask", "distributed", "scipy", "pandas", "torch")
new = {m.split(".")[0] for m in set(sys.modules) - before}
print(json.dumps({"open_s": t1 - t0, "imported": sorted(new & set(heavy))}))
"""

VARIANTS = [
    "import only",
    "open_tiff (core)",
    "napari reader (read_tiff, incl. contrast limits)",
    "tifffile.imread (whole file)",
]


def run_variant(variant: str, path: Path) -> dict[str, float]:
    """Run one variant in a fresh interpreter and return its timings and peak RSS (MB)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_open(path: Path, repeat: int) -> list[tuple[str, float, list[str]]]:
    """Median ``npe2.read`` time in fresh processes, per installed TIFF reader plugin.

    Returns
    -------
    list of (plugin, median seconds, heavy top-level modules imported by the read)
    """
    import importlib.util

    plugins = ["napari-yolocell"]
    if importlib.util.find_spec("napari_tiff") is not None:
        plugins.append("napari-tiff")
    runs: dict[str, list[dict]] = {p: [] for p in plugins}
    for i in range(repeat + 1):
        for plugin in plugins:  # alternate, so a busy moment hits both alike
            out = subprocess.run(
                [sys.executable, "-c", COLD_CHILD, plugin, str(path)],
                check=True,
                capture_output=True,
                text=True,
            )
            if i:  # the first round only warms the page cache and the .pyc files
                runs[plugin].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return [
        (p, statistics.median(r["open_s"] for r in rs), rs[-1]["imported"])
        for p, rs in runs.items()
    ]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, help="existing TIFF to read (else one is written)")
    parser.add_argument("--size", type=int, default=16384, help="side of the generated image")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (best is shown)")
    parser.add_argument(
        "--cold-repeat", type=int, default=7, help="fresh processes per reader for the cold open"
    )
    args = parser.parse_args(argv)

    tmp = None
    path = args.path
    if path is None or not path.exists():
        from napari_yolocell.data.synthetic_tiff import write_synthetic_tiff

        if path is None:
            tmp = tempfile.TemporaryDirectory()
            path = Path(tmp.name) / f"synthetic_{args.size}.tif"
        t0 = time.perf_counter()
        truth = write_synthetic_tiff(path, shape=(args.size, args.size), tile=512, levels=4)
        print(
            f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB, {len(truth)} nuclei) "
            f"in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )

    rows = []
    for variant in VARIANTS:
        runs = [run_variant(variant, path) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["first_tile_s"])
        best["rss_mb"] = max(r["rss_mb"] for r in runs)
        rows.append((variant, best))

    size = os.path.getsize(path) / 1e6
    print(
        f"File: {args.size} x {args.size} uint16, tiled 512, zlib, 4-level SubIFD pyramid, "
        f"{size:.0f} MB on disk. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}. Best of {args.repeat} fresh processes."
    )
    print()
    print("| variant | open (s) | first 1024 x 1024 region (s) | peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: |")
    for variant, r in rows:
        print(f"| {variant} | {r['open_s']:.3f} | {r['first_tile_s']:.3f} | {r['rss_mb']:.0f} |")
    print()
    print(f"Cold open through npe2 (plugin imports included), median of {args.cold_repeat}:")
    print()
    print("| reader | npe2.read (s) | imported on the read path |")
    print("| --- | ---: | --- |")
    for plugin, seconds, imported in cold_open(path, args.cold_repeat):
        print(f"| {plugin} | {seconds:.3f} | {', '.join(imported)} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
