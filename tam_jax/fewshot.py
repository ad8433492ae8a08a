"""Class distances -> logits, loss and accuracy (Eq. 8); the distances come from a method
(`tam_jax.methods`).

Logits (Eq. 8) are -scale * distance / temperature. TAM's distance sums T cosine distances, in [0, 2T];
Table 2's other scorers but plain DTW and Table 1's baselines give one cosine distance (or a mean of them),
in [0, 2], whose softmax at temperature 1 is nearly flat (TRX's squared distances are unbounded): the
lowest 5-way loss it allows is log(1 + 4 e^-2) = 0.43 (`loss_floor`).
`tam_jax.methods.logit_scale` gives each method its factor (config.fewshot.logit_scale): by default the
paper's Eq. 8 for the scorers the paper trains with it, and TAM's range for the baselines it takes from
other papers.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import optax


def logits_from_distances(distances: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """Eq. 8's logits, -distance / temperature: `[..., way]` -> `[..., way]`.

    `temperature` is the effective one: a method's logit scale divides it (`tam_jax.train_state.temperature`).
    """
    return -distances / temperature


def loss_floor(way: int, distance_range: float, temperature: float = 1.0) -> float:
    """The lowest mean cross-entropy (Eq. 8) logits -distance / temperature allow when distances lie in
    [0, distance_range]: the right class at 0 and the way - 1 others at distance_range, for every query.

    `loss_floor(5, 2.0)` = log(1 + 4 e^-2) = 0.432: a [0, 2] scorer at temperature 1.
    """
    return math.log1p((way - 1) * math.exp(-distance_range / temperature))


def bounded_temperature(log_temperature: jax.Array, low: float, high: float) -> jax.Array:
    """A learned temperature exp(log_temperature) clamped to [low, high], scalar -> scalar.

    The clamp is on the logarithm, so exp never overflows; beyond a bound the gradient is 0 and the optimiser
    stops pushing it (a temperature going to 0 makes the logits overflow, to infinity the softmax flat).
    """
    chex.assert_rank(log_temperature, 0)
    if not 0 < low <= high:
        raise ValueError(
            f"Temperature bounds must satisfy 0 < low <= high, got [{low}, {high}] "
            "(config.fewshot.min_temperature, config.fewshot.max_temperature)."
        )
    return jnp.exp(jnp.clip(log_temperature, math.log(low), math.log(high)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over queries (Eq. 8): logits `[..., Nq, way]`, labels `[..., Nq]` int."""
    chex.assert_equal_shape_prefix([logits, labels], labels.ndim)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of queries whose nearest class is right: logits `[..., Nq, way]`, labels `[..., Nq]`."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
