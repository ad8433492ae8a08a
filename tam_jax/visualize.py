"""Pictures of temporal alignment (the paper's Fig. 3-4) and of its sensitivity to lambda (Fig. 5), as PNGs.

    python -m tam_jax.visualize pair --checkpoint DIR --query PATH --support PATH --out pair.png [--lam L]

writes `pair.png`: for one query and one support clip (video files or frame folders), the frame distance
matrix (Eq. 1) and the soft alignment at temperature lam, each with the hard TAM path drawn over it and the
clips' frames along both axes; and `pair.json` with the numbers (`distance`, `path`, `soft` `[Tq, Ts]`, the
soft and hard TAM distances).

    python -m tam_jax.visualize lambda --checkpoint DIR --lams 0,0.01,0.05,0.1,0.5,1 --out lambda.png \
        [--shots 1,5] [--episodes N] [--split test]
    python -m tam_jax.visualize lambda --results lambda.json --out lambda.png

evaluates the checkpoint's test split (embedded once; the same episodes for every lambda) at each lambda, or
reads such records back, and plots accuracy with its 95% interval against lambda on a log axis (lambda = 0,
the hard minimum, as a dashed line); the records go to `lambda.json` and `lambda.csv` beside the PNG.
Drawing uses matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from tam_jax import alignment, cli, errors, methods, progress
from tam_jax.errors import UserError
from tam_jax.files import atomic_write, write_text

PATH_GID = "tam_path"  # the gid of the path overlay's markers, so tests can find them
_log = logging.getLogger(__spec__.name if __spec__ else __name__)  # not "__main__" under python -m
_DPI = 150


# ----------------------------------------------------------------------------------------------------
# One query-support pair.


@functools.partial(jax.jit, static_argnames=("lam", "scorer"))
def _maps(query, support, lam: float, scorer: str):
    distance = alignment.cosine_distance(query, support)
    hard = alignment.alignment_path(distance, scorer)
    soft = alignment.soft_alignment(distance, scorer, lam) if lam > 0 else hard
    scores = [alignment.alignment_distance(distance, scorer, value) for value in (lam, 0)]
    return distance, hard, soft, scores


def alignment_maps(query: np.ndarray, support: np.ndarray, *, lam: float = 0.1, scorer: str = "tam") -> dict:
    """Query `[Tq, D]` and support `[Ts, D]` frame features -> {"distance", "path", "soft"} float `[Tq, Ts]`
    (Eq. 1 distances, the 0/1 hard path, the expected alignment at `lam`) and the soft and hard video
    distances {"soft_distance", "hard_distance"}."""
    distance, path, soft, (soft_distance, hard_distance) = _maps(
        np.asarray(query, np.float32), np.asarray(support, np.float32), float(lam), scorer
    )
    return {"distance": np.asarray(distance), "path": np.asarray(path), "soft": np.asarray(soft),
            "soft_distance": float(soft_distance), "hard_distance": float(hard_distance)}


def _canvas_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _strip(frames: np.ndarray, axis: int) -> np.ndarray:
    """uint8 `[T, h, w, 3]` -> one image with the frames side by side (axis 1) or stacked (axis 0)."""
    return np.concatenate(list(frames), axis=axis)


class _Inches:
    """Places axes on a figure by position and size in inches (from the bottom left)."""

    def __init__(self, figure):
        self.figure = figure
        self.width, self.height = figure.get_size_inches()

    def axes(self, x: float, y: float, w: float, h: float, **kwargs):
        return self.figure.add_axes((x / self.width, y / self.height, w / self.width, h / self.height),
                                    **kwargs)


# Panel geometry in inches, around a heatmap of `cell`-inch square cells.
_PAD = 0.05  # between the thumbnails and the heatmap
_BAR = (0.12, 0.14)  # colour bar: gap, width
_PANEL_LEFT = 0.55  # query-frame label and ticks
_PANEL_RIGHT = 0.75  # colour bar ticks and label
_BOTTOM = 0.55  # support-frame ticks and label
_TOP = 0.95  # panel titles and the figure title


def _matrix_panel(place: _Inches, x0: float, y0: float, cell: float, matrix, frames_q, frames_s, *, cmap,
                  title, colorbar_label, path, numbers: bool):
    """A heatmap `[Tq, Ts]` with its bottom left corner at (x0 + room for the query frames, y0) inches:
    support frames above, query frames to the left, a colour bar to the right, the hard path as squares."""
    tq, ts = matrix.shape
    left = place.axes(x0, y0, cell, tq * cell)
    x = x0 + cell + _PAD
    ax = place.axes(x, y0, ts * cell, tq * cell)
    top = place.axes(x, y0 + tq * cell + _PAD, ts * cell, cell)
    bar = place.axes(x + ts * cell + _BAR[0], y0, _BAR[1], tq * cell)
    image = ax.imshow(matrix, cmap=cmap, interpolation="nearest", aspect="auto")
    top.imshow(_strip(frames_s, 1), extent=(-0.5, ts - 0.5, 0, 1), aspect="auto")
    left.imshow(_strip(frames_q, 0), extent=(0, 1, tq - 0.5, -0.5), aspect="auto")
    for boundary in np.arange(1, ts) - 0.5:
        top.axvline(boundary, color="white", lw=1)
    for boundary in np.arange(1, tq) - 0.5:
        left.axhline(boundary, color="white", lw=1)
    top.set_title(title, fontsize=10, pad=5)
    top.set_axis_off()
    left.set_xticks([])
    left.set_yticks(range(tq), [str(i + 1) for i in range(tq)])
    left.tick_params(labelsize=8, length=2)
    left.set_ylabel("query frame", fontsize=9)
    ax.set_yticks([])
    ax.set_xticks(range(ts), [str(j + 1) for j in range(ts)])
    ax.tick_params(labelsize=8, length=2)
    ax.set_xlabel("support frame", fontsize=9)
    place.figure.colorbar(image, cax=bar).set_label(colorbar_label, fontsize=8)
    bar.tick_params(labelsize=7)
    rows, cols = np.nonzero(path)
    side = cell * 72 * 0.86  # points
    ax.scatter(cols, rows, s=side**2, marker="s", facecolors="none", edgecolors="#e31a1c", linewidths=2,
               gid=PATH_GID, label="hard path", zorder=3)
    if numbers:
        middle = (np.nanmax(matrix) + np.nanmin(matrix)) / 2
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=max(5.0, min(8.0, 14 * cell)),
                    color="white" if value < middle else "black")
    ax.set_xlim(-0.5, ts - 0.5)
    ax.set_ylim(tq - 0.5, -0.5)
    return ax


def plot_alignment(maps: dict, query_frames: np.ndarray, support_frames: np.ndarray, *, lam: float,
                   query_name: str = "query", support_name: str = "support", scorer: str = "tam"):
    """A figure of two panels: frame distances and soft alignment `[Tq, Ts]`, each with the hard path
    (`maps["path"]`, red squares) and uint8 frames `[T, h, w, 3]` along both axes. Returns the Figure."""
    tq, ts = maps["distance"].shape
    name = methods.get(scorer).label
    cell = min(0.6, max(0.25, 4.0 / max(tq, ts)))
    panel = _PANEL_LEFT + cell + _PAD + ts * cell + sum(_BAR) + _PANEL_RIGHT
    width = max(2 * panel, 7.0)
    height = _BOTTOM + tq * cell + _PAD + cell + _TOP
    place = _Inches(_canvas_figure(width, height))
    x0 = (width - 2 * panel) / 2 + _PANEL_LEFT
    _matrix_panel(place, x0, _BOTTOM, cell, maps["distance"], query_frames, support_frames,
                  cmap="viridis", title=f"frame distance (1 - cos) and hard {name} path",
                  colorbar_label="distance", path=maps["path"], numbers=max(tq, ts) <= 12)
    soft_title = f"soft alignment (λ = {lam:g})" if lam > 0 else "alignment (λ = 0, hard)"
    _matrix_panel(place, x0 + panel, _BOTTOM, cell, maps["soft"], query_frames, support_frames,
                  cmap="Blues", title=soft_title, colorbar_label="P(frames matched)", path=maps["path"],
                  numbers=False)
    scores = f"{name} distance {maps['hard_distance']:.3f} (hard)"
    if lam > 0:
        scores = f"{name} distance {maps['soft_distance']:.3f} (λ = {lam:g}),  " + scores.split(" ", 2)[2]
    place.figure.suptitle(f"query: {query_name}    support: {support_name}\n{scores}", fontsize=10,
                          y=1 - 0.06 / height, va="top")
    return place.figure


def _short_name(path: str | os.PathLike) -> str:
    """The last two parts of a path ("class/clip"), for titles."""
    parts = Path(path).parts
    return "/".join(parts[-2:])


def pair_figure(checkpoint, query_path: str, support_path: str, *, lam: float | None = None,
                scorer: str = "tam"):
    """Read, embed and align two clips with a loaded checkpoint -> (Figure, maps with the paths added).

    Raises VideoError (from tam_jax.data.report) naming an unreadable clip.
    """
    from tam_jax.data.clips import read_clips
    from tam_jax.data.pipeline import clip_spec
    from tam_jax.data.report import ClipError, VideoError

    lam = float(checkpoint.config.alignment.lam if lam is None else lam)
    clips = [clip for _, clip in read_clips([query_path, support_path], clip_spec(checkpoint.config))]
    for clip in clips:
        if isinstance(clip, ClipError):
            raise VideoError(clip.path, clip.error)
    query, support = checkpoint.embed(np.stack(clips))
    maps = alignment_maps(query, support, lam=lam, scorer=scorer)
    figure = plot_alignment(maps, clips[0], clips[1], lam=lam, query_name=_short_name(query_path),
                            support_name=_short_name(support_path), scorer=scorer)
    record = {"query": str(query_path), "support": str(support_path), "checkpoint": str(checkpoint.directory),
              "checkpoint_step": int(checkpoint.step), "scorer": scorer, "lam": lam,
              **{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in maps.items()}}
    return figure, record


# ----------------------------------------------------------------------------------------------------
# Sensitivity to lambda.

class ResultsError(UserError, ValueError):
    """A `--results` file that is not records written by `visualize lambda`; names the file."""


_CSV_FIELDS = ("lam", "scorer", "way", "shot", "split", "episodes", "accuracy", "ci95", "checkpoint_step")


def lambda_sweep(checkpoint, lams: Sequence[float], *, shots: Sequence[int] = (), episodes: int | None = None,
                 split: str | None = None, scorer: str = "tam", show_progress: bool = True) -> list[dict]:
    """Accuracy at each lambda: embed the split once, then the same `episodes` episodes per lambda and shot.

    Defaults come from the checkpoint's config (eval.split, eval.shots or fewshot.shot, eval.num_episodes,
    the evaluation seed). Returns records {lam, scorer, way, shot, split, episodes, accuracy, ci95,
    checkpoint_step}, accuracies as fractions.
    """
    from tam_jax import evaluate
    from tam_jax.data.report import SkipReport

    report = SkipReport()
    evaluator = evaluate.FewShotEvaluator.for_test(
        checkpoint.config, checkpoint.mesh, checkpoint.model, report, split=split, shots=shots,
        num_episodes=episodes, show_progress=show_progress,
    )
    embedded = evaluator.embed(checkpoint.state)
    records = []
    for lam in progress.track(lams, len(lams), "lambda", "value", enabled=show_progress):
        method = methods.build(scorer, checkpoint.config).with_lam(lam)
        for record in evaluator.score(embedded, scorers=(method,), show_progress=False):
            records.append({"lam": float(lam), **record, "checkpoint_step": int(checkpoint.step)})
    if len(report):
        _log.warning("%s", report.summary())
    return records


def read_sweep(path: str | os.PathLike) -> list[dict]:
    """Records written by `write_sweep` (a JSON list, or {"records": [...]}); each needs "lam" and
    "accuracy" (a fraction), and may give "ci95", "shot", "way", "scorer", "split", "episodes"."""
    not_results = f"{path} is not a results JSON written by `visualize lambda` (its --out .json)"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{not_results}: {e}.") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list) or not records:
        raise ResultsError(f"{not_results}: expected a non-empty list of records with 'lam' and 'accuracy'.")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "lam" not in record or "accuracy" not in record:
            raise ResultsError(f"{path}: record {i} has no 'lam' and 'accuracy' ({record!r}).")
    return records


def save_figure(figure, path: Path) -> None:
    """Save a figure atomically, in the format its suffix names."""
    with atomic_write(path, "wb") as f:
        figure.savefig(f, dpi=_DPI, format=path.suffix.lstrip(".") or "png")


def write_sweep(records: Sequence[dict], json_path: str | os.PathLike, csv_path: str | os.PathLike) -> None:
    """The sweep's records as JSON and CSV, each written atomically."""
    write_text(json_path, json.dumps(list(records), indent=2) + "\n")
    with atomic_write(csv_path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot_lambda(records: Sequence[dict]):
    """Accuracy (%) with 95% intervals against lambda (log axis), one series per (scorer, way, shot);
    lambda = 0 (the hard minimum) is a dashed line with its interval as a band. Returns the Figure."""
    figure = _canvas_figure(6.4, 4.2)
    ax = figure.add_axes((0.12, 0.14, 0.84, 0.74))
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record.get("scorer", "tam"), record.get("way"), record.get("shot"))
        groups.setdefault(key, []).append(record)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    positive = sorted({float(r["lam"]) for r in records if float(r["lam"]) > 0})
    for index, key in enumerate(sorted(groups, key=str)):
        group, (scorer, way, shot) = groups[key], key
        colour = colours[index % len(colours)]
        name = " ".join(filter(None, (scorer.upper(), way and f"{way}-way", shot and f"{shot}-shot")))
        soft = sorted((r for r in group if float(r["lam"]) > 0), key=lambda r: float(r["lam"]))
        hard = [r for r in group if float(r["lam"]) == 0]
        if soft:
            x = [float(r["lam"]) for r in soft]
            y = [100 * float(r["accuracy"]) for r in soft]
            error = [100 * float(r.get("ci95", math.nan)) for r in soft]
            ax.errorbar(x, y, yerr=error, color=colour, marker="o", ms=5, capsize=3, lw=1.5, label=name)
        for r in hard:
            y, error = 100 * float(r["accuracy"]), 100 * float(r.get("ci95", math.nan))
            ax.axhline(y, color=colour, ls="--", lw=1.2, label=f"{name}, λ = 0 (hard)")
            if math.isfinite(error):
                ax.axhspan(y - error, y + error, color=colour, alpha=0.12, lw=0)
    ax.set_xscale("log")
    if positive:
        ax.set_xlim(positive[0] / 1.8, positive[-1] * 1.8)
        ax.set_xticks(positive, [f"{v:g}" for v in positive])
        ax.minorticks_off()
    ax.set_xlabel("λ (soft-min temperature, Eq. 6), log scale")
    ax.set_ylabel("accuracy (%), mean ± 95% CI")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    first = records[0]
    details = ", ".join(str(p) for p in (first.get("split") and f"{first['split']} split",
                                          first.get("episodes") and f"{first['episodes']} episodes",
                                          "checkpoint step " + str(first["checkpoint_step"])
                                          if "checkpoint_step" in first else None) if p)
    ax.set_title(f"Sensitivity of TAM to λ{' (' + details + ')' if details else ''}", fontsize=10)
    return figure


# ----------------------------------------------------------------------------------------------------
# Command line.


def aligning_methods() -> tuple[str, ...]:
    """The registered methods whose alignment path can be drawn (`aligns`: TAM and plain DTW)."""
    return tuple(name for name in methods.names() if methods.get(name).aligns)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tam_jax.visualize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pair = commands.add_parser("pair", help="alignment of one query and one support clip (Fig. 3-4)")
    pair.add_argument("--checkpoint", required=True, help="training workdir or WORKDIR/checkpoints/<step>")
    pair.add_argument("--query", required=True, help="video file or frame folder")
    pair.add_argument("--support", required=True, help="video file or frame folder")
    pair.add_argument("--out", required=True, help="PNG to write (the numbers go beside it as .json)")
    pair.add_argument("--lam", type=cli.lam_value,
                      help="soft-alignment temperature (default: the checkpoint's)")
    pair.add_argument("--scorer", choices=aligning_methods(), default="tam")
    sweep = commands.add_parser("lambda", help="accuracy against lambda (Fig. 5)")
    source = sweep.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="evaluate this training workdir or checkpoint")
    source.add_argument("--results", help="plot records written by an earlier run (its .json)")
    sweep.add_argument("--out", required=True, help="PNG to write (records go beside it as .json, .csv)")
    sweep.add_argument("--lams", type=cli.comma_separated(cli.lam_value, "numbers >= 0"),
                       default=[0, 0.01, 0.05, 0.1, 0.5, 1.0],
                       help="comma-separated lambdas (default 0,0.01,0.05,0.1,0.5,1)")
    sweep.add_argument("--shots", type=cli.comma_separated(cli.int_at_least(1), "integers >= 1"), default=[],
                       help="comma-separated shots (default: config's)")
    sweep.add_argument("--episodes", type=cli.int_at_least(1),
                       help="episodes per point (default: config eval.num_episodes)")
    sweep.add_argument("--split", help="split to evaluate (default: config eval.split)")
    sweep.add_argument("--scorer", choices=aligning_methods(), default="tam")
    for command in (pair, sweep):
        command.add_argument("--devices", type=cli.int_at_least(0, "0: all"), default=1,
                             help="devices to embed on (0: all)")
        command.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    """Do what `args` say; returns the files written."""
    from tam_jax.inference import load_trained_model

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.command == "pair":
        checkpoint = load_trained_model(args.checkpoint, num_devices=args.devices)
        figure, record = pair_figure(checkpoint, args.query, args.support, lam=args.lam, scorer=args.scorer)
        save_figure(figure, out)
        write_text(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
        return [out, out.with_suffix(".json")]
    if args.results:
        records = read_sweep(args.results)
    else:
        checkpoint = load_trained_model(args.checkpoint, num_devices=args.devices)
        records = lambda_sweep(checkpoint, args.lams, shots=args.shots, episodes=args.episodes,
                               split=args.split, scorer=args.scorer, show_progress=not args.no_progress)
    save_figure(plot_lambda(records), out)
    written = [out]
    if not args.results or Path(args.results).resolve() != out.with_suffix(".json").resolve():
        write_sweep(records, out.with_suffix(".json"), out.with_suffix(".csv"))
        written += [out.with_suffix(".json"), out.with_suffix(".csv")]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 when the files are written; 1 with one `error:` line for a bad input (see errors)."""
    args = parse_args(argv)
    from tam_jax import log_setup

    log_setup.setup()  # tam_jax's INFO messages on stderr; Orbax's INFO dropped

    def body() -> int:
        with progress.hidden(args.no_progress):
            written = run(args)
        for path in written:  # the command's result, on stdout
            print(f"wrote {path}")
        return 0

    return errors.run_command(body, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
