"""The default configuration every `configs/*.py` starts from, and the checks run before any compute.

Config files define `get_config(arg)`; `arg` is what follows the colon in `--config=configs/x.py:shot=5`,
a comma-separated list of `key=value` (see `parse_config_arg`). Every field can then be overridden on the
command line as `--config.a.b=value`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import ml_collections

from tam_jax import checkpoints, fewshot
from tam_jax.errors import ConfigError
from tam_jax.models.resnet import REMAT_CHOICES

DTYPES = ("float32", "bfloat16")
# The execution plan's keys (tam_jax.plan), each with the value that leaves it to the plan.
PLAN_AUTO = {"mesh.num_devices": 0, "train.episodes_per_device_step": 0, "train.embed_chunks": 0,
             "model.remat": "auto"}
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cosine", "constant")


def default_config() -> ml_collections.ConfigDict:
    """The paper's settings (Sec. 4.1) for a ResNet-50 on 8-frame, 224-pixel clips, 5-way 1-shot.

    Long on purpose: every key of every section, each with its comment, in one place.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.kind = "frames"  # "demo" | "frames" | "videos" | "tfds"
    c.data.root = ""  # folder of frame folders or video files (kind "frames" / "videos")
    c.data.split_dir = ""  # folder with one list per split, found by "train"/"val"/"test" in its name
    c.data.tfds_name = ""  # e.g. "kinetics100_fewshot" or "ssv2_fewshot/full" (kind "tfds")
    c.data.tfds_data_dir = ""  # where `tfds build` wrote it ("" = TFDS's default)
    c.data.num_frames = 8  # T: TSN segments, one frame each
    c.data.sampling = "tsn"  # "tsn" (random frame per segment in training, middle at test) | "uniform"
    c.data.resize = 256  # short side before cropping
    c.data.image_size = 224  # square crop
    c.data.square_resize = False  # resize to resize x resize instead of keeping the aspect ratio
    c.data.flip = True  # random horizontal flips in training (off for Something-Something)
    c.data.drop_small_classes = False  # leave out classes with fewer than shot + queries videos
    c.data.num_workers = 0  # grain worker processes for training batches (0: in the main process)
    c.data.num_threads = 4  # loading threads per process
    c.data.prefetch = 2  # batches buffered per worker
    c.data.demo = ml_collections.ConfigDict()  # DemoConfig fields, kind "demo" only
    c.data.demo.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.arch = "resnet50"  # "tiny" | "resnet18" | "resnet34" | "resnet50"
    c.model.init_from = ""  # a backbone directory from `python -m tam_jax.tools.import_weights`
    c.model.dtype = "float32"  # computation dtype: "float32" | "bfloat16" (parameters stay float32)
    c.model.freeze_bn = False  # BatchNorm keeps its running statistics in training
    # Recompute activations in the backward pass to save memory: "auto" (the run's plan, tam_jax.plan) |
    # "none" | "block" (the stem and each residual block) | a jax.checkpoint_policies name applied per unit
    # (stem, blocks), e.g. "dots_with_no_batch_dims_saveable"
    c.model.remat = "auto"

    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.way = 5
    c.fewshot.shot = 1
    c.fewshot.queries = 5  # queries per class in training episodes (and evaluation's, see eval.queries)
    c.fewshot.temperature = 1.0  # logits = -scale * distance / temperature (Eq. 8 uses 1)
    # Per-scorer scale of the distances in the logits (tam_jax.fewshot.logit_scale): "paper" is Eq. 8 for
    # Table 2's scorers and multiplies the [0, 2] baselines (tsn, trn, cmn) by T to TAM's [0, 2T] so they can
    # fit; "frames" also scales diagonal, mean and min by T; "none" is Eq. 8 for every scorer.
    c.fewshot.logit_scale = "paper"
    c.fewshot.learn_temperature = False  # learn log(temperature), clamped to the bounds below
    c.fewshot.min_temperature = 0.01
    c.fewshot.max_temperature = 100.0
    c.fewshot.scorer = "tam"  # what the run trains with: a scorer of `tam_jax.fewshot.ALL_SCORERS`

    c.alignment = ml_collections.ConfigDict()
    c.alignment.method = ""  # deprecated: renamed fewshot.scorer (RENAMED_KEYS)
    c.alignment.lam = 0.1  # soft-min temperature of Eq. 6
    c.alignment.bidirectional = False  # add the support->query alignment (TAM only)

    c.head = ml_collections.ConfigDict()  # learned heads of fewshot.scorer "trn" / "cmn" (tam_jax.heads)
    c.head.dim = 256  # frame projection, relation and saliency width
    c.head.trn_tuples = 3  # TRN++: ordered frame tuples per scale
    c.head.cmn_saliencies = 4  # CMN++: learned saliency queries M (the embedding is M * dim wide)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 120_000
    c.train.episodes_per_step = 4  # episodes per train step, split evenly over the devices
    # The execution plan (tam_jax.plan): 0 = chosen at start, the fastest that fits the device's memory.
    # Episodes each device embeds at once: a step runs episodes_per_step / (devices * this) micro-batches in
    # turn and averages their gradients; memory grows with this, not with episodes_per_step.
    c.train.episodes_per_device_step = 0
    # Chunks each episode's videos are embedded in, each recomputed alone in the backward pass
    # (tam_jax.frame_chunks): memory for one chunk's activations; BatchNorm normalises each chunk by itself.
    c.train.embed_chunks = 0
    c.train.memory_limit_gib = 0.0  # caps the memory a plan may use per device (0: what the device reports)
    c.train.optimizer = "sgd"  # "sgd" | "adam"
    c.train.learning_rate = 0.001
    c.train.momentum = 0.9
    c.train.weight_decay = 0.0
    c.train.schedule = "step"  # "step" (x decay_factor every decay_every_steps) | "cosine" | "constant"
    c.train.decay_every_steps = 30_000  # the paper's "every 30 epochs" with 1,000-step epochs
    c.train.decay_factor = 0.1
    c.train.grad_clip_norm = 0.0  # clip the global gradient norm (0: off)
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 1_000
    c.train.keep_checkpoints = 3  # the latest N are kept, plus the best by validation accuracy
    c.train.val_every_steps = 5_000  # meta-validation for model selection (0: off)
    c.train.val_episodes = 1_000

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.checkpoint = "best"  # "best" (by validation accuracy) | "latest" | a saved step, e.g. "3000"
    c.eval.num_episodes = 10_000
    c.eval.queries = 0  # queries per class in test and validation episodes (0: fewshot.queries; paper: 1)
    c.eval.episodes_per_batch = 250
    c.eval.scorers = ",".join(fewshot.SCORERS)  # comma-separated; all from the same embeddings
    c.eval.shots = ""  # comma-separated shots to evaluate, e.g. "1,5" ("" = fewshot.shot)
    c.eval.embed_batch_size = 32  # videos per embedding batch (a multiple of the device count)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = 0  # data-parallel devices; 0 = the plan's: all that episodes_per_step divides over
    return c


# Old key -> new key. A value set under an old key still works for one release, with a warning.
RENAMED_KEYS = {"alignment.method": "fewshot.scorer"}


def upgrade_config(config: ml_collections.ConfigDict, *, warn: bool = True) -> ml_collections.ConfigDict:
    """Move values set under renamed keys (`RENAMED_KEYS`) to their new keys, in place; returns `config`.

    `warn=False` for configs the library wrote itself (a workdir's `config.json` from an older version).
    """
    for old, new in RENAMED_KEYS.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        value = config[old_section].get(old_name) if old_section in config else None
        if not value:  # "" = not set
            continue
        if warn:
            warnings.warn(f"config.{old} is deprecated and will be removed in the next release; use "
                          f"config.{new} (now set to {value!r}).", FutureWarning, stacklevel=2)
        with config.unlocked():
            config[new_section][new_name] = value
            config[old_section][old_name] = ""
    return config


# What a config string (`configs/x.py:shot=5,way=10`) may set, and the config key each sets.
CONFIG_ARG_KEYS = {"shot": "fewshot.shot", "way": "fewshot.way"}


def apply_config_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Set the keys of `CONFIG_ARG_KEYS` from the config string `arg` ("shot=5,way=10"); returns `config`.

    Each value is typed strictly as its default (`typed_value`). Raises ConfigError naming the argument."""
    for item in filter(None, (arg or "").split(",")):
        name, sep, value = (part.strip() for part in item.partition("="))
        if name not in CONFIG_ARG_KEYS or not sep:
            known = ", ".join(k + "=N" for k in CONFIG_ARG_KEYS)
            raise ConfigError(f"config string {arg!r}: {item!r} is not one of {known}, e.g. "
                              "configs/demo.py:shot=5,way=10.")
        key = CONFIG_ARG_KEYS[name]
        section, field = key.split(".")
        with config.unlocked():
            where = f"config string {arg!r}: {name}"
            config[section][field] = typed_value(value, config[section][field], where)
    return config


def typed_value(text: str, default, where: str):
    """`text` converted to the type of `default`, strictly: "False" is False, "2.5" is not an int.

    Raises ConfigError naming `where` and the type expected."""
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ConfigError(f"{where}: expected {expected}, got {text!r}.") from None


def csv_values(text: str, convert=str) -> tuple:
    """`"1,5"` -> (1, 5) with `convert=int`; empty parts are ignored."""
    return tuple(convert(part.strip()) for part in text.split(",") if part.strip())


def eval_queries(config: ml_collections.ConfigDict) -> int:
    """Queries per class of evaluation (test and validation) episodes: `eval.queries`, or
    `fewshot.queries` (training's) when it is 0 or absent (the `config.json` of an older run)."""
    return int(config.eval.get("queries", 0) or config.fewshot.queries)


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values a config key may take: `accepts(value)`, described as `text` in the error."""

    accepts: Callable[[Any], bool]
    text: str


def at_least(low, note: str = "") -> Domain:
    return Domain(lambda v: v >= low, f"must be >= {low}{note}")


def above(low) -> Domain:
    return Domain(lambda v: v > low, f"must be > {low}")


def one_of(*choices) -> Domain:
    return Domain(lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")


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
    "fewshot.logit_scale": one_of(*fewshot.LOGIT_SCALES),
    "fewshot.scorer": one_of(*fewshot.ALL_SCORERS),
    "alignment.lam": at_least(0, " (0: the hard minimum)"),
    "head.dim": at_least(1),
    "head.trn_tuples": at_least(1),
    "head.cmn_saliencies": at_least(1),
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


def validate(config: ml_collections.ConfigDict, training: bool = True, *, files: bool = True) -> None:
    """Fail before any compute on a config that cannot run, naming the key and the fix (ConfigError).

    Each key's own domain is in `KEY_DOMAINS`; below are the rules that relate keys or look at files.
    `training=False` (evaluating a trained run) does not need the backbone initialisation to exist;
    `files=False` (`--mode=plan`) needs neither it nor the data.
    """
    upgrade_config(config)
    check_domains(config)
    data, fs = config.data, config.fewshot

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
    for name in csv_values(config.eval.scorers):
        if name not in fewshot.ALL_SCORERS:
            fail("eval.scorers", f"{name!r} is not one of {', '.join(fewshot.ALL_SCORERS)}.")
        if name in fewshot.HEAD_SCORERS and name != fs.scorer:
            fail("eval.scorers", f"{name!r} needs a head trained with fewshot.scorer={name!r}, but this "
                 f"run trains {fs.scorer!r}; remove it or train with --config.fewshot.scorer={name}.")
    for shot in csv_values(config.eval.shots):
        if not shot.isdigit() or int(shot) < 1:
            fail("eval.shots", f"{shot!r} is not a shot >= 1; give comma-separated shots, e.g. 1,5.")
    if fs.scorer == "trn" and data.num_frames < 2:
        fail("data.num_frames", f"must be >= 2 for fewshot.scorer='trn' (TRN++ relates frame tuples), got "
             f"{data.num_frames}.")
    if not 0 < fs.min_temperature <= fs.max_temperature:
        fail("fewshot.min_temperature", f"the learned temperature's bounds need 0 < min_temperature <= "
             f"max_temperature, got {fs.min_temperature} and {fs.max_temperature}.")
    if fs.learn_temperature and not fs.min_temperature <= fs.temperature <= fs.max_temperature:
        fail("fewshot.temperature", f"{fs.temperature} is the learned temperature's start; it must lie in "
             f"[fewshot.min_temperature, fewshot.max_temperature] = [{fs.min_temperature}, "
             f"{fs.max_temperature}]: change it or the bounds.")
