"""Embedding an episode in chunks recomputed one at a time (train.embed_chunks, tam_jax.frame_chunks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tam_jax import fewshot, frame_chunks, hosts, models, plan, train_state, train_step
from tests.helpers import tiny_config
from tests.test_train import (
    _assert_trees_close,
    _sgd_config,
    assert_eight_devices_give_the_one_device_step,
    one_step,
    synthetic_batch,
)


def test_chunks_take_a_slice_of_every_episode_and_come_back_in_place():
    videos = jnp.arange(2 * 6).reshape(2, 6)  # 2 episodes of 6 videos
    chunks = frame_chunks.to_chunks(videos, 3)
    np.testing.assert_array_equal(chunks, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])
    np.testing.assert_array_equal(frame_chunks.from_chunks(chunks, 2), videos)
    with pytest.raises(ValueError, match="embed_chunks=4 does not divide the 6 videos"):
        frame_chunks.to_chunks(videos, 4)


def _small(config):
    """16-pixel frames, 1 query per class: 10 videos of 4 frames per 5-way 1-shot episode."""
    config.data.resize = config.data.image_size = 16
    config.fewshot.queries = 1
    return config


def _parts(config):
    mesh = hosts.make_mesh(1)
    model = models.build_embedder(config.model)
    state = train_state.create_train_state(config, model, train_state.make_optimizer(config), mesh)
    return model, jax.device_get(state)


def test_chunked_gradients_and_statistics_are_those_of_each_chunk_embedded_alone():
    # BatchNorm in training mode: each chunk is normalised with its own statistics. The reference embeds
    # each chunk by a plain call and lets autodiff differentiate the lot.
    config = _small(tiny_config())
    config.train.episodes_per_step = 2
    batch = synthetic_batch(config, episodes=2)
    model, state = _parts(config)
    num_support = batch["support"].shape[1]
    num_chunks = 2  # 5 support + 5 query videos per episode: chunks of 5

    def apply(params, stats, clips):
        features, updates = model.apply({"params": params, "batch_stats": stats}, clips, train=True,
                                        mutable=["batch_stats"])
        return features, updates["batch_stats"]

    def loss(features, labels):
        logits = train_step.episode_logits({}, features, num_support, config)
        return fewshot.cross_entropy(logits, labels) + jnp.mean(features**2)

    def reference(params, stats, videos):
        chunks = frame_chunks.to_chunks(videos, num_chunks)
        outputs = [apply(params, stats, chunk) for chunk in chunks]
        features = jnp.stack([f for f, _ in outputs])
        mean_stats = jax.tree.map(lambda *s: sum(s) / num_chunks, *[s for _, s in outputs])
        return frame_chunks.from_chunks(features, videos.shape[0]), mean_stats

    def chunked(params, stats, videos):
        return frame_chunks.embed_in_chunks(apply, params, stats, videos, num_chunks)

    videos = jnp.concatenate([batch["support"], batch["query"]], axis=1)
    results = {}
    for name, embed in (("reference", reference), ("chunked", chunked)):
        def objective(params, embed=embed):
            features, stats = embed(params, state.batch_stats, videos)
            return loss(features, batch["query_labels"]), (features, stats)

        grads, (features, stats) = jax.jit(jax.grad(objective, has_aux=True))(state.params["embedder"])
        results[name] = jax.device_get((grads, features, stats))
    jax.tree.map(  # float noise of the two programs, scaled to each array
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
        results["chunked"], results["reference"],
    )
    # Not one forward pass over all videos: normalised with the whole batch's statistics, features differ.
    all_videos = videos.reshape(-1, *videos.shape[2:])
    whole, _ = jax.jit(apply)(state.params["embedder"], state.batch_stats, all_videos)
    assert not np.allclose(whole.reshape(results["chunked"][1].shape), results["chunked"][1], atol=1e-3)


def test_with_frozen_batchnorm_chunks_give_the_unchunked_step():
    config = _small(_sgd_config(episodes=2))
    config.model.freeze_bn = True
    config.model.remat = "block"  # recomputation inside recomputation
    config.mesh.num_devices = 1
    config.train.episodes_per_device_step = 2
    batch = synthetic_batch(config, episodes=2)
    params_whole, metrics_whole = one_step(config, batch)
    config.train.embed_chunks = 5
    params_chunked, metrics_chunked = one_step(config, batch)
    np.testing.assert_allclose(metrics_chunked["loss"], metrics_whole["loss"], rtol=1e-5)
    _assert_trees_close(params_chunked, params_whole)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params_chunked, _parts(config)[1].params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step did change the weights


def test_chunks_on_eight_devices_give_the_one_device_step():
    config = _small(_sgd_config(episodes=8))
    config.train.embed_chunks = 2
    assert_eight_devices_give_the_one_device_step(config)


def test_chunks_shrink_the_compiled_steps_temporaries():
    config = tiny_config()  # 24 pixels, 15 videos per episode (at 16 the optimiser's buffers dominate)
    config.mesh.num_devices = 1
    config.train.episodes_per_step = config.train.episodes_per_device_step = 1
    config.model.remat = "none"  # the chunks' saving alone (plain autodiff through a map saves ~20%)
    mesh = hosts.make_mesh(1)
    whole = plan.compile_step(config, mesh)[1]
    config.train.embed_chunks = 5
    chunked = plan.compile_step(config, mesh)[1]
    assert chunked.temp < 0.6 * whole.temp
