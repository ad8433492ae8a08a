"""Shared test helpers: the demo config at a tiny size, command-line overrides, reading checkpoints."""

import contextlib
import importlib.util
import os
from pathlib import Path

import jax

from tam_jax import hosts, methods, models, train_state

REPO = Path(__file__).resolve().parents[1]


def load_config(name="demo", arg=None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(num_steps=6):
    config = load_config()
    config.data.demo.videos_per_class = 6
    config.data.demo.height = 32
    config.data.demo.width = 32
    config.data.resize = 28
    config.data.image_size = 24
    config.data.num_frames = 4
    config.data.num_threads = 1
    config.fewshot.queries = 2
    config.train.num_steps = num_steps
    config.train.episodes_per_step = 8
    # A set plan: a micro-batch per device step works on 1 and on 8 devices
    config.train.episodes_per_device_step = 1
    config.train.embed_chunks = 1
    config.model.remat = "none"
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 2
    config.train.val_every_steps = 3
    config.train.val_episodes = 20
    config.eval.num_episodes = 40
    config.eval.episodes_per_batch = 20
    config.eval.embed_batch_size = 16
    return config


def small_config(num_steps=4):
    """Tiny demo training on one device, a checkpoint every 2 steps, validation at step 3 and the end."""
    config = tiny_config(num_steps=num_steps)
    config.mesh.num_devices = 1
    config.train.episodes_per_step = 1
    config.train.checkpoint_every_steps = 2
    config.train.val_every_steps = 3
    config.train.val_episodes = 8
    config.eval.num_episodes = 16
    config.eval.episodes_per_batch = 8
    return config


def trained_config():
    """The config of the session's shared trained workdir (tests/conftest.py `trained`): `small_config()`
    without validation, so its checkpoints are steps 2 and 4 and none holds a validation accuracy."""
    config = small_config()
    config.train.val_every_steps = 0
    return config


def flags_for(config):
    """The command-line overrides that turn configs/demo.py into `config` (scalar fields only)."""
    base = load_config()
    overrides = []
    for section in ("data", "fewshot", "train", "eval", "mesh"):
        for key, value in config[section].items():
            if key == "demo":
                overrides += [f"--config.data.demo.{k}={v}" for k, v in value.items()
                              if base.data.demo.get(k) != v]
            elif base[section][key] != value:
                overrides.append(f"--config.{section}.{key}={value}")
    for name, options in config.methods.items():  # --config.methods.NAME.KEY=VALUE (tam_jax.cli)
        defaults = methods.get(name).defaults
        overrides += [f"--config.methods.{name}.{k}={v}" for k, v in options.items() if defaults.get(k) != v]
    return overrides


def read_params(workdir, config):
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    optimizer = train_state.make_optimizer(config)
    state = train_state.create_train_state(config, model, optimizer, mesh)
    from tam_jax.checkpoints import CheckpointManager

    manager = CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        step = manager.latest_step()
        return step, manager.restore(step, state)
    finally:
        manager.close()


@contextlib.contextmanager
def lowered_programs():
    """Yields a list that gets one entry for each program JAX lowers inside the block: each compile, including
    those the compilation cache then serves; none for a call jit has seen before."""
    lowered = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield lowered
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
