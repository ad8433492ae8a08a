"""The method registry (tam_jax.methods) and its built-in methods: TSN++, TRN++ and CMN++ heads (shapes,
frame-order sensitivity, matching rules, real train steps), class means and minima over any label order,
options and their checks."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tam_jax import evaluate, methods, models, train_state
from tam_jax.config_checks import validate
from tam_jax.methods import cmn, trn
from tests.helpers import lowered_programs, tiny_config


def test_trn_tuples_are_ordered_all_when_few_and_an_even_subset_otherwise():
    every = list(itertools.combinations(range(4), 3))
    np.testing.assert_array_equal(trn.trn_tuples(4, 3, max_tuples=4), every)
    np.testing.assert_array_equal(trn.trn_tuples(8, 8), [range(8)])  # the full scale: one tuple
    every = list(itertools.combinations(range(8), 2))
    picked = trn.trn_tuples(8, 2, max_tuples=3)
    np.testing.assert_array_equal(picked, [every[0], every[14], every[27]])  # ranks 0, 13.5 -> 14, 27 of 28
    assert (np.diff(picked, axis=1) > 0).all()
    big = trn.trn_tuples(32, 16)  # C(32, 16) = 6e8 tuples: picked without listing them
    assert big.shape == (3, 16) and (np.diff(big, axis=1) > 0).all() and big[-1, 0] == 16
    with pytest.raises(ValueError, match="scale"):
        trn.trn_tuples(4, 5)


def _init(head, frames):
    return jax.jit(head.init)(jax.random.key(0), frames)["params"]


def _init_method(method, num_frames, feature_dim, rng=None):
    """`method.init`, jitted (eagerly, a head's initialisation compiles a program per operation)."""
    rng = jax.random.key(0) if rng is None else rng
    return jax.jit(method.init, static_argnums=(1, 2))(rng, num_frames, feature_dim)


def test_trn_output_shape_and_it_changes_when_frames_are_permuted():
    frames = jax.random.normal(jax.random.key(1), (3, 8, 32))
    head = trn.TRNHead(dim=16)
    params = _init(head, frames)
    apply = jax.jit(head.apply)
    out = apply({"params": params}, frames)
    assert out.shape == (3, 16)
    permuted = apply({"params": params}, frames[:, ::-1])
    assert not np.allclose(out, permuted, atol=1e-3)
    # Same frames, same order: the same embedding, whatever the other videos of the batch.
    np.testing.assert_allclose(apply({"params": params}, frames[:1]), out[:1], rtol=1e-5, atol=1e-5)


def test_cmn_and_mean_pooling_ignore_frame_order():
    frames = jax.random.normal(jax.random.key(2), (3, 8, 32))
    order = np.array([3, 0, 7, 5, 1, 6, 2, 4])
    head = cmn.CMNHead(dim=16, num_saliency=4)
    params = _init(head, frames)
    apply = jax.jit(head.apply)
    out = apply({"params": params}, frames)
    assert out.shape == (3, 4 * 16)
    np.testing.assert_allclose(apply({"params": params}, frames[:, order]), out, rtol=1e-5, atol=1e-5)
    # TSN++'s mean pooling: class distances do not change either.
    tsn, labels = methods.build("tsn", tiny_config()), jnp.arange(3)
    pool = functools.partial(tsn.video_embeddings, None)
    score = lambda f: tsn.class_distances(None, pool(f[:1]), pool(f), labels, 3)
    np.testing.assert_allclose(score(frames), score(frames[:, order]), rtol=1e-5, atol=1e-6)


def test_learned_scorers_match_prototypes_or_the_nearest_support_video_in_any_label_order():
    rng = np.random.default_rng(0)
    way, shot = 3, 2
    query, support = rng.normal(size=(4, 5)), rng.normal(size=(way * shot, 5))
    labels = rng.permutation(np.repeat(np.arange(way), shot))  # not class-major
    config = tiny_config()
    trn_d, cmn_d = (methods.build(name, config).class_distances(None, query, support, labels, way)
                    for name in ("trn", "cmn"))

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for i, c in itertools.product(range(4), range(way)):
        members = support[labels == c]
        assert trn_d[i, c] == pytest.approx(1 - cos(query[i], members.mean(0)), abs=1e-5)
        assert cmn_d[i, c] == pytest.approx(1 - max(cos(query[i], m) for m in members), abs=1e-5)


def test_class_means_and_minima_follow_the_labels_on_any_axis():
    rng = np.random.default_rng(3)
    labels = np.array([2, 0, 1, 0, 2, 2])
    values = rng.normal(size=(4, 6)).astype(np.float32)
    means = methods.class_means(values, labels, 3, axis=1)
    expected = np.stack([values[:, labels == c].mean(axis=1) for c in range(3)], axis=1)
    np.testing.assert_allclose(means, expected, rtol=1e-6)
    np.testing.assert_allclose(methods.class_means(values.T, labels, 3), expected.T, rtol=1e-6)
    minima = methods.class_minimum(values, labels, 3)
    np.testing.assert_array_equal(minima, np.stack([values[:, labels == c].min(axis=1) for c in range(3)], 1))
    np.testing.assert_array_equal(methods.episode_labels(3, 2), [0, 0, 1, 1, 2, 2])
    values[:, 0] = np.inf  # one class's infinite distance stays in that class
    assert np.isfinite(methods.class_means(values, labels, 3, axis=1)[:, :2]).all()


def _learned_run(scorer):
    """(the tiny config training learned method `scorer` at width 16, checked; the method)."""
    config = tiny_config()
    config.fewshot.scorer = scorer
    config.methods = ml_collections.ConfigDict({scorer: {"dim": 16}})
    validate(config)
    return config, methods.build(scorer, config)


@pytest.mark.parametrize("scorer", ["trn", "cmn"])
def test_video_embeddings_have_the_documented_shapes(scorer):
    # Frame features [..., T, D] -> [..., dim] (TRN++) or [..., M * dim] (CMN++); that training moves every
    # head parameter is tests/test_learning.py's.
    config, method = _learned_run(scorer)
    params = _init_method(method, config.data.num_frames, 128)
    features = jnp.ones((5, config.data.num_frames, 128))
    width = 16 if scorer == "trn" else 16 * method.options.saliencies
    assert jax.eval_shape(method.video_embeddings, params, features).shape == (5, width)
    split = np.ones((7, config.data.num_frames, 128), np.float32)
    cached = evaluate.method_embeddings((method,), params, split)
    assert cached[scorer].shape == (7, width)


@pytest.mark.parametrize("scorer", ["trn", "trx"])
def test_a_run_initialises_its_head_in_one_program_with_the_methods_values(scorer):
    config, method = _learned_run(scorer)
    with lowered_programs() as lowered:
        params = train_state.initial_head(config, method)
    assert len(lowered) == 1
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    expected = _init_method(method, config.data.num_frames, models.feature_dim(config.model.arch), rng)
    jax.tree.map(np.testing.assert_array_equal, params, expected)  # and the same tree


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
    config = tiny_config()
    scorers = (methods.build("cmn", config), methods.build("tsn", config))
    result = evaluate.evaluate_embeddings(
        {"frames": embeddings, "cmn": vectors}, labels, way=5, shot=1, queries=2, num_episodes=8, seed=0,
        scorers=scorers, episodes_per_batch=4, show_progress=False,
    )
    assert result["cmn"].tolist() == [1.0] * 8  # the head's embeddings separate the classes
    assert result["tsn"].mean() < 1.0


def test_method_options_default_are_checked_and_reach_the_method():
    config = tiny_config()
    assert methods.build("trx", config).options.dim == 1152  # the default: methods.get("trx").defaults
    config.methods = ml_collections.ConfigDict({"trx": {"dim": 32, "tuple_sizes": "2"}})
    config.fewshot.scorer = "trx"
    validate(config)
    trx = methods.build("trx", config)
    assert trx.module.tuple_sizes == (2,) and trx.options.dim == 32
    for key, value, match in [("dim", 0, "must be >= 1"), ("tuple_sizes", "2,2", "distinct"),
                              ("tuple_sizes", "9", "data.num_frames >= 9"),
                              ("colour", 1, "no option 'colour'")]:
        bad = config.copy_and_resolve_references()
        bad.methods.trx[key] = value
        with pytest.raises(ValueError, match=rf"config\.methods\.trx.*{match}"):
            validate(bad)
    config.fewshot.scorer = "otam"
    with pytest.raises(ValueError, match="not a registered method"):
        validate(config)


def test_every_registered_method_scores_an_episode_with_its_documented_shapes():
    config = tiny_config()
    rng = np.random.default_rng(4)
    support = rng.normal(size=(6, 4, 8)).astype(np.float32)
    query = rng.normal(size=(5, 4, 8)).astype(np.float32)
    labels = np.array([1, 0, 2, 0, 1, 2])
    order = np.array([5, 3, 1, 0, 4, 2])

    @functools.partial(jax.jit, static_argnums=0)
    def both_orders(method, params):
        embed = functools.partial(method.video_embeddings, params)
        return (method.class_distances(params, embed(query), embed(support), labels, 3),
                method.class_distances(params, embed(query), embed(support[order]), labels[order], 3))

    for name in methods.names():
        method = methods.build(name, config)
        params = _init_method(method, 4, 8)
        assert (params is not None) == method.learned, name
        distances, reordered = both_orders(method, params)
        assert distances.shape == (5, 3) and np.isfinite(distances).all(), name
        # The order of the support videos does not matter, only their labels.
        np.testing.assert_allclose(reordered, distances, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_plugin_that_fails_or_clashes_is_one_config_error(tmp_path, monkeypatch):
    (tmp_path / "clashing_plugin.py").write_text(
        "from tam_jax import methods\n\n@methods.register\nclass Mine(methods.Method):\n    name = 'tam'\n")
    (tmp_path / "broken_plugin.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="'clashing_plugin' failed: ValueError: A method named 'tam'"):
        methods.import_plugins("clashing_plugin")
    with pytest.raises(ValueError, match="importing 'broken_plugin' failed: SyntaxError"):
        methods.import_plugins("broken_plugin")
    assert methods.get("tam").__module__ == "tam_jax.methods.scorers"
