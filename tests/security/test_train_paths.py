"""``train`` and ``--resume`` never hand the user's file to ultralytics (issue 21, case 4).

ultralytics' trainer re-reads a checkpoint with ``torch.load(weights_only=False)``: a pre-scan
of names cannot protect that. Here ultralytics only ever gets a network we built (fine-tune,
YAML) or a checkpoint we wrote from the user's, read as data (resume).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_yolocell.models import netbuild, pickle_data, safety
from napari_yolocell.models.integrity import file_sha256
from napari_yolocell.training.train import train

from ._craft import BUNDLED, bundled_checkpoint, contained, payload, zip_bytes

SIZE = 64


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 40, (SIZE, SIZE), dtype=np.uint8)
            img[20:32, 20:32] = 220
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.40 0.40 0.19 0.19\n")
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: n\n"
    )
    return root


def _hostile_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    files = {}
    ckpt = bundled_checkpoint()
    ckpt["model"].yaml["activation"] = payload(marker)
    files["activation"] = folder / "activation.pt"
    torch.save(ckpt, files["activation"])

    files["reduce DetectionModel(cfg)"] = folder / "reduce.pt"
    cfg = {"activation": payload(marker), "backbone": [], "head": [], "nc": 1}
    data = pickle.dumps(cfg, protocol=2)[2:-1]
    files["reduce DetectionModel(cfg)"].write_bytes(
        b"\x80\x02}X\x05\x00\x00\x00modelcultralytics.nn.tasks\nDetectionModel\n(" + data + b"tRs."
    )

    genuine = BUNDLED.read_bytes()
    files["pickle + zip polyglot"] = folder / "polyglot.pt"
    files["pickle + zip polyglot"].write_bytes(
        pickle.dumps({"model": _System(marker)}, protocol=2) + genuine
    )

    hostile_pkl = pickle.dumps({"model": _System(marker)}, protocol=2)
    files["two data.pkl folders"] = folder / "two.pt"
    files["two data.pkl folders"].write_bytes(
        zip_bytes({"x/data.pkl": hostile_pkl, "archive/data.pkl": hostile_pkl})
    )
    files["yaml starting with N."] = folder / "n.yaml"
    files["yaml starting with N."].write_bytes(b"N.")
    return files


def test_hostile_files_given_to_train(dataset, tmp_path, marker):
    for name, path in _hostile_checkpoints(tmp_path, marker).items():
        out = tmp_path / f"runs-{path.stem}"
        contained(
            lambda p=path, o=out: train(dataset, p, epochs=1, imgsz=SIZE, out=o, device="cpu"),
            marker,
        )
        assert not list(out.rglob("*.pt")), name


def test_hostile_last_pt_given_to_resume(dataset, tmp_path, marker):
    run = tmp_path / "runs" / "run" / "weights"
    run.mkdir(parents=True)
    shutil.copy(_hostile_checkpoints(tmp_path, marker)["activation"], run / "last.pt")
    contained(
        lambda: train(dataset, out=tmp_path / "runs", name="run", resume=True, device="cpu"),
        marker,
    )


def _spy(monkeypatch) -> list[str]:
    """The SHA-256 of every file torch.load is given (what it reads, not its name: the
    trainer writes its own last.pt where the user's was)."""
    seen: list[str] = []
    original = torch.load

    def spy(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).is_file():
            seen.append(file_sha256(f))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


def test_fine_tune_and_resume_never_read_the_users_file(dataset, tmp_path, monkeypatch):
    """A genuine checkpoint: fine-tuned, cancelled, resumed; torch.load never sees it."""
    mine = tmp_path / "mine.pt"
    shutil.copy(BUNDLED, mine)
    seen = _spy(monkeypatch)
    first = train(
        dataset,
        mine,
        epochs=2,
        imgsz=SIZE,
        batch=2,
        out=tmp_path / "runs",
        name="ft",
        device="cpu",
        should_stop=lambda: True,
    )
    assert file_sha256(mine) not in seen
    last = first.last
    seen.clear()
    # the checkpoint's arguments point elsewhere: resume must stay in the chosen run
    ckpt = torch.load(last, weights_only=False)
    elsewhere = tmp_path / "elsewhere"
    ckpt["train_args"]["save_dir"] = str(elsewhere)
    ckpt["train_args"]["data"] = str(tmp_path / "nowhere.yaml")
    torch.save(ckpt, last)
    users = file_sha256(last)
    seen.clear()
    resumed = train(dataset, out=tmp_path / "runs", name="ft", resume=True, device="cpu")
    assert users not in seen and resumed.run_dir == first.run_dir
    assert not elsewhere.exists()
    assert not list((tmp_path / "cache").rglob("resume-*")), "temporary checkpoint left behind"


def test_training_arguments_keep_no_paths():
    args = netbuild.training_arguments(
        {
            "save_dir": "/x",
            "data": "/y.yaml",
            "model": "/z.pt",
            "cfg": "/c.yaml",
            "distill_model": "/t.pt",
            "epochs": 3,
            "lr0": 0.01,
            "name": "n",
        }
    )
    assert args == {"epochs": 3, "lr0": 0.01}


def test_resume_state_is_rebuilt_as_data(tmp_path):
    """What ultralytics gets for a resume: our network, plain numbers and tensors."""
    ckpt = bundled_checkpoint()
    ckpt["optimizer"] = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    ckpt["epoch"] = 3
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    state = netbuild.resume_checkpoint(safety.read_model_file(path))
    assert type(state["ema"]).__name__ == "DetectionModel" and state["model"] is None
    assert torch.equal(state["optimizer"]["state"][0]["step"], torch.tensor(3.0))
    ckpt["optimizer"] = {"state": {}, "param_groups": [{"lr": _System(Path("x"))}]}
    torch.save(ckpt, path)
    with pytest.raises(pickle_data.PickleDataError):
        netbuild.resume_checkpoint(safety.read_model_file(path, trusted=True))
