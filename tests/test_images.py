import numpy as np
import pytest
from PIL import Image

from napari_yolocell.io.images import expand_inputs, open_image


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
