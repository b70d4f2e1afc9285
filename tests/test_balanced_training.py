"""Balanced multi-source sampling and microscopy augmentation (training/balanced.py, augment.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from napari_yolocell.training.augment import PHOTOMETRIC_DEFAULTS, MicroscopyAugment, insert_into
from napari_yolocell.training.balanced import BalancedSampler, SmallObjectTargets, source_of


def _nuclei_image(seed: int = 0, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 20.0)
    for _ in range(12):
        cy, cx = rng.uniform(10, size - 10, 2)
        img += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 5.0**2))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_source_of_tile_names():
    assert source_of("/d/images/train/bitdepth_63x_heart_1_y0_x0.png") == "bitdepth"
    assert source_of("mnfinder_training__2022_y0_x0.png") == "mnfinder"


def test_sampler_gives_every_source_an_equal_share_each_epoch():
    sources = ["big"] * 500 + ["small"] * 7 + ["mid"] * 60
    sampler = BalancedSampler(sources, per_source=20, seed=3)
    assert len(sampler) == 60
    first, second = list(sampler), list(sampler)
    for draw in (first, second):
        assert Counter(sources[i] for i in draw) == {"big": 20, "small": 20, "mid": 20}
    assert first != second  # a fresh draw every epoch
    # a small source is used whole before any tile repeats a third time
    small = Counter(i for i in first if sources[i] == "small")
    assert set(small) == set(range(500, 507)) and max(small.values()) - min(small.values()) <= 1
    # a big source is drawn without replacement
    assert len({i for i in first if sources[i] == "big"}) == 20
    # same seed, same epoch: same draw
    assert np.array_equal(BalancedSampler(sources, 20, seed=3).draw(1), sampler.draw(1))


def test_sampler_gives_named_sources_their_own_share():
    sources = ["bbbc039"] * 200 + ["mnfinder"] * 30 + ["dsb"] * 400
    sampler = BalancedSampler(sources, {"bbbc039": 90, "*": 40}, seed=0)
    assert len(sampler) == 170
    assert Counter(sources[i] for i in sampler) == {"bbbc039": 90, "mnfinder": 40, "dsb": 40}
    with pytest.raises(ValueError):
        BalancedSampler(sources, {"dsb": 0})


def test_sampler_refuses_nonsense():
    with pytest.raises(ValueError):
        BalancedSampler(["a"], per_source=0)
    with pytest.raises(ValueError):
        BalancedSampler([], per_source=3)


def test_augment_is_photometric_grey_and_off_when_disabled():
    img = _nuclei_image()
    rgb = np.repeat(img[..., None], 3, axis=2)
    off = MicroscopyAugment({k: 0.0 for k in PHOTOMETRIC_DEFAULTS}, seed=0)
    labels = {"img": rgb.copy(), "cls": np.zeros((1, 1)), "instances": "boxes untouched"}
    out = off(labels)
    assert np.array_equal(out["img"], rgb) and out["instances"] == "boxes untouched"
    for effect in PHOTOMETRIC_DEFAULTS:
        only = MicroscopyAugment({k: float(k == effect) for k in PHOTOMETRIC_DEFAULTS}, seed=1)
        changed = only({"img": rgb.copy()})["img"]
        assert changed.shape == rgb.shape and changed.dtype == np.uint8
        assert np.array_equal(changed[..., 0], changed[..., 2]), effect  # still grey
        assert not np.array_equal(changed, rgb), f"{effect} did nothing"


def test_augment_effects_do_what_they_say():
    img = _nuclei_image(2)
    sat = MicroscopyAugment({k: float(k == "saturate") for k in PHOTOMETRIC_DEFAULTS}, seed=0)
    assert (sat.apply(img) == 255).sum() > (img == 255).sum()  # bright nuclei clip
    q = MicroscopyAugment({k: float(k == "quantise") for k in PHOTOMETRIC_DEFAULTS}, seed=0)
    assert len(np.unique(q.apply(img))) < min(48, len(np.unique(img)))
    blur = MicroscopyAugment({k: float(k == "blur") for k in PHOTOMETRIC_DEFAULTS}, seed=0)
    grad = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert grad(blur.apply(img)) < grad(img)
    with pytest.raises(ValueError, match="unknown"):
        MicroscopyAugment({"sharpen": 1.0})


def test_insert_into_goes_before_format():
    class Format:
        pass

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

    class Dataset:
        transforms = Compose(["mosaic", "flip", Format()])

    aug = MicroscopyAugment(seed=0)
    insert_into(Dataset, aug)
    insert_into(Dataset, aug)  # once only
    assert Dataset.transforms.transforms[2] is aug
    assert type(Dataset.transforms.transforms[3]).__name__ == "Format"
    assert len(Dataset.transforms.transforms) == 4


def test_balanced_trainer_trains_one_epoch_on_tiny_tiles(tmp_path, monkeypatch):
    """A real ultralytics epoch: the loader draws per_source tiles of each non-excluded source."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "cfg"))
    from PIL import Image

    from napari_yolocell.training.balanced import balanced_trainer

    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    names = [f"a_{i}" for i in range(6)] + ["b_0", "b_1"] + [f"c_{i}" for i in range(3)]
    for i, name in enumerate(names):
        for split in ("train", "val") if i < 2 else ("train",):
            Image.fromarray(_nuclei_image(i, 64)).save(root / "images" / split / f"{name}.png")
            (root / "labels" / split / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnc: 1\nnames: {{0: nucleus}}\n"
    )
    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    from napari_yolocell.models.registry import resolve_model

    seen: list[int] = []
    trainer_cls = balanced_trainer(per_source=4, seed=0, exclude=["c"], small_boost=(18, 0.5))
    model = YOLO(str(resolve_model("default").path))  # our own v5n .pt
    model.add_callback(
        "on_train_epoch_start", lambda t: seen.append(len(t.train_loader.dataset.im_files))
    )
    model.train(
        trainer=trainer_cls,
        data=str(root / "data.yaml"),
        epochs=1,
        close_mosaic=1,  # the dataset rebuilds its transforms: the augmentation must stay
        imgsz=64,
        batch=4,
        workers=0,
        device="cpu",
        plots=False,
        amp=False,
        val=False,
        project=str(tmp_path / "runs"),
        name="t",
    )
    trainer = model.trainer
    assert seen[0] == len(names)  # every tile is in the dataset...
    assert len(trainer.train_loader) == 2  # ...but an epoch is 4 tiles x 2 sources / batch 4
    steps = [type(t).__name__ for t in trainer.train_loader.dataset.transforms.transforms]
    assert steps.index("MicroscopyAugment") == steps.index("Format") - 1
    # the optimised model trained with raised small-box targets; the saved EMA keeps plain loss
    assert isinstance(trainer.model.criterion.assigner, SmallObjectTargets)
    ema_criterion = getattr(trainer.ema.ema, "criterion", None)
    assert ema_criterion is None or not isinstance(ema_criterion.assigner, SmallObjectTargets)


def test_small_object_targets_raise_only_small_foreground_boxes():
    torch = pytest.importorskip("torch")
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 30, 30], [0, 0, 8, 8]]], dtype=torch.float32)
    scores = torch.tensor([[[0.25], [0.25], [0.0]]])
    fg = torch.tensor([[True, True, False]])

    def assigner(*args, **kwargs):
        return None, boxes, scores, fg, None

    wrapped = SmallObjectTargets(assigner, size=18, power=0.5)
    _, _, out, _, _ = wrapped()
    # small foreground: 0.25 -> 0.5; large foreground unchanged; background stays 0
    assert out[0, :, 0].tolist() == pytest.approx([0.5, 0.25, 0.0])
    with pytest.raises(ValueError):
        SmallObjectTargets(assigner, size=18, power=1.5)


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_label_fragments_inside_a_nucleus_are_dropped_small_nuclei_kept():
    ms = _script("train_multisource")
    nuclei = [[y, x, y + 30, x + 30] for y in (0, 50, 100) for x in (0, 50, 100)]
    fragment = [10, 10, 16, 16]  # a 6 px piece of the first nucleus, labelled on its own
    lone_small = [200, 200, 206, 206]  # a small object on its own stays (a micronucleus-size call
    # is the model's to learn, not the cleaner's)
    out = ms.drop_fragments(np.array([*nuclei, fragment, lone_small], float))
    assert len(out) == len(nuclei) + 1
    assert not any(np.array_equal(b, fragment) for b in out)
    assert any(np.array_equal(b, lone_small) for b in out)


def test_splits_are_fixed_by_name_and_near_the_fractions():
    ms = _script("train_multisource")
    names = [f"img{i}" for i in range(2000)]
    splits = Counter(ms.split_of(n) for n in names)
    assert abs(splits["test"] / 2000 - ms.TEST_FRACTION) < 0.03
    assert abs(splits["val"] / 2000 - ms.VAL_FRACTION) < 0.03
    assert [ms.split_of(n) for n in names[:50]] == [ms.split_of(n) for n in names[:50]]
