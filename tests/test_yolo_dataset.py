from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.io.yolo import read_yolo_dataset
from napari_yolocell.training.dataset import (
    Sample,
    assign_splits,
    check_out_folder,
    crop_boxes,
    export_dataset,
    yolo_lines,
)


def test_yolo_line_maths_hand_computed():
    # box y 10..30, x 20..60 in a 100 (h) x 200 (w) image: cx=40/200, cy=20/100, w=40/200, h=20/100
    assert yolo_lines(np.array([[10, 20, 30, 60]]), [0], 100, 200) == [
        "0 0.200000 0.200000 0.200000 0.200000"
    ]
    assert yolo_lines(np.array([[0, 0, 100, 200]]), [2], 100, 200) == [
        "2 0.500000 0.500000 1.000000 1.000000"
    ]


def test_split_proportions_seeded():
    groups = [f"g{i}" for i in range(100)]
    a = assign_splits(groups, (0.7, 0.2, 0.1), seed=3)
    b = assign_splits(groups, (0.7, 0.2, 0.1), seed=3)
    assert a == b
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 20, "test": 10}
    assert assign_splits(groups, seed=4) != a


def test_crop_boxes_drops_small_fragments():
    boxes = np.array([[0, 0, 10, 10], [5, 95, 15, 105], [5, 99, 15, 109]])
    # window x 0..100: the second box is 50 % inside, the third 10 %
    out, keep = crop_boxes(boxes, (0, 0, 100, 100), min_fraction=0.4)
    np.testing.assert_array_equal(keep, [True, True, False])
    np.testing.assert_allclose(out, [[0, 0, 10, 10], [5, 95, 15, 100]])


def _samples(n=12, size=(160, 200)):
    out = []
    for i in range(n):
        syn = make_nuclei_image(size, n_nuclei=8, seed=i)
        out.append(Sample(syn.image, syn.boxes, name=f"img{i}"))
    return out


def test_export_then_import_gives_same_boxes(tmp_path):
    samples = _samples()
    rep = export_dataset(samples, tmp_path / "ds", tile=256, overlap=32, seed=0)
    assert sum(rep.n_images.values()) == len(samples)
    assert rep.n_images["train"] > rep.n_images["val"] > 0 and rep.n_images["test"] > 0
    data = yaml.safe_load((tmp_path / "ds" / "data.yaml").read_text())
    assert data["nc"] == 1 and data["names"] == {0: "nucleus"}
    # 16-bit in, 8-bit normalised PNG out, padded on the long side to the tile
    png = next((tmp_path / "ds" / "images" / "train").glob("*.png"))
    arr = np.asarray(Image.open(png))
    assert arr.dtype == np.uint8 and max(arr.shape) == 256 and arr.max() == 255
    ds = read_yolo_dataset(tmp_path / "ds")
    by_name = {Path(s.image_path).stem.split("_y")[0]: s for s in ds}
    for s in samples:
        got = by_name[s.name].boxes
        truth = np.clip(s.boxes, 0, [160, 200, 160, 200])
        order = lambda b: b[np.lexsort((b[:, 1], b[:, 0]))]  # noqa: E731
        np.testing.assert_allclose(order(got), order(truth), atol=0.05)


def test_large_image_is_tiled_and_regions_never_straddle_splits(tmp_path):
    syn = make_nuclei_image((1024, 1024), n_nuclei=150, seed=1)
    rep = export_dataset(
        [Sample(syn.image, syn.boxes, name="big")], tmp_path / "ds", tile=256, overlap=32
    )
    assert rep.n_images["val"] > 0 and rep.n_images["train"] > 0
    # every tile name carries its window; group tiles by the block of the region grid
    meta = yaml.safe_load((tmp_path / "ds" / "data.yaml").read_text())
    assert meta["train"] == "images/train"
    regions = {}
    for split in ("train", "val", "test"):
        for p in (tmp_path / "ds" / "images" / split).glob("*.png"):
            y = int(p.stem.split("_y")[1].split("_x")[0])
            x = int(p.stem.split("_x")[1])
            w, h = Image.open(p).size
            regions[(y, x, h, w)] = split
    # tiles of different splits must not overlap in pixels (no leakage)
    items = list(regions.items())
    for i, ((y, x, h, w), s) in enumerate(items):
        for (y2, x2, h2, w2), s2 in items[i + 1 :]:
            if s != s2:
                assert y + h <= y2 or y2 + h2 <= y or x + w <= x2 or x2 + w2 <= x


def test_refuses_non_empty_folder_and_overwrites_atomically(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_dataset(_samples(3), out)
    assert (out / "precious.txt").read_text() == "keep me"
    export_dataset(_samples(3), out, overwrite=True, tile=256)
    assert not (out / "precious.txt").exists() and (out / "data.yaml").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]


def test_failed_export_leaves_nothing(tmp_path):
    bad = _samples(2) + [Sample(np.zeros((3, 10, 10, 10)), np.zeros((0, 4)), name="stack")]
    with pytest.raises(ValueError, match="2-D"):
        export_dataset(bad, tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_check_out_folder_before_any_work(tmp_path):
    """What export_dataset refuses, checked up front (the widget does, before reading layers)."""
    assert check_out_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_out_folder(tmp_path / "empty") == tmp_path / "empty"
    export_dataset(_samples(2), tmp_path / "ds", tile=256)
    with pytest.raises(FileExistsError, match=r"not empty.*tick the box to replace it"):
        check_out_folder(tmp_path / "ds", overwrite_hint="tick the box")
    assert check_out_folder(tmp_path / "ds", overwrite=True) == tmp_path / "ds"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_out_folder(tmp_path / "file", overwrite=True)
    for nothing in ("", ".", None):
        with pytest.raises(ValueError, match="choose an output folder"):
            check_out_folder(nothing)


# ------------------------------------------------------------ issue #15: annotated regions


def test_two_groups_keep_one_for_val_and_one_for_train():
    # a few-shot run needs something held out to show that the new model is better
    assert sorted(assign_splits(["a", "b"], (0.7, 0.2, 0.1)).values()) == ["train", "val"]
    assert set(assign_splits(["a", "b"], (1.0, 0.0, 0.0)).values()) == {"train"}
    assert set(assign_splits(["a"], (0.7, 0.2, 0.1)).values()) == {"train"}


def test_crop_to_regions_clips_boxes_and_marks_samples_complete():
    from napari_yolocell.training.dataset import crop_to_regions

    img = np.arange(100 * 120).reshape(100, 120)
    boxes = np.array([[10, 10, 20, 20], [45, 30, 55, 40], [48, 10, 60, 20], [80, 80, 90, 90]])
    sample = Sample(img, boxes, "img", classes=np.array([0, 1, 2, 3]))
    crops = crop_to_regions(sample, [[0.2, 0, 50, 50], [70, 70, 200, 200], [300, 0, 400, 10]])
    assert [c.name for c in crops] == ["img_r0", "img_r1"]  # the third is outside the image
    first, second = crops
    assert first.image.shape == (50, 50) and np.array_equal(first.image, img[:50, :50])
    # 45..55 is half inside (kept, clipped); 48..60 only 2/12 inside (dropped: a sliver)
    assert first.boxes.tolist() == [[10, 10, 20, 20], [45, 30, 50, 40]]
    assert first.classes.tolist() == [0, 1]
    assert second.image.shape == (30, 50) and second.boxes.tolist() == [[10, 10, 20, 20]]
    assert all(c.complete for c in crops)


def test_region_samples_skip_the_partial_annotation_warning(tmp_path):
    from napari_yolocell.training.dataset import coverage_warning, samples_from_annotations

    syn = make_nuclei_image((256, 256), n_nuclei=12, seed=2)
    corner = syn.centers[(syn.centers < 100).all(axis=1)]
    assert 0 < len(corner) < 12
    whole = samples_from_annotations(syn.image, "cells", "points", corner - 0.5, diameter=16)
    assert coverage_warning(whole[0]) is not None  # a corner of a large image: warned

    region = [np.array([[0, 0], [0, 110], [110, 110], [110, 0]], float) - 0.5]  # napari coords
    empty = [np.array([[150, 150], [150, 200], [200, 200], [200, 150]], float) - 0.5]
    samples = samples_from_annotations(
        syn.image, "cells", "points", corner - 0.5, diameter=16, regions=region + empty
    )
    assert [s.image.shape for s in samples] == [(110, 110), (50, 50)]
    assert len(samples[0].boxes) == len(corner) and len(samples[1].boxes) <= 1
    report = export_dataset(samples, tmp_path / "ds", tile=128, overlap=32)
    assert not any("cover only" in w or "no annotations" in w for w in report.warnings)
    assert report.n_images["train"] == report.n_images["val"] == 1
