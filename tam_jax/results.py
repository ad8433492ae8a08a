"""Evaluation results: per-episode accuracies -> records, named metrics, `results.json` and its table.

A record is {split, scorer, way, shot, episodes, accuracy, ci95} (accuracy a fraction, ci95 the half-width
of its 95% interval); the `--mode=eval` run adds checkpoint_step (and init_from for an imported backbone).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator

import numpy as np

from tam_jax.files import atomic_write

# Two-sided 95% normal quantile: the papers report mean accuracy +- 1.96 standard errors.
_Z95 = 1.959964


def mean_and_ci95(per_episode: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and the half-width of its 95% confidence interval (1.96 standard errors)."""
    values = np.asarray(per_episode, np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(_Z95 * values.std(ddof=1) / math.sqrt(values.size))


def result_records(
    per_scorer: dict[str, np.ndarray], *, split: str, way: int, shot: int
) -> list[dict]:
    """Per-scorer accuracies -> records {split, scorer, way, shot, episodes, accuracy, ci95}."""
    records = []
    for scorer, values in per_scorer.items():
        mean, ci95 = mean_and_ci95(values)
        records.append(
            dict(split=split, scorer=scorer, way=way, shot=shot, episodes=int(len(values)),
                 accuracy=mean, ci95=ci95)
        )
    return records


def write_results(path: str | os.PathLike, records: list[dict]) -> list[dict]:
    """Merge `records` into the JSON list at `path` (replacing ones with the same split, scorer, way and
    shot), write it atomically, and return the merged list."""
    key = lambda r: (r["split"], r["scorer"], r["way"], r["shot"])
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
    merged = {key(r): r for r in existing}
    merged.update({key(r): r for r in records})
    ordered = sorted(merged.values(), key=key)
    with atomic_write(path) as f:
        json.dump(ordered, f, indent=2)
    return ordered


def format_results(records: list[dict]) -> str:
    """Records -> a markdown table, accuracies in percent with their 95% intervals."""
    lines = ["| split | scorer | way | shot | episodes | accuracy (%) |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {r['split']} | {r['scorer']} | {r['way']} | {r['shot']} | {r['episodes']} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} |"
        )
    return "\n".join(lines)


def metric_name(kind: str, scorer: str, shot: int) -> str:
    """The name a metric is logged under: `accuracy/tam/5shot`, `ci95/tam/5shot`."""
    return f"{kind}/{scorer}/{shot}shot"


def metrics(records: Iterable[dict]) -> Iterator[tuple[str, float]]:
    """(name, value) of each record's accuracy and 95% interval (`metric_name`)."""
    for r in records:
        yield metric_name("accuracy", r["scorer"], r["shot"]), float(r["accuracy"])
        yield metric_name("ci95", r["scorer"], r["shot"]), float(r["ci95"])
