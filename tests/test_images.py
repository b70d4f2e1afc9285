import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.io.images import expand_inputs, glob_images, open_image


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "I;16"])
def test_grey_pngs_open_as_2d(tmp_path, mode):
    grey = (np.arange(64 * 48).reshape(48, 64) % 251).astype(np.uint8)
    if mode == "I;16":
        im = Image.fromarray(grey.astype(np.uint16) * 200)
    else:
        im = Image.fromarray(grey).convert(mode)
    path = tmp_path / "img.png"
    im.save(path)
    opened = open_image(path)
    assert opened.data.shape == (48, 64) and not opened.rgb


def test_colour_jpeg_stays_rgb(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 2] = 200  # blue nuclear stain
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    opened = open_image(tmp_path / "c.jpg")
    assert opened.rgb and opened.data.shape == (32, 32, 3)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="x.png"):
        open_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="unsupported"):
        open_image(_touch(tmp_path / "a.xyz"))
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.tif")
    with pytest.raises(FileNotFoundError, match="pattern"):
        expand_inputs([str(tmp_path / "*.tif")])


def _touch(path):
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """A plate folder with a subfolder, a corrupt TIFF, a note and a previous run's CSV."""
    root = tmp_path_factory.mktemp("plate [day 1]")  # brackets are not a pattern
    (root / "sub").mkdir()
    for seed, name in enumerate(("a.tif", "b.tif", "sub/c.tif")):
        tifffile.imwrite(root / name, make_nuclei_image((64, 80), n_nuclei=3, seed=seed).image)
    (root / "bad.tif").write_bytes(b"II*\x00not a tiff")
    (root / "notes.txt").write_text("not an image")
    (root / "counts.csv").write_text("image,plane,roi,count\n")
    return root


def test_glob_images_pattern_and_errors(plate):
    names = [p.relative_to(plate).as_posix() for p in glob_images(plate, "**/*.tif")]
    assert names == ["a.tif", "b.tif", "bad.tif", "sub/c.tif"]
    assert [p.name for p in glob_images(plate, "*.tif")] == ["a.tif", "b.tif", "bad.tif"]
    assert glob_images(plate, "*") == glob_images(plate, "*.tif")  # notes and CSVs skipped
    assert glob_images(plate, "  ") == glob_images(plate)  # blank: the default *.tif
    with pytest.raises(FileNotFoundError, match="no image file"):
        glob_images(plate, "*.png")
    with pytest.raises(ValueError, match="input folder"):
        glob_images("")
    with pytest.raises(ValueError, match="not a folder"):
        glob_images(plate / "a.tif")
