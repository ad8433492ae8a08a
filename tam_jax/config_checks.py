"""The checks a config passes before any compute: each key's domain, then the rules that relate keys.

Every failure is a ConfigError naming the key and the fix (`--config.a.b=VALUE`).
"""

from __future__ import annotations

import os

import ml_collections

from tam_jax import checkpoints, methods
from tam_jax.configuration import csv_values
from tam_jax.domains import Domain, above, at_least, one_of
from tam_jax.errors import ConfigError
from tam_jax.models.resnet import REMAT_CHOICES

DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cosine", "constant")


_AUTOMATIC = " (0: automatic, the run's plan)"
# Every key with a domain, in the config's order; `validate` checks each. Rules that relate several keys
# follow in `validate` itself.
KEY_DOMAINS = {
    "data.kind": one_of("demo", "frames", "videos", "tfds"),
    "data.num_frames": at_least(1),
    "data.sampling": one_of("tsn", "uniform"),
    "data.resize": at_least(1),
    "data.image_size": at_least(1),
    "data.num_workers": at_least(0, " (0: load in the main process)"),
    "data.num_threads": at_least(1),
    "data.prefetch": at_least(1),
    "model.arch": one_of("tiny", "resnet18", "resnet34", "resnet50"),
    "model.dtype": one_of(*DTYPES),
    "model.remat": one_of("auto", *REMAT_CHOICES),
    "fewshot.way": at_least(2, " (an episode tells at least two classes apart)"),
    "fewshot.shot": at_least(1),
    "fewshot.queries": at_least(1),
    "fewshot.temperature": above(0),
    "fewshot.logit_scale": one_of(*methods.LOGIT_SCALES),
    "alignment.lam": at_least(0, " (0: the hard minimum)"),
    "train.num_steps": at_least(1),
    "train.episodes_per_step": at_least(1),
    "train.episodes_per_device_step": at_least(0, _AUTOMATIC),
    "train.embed_chunks": at_least(0, _AUTOMATIC),
    "train.memory_limit_gib": at_least(0, " (0: what the device reports)"),
    "train.optimizer": one_of(*OPTIMIZERS),
    "train.learning_rate": above(0),
    "train.momentum": Domain(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.weight_decay": at_least(0),
    "train.schedule": one_of(*SCHEDULES),
    "train.decay_every_steps": at_least(1),
    "train.decay_factor": above(0),
    "train.grad_clip_norm": at_least(0, " (0: off)"),
    "train.log_every_steps": at_least(1),
    "train.checkpoint_every_steps": at_least(1),
    "train.keep_checkpoints": at_least(1),
    "train.val_every_steps": at_least(0, " (0: no validation)"),
    "train.val_episodes": at_least(1),
    "eval.checkpoint": Domain(lambda v: v in checkpoints.CHOICES or checkpoints.is_step_choice(v),
                              "must be best, latest or a saved step number"),
    "eval.num_episodes": at_least(1),
    "eval.queries": at_least(0, " (0: fewshot.queries)"),
    "eval.episodes_per_batch": at_least(1),
    "eval.embed_batch_size": at_least(1),
    "mesh.num_devices": at_least(0, _AUTOMATIC),
}


def check_domains(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for the first key of `KEY_DOMAINS` whose value lies outside its domain."""
    for key, domain in KEY_DOMAINS.items():
        section, name = key.split(".")
        value = config[section][name]
        if not domain.accepts(value):
            raise ConfigError(f"config.{key}: {domain.text}, got {value!r}; set --config.{key}=VALUE.")


def check_methods(config: ml_collections.ConfigDict) -> None:
    """The run's method (`fewshot.scorer`) and those `eval.scorers` names are registered; their options lie
    in their domains; a learned method is evaluated only by the run that trains it."""
    registered = ", ".join(methods.names())
    scorer = config.fewshot.scorer
    if scorer not in methods.names():
        raise ConfigError(f"config.fewshot.scorer: {scorer!r} is not a registered method "
                          f"({registered}); set --config.fewshot.scorer=NAME, or --config.plugins=MODULE for "
                          "a method of your own.")
    for name in config.get("methods", {}):
        if name not in methods.names():
            raise ConfigError(f"config.methods.{name}: no method {name!r} is registered ({registered}).")
    for name in csv_values(config.eval.scorers):
        if name not in methods.names():
            raise ConfigError(f"config.eval.scorers: {name!r} is not a registered method ({registered}).")
        if methods.get(name).learned and name != scorer:
            raise ConfigError(
                f"config.eval.scorers: {name!r} needs parameters trained with fewshot.scorer={name!r}, but "
                f"this run trains {scorer!r}; remove it or train with --config.fewshot.scorer={name}.")
    for name in dict.fromkeys((scorer, *methods.evaluated(config))):
        methods.check_options(config, name)


def validate(config: ml_collections.ConfigDict, training: bool = True, *, files: bool = True) -> None:
    """Fail before any compute on a config that cannot run, naming the key and the fix (ConfigError).

    Each key's own domain is in `KEY_DOMAINS`; below are the rules that relate keys or look at files.
    `training=False` (evaluating a trained run) does not need the backbone initialisation to exist;
    `files=False` (`--mode=plan`) needs neither it nor the data.
    """
    methods.import_plugins(config.plugins)
    check_domains(config)
    data, fs = config.data, config.fewshot
    check_methods(config)

    def fail(key: str, message: str):
        raise ConfigError(f"config.{key}: {message}")

    if files and data.kind in ("frames", "videos"):
        from tam_jax.data.layouts import has_split_folders

        if not data.root:
            fail("data.root", f"is empty; set --config.data.root=DIR, the folder of your {data.kind}.")
        for key in ("root", "split_dir"):
            if data[key] and not os.path.isdir(data[key]):
                fail(f"data.{key}", f"{data[key]!r} is not a folder; point it at an existing one.")
        if not data.split_dir and not has_split_folders(data.root):
            fail("data.split_dir", f"is empty and data.root={data.root!r} has no train/ val/ test/ "
                 "folders; set --config.data.split_dir=DIR, the folder of the split lists (one per split, "
                 f"named with train / val / test), or lay the data out as {data.root}/train/<class>/<video>.")
    if files and data.kind == "tfds" and not data.tfds_name:
        fail("data.tfds_name", "is empty; set e.g. --config.data.tfds_name=kinetics100_fewshot.")
    if data.image_size > data.resize:
        fail("data.image_size", f"{data.image_size} is larger than data.resize={data.resize}.")
    if training and files and config.model.init_from and not os.path.isdir(config.model.init_from):
        fail("model.init_from", f"{config.model.init_from!r} is not a folder; create one with "
             "`python -m tam_jax.tools.import_weights --src FILE --arch ARCH --out DIR`.")
    if config.alignment.bidirectional and fs.scorer != "tam":
        fail("alignment.bidirectional", "applies to fewshot.scorer='tam' only.")
    for shot in csv_values(config.eval.shots):
        if not shot.isdigit() or int(shot) < 1:
            fail("eval.shots", f"{shot!r} is not a shot >= 1; give comma-separated shots, e.g. 1,5.")
    if not 0 < fs.min_temperature <= fs.max_temperature:
        fail("fewshot.min_temperature", f"the learned temperature's bounds need 0 < min_temperature <= "
             f"max_temperature, got {fs.min_temperature} and {fs.max_temperature}.")
    if fs.learn_temperature and not fs.min_temperature <= fs.temperature <= fs.max_temperature:
        fail("fewshot.temperature", f"{fs.temperature} is the learned temperature's start; it must lie in "
             f"[fewshot.min_temperature, fewshot.max_temperature] = [{fs.min_temperature}, "
             f"{fs.max_temperature}]: change it or the bounds.")
