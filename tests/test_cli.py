import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_yolocell.cli import main
from napari_yolocell.data.synthetic import make_nuclei_image


@pytest.fixture
def two_images(tmp_path):
    paths, truth = [], []
    for i, n in enumerate((12, 7)):
        syn = make_nuclei_image((300, 340), n_nuclei=n, seed=i)
        p = tmp_path / f"img{i}.tif"
        tifffile.imwrite(p, syn.image)
        paths.append(p)
        truth.append(n)
    return paths, truth


def test_detect_prints_counts_and_writes_csvs(two_images, tmp_path, capsys):
    paths, truth = two_images
    out, counts = tmp_path / "d.csv", tmp_path / "c.csv"
    rc = main(
        [
            "detect",
            *map(str, paths),
            "--model",
            "classical",
            "--tile",
            "256",
            "--out",
            str(out),
            "--counts",
            str(counts),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{paths[0]}\t{truth[0]}", f"{paths[1]}\t{truth[1]}", f"total\t{sum(truth)}"]
    det = pd.read_csv(out)
    assert list(det.columns) == [
        "image",
        "plane",
        "y",
        "x",
        "y0",
        "x0",
        "y1",
        "x1",
        "confidence",
        "class",
    ]
    assert len(det) == sum(truth)
    assert (det["x1"] > det["x0"]).all() and det["x1"].max() <= 340
    cnt = pd.read_csv(counts)
    assert list(cnt.columns) == ["image", "plane", "roi", "count"]
    assert cnt["count"].tolist() == truth


def test_detect_folder_and_glob(two_images, capsys):
    paths, truth = two_images
    assert main(["detect", str(paths[0].parent), "--model", "classical", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"total\t{sum(truth)}"
    assert main(["detect", str(paths[0].parent / "img1*.tif"), "--model", "classical"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{paths[1]}\t{truth[1]}",
        f"total\t{truth[1]}",
    ]


def test_bad_inputs_exit_nonzero_with_one_line(tmp_path, two_images, capsys):
    missing = tmp_path / "nope.tif"
    assert main(["detect", str(missing), "--model", "classical"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("nope.tif" in line for line in err)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 20)
    assert main(["detect", str(corrupt), "--model", "classical"]) != 0
    assert "corrupt.tif" in capsys.readouterr().err
    assert main(["detect", str(two_images[0][0]), "--model", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w.pt" in err[0]


def test_export_points_then_train_data_yaml(tmp_path, capsys):
    syn = make_nuclei_image((400, 400), n_nuclei=30, seed=5)
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, syn.image)
    pts = tmp_path / "pts.csv"
    pd.DataFrame({"axis-0": syn.centers[:, 0], "axis-1": syn.centers[:, 1]}).to_csv(pts)
    out = tmp_path / "ds"
    assert (
        main(
            [
                "export",
                "--image",
                str(img),
                "--points",
                str(pts),
                "--diameter",
                "18",
                "--out",
                str(out),
                "--tile",
                "128",
                "--overlap",
                "24",
            ]
        )
        == 0
    )
    assert (out / "data.yaml").exists()
    labels = list((out / "labels").rglob("*.txt"))
    assert labels and sum(len(p.read_text().splitlines()) for p in labels) >= 30
    # a second export into the same folder is refused, nothing lost
    before = sorted(p.name for p in out.rglob("*"))
    assert (
        main(
            [
                "export",
                "--image",
                str(img),
                "--points",
                str(pts),
                "--diameter",
                "18",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_export_empty_annotations_refused(tmp_path, capsys):
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, np.zeros((64, 64), np.uint16))
    pts = tmp_path / "pts.csv"
    pd.DataFrame({"y": [], "x": []}).to_csv(pts, index=False)
    assert (
        main(
            [
                "export",
                "--image",
                str(img),
                "--points",
                str(pts),
                "--diameter",
                "10",
                "--out",
                str(tmp_path / "ds"),
            ]
        )
        == 2
    )
    assert "no objects" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_calibrate_by_count(tmp_path, capsys):
    syn = make_nuclei_image((300, 300), n_nuclei=15, seed=2)
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, syn.image)
    assert main(["calibrate", str(img), "--count", "15", "--model", "classical"]) == 0
    out = capsys.readouterr().out
    assert "15 nuclei (known: 15)" in out and out.strip().splitlines()[-1].startswith("conf\t")


def test_console_script_runs():
    r = subprocess.run(
        [sys.executable, "-m", "napari_yolocell.cli", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "yolocell" in r.stdout


def test_detect_prints_paths_as_given(two_images, capsys, monkeypatch):
    paths, truth = two_images
    monkeypatch.chdir(paths[0].parent)
    assert main(["detect", f"./{paths[0].name}", "--model", "classical", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"./{paths[0].name}\t{truth[0]}"


def test_multiclass_model_needs_class(tmp_path, capsys):
    """An 80-class model (COCO layout) does not silently count every class."""
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, make_nuclei_image((128, 128), n_nuclei=5, seed=0).image)
    base = ["detect", str(path), "--model", "yolov5n.yaml", "--backend", "torch", "--quiet"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "80 classes" in err and "--class" in err
    assert main([*base, "--class", "no-such-class"]) == 2
    assert "no class 'no-such-class'" in capsys.readouterr().err
    assert main([*base, "--class", "3", "--conf", "0.001"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("total\t")


def test_class_filter_keeps_only_that_class():
    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models.loading import load_detector

    image = make_nuclei_image((96, 96), n_nuclei=4, seed=1).image
    params = DetectParams(conf=0.001, max_det=50, auto_diameter=False)
    det = load_detector("yolov5n.yaml", device="cpu", backend="torch")
    every = detect_image(image, det, params)
    params.classes = (0,)
    only = detect_image(image, det, params)
    assert set(only["class"]) <= {0} and len(only) == (every["class"] == 0).sum()


def test_package_warnings_print_as_one_line(capsys):
    """A warning of ours (here the lab-scale one) is one ``warning: ...`` line on stderr, not
    Python's file:line header plus a source line."""
    import dataclasses
    import warnings

    from napari_yolocell import cli
    from napari_yolocell.data.synthetic import make_nuclei_image
    from napari_yolocell.engine.detect import detect_image
    from napari_yolocell.models.classical import ClassicalDetector

    det = ClassicalDetector()
    det.spec = dataclasses.replace(
        det.spec, name="lab-model", diameter_px=23.0, lab_diameter_px=92.0
    )
    image = make_nuclei_image((512, 512), n_nuclei=60, diameter=(16.0, 24.0), seed=1).image
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        cli._one_line_warnings()
        df = detect_image(image, det)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: nuclei here measure ~")
    assert err[0].endswith(
        "far from the ~92 px of the images lab-model was fine-tuned on: detected at the "
        "model's own scale instead (give the diameter to override)"
    )
    assert df.attrs["diameter"] is None
