"""Table 2's scorers: every query video against every support video, frame by frame (`tam_jax.alignment`).

Each compares the T x T frame distances of Eq. 1 (1 - cosine) of a query and a support video: "tam" by the
temporal alignment of Eqs. 5-7 (soft-min at `config.alignment.lam`, optionally both directions), "plain_dtw"
by ordinary DTW, "diagonal" by the mean of the diagonal, "mean" and "min" by the mean and the smallest of
all T^2 entries. A class's distance is the mean over its support videos of the video distance (Eq. 8's
setting for k > 1). None has parameters.
"""

from __future__ import annotations

import jax

from tam_jax import alignment
from tam_jax.methods import Method, class_means, register

_KINETICS_SSV2 = "Cao et al., CVPR 2020, Tables 1 and 2"


class AlignmentScorer(Method):
    """A parameter-free scorer of `tam_jax.alignment.SCORERS`, named by `name`."""

    distance_range = "unit"
    citation = _KINETICS_SSV2

    def __init__(self, config):
        super().__init__(config)
        self.lam = float(config.alignment.lam)
        self.bidirectional = bool(config.alignment.bidirectional and self.name == "tam")

    def settings(self) -> dict:
        return {"lam": self.lam, "bidirectional": self.bidirectional}

    def with_lam(self, lam: float) -> AlignmentScorer:
        """The same scorer at soft-min temperature `lam` (`visualize`'s lambda sweep)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__, lam=float(lam))
        return copy

    def class_distances(self, params, query, support, support_labels, num_classes, *, rng=None) -> jax.Array:
        frame_distances = alignment.cosine_distance(query[:, None], support[None])  # [Nq, Ns, Tq, Ts], Eq. 1
        per_video = alignment.alignment_distance(frame_distances, self.name, self.lam, self.bidirectional)
        return class_means(per_video, support_labels, num_classes, axis=1)


@register
class TAM(AlignmentScorer):
    name, label, aligns, distance_range = "tam", "TAM", True, "frames"
    tables = {1: 4, 2: 5}
    published = {"kinetics": (73.0, 85.8), "ssv2_full": (42.8, 52.3)}


@register
class PlainDTW(AlignmentScorer):
    tables = {2: 4}
    name, label, aligns, distance_range = "plain_dtw", "Plain DTW", True, "frames"
    published = {"kinetics": (69.2, 80.6), "ssv2_full": (39.6, 49.0)}


@register
class Diagonal(AlignmentScorer):
    tables = {2: 3}
    name, label = "diagonal", "Diagonal"
    published = {"kinetics": (66.2, 79.3), "ssv2_full": (38.3, 48.7)}


@register
class Mean(AlignmentScorer):
    tables = {2: 2}
    name, label = "mean", "Mean"
    published = {"kinetics": (67.8, 78.9), "ssv2_full": (35.2, 45.3)}


@register
class Min(AlignmentScorer):
    tables = {2: 1}
    name, label = "min", "Min"
    published = {"kinetics": (52.4, 71.6), "ssv2_full": (29.7, 38.5)}
