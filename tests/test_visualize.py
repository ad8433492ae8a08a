"""Alignment and lambda-sensitivity figures end to end: PNGs and their numbers from a tiny trained checkpoint
and demo clips on disk (the run of tests/test_predict.py)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tam_jax import alignment, visualize
from tam_jax.inference import load_trained_model
from tests.test_predict import trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def open_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def path_overlay(figure) -> list[np.ndarray]:
    """(row, col) cells of each path overlay drawn on the figure."""
    found = []
    for ax in figure.axes:
        for collection in ax.collections:
            if collection.get_gid() == visualize.PATH_GID:
                cols, rows = np.asarray(collection.get_offsets()).T
                found.append(np.stack([rows, cols], axis=1).astype(int))
    return found


def test_pair_writes_a_png_and_its_numbers_and_draws_the_tam_path(run, tmp_path, capsys):
    out = tmp_path / "figures" / "pair.png"
    argv = ["pair", "--checkpoint", str(run.workdir), "--query", run.queries[0],
            "--support", str(run.support / run.classes[0] / "b"), "--out", str(out), "--lam", "0.1"]
    assert visualize.main(argv) == 0
    assert str(out) in capsys.readouterr().out
    image_format, (width, height) = open_png(out)
    assert image_format == "PNG" and 800 <= width <= 3000 and 400 <= height <= 2000
    record = json.loads(out.with_suffix(".json").read_text())
    distance = np.array(record["distance"], np.float32)
    assert distance.shape == (4, 4) and record["lam"] == 0.1 and record["checkpoint_step"] == 2
    np.testing.assert_array_equal(record["path"], alignment.alignment_path(distance, "tam"))
    np.testing.assert_allclose(np.sum(record["soft"], axis=0), 1, rtol=1e-4)  # TAM: columns sum to 1
    assert record["soft_distance"] <= record["hard_distance"] + 1e-6

    # The figure's overlay is the hard path of the figure's own distance matrix, on both panels.
    checkpoint = load_trained_model(run.workdir)
    figure, record = visualize.pair_figure(checkpoint, run.queries[1], run.queries[2], lam=0.1)
    expected = np.argwhere(np.asarray(alignment.alignment_path(np.array(record["distance"], np.float32))))
    overlays = path_overlay(figure)
    assert len(overlays) == 2
    for cells in overlays:
        np.testing.assert_array_equal(cells[np.lexsort(cells.T[::-1])], expected)


def test_pair_of_an_unreadable_clip_is_an_error_naming_it(run, tmp_path, capsys):
    argv = ["pair", "--checkpoint", str(run.workdir), "--query", run.corrupt, "--support", run.queries[0],
            "--out", str(tmp_path / "pair.png")]
    assert visualize.main(argv) == 1
    assert run.corrupt in capsys.readouterr().err
    assert not (tmp_path / "pair.png").exists()


def test_lambda_sweep_writes_png_json_csv_and_replots_saved_records(run, tmp_path):
    out = tmp_path / "lambda.png"
    argv = ["lambda", "--checkpoint", str(run.workdir), "--lams", "0,0.1,1", "--episodes", "8",
            "--out", str(out), "--no-progress"]
    assert visualize.main(argv) == 0
    assert open_png(out)[0] == "PNG"
    records = json.loads(out.with_suffix(".json").read_text())
    assert [(r["lam"], r["shot"], r["episodes"], r["split"]) for r in records] == [
        (0.0, 1, 8, "test"), (0.1, 1, 8, "test"), (1.0, 1, 8, "test")]
    assert all(0 <= r["accuracy"] <= 1 and r["ci95"] >= 0 and r["scorer"] == "tam" for r in records)
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lam"]) for r in rows] == [0.0, 0.1, 1.0]
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([r["accuracy"] for r in records])

    replot = tmp_path / "again" / "lambda.png"
    assert visualize.main(["lambda", "--results", str(out.with_suffix(".json")), "--out", str(replot)]) == 0
    assert open_png(replot)[0] == "PNG"
    assert json.loads(replot.with_suffix(".json").read_text()) == records


def test_lambda_plot_from_records_and_bad_records(tmp_path):
    records = [
        {"lam": lam, "accuracy": base - drop, "ci95": 0.01, "shot": shot, "way": 5}
        for shot, base in ((1, 0.6), (5, 0.8))
        for lam, drop in ((0, 0), (0.01, 0), (0.1, 0.02), (1.0, 0.1))
    ]
    ax = visualize.plot_lambda(records).axes[0]
    assert ax.get_xscale() == "log"
    assert len(ax.containers) == 2  # one error-bar series per shot; lambda = 0 as dashed lines
    dashed = [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"]
    assert sorted(dashed) == pytest.approx([60, 80])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"accuracy": 0.5}]))
    with pytest.raises(ValueError, match="record 0 has no 'lam'"):
        visualize.read_sweep(bad)
