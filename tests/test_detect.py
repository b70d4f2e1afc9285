"""Tests of the tiled detection engine."""

import threading

import dask.array as da
import numpy as np
import pytest
from conftest import RecordingArray
from skimage.transform import downscale_local_mean

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import (
    COLUMNS,
    DetectionCancelled,
    DetectParams,
    count_per_plane,
    derive_overlap,
    detect_image,
    iter_detect,
    resolve_params,
)
from napari_yolocell.engine.tiling import tile_grid
from napari_yolocell.models.classical import ClassicalDetector
from napari_yolocell.models.detector import Detector
from napari_yolocell.models.spec import ModelSpec


class CentreDetector(Detector):
    """Fake detector: one 10 px box in the middle of every tile, records tile shapes."""

    def __init__(self):
        self.spec = ModelSpec(name="fake", default_conf=0.1)
        self.shapes = []

    def predict(self, tiles, conf, iou, max_det):
        self.shapes += [t.shape for t in tiles]
        out = []
        for t in tiles:
            cy, cx = t.shape[0] / 2, t.shape[1] / 2
            out.append(np.array([[cx - 5, cy - 5, cx + 5, cy + 5, 0.9, 0]]))
        return out


def centre_distances(syn, df):
    """Distance from each truth box centre to each detection centre."""
    ty = (syn.boxes[:, 0] + syn.boxes[:, 2]) / 2
    tx = (syn.boxes[:, 1] + syn.boxes[:, 3]) / 2
    return np.hypot(ty[:, None] - df["y"].to_numpy(), tx[:, None] - df["x"].to_numpy())


@pytest.fixture(scope="module")
def syn():
    return make_nuclei_image((384, 320), n_nuclei=40, seed=3)


def test_columns_and_counts(syn):
    df = detect_image(syn.image, ClassicalDetector(), DetectParams(tile=256, overlap=64))
    assert list(df.columns) == COLUMNS
    assert len(df) == syn.count
    assert (df["plane"] == 0).all()
    assert np.allclose(df["y"], (df["y0"] + df["y1"]) / 2)
    # Every truth centre lies within a few pixels of a detection centre.
    dist = centre_distances(syn, df)
    assert dist.min(axis=1).max() < 3


def test_tiles_are_read_lazily():
    image = RecordingArray(np.zeros((700, 500), dtype=np.uint8))
    params = DetectParams(tile=256, overlap=32, normalize="none", batch=3)
    detect_image(image, CentreDetector(), params)
    # one overview read (nucleus size measurement), then each tile's window exactly once
    overview = [k for k in image.keys if k[0].start is None]  # a whole-plane (strided) read
    tiles = [k for k in image.keys if k not in overview]
    windows = {(k[0].start, k[0].stop, k[1].start, k[1].stop) for k in tiles}
    grid = {(t.y0, t.y1, t.x0, t.x1) for t in tile_grid((700, 500), 256, 32)}
    assert len(overview) == 1 and len(tiles) == len(grid)
    assert windows == grid


def test_multiscale_reports_full_resolution_coordinates():
    syn = make_nuclei_image((512, 512), n_nuclei=30, diameter=(20.0, 30.0), seed=5)
    level1 = downscale_local_mean(syn.image.astype(np.float32), (2, 2))
    params = DetectParams(tile=128, overlap=40, level=1, diameter=25.0)
    df = detect_image([syn.image, level1], ClassicalDetector(), params)
    assert len(df) == syn.count
    dist = centre_distances(syn, df)
    assert dist.min(axis=1).max() < 4  # level-1 coordinates would be off by ~half the position
    assert df["x1"].max() > 400


def test_diameter_rescales_tiles():
    syn = make_nuclei_image((400, 400), n_nuclei=12, diameter=(50.0, 70.0), seed=2)
    detector = ClassicalDetector()  # expects ~20 px nuclei
    df = detect_image(syn.image, detector, DetectParams(tile=256, diameter=60.0))
    assert len(df) == syn.count
    _, scale = resolve_params(DetectParams(diameter=60.0), detector.spec)
    assert scale == pytest.approx(1 / 3)


def test_stack_is_run_per_plane():
    planes = [make_nuclei_image((256, 256), n_nuclei=n, seed=n) for n in (7, 15)]
    stack = da.from_array(np.stack([p.image for p in planes]), chunks=(1, 128, 128))
    df = detect_image(stack, ClassicalDetector(), DetectParams(tile=160, overlap=48))
    assert count_per_plane(df).tolist() == [7, 15]
    assert df.attrs["plane_shape"] == (2,)


def test_channel_axis_and_rgb(syn):
    empty = np.full_like(syn.image, 200)
    two_channels = np.stack([empty, syn.image], axis=0)
    params = DetectParams(tile=256, overlap=64, channel=1)
    df = detect_image(two_channels, ClassicalDetector(), params, channel_axis=0)
    assert len(df) == syn.count
    with pytest.raises(ValueError, match="2 channels"):
        detect_image(two_channels, ClassicalDetector(), channel_axis=0)
    rgb = np.stack([empty, empty, syn.image], axis=-1)  # nuclei in blue
    assert len(detect_image(rgb, ClassicalDetector(), DetectParams(tile=256))) == syn.count


def test_progress_cancel_and_generator(syn):
    calls = []
    detect_image(
        syn.image,
        CentreDetector(),
        DetectParams(tile=128, overlap=32, batch=4),
        progress=lambda done, total: calls.append((done, total)),
    )
    total = len(tile_grid(syn.image.shape, 128, 32))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    event = threading.Event()
    event.set()
    with pytest.raises(DetectionCancelled):
        detect_image(syn.image, CentreDetector(), cancel=event)

    gen = iter_detect(syn.image, CentreDetector(), DetectParams(tile=128, overlap=32))
    steps = []
    with pytest.raises(StopIteration) as stop:
        while True:
            steps.append(next(gen))
    assert steps[-1] == (total, total) and list(stop.value.value.columns) == COLUMNS


def test_small_image_single_padded_tile():
    detector = CentreDetector()
    df = detect_image(np.random.default_rng(0).random((50, 70)), detector)
    assert detector.shapes == [(50, 70, 3)]
    assert len(df) == 1 and df["x"].iloc[0] == pytest.approx(35)


def test_grey_tiles_only_for_detectors_that_take_them():
    """Detectors declaring ``grey_tiles`` get (H, W) tiles (no x3 copy); others (H, W, 3)."""
    image = np.random.default_rng(0).random((700, 900))
    plain, grey = CentreDetector(), CentreDetector()
    grey.grey_tiles = True
    a = detect_image(image, plain, DetectParams(tile=640, overlap=64, batch=2))
    b = detect_image(image, grey, DetectParams(tile=640, overlap=64, batch=2))
    assert [s[:2] for s in plain.shapes] == grey.shapes
    assert {len(s) for s in plain.shapes} == {3} and {len(s) for s in grey.shapes} == {2}
    assert a[["x", "y"]].equals(b[["x", "y"]])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 10)), "empty"),
        (np.zeros(10), "2 dimensions"),
        (np.array([["a", "b"], ["c", "d"]]), "data type"),
    ],
)
def test_bad_inputs(image, message):
    with pytest.raises(ValueError, match=message):
        detect_image(image, ClassicalDetector())


def test_bad_params(syn):
    with pytest.raises(ValueError, match="level"):
        detect_image(syn.image, ClassicalDetector(), DetectParams(level=1))
    with pytest.raises(ValueError, match="overlap"):
        detect_image(syn.image, ClassicalDetector(), DetectParams(tile=64, overlap=64))


def test_constant_and_nan_images(syn):
    assert len(detect_image(np.full((300, 300), 5, np.uint16), ClassicalDetector())) == 0
    image = syn.image.astype(np.float32)
    image[:5, :5] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):
        df = detect_image(image, ClassicalDetector(), DetectParams(tile=256, overlap=64))
    assert len(df) == syn.count


def test_derived_overlap():
    spec = ModelSpec(name="m", diameter_px=20)
    params, scale = resolve_params(DetectParams(), spec)
    assert params.overlap == 60 and scale == 1.0 and params.conf == spec.default_conf
    assert derive_overlap(10, 640) == 32 and derive_overlap(400, 640) == 320
    # A diameter given in full-res pixels, analysed on a 4x downsampled level.
    params, scale = resolve_params(DetectParams(diameter=80), spec, level_factor=4)
    assert params.overlap == 60 and scale == pytest.approx(1.0)
