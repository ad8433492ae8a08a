"""The default configuration every `configs/*.py` starts from: every key, its default and its meaning.

Config files define `get_config(arg)`; `arg` is what follows the colon in `--config=configs/x.py:shot=5`,
a comma-separated list of `key=value` (`apply_config_arg`). Every field can then be overridden on the
command line as `--config.a.b=value`. Nothing here imports JAX: building a config computes nothing. The
checks a config must pass are in `tam_jax.config_checks`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from tam_jax.errors import ConfigError

# The execution plan's keys (tam_jax.plan), each with the value that leaves it to the plan.
PLAN_AUTO = {"mesh.num_devices": 0, "train.episodes_per_device_step": 0, "train.embed_chunks": 0,
             "model.remat": "auto"}


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
    # Per-method scale of the distances in the logits (tam_jax.methods.logit_scale): "paper" is Eq. 8 for
    # Table 2's scorers and multiplies the [0, 2] baselines (tsn, trn, cmn) by T to TAM's [0, 2T] so they can
    # fit; "frames" also scales diagonal, mean and min by T; "none" is Eq. 8 for every scorer.
    c.fewshot.logit_scale = "paper"
    c.fewshot.learn_temperature = False  # learn log(temperature), clamped to the bounds below
    c.fewshot.min_temperature = 0.01
    c.fewshot.max_temperature = 100.0
    c.fewshot.scorer = "tam"  # the method the run trains with: a name registered in `tam_jax.methods`

    c.alignment = ml_collections.ConfigDict()
    c.alignment.lam = 0.1  # soft-min temperature of Eq. 6
    c.alignment.bidirectional = False  # add the support->query alignment (TAM only)

    # Options of the methods (tam_jax.methods), config.methods.<name>.<key>, each defaulting to its method's
    # `defaults`, e.g. --config.methods.trx.dim=256 (filled in for every registered method by the command
    # line, `tam_jax.cli`).
    c.methods = ml_collections.ConfigDict()
    c.plugins = ""  # comma-separated modules to import first: they register methods of your own

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
    # Comma-separated methods, all scored on the same embeddings ("": every registered method without
    # parameters); a learned method ("trn", "cmn", "trx") only when the run trains it, and always then.
    c.eval.scorers = ""
    c.eval.shots = ""  # comma-separated shots to evaluate, e.g. "1,5" ("" = fewshot.shot)
    c.eval.embed_batch_size = 32  # videos per embedding batch (a multiple of the device count)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = 0  # data-parallel devices; 0 = the plan's: all that episodes_per_step divides over
    return c


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
    `fewshot.queries` (training's) when it is 0."""
    return int(config.eval.queries or config.fewshot.queries)




def config_from_json(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """`default_config()` updated with a saved config (a workdir's `config.json`): the one place a key
    missing from the file takes its default."""
    config = default_config()
    saved = dict(saved)
    with config.unlocked():  # methods' sections are as free as the registered methods
        config.methods = ml_collections.ConfigDict(saved.pop("methods", {}))
    config.update(saved)
    return config
