"""`--mode=eval`: evaluate a training workdir's checkpoint (or an imported backbone) and write its results.

Restores the checkpoint `eval.checkpoint` names (best, latest or a step), falling back past a damaged one;
scores every scorer and shot of the test evaluator (`tam_jax.evaluate`); writes `results.json`
(`tam_jax.results`) and prints its table.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from tam_jax import checkpoints, hosts, methods, results
from tam_jax.config_checks import validate
from tam_jax.data.report import SkipReport
from tam_jax.errors import ConfigError
from tam_jax.evaluate import FewShotEvaluator
from tam_jax.workdir_lock import hold_workdir

_log = logging.getLogger(__name__)


def imported_state(config: ml_collections.ConfigDict, model, mesh, workdir: str):
    """The state to evaluate when `workdir` holds no checkpoint: the backbone of `model.init_from` as
    imported (a model trained elsewhere), with nothing trained here."""
    from tam_jax.train_state import create_train_state, make_optimizer

    init_from = config.model.init_from
    if not os.path.isdir(init_from):
        raise FileNotFoundError(
            f"No checkpoint in {workdir}/checkpoints, and config.model.init_from={init_from!r} is not a "
            f"backbone directory: train first (--mode=train --workdir={workdir}), or import one with "
            "`python -m tam_jax.tools.import_weights --src FILE --arch ARCH --out DIR` and pass "
            "--config.model.init_from=DIR."
        )
    if methods.get(config.fewshot.scorer).learned:
        raise ConfigError(
            f"config.fewshot.scorer={config.fewshot.scorer!r} is a learned method whose parameters an "
            "imported "
            f"backbone lacks: train it first (--mode=train --workdir={workdir}), or evaluate with "
            "--config.fewshot.scorer=tam."
        )
    if hosts.is_chief():
        _log.info("No checkpoint in %s: evaluating the backbone config.model.init_from=%s as imported, "
                  "untrained here.", workdir, init_from)
    os.makedirs(workdir, exist_ok=True)
    return create_train_state(config, model, make_optimizer(config), mesh)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Restore the best (or latest, `eval.checkpoint`) checkpoint in `workdir` and evaluate every scorer of
    `eval_scorers` and every shot; write `workdir/results.json`, print the table, return the records.

    Without a checkpoint in `workdir`, evaluates the backbone of `config.model.init_from` as imported
    (`imported_state`); its records then hold "checkpoint_step": 0 and "init_from": that directory. A
    damaged checkpoint is reported and the next good one evaluated. Holds the workdir's lock
    (`tam_jax.workdir_lock`) while it runs."""
    validate(config, training=False)
    with hold_workdir(workdir):
        return _evaluate_workdir(config, workdir)


def _evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    from tam_jax import models
    from tam_jax.train_state import restore_trained

    report = SkipReport()
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    evaluator = FewShotEvaluator.for_test(config, mesh, model, report)  # checks the split can be sampled
    manager = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        steps = manager.fallback_order(config.eval.checkpoint)
        if not steps and not config.model.init_from:
            raise FileNotFoundError(
                f"No checkpoint in {manager.directory}: train first (--mode=train) with --workdir={workdir}, "
                "or set --config.model.init_from=DIR to evaluate an imported backbone as it is."
            )
        if not steps:
            state = imported_state(config, model, mesh, workdir)
        else:  # a damaged checkpoint is reported and the next good one evaluated (never loaded silently)
            restore = lambda s: restore_trained(manager, s, config, mesh)
            state = manager.restore_good(steps, restore, move_aside=False)
    finally:
        manager.close()
    step = int(state.step) if steps else None
    records = evaluator.records(state)
    for record in records:
        record["checkpoint_step"] = int(step or 0)
        if step is None:
            record["init_from"] = os.path.abspath(config.model.init_from)
    if hosts.is_chief():
        results.write_results(os.path.join(workdir, "results.json"), records)
        print(results.format_results(records))
        if len(report):
            _log.warning("%s", report.summary())
    return records
