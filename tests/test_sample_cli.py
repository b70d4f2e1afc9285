"""The README's first command: `yolocell detect --sample` counts the bundled sample."""

from napari_yolocell.cli import main
from napari_yolocell.data.samples import sample_image_path, sample_truth
from napari_yolocell.models.registry import resolve_model


def test_default_model_is_bundled_and_hash_checked():
    spec = resolve_model("default")
    assert spec.path.exists() and spec.sha256 and spec.family in ("yolov5", "yolov6")


def test_detect_sample_counts_close_to_truth(capsys):
    assert main(["detect", "--sample", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    path, count = lines[0].split("\t")
    assert path == str(sample_image_path())
    assert lines[-1] == f"total\t{count}"
    truth = sample_truth()["true_count"]
    assert abs(int(count) - truth) <= 0.05 * truth  # the README's promise
