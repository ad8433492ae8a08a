"""The train state and what builds it: the optimiser and its schedule, initial weights, restoring a
trained state.

State: one `TrainState` pytree (step, parameters, BatchNorm statistics, optimiser state) that Orbax saves
whole. All other randomness is a pure function of (config.seed, episode index), so the step alone fixes
the data position and the random stream.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tam_jax import checkpoints, fewshot, methods, models
from tam_jax.checkpoints import CheckpointMismatchError
from tam_jax.errors import ConfigError


@flax.struct.dataclass
class TrainState:
    """Everything a train step changes.

    params: {"embedder": backbone parameters, "log_temperature": scalar (only when learned),
      "head": the parameters of a learned method (fewshot.scorer "trn", "cmn", "trx", ...:
      `tam_jax.methods`)}.
    batch_stats: BatchNorm running statistics of the embedder.
    opt_state: the optimiser's state (None in a state restored for inference).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def embedder_variables(state: TrainState) -> dict:
    """The frame embedder's {"params", "batch_stats"} in `state`."""
    return {"params": state.params["embedder"], "batch_stats": state.batch_stats}


def temperature(params, config: ml_collections.ConfigDict) -> jax.Array:
    """Eq. 8's effective temperature, a scalar: the configured one (or the learned one, clamped to
    [fewshot.min_temperature, fewshot.max_temperature]) divided by the method's logit scale
    (`tam_jax.methods.logit_scale`)."""
    fs = config.fewshot
    if fs.learn_temperature:
        base = fewshot.bounded_temperature(params["log_temperature"], fs.min_temperature, fs.max_temperature)
    else:
        base = jnp.float32(fs.temperature)
    return base / methods.logit_scale(fs.scorer, config.data.num_frames, fs.logit_scale)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """step -> learning rate: step decay (the paper), cosine or constant (`config.train`)."""
    train = config.train
    if train.schedule == "step":
        return optax.exponential_decay(
            train.learning_rate, train.decay_every_steps, train.decay_factor, staircase=True
        )
    if train.schedule == "cosine":
        return optax.cosine_decay_schedule(train.learning_rate, max(1, train.num_steps))
    return optax.constant_schedule(train.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum (the paper) or Adam; weight decay and gradient clipping as configured."""
    train = config.train
    parts = []
    if train.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
    if train.weight_decay > 0:
        parts.append(optax.add_decayed_weights(train.weight_decay))
    schedule = learning_rate_schedule(config)
    if train.optimizer == "sgd":
        parts.append(optax.sgd(schedule, momentum=train.momentum or None))
    else:
        parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def initial_variables(config: ml_collections.ConfigDict, model: models.FrameEmbedder) -> dict:
    """Embedder variables {"params", "batch_stats"}: from `model.init_from` or randomly initialised."""
    if config.model.init_from:
        info = models.read_backbone_metadata(config.model.init_from)
        if info["arch"] != config.model.arch:
            raise ConfigError(
                f"config.model.init_from={config.model.init_from!r} holds a {info['arch']} backbone "
                f"but config.model.arch={config.model.arch!r}; make them agree."
            )
        _, variables = models.load_backbone(config.model.init_from)
        return models.embedder_variables_from_backbone(variables)
    size = config.data.image_size
    frames = jnp.zeros((1, 1, size, size, 3), jnp.uint8)
    # Jitted: eager initialisation of a ResNet runs op by op and takes many seconds.
    return jax.jit(model.init, static_argnames="train")(jax.random.key(config.seed), frames, train=False)


def initial_head(config: ml_collections.ConfigDict, method: methods.Method) -> Any:
    """A learned method's initial parameters, from `config.seed`, as one compiled program: run op by op,
    TRX's or TRN's head took about 7 s on ResNet-50 features."""

    def init(seed):
        rng = jax.random.fold_in(jax.random.key(seed), 1)
        return method.init(rng, config.data.num_frames, models.feature_dim(config.model.arch))

    return jax.jit(init)(config.seed)


def create_train_state(
    config: ml_collections.ConfigDict, model: models.FrameEmbedder, optimizer, mesh: Mesh
) -> TrainState:
    """The initial state, replicated over the mesh."""
    variables = initial_variables(config, model)
    params = {"embedder": variables["params"]}
    if config.fewshot.learn_temperature:
        params["log_temperature"] = jnp.log(jnp.float32(config.fewshot.temperature))
    method = methods.build(config.fewshot.scorer, config)
    if method.learned:
        params["head"] = initial_head(config, method)

    def init(params, batch_stats):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=optimizer.init(params),
        )

    replicated = NamedSharding(mesh, P())
    return jax.jit(init, out_shardings=replicated)(params, variables.get("batch_stats", {}))


def restore_trained(
    manager: checkpoints.CheckpointManager, step: int, config: ml_collections.ConfigDict, mesh: Mesh,
    where: str = "",
) -> TrainState:
    """The weights saved at `step` (no optimiser state: for evaluation and inference), checked against the
    embedder `config.model` describes. Raises CheckpointMismatchError naming what differs."""
    saved = manager.restore_saved(step, mesh)
    model = models.build_embedder(config.model)
    size = config.data.image_size
    frames = jax.ShapeDtypeStruct((1, 1, size, size, 3), jnp.uint8)
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), frames)
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)
    found = {"params": saved["params"].get("embedder"), "batch_stats": saved.get("batch_stats", {})}
    wanted = {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})}
    if shapes(found) != shapes(wanted):
        raise CheckpointMismatchError(
            f"Checkpoint {manager.directory}/{step} does not fit {where or 'the config'} (architecture "
            f"model.arch={config.model.arch!r}): was it copied from another run?"
        )
    return TrainState(step=saved["step"], params=saved["params"], batch_stats=saved.get("batch_stats", {}),
                      opt_state=None)
