"""The data-parallel train step of Eq. 8: episodes -> frame features -> logits -> loss -> one update.

Parallelism: one `jax.jit` step over a 1-D `data` mesh; the episodes of a batch are sharded over devices,
parameters replicated. How a step is executed (devices, episodes each device embeds at once, chunks,
remat, loops unrolled or not) is the run's plan (`tam_jax.plan`), which builds the step with
`make_train_step`.

Accumulation: a step's `train.episodes_per_step` episodes are processed as k micro-batches of
`devices * train.episodes_per_device_step` episodes, one after another inside the jitted step, so memory
depends on the micro-batch, not on the episodes per step. The loss is the mean over all the step's episodes
and the gradient is its gradient (the mean of the micro-batches' mean-loss gradients), so where the
backbone's forward does not depend on the batch (frozen BatchNorm, `model.freeze_bn`) a step with k
micro-batches makes the same update as one micro-batch of all episodes. BatchNorm in training mode
normalises each micro-batch with that micro-batch's statistics (over all its devices: 1 device and 8 give
the same numbers for the same micro-batch), and the running statistics take k momentum updates per step,
one per micro-batch in order, as the paper's PyTorch training does with one forward at a time.

Loops (micro-batches, `tam_jax.frame_chunks`) are a `lax.scan`, which keeps one iteration's activations
alive at a time; `unroll=True` writes them out instead, for XLA:CPU, which runs convolutions inside a loop
about ten times slower (benchmarks/cpu_loops.py).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tam_jax import fewshot, frame_chunks, methods, models
from tam_jax.train_state import TrainState, temperature


def embed_episode(params, batch_stats, batch: dict, *, model: models.FrameEmbedder, chunks: int = 1,
                  unroll: bool = False):
    """Frame features of every video of a batch (in the train step, a micro-batch) of episodes, in training
    mode; BatchNorm normalises with, and updates its running statistics from, this batch alone (with
    `chunks` > 1, each of `chunks` chunks of its videos, recomputed alone in the backward pass:
    `tam_jax.frame_chunks`, config.train.embed_chunks).

    Args:
      batch: {"support": uint8 `[E, way*shot, T, H, W, 3]`, "query": uint8 `[E, Nq, T, H, W, 3]`, ...}.

    Returns:
      (float32 `[E, way*shot + Nq, T, D]`, support videos first; the new BatchNorm statistics).
    """
    videos = jnp.concatenate([batch["support"], batch["query"]], axis=1)

    def apply(params, batch_stats, clips):
        features, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, clips, train=True, mutable=["batch_stats"]
        )
        return features, updates["batch_stats"]

    if chunks > 1:
        return frame_chunks.embed_in_chunks(apply, params["embedder"], batch_stats, videos, chunks,
                                            unroll=unroll)
    # Every frame of every video of the batch goes through the backbone in one call, so BatchNorm sees
    # the whole (micro-)batch, across devices.
    features, batch_stats = apply(params["embedder"], batch_stats, videos.reshape((-1,) + videos.shape[2:]))
    return features.reshape(*videos.shape[:2], *features.shape[1:]), batch_stats


def episode_logits(params, features: jax.Array, num_support: int, config: ml_collections.ConfigDict,
                   rngs: jax.Array | None = None):
    """Eq. 8's logits of every query: features `[E, way*shot + Nq, T, D]` (support first, class-major) ->
    `[E, Nq, way]`, from the class distances of `config.fewshot.scorer` (`tam_jax.methods`; a learned
    method's parameters are params["head"], `rngs` `[E]` its per-episode keys, None in evaluation)."""
    method = methods.build(config.fewshot.scorer, config)
    labels = methods.episode_labels(config.fewshot.way, config.fewshot.shot)
    head = params.get("head")

    def one_episode(episode_features, rng):
        embedded = method.video_embeddings(head, episode_features)
        return method.class_distances(head, embedded[num_support:], embedded[:num_support], labels,
                                      config.fewshot.way, rng=rng)

    distances = jax.vmap(one_episode)(features, rngs)
    return fewshot.logits_from_distances(distances, temperature(params, config))


def episode_rngs(config: ml_collections.ConfigDict, step: jax.Array, episode_index: jax.Array) -> jax.Array:
    """One key per episode, `[E]` from int `[E]` steps and indices, for a learned method's randomness
    (dropout): a function of the seed, the step and the episode's index in the step alone, so no device
    count or micro-batch split changes it."""
    base = jax.random.fold_in(jax.random.key(config.seed), 2)  # 1 initialises the method's parameters
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(base, s), i))(step, episode_index)


def episode_loss(params, batch_stats, batch: dict, *, model: models.FrameEmbedder,
                 config: ml_collections.ConfigDict, unroll: bool = False):
    """Mean Eq. 8 loss over a batch of episodes (`embed_episode`'s batch plus "query_labels" int `[E, Nq]`).

    Returns:
      (loss, (new batch_stats, {"loss", "accuracy"})); features, logits and loss are float32 whatever
      `model.dtype` computes the backbone in.
    """
    features, batch_stats = embed_episode(
        params, batch_stats, batch, model=model, chunks=config.train.embed_chunks, unroll=unroll
    )
    rngs = None
    if "episode_index" in batch:  # a learned method trains with randomness (train_step adds it)
        rngs = episode_rngs(config, batch["step"], batch["episode_index"])
    logits = episode_logits(params, features, batch["support"].shape[1], config, rngs)
    labels = batch["query_labels"]
    loss = fewshot.cross_entropy(logits, labels)
    chex.assert_type([features, logits, loss], jnp.float32)
    return loss, (batch_stats, {"loss": loss, "accuracy": fewshot.accuracy(logits, labels)})


def split_micro_batches(batch: dict, k: int) -> dict:
    """Every `[E, ...]` array of `batch` -> `[k, E / k, ...]`; micro-batch i holds episodes i, i+k, i+2k, ...

    The stride keeps each device's share of every micro-batch on that device: the episodes are sharded
    over devices in contiguous blocks, and a block of E / devices episodes is E / (k * devices) whole rows
    of the `[E / k, k]` view. It also makes the micro-batches a function of E and k alone, not of the
    number of devices.
    """
    episodes = jax.tree.leaves(batch)[0].shape[0]
    chex.assert_tree_shape_prefix(batch, (episodes,))
    if episodes % k:
        raise ValueError(f"{episodes} episodes do not split into {k} micro-batches.")
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((episodes // k, k) + x.shape[1:]), 0, 1), batch)


def accumulated_gradients(loss_fn, params, batch_stats, micro_batches: dict, *, unroll: bool = False):
    """Mean gradient of `loss_fn` over the micro-batches, taken one micro-batch at a time (`lax.scan`,
    written out with `unroll`).

    Args:
      loss_fn: `(params, batch_stats, micro_batch) -> (mean loss, (new batch_stats, metrics))`.
      micro_batches: `split_micro_batches`' output, every leaf `[k, episodes per micro-batch, ...]`.

    Returns:
      (gradients: the mean over micro-batches, float32 like the parameters; batch_stats after the k
      micro-batches in order; metrics: each the mean over micro-batches).
    """
    k = jax.tree.leaves(micro_batches)[0].shape[0]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(carry, micro_batch):
        grad_sum, stats = carry
        (_, (stats, metrics)), grads = grad_fn(params, stats, micro_batch)
        return (jax.tree.map(jnp.add, grad_sum, grads), stats), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, batch_stats), metrics = jax.lax.scan(one, (zeros, batch_stats), micro_batches,
                                                          unroll=unroll)
    # Equal micro-batches of mean losses: the mean of their gradients is the gradient of the step's mean loss.
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return grads, batch_stats, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def make_train_step(config: ml_collections.ConfigDict, model, optimizer, mesh: Mesh, *,
                    unroll: bool = False):
    """A jitted `(state, batch) -> (state, metrics)`, batch sharded over "data", state replicated.

    `config` holds a plan (`tam_jax.plan.Plan.apply`): the batch's `train.episodes_per_step` episodes go
    through the backbone in micro-batches of `mesh.size * train.episodes_per_device_step` (module
    docstring: loss, gradients, BatchNorm), each embedded in `train.embed_chunks` chunks; `unroll` writes
    the loops out.
    """
    micro = mesh.size * config.train.episodes_per_device_step
    assert config.train.episodes_per_step % micro == 0, "tam_jax.plan checks the split"
    k = config.train.episodes_per_step // micro
    # Each micro-batch stays sharded over "data": its episodes are embedded on the devices that hold them.
    micro_sharded = NamedSharding(mesh, P(None, "data"))
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))

    learned = methods.get(config.fewshot.scorer).learned

    def train_step(state: TrainState, batch: dict):
        if learned:  # each episode's own random key (`episode_rngs`), whatever the micro-batch split
            episodes = batch["query_labels"].shape[0]
            index = jax.lax.with_sharding_constraint(jnp.arange(episodes, dtype=jnp.int32), sharded)
            batch = dict(batch, episode_index=index, step=jnp.broadcast_to(state.step, (episodes,)))
        loss_fn = functools.partial(episode_loss, model=model, config=config, unroll=unroll)
        if k == 1:
            (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, state.batch_stats, batch)
        else:
            micro_batches = jax.lax.with_sharding_constraint(split_micro_batches(batch, k), micro_sharded)
            grads, batch_stats, metrics = accumulated_gradients(
                loss_fn, state.params, state.batch_stats, micro_batches, unroll=unroll
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

    return jax.jit(
        train_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host arrays (this process's episodes) -> global arrays sharded over "data" on the first axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


