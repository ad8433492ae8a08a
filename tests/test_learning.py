"""Training learns: the loss is Eq. 8 by hand, a few steps on a fixed batch fit it for every trainable
scorer, the baselines get below the flat-softmax floor, and the optimiser follows the configured schedule
and momentum.

The reference loss and accuracy here are computed in NumPy from the class distances, independently of
`train_step.episode_loss`'s logits, loss and metrics: a wrong sign or scale there cannot fool them.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tam_jax import alignment, fewshot, hosts, methods, models, train_state, train_step
from tests.helpers import tiny_config

WAY = 5


def learning_config(scorer: str, num_steps: int = 6):
    """5-way 1-shot, 1 query per class, T=4 frames of 16 pixels, 2 episodes a step on 1 device, Adam."""
    config = tiny_config(num_steps=num_steps)
    config.mesh.num_devices = 1
    config.data.resize = config.data.image_size = 16
    config.fewshot.queries = 1
    config.train.episodes_per_step = 2
    config.train.optimizer = "adam"
    config.train.schedule = "constant"
    config.train.learning_rate = 1e-2
    config.fewshot.scorer = scorer
    config.methods = ml_collections.ConfigDict({scorer: {"dim": 16}} if methods.get(scorer).learned else {})
    return config


def fixed_batch(config, noise: float = 60.0, seed: int = 0) -> dict:
    """Each class a random base video; its support and query videos are the base plus pixel noise."""
    rng = np.random.default_rng(seed)
    episodes, way = config.train.episodes_per_step, config.fewshot.way
    clip = (config.data.num_frames, config.data.image_size, config.data.image_size, 3)
    base = rng.integers(0, 256, (episodes, way, *clip)).astype(np.float32)

    def videos(per_class):
        noisy = np.repeat(base, per_class, axis=1) + rng.normal(0, noise, (episodes, way * per_class, *clip))
        return np.clip(noisy, 0, 255).astype(np.uint8)

    labels = np.repeat(np.arange(way), config.fewshot.queries)
    return {"support": videos(config.fewshot.shot), "query": videos(config.fewshot.queries),
            "query_labels": np.tile(labels, (episodes, 1)).astype(np.int32)}


def distance_fn(config, model):
    """A jitted `(params, batch_stats, batch) -> [E, Nq, way]` class distances of the batch's queries, the
    videos embedded as the train step embeds them (BatchNorm on the batch's statistics)."""
    method = methods.build(config.fewshot.scorer, config)
    way, shot = config.fewshot.way, config.fewshot.shot
    labels = methods.episode_labels(way, shot)

    @jax.jit
    def distances(params, batch_stats, batch):
        support, query = batch["support"], batch["query"]
        episodes, num_support = support.shape[:2]
        videos = jnp.concatenate([support, query], axis=1).reshape((-1,) + support.shape[2:])
        variables = {"params": params["embedder"], "batch_stats": batch_stats}
        features = model.apply(variables, videos, train=True, mutable=["batch_stats"])[0]
        features = features.reshape(episodes, -1, *features.shape[1:])
        head = params.get("head")
        vectors = jax.vmap(lambda f: method.video_embeddings(head, f))(features)
        score = lambda q, s: method.class_distances(head, q, s, labels, way)
        return jax.vmap(score)(vectors[:, num_support:], vectors[:, :num_support]), features

    def run(params, batch_stats, batch):
        """-> (float64 distances `[E, Nq, way]`, float64 frame features `[E, way*shot + Nq, T, D]`)."""
        return jax.tree.map(lambda x: np.asarray(x, np.float64), distances(params, batch_stats, batch))

    return run


def eq8_loss(distances: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Eq. 8 by hand: mean over queries of -log(exp(-d_y / t) / sum_c exp(-d_c / t))."""
    logits = -distances / temperature
    log_normaliser = np.log(np.sum(np.exp(logits), axis=-1))
    picked = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return float(np.mean(log_normaliser - picked))


def nearest_class_accuracy(distances: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmin(distances, axis=-1) == labels))


def train_on_fixed_batch(config, batch):
    """(initial state, final state, per-step metrics) after `train.num_steps` steps on `batch`."""
    mesh = hosts.make_mesh(config.mesh.num_devices)
    model = models.build_embedder(config.model)
    optimizer = train_state.make_optimizer(config)
    state = train_state.create_train_state(config, model, optimizer, mesh)
    initial = jax.device_get(state)
    step = train_step.make_train_step(config, model, optimizer, mesh)
    sharded = train_step.shard_batch(batch, mesh)
    history = []
    for _ in range(config.train.num_steps):
        state, metrics = step(state, sharded)
        history.append(jax.device_get(metrics))
    return model, initial, jax.device_get(state), history


def test_eq8_by_hand_on_a_two_way_episode():
    distances = jnp.array([[1.0, 3.0], [2.0, 0.5]])  # two queries, labels 0 and 0
    logits = fewshot.logits_from_distances(distances, 0.5)
    np.testing.assert_allclose(logits, [[-2.0, -6.0], [-4.0, -1.0]])
    expected = (math.log1p(math.exp(-4.0)) + (4.0 - 1.0 + math.log1p(math.exp(-3.0)))) / 2
    assert float(fewshot.cross_entropy(logits, jnp.array([0, 0]))) == pytest.approx(expected, rel=1e-6)
    assert float(fewshot.accuracy(logits, jnp.array([0, 0]))) == 0.5


@pytest.mark.parametrize(("scorer", "temperature", "scale"), [("tsn", 2.0, 4), ("tam", 0.5, 1)])
def test_episode_loss_is_eq8_by_hand_with_temperature_and_logit_scale(scorer, temperature, scale):
    # TSN++: the distance is one cosine in [0, 2], multiplied by T = 4 (methods.logit_scale "paper"); TAM's
    # sums T cosines and keeps scale 1.
    config = learning_config(scorer)
    config.fewshot.temperature = temperature
    batch = fixed_batch(config)
    model = models.build_embedder(config.model)
    mesh = hosts.make_mesh(config.mesh.num_devices)
    state = train_state.create_train_state(config, model, train_state.make_optimizer(config), mesh)
    loss_fn = jax.jit(functools.partial(train_step.episode_loss, model=model, config=config))
    loss, (_, metrics) = loss_fn(state.params, state.batch_stats, batch)
    distances, features = distance_fn(config, model)(state.params, state.batch_stats, batch)
    if scorer == "tsn":  # TSN++ by hand: 1 - cos(mean-pooled query, the class's mean-pooled support)
        pooled = features.mean(axis=2)
        unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
        by_hand = 1 - np.einsum("eqd,esd->eqs", unit[:, WAY:], unit[:, :WAY])
        np.testing.assert_allclose(distances, by_hand, rtol=1e-4, atol=1e-5)
    labels = batch["query_labels"]
    assert float(loss) == pytest.approx(eq8_loss(scale * distances, labels, temperature), rel=1e-4)
    assert float(metrics["accuracy"]) == pytest.approx(nearest_class_accuracy(distances, labels))


@pytest.mark.parametrize("scorer", methods.names())
def test_a_few_steps_on_a_fixed_batch_fit_it(scorer):
    config = learning_config(scorer)
    batch = fixed_batch(config)
    labels = batch["query_labels"]
    model, initial, final, history = train_on_fixed_batch(config, batch)
    distances = distance_fn(config, model)
    before = distances(initial.params, initial.batch_stats, batch)[0]
    after = distances(final.params, final.batch_stats, batch)[0]
    # Eq. 8 at temperature 1 and scale 1 by hand: the direction training must move, whatever the scale.
    assert eq8_loss(after, labels, 1.0) < eq8_loss(before, labels, 1.0) - 0.1
    assert nearest_class_accuracy(after, labels) >= 0.8 > 1 / WAY
    if methods.get(scorer).learned:  # every parameter of the method's head gets a gradient
        moved = lambda a, b: not np.allclose(a, b)
        changed = jax.tree.map(moved, initial.params["head"], final.params["head"])
        assert all(jax.tree.leaves(changed)), jax.tree.map(int, changed)
    floor = fewshot.loss_floor(WAY, 2.0)
    # Flat-softmax bound: a [0, 2] distance at logit scale 1 (Table 2's diagonal, mean, min).
    unit = methods.get(scorer).distance_range == "unit"
    bounded = unit and methods.logit_scale(scorer, config.data.num_frames) == 1
    if not bounded:
        assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    else:  # bounded below by the floor: 1.56 -> 0.97 for mean and diagonal when written
        assert history[-1]["loss"] < history[0]["loss"] - 0.3
    if methods.get(scorer).baseline:
        # At scale 1 a [0, 2] distance cannot give a 5-way loss below log(1 + 4 e^-2) = 0.43 (so the
        # baselines trained weakly); scaled by T (methods.logit_scale "paper" for the baselines) it can.
        assert history[-1]["loss"] < floor
    elif bounded:  # Table 2's diagonal, mean, min: Eq. 8 at scale 1
        assert min(record["loss"] for record in history) >= floor - 1e-4


def test_the_flat_softmax_floor():
    floor = fewshot.loss_floor(WAY, 2.0)
    assert floor == pytest.approx(math.log1p(4 * math.exp(-2))) and 0.43 < floor < 0.44
    best_case = fewshot.logits_from_distances(jnp.array([[0.0, 2, 2, 2, 2]]))  # right class 0, others 2
    assert float(fewshot.cross_entropy(best_case, jnp.array([0]))) == pytest.approx(floor, rel=1e-5)
    assert fewshot.loss_floor(WAY, 2.0 * 8) < 1e-6  # T = 8 frames: no floor to speak of


def test_step_schedule_is_the_configured_decay():
    config = tiny_config()
    config.train.schedule = "step"
    config.train.learning_rate = 0.001
    config.train.decay_every_steps = 30_000
    config.train.decay_factor = 0.1
    schedule = train_state.learning_rate_schedule(config)
    for step, expected in [(0, 1e-3), (29_999, 1e-3), (30_000, 1e-4), (59_999, 1e-4), (60_000, 1e-5),
                           (90_000, 1e-6)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step
    config.train.schedule = "cosine"
    config.train.num_steps = 100
    cosine = train_state.learning_rate_schedule(config)
    assert float(cosine(50)) == pytest.approx(0.5e-3, rel=1e-5) and float(cosine(100)) == pytest.approx(0.0)


def test_sgd_momentum_updates_follow_the_step_schedule():
    # v_t = g + m v_{t-1}; update_t = -lr_t v_t, with lr_t = lr * factor ** (t // every): the paper's SGD.
    config = tiny_config()
    config.train.optimizer = "sgd"
    config.train.schedule = "step"
    config.train.learning_rate = 0.1
    config.train.momentum = 0.9
    config.train.decay_every_steps = 2
    config.train.decay_factor = 0.5
    optimizer = train_state.make_optimizer(config)
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    gradient = {"w": jnp.array([1.0, -2.0, 0.5])}
    velocity = np.zeros(3)
    for t in range(6):
        updates, state = optimizer.update(gradient, state, params)
        params = optax.apply_updates(params, updates)
        velocity = np.asarray(gradient["w"]) + 0.9 * velocity
        expected = -0.1 * 0.5 ** (t // 2) * velocity
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-5, err_msg=f"step {t}")


def test_tam_distance_spans_zero_to_two_t():
    # Why TAM keeps scale 1: it sums one cosine distance per support frame (T = 4 here), so [0, 2T].
    same = jnp.zeros((4, 4))
    opposite = jnp.full((4, 4), 2.0)
    assert float(alignment.tam_distance(same, lam=0)) == 0.0
    assert float(alignment.tam_distance(opposite, lam=0)) == pytest.approx(8.0)
