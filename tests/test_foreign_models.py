"""Classic YOLOv5 and meituan YOLOv6 checkpoints and their original ONNX exports (issue #14).

The fixtures are real files made by the original code (see their SOURCE.md): our engine must
find >= 95 % of the original code's boxes again (IoU >= 0.8) and count within 3 %.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

V5 = "nuclephaser_dapi_v5"
V6 = "meituan_yolov6n_bbbc039"
MEITUAN_PT = "yolov6n_bbbc039_meituan.pt"

#: file, reference CSV, network input width the reference used for the 696 px wide PNGs,
#: minimum recovered fraction. The classic ONNX export has a fixed 640 x 640 input while its
#: reference was made from the .pt at 704 px: the 9 % change of scale alone moves some boxes
#: below IoU 0.8 (its network output is checked to match ours exactly in
#: test_rebuilt_networks_match_original_exports).
CASES = {
    "classic-v5-pt": (V5, "dapi_v5.pt", "reference_detections.csv", 704, 0.95),
    "classic-v5-onnx": (V5, "dapi_v5.onnx", "reference_detections.csv", 640, 0.85),
    "meituan-v6-pt": (V6, "yolov6n_bbbc039_meituan.pt", "reference_detections.csv", 640, 0.95),
    "meituan-v6-onnx": (
        V6,
        "yolov6n_bbbc039_meituan.onnx",
        "reference_detections_onnx640.csv",
        640,
        0.95,
    ),
}


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path_factory, monkeypatch):
    # an empty trust store: the fixture checkpoints load as untrusted files
    monkeypatch.setenv("YOLOCELL_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
    monkeypatch.setenv("YOLOCELL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def recovered(reference: np.ndarray, ours: np.ndarray, threshold: float = 0.8) -> int:
    """Reference boxes matched one-to-one (greedy, best IoU first) by ours at IoU >= threshold."""
    if not len(reference) or not len(ours):
        return 0
    iou = _iou(reference, ours)
    pairs = np.argwhere(iou >= threshold)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]])]
    used_r, used_o = set(), set()
    for r, o in pairs:
        if r not in used_r and o not in used_o:
            used_r.add(r)
            used_o.add(o)
    return len(used_r)


def run_case(folder, model: str, reference: str, width: int, backend: str = "auto"):
    """(recovered, reference count, our count) over the fixture's images."""
    import cv2

    from napari_yolocell.engine.detect import DetectParams, detect_image
    from napari_yolocell.models.loading import load_detector

    detector = load_detector(folder / model, backend=backend, device="cpu")
    ref = pd.read_csv(folder / reference)
    params = DetectParams(
        tile=696,
        conf=0.25,
        iou=0.45,
        normalize="none",
        diameter=detector.spec.diameter_px * 696 / width,  # the reference's resize factor
        auto_diameter=False,
        skip_empty=False,
        ios=None,
    )
    found = total_ref = total_ours = 0
    for image in sorted(ref["image"].unique()):
        grey = cv2.imread(str(folder / "images" / image), cv2.IMREAD_GRAYSCALE)
        df = detect_image(grey, detector, params)
        ours = df[["x0", "y0", "x1", "y1"]].to_numpy(float)
        theirs = ref[ref["image"] == image][["x0", "y0", "x1", "y1"]].to_numpy(float)
        found += recovered(theirs, ours)
        total_ref += len(theirs)
        total_ours += len(ours)
    return found, total_ref, total_ours


@pytest.mark.parametrize("case", list(CASES))
def test_equivalence_with_original_code(fixtures_dir, case):
    sub, model, reference, width, minimum = CASES[case]
    found, n_ref, n_ours = run_case(fixtures_dir / sub, model, reference, width)
    print(f"{case}: recovered {found}/{n_ref} = {found / n_ref:.3f}, count {n_ours} vs {n_ref}")
    assert found / n_ref >= minimum
    assert abs(n_ours - n_ref) / n_ref <= 0.03


def test_family_and_layout_are_reported(fixtures_dir):
    from napari_yolocell.models.checkpoints import FAMILY_LABELS, checkpoint_family
    from napari_yolocell.models.loading import load_detector

    assert checkpoint_family(fixtures_dir / V5 / "dapi_v5.pt") == "yolov5-classic"
    family = checkpoint_family(fixtures_dir / V6 / "yolov6n_bbbc039_meituan.pt")
    assert FAMILY_LABELS[family] == "YOLOv6 (meituan)"
    detector = load_detector(fixtures_dir / V5 / "dapi_v5.onnx")
    assert detector.layout == "xywh-obj-cls"
    assert detector.names == {0: "Nucleus"}


@pytest.mark.parametrize(
    ("sub", "pt", "onnx_file"),
    [(V5, "dapi_v5.pt", "dapi_v5.onnx"), (V6, "yolov6n_bbbc039_meituan.pt", None)],
)
def test_rebuilt_networks_match_original_exports(fixtures_dir, sub, pt, onnx_file):
    """Our rebuilt network gives the raw output of the original code's own ONNX export."""
    import onnxruntime as ort
    import torch

    from napari_yolocell.models.checkpoints import load_network

    folder = fixtures_dir / sub
    onnx_file = onnx_file or pt.replace(".pt", ".onnx")
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, 640, 640), dtype=np.float32)
    net = load_network(folder / pt)
    with torch.inference_mode():
        ours = net.net(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(folder / onnx_file), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert ours.shape == theirs.shape
    assert np.abs(ours[..., :4] - theirs[..., :4]).max() < 0.05  # pixels
    assert np.abs(ours[..., 4:] - theirs[..., 4:]).max() < 1e-3  # scores


def test_evaluate_compares_a_mix_of_families(fixtures_dir, tmp_path, capsys):
    """`yolocell evaluate` scores bundled, classic YOLOv5 and meituan YOLOv6 models side by side
    (the thesis's comparison table with the user's own checkpoints)."""
    from napari_yolocell.cli import main
    from napari_yolocell.data.samples import sample_image_path

    sample = sample_image_path()
    boxes = sample.with_name(sample.stem + "_boxes.csv")
    data = tmp_path / "ds"
    export = ["export", "--image", str(sample), "--boxes", str(boxes), "--out", str(data)]
    assert main([*export, "--tile", "256", "--overlap", "32", "--split", "1,0,0"]) == 0
    capsys.readouterr()  # the export's summary
    models = ["default", str(fixtures_dir / V5 / "dapi_v5.pt"), str(fixtures_dir / V6 / MEITUAN_PT)]
    args = ["evaluate", "--data", str(data), "--split", "train", "--quiet"]
    assert main([*args, *[a for m in models for a in ("--model", m)]]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"nucleus-v5n", "dapi_v5.pt", MEITUAN_PT}
    header = table[0].split()
    for row in rows.values():  # every family finds the sample's nuclei
        assert float(row[header.index("F1")]) > 0.9
