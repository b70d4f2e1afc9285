"""Issue 22: no silently wrong number from ambiguous stacks or pyramid levels (core and CLI).

A plain 2-plane TIFF (tifffile: ``QYX``) may be stain + marker or two planes: refused with the
ImageJ ``CYX`` line unless ``--channel`` or ``--planes`` says which. On a pyramid level,
``--diameter`` counts full-resolution pixels unless ``--diameter-pixels level``; both readings
give the same tiles, and the wrong reading is refused rather than counted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import write_two_level_pyramid

from napari_yolocell.cli import main
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import (
    DetectParams,
    channel_refusal,
    detect_image,
    full_resolution_diameter,
    image_channel_axis,
    unlabelled_axis,
)
from napari_yolocell.io.images import open_image
from napari_yolocell.models.classical import ClassicalDetector


@pytest.fixture(scope="module")
def stain_marker():
    """Nuclear stain (12 nuclei) and a marker plane with 5 other blobs."""
    stain = make_nuclei_image((256, 256), n_nuclei=12, seed=3)
    marker = make_nuclei_image((256, 256), n_nuclei=5, seed=4)
    return stain, np.stack([stain.image, marker.image])


@pytest.fixture(scope="module")
def files(tmp_path_factory, stain_marker):
    folder = tmp_path_factory.mktemp("ambiguous")
    _, data = stain_marker
    plain, imagej = folder / "plain.tif", folder / "imagej.tif"
    tifffile.imwrite(plain, data)  # tifffile's own shaped file: axes QYX
    tifffile.imwrite(imagej, data, imagej=True, metadata={"axes": "CYX"})
    return plain, imagej


def test_unlabelled_axis_rules():
    assert unlabelled_axis((2, 64, 64), "QYX") == 0
    assert unlabelled_axis((4, 64, 64), "IYX") == 0
    assert unlabelled_axis((5, 64, 64), "QYX") is None  # 5+ planes: a stack, not stains
    assert unlabelled_axis((2, 64, 64), "ZYX") is None  # labelled
    assert unlabelled_axis((2, 64, 64), "CYX", channel_axis=0) is None
    assert unlabelled_axis((2, 64, 64), None) is None  # the caller states nothing
    assert unlabelled_axis((64, 64, 3), "YXS") is None


def test_plain_two_plane_tiff_is_refused_with_the_imagej_line(files):
    plain, imagej = files
    opened, labelled = open_image(plain), open_image(imagej)
    assert opened.axes == "QYX" and labelled.axes == "CYX"
    with pytest.raises(ValueError) as plain_err:
        detect_image(opened.data, ClassicalDetector(), DetectParams(tile=256), axes=opened.axes)
    with pytest.raises(ValueError) as cyx_err:
        detect_image(
            labelled.data,
            ClassicalDetector(),
            DetectParams(tile=256),
            channel_axis=0,
            axes=labelled.axes,
        )
    # the same line, the plain file adding how to say "planes"
    assert str(cyx_err.value) == channel_refusal(2, 0)
    assert str(plain_err.value).startswith(str(cyx_err.value))
    assert "--planes" in str(plain_err.value)


def test_channel_or_planes_resolve_the_axis(files, stain_marker):
    stain, _ = stain_marker
    opened = open_image(files[0])
    det = ClassicalDetector()
    df = detect_image(opened.data, det, DetectParams(tile=256, channel=0), axes=opened.axes)
    assert len(df) == stain.count == 12 and df.attrs["n_planes"] == 1
    assert df.attrs["channel_axis"] == 0
    both = detect_image(opened.data, det, DetectParams(tile=256, planes=True), axes=opened.axes)
    assert both.attrs["n_planes"] == 2 and both["plane"].value_counts()[0] == 12
    with pytest.raises(ValueError, match="at once"):
        image_channel_axis((2, 8, 8), "QYX", None, None, DetectParams(channel=0, planes=True))


def test_channel_on_labelled_planes_is_not_ignored(stain_marker):
    _, data = stain_marker
    with pytest.raises(ValueError, match="no channel axis"):
        detect_image(data, ClassicalDetector(), DetectParams(tile=256, channel=0), axes="ZYX")


def test_cli_agrees(files, capsys):
    plain, imagej = files
    lines = {}
    for path in (plain, imagej):
        rc = main(["detect", str(path), "--model", "classical", "--tile", "256", "--quiet"])
        assert rc == 1
        lines[path] = capsys.readouterr().err
    assert channel_refusal(2, 0) in lines[imagej]
    assert channel_refusal(2, 0, unlabelled=True) in lines[plain]
    for path in (plain, imagej):
        assert main(["detect", str(path), "--model", "classical", "--channel", "0"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "total\t12"
    assert main(["detect", str(plain), "--model", "classical", "--planes", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "total\t17"


# ------------------------------------------------------------------ pyramid levels


def test_diameter_pixels_readings_agree():
    params = DetectParams(diameter=10.0, diameter_pixels="level")
    full = full_resolution_diameter(params, 2.0)
    assert full.diameter == 20.0 and full.diameter_pixels == "full"
    assert full_resolution_diameter(DetectParams(diameter=20.0), 2.0).diameter == 20.0
    with pytest.raises(ValueError, match="diameter_pixels"):
        full_resolution_diameter(DetectParams(diameter_pixels="um"), 2.0)


@pytest.fixture(scope="module")
def pyramid():
    """~20 px nuclei at level 0, ~10 px at level 1 (2x)."""
    syn = make_nuclei_image((1024, 1024), n_nuclei=60, diameter=(18.0, 22.0), seed=7)
    full = syn.image
    half = full.reshape(512, 2, 512, 2).mean(axis=(1, 3)).astype(full.dtype)
    return syn, [full, half]


def test_level_diameter_both_readings_same_tiles(pyramid):
    _, levels = pyramid
    det = ClassicalDetector()
    full = detect_image(levels, det, DetectParams(tile=256, level=1, diameter=20.0))
    level = detect_image(
        levels, det, DetectParams(tile=256, level=1, diameter=10.0, diameter_pixels="level")
    )
    assert full.attrs["scale"] == level.attrs["scale"] == pytest.approx(det.spec.diameter_px / 10.0)
    assert full.attrs["diameter"] == level.attrs["diameter"] == 20.0
    assert len(full) == len(level)


def test_level_diameter_in_the_wrong_pixels_is_refused(pyramid):
    _, levels = pyramid
    with pytest.raises(ValueError, match="full-resolution .*--diameter-pixels level"):
        detect_image(levels, ClassicalDetector(), DetectParams(tile=256, level=1, diameter=10.0))


def test_levels_agree_with_a_real_model_fp32():
    """160 nuclei of ~20 px: level 0 and level 1 (both diameter readings) count the same.

    PyTorch FP32 (INT8's error on small nuclei is issue 23's); ~1 min on 2 CPU cores.
    """
    pytest.importorskip("torch")
    from napari_yolocell.models.loading import load_detector

    syn = make_nuclei_image((1024, 1024), n_nuclei=160, diameter=(18.0, 22.0), seed=7)
    half = syn.image.reshape(512, 2, 512, 2).mean(axis=(1, 3)).astype(syn.image.dtype)
    levels = [syn.image, half]
    det = load_detector("nucleus-v5n", backend="torch")
    runs = {
        "level 0": DetectParams(),
        "level 1, full px": DetectParams(level=1, diameter=20.0),
        "level 1, level px": DetectParams(level=1, diameter=10.0, diameter_pixels="level"),
    }
    counts = {name: len(detect_image(levels, det, p)) for name, p in runs.items()}
    for name, count in counts.items():
        assert abs(count - syn.count) <= 0.01 * syn.count, (name, counts)


@pytest.mark.parametrize("model", ["default", "v6"])
def test_cli_level_1_of_a_pyramid_with_the_default_runtime(tmp_path, capsys, model):
    """Issue 22's leftover, re-checked after issue 23's INT8 fix: a 2-level pyramidal BigTIFF
    of 160 nuclei (~20 px at level 0); ``yolocell detect --level 1`` with the default runtime
    (INT8 OpenVINO on a CPU) counts 160 with either bundled model: the ~10 px nuclei of level
    1 are no longer split into pairs of boxes by the quantized box decoding."""
    pytest.importorskip("openvino")
    syn = make_nuclei_image((1024, 1024), n_nuclei=160, diameter=(18.0, 22.0), seed=7)
    path = tmp_path / "pyramid.tif"
    write_two_level_pyramid(path, syn.image)
    assert main(["detect", str(path), "--level", "1", "--model", model, "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"total\t{syn.count}"


# ------------------------------------------------------------------ marker images


def test_marker_must_be_one_plane_of_the_detection_size():
    from napari_yolocell.analysis.measure import check_marker_plane

    check_marker_plane((256, 256), (256, 256))
    with pytest.raises(ValueError, match="one 2-D plane of 256 x 256"):
        check_marker_plane((2, 256, 256), (256, 256), "stack")
    with pytest.raises(ValueError, match="not 256 x 256"):
        check_marker_plane((128, 128), (256, 256))
    with pytest.raises(ValueError, match="3 planes"):
        check_marker_plane((256, 256), (256, 256), n_planes=3)


def test_cli_marker_channel_of_a_plain_two_plane_file(tmp_path, capsys):
    """--channel 0 on a QYX file: the marker in plane 1 is measured, not the stain again."""
    stain = make_nuclei_image((256, 256), n_nuclei=12, seed=3)
    yy, xx = np.mgrid[:256, :256]
    marker = np.full((256, 256), 5, np.uint16)
    positive = np.arange(stain.count) % 3 == 0
    for (cy, cx), pos in zip(stain.centers, positive, strict=True):
        marker[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = 1000 if pos else 12
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.stack([stain.image, marker]))
    counts = tmp_path / "c.csv"
    args = ["detect", str(path), "--model", "classical", "--quiet", "--counts", str(counts)]
    assert main([*args, "--channel", "0", "--marker-channel", "1"]) == 0
    table = pd.read_csv(tmp_path / "c.marker_counts.csv")
    whole = table[table["roi"] == "all"].set_index("class")["count"]
    assert whole["positive"] == positive.sum() and whole["negative"] == (~positive).sum()
