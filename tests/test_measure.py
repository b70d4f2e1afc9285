"""Per-nucleus measurements, marker classification and counts, and ``detect --measure``."""

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_yolocell.analysis.measure import (
    classify_marker,
    marker_counts,
    marker_threshold,
    measure_nuclei,
)
from napari_yolocell.cli import main
from napari_yolocell.data.synthetic import NucleusField, place_nuclei
from napari_yolocell.io.tables import CSV_COLUMNS, MARKER_COUNT_COLUMNS

N_NUCLEI = 300
POSITIVE_FRACTION = 0.4


def two_channel_image(shape=(900, 900), n=N_NUCLEI, seed=0):
    """Nuclear stain (channel 0) + a marker (channel 1) in a known 40 % of the nuclei.

    Returns the (2, H, W) uint16 image, the true boxes and the positive mask.
    """
    nuclei = place_nuclei(shape, n_nuclei=n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    positive = np.zeros(len(nuclei), bool)
    positive[rng.choice(len(nuclei), int(round(POSITIVE_FRACTION * len(nuclei))), False)] = True
    marker = NucleusField(
        nuclei.shape,
        nuclei.centers,
        nuclei.semi_axes,
        nuclei.angles,
        np.where(positive, rng.uniform(600, 2000, len(nuclei)), 0.0),
        background=150,
        noise=25,
    )
    h, w = shape
    image = np.stack(
        [
            nuclei.render(0, 0, h, w, 1, np.uint16, seed=[seed, 0]),
            marker.render(0, 0, h, w, 1, np.uint16, seed=[seed, 1]),
        ]
    )
    return image, nuclei.boxes, positive


def truth_table(boxes: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "plane": 0,
            "y": (boxes[:, 0] + boxes[:, 2]) / 2,
            "x": (boxes[:, 1] + boxes[:, 3]) / 2,
            "y0": boxes[:, 0],
            "x0": boxes[:, 1],
            "y1": boxes[:, 2],
            "x1": boxes[:, 3],
            "confidence": 1.0,
            "class": 0,
        }
    )


def test_marker_separation_on_true_boxes():
    image, boxes, positive = two_channel_image()
    assert len(boxes) == N_NUCLEI and positive.sum() == 120
    df = measure_nuclei(image, truth_table(boxes), channel_axis=0, pixel_size_um=(0.5, 0.5))
    assert list(df.columns[-4:]) == ["mean_c0", "mean_c1", "area_px", "area_um2"]
    assert (df["area_px"] > 50).all()
    np.testing.assert_allclose(df["area_um2"], df["area_px"] * 0.25)
    classified = classify_marker(df, channel=1)
    agree = np.mean((classified["marker"] == "positive").to_numpy() == positive)
    print(f"marker separation: {agree:.2%}, threshold {classified.attrs['marker_threshold']:.1f}")
    assert agree >= 0.98
    counts = marker_counts(classified, "syn")
    assert list(counts.columns) == MARKER_COUNT_COLUMNS
    got = dict(zip(counts["class"], counts["count"], strict=True))
    assert got["positive"] + got["negative"] == N_NUCLEI
    assert abs(got["positive"] - 120) <= 6


def test_lazy_and_in_memory_agree_and_blocks_do_not_matter():
    image, boxes, _ = two_channel_image((400, 500), n=60, seed=3)
    df = truth_table(boxes)
    eager = measure_nuclei(image, df, channel_axis=0)
    lazy = measure_nuclei(da.from_array(image, chunks=(1, 128, 128)), df, channel_axis=0, block=96)
    pd.testing.assert_frame_equal(eager, lazy)
    assert list(eager.columns) == [*df.columns, "mean_c0", "mean_c1", "area_px"]


def test_ellipse_region_and_area():
    img = np.zeros((40, 40), np.uint16)
    img[10:20, 10:30] = 100  # a box of 10 x 20 px; the ellipse lies inside it
    df = truth_table(np.array([[10.0, 10.0, 20.0, 30.0]]))
    out = measure_nuclei(img, df)
    assert out["mean_c0"].iloc[0] == 100
    assert abs(out["area_px"].iloc[0] - np.pi * 5 * 10) < 8  # pixel count of the ellipse
    tiny = measure_nuclei(img, truth_table(np.array([[12.2, 12.2, 12.4, 12.4]])))
    assert tiny["area_px"].iloc[0] == 1


def test_stack_planes_and_rgb():
    stack = np.zeros((3, 30, 30), np.uint8)
    stack[2, 5:15, 5:15] = 50
    df = truth_table(np.array([[5.0, 5.0, 15.0, 15.0]] * 2))
    df["plane"] = [0, 2]
    assert measure_nuclei(stack, df)["mean_c0"].tolist() == [0, 50]
    rgb = np.zeros((30, 30, 3), np.uint8)
    rgb[..., 1] = 7
    out = measure_nuclei(rgb, df.iloc[:1])
    assert out[["mean_c0", "mean_c1", "mean_c2"]].iloc[0].tolist() == [0, 7, 0]
    with pytest.raises(ValueError, match="plane"):
        measure_nuclei(stack[0], df)


def test_threshold_and_counts_with_rois():
    assert marker_threshold([1, 1, 1]) == 1
    assert 10 < marker_threshold([10, 11, 12, 100, 101, 102]) < 100
    assert 10 < marker_threshold([10, 11, 12, 1000, 1010, 1020], log=False) < 1000
    assert marker_threshold([10, 12, 100, 102], method="otsu", log=False) == 56  # gap midpoint
    assert 12 < marker_threshold([10, 11, 12, 100, 101, 102], method="li") < 100
    with pytest.raises(ValueError):
        marker_threshold([1, 2], method="nope")
    df = truth_table(np.array([[0, 0, 2, 2], [10, 10, 12, 12], [20, 20, 22, 22.0]]))
    df["mean_c1"] = [5.0, 50.0, 60.0]
    classified = classify_marker(df, 1, threshold=10)
    roi = np.array([[0, 0], [0, 15], [15, 15], [15, 0]], float)
    counts = marker_counts(classified, "im", [roi], ["left"], n_planes=2)
    assert len(counts) == 2 * 2 * 2
    first = counts[counts["plane"] == 0].set_index(["roi", "class"])["count"].to_dict()
    assert first == {
        ("all", "positive"): 2,
        ("all", "negative"): 1,
        ("left", "positive"): 1,
        ("left", "negative"): 1,
    }
    assert counts[counts["plane"] == 1]["count"].sum() == 0
    with pytest.raises(ValueError, match="mean_c3"):
        classify_marker(df, 3)


def test_cli_measure_columns_after_the_contract(tmp_path, capsys):
    image, boxes, positive = two_channel_image((300, 360), n=25, seed=5)
    path = tmp_path / "two.tif"
    tifffile.imwrite(
        path, image, imagej=True, resolution=(2.0, 2.0), metadata={"axes": "CYX", "unit": "um"}
    )
    out, counts = tmp_path / "d.csv", tmp_path / "c.csv"
    args = ["detect", str(path), "--model", "classical", "--channel", "0", "--quiet"]
    rc = main([*args, "--measure", "--out", str(out), "--counts", str(counts)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("total\t")
    det = pd.read_csv(out)
    assert list(det.columns) == [*CSV_COLUMNS, "mean_c0", "mean_c1", "area_px", "area_um2"]
    assert len(det) >= 20 and (det["area_px"] > 0).all()
    np.testing.assert_allclose(det["area_um2"], det["area_px"] * 0.25)
    assert list(pd.read_csv(counts).columns) == ["image", "plane", "roi", "count"]
    # the marker: NAME.marker_counts.csv beside --counts
    rc = main([*args, "--marker-channel", "1", "--counts", str(counts)])
    assert rc == 0
    capsys.readouterr()
    mc = pd.read_csv(tmp_path / "c.marker_counts.csv")
    assert list(mc.columns) == MARKER_COUNT_COLUMNS
    assert mc["class"].tolist() == ["positive", "negative"]
    assert abs(mc["count"].iloc[0] - positive.sum()) <= 2
    # without --measure the CSV is exactly the contract
    main([*args, "--out", str(out)])
    assert list(pd.read_csv(out).columns) == CSV_COLUMNS
