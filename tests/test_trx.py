"""TRX (tam_jax.methods.trx) against a loop-by-loop NumPy transcription of its equations, plus gradients,
tuple counts, dropout and the input checks. Small dims (T=4..8, D=16, d_k=8), CPU, in-process."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tam_jax.methods import trx

FEATURES, DIM = 16, 8


def episode(seed, way, shots, num_frames, num_query=3, shuffle=True):
    """Random support `[Ns, T, D]`, labels `[Ns]` (shuffled, not class-major, when `shuffle`), query.

    `shots` is an int (the same for every class) or one count per class."""
    rng = np.random.default_rng(seed)
    counts = [shots] * way if isinstance(shots, int) else list(shots)
    labels = np.repeat(np.arange(way), counts).astype(np.int32)
    if shuffle:
        labels = rng.permutation(labels)
    support = rng.normal(size=(len(labels), num_frames, FEATURES)).astype(np.float32)
    query = rng.normal(size=(num_query, num_frames, FEATURES)).astype(np.float32)
    return support, labels, query


@functools.partial(jax.jit, static_argnames=("model", "way", "deterministic"))
def apply(model, params, support, labels, query, way, deterministic=True, dropout_rng=None):
    """`model.apply`, jitted: one compilation per model and shapes (eager op-by-op dispatch is slow)."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    variables = {"params": params}
    return model.apply(variables, support, labels, query, way=way, deterministic=deterministic, rngs=rngs)


def init_params(model, support, labels, query, way, seed=0):
    """Random parameters of the module's shapes (from `jax.eval_shape` of its init, which compiles nothing):
    kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.3^2), LayerNorm scales ~ 1 + N(0, 0.3^2)."""
    init = functools.partial(model.init, way=way)
    shapes = jax.eval_shape(init, jax.random.key(0), support, labels, query)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        x = rng.normal(size=leaf.shape)
        x = x / np.sqrt(leaf.shape[0]) if name == "kernel" else 1.0 + 0.3 * x if name == "scale" else 0.3 * x
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def reference_distances(params, support, labels, query, way, sizes, combine="mean", pe_scale=0.1):
    """TRX written out with Python loops over queries, classes and tuples, in float64 NumPy."""
    support, query = np.asarray(support, np.float64), np.asarray(query, np.float64)
    num_frames, features = support.shape[1:]
    encoding = np.zeros((num_frames, features))
    for t in range(num_frames):
        for i in range(0, features, 2):
            angle = t / 10000 ** (i / features)
            encoding[t, i] = math.sin(angle) * pe_scale
            if i + 1 < features:
                encoding[t, i + 1] = math.cos(angle) * pe_scale

    per_size = []
    for w in sizes:
        p = jax.tree.map(lambda x: np.asarray(x, np.float64), params[f"tuples_{w}"])

        def key(x, p=p):
            k = x @ p["key"]["kernel"] + p["key"]["bias"]
            k = (k - k.mean()) / math.sqrt(k.var() + 1e-5)
            return k * p["key_norm"]["scale"] + p["key_norm"]["bias"]

        def value(x, p=p):
            return x @ p["value"]["kernel"] + p["value"]["bias"]

        def tuple_vector(video, combo):
            return np.concatenate([video[t] + encoding[t] for t in combo])

        combos = list(itertools.combinations(range(num_frames), w))
        support_tuples = {}  # (video, combo) -> (key, value)
        for n in range(len(support)):
            for combo in combos:
                x = tuple_vector(support[n], combo)
                support_tuples[n, combo] = key(x), value(x)
        distances = np.zeros((len(query), way))
        for qi in range(len(query)):
            for c in range(way):
                total = 0.0
                for combo in combos:
                    x = tuple_vector(query[qi], combo)
                    query_key, query_value = key(x), value(x)
                    scores, values = [], []
                    for n in range(len(support)):
                        if labels[n] != c:
                            continue
                        for support_combo in combos:
                            k, v = support_tuples[n, support_combo]
                            scores.append(np.dot(query_key, k) / math.sqrt(len(k)))
                            values.append(v)
                    scores = np.array(scores)
                    attention = np.exp(scores - scores.max())
                    attention /= attention.sum()
                    prototype = sum(a * v for a, v in zip(attention, values, strict=True))
                    total += np.sum((query_value - prototype) ** 2)
                distances[qi, c] = total / len(combos)
        per_size.append(distances)
    stacked = np.stack(per_size, axis=-1)
    return {"mean": stacked.mean(-1), "sum": stacked.sum(-1), "norm": np.sqrt((stacked**2).sum(-1))}[combine]


@pytest.mark.parametrize(
    "way, shots, num_frames, sizes, combine",
    [
        (3, 1, 5, (2, 3), "mean"),
        (5, 1, 4, (2, 3), "sum"),
        (3, 5, 5, (2, 3), "norm"),
        (5, 5, 4, (2, 3), "mean"),
        (3, (1, 3, 2), 6, (1, 2, 4), "mean"),  # unequal shots per class
    ],
)
def test_matches_loop_reference(way, shots, num_frames, sizes, combine):
    support, labels, query = episode(way * 10 + num_frames, way, shots, num_frames)
    model = trx.TRX(dim=DIM, tuple_sizes=sizes, combine=combine)
    params = init_params(model, support, labels, query, way)
    got = apply(model, params, support, labels, query, way)
    assert got.shape == (len(query), way) and got.dtype == jnp.float32
    want = reference_distances(params, support, labels, query, way, sizes, combine)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_support_order_does_not_matter():
    support, labels, query = episode(2, 5, 5, 6, shuffle=False)  # class-major
    model = trx.TRX(dim=DIM)
    params = init_params(model, support, labels, query, 5)
    base = apply(model, params, support, labels, query, 5)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(labels))
        permuted = apply(model, params, support[order], labels[order], query, 5)
        np.testing.assert_allclose(permuted, base, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_float32_distances():
    support, labels, query = episode(5, 3, 1, 5)
    model = trx.TRX(dim=DIM)
    params = init_params(model, support, labels, query, 3)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (support, query)]
    got = apply(model, params, low[0], labels, low[1], 3)
    assert got.dtype == jnp.float32
    want = apply(model, params, low[0].astype(jnp.float32), labels, low[1].astype(jnp.float32), 3)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gradients_match_finite_differences():
    support, labels, query = episode(6, 3, 2, 4)
    model = trx.TRX(dim=DIM)
    params = init_params(model, support, labels, query, 3)
    with jax.enable_x64(True):
        args = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params, support, query))

        def distances(params, support, query):
            return apply(model, params, support, labels, query, 3)

        assert distances(*args).dtype == jnp.float64
        check_grads(distances, args, order=1, modes=("rev",), eps=1e-5, atol=1e-5, rtol=1e-5)


def test_tuple_counts():
    pairs, triples = trx.tuple_indices(8, 2), trx.tuple_indices(8, 3)
    assert pairs.shape == (28, 2) and triples.shape == (56, 3)
    for tuples in (pairs, triples):
        assert np.all(np.diff(tuples, axis=1) > 0)  # ordered: t1 < t2 (< t3)
        assert len({tuple(t) for t in tuples}) == len(tuples)
    support, labels, query = episode(7, 3, 1, 8)
    init = functools.partial(trx.TRX(dim=DIM).init, way=3)
    params = jax.eval_shape(init, jax.random.key(0), support, labels, query)["params"]
    assert params["tuples_2"]["key"]["kernel"].shape == (2 * FEATURES, DIM)
    assert params["tuples_3"]["value"]["kernel"].shape == (3 * FEATURES, DIM)


def test_dropout_only_when_not_deterministic():
    support, labels, query = episode(8, 3, 2, 6)
    model = trx.TRX(dim=DIM, dropout=0.1)
    params = init_params(model, support, labels, query, 3)
    fixed = [apply(model, params, support, labels, query, 3, deterministic=True) for _ in range(2)]
    np.testing.assert_array_equal(fixed[0], fixed[1])
    dropped = [
        apply(model, params, support, labels, query, 3, deterministic=False, dropout_rng=jax.random.key(seed))
        for seed in (1, 2, 1)
    ]
    assert not np.allclose(dropped[0], dropped[1])
    assert not np.allclose(dropped[0], fixed[0])
    np.testing.assert_array_equal(dropped[0], dropped[2])  # the same rng, the same masks


def test_bad_inputs_name_what_to_fix():
    support, labels, query = episode(9, 3, 1, 4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="support_labels must cover each class"):
        trx.TRX(dim=DIM).init(key, support, labels, query, way=4)
    with pytest.raises(ValueError, match="tuple_sizes"):
        trx.TRX(dim=DIM, tuple_sizes=(2, 5)).init(key, support, labels, query, way=3)
    with pytest.raises(ValueError, match="combine"):
        trx.TRX(dim=DIM, combine="max").init(key, support, labels, query, way=3)
