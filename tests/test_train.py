"""Offline training: a 1-epoch run, cancel + resume, sidecar, data.yaml resolution.

The dataset is 8 tiny synthetic images (6 train, 2 val) at imgsz 64 so a run takes seconds
on a CPU; nothing here checks that the model learns, only that the plumbing works.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

# Shared fixture folder (tests/conftest.py: YOLOCELL_FIXTURES overrides it).
from conftest import FIXTURES_DIR as FIXTURES  # noqa: E402
from PIL import Image

from napari_yolocell.training.train import (
    ARCHITECTURES,
    MICROSCOPY_AUGMENT,
    _model_source,
    augmentation_settings,
    prepare_data_yaml,
    train,
)

ROBOFLOW = FIXTURES / "roboflow_yolo_export"
SIZE = 64


def _write_split(root: Path, split: str, n: int, rng: np.random.Generator) -> None:
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        image = rng.normal(20, 4, (SIZE, SIZE))
        lines = []
        for _ in range(4):
            cy, cx = rng.uniform(8, SIZE - 8, 2)
            image += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
            lines.append(f"0 {cx / SIZE:.5f} {cy / SIZE:.5f} {12 / SIZE:.5f} {12 / SIZE:.5f}")
        img = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / split / f"{split}{i}.png")
        (root / "labels" / split / f"{split}{i}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nuclei_ds")
    rng = np.random.default_rng(0)
    _write_split(root, "train", 6, rng)
    _write_split(root, "val", 2, rng)
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: nucleus\n"
    )
    return root


@pytest.fixture(scope="module")
def one_epoch(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    epochs: list[dict] = []
    batches: list[dict] = []
    result = train(
        dataset,
        "yolov5n",
        epochs=1,
        imgsz=SIZE,
        batch=4,
        out=out,
        device="cpu",
        on_epoch=epochs.append,
        on_batch=batches.append,
    )
    return result, epochs, batches


def test_one_epoch_produces_loadable_best(one_epoch):
    result, _, _ = one_epoch
    assert not result.cancelled
    assert result.best is not None and result.best.is_file() and result.last.is_file()
    assert result.run_dir.name == "yolov5n"
    assert set(result.metrics) >= {"precision", "recall", "mAP50", "mAP50-95"}

    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    model = YOLO(str(result.best))
    assert model.task == "detect" and model.names == {0: "nucleus"}


def test_sidecar_and_load_detector(one_epoch):
    result, _, _ = one_epoch
    side = result.best.with_name("best.yolocell.json")
    data = json.loads(side.read_text())
    assert data["family"] == "yolov5" and data["normalize"] == "percentile"
    assert data["percentiles"] == [1.0, 99.8] and data["imgsz"] == SIZE
    assert data["diameter_px"] == pytest.approx(12.0, abs=0.01)  # all boxes are 12 px
    assert result.last.with_name("last.yolocell.json").is_file()

    from napari_yolocell.models.loading import load_detector

    detector = load_detector(result.best, device="cpu", backend="torch")
    assert detector.spec.family == "yolov5" and detector.spec.diameter_px == pytest.approx(12.0)


def test_progress_callbacks(one_epoch):
    result, epochs, batches = one_epoch
    assert [e["final"] for e in epochs] == [False, True]  # epoch 1, then best.pt validation
    assert epochs[0]["epoch"] == 1 and epochs[0]["epochs"] == 1
    assert {"box_loss", "cls_loss", "mAP50", "mAP50-95", "precision", "recall"} <= set(epochs[0])
    assert [b["batch"] for b in batches] == [1, 2] and batches[0]["batches"] == 2
    assert result.history == epochs[:1]


def test_cancel_keeps_resumable_last_then_resume(dataset, tmp_path):
    import torch

    result = train(
        dataset,
        "yolov5n",
        epochs=2,
        imgsz=SIZE,
        batch=4,
        out=tmp_path,
        name="run",
        device="cpu",
        should_stop=lambda: True,
    )
    assert result.cancelled and result.best is None and result.last.is_file()
    ckpt = torch.load(result.last, map_location="cpu", weights_only=False)
    assert ckpt["optimizer"] is not None and ckpt["epoch"] == 0  # resumable
    assert result.last.with_name("last.yolocell.json").is_file()

    epochs: list[dict] = []
    resumed = train(
        dataset, out=tmp_path, name="run", resume=True, device="cpu", on_epoch=epochs.append
    )
    assert not resumed.cancelled and resumed.run_dir == result.run_dir
    assert [e["epoch"] for e in epochs if not e["final"]] == [2]
    assert resumed.best is not None and resumed.best.is_file()


def test_model_names_and_errors(tmp_path):
    assert len(ARCHITECTURES) == 10
    assert _model_source("yolov6s") == ("yolov6s.yaml", "yolov6", False)
    assert _model_source("YOLOv5x.yaml") == ("yolov5x.yaml", "yolov5", False)
    with pytest.raises(ValueError, match="unknown model"):
        _model_source("yolov99n")
    with pytest.raises(FileNotFoundError):  # never falls back to a download
        _model_source(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tmp_path, out=tmp_path, name="none", resume=True)


def test_yolov6_builds_offline():
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    model = YOLO("yolov6n.yaml", task="detect")
    assert model.task == "detect" and sum(p.numel() for p in model.model.parameters()) > 1e6


def test_augmentation_presets():
    micro = augmentation_settings("microscopy")
    assert micro["flipud"] == 0.5 and micro["hsv_s"] == 0 and micro["hsv_h"] == 0
    assert augmentation_settings("default") == {}
    assert set(augmentation_settings("none").values()) == {0.0}
    assert augmentation_settings({"scale": 0.2})["scale"] == 0.2
    assert MICROSCOPY_AUGMENT["mosaic"] == 1.0
    with pytest.raises(ValueError):
        augmentation_settings("fancy")


@pytest.mark.usefixtures("fixtures_dir")
def test_prepare_data_yaml_relocates_roboflow_paths(tmp_path):
    path, config = prepare_data_yaml(ROBOFLOW, tmp_path)
    written = yaml.safe_load(path.read_text())
    assert written == config
    assert Path(config["train"]) == (ROBOFLOW / "train" / "images").resolve()
    assert Path(config["test"]) == (ROBOFLOW / "test" / "images").resolve()
    assert config["nc"] == 9 and config["names"][2] == "lymphocyte"


def test_amp_self_test_never_downloads():
    from napari_yolocell.models.ultralytics_env import import_ultralytics
    from napari_yolocell.training.train import _patch_amp_check

    import_ultralytics()
    from ultralytics import YOLO
    from ultralytics.engine import trainer as trainer_mod

    _patch_amp_check()
    assert trainer_mod.check_amp._yolocell_offline
    assert trainer_mod.check_amp(YOLO("yolov5n.yaml").model) is False  # CPU: no AMP, no test
