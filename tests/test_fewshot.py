"""Few-shot fine-tuning: whole images at the model's scale, bundled names, the CLI contract."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_yolocell.io.yolo import read_yolo_dataset
from napari_yolocell.training import fewshot
from napari_yolocell.training.fewshot import (
    is_bundled,
    prepare_fewshot_dataset,
    resolve_base_weights,
)


def _whole_image_dataset(root: Path, size=(300, 420), diameter=24.0, n=2) -> Path:
    """``n`` whole images with round nuclei of ``diameter`` px, in train and again in val."""
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    r = diameter / 2
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.normal(20, 3, size)
        lines = []
        for cy in np.arange(r + 4, h - r - 4, 2.2 * r):
            for cx in np.arange(r + 4, w - r - 4, 2.2 * r):
                img += 180 * (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r)
                lines.append(f"0 {cx / w:.5f} {cy / h:.5f} {2 * r / w:.5f} {2 * r / h:.5f}")
        png = np.clip(img, 0, 255).astype(np.uint8)
        for split in ("train", "val"):
            Image.fromarray(png).save(root / "images" / split / f"img{i}.png")
            (root / "labels" / split / f"img{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnc: 1\nnames: ['nucleus']\n"
    )
    return root


def _leave_out_every(data: Path, k: int) -> None:
    """A lab that leaves every ``k``-th nucleus out of its labels."""
    for label in sorted(data.glob("labels/*/*.txt")):
        lines = label.read_text().splitlines()
        label.write_text("\n".join(ln for i, ln in enumerate(lines) if i % k) + "\n")


def test_large_nuclei_are_rescaled_to_the_model_scale(tmp_path):
    data = _whole_image_dataset(tmp_path / "big", size=(600, 800), diameter=92.0)
    info = prepare_fewshot_dataset(data, tmp_path / "prep", model_diameter=23.0)
    assert info["scale"] == pytest.approx(23.0 / info["diameter"])
    assert info["tile"] <= 640 and info["tile"] % 32 == 0
    ds = read_yolo_dataset(info["path"], splits=("train", "val"), warn=False)
    boxes = np.concatenate([s.boxes for s in ds if s.split == "train"])
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    assert np.median(side) == pytest.approx(23.0, rel=0.15)
    assert {s.split for s in ds} == {"train", "val"}


def test_nuclei_in_range_keep_their_size_and_small_images_small_tiles(tmp_path):
    data = _whole_image_dataset(tmp_path / "small", size=(200, 260), diameter=24.0)
    info = prepare_fewshot_dataset(data, tmp_path / "prep", model_diameter=23.0)
    assert info["scale"] == 1.0
    assert info["tile"] == 288  # 260 rounded up to 32, never upscaled to 640
    assert info["n_train"] == 2 and info["n_held_out"] == 0  # val repeats train


def test_bundled_names_resolve_to_pt_weights():
    assert is_bundled("default") and is_bundled("v6") and is_bundled("nucleus-v5n")
    assert not is_bundled("yolov5n") and not is_bundled("weights/best.pt")
    for name in ("default", "v6"):
        path, spec = resolve_base_weights(name)
        assert path.suffix == ".pt" and path.is_file()  # v6 is xz-packed: unpacked
        assert spec.diameter_px > 0
    with pytest.raises(ValueError):
        resolve_base_weights("classical")


def test_cli_finetunes_default_and_prints_weights_last(tmp_path, capsys):
    from napari_yolocell.cli import main

    data = _whole_image_dataset(tmp_path / "data", size=(160, 192), diameter=20.0, n=2)
    _leave_out_every(data, 12)  # the start over-counts this lab by ~10 %: fine-tuned, halfway
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--model",
            "default",
            "--minutes",
            "2",
            "--epochs",
            "1",
            "--holdout",
            "1",
            "--out",
            str(tmp_path / "runs"),
            "--quiet",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    key, _, path = lines[-1].partition("\t")
    assert key == "weights" and path.endswith("best.pt") and Path(path).is_file()
    keys = [ln.split("\t")[0] for ln in lines[-7:]]
    assert keys == ["blend", "start", "fine-tuned", "verdict", "best", "last", "weights"]
    assert lines[-7].startswith("blend\t0.5\thalfway to the start model: the start model counts")
    verdict = lines[-4]
    assert "1 held-out image(s)" in verdict and "confidence Detect uses (0.20 / 0.20)" in verdict
    assert ("NOT better" in verdict) != ("beats default" in verdict)
    import json

    side = json.loads(Path(path).with_name("best.yolocell.json").read_text())
    assert side["family"] == "yolov5" and side["default_conf"] == pytest.approx(0.2)
    assert side["lab_diameter_px"] == pytest.approx(side["diameter_px"])  # not rescaled
    # the delivered weights are halfway to the start's, and fewshot.json says so
    info = json.loads((Path(path).parent.parent / "fewshot.json").read_text())
    assert info["blend"] == 0.5 and abs(info["start_count_bias"]) <= fewshot.CONVENTION_BIAS
    assert info["blended_sha256"] == hashlib.sha1(Path(path).read_bytes()).hexdigest()


def test_a_lab_that_counts_differently_gets_the_fine_tune_whole(tmp_path):
    data = _whole_image_dataset(tmp_path / "lab", size=(200, 260), diameter=24.0, n=1)
    train = fewshot.held_out_split(data)[0]
    right = fewshot.start_score("default", train)
    assert right.count_bias == pytest.approx(0.0, abs=0.05) and right.f1 > 0.95
    n = right.n_true
    assert n == len(train[0].boxes)
    # the lab leaves every other nucleus out of its count (micronuclei, say)
    label = data / "labels" / "train" / "img0.txt"
    lines = label.read_text().splitlines()
    label.write_text("\n".join(lines[::2]) + "\n")
    score = fewshot.start_score("default", fewshot.held_out_split(data)[0])
    assert score.count_bias == pytest.approx(len(lines) / len(lines[::2]) - 1, abs=0.1)
    assert score.f1 == pytest.approx(2 / 3, abs=0.05)  # half its detections are not the lab's
    blend, reason = fewshot.choose_blend(score)
    assert blend == 1.0 and "fine-tune whole" in reason
    assert f"{100 * score.count_bias:+.0f} %" in reason
    assert fewshot.choose_blend(fewshot.StartScore(-0.2, 0.9, n))[0] == 1.0  # under-counting
    assert fewshot.choose_blend(None)[0] == fewshot.WEIGHT_BLEND


@pytest.mark.parametrize(
    ("bias", "f1", "keep", "blend"),
    [
        (0.02, 0.95, True, 0.0),  # at the target: the start kept
        (-0.05, 0.93, True, 0.0),  # at the target's edges
        (0.02, 0.92, True, 0.5),  # F1 under the target
        (0.08, 0.95, True, 0.5),  # miscounts by more than the target allows
        (0.02, 0.95, False, 0.5),  # asked to fine-tune anyway
        (0.20, 0.95, False, 1.0),  # another convention: whole, asked or not
    ],
)
def test_the_blend_follows_how_the_start_counts_the_labs_images(bias, f1, keep, blend):
    chosen, reason = fewshot.choose_blend(fewshot.StartScore(bias, f1, 120), keep)
    assert chosen == blend
    assert ("nothing was trained" in reason) is (blend == 0.0)
    assert f"{100 * bias:+.0f} %" in reason


def test_a_copy_of_the_bundled_weights_adopts_their_released_int8_model(tmp_path):
    import dataclasses
    import shutil

    from napari_yolocell.models import int8_cache

    start, spec = fewshot.resolve_base_weights("default")
    copy = tmp_path / "best.pt"
    shutil.copyfile(start, copy)
    kept = dataclasses.replace(spec, path=copy, sha256=None, unpacked_sha256=None, int8=None)
    entry = int8_cache.adopt(spec, kept, root=tmp_path / "cache")
    assert entry.used and entry == int8_cache.lookup(kept, root=tmp_path / "cache")
    for name in spec.int8["sha256"]:
        assert (entry.folder / name).read_bytes() == (Path(spec.int8["dir"]) / name).read_bytes()
    # other weights (a fine-tune), or a start without a released INT8 model: nothing adopted
    other = tmp_path / "tuned.pt"
    data = copy.read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    tuned = dataclasses.replace(kept, path=other)
    assert int8_cache.adopt(spec, tuned, root=tmp_path / "cache") is None
    assert int8_cache.adopt(dataclasses.replace(spec, int8=None), kept, root=tmp_path / "c") is None


def test_a_lab_counted_right_gets_the_start_model_back_untrained(tmp_path, capsys, monkeypatch):
    import json

    from napari_yolocell.cli import main
    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models import int8_cache
    from napari_yolocell.models.loading import load_detector
    from napari_yolocell.models.spec import sidecar_path

    # the bundled start's own INT8 version is reused: nothing is quantized
    quantized = []
    monkeypatch.setattr(
        "napari_yolocell.training.quantize.quantize_after_finetune",
        lambda weights, dataset, progress=None, cancel=None: quantized.append(weights),
    )
    data = _whole_image_dataset(tmp_path / "lab", size=(200, 260), diameter=24.0, n=2)
    out = tmp_path / "runs"
    args = ["train", "--data", str(data), "--model", "default", "--minutes", "5"]
    assert main([*args, "--holdout", "1", "--out", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    keys = [ln.split("\t")[0] for ln in lines]
    assert keys[-4:] == ["blend", "best", "last", "weights"] and "verdict" not in keys
    assert lines[-4].startswith("blend\t0\tthe start model, kept as it is: the start model")
    assert lines[-4].endswith("so nothing was trained (--blend 0.5 fine-tunes anyway)")
    best = Path(lines[-1].split("\t")[1])
    start, spec = fewshot.resolve_base_weights("default")
    assert best.read_bytes() == start.read_bytes() and quantized == []
    assert not (best.parent.parent / "results.csv").exists()  # nothing trained
    side = json.loads(sidecar_path(best).read_text())
    assert side["default_conf"] == spec.default_conf and side["diameter_px"] == spec.diameter_px
    assert side["lab_diameter_px"] is None and side["int8"] is None
    info = fewshot.fewshot_info(best.parent.parent)
    assert info["kept_start"] and info["blend"] == 0.0 and info["start_f1"] >= 0.93
    assert fewshot.start_kept(best.parent.parent)
    # it counts as the start does, on the runtime Detect picks (the start's INT8 on a CPU
    # that gains from it) and in PyTorch
    image = np.asarray(Image.open(data / "images" / "train" / "img0.png"))
    for backend in ("auto", "torch"):
        found = [
            detect_image(image, load_detector(m, backend=backend), DetectParams())
            for m in ("default", best)
        ]
        assert len(found[0]) > 0
        np.testing.assert_allclose(found[0]["confidence"], found[1]["confidence"], rtol=1e-6)
    if int8_cache.cpu_gains_from_int8():
        assert int8_cache.lookup(load_detector(best, backend="auto").spec).used
    # asked for a fine-tune anyway, the same lab is fine-tuned
    assert main([*args, "--epochs", "1", "--blend", "0.5", "--out", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    tuned = Path(lines[-1].split("\t")[1])
    assert "blend\t0.5\tas asked" in lines and not fewshot.start_kept(tuned.parent.parent)
    assert tuned.parent.parent != best.parent.parent and fewshot.start_kept(best.parent.parent)
    assert tuned.read_bytes() != start.read_bytes()


def _tuned_checkpoint(path: Path, shift: float) -> dict:
    """The bundled v5n with every weight moved by ``shift``, saved as ultralytics does."""
    import torch

    from napari_yolocell.models.loading import network_of
    from napari_yolocell.models.registry import resolve_model

    net = network_of(resolve_model("default")).model
    start = {k: v.detach().clone().float() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(shift)
    torch.save({"model": net.half(), "ema": None, "optimizer": None, "epoch": -1}, path)
    return start


def _faint_nuclei_dataset(root: Path, conf: float) -> Path:
    """One noisy image of bright and faint nuclei, labelled as a lab that counts only the
    nuclei the bundled model finds at ``conf`` or above (the faint ones it finds below are
    what this lab leaves out)."""
    from napari_yolocell.engine.detect import DetectParams, counted, detect_image
    from napari_yolocell.models.loading import load_detector

    rng = np.random.default_rng(0)
    h, w, r = 300, 420, 12
    yy, xx = np.mgrid[:h, :w]
    img = rng.normal(40, 8, (h, w))
    centres = [(y, x) for y in np.arange(16, h - 16, 26.4) for x in np.arange(16, w - 16, 26.4)]
    for k, (cy, cx) in enumerate(centres):
        img += (180 if k % 2 == 0 else 15) * (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r)
    png = np.clip(img, 0, 255).astype(np.uint8)
    df = counted(detect_image(png, load_detector("default"), DetectParams(conf=conf)))
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(png).save(root / "images" / split / "img0.png")
        (root / "labels" / split / "img0.txt").write_text(
            "".join(
                f"0 {(b.x0 + b.x1) / 2 / w:.5f} {(b.y0 + b.y1) / 2 / h:.5f} "
                f"{(b.x1 - b.x0) / w:.5f} {(b.y1 - b.y0) / h:.5f}\n"
                for b in df.itertuples()
            )
        )
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnc: 1\nnames: ['nucleus']\n"
    )
    return root


def test_a_fine_tune_delivered_whole_counts_the_labs_images_at_its_own_confidence(tmp_path):
    import json
    import shutil

    from napari_yolocell.analysis.finetune_check import detect_conf
    from napari_yolocell.models.spec import ModelSpec, write_sidecar
    from napari_yolocell.training.train import TrainResult

    data = _faint_nuclei_dataset(tmp_path / "lab", conf=0.35)
    train = fewshot.held_out_split(data)[0]
    assert fewshot.start_score("default", train).count_bias > 0.05  # over-counts at 0.20
    conf, reason = fewshot.lab_confidence("default", train, 0.2)
    assert conf == 0.35 and reason.startswith("confidence 0.35: there the fine-tuned model")
    assert "% at 0.20)" in reason
    # a model that under-counts at its confidence keeps it: never lowered on three images
    assert fewshot.lab_confidence("default", train, 0.5)[0] == 0.5

    # the delivered model (here the bundled weights as a fine-tune's best.pt) gets it
    run_dir = tmp_path / "runs" / "yolov5_finetune"
    best = run_dir / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    shutil.copy(fewshot.resolve_base_weights("default")[0], best)
    spec = fewshot.resolve_base_weights("default")[1]
    write_sidecar(best, ModelSpec(name="ft", family="yolov5", diameter_px=spec.diameter_px))
    info = {"data": str(data), "holdout": 0, "seed": 0, "default_conf": 0.2, "blend": 0.5}
    result = TrainResult(best=best, last=None, metrics={}, run_dir=run_dir)
    said: list[str] = []
    fewshot._deliver_confidence(result, info, said.append, None)
    assert said == [] and "lab_conf" not in info  # blended: the start's confidence stays
    info["blend"] = 1.0
    fewshot._deliver_confidence(result, info, said.append, None)
    # best.pt runs on another runtime than the bundled INT8 model: scores differ a little
    own, why = fewshot.lab_confidence(best, train, 0.2)
    assert 0.3 <= own <= 0.4 and said == [why] and detect_conf(best) == own
    assert json.loads((run_dir / "fewshot.json").read_text())["lab_conf"] == own


def test_cli_prints_the_confidence_of_a_fine_tune_delivered_whole(tmp_path, capsys):
    import json

    from napari_yolocell.analysis.finetune_check import detect_conf
    from napari_yolocell.cli import main

    data = _faint_nuclei_dataset(tmp_path / "lab", conf=0.35)
    out = tmp_path / "runs"
    args = ["train", "--data", str(data), "--model", "default", "--minutes", "2"]
    rc = main([*args, "--epochs", "1", "--blend", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    keys = [ln.split("\t")[0] for ln in lines]
    assert keys[-6:] == ["blend", "conf", "verdict", "best", "last", "weights"]
    conf = float(lines[-5].split("\t")[1])
    best = Path(lines[-1].split("\t")[1])
    info = json.loads((best.parent.parent / "fewshot.json").read_text())
    assert info["lab_conf"] == conf == detect_conf(best) and conf >= 0.2
    assert lines[-5].split("\t")[2] == info["lab_conf_reason"]


def test_a_lab_counted_right_keeps_the_start_confidence(tmp_path):
    data = _whole_image_dataset(tmp_path / "lab", size=(200, 260), diameter=24.0, n=1)
    conf, reason = fewshot.lab_confidence("default", fewshot.held_out_split(data)[0], 0.2)
    assert conf == 0.2 and reason.startswith("confidence 0.20 kept")


def test_blend_puts_the_weights_halfway_to_the_start_once(tmp_path):
    import json

    from napari_yolocell.models.loading import network_of
    from napari_yolocell.models.spec import ModelSpec
    from napari_yolocell.training.train import TrainResult

    run_dir = tmp_path / "runs" / "yolov5_finetune"
    best = run_dir / "weights" / "best.pt"
    best.parent.mkdir(parents=True)
    start = _tuned_checkpoint(best, shift=0.02)
    prepared = _whole_image_dataset(tmp_path / "prep", size=(120, 140), diameter=20.0, n=1)
    info = {"base": "default", "family": "yolov5", "default_conf": 0.2, "scale": 1.0}
    info.update(tile=160, blend=0.5)
    result = TrainResult(best=best, last=None, metrics={}, run_dir=run_dir)
    fewshot._finish_fewshot(result, info, prepared)
    once = best.read_bytes()
    fewshot._finish_fewshot(result, info, prepared)  # a resume that found no better epoch
    assert best.read_bytes() == once
    assert json.loads((run_dir / "fewshot.json").read_text())["blend"] == 0.5
    got = network_of(ModelSpec(name="t", family="yolov5", path=best)).model
    weights = [k for k, _ in got.named_parameters()]
    state = got.state_dict()
    for key in weights:
        np.testing.assert_allclose(
            state[key].float().numpy(), start[key].numpy() + 0.01, atol=1e-3, rtol=2e-3, err_msg=key
        )
    with pytest.raises(ValueError, match="blend must be"):
        fewshot.blend_with_start(best, "default", 1.5)
    # a start model that cannot be read: the fine-tune is kept as trained, with one warning
    lost = {**info, "base": str(tmp_path / "gone.pt"), "blended_sha256": None}
    with pytest.warns(RuntimeWarning, match="kept as trained"):
        fewshot._finish_fewshot(result, lost, prepared)
    assert best.read_bytes() == once


def test_held_out_split_ignores_copies_and_keeps_back_k(tmp_path):
    from napari_yolocell.training.fewshot import held_out_split

    data = _whole_image_dataset(tmp_path / "d", size=(120, 140), diameter=20.0, n=3)
    train, held = held_out_split(data)  # val repeats train: nothing is held out
    assert len(train) == 3 and held == []
    train, held = held_out_split(data, holdout=1, seed=4)
    assert len(train) == 2 and len(held) == 1
    assert held_out_split(data, holdout=1, seed=4)[1][0].image_path == held[0].image_path
    with pytest.raises(ValueError, match="leave at least one"):
        held_out_split(data, holdout=3)
    # a real val image (another file) is held out
    extra = tmp_path / "d" / "images" / "val" / "other.png"
    Image.fromarray(np.full((120, 140), 7, np.uint8)).save(extra)
    assert [s.image_path.name for s in held_out_split(data)[1]] == ["other.png"]
    info = prepare_fewshot_dataset(data, tmp_path / "prep", model_diameter=20.0, holdout=1)
    assert info["n_train"] == 2 and info["n_held_out"] == 2


def test_lab_scale_is_remembered_and_used_by_detect(tmp_path):
    import dataclasses
    import json

    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models.classical import ClassicalDetector
    from napari_yolocell.models.registry import resolve_model
    from napari_yolocell.models.spec import ModelSpec, write_sidecar
    from napari_yolocell.training.fewshot import remember_lab_scale

    weights = tmp_path / "best.pt"
    weights.write_bytes(b"x")
    write_sidecar(weights, ModelSpec(name="ft", family="yolov5", diameter_px=23.0))
    remember_lab_scale(weights, 92.0)
    side = json.loads(weights.with_name("best.yolocell.json").read_text())
    assert side["lab_diameter_px"] == 92.0 and side["diameter_px"] == 23.0
    assert resolve_model(weights).lab_diameter_px == 92.0

    det = ClassicalDetector()
    det.spec = dataclasses.replace(det.spec, diameter_px=23.0, lab_diameter_px=92.0)
    image = np.zeros((256, 256), np.uint8)  # nothing to measure: the lab's scale is not measured
    df = detect_image(image, det, DetectParams())
    assert df.attrs["diameter"] == 92.0 and df.attrs.get("measured_diameter") is None
    df = detect_image(image, det, DetectParams(diameter=40.0))  # the user's size wins
    assert df.attrs["diameter"] == 40.0


def test_lab_scale_gives_way_on_an_image_at_another_magnification():
    """A model fine-tuned on ~90 px nuclei, then an image of ~20 px nuclei from the same lab
    (another objective): shrunk by the lab's factor they would be 5 px and lost (Kromp 2020's
    63x group holds one such image: recall 0.95 -> 0.68 after a fine-tune)."""
    import dataclasses

    from napari_yolocell.data.synthetic import make_nuclei_image
    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models.classical import ClassicalDetector

    det = ClassicalDetector()
    det.spec = dataclasses.replace(det.spec, diameter_px=23.0, lab_diameter_px=92.0)
    small = make_nuclei_image((512, 512), n_nuclei=60, diameter=(16.0, 24.0), seed=1).image
    with pytest.warns(UserWarning, match=r"measure ~\d+ px across, far from the ~92 px"):
        df = detect_image(small, det, DetectParams())
    assert 14 < df.attrs["measured_diameter"] < 30
    assert df.attrs["diameter"] is None and df.attrs["scale"] == 1.0  # the model's own scale
    assert df.attrs["lab_scale"] is False
    assert abs(len(df) - 60) <= 6
    # the lab's own magnification keeps the lab's scale, silently
    large = make_nuclei_image((1024, 1024), n_nuclei=40, diameter=(80.0, 100.0), seed=2).image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = detect_image(large, det, DetectParams())
    assert df.attrs["diameter"] == 92.0 and df.attrs["scale"] == pytest.approx(23 / 92)
    assert df.attrs["lab_scale"] is True


def test_resume_keeps_the_time_left_and_the_lab_scale(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    from napari_yolocell.models.spec import ModelSpec, write_sidecar
    from napari_yolocell.training.train import TrainResult

    prepared = _whole_image_dataset(tmp_path / "prep", size=(120, 140), diameter=20.0, n=1)
    run_dir = tmp_path / "runs" / "yolov5_finetune"
    last = run_dir / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    info = {"family": "yolov5", "default_conf": 0.2, "scale": 0.25, "tile": 160}
    info["prepared"] = str(prepared)
    (run_dir / "fewshot.json").write_text(json.dumps(info))
    seen = {}

    def fake_train(data, model, resume, callbacks, **kwargs):
        trainer = SimpleNamespace(args=SimpleNamespace(time=5 / 60))
        callbacks["on_train_start"](trainer)  # ultralytics would restart its whole budget
        seen.update(time=trainer.args.time, model=model, resume=resume)
        write_sidecar(model, ModelSpec(name="x"))
        return TrainResult(best=None, last=model, metrics={}, run_dir=run_dir)

    monkeypatch.setattr(fewshot, "train", fake_train)
    fewshot.resume_finetune(last, minutes_left=1.5)
    assert seen == {"time": pytest.approx(1.5 / 60), "model": last, "resume": True}
    side = json.loads(last.with_name("last.yolocell.json").read_text())
    assert side["family"] == "yolov5" and side["lab_diameter_px"] == pytest.approx(
        side["diameter_px"] / 0.25
    )


@pytest.mark.parametrize(
    ("model", "blend", "message"),
    [
        ("yolov5n", "0.5", "--blend applies to fine-tuning"),
        ("default", "1.5", "--blend must be between 0 and 1"),
    ],
)
def test_cli_refuses_a_blend_it_cannot_apply(tmp_path, capsys, model, blend, message):
    from napari_yolocell.cli import main

    data = _whole_image_dataset(tmp_path / "data", size=(96, 96), diameter=20.0, n=1)
    out = tmp_path / "runs"
    rc = main(["train", "--data", str(data), "--model", model, "--blend", blend, "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()  # nothing trained, nothing written
