import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_yolocell.data.synthetic import make_nuclei_image
from napari_yolocell.engine.batch import ImageResult, run_batch
from napari_yolocell.engine.detect import DetectParams

PARAMS = DetectParams(tile=256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("plate")
    truth = {}
    for i in range(6):
        n = 5 + 2 * i
        p = d / f"well_{i}.tif"
        tifffile.imwrite(p, make_nuclei_image((260, 300), n_nuclei=n, seed=i).image)
        truth[str(p)] = n
    bad = d / "well_9.tif"
    bad.write_bytes(b"II*\x00garbage")  # a corrupt file among good ones
    return d, truth, bad


def _paths(folder):
    d, truth, bad = folder
    return sorted(truth) + [str(bad)]


def test_batch_counts_errors_and_csvs(folder, tmp_path):
    d, truth, bad = folder
    out, counts, errors = tmp_path / "d.csv", tmp_path / "c.csv", tmp_path / "e.csv"
    res = run_batch(_paths(folder), "classical", PARAMS, out=out, counts=counts, errors=errors)
    assert [r.count for r in res if r.error is None] == [truth[p] for p in sorted(truth)]
    err = pd.read_csv(errors)
    assert err["image"].tolist() == [str(bad)] and "well_9.tif" in err["error"][0]
    c = pd.read_csv(counts)
    assert c["count"].tolist() == [truth[p] for p in sorted(truth)]
    assert len(pd.read_csv(out)) == sum(truth.values())
    assert not (tmp_path / "d.csv.parts").exists()  # merged and cleaned up


def test_killed_run_resumes_to_identical_csvs(folder, tmp_path):
    paths = _paths(folder)
    ref = tmp_path / "ref"
    ref.mkdir()
    run_batch(paths, "classical", PARAMS, out=ref / "d.csv", counts=ref / "c.csv")

    run = tmp_path / "run"
    run.mkdir()
    seen = []

    def die_after_three(i, res):
        seen.append(i)
        if len(seen) == 3:
            raise KeyboardInterrupt  # as if the job were killed here

    with pytest.raises(KeyboardInterrupt):
        run_batch(
            paths,
            "classical",
            PARAMS,
            out=run / "d.csv",
            counts=run / "c.csv",
            on_result=die_after_three,
        )
    assert not (run / "d.csv").exists()  # nothing half-written
    assert len(list((run / "d.csv.parts").glob("*.json"))) == 3

    redone = []
    run_batch(
        paths,
        "classical",
        PARAMS,
        out=run / "d.csv",
        counts=run / "c.csv",
        on_result=lambda i, r: redone.append(i),
    )
    assert sorted(redone) == list(range(len(paths)))  # all reported, 3 from parts
    for name in ("d.csv", "c.csv"):
        assert (run / name).read_bytes() == (ref / name).read_bytes()


def test_two_worker_processes_match_plain_run(folder, tmp_path):
    paths = _paths(folder)
    plain = run_batch(paths, "classical", PARAMS)
    par = run_batch(paths, "classical", PARAMS, workers=2)
    assert [r.count for r in par] == [r.count for r in plain]


def test_local_dask_cluster_matches_plain_run(folder):
    import distributed as distributed

    paths = _paths(folder)
    plain = run_batch(paths, "classical", PARAMS)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client:
            dist = run_batch(paths, "classical", PARAMS, scheduler=client)
    assert [r.count for r in dist] == [r.count for r in plain]
    assert [r.error is None for r in dist] == [r.error is None for r in plain]
    np.testing.assert_allclose(
        dist[0].detections[["y", "x"]].to_numpy(), plain[0].detections[["y", "x"]].to_numpy()
    )


def test_cancel_stops_and_keeps_finished_parts(folder, tmp_path):
    import threading

    from napari_yolocell.engine.batch import BatchCancelled

    paths = _paths(folder)
    stop = threading.Event()

    def cancel_after_two(i, res):
        if i == 1:
            stop.set()

    with pytest.raises(BatchCancelled):
        run_batch(
            paths,
            "classical",
            PARAMS,
            out=tmp_path / "d.csv",
            on_result=cancel_after_two,
            cancel=stop,
        )
    assert len(list((tmp_path / "d.csv.parts").glob("*.json"))) == 2
    assert not (tmp_path / "d.csv").exists()


def test_folder_outputs_summary_and_header_only_errors(folder, tmp_path):
    """An output folder run (the widget's Batch tab): errors.csv exists even when all is read."""
    from napari_yolocell.engine.batch import SUMMARY_COLUMNS, folder_outputs, summary_table
    from napari_yolocell.io.tables import ERROR_COLUMNS

    _, truth, bad = folder
    good = sorted(truth)[:2]
    csvs = folder_outputs(tmp_path / "out")
    assert {k: p.name for k, p in csvs.items()} == {
        "out": "detections.csv",
        "counts": "counts.csv",
        "errors": "errors.csv",
    }
    res = run_batch(good, "classical", PARAMS, **csvs, empty_errors=True)
    errors = pd.read_csv(csvs["errors"])
    assert list(errors.columns) == ERROR_COLUMNS and errors.empty
    assert pd.read_csv(csvs["counts"])["count"].tolist() == [truth[p] for p in good]
    # without empty_errors (the CLI), no errors file unless an image failed
    plain = folder_outputs(tmp_path / "plain")
    run_batch(good, "classical", PARAMS, **plain)
    assert not plain["errors"].exists()

    table = summary_table([*res, None, ImageResult(image=str(bad), error="bad.tif: corrupt")])
    assert list(table.columns) == SUMMARY_COLUMNS
    assert table["count"].tolist()[:2] == [truth[p] for p in good]
    assert table["count"].isna().tolist() == [False, False, True]
    assert table["error"].tolist()[2] == "bad.tif: corrupt"

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        folder_outputs(tmp_path / "file")
    with pytest.raises(ValueError, match="choose an output folder"):
        folder_outputs(" ")
