"""Several corrected images into one dataset, one export after another (issue #20)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_yolocell.io.yolo import read_yolo_dataset
from napari_yolocell.training.dataset import (
    Sample,
    assign_splits,
    export_dataset,
    extend_splits,
    is_dataset,
    merge_samples,
)


def _sample(name: str, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 50, (96, 128)).astype(np.uint16)
    boxes = np.array([[10, 10, 22, 22], [40, 60, 52, 72], [70, 100, 82, 112]], float)
    for y0, x0, y1, x1 in boxes.astype(int):
        img[y0:y1, x0:x1] += 400
    return Sample(img, boxes, name)


def _files(root, split):
    return sorted(p.name for p in (root / "images" / split).glob("*.png"))


def test_three_images_one_after_another_make_one_dataset(tmp_path):
    out = tmp_path / "ds"
    splits = []
    for i, name in enumerate(["a", "b", "c"]):
        report = export_dataset([_sample(name, i)], out, tile=128, overlap=16, append=True)
        assert is_dataset(out)
        splits.append(json.loads((out / "dataset.json").read_text())["sources"][name])
    assert splits == ["train", "val", "train"]  # a val image as soon as there are two
    assert report.totals["n_sources"] == {"train": 2, "val": 1, "test": 0}
    assert "the dataset now holds train 2 images" in report.summary()
    ds = read_yolo_dataset(out, splits=("train", "val"), warn=False)
    assert sorted(s.image_path.name[0] for s in ds) == ["a", "b", "c"]  # nothing lost
    assert sum(len(s.boxes) for s in ds) == 9

    before = _files(out, "train")
    report = export_dataset([_sample("a", 7)], out, tile=128, overlap=16, append=True)
    assert _files(out, "train") == before  # exported again: replaced, in the same split
    assert any("replaced: a" in w for w in report.warnings)
    assert not list(tmp_path.glob(".ds.*"))  # no temporary folder left


def test_a_dataset_is_still_refused_without_append(tmp_path):
    out = tmp_path / "ds"
    export_dataset([_sample("a", 0)], out, tile=128)
    with pytest.raises(FileExistsError):
        export_dataset([_sample("b", 1)], out, tile=128)


def test_three_regions_two_train_one_val():
    assert sorted(assign_splits(["r0", "r1", "r2"]).values()) == ["train", "train", "val"]
    assert sorted(assign_splits([f"r{i}" for i in range(5)]).values()).count("test") == 1
    assert extend_splits({"a": "train", "b": "val"}, ["b", "c"]) == {"b": "val", "c": "train"}


def test_box_deletions_and_clicked_points_merge_into_one_sample():
    img = np.zeros((50, 50))
    boxes = Sample(img, np.array([[0, 0, 10, 10]], float), "x")
    points = Sample(img, np.array([[1, 1, 9, 9], [30, 30, 40, 40]], float), "x")
    other = Sample(img, np.array([[5, 5, 9, 9]], float), "y")
    merged = merge_samples([boxes], [points, other])
    assert [s.name for s in merged] == ["x", "y"]
    assert merged[0].boxes.tolist() == [[0, 0, 10, 10], [30, 30, 40, 40]]  # no duplicate
