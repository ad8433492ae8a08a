"""tam_jax.results: records, named metrics, results.json and its table."""

import json

import numpy as np
import pytest

from tam_jax import results


def test_write_results_merges_by_split_scorer_way_and_shot(tmp_path):
    path = tmp_path / "results.json"
    first = results.result_records({"tam": np.array([1.0, 0.0]), "mean": np.array([0.5, 0.5])},
                                    split="test", way=5, shot=1)
    results.write_results(path, first)
    second = results.result_records({"tam": np.array([1.0, 1.0, 0.0])}, split="test", way=5, shot=1)
    merged = results.write_results(path, second)
    assert [(r["scorer"], r["episodes"]) for r in merged] == [("mean", 2), ("tam", 3)]
    assert json.loads(path.read_text()) == merged
    mean, ci95 = results.mean_and_ci95(np.array([1.0, 1.0, 0.0]))
    assert mean == pytest.approx(2 / 3)
    assert ci95 == pytest.approx(1.959964 * np.std([1, 1, 0], ddof=1) / np.sqrt(3))
    assert "66.67" in results.format_results(merged)


def test_metrics_are_named_by_kind_scorer_and_shot():
    records = results.result_records({"tam": np.array([1.0, 0.0, 1.0, 1.0]), "mean": np.array([0.0, 0.5])},
                                     split="val", way=5, shot=5)
    named = dict(results.metrics(records))
    assert named == {
        "accuracy/tam/5shot": pytest.approx(0.75), "ci95/tam/5shot": pytest.approx(records[0]["ci95"]),
        "accuracy/mean/5shot": pytest.approx(0.25), "ci95/mean/5shot": pytest.approx(records[1]["ci95"]),
    }
    assert records[0]["ci95"] > 0
