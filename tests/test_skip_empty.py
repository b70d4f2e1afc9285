"""Whole-slide empty-tile skipping: fewer tiles analysed, never a nucleus lost."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label, regionprops
from skimage.transform import downscale_local_mean

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine import detect
from napari_yolocell.engine.detect import DetectParams, detect_image, empty_threshold
from napari_yolocell.engine.tiling import tile_grid
from napari_yolocell.models.classical import ClassicalDetector
from napari_yolocell.models.detector import Detector
from napari_yolocell.models.spec import ModelSpec

TILE, OVERLAP = 256, 64


class RecordingArray:
    """Array stand-in recording the windows read from it."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.keys = []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.data[key]


class SeenDetector(Detector):
    """One box per blob brighter than a low grey level (finds dim nuclei too); counts tiles."""

    def __init__(self, level: int = 15):
        self.spec = ModelSpec(name="blobs", default_conf=0.0, diameter_px=18.0)
        self.level = level
        self.seen = 0

    def predict(self, tiles, conf, iou, max_det):
        self.seen += len(tiles)
        out = []
        for tile in tiles:
            labels = label(tile[:, :, 0] > self.level)
            boxes = [
                (r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2], 1.0, 0)
                for r in regionprops(labels)
                if r.area >= 5
            ]
            out.append(np.array(boxes, dtype=float).reshape(-1, 6))
        return out


def _sparse_slide(shape=(1600, 1600), seed=0):
    """Nuclei in two islands (one dim), plus one nucleus cut by a tile side; the rest empty."""
    yy, xx = np.mgrid[100:400:40, 100:500:40]  # nuclei on a grid: never touching
    island = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float)
    yy, xx = np.mgrid[1100:1450:45, 1000:1450:45]
    far = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(float) + seed
    # A nucleus across the top side of the tile starting at y=1152 (stride 192), alone there.
    edge = np.array([[1152.0, 260.0]])
    centers = np.concatenate([island, far, edge])
    syn = make_nuclei_image(shape, centers=centers, seed=seed, min_distance=0)
    dim = make_nuclei_image(
        shape,
        centers=np.array([[700.0, 1300.0], [760.0, 1360.0]]),
        intensity=(500, 600),
        seed=seed + 1,
        noise=0,
    )
    image = np.maximum(syn.image, dim.image)  # two dim nuclei far from the others
    return image, len(centers) + 2


def _counts(image, detector_factory, **kw):
    out = {}
    for skip in (False, True):
        det = detector_factory()
        df = detect_image(
            image, det, DetectParams(tile=TILE, overlap=OVERLAP, batch=4, skip_empty=skip, **kw)
        )
        out[skip] = (len(df), df.attrs["skipped_tiles"], det)
    return out


def test_sparse_slide_skips_tiles_and_keeps_every_nucleus():
    image, truth = _sparse_slide()
    out = _counts(image, SeenDetector)
    (n_off, skipped_off, det_off), (n_on, skipped_on, det_on) = out[False], out[True]
    total = len(tile_grid(image.shape, TILE, OVERLAP))
    assert n_off == truth and n_on == n_off
    assert skipped_off == 0 and det_off.seen == total
    assert skipped_on > total // 3 and det_on.seen == total - skipped_on


def test_pyramid_overview_skips_without_reading_full_resolution():
    image, truth = _sparse_slide()
    full = RecordingArray(image)
    levels = [
        full,
        downscale_local_mean(image, 2).astype(image.dtype),
        downscale_local_mean(image, 4).astype(image.dtype),
        downscale_local_mean(image, 16).astype(image.dtype),
    ]
    calls = []
    df = detect_image(
        levels,
        SeenDetector(),
        DetectParams(tile=TILE, overlap=OVERLAP, batch=4),
        progress=lambda done, total: calls.append((done, total)),
    )
    total = len(tile_grid(image.shape, TILE, OVERLAP))
    skipped = df.attrs["skipped_tiles"]
    assert len(df) == truth and skipped > total // 3
    assert len(full.keys) == total - skipped  # skipped tiles: not one full-resolution read
    assert calls[-1] == (total, total)  # skipped tiles are reported as done


def test_dense_image_skips_nothing():
    syn = make_nuclei_image((1024, 1024), seed=2)
    out = _counts(syn.image, ClassicalDetector)
    assert out[True][0] == out[False][0] == syn.count
    assert out[True][1] == 0


def test_constant_and_noise_images_skip_nothing():
    constant = np.full((600, 600), 300, np.uint16)
    df = detect_image(constant, SeenDetector(), DetectParams(tile=TILE, overlap=OVERLAP))
    assert len(df) == 0 and df.attrs["skipped_tiles"] == 0
    noise = np.random.default_rng(0).normal(1000, 50, (600, 600))
    assert empty_threshold(np.clip(noise / 8, 0, 255).astype(np.uint8)) is None


def test_threshold_is_below_otsu_and_needs_a_background_mode():
    rng = np.random.default_rng(0)
    overview = np.clip(rng.normal(10, 2, (200, 200)), 0, 255).astype(np.uint8)
    overview[50:100, 50:100] = 200
    threshold = empty_threshold(overview)
    assert threshold is not None and 12 < threshold < 100
    overview[50:100, 50:100] = 14  # faint "nuclei" barely above the noise: no clear mode
    assert empty_threshold(overview) is None
    overview[50:100, 50:100] = 200
    overview[:150] = 200  # mostly bright: no background mode, skip nothing
    assert empty_threshold(overview) is None


@pytest.mark.parametrize("normalize", ["percentile", "none"])
def test_pyramid_with_diameter_and_normalisation(normalize):
    image, _ = _sparse_slide()
    image8 = np.clip(image // 12, 0, 255).astype(np.uint8) if normalize == "none" else image
    counts = {}
    for skip in (False, True):
        det = SeenDetector(level=40 if normalize == "none" else 15)
        params = DetectParams(
            tile=TILE, overlap=OVERLAP, normalize=normalize, diameter=36.0, skip_empty=skip
        )
        df = detect_image([image8, image8[::2, ::2], image8[::8, ::8]], det, params)
        counts[skip] = (len(df), df.attrs["skipped_tiles"])
    assert counts[True][0] == counts[False][0] > 100
    assert counts[True][1] > 0


def test_slide_like_synthetic_tiff_skips_background_and_counts_every_nucleus(tmp_path):
    from napari_yolocell.data.synthetic import tissue_mask_at
    from napari_yolocell.data.synthetic_tiff import write_synthetic_tiff
    from napari_yolocell.io.tiff import open_tiff

    shape = (3072, 3072)
    truth = write_synthetic_tiff(
        tmp_path / "slide.tif", shape=shape, tile=256, levels=3, tissue=0.4, seed=3
    )
    ys, xs = np.mgrid[0 : shape[0] : 64, 0 : shape[1] : 64]
    grid = np.stack([ys.ravel(), xs.ravel()], axis=1)
    covered = tissue_mask_at(grid, shape, 0.4, seed=3).mean()
    assert 0.3 < covered < 0.5  # about the requested fraction of the slide is tissue
    assert tissue_mask_at(truth[["y", "x"]].to_numpy(), shape, 0.4, seed=3).all()

    image = open_tiff(tmp_path / "slide.tif")
    df = detect_image(image.levels, ClassicalDetector(), DetectParams(tile=512, batch=4))
    bare = 0  # tiles with no nucleus within 16 px: the ones a slide user expects skipped
    for tile in tile_grid(shape, 512, df.attrs["overlap"]):
        (ys, xs), m = tile.slices, 16
        bare += not (
            (truth.y1 > ys.start - m)
            & (truth.y0 < ys.stop + m)
            & (truth.x1 > xs.start - m)
            & (truth.x0 < xs.stop + m)
        ).any()
    assert bare >= 5 and df.attrs["skipped_tiles"] >= 0.75 * bare
    assert abs(len(df) - len(truth)) <= 0.01 * len(truth)


def test_threshold_from_the_histogram_is_the_pixelwise_one(monkeypatch):
    # 8/16-bit overviews take a histogram path; without it, the pixel-wise partition: same level
    overviews = []
    for seed in range(4):
        image = make_nuclei_image(shape=(600, 800), n_nuclei=30 + 40 * seed, seed=seed).image
        overviews.append((image / image.max() * 255).astype(np.uint8))
    levels = [empty_threshold(o) for o in overviews]
    monkeypatch.setattr(detect, "level_counts", lambda values: None)
    assert None not in levels
    assert levels == [empty_threshold(o) for o in overviews]
