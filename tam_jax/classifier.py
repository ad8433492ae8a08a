"""Deprecated: renamed `tam_jax.inference` (this alias will be removed in the next release)."""

import warnings

from tam_jax.checkpoints import CheckpointMismatchError  # noqa: F401
from tam_jax.inference import (  # noqa: F401
    FewShotClassifier,
    Prediction,
    Predictions,
    SupportError,
    SupportSet,
    TrainedModel,
    class_distances,
    find_support_clips,
    load_trained_model,
)

warnings.warn("tam_jax.classifier is renamed tam_jax.inference; update the import.", FutureWarning,
              stacklevel=2)
