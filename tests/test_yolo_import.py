"""Reading YOLO datasets: ultralytics layout, Roboflow exports, and the problems they carry."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest

# Shared fixture folder (tests/conftest.py: YOLOCELL_FIXTURES overrides it).
from conftest import FIXTURES_DIR as FIXTURES  # noqa: E402
from PIL import Image

from napari_yolocell.io.yolo import (
    image_size,
    load_image,
    locate_splits,
    parse_label_file,
    read_yolo_dataset,
)
from napari_yolocell.shell.layers import import_dataset_layers, to_napari_layers

ROBOFLOW = FIXTURES / "roboflow_yolo_export"
needs_roboflow = pytest.mark.usefixtures("fixtures_dir")  # marks shared_data (conftest)


def _image(path: Path, size: tuple[int, int] = (40, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(size, np.uint8)).save(path)


def _label(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------- Roboflow fixture


@pytest.fixture(scope="module")
def roboflow(fixtures_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = read_yolo_dataset(ROBOFLOW)
    return ds, [str(w.message) for w in caught]


@needs_roboflow
def test_roboflow_counts(roboflow):
    ds, _ = roboflow
    # SOURCE.md: 21 images (14/3/4), 874 objects, 9 classes; label files were counted by hand
    # (the files have no trailing newline, so `wc -l` shows 853 = 874 - 21).
    assert ds.counts() == {
        "train": {"images": 14, "objects": 578},
        "val": {"images": 3, "objects": 149},
        "test": {"images": 4, "objects": 147},
    }
    assert len(ds) == 21
    assert len(ds.names) == 9 and ds.names[2] == "lymphocyte"
    assert ds.class_counts() == {
        "lymphocyte": 234,
        "tumor": 208,
        "plasma_cell": 153,
        "fibroblast": 146,
        "unlabeled": 90,
        "macrophage": 29,
        "apoptotic_body": 7,
        "mitotic_figure": 6,
        "vascular_endothelium": 1,
    }
    # every line of this export is a polygon (rectangles written as 4/5-point polygons)
    assert all(s.polygon.all() for s in ds)


@needs_roboflow
def test_roboflow_boxes_in_pixels(roboflow):
    ds, _ = roboflow
    for s in ds:
        h, w = s.shape
        assert (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2] <= h).all()
        assert (s.boxes[:, 3] <= w).all() and (s.boxes[:, 2:] > s.boxes[:, :2]).all()
    test = ds.split("test")[0]
    assert test.image_path.name == "TCGA-OL-A5RW-DX1.png" and test.shape == (280, 296)
    # first label line: x 0.5507..0.6453, y 0.1036..0.2036 (a 5-point rectangle)
    np.testing.assert_allclose(test.boxes[0], [29.0, 163.0, 57.0, 191.0], atol=1e-4)
    assert ds.split("train")[0].shape == (640, 640)
    assert ds.split("valid") == ds.split("val")


@needs_roboflow
def test_roboflow_test_split_name_mismatch_is_reported(roboflow):
    ds, messages = roboflow
    mismatches = ds.problems_of("name_mismatch")
    assert len(mismatches) == 4 and {p.split for p in mismatches} == {"test"}
    assert "TCGA-OL-A5RW-DX1.png" in mismatches[0].message
    assert "_png.rf." in mismatches[0].message
    assert any("name_mismatch" in m and "'test'" in m for m in messages)
    assert not ds.problems_of("orphan_label")


@needs_roboflow
def test_roboflow_strict_names_leave_orphans():
    with pytest.warns(UserWarning) as record:
        ds = read_yolo_dataset(ROBOFLOW / "data.yaml", match_roboflow_names=False)
    assert sorted(str(w.message).split(": ")[1] for w in record) == [
        "4 x name_mismatch",
        "4 x orphan_label",
    ]
    assert ds.counts()["test"] == {"images": 4, "objects": 0}
    orphans = ds.problems_of("orphan_label")
    assert len(orphans) == 4 and all(p.path.suffix == ".txt" for p in orphans)
    assert len(ds.problems_of("name_mismatch")) == 4


@needs_roboflow
def test_roboflow_colab_paths_are_relocated():
    root, names, splits = locate_splits(ROBOFLOW)
    assert len(names) == 9
    assert splits["test"] == [(ROBOFLOW / "test" / "images").resolve()]
    assert splits["val"] == [(ROBOFLOW / "val" / "images").resolve()]


@needs_roboflow
def test_to_napari_layers(roboflow):
    from napari_yolocell.training.annotations import boxes_from_shapes

    sample = roboflow[0].split("val")[0]
    (image, image_kw, image_type), (rects, shapes_kw, shapes_type) = to_napari_layers(sample)
    assert image_type == "image" and image.shape == (640, 640, 3) and image_kw["rgb"]
    assert shapes_type == "shapes" and shapes_kw["shape_type"] == "rectangle"
    assert len(rects) == sample.n_objects
    assert list(shapes_kw["features"]["class_name"]) == sample.class_names
    # napari vertices sit half a pixel before the pixel edges; +0.5 reads them back exactly
    np.testing.assert_allclose(boxes_from_shapes(rects) + 0.5, sample.boxes)


# --------------------------------------------------------------------------- hand-made datasets


def test_label_lines_boxes_polygons_and_bad_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(
        "0 0.5 0.5 0.2 0.4\n"  # box: x 0.4..0.6, y 0.3..0.7
        "1 0.1 0.1 0.3 0.1 0.3 0.2\n"  # triangle polygon
        "\n"
        "2 0.5 0.5\n"  # too few values
        "x 0.5 0.5 0.1 0.1\n"  # not numeric
        "0 0.5 0.5 1.5 0.1\n"  # outside the image
    )
    boxes, classes, polygon, bad = parse_label_file(path)
    np.testing.assert_allclose(boxes, [[0.3, 0.4, 0.7, 0.6], [0.1, 0.1, 0.2, 0.3]])
    assert classes.tolist() == [0, 1] and polygon.tolist() == [False, True]
    assert [line for line, _ in bad] == [4, 5, 6]


def test_ultralytics_layout_with_problems(tmp_path):
    _image(tmp_path / "images/train/a.png", (40, 60))
    _label(tmp_path / "labels/train/a.txt", "0 0.5 0.5 0.5 0.5\n0 0.1 0.1\n")
    _image(tmp_path / "images/train/empty.png")  # no label: zero objects
    _label(tmp_path / "labels/train/ghost.txt", "0 0.5 0.5 0.1 0.1\n")  # no image
    _image(tmp_path / "images/val/b.jpg", (40, 60))
    _label(tmp_path / "labels/val/b.txt", "0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text(
        f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: [nucleus]\n"
    )
    with pytest.warns(UserWarning) as record:
        ds = read_yolo_dataset(tmp_path)
    assert ds.counts() == {"train": {"images": 2, "objects": 1}, "val": {"images": 1, "objects": 1}}
    a = ds.split("train")[0]
    np.testing.assert_allclose(a.boxes, [[10, 15, 30, 45]])  # pixels y0, x0, y1, x1
    assert a.class_names == ["nucleus"]
    kinds = sorted(p.kind for p in ds.problems)
    assert kinds == ["bad_label_line", "orphan_label"]
    assert ds.problems_of("orphan_label")[0].path.name == "ghost.txt"
    assert {str(w.message).split(": ")[1] for w in record} == {
        "1 x bad_label_line",
        "1 x orphan_label",
    }


def test_roboflow_style_relative_paths(tmp_path):
    for split in ("train", "valid", "test"):
        _image(tmp_path / split / "images" / f"{split}_1.jpg")
        _label(tmp_path / split / "labels" / f"{split}_1.txt", "1 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
        "nc: 2\nnames: ['a', 'b']\n"
    )
    ds = read_yolo_dataset(tmp_path / "data.yaml", warn=False)
    assert ds.splits == ["train", "val", "test"] and not ds.problems
    assert ds.split("val")[0].class_names == ["b"]


def test_no_yaml_conventional_layout_and_missing_dataset(tmp_path):
    _image(tmp_path / "images/train/a.png")
    _label(tmp_path / "labels/train/a.txt", "3 0.5 0.5 0.2 0.2\n")
    ds = read_yolo_dataset(tmp_path)
    assert ds.names == ("0", "1", "2", "3") and ds.splits == ["train"]
    with pytest.raises(FileNotFoundError):
        read_yolo_dataset(tmp_path / "nope")


def test_unique_images_problem_summary_and_review_layers(tmp_path):
    """A val split pointing at the train folder (as our exports do when val is empty)."""
    for name in ("a", "b", "c"):
        _image(tmp_path / f"images/train/{name}.png", (40, 60))
        _label(tmp_path / f"labels/train/{name}.txt", "0 0.5 0.5 0.5 0.5\n")
    _label(tmp_path / "labels/train/ghost.txt", "0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "data.yaml").write_text(
        f"path: {tmp_path}\ntrain: images/train\nval: images/train\nnames: [nucleus]\n"
    )
    ds = read_yolo_dataset(tmp_path, warn=False)
    assert ds.problem_summary().startswith("2 problem(s) (2 orphan_label); first: ")
    assert "ghost.txt" in ds.problem_summary() and "\n" not in ds.problem_summary()
    twice = dataclasses.replace(ds, samples=ds.samples + ds.split("train"))  # a shared folder
    names = [s.image_path.name for s in twice.unique_images()]
    assert len(twice) == 6 and names == ["a.png", "b.png", "c.png"]
    assert len(twice.unique_images(2)) == 2
    assert dataclasses.replace(ds, problems=[]).problem_summary() == ""

    layers, read = import_dataset_layers(tmp_path, max_images=2)
    assert [kind for *_, kind in layers] == ["image", "shapes"] * 2
    assert [meta["name"] for _, meta, _ in layers] == ["a", "a boxes", "b", "b boxes"]
    assert read.root == ds.root
    layers, _ = import_dataset_layers(tmp_path, split="train", max_images=20)
    assert len(layers) == 6


def test_tiff_images_are_read_through_open_image(tmp_path):
    import tifffile

    grey = (np.arange(30 * 50).reshape(30, 50) * 40).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    np.testing.assert_array_equal(load_image(tmp_path / "g.tif"), grey)
    assert image_size(tmp_path / "g.tif") == (30, 50)
    channels = np.zeros((3, 30, 50), np.uint16)  # 16-bit multichannel: PIL cannot open it
    tifffile.imwrite(tmp_path / "c.tiff", channels, photometric="minisblack")
    assert image_size(tmp_path / "c.tiff") == (30, 50)
    assert load_image(tmp_path / "c.tiff").shape == (3, 30, 50)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00not a tiff")
    with pytest.raises(ValueError, match="bad.tif"):
        load_image(tmp_path / "bad.tif")
