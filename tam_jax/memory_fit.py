"""Device memory of the compiled train step, and the check that it fits before training starts.

XLA reports, for a compiled program, the bytes of its arguments, outputs and temporaries per device
(`compiled.memory_analysis()`). The train step is compiled here from abstract inputs
(`jax.ShapeDtypeStruct`s and `jax.eval_shape`), so no weights or frames are materialised: this works for
ResNet-50 at 224 pixels on a laptop, and `benchmarks/memory.py` uses it to tabulate settings.

Before training, `check_step_fits` compares the step with the device's memory when the backend reports
it (`memory_stats()["bytes_limit"]` on a GPU; a CPU reports nothing and the check is skipped), and stops
with a message naming settings that fit. On a GPU this compiles the step once more at start-up (about a
minute for ResNet-50); `train.check_memory_fit=False` skips it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from tam_jax import frame_chunks, models
from tam_jax.train_state import create_train_state, make_optimizer

GIB = 2**30
# XLA's own estimate leaves out allocator fragmentation and the runtime's workspace (cuDNN): ask for some
# room below the reported limit.
DEFAULT_MARGIN = 0.95


class StepDoesNotFitError(RuntimeError):
    """The compiled train step needs more device memory than the device has; names settings that fit."""


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


def step_memory(config: ml_collections.ConfigDict, mesh: Mesh) -> StepMemory:
    """Compile the train step of `config` on `mesh` from abstract inputs and read its bytes per device."""
    from tam_jax import train  # train imports this module for the fit check

    model = models.build_embedder(config.model)
    optimizer = make_optimizer(config)
    step = train.make_train_step(config, model, optimizer, mesh)
    state = abstract_train_state(config, model, optimizer, mesh)
    analysis = step.lower(state, abstract_batch(config)).compile().memory_analysis()
    return StepMemory(
        argument=int(analysis.argument_size_in_bytes), output=int(analysis.output_size_in_bytes),
        temp=int(analysis.temp_size_in_bytes), alias=int(analysis.alias_size_in_bytes),
    )


def device_memory_limit(device=None) -> int | None:
    """Bytes the backend lets JAX use on `device` (default: the first local one); None where it does not
    say (the CPU backend)."""
    stats = (device or jax.local_devices()[0]).memory_stats()
    return None if not stats else stats.get("bytes_limit")


def setting_label(overrides: dict) -> str:
    """{"model.remat": "block"} -> "--config.model.remat=block" (command-line overrides, space-separated)."""
    return " ".join(f"--config.{key}={value}" for key, value in overrides.items())


def candidate_settings(config: ml_collections.ConfigDict) -> list[dict]:
    """Settings that need less memory than `config`'s, cheapest in speed first: each a dict of overrides.

    The ladder: one episode per device at a time (same work per episode, more micro-batches), then
    bfloat16 activations, then block rematerialisation (recomputes the forward pass in the backward),
    then both, then an episode's videos embedded in chunks of at most 10, then 5 (`tam_jax.frame_chunks`:
    a chunk at a time in the backward pass; BatchNorm per chunk). Settings `config` already has are not
    repeated.
    """
    current = {
        "train.episodes_per_device_step": config.train.episodes_per_device_step,
        "model.dtype": config.model.dtype,
        "model.remat": config.model.get("remat", "none"),
        "train.embed_chunks": config.train.get("embed_chunks", 1),
    }
    smallest = {"train.episodes_per_device_step": 1, "model.dtype": "bfloat16", "model.remat": "block"}
    ladder = [
        {"train.episodes_per_device_step": 1},
        {"train.episodes_per_device_step": 1, "model.dtype": "bfloat16"},
        {"train.episodes_per_device_step": 1, "model.remat": "block"},
        smallest,
        *({**smallest, "train.embed_chunks": frame_chunks.chunks_for(config, n)} for n in (10, 5)),
    ]
    out = []
    for step in ladder:
        changed = {k: v for k, v in step.items() if current[k] != v}
        if changed and changed not in out:
            out.append(changed)
    return out


def fit_message(needed: int, limit: int | None, alternatives: list[tuple[dict, int]],
                margin: float = DEFAULT_MARGIN) -> str | None:
    """None when a step of `needed` bytes fits in `margin * limit` (or `limit` is unknown); otherwise
    what to do, naming each alternative (overrides, bytes) that fits, or saying that none does.

    Pure: the numbers come from `step_memory` and `device_memory_limit`.
    """
    if limit is None or needed <= margin * limit:
        return None
    usable = margin * limit
    lines = [f"The train step needs {needed / GIB:.2f} GiB per device but the device has {limit / GIB:.2f} "
             f"GiB ({margin:.0%} of it is used for this check)."]
    fitting = [(o, b) for o, b in alternatives if b <= usable]
    if fitting:
        lines.append("Settings that fit:")
        lines += [f"  {setting_label(o)}  ({b / GIB:.2f} GiB)" for o, b in fitting]
    else:
        tried = "; ".join(f"{setting_label(o)} ({b / GIB:.2f} GiB)" for o, b in alternatives) or "none"
        lines.append(f"None of the settings tried fits ({tried}); use more devices (mesh.num_devices), "
                     "fewer queries (fewshot.queries) or smaller frames (data.image_size).")
    lines.append("See the README table 'GPU memory -> settings that fit'; train.check_memory_fit=False skips "
                 "this check.")
    return "\n".join(lines)


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with {"section.key": value} overrides applied."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def check_step_fits(config: ml_collections.ConfigDict, mesh: Mesh, *, limit: int | None = None,
                    measure=step_memory) -> None:
    """Fail before any data is read if the train step cannot be split on `mesh` (ValueError naming the
    keys) or would not fit in device memory (StepDoesNotFitError naming settings that fit).

    The memory part does nothing where the backend does not report device memory (CPU) or
    `train.check_memory_fit` is off. Alternatives (`candidate_settings`) are compiled only after a misfit,
    cheapest first, stopping at the first that fits. `limit` and `measure` are for tests.
    """
    from tam_jax import train  # train imports this module

    train.num_micro_batches(config.train.episodes_per_step, mesh.size, config.train.episodes_per_device_step)
    if not config.train.get("check_memory_fit", True):
        return
    limit = device_memory_limit() if limit is None else limit
    if limit is None:
        return
    needed = measure(config, mesh).total
    if fit_message(needed, limit, []) is None:
        return
    alternatives = []
    for overrides in candidate_settings(config):
        alternatives.append((overrides, measure(with_overrides(config, overrides), mesh).total))
        if alternatives[-1][1] <= DEFAULT_MARGIN * limit:
            break
    raise StepDoesNotFitError(fit_message(needed, limit, alternatives))
