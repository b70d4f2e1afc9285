"""Metrics on hand-built predictions with known answers, model evaluation and plots."""

from __future__ import annotations

import numpy as np
import pytest

from napari_yolocell.analysis.evaluate import (
    box_iou,
    compare_models,
    evaluate_model,
    evaluate_predictions,
    match_detections,
    results_table,
)

TRUTH = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float)


def _scalars(result: dict) -> dict:
    return {k: v for k, v in result.items() if not isinstance(v, (dict, list)) and k != "per_image"}


def test_two_matched_one_false_positive():
    pred = np.array([[0, 0, 10, 10], [20, 21, 30, 31], [60, 60, 70, 70]], float)
    r = evaluate_predictions([(pred, [0.9, 0.8, 0.7], TRUTH)], conf=0.5)
    assert (r["tp"], r["fp"], r["fn"], r["n_pred"]) == (2, 1, 1, 3)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    # 3 predicted for 3 true: the count is right although one nucleus is missed
    assert r["count_error"] == 0 and r["count_bias"] == 0
    # raising the threshold above the FP's score (0.7) gives P = 1, R = 2/3, F1 = 0.8
    assert r["conf_best_f1"] == pytest.approx(0.71)
    assert r["f1_best"] == pytest.approx(0.8)


def test_one_to_one_matching_by_score():
    # two predictions on one nucleus: the more confident one is the TP even with lower IoU
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 11]], float)
    m = match_detections(pred, [0.5, 0.9], TRUTH[:1])
    assert m.tp.tolist() == [False, True] and m.truth_index.tolist() == [-1, 0]
    assert (m.n_tp, m.n_fp, m.n_fn) == (1, 1, 0)
    assert m.iou[1] == pytest.approx(100 / 110)
    # IoU below the threshold is no match
    m = match_detections(np.array([[0, 0, 10, 21]]), [1.0], TRUTH[:1], iou=0.5)  # 100/210
    assert (m.n_tp, m.n_fp, m.n_fn) == (0, 1, 1)
    with pytest.raises(ValueError):
        match_detections(pred, [0.5], TRUTH)


def test_perfect_prediction_map():
    r = evaluate_predictions([(TRUTH, [0.9, 0.8, 0.7], TRUTH), (TRUTH[:1], [0.6], TRUTH[:1])])
    assert r["precision"] == r["recall"] == r["f1"] == 1.0
    # ultralytics' compute_ap appends a sentinel (recall 1, precision 0) and integrates the
    # 101-point interpolated curve with the trapezoid rule: the last step 0.99 -> 1.00 goes
    # from precision 1 to 0 and loses half of 0.01, so a perfect detector scores 0.995.
    assert r["mAP50"] == pytest.approx(0.995)
    assert r["mAP50-95"] == pytest.approx(0.995)
    assert r["ap"] == pytest.approx([0.995] * 10)


def test_map_drops_with_loose_boxes():
    loose = TRUTH + [0, 0, 0, 2]  # IoU 10/12 = 0.83: correct at 0.50..0.80, wrong at 0.85..0.95
    r = evaluate_predictions([(loose, [0.9, 0.8, 0.7], TRUTH)])
    assert r["mAP50"] == pytest.approx(0.995)
    assert r["mAP50-95"] == pytest.approx(0.995 * 7 / 10)
    strict = evaluate_predictions([(loose, [0.9, 0.8, 0.7], TRUTH)], iou=0.85)
    assert strict["tp"] == 0 and strict["iou"] == pytest.approx(0.85)
    with pytest.raises(ValueError):
        evaluate_predictions([(loose, [0.9, 0.8, 0.7], TRUTH)], iou=0.42)


def test_count_error_and_bias_per_image():
    empty = np.zeros((0, 4))
    images = [
        (TRUTH[:2], [0.9, 0.9], np.vstack([TRUTH, TRUTH + 100]), "under"),  # 2 for 6 true
        (TRUTH, [0.9, 0.9, 0.9], TRUTH[:2], "over"),  # 3 for 2 true
        (TRUTH[:1], [0.9], empty, "blank"),  # 1 for 0 true
    ]
    r = evaluate_predictions(images, conf=0.5)
    # relative errors -4/6 and +1/2 (the image without truth is left out of the ratios)
    assert r["count_error"] == pytest.approx((4 / 6 + 1 / 2) / 2)
    assert r["count_bias"] == pytest.approx((-4 / 6 + 1 / 2) / 2)
    # absolute errors -4, +1, +1 over all images
    assert r["count_mae"] == pytest.approx(2.0)
    assert r["count_mean_signed"] == pytest.approx(-2 / 3)
    assert r["n_images_no_truth"] == 1 and r["n_true"] == 8
    table = r["per_image"].set_index("image")
    assert table.loc["blank", "n_pred"] == 1 and np.isnan(table.loc["blank", "rel_error"])
    assert table.loc["under", "error"] == -4 and table.loc["over", "fp"] == 1


def test_min_count_error_conf():
    # 4 true nuclei; 4 good detections at 0.8 and 2 spurious ones at 0.3 and 0.2
    truth = np.array([[0, 0, 10, 10], [0, 20, 10, 30], [0, 40, 10, 50], [0, 60, 10, 70]], float)
    pred = np.vstack([truth, [[50, 50, 60, 60], [80, 80, 90, 90]]])
    r = evaluate_predictions([(pred, [0.8] * 4 + [0.3, 0.2], truth)])
    assert r["conf_min_count_error"] == pytest.approx(0.31)
    assert r["count_error_min"] == 0
    curves = r["curves"]
    assert curves["count_error"][curves["conf"] == 0.1][0] == pytest.approx(0.5)


def test_min_area_leaves_small_objects_out():
    tiny = np.array([[100, 100, 104, 104]], float)  # 16 px^2
    truth = np.vstack([TRUTH, tiny])
    r = evaluate_predictions([(TRUTH, [0.9] * 3, truth)], conf=0.5, min_area=25)
    assert r["n_true"] == 3 and r["recall"] == 1.0
    r = evaluate_predictions([(truth, [0.9] * 4, TRUTH)], conf=0.5, min_area=25)
    assert r["n_pred"] == 3 and r["precision"] == 1.0


def test_box_iou_matches_ultralytics():
    import torch

    from napari_yolocell.models.ultralytics_env import import_ultralytics

    import_ultralytics()
    from ultralytics.utils.metrics import box_iou as ul_box_iou

    rng = np.random.default_rng(0)
    a = np.sort(rng.uniform(0, 50, (7, 4)).reshape(7, 2, 2), axis=1).transpose(0, 2, 1)
    a = a.reshape(7, 4)[:, [0, 2, 1, 3]]
    b = a[::-1] + 3
    expected = ul_box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=1e-6)


def test_no_truth_no_predictions():
    r = evaluate_predictions([(np.zeros((0, 4)), [], np.zeros((0, 4)))])
    assert r["n_true"] == 0 and np.isnan(r["mAP50"]) and np.isnan(r["recall"])


@pytest.fixture(scope="module")
def synthetic_items():
    from napari_yolocell.data import synthetic

    items = []
    for seed in range(2):
        im = synthetic.make_nuclei_image((192, 192), seed=seed)
        items.append((im.image, im.boxes, f"syn{seed}"))
    return items


def test_evaluate_model_and_compare(synthetic_items):
    from napari_yolocell.models import classical

    result = evaluate_model(classical.ClassicalDetector(), synthetic_items, name="classical")
    assert result["n_images"] == 2 and result["n_true"] == sum(
        len(b) for _, b, _ in synthetic_items
    )
    assert result["recall"] > 0.9 and result["precision"] > 0.9  # well-separated blobs
    assert result["model"] == "classical" and result["seconds_per_image"] > 0

    half = evaluate_predictions(
        [(b[::2], np.ones(len(b[::2])), b, n) for _, b, n in synthetic_items], name="half"
    )
    table = compare_models([result, half])
    assert list(table["model"]) == ["classical", "half"]
    assert table.loc[1, "R"] == pytest.approx(half["recall"]) and table.loc[1, "P"] == 1.0
    assert table.loc[1, "bias"] < -0.4
    assert list(results_table([half]).columns[:6]) == ["model", "P", "R", "F1", "mAP50", "mAP50-95"]


def test_save_plots(tmp_path):
    from napari_yolocell.analysis.plots import plot_pr_curve, save_plots

    a = evaluate_predictions([(TRUTH, [0.9, 0.8, 0.7], TRUTH)], name="perfect")
    b = evaluate_predictions([(TRUTH[:2], [0.9, 0.4], TRUTH)], name="partial")
    paths = save_plots([a, b], tmp_path / "plots", prefix="cmp_")
    assert [p.name for p in paths] == [
        "cmp_pr_curve.png",
        "cmp_f1_curve.png",
        "cmp_count_error_curve.png",
        "cmp_count_scatter.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    fig = plot_pr_curve(a)
    assert len(fig.axes[0].lines) == 2  # curve + operating point


def test_plot_training_history_redraws_in_place():
    from napari_yolocell.analysis.plots import plot_training_history

    history = [
        {"epoch": e, "box_loss": 2.0 / e, "cls_loss": 1.0 / e, "mAP50": 0.2 * e} for e in (1, 2, 3)
    ]  # no dfl_loss (YOLOv5 reports none): left out, not drawn as NaN
    fig = plot_training_history(history)
    loss, map50 = fig.axes
    assert [line.get_label() for line in loss.lines] == ["box", "cls"]
    assert list(map50.lines[0].get_ydata()) == pytest.approx([0.2, 0.4, 0.6])
    assert plot_training_history(history[:1], fig) is fig and len(fig.axes) == 2
    assert len(fig.axes[1].lines[0].get_xdata()) == 1
    assert not plot_training_history([]).axes[0].lines
