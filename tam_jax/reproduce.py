"""Reproduce the paper's comparisons: Table 1 (TSN++, CMN++, TRN++, TAM, plus TRX) and Table 2 (alignment
scorers). A table's rows are the registered methods (`tam_jax.methods`) that name it in `tables`.

    python -m tam_jax.reproduce --config=configs/demo.py --workdir=runs/tables --table=1
    python -m tam_jax.reproduce --config=configs/kinetics.py --workdir=runs/kinetics --table=2 \\
        --config.data.root=FRAMES_DIR --config.data.split_dir=SPLIT_LIST_DIR

Table 1 trains one run per method and shot, in `DIR/<scorer>_<shot>shot`, and scores each with its own
method (a method's `episodes_per_step`, TRX's 16, sets its runs' episodes per step). Table 2 has two
readings. By default it trains one TAM run per shot (the same `DIR/tam_<shot>shot` as Table 1's) and
scores it with every alignment scorer from the same embeddings: how much each scorer gets out of TAM's
features (`DIR/table2.md`). With `--train-each` it trains one run per scorer and shot,
like Table 1, each scored with the scorer it was trained with: the paper's rows read this way
(`DIR/table2_train_each.md`). Runs use `tam_jax.train.train` (a run already in DIR resumes, a finished one
is left alone, one trained with another config is an error naming the keys) and
`tam_jax.eval_workdir.evaluate_workdir` (records already in the run's `results.json` for the same checkpoint
and episode count are reused). Our accuracy is in percent with its 95% interval, beside the published
number where one is published (Kinetics-100, Something-Something-V2 full, UCF101, HMDB51; from
`config.data.tfds_name` or `--paper`); Table 1 then also lists the rows the paper quotes from CMN's paper
(Matching Net, MAML, CMN), which are not trained here. `--shots` and `--scorers` narrow the table; every
`--config.a.b=value` override applies to every run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from tam_jax import errors, methods
from tam_jax.configuration import PLAN_AUTO, csv_values
from tam_jax.errors import FlagError, UserError
from tam_jax.files import atomic_write, write_text

# The datasets with published numbers: key -> name. A method's published accuracies are its `published`
# (`tam_jax.methods`); SSv2 "full" is the OTAM split, UCF101 and HMDB51 the ARN splits.
DATASETS = {"kinetics": "Kinetics-100", "ssv2_full": "Something-Something-V2 full (the OTAM split)",
            "ucf101": "UCF101 (the ARN split)", "hmdb51": "HMDB51 (the ARN split)"}
# Table 1's rows that the paper copies from CMN's paper (Zhu & Yang, ECCV 2018): printed, never trained.
# {row: (label, {dataset: (1-shot, 5-shot)})}
QUOTED = {
    "matching_net": ("Matching Net", {"kinetics": (53.3, 74.6), "ssv2_full": (None, None)}),
    "maml": ("MAML", {"kinetics": (54.2, 75.3), "ssv2_full": (None, None)}),
    "cmn_paper": ("CMN", {"kinetics": (60.5, 78.9), "ssv2_full": (None, None)}),
}
QUOTED_NOTE = ("Matching Net, MAML and CMN are quoted in Cao et al.'s Table 1 from CMN's paper and not "
               "trained here.")
# config.data.tfds_name -> DATASETS key (the dataset configs set it even when reading frame folders).
DATASET_OF_TFDS_NAME = {"kinetics100_fewshot": "kinetics", "ssv2_fewshot/full": "ssv2_full"}


class RunMismatchError(UserError, ValueError):
    """A run in the workdir trained with another config; names the keys and what to do."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table entry: a scorer's accuracy at one shot, from one run."""

    scorer: str
    shot: int
    accuracy: float  # fraction
    ci95: float  # half-width of the 95% interval, fraction
    episodes: int
    checkpoint_step: int
    workdir: str


def dataset_key(config: ml_collections.ConfigDict, paper: str = "auto") -> str | None:
    """Which published dataset the numbers compare with: `paper` ("kinetics", "ssv2_full", "none") or, for
    "auto", the one `config.data.tfds_name` names (None: no published numbers)."""
    if paper == "auto":
        return DATASET_OF_TFDS_NAME.get(config.data.tfds_name)
    if paper == "none":
        return None
    if paper not in DATASETS:
        raise FlagError(f"--paper={paper}: not one of auto, none, {', '.join(DATASETS)}.")
    return paper


def run_config(base: ml_collections.ConfigDict, scorer: str, shot: int, scorers) -> ml_collections.ConfigDict:
    """`base` set up to train `scorer` at `shot` and evaluate `scorers` at that shot."""
    config = base.copy_and_resolve_references()
    config.fewshot.scorer = scorer
    config.alignment.bidirectional = base.alignment.bidirectional and scorer == "tam"
    config.fewshot.shot = shot
    config.eval.shots = ""
    config.eval.scorers = ",".join(s for s in scorers if not methods.get(s).learned or s == scorer)
    if methods.get(scorer).episodes_per_step:  # the method's paper averages gradients over this many
        config.train.episodes_per_step = methods.get(scorer).episodes_per_step
    return config


# Config keys that do not change what a run learns; every other key of these sections must match the
# `config.json` of a run that is resumed or reused (num_steps may grow: the run then trains on).
_TRAINING_SECTIONS = ("seed", "data", "model", "fewshot", "alignment", "methods", "train")
_FREE_KEYS = {
    "data.num_workers", "data.num_threads", "data.prefetch", "train.num_steps", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.val_every_steps", "train.val_episodes",
    "train.memory_limit_gib",
}


def _scale(config: ml_collections.ConfigDict, mode: str) -> float | str:
    """The logit scale `mode` gives config's scorer (the mode itself when it is not a known one)."""
    if mode not in methods.LOGIT_SCALES:
        return mode
    return methods.logit_scale(config.fewshot.scorer, config.data.num_frames, mode)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_training(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raise a ValueError naming the keys when the run in `workdir` was trained with another config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    from tam_jax.checkpoints import read_config

    saved = _flatten(json.loads(read_config(workdir).to_json_best_effort()))
    now = _flatten(json.loads(config.to_json_best_effort()))
    sections = set(_TRAINING_SECTIONS)
    own = f"methods.{config.fewshot.scorer}."  # only the run's own method's options change what it learns
    if _scale(config, saved["fewshot.logit_scale"]) == _scale(config, config.fewshot.logit_scale):
        saved["fewshot.logit_scale"] = config.fewshot.logit_scale  # another name, the same training
    differ = sorted(
        k for k in now.keys() & saved.keys()
        if k.split(".")[0] in sections and k not in _FREE_KEYS and now[k] != saved[k]
        and (not k.startswith("methods.") or k.startswith(own))
        and now[k] != PLAN_AUTO.get(k)  # left to the plan: the run's stored plan is reused (tam_jax.plan)
    )
    if differ:
        changes = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in differ)
        raise RunMismatchError(
            f"The run in {workdir} was trained with {changes}. Use another --workdir for the new config, "
            "or delete that run folder to retrain it."
        )


def _checkpoint_steps(workdir: str, which: str) -> tuple[int | None, int | None]:
    """(latest step, the step `eval_workdir.evaluate_workdir` restores for `eval.checkpoint=which`)."""
    from tam_jax.checkpoints import CheckpointManager

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None, None
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        return manager.latest_step(), manager.step_to_restore(which)
    finally:
        manager.close()


def _saved_records(config, workdir: str, scorers, step: int) -> dict[str, dict] | None:
    """`results.json` records of every scorer for this run's split, way, shot, episodes and checkpoint."""
    path = os.path.join(workdir, "results.json")
    if jax.process_count() > 1 or not os.path.exists(path):  # only process 0 writes results.json
        return None
    with open(path) as f:
        saved = json.load(f)
    wanted = dict(split=config.eval.split, way=config.fewshot.way, shot=config.fewshot.shot,
                  episodes=config.eval.num_episodes, checkpoint_step=step)
    found = {r["scorer"]: r for r in saved if all(r.get(k) == v for k, v in wanted.items())}
    return found if all(s in found for s in scorers) else None


def train_and_score(config: ml_collections.ConfigDict, workdir: str, scorers) -> dict[str, Cell]:
    """Train (or resume, or skip when finished) the run in `workdir`, then evaluate `scorers` (or reuse the
    saved records of the same checkpoint). Returns scorer -> Cell."""
    from tam_jax import eval_workdir, train

    check_same_training(config, workdir)
    latest, _ = _checkpoint_steps(workdir, config.eval.checkpoint)
    if latest is None or latest < config.train.num_steps:
        train.train(config, workdir)
    _, step = _checkpoint_steps(workdir, config.eval.checkpoint)
    records = _saved_records(config, workdir, scorers, step)
    if records is None:
        records = {r["scorer"]: r for r in eval_workdir.evaluate_workdir(config, workdir)}
    return {
        s: Cell(s, records[s]["shot"], records[s]["accuracy"], records[s]["ci95"], records[s]["episodes"],
                records[s]["checkpoint_step"], workdir)
        for s in scorers
    }


def table_rows(table: int, scorers=()) -> tuple[tuple[str, str], ...]:
    """(method, label) rows of Table `table`: the registered methods that are its rows (`tables`), in
    the paper's order, restricted to `scorers` when given."""
    members = [methods.get(name) for name in methods.names()]
    rows = tuple((m.name, m.label) for m in sorted((m for m in members if table in m.tables),
                                                  key=lambda m: m.tables[table]))
    unknown = [m for m in scorers if m not in {s for s, _ in rows}]
    if unknown:
        raise FlagError(f"--scorers={','.join(scorers)}: {', '.join(unknown)} "
                        f"{'is not a row' if len(unknown) == 1 else 'are not rows'} of Table {table}; "
                        f"choose from {', '.join(s for s, _ in rows)}.")
    return tuple(r for r in rows if not scorers or r[0] in scorers)


def reproduce(base: ml_collections.ConfigDict, workdir: str, *, table: int, shots=(1, 5), scorers=(),
              paper: str = "auto", train_each: bool = False) -> dict[tuple[str, int], Cell]:
    """Train and evaluate every run Table `table` needs, write its table to `workdir` (`table_name`) as
    `.md` and `.csv`, and return (scorer, shot) -> Cell.

    `train_each` (Table 2 only): one run per scorer, scored with its own scorer, instead of every scorer on
    the features of one TAM run.
    """
    from tam_jax import hosts

    if train_each and table != 2:
        raise FlagError(
            f"--train-each applies to --table=2 (Table 1 always trains each scorer), got --table={table}."
        )
    rows = table_rows(table, scorers)
    cells = {}
    for shot in shots:
        if table == 1 or train_each:
            for scorer, _ in rows:
                run_dir = os.path.join(workdir, f"{scorer}_{shot}shot")
                config = run_config(base, scorer, shot, (scorer,))
                cells[(scorer, shot)] = train_and_score(config, run_dir, (scorer,))[scorer]
        else:
            row_scorers = tuple(s for s, _ in rows)
            config = run_config(base, "tam", shot, row_scorers)
            run = train_and_score(config, os.path.join(workdir, f"tam_{shot}shot"), row_scorers)
            cells.update({(scorer, shot): cell for scorer, cell in run.items()})
    if hosts.is_chief():
        key = dataset_key(base, paper)
        write_table(workdir, table, rows, shots, cells, key, train_each=train_each)
        print(format_markdown(table, rows, shots, cells, key, train_each=train_each))
    return cells


def table_name(table: int, train_each: bool = False) -> str:
    """The file stem of a table: `table1`, `table2` (one TAM run) or `table2_train_each`."""
    return f"table{table}" + ("_train_each" if train_each else "")


def _all_rows(table: int, rows, key: str | None):
    """(row id, label, trained here) of the table: Table 1 starts with the quoted rows that have numbers
    on the dataset."""
    quoted = tuple((r, label, False) for r, (label, numbers) in QUOTED.items()
                   if table == 1 and key in numbers)
    return quoted + tuple((r, label, True) for r, label in rows)


def _published(key: str | None, row: str, shot: int) -> float | None:
    """The published accuracy (%) of `row` (a method or a quoted row) on dataset `key` at `shot`."""
    if key is None or shot not in (1, 5):
        return None
    numbers = QUOTED[row][1] if row in QUOTED else methods.get(row).published
    pair = numbers.get(key)
    return None if pair is None else pair[0 if shot == 1 else 1]


def published_note(table: int, rows, key: str) -> str:
    """Where the published column comes from: each trained row's citation, and the quoted rows."""
    sources = dict.fromkeys(methods.get(r).citation for r, _ in rows if methods.get(r).published.get(key))
    note = f"Published numbers on {DATASETS[key]}: " + "; ".join(filter(None, sources)) + " (- where none)."
    return note + (f" {QUOTED_NOTE}" if any(key in n for _, n in QUOTED.values()) and table == 1 else "")


def _percent(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}"


def _published_text(key: str, row: str, shot: int) -> str:
    published = _published(key, row, shot)
    return "-" if published is None else f"{published:.1f}"


def format_markdown(
    table: int, rows, shots, cells: dict, key: str | None, *, train_each: bool = False
) -> str:
    """The table laid out like the paper's: one row per scorer, per shot our accuracy ± 95% interval
    (percent) and, for the paper's datasets, the published number (Table 1 adds the quoted-only rows)."""
    some = next(iter(cells.values()))
    if table == 1:
        what = "scorers"
    elif train_each:
        what = "scorers, each trained with its own scorer"
    else:
        what = "scorers on the same TAM-trained features"
    lines = [f"# Table {table}: 5-way few-shot accuracy (%) of the {what}", ""]
    lines.append(f"Ours: mean ± 95% interval over {some.episodes} test episodes per cell (runs in "
                 f"`{os.path.dirname(some.workdir)}`).")
    header = ["scorer"]
    for shot in shots:
        header += [f"{shot}-shot"] + ([f"{shot}-shot (paper)"] if key else [])
    if key:
        lines.append(published_note(table, rows, key))
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row_id, label, trained in _all_rows(table, rows, key):
        row = [label if trained else f"{label} (quoted)"]
        for shot in shots:
            if trained:
                cell = cells[(row_id, shot)]
                row.append(f"{_percent(cell.accuracy)} ± {_percent(cell.ci95)}")
            else:
                row.append("not trained")
            if key:
                row.append(_published_text(key, row_id, shot))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_table(workdir: str, table: int, rows, shots, cells: dict, key: str | None, *,
                train_each: bool = False) -> None:
    """`workdir/<table_name>.md` and `.csv` (percent; our columns blank on the quoted rows, paper columns
    blank where nothing is published)."""
    name = table_name(table, train_each)
    write_text(os.path.join(workdir, f"{name}.md"), format_markdown(table, rows, shots, cells, key,
                                                                     train_each=train_each))
    with atomic_write(os.path.join(workdir, f"{name}.csv"), newline="") as f:
        writer = csv.writer(f)
        header = ["scorer", "scorer"]
        for shot in shots:
            header += [f"{shot}-shot", f"{shot}-shot ci95", f"{shot}-shot paper"]
        writer.writerow(header + ["episodes"])
        for row_id, label, trained in _all_rows(table, rows, key):
            row = [label, row_id if trained else ""]
            for shot in shots:
                published = _published(key, row_id, shot)
                published = "" if published is None else f"{published:.1f}"
                if trained:
                    cell = cells[(row_id, shot)]
                    row += [_percent(cell.accuracy, 2), _percent(cell.ci95, 2), published]
                else:
                    row += ["", "", published]
            writer.writerow(row + [cells[(row_id, shots[0])].episodes if trained else ""])


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the runs (one sub-folder each) and the tables.")
_TABLE = flags.DEFINE_enum("table", None, ["1", "2"],
                           "1: TSN++, CMN++, TRN++, TAM, TRX; 2: scorers of TAM runs.")
_SHOTS = flags.DEFINE_string("shots", "1,5", "Comma-separated shots (columns).")
_SCORERS = flags.DEFINE_string("scorers", "", "Comma-separated rows to run (default: all of the table's).")
_TRAIN_EACH = flags.DEFINE_bool(
    "train-each", False, "Table 2 only: train one run per scorer (the paper's reading) instead of scoring "
    "one TAM run's features with every scorer.")
_PAPER = flags.DEFINE_enum("paper", "auto", ["auto", "none", *DATASETS],
                           "Published numbers beside ours: auto (by config.data.tfds_name), none, a dataset.")
flags.mark_flags_as_required(["config", "workdir", "table"])


def parse_shots(text: str) -> tuple[int, ...]:
    """`--shots` ("1,5") -> (1, 5); raises FlagError naming the flag when it is not positive integers."""
    try:
        shots = csv_values(text, int)
    except ValueError:
        shots = ()
    if not shots:
        raise FlagError(f"--shots={text}: expected comma-separated integers, e.g. --shots=1,5")
    if min(shots) < 1:
        raise FlagError(f"--shots={text}: each shot (support clips per class) must be >= 1, e.g. --shots=1,5")
    return shots


def main(argv) -> None:
    """Exit status 0, or 1 with one `error:` line for a bad flag, config or run folder (see errors)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from tam_jax import log_setup

    log_setup.setup()  # tam_jax's INFO messages on stderr; Orbax's and grain's INFO dropped

    def body() -> None:
        from tam_jax import hosts

        table, shots, scorers = int(_TABLE.value), parse_shots(_SHOTS.value), csv_values(_SCORERS.value)
        table_rows(table, scorers)  # a bad --scorers fails before any compute
        hosts.initialize("auto")
        reproduce(_CONFIG.value, _WORKDIR.value, table=table, shots=shots, scorers=scorers,
                  paper=_PAPER.value, train_each=_TRAIN_EACH.value)

    sys.exit(errors.run_command(body))


if __name__ == "__main__":
    from tam_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
