"""The execution plan of a training run, chosen at start from the machine it runs on.

A plan is how a train step is executed, never what it computes: the devices used (`mesh.num_devices`),
the episodes each device embeds at once (`train.episodes_per_device_step`, hence the micro-batches),
`train.embed_chunks` and `model.remat`. Each key is automatic by default (0, or "auto" for remat); a value
set in the config is kept and checked.

The rule: the fastest plan that fits. Candidates (`candidates`) go in order of cost: all of a device's
episodes at once, no chunks, no remat; then more micro-batches; then chunks; then remat; then both. Each is
compiled on the real backend from abstract inputs (nothing is read or materialised), its
`memory_analysis()` is read, and the first that fits `margin` x the limit is taken; the run then trains with
that compiled step, so nothing is compiled twice. The limit is what the device reports, capped by
`train.memory_limit_gib` (for shared GPUs, and for planning a card you do not have). A backend that reports
no limit (the CPU) and no budget takes the fastest candidate, compiled by the first step.

Loops (micro-batches, chunks) are unrolled on XLA:CPU, where a convolution inside a loop runs about ten
times slower (benchmarks/cpu_loops.py), unless a memory budget is set: then the plan is the one a GPU would
run, loops and all.

A training run stores its plan in `WORKDIR/plan.json`; resuming uses it (so resume stays bit-exact: the
micro-batches decide BatchNorm's statistics), and stops with what to do when it does not fit the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from tam_jax import frame_chunks, hosts, models
from tam_jax.configuration import PLAN_AUTO
from tam_jax.errors import UserError
from tam_jax.files import write_text
from tam_jax.train_state import create_train_state, make_optimizer

GIB = 2**30
# XLA's own estimate leaves out allocator fragmentation and the runtime's workspace (cuDNN): a plan must fit
# this share of the limit.
MARGIN = 0.95
PLAN_FILE = "plan.json"


class PlanError(UserError, ValueError):
    """No plan can run this config on this machine; the message names the keys and values that work."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled step (XLA's buffer assignment)."""

    argument: int  # the state and the batch
    output: int  # the new state and the metrics
    temp: int  # activations, gradients and everything else live during the step
    alias: int  # outputs written over donated arguments (the state), counted in both of the above

    @property
    def total(self) -> int:
        """What the step holds at its peak, at most: arguments + outputs + temporaries - aliased."""
        return self.argument + self.output + self.temp - self.alias

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run's train step executes; `step_bytes` and `limit_bytes` are None where not known."""

    num_devices: int
    episodes_per_device_step: int
    embed_chunks: int
    remat: str
    micro_batches: int  # train.episodes_per_step / (num_devices * episodes_per_device_step)
    unroll_loops: bool  # loops (micro-batches, chunks) written out: XLA:CPU without a memory budget
    step_bytes: int | None = None  # XLA's total per device of the compiled step
    limit_bytes: int | None = None  # the memory it had to fit in (before the margin)

    def settings(self) -> dict:
        """{config key: value} of the four planned keys."""
        return {"mesh.num_devices": self.num_devices,
                "train.episodes_per_device_step": self.episodes_per_device_step,
                "train.embed_chunks": self.embed_chunks, "model.remat": self.remat}

    def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """A copy of `config` with the plan's values in place of automatic ones."""
        return with_overrides(config, self.settings())

    def line(self) -> str:
        """`plan: --config.k=v ...; X GiB per device of Y GiB usable`: overrides a user can paste."""
        overrides = " ".join(f"--config.{key}={value}" for key, value in self.settings().items())
        if self.limit_bytes is None:
            memory = ("memory not planned (the backend reports no limit; set train.memory_limit_gib to plan "
                      "one)")
        else:
            memory = (f"{self.step_bytes / GIB:.3g} GiB per device of {MARGIN * self.limit_bytes / GIB:.3g} "
                      f"GiB usable ({self.limit_bytes / GIB:.3g} GiB limit)")
        has_loops = self.micro_batches > 1 or self.embed_chunks > 1
        loops = f", loops {'unrolled' if self.unroll_loops else 'kept'}" if has_loops else ""
        return f"plan: {overrides}; {memory}{loops}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls(**json.loads(text))


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with {"section.key": value} overrides applied."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def is_auto(config: ml_collections.ConfigDict, key: str) -> bool:
    section, name = key.split(".")
    return config[section][name] == PLAN_AUTO[key]


def _listed(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------------------------------
# What can run: devices, then the ladder of settings.


def choose_num_devices(config: ml_collections.ConfigDict, visible: int,
                       processes: int = 1) -> tuple[int, str]:
    """(devices to train on, a note for the log or ""): a step's episodes are split evenly over devices.

    Automatic (`mesh.num_devices=0`): every device when `train.episodes_per_step` divides over them, else
    (one process) the most that it divides over. Raises PlanError naming values that work otherwise.
    """
    episodes, requested = config.train.episodes_per_step, config.mesh.num_devices
    if requested > visible:
        raise PlanError(f"config.mesh.num_devices={requested} but {visible} devices are visible; set it to "
                        f"{_listed([d for d in _divisors(episodes) if d <= visible])}, or 0 to choose.")
    if processes > 1:
        if requested not in (0, visible):
            raise PlanError(f"config.mesh.num_devices={requested}: with {processes} processes every one of "
                            f"the {visible} devices takes part; set it to 0.")
        if episodes % visible:
            example = visible * max(1, episodes // visible)
            raise PlanError(f"config.train.episodes_per_step={episodes} does not split over the "
                            f"{visible} devices of {processes} processes; set it to a multiple of {visible} "
                            f"(e.g. --config.train.episodes_per_step={example}).")
        return visible, ""
    if requested:
        if episodes % requested:
            raise PlanError(
                f"config.mesh.num_devices={requested} does not divide config.train.episodes_per_step="
                f"{episodes}; set mesh.num_devices to "
                f"{_listed([d for d in _divisors(episodes) if d <= visible])} (or 0 to choose), or "
                f"train.episodes_per_step to a multiple of {requested}.")
        return requested, ""
    devices = max(d for d in _divisors(episodes) if d <= visible)
    note = ""
    if devices < visible:
        note = (f"train.episodes_per_step={episodes} splits evenly over {devices} of the {visible} devices: "
                f"training on {devices} (a multiple of {visible} would use them all).")
    return devices, note


def candidates(config: ml_collections.ConfigDict, num_devices: int) -> list[dict]:
    """Settings {"train.episodes_per_device_step", "train.embed_chunks", "model.remat"} in order of cost,
    the fastest first; keys the config sets are kept in every candidate. Raises PlanError on a set value
    that cannot work (names the values that can).

    The ladder: all of a device's episodes at once; fewer at a time (more micro-batches, same compute);
    then one at a time with an episode's videos in chunks of at most 10, then 5 (`tam_jax.frame_chunks`:
    one more forward pass and a loop); then block remat (one more forward pass); then remat and chunks.
    """
    per_device = config.train.episodes_per_step // num_devices
    fs = config.fewshot
    videos = fs.way * (fs.shot + fs.queries)
    fixed = {key: config[key.split(".")[0]][key.split(".")[1]] for key in PLAN_AUTO
             if key != "mesh.num_devices" and not is_auto(config, key)}
    at_once = fixed.get("train.episodes_per_device_step")
    if at_once is not None and per_device % at_once:
        raise PlanError(
            f"config.train.episodes_per_device_step={at_once} does not divide the {per_device} episodes each "
            f"of {num_devices} devices takes per step (train.episodes_per_step="
            f"{config.train.episodes_per_step}); set it to {_listed(_divisors(per_device))}, or 0 to choose.")
    chunks = fixed.get("train.embed_chunks")
    if chunks is not None and videos % chunks:
        raise PlanError(
            f"config.train.embed_chunks={chunks} does not divide the {videos} videos of a training episode "
            f"(way * (shot + queries)); set it to {_listed(_divisors(videos))}, or 0 to choose.")
    chunked = list(dict.fromkeys(c for c in (frame_chunks.chunks_for(config, n) for n in (10, 5)) if c > 1))
    ladder = [(e, 1, "none") for e in reversed(_divisors(per_device))]
    ladder += [(1, c, "none") for c in chunked] + [(1, 1, "block")] + [(1, c, "block") for c in chunked]
    out = []
    for e, c, r in ladder:
        setting = {"train.episodes_per_device_step": e, "train.embed_chunks": c, "model.remat": r, **fixed}
        if setting not in out:
            out.append(setting)
    return out


# ----------------------------------------------------------------------------------------------------
# Memory: the compiled step's bytes against the device's.


def abstract_batch(config: ml_collections.ConfigDict) -> dict:
    """`jax.ShapeDtypeStruct`s of one step's batch: support uint8 `[E, way*shot, T, S, S, 3]`, query uint8
    `[E, way*queries, T, S, S, 3]`, query_labels int32 `[E, way*queries]`, E = `train.episodes_per_step`."""
    episodes, fs = config.train.episodes_per_step, config.fewshot
    clip = (config.data.num_frames, config.data.image_size, config.data.image_size, 3)
    return {
        "support": jax.ShapeDtypeStruct((episodes, fs.way * fs.shot, *clip), jnp.uint8),
        "query": jax.ShapeDtypeStruct((episodes, fs.way * fs.queries, *clip), jnp.uint8),
        "query_labels": jax.ShapeDtypeStruct((episodes, fs.way * fs.queries), jnp.int32),
    }


def abstract_train_state(config: ml_collections.ConfigDict, model, optimizer, mesh: Mesh):
    """The `TrainState` of `config` as `jax.ShapeDtypeStruct`s: traced, never computed or read from disk
    (`model.init_from` is ignored; the shapes are those of `model.arch`)."""
    config = config.copy_and_resolve_references()
    config.model.init_from = ""
    return jax.eval_shape(lambda: create_train_state(config, model, optimizer, mesh))


def compile_step(config: ml_collections.ConfigDict, mesh: Mesh, *, unroll: bool = False):
    """The train step of `config` (its plan keys set) compiled on `mesh` from abstract inputs:
    (the compiled step, which trains on real arrays of the same shapes, and its StepMemory)."""
    from tam_jax.train_step import make_train_step

    model = models.build_embedder(config.model)
    optimizer = make_optimizer(config)
    state = abstract_train_state(config, model, optimizer, mesh)
    compiled = make_train_step(config, model, optimizer, mesh, unroll=unroll).lower(
        state, abstract_batch(config)).compile()
    analysis = compiled.memory_analysis()
    return compiled, StepMemory(
        argument=int(analysis.argument_size_in_bytes), output=int(analysis.output_size_in_bytes),
        temp=int(analysis.temp_size_in_bytes), alias=int(analysis.alias_size_in_bytes),
    )


def device_memory_limit(device=None) -> int | None:
    """Bytes the backend lets JAX use on `device` (default: the first local one); None where it does not
    say (the CPU backend)."""
    stats = (device or jax.local_devices()[0]).memory_stats()
    return None if not stats else stats.get("bytes_limit")


def memory_limit(config: ml_collections.ConfigDict) -> int | None:
    """The bytes per device a plan may use: the device's limit (the least over processes), capped by
    `train.memory_limit_gib` when that is set; None when neither is known."""
    reported = device_memory_limit()
    if jax.process_count() > 1:
        everyone = hosts.gather(np.array([reported or 0], np.int64))
        reported = int(everyone.min()) or None
    budget = int(config.train.memory_limit_gib * GIB) or None
    known = [b for b in (reported, budget) if b]
    return min(known) if known else None


def no_fit_message(limit: int, tried: list[tuple[dict, int]]) -> str:
    """What a run that fits nowhere prints: the limit, then each setting tried and its GiB per device."""
    rows = "\n".join(f"  {' '.join(f'--config.{k}={v}' for k, v in s.items())}  {b / GIB:.2f} GiB"
                     for s, b in tried)
    return (f"no plan fits in {MARGIN * limit / GIB:.2f} GiB per device ({MARGIN:.0%} of {limit / GIB:.2f} "
            f"GiB); tried, in GiB per device:\n{rows}\nUse more devices, smaller frames (data.image_size), "
            "fewer queries (fewshot.queries) or a larger train.memory_limit_gib.")


# ----------------------------------------------------------------------------------------------------
# The plan.

Measure = Callable[[ml_collections.ConfigDict, Mesh, bool], tuple[object, StepMemory]]


def check_settings(config: ml_collections.ConfigDict) -> None:
    """The plan's checks that need no compile (the device count, set values that must divide): a PlanError
    at start, before any data is read."""
    candidates(config, choose_num_devices(config, jax.device_count(), jax.process_count())[0])


def make_plan(config: ml_collections.ConfigDict, *, workdir: str | None = None, limit: int | None = None,
              measure: Measure | None = None):
    """The plan for `config` on this machine: (Plan, its Mesh, its compiled step or None).

    A workdir that holds a checkpoint and a `plan.json` resumes with the stored plan (values the config
    sets win), checked as a set value is. `limit` (bytes) overrides `memory_limit`, and `measure`
    (`compile_step`'s signature) the compiler: both for tests. Raises PlanError with what to do.
    """
    measure = measure or (lambda c, m, u: compile_step(c, m, unroll=u))
    stored = stored_plan(workdir) if workdir else None
    if stored is not None:
        config = with_overrides(config, {k: v for k, v in stored.settings().items() if is_auto(config, k)})
    try:
        unroll = stored.unroll_loops if stored is not None else None
        return _plan(config, memory_limit(config) if limit is None else limit, measure, unroll)
    except PlanError as e:
        if stored is None:
            raise
        raise PlanError(f"the plan this run was started with ({os.path.join(workdir, PLAN_FILE)}) cannot run "
                        f"here: {e} To resume here anyway, delete that file: the run then goes on with a "
                        "new plan (not bit-exact with an uninterrupted run).") from None


def _plan(config: ml_collections.ConfigDict, limit: int | None, measure: Measure, unroll: bool | None = None):
    num_devices, note = choose_num_devices(config, jax.device_count(), jax.process_count())
    if note:
        from tam_jax.progress import write

        write(note)
    mesh = hosts.make_mesh(num_devices)
    settings = candidates(config, num_devices)
    cpu = mesh.devices.flat[0].platform == "cpu"
    if unroll is None:
        unroll = cpu and not config.train.memory_limit_gib
    def plan(setting, **memory):
        at_once = setting["train.episodes_per_device_step"]
        return Plan(num_devices, at_once, setting["train.embed_chunks"], setting["model.remat"],
                    config.train.episodes_per_step // (num_devices * at_once), unroll, **memory)

    if limit is None:
        return plan(settings[0]), mesh, None
    tried = []
    for setting in settings:
        compiled, memory = measure(with_overrides(config, {**setting, "mesh.num_devices": num_devices}), mesh,
                                   unroll)
        if memory.total <= MARGIN * limit:
            return plan(setting, step_bytes=memory.total, limit_bytes=limit), mesh, compiled
        tried.append((setting, memory.total))
    raise PlanError(no_fit_message(limit, tried))


def stored_plan(workdir: str) -> Plan | None:
    """The plan in `workdir/plan.json` when the workdir also holds a checkpoint to resume, else None."""
    path = os.path.join(workdir, PLAN_FILE)
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isfile(path) or not os.path.isdir(checkpoint_dir):
        return None
    if not any(name.isdigit() for name in os.listdir(checkpoint_dir)):
        return None
    try:
        with open(path) as f:
            return Plan.from_json(f.read())
    except (ValueError, TypeError) as e:
        raise PlanError(f"{path} cannot be read ({e}); delete it to plan anew (the run then goes on with a "
                        "new plan, not bit-exact with an uninterrupted run).") from None


def store_plan(workdir: str, plan: Plan) -> None:
    """Write `workdir/plan.json` (the chief only)."""
    if hosts.is_chief():
        write_text(os.path.join(workdir, PLAN_FILE), plan.to_json())


def plan_command(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`--mode=plan`: the plan a training run in `workdir` would take here (its stored one when it
    resumes), as text whose last line is `Plan.line()`. Reads no data and writes nothing."""
    from tam_jax.config_checks import validate

    validate(config, files=False)
    chosen, mesh, _ = make_plan(config, workdir=workdir)
    stored = stored_plan(workdir) is not None
    kind = mesh.devices.flat[0].device_kind
    return "\n".join([
        f"{jax.device_count()} visible devices ({kind}), {jax.process_count()} process(es); "
        f"{config.train.episodes_per_step} episodes per step in {chosen.micro_batches} micro-batch(es)"
        + (f"; resuming the stored {PLAN_FILE}" if stored else ""),
        chosen.line(),
    ])
