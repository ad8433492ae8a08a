"""Few-shot methods as plug-ins: a method turns the frame features of an episode into class distances.

A method is one class, registered by name; training (`tam_jax.train_step`), the evaluator
(`tam_jax.evaluate`), `predict`, `visualize` and `reproduce` find every registered method here, and
`config.fewshot.scorer` / `config.eval.scorers` name them. To add one:

    from tam_jax import methods

    @methods.register
    class Prototypes(methods.Method):
        name = "prototypes"

        def class_distances(self, params, query, support, support_labels, num_classes, *, rng=None):
            means = methods.class_means(jnp.mean(support, axis=1), support_labels, num_classes)
            return methods.cosine_distance(jnp.mean(query, axis=1), means)

then run with `--config.plugins=my_module --config.fewshot.scorer=prototypes` (docs/methods.md).

The interface, per call: `video_embeddings(params, frames [N, T, D]) -> [N, ...]` maps each video on its
own (the identity for methods that compare frames, the mean over T for pooled ones, a learned head's
output); the evaluator computes it once per video. `class_distances(params, query, support,
support_labels, num_classes, rng=None) -> [Nq, num_classes]` compares those embeddings within one
episode, smaller is closer; `support_labels` are int `[Ns]` in 0..num_classes-1, in any order, every
class at least once. A learned method (`learned = True`) builds its parameters in `init`; they train with
the embedder as `state.params["head"]`. Its options live in `config.methods.<name>`: `defaults` gives
their values (bool, int, float or str), `domains` their checks (`tam_jax.domains.Domain`).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from tam_jax.alignment import cosine_distance
from tam_jax.errors import ConfigError

__all__ = ["Method", "HeadMethod", "register", "unregister", "get", "names", "evaluated", "build", "options",
           "check_options", "class_means", "class_minimum", "cosine_distance", "episode_labels",
           "logit_scale", "import_plugins", "LOGIT_SCALES"]

_REGISTRY: dict[str, type[Method]] = {}
# config.fewshot.logit_scale: which distances Eq. 8's logits multiply by T (see `logit_scale`).
LOGIT_SCALES = ("paper", "frames", "none")


class Method:
    """A few-shot method: class distances of query videos from a labelled support set (module docstring).

    Class attributes describe it to the harness:
      name: the registry key (config.fewshot.scorer, config.eval.scorers, --scorer flags).
      label: its name in tables ("TAM", "TRX"); default `name`.
      learned: has parameters (`init`), trained with the embedder as state.params["head"].
      distance_range: "unit" (a cosine distance or a mean of them, in [0, 2]), "frames" (a sum of T of
        them, in [0, 2T]) or "free" (anything else); sets the logit scale (`logit_scale`).
      baseline: one of Table 1's baselines, whose [0, 2] distances the "paper" logit scale multiplies by T.
      tables: {table of `tam_jax.reproduce` (1: methods, 2: alignment scorers): its row's position}.
      published: {dataset key of `tam_jax.reproduce`: (5-way 1-shot, 5-shot) accuracy in %, None where
        not reported}; `citation` says where they come from.
      episodes_per_step: the episodes per train step its paper averages gradients over (None: the
        config's); `reproduce` trains its runs so.
      aligns: compares frames along an alignment path that `visualize` can draw.
      defaults, domains: its options (config.methods.<name>.<key>) and their checks.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    learned: ClassVar[bool] = False
    distance_range: ClassVar[str] = "unit"
    baseline: ClassVar[bool] = False
    tables: ClassVar[dict[int, int]] = {}
    published: ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    citation: ClassVar[str] = ""
    episodes_per_step: ClassVar[int | None] = None
    aligns: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    domains: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: ml_collections.ConfigDict):
        self.options = options(config, type(self))

    def settings(self) -> dict:
        """What this instance computes with (its options); equal settings, equal method (`__hash__`)."""
        return self.options.to_dict()

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        """Raise ConfigError when `config` cannot run this method (beyond its options' domains)."""

    def init(self, rng: jax.Array, num_frames: int, feature_dim: int) -> Any:
        """Fresh parameters (learned methods), or None."""
        return None

    def video_embeddings(self, params, frames: jax.Array) -> jax.Array:
        """Frame features `[N, T, D]` -> what `class_distances` compares, `[N, ...]`: the frames themselves
        by default."""
        return frames

    def class_distances(self, params, query: jax.Array, support: jax.Array, support_labels: jax.Array,
                        num_classes: int, *, rng: jax.Array | None = None) -> jax.Array:
        """Embedded query `[Nq, ...]` and support `[Ns, ...]`, labels int `[Ns]` -> float32 `[Nq, C]`.

        `rng`: for a learned method, a key in training (for dropout and the like); None in evaluation and
        for methods without parameters."""
        raise NotImplementedError

    def _key(self):
        return type(self), tuple(sorted((k, _hashable(v)) for k, v in self.settings().items()))

    def __eq__(self, other):
        return isinstance(other, Method) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


class HeadMethod(Method):
    """A learned method whose parameters are those of a flax module, `head`, mapping the frames of each
    video `[N, T, D]` to one embedding `[N, E]` (TRN++, CMN++)."""

    learned = True

    @property
    def head(self):
        raise NotImplementedError

    def init(self, rng, num_frames, feature_dim):
        return self.head.init(rng, jnp.zeros((1, num_frames, feature_dim), jnp.float32))["params"]

    def video_embeddings(self, params, frames):
        return self.head.apply({"params": params}, frames)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `cls.name` (an error if another class has the name)."""
    if not cls.name or cls.name == "frames":  # "frames": the evaluator's key for the frame features
        raise ValueError(f"{cls.__name__} needs a name (the class attribute `name`), not 'frames'.")
    odd = [k for k, v in cls.defaults.items() if type(v) not in (bool, int, float, str)]
    if odd:
        raise ValueError(f"{cls.__name__}.defaults[{odd[0]!r}]: options are bool, int, float or str.")
    if cls.distance_range not in ("unit", "frames", "free"):
        raise ValueError(f"{cls.__name__}.distance_range must be unit, frames or free.")
    known = _REGISTRY.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"A method named {cls.name!r} is already registered ({known.__module__}).")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered method (tests that register their own)."""
    _REGISTRY.pop(name, None)


def evaluated(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The methods a run's evaluation scores: `config.eval.scorers` (every registered method without
    parameters when it is empty), led by the run's own method when it is a learned one."""
    from tam_jax.configuration import csv_values

    chosen = csv_values(config.eval.scorers) or names(learned=False)
    if get(config.fewshot.scorer).learned and config.fewshot.scorer not in chosen:
        chosen = (config.fewshot.scorer, *chosen)
    return chosen


def names(*, learned: bool | None = None) -> tuple[str, ...]:
    """Registered method names in registration order (only the learned ones, or only the parameter-free
    ones, when `learned` is given)."""
    return tuple(n for n, cls in _REGISTRY.items() if learned is None or cls.learned == learned)


def get(name: str) -> type[Method]:
    """The method class registered as `name`; ValueError naming the registered ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown scorer {name!r}; the registered methods are {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def build(name: str, config: ml_collections.ConfigDict) -> Method:
    """The method `name` with its settings from `config`."""
    return get(name)(config)


def options(config: ml_collections.ConfigDict, cls: type[Method]) -> ml_collections.FrozenConfigDict:
    """`cls.defaults` updated by `config.methods.<name>` (which may be absent)."""
    values = dict(cls.defaults)
    given = config.get("methods", {}).get(cls.name)
    if given is not None:
        unknown = sorted(set(given.keys()) - set(values))
        if unknown:
            raise ConfigError(f"config.methods.{cls.name}.{unknown[0]}: method {cls.name!r} has no option "
                              f"{unknown[0]!r}; its options are {', '.join(values) or 'none'}.")
        values.update(given.to_dict() if hasattr(given, "to_dict") else dict(given))
    return ml_collections.FrozenConfigDict(values)


def check_options(config: ml_collections.ConfigDict, name: str) -> None:
    """Raise ConfigError for an option of method `name` outside its domain, then run its `check`."""
    cls = get(name)
    values = options(config, cls)
    for key, default in cls.defaults.items():
        value = values[key]
        if type(value) is not type(default) and not (type(default) is float and type(value) is int):
            raise ConfigError(f"config.methods.{name}.{key}: expected a {type(default).__name__} like its "
                              f"default {default!r}, got {value!r}; set --config.methods.{name}.{key}=VALUE.")
    for key, domain in cls.domains.items():
        if not domain.accepts(values[key]):
            raise ConfigError(f"config.methods.{name}.{key}: {domain.text}, got {values[key]!r}; set "
                              f"--config.methods.{name}.{key}=VALUE.")
    cls.check(config)


def import_plugins(modules: str) -> None:
    """Import each module of the comma-separated `modules` (config.plugins), which register methods;
    ConfigError naming the module when one cannot be imported."""
    for module in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"config.plugins: cannot import {module!r} ({e}); put its folder on PYTHONPATH "
                              "or fix the name.") from None
        except Exception as e:  # its code failed, e.g. a name that is already registered
            raise ConfigError(f"config.plugins: importing {module!r} failed: {type(e).__name__}: {e}"
                              ) from None


def logit_scale(name: str, num_frames: int, mode: str = "paper") -> float:
    """The factor method `name`'s distances are multiplied by in Eq. 8's logits, -scale * distance / temp.

    A "unit" distance (one cosine distance, or a mean of them) lies in [0, 2]; at scale 1 it cannot get
    below `fewshot.loss_floor(way, 2)` (0.43, 5-way) and trains weakly. T = `num_frames` puts it on TAM's
    [0, 2T].
    - "paper" (the default): T for Table 1's baselines (`baseline`: tsn, trn, cmn), so they can learn; 1 for
      every other method (Table 2's scorers as the paper trains them, TRX as its paper does).
    - "frames": T for every "unit" method; 1 for the others.
    - "none": 1 for every method, Eq. 8 as written.
    Accuracy never depends on the scale (the nearest class is the same); only the training signal does.
    """
    cls = get(name)
    if mode not in LOGIT_SCALES:
        raise ValueError(f"config.fewshot.logit_scale={mode!r} is not one of {', '.join(LOGIT_SCALES)}.")
    scaled = cls.baseline if mode == "paper" else mode == "frames" and cls.distance_range == "unit"
    return float(num_frames) if scaled else 1.0


def episode_labels(way: int, shot: int) -> jax.Array:
    """The labels of a class-major support set, int32 `[way * shot]`: 0 (shot times), 1, ..."""
    return jnp.repeat(jnp.arange(way, dtype=jnp.int32), shot)


def class_membership(labels: jax.Array, num_classes: int) -> jax.Array:
    """bool `[Ns, C]`: support video i belongs to class c."""
    return labels[:, None] == jnp.arange(num_classes)


def class_means(values: jax.Array, labels: jax.Array, num_classes: int, axis: int = 0) -> jax.Array:
    """The mean of `values` over the support videos of each class, along `axis` (of length Ns): that axis
    becomes C. Elementwise (no matmul), so exact for one video per class on any backend."""
    member = class_membership(labels, num_classes)  # [Ns, C]
    values = jnp.moveaxis(values.astype(jnp.float32), axis, -1)[..., None]  # [..., Ns, 1]
    sums = jnp.sum(jnp.where(member, values, 0.0), axis=-2)  # [..., C]; another class's inf stays out
    return jnp.moveaxis(sums / jnp.sum(member, axis=0), -1, axis)


def class_minimum(values: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """The smallest of `values [Nq, Ns]` over each class's support videos: `[Nq, C]`."""
    member = class_membership(labels, num_classes)
    return jnp.min(jnp.where(member[None], values.astype(jnp.float32)[:, :, None], jnp.inf), axis=1)


# The built-in methods register themselves on import; `names()` (and so the default config.eval.scorers)
# lists them in this order.
# isort: off
from tam_jax.methods import scorers  # noqa: E402, F401
from tam_jax.methods import tsn  # noqa: E402, F401
from tam_jax.methods import trn  # noqa: E402, F401
from tam_jax.methods import cmn  # noqa: E402, F401
from tam_jax.methods import trx  # noqa: E402, F401
# isort: on
