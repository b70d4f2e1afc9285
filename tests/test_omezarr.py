"""OME-Zarr (NGFF 0.4 / 0.5) images: lazy opening, folder expansion, same counts as TIFF."""

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from napari_yolocell.cli import main
from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.detect import DetectParams, detect_image
from napari_yolocell.io.images import expand_inputs, open_image

ome_writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")

FORMATS = {"0.4": ome_format.FormatV04, "0.5": ome_format.FormatV05}


def write_ome_zarr(path, image, axes, version="0.4", scale_factors=(2,), **kwargs):
    fmt = FORMATS[version]()
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    ome_writer.write_image(
        image, group, axes=axes, fmt=fmt, scale_factors=list(scale_factors), **kwargs
    )
    return path


def _count(args, capsys) -> list[str]:
    assert main(["detect", *args, "--model", "classical", "--tile", "256", "--quiet"]) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_omezarr_counts_match_tiff(tmp_path, capsys, version):
    syn = make_nuclei_image((700, 650), n_nuclei=120, seed=4)
    tif = tmp_path / "img.tif"
    tifffile.imwrite(tif, syn.image)
    zpath = write_ome_zarr(tmp_path / "img.ome.zarr", syn.image, "yx", version)
    opened = open_image(zpath)
    assert opened.axes == "YX" and opened.channel_axis is None
    assert [lvl.shape for lvl in opened.levels] == [(700, 650), (350, 325)]
    np.testing.assert_array_equal(
        np.asarray(opened.levels[0][100:140, 200:260]), syn.image[100:140, 200:260]
    )
    lines = _count([str(tif), str(zpath)], capsys)
    n_tif, n_zarr = (int(line.split("\t")[1]) for line in lines[:2])
    print(f"NGFF {version}: TIFF {n_tif}, OME-Zarr {n_zarr}, truth {syn.count}")
    assert abs(n_zarr - n_tif) <= 0.01 * n_tif
    assert abs(n_tif - syn.count) <= 0.05 * syn.count


def test_two_channel_omezarr_and_tiff_agree(tmp_path, capsys):
    from test_measure import two_channel_image

    image, boxes, _ = two_channel_image((500, 520), n=80, seed=7)
    tif = tmp_path / "two.tif"
    tifffile.imwrite(tif, image, metadata={"axes": "CYX"})
    zpath = write_ome_zarr(
        tmp_path / "two.zarr",
        image,
        "cyx",
        "0.5",
        coordinate_transformations=[
            [{"type": "scale", "scale": [1, 0.5, 0.5]}],
            [{"type": "scale", "scale": [1, 1.0, 1.0]}],
        ],
        axes_units=None,
    )
    opened = open_image(zpath)
    assert opened.axes == "CYX" and opened.channel_axis == 0
    out = tmp_path / "d.csv"
    lines = _count([str(tif), str(zpath), "--channel", "0", "--measure", "--out", str(out)], capsys)
    n_tif, n_zarr = (int(line.split("\t")[1]) for line in lines[:2])
    print(f"2-channel: TIFF {n_tif}, OME-Zarr {n_zarr}, truth {len(boxes)}")
    assert n_tif == n_zarr
    det = pd.read_csv(out)
    a, b = (det[det["image"] == str(p)].reset_index(drop=True) for p in (tif, zpath))
    np.testing.assert_allclose(a["mean_c1"], b["mean_c1"])


def test_pixel_size_and_stack_from_ngff_metadata(tmp_path):
    # hand-written NGFF 0.4 (zarr v2): czyx with micrometre units, size-1 channel squeezed
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=2)
    data = np.random.default_rng(0).integers(0, 500, (1, 3, 64, 80), dtype=np.uint16)
    root.create_array("0", data=data, chunks=(1, 1, 32, 32))
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "z", "type": "space", "unit": "micrometer"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "nanometer"},
            ],
            "datasets": [
                {
                    "path": "0",
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 0.5, 250]}],
                }
            ],
        }
    ]
    opened = open_image(tmp_path / "s.zarr")
    assert opened.axes == "ZYX" and opened.channel_axis is None and opened.data.shape == (3, 64, 80)
    assert opened.pixel_size_um == (0.5, 0.25)
    np.testing.assert_array_equal(np.asarray(opened.data), data[0])
    df = detect_image(opened.levels, "classical", DetectParams(tile=128))
    assert df.attrs["n_planes"] == 3


def test_bad_zarr_inputs_name_the_path(tmp_path, capsys):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match="empty.zarr: not a zarr group"):
        open_image(tmp_path / "empty.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(ValueError, match="plain.zarr: not an OME-Zarr image"):
        open_image(tmp_path / "plain.zarr")
    g = zarr.open_group(str(tmp_path / "nolevel.zarr"), mode="w", zarr_format=2)
    g.attrs["multiscales"] = [{"version": "0.4", "axes": ["y", "x"], "datasets": [{"path": "0"}]}]
    with pytest.raises(ValueError, match="nolevel.zarr: resolution level '0' is missing"):
        open_image(tmp_path / "nolevel.zarr")
    g.attrs["multiscales"] = [{"version": "0.4", "axes": ["y", "x"], "datasets": []}]
    with pytest.raises(ValueError, match="no datasets"):
        open_image(tmp_path / "nolevel.zarr")
    # the CLI: one line naming the image, non-zero exit
    assert main(["detect", str(tmp_path / "plain.zarr"), "--model", "classical", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "plain.zarr" in err[0]


def test_folders_and_globs_take_a_zarr_as_one_image(tmp_path):
    syn = make_nuclei_image((128, 128), n_nuclei=5, seed=1)
    tifffile.imwrite(tmp_path / "a.tif", syn.image)
    write_ome_zarr(tmp_path / "b.ome.zarr", syn.image, "yx", "0.4")
    write_ome_zarr(tmp_path / "sub" / "c.zarr", syn.image, "yx", "0.5")
    found = expand_inputs([str(tmp_path)])
    assert found == [str(tmp_path / n) for n in ("a.tif", "b.ome.zarr", "sub/c.zarr")]
    assert expand_inputs([str(tmp_path / "**")]) == found[:2] + [str(tmp_path / "sub/c.zarr")]
    assert expand_inputs([str(tmp_path / "*.zarr")]) == [str(tmp_path / "b.ome.zarr")]
    assert (
        json.loads((tmp_path / "sub" / "c.zarr" / "zarr.json").read_text())["node_type"] == "group"
    )
