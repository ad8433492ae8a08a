"""TRN++ and CMN++ heads: shapes, frame-order sensitivity, matching rules, and real train steps."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tam_jax import evaluate, fewshot, heads, hosts, models, train_state, train_step
from tam_jax.config_checks import validate
from tests.helpers import tiny_config
from tests.test_train import synthetic_batch


def test_trn_tuples_are_ordered_all_when_few_and_an_even_subset_otherwise():
    every = list(itertools.combinations(range(4), 3))
    np.testing.assert_array_equal(heads.trn_tuples(4, 3, max_tuples=4), every)
    np.testing.assert_array_equal(heads.trn_tuples(8, 8), [range(8)])  # the full scale: one tuple
    every = list(itertools.combinations(range(8), 2))
    picked = heads.trn_tuples(8, 2, max_tuples=3)
    np.testing.assert_array_equal(picked, [every[0], every[14], every[27]])  # ranks 0, 13.5 -> 14, 27 of 28
    assert (np.diff(picked, axis=1) > 0).all()
    big = heads.trn_tuples(32, 16)  # C(32, 16) = 6e8 tuples: picked without listing them
    assert big.shape == (3, 16) and (np.diff(big, axis=1) > 0).all() and big[-1, 0] == 16
    with pytest.raises(ValueError, match="scale"):
        heads.trn_tuples(4, 5)


def _init(head, frames):
    return head.init(jax.random.key(0), frames)["params"]


def test_trn_output_shape_and_it_changes_when_frames_are_permuted():
    frames = jax.random.normal(jax.random.key(1), (3, 8, 32))
    head = heads.TRNHead(dim=16)
    params = _init(head, frames)
    out = head.apply({"params": params}, frames)
    assert out.shape == (3, 16)
    permuted = head.apply({"params": params}, frames[:, ::-1])
    assert not np.allclose(out, permuted, atol=1e-3)
    # Same frames, same order: the same embedding, whatever the other videos of the batch.
    np.testing.assert_allclose(head.apply({"params": params}, frames[:1]), out[:1], rtol=1e-5, atol=1e-5)


def test_cmn_and_mean_pooling_ignore_frame_order():
    frames = jax.random.normal(jax.random.key(2), (3, 8, 32))
    order = np.array([3, 0, 7, 5, 1, 6, 2, 4])
    head = heads.CMNHead(dim=16, num_saliency=4)
    params = _init(head, frames)
    out = head.apply({"params": params}, frames)
    assert out.shape == (3, 4 * 16)
    np.testing.assert_allclose(head.apply({"params": params}, frames[:, order]), out, rtol=1e-5, atol=1e-5)
    # TSN++'s mean pooling: class distances do not change either.
    query, support = frames[:1], frames
    tsn = fewshot.class_distances(query, support, way=3, shot=1, scorer="tsn")
    tsn_permuted = fewshot.class_distances(query[:, order], support[:, order], way=3, shot=1, scorer="tsn")
    np.testing.assert_allclose(tsn, tsn_permuted, rtol=1e-5, atol=1e-6)


def test_learned_scorers_match_prototypes_or_the_nearest_support_video():
    rng = np.random.default_rng(0)
    way, shot = 3, 2
    query, support = rng.normal(size=(4, 5)), rng.normal(size=(way * shot, 5))
    frames_q, frames_s = np.zeros((4, 2, 5)), np.zeros((way * shot, 2, 5))
    trn, cmn = fewshot.class_distances_for_scorers(
        frames_q, frames_s, way=way, shot=shot, scorers=("trn", "cmn"), head_query=query, head_support=support
    )

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for i, c in itertools.product(range(4), range(way)):
        members = support[c * shot : (c + 1) * shot]
        assert trn[i, c] == pytest.approx(1 - cos(query[i], members.mean(0)), abs=1e-5)
        assert cmn[i, c] == pytest.approx(1 - max(cos(query[i], m) for m in members), abs=1e-5)
    with pytest.raises(ValueError, match="head_query"):
        fewshot.class_distances(frames_q, frames_s, way=way, shot=shot, scorer="cmn")


@pytest.mark.parametrize("scorer", ["trn", "cmn"])
def test_head_trains_a_few_real_steps(scorer):
    config = tiny_config()
    config.mesh.num_devices = 1
    config.train.episodes_per_step = 2
    config.fewshot.scorer = scorer
    config.head.dim = 16
    validate(config)
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    optimizer = train_state.make_optimizer(config)
    state = train_state.create_train_state(config, model, optimizer, mesh)
    initial = jax.device_get(state.params["head"])
    step = train_step.make_train_step(config, model, optimizer, mesh)
    batch = synthetic_batch(config, episodes=2)
    losses = []
    for _ in range(3):
        state, metrics = step(state, train_step.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3 and np.isfinite(losses).all()
    trained = jax.device_get(state.params["head"])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), initial, trained)
    assert all(jax.tree.leaves(changed)), "every head parameter should get a gradient"

    # Documented shapes: frame features [..., T, D] -> [..., dim] (TRN++) or [..., M * dim] (CMN++).
    head = heads.build_head(config)
    features = jnp.ones((2, 5, config.data.num_frames, 128))
    width = 16 if scorer == "trn" else 16 * config.head.cmn_saliencies
    assert heads.video_embeddings(head, trained, features).shape == (2, 5, width)
    cached = heads.embed_features(head, trained, np.ones((7, config.data.num_frames, 128), np.float32), 4)
    assert cached.shape == (7, width)


def test_a_learned_scorer_is_only_evaluated_by_its_own_run():
    config = tiny_config()
    assert "trn" not in evaluate.eval_scorers(config)
    config.fewshot.scorer = "trn"
    assert evaluate.eval_scorers(config)[0] == "trn"
    config.eval.scorers = "tam,cmn"
    with pytest.raises(ValueError, match="config.eval.scorers"):
        validate(config)
    config.eval.scorers = "tam"
    config.data.num_frames = 1
    with pytest.raises(ValueError, match="config.data.num_frames"):
        validate(config)


def test_cached_evaluation_scores_the_head_embeddings():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 4)
    embeddings = rng.normal(size=(len(labels), 3, 8)).astype(np.float32)
    noise = 0.01 * rng.normal(size=(len(labels), 6))
    vectors = (np.eye(6)[labels] + noise).astype(np.float32)
    result = evaluate.evaluate_embeddings(
        embeddings, labels, way=5, shot=1, queries=2, num_episodes=8, seed=0, scorers=("cmn", "tsn"),
        episodes_per_batch=4, show_progress=False, head_embeddings=vectors,
    )
    assert result["cmn"].tolist() == [1.0] * 8  # the head's embeddings separate the classes
    assert result["tsn"].mean() < 1.0
