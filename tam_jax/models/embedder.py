"""Frame embedder: `[B, T, H, W, 3]` video frames -> `[B, T, D]` per-frame features (TSN style).

ImageNet normalisation lives here and nowhere else in the package. Data pipelines hand over raw
RGB frames, uint8 in [0, 255] (or float in the same range); `normalize_imagenet` rescales them to
[0, 1] and applies torchvision's per-channel mean/std, which is what ImageNet-pretrained
torchvision weights expect. Backbones (`create_backbone`, `load_backbone`) take images that are
already normalised.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from tam_jax.models.resnet import create_backbone

# torchvision's ImageNet statistics, for RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONE_NAME = "backbone"


def normalize_imagenet(frames: jnp.ndarray) -> jnp.ndarray:
    """`[..., 3]` RGB in [0, 255] (uint8 or float) -> float32 `(x / 255 - mean) / std`."""
    chex.assert_axis_dimension(frames, -1, 3)
    x = jnp.asarray(frames, jnp.float32) / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class FrameEmbedder(nn.Module):
    """One backbone shared by all frames: `[B, T, H, W, 3]` in [0, 255] -> `[B, T, D]` float32.

    The backbone is the submodule `backbone`, so its variables sit under
    `variables[collection]["backbone"]`; `embedder_variables_from_backbone` builds that nesting
    from `load_backbone`'s variables.

    Attributes:
      arch: backbone architecture, see `tam_jax.models.ARCHS`.
      dtype: computation dtype; parameters stay float32 and features come out float32.
      freeze_bn: BatchNorm uses its running statistics even when `train=True`.
      remat: the backbone's rematerialisation in training ("none", "block" or a checkpoint policy name,
        see `tam_jax.models.resnet.ResNet`); memory and time only, never the values.
    """

    arch: str = "resnet50"
    dtype: Any = jnp.float32
    freeze_bn: bool = False
    remat: str = "none"

    def setup(self):
        self.backbone = create_backbone(self.arch, dtype=self.dtype, freeze_bn=self.freeze_bn,
                                        remat=self.remat)

    def __call__(self, frames: jnp.ndarray, train: bool) -> jnp.ndarray:
        chex.assert_rank(frames, 5)
        b, t = frames.shape[:2]
        images = normalize_imagenet(frames.reshape((b * t,) + frames.shape[2:]))
        features = self.backbone(images, train=train)
        return features.reshape(b, t, -1).astype(jnp.float32)


def embedder_variables_from_backbone(variables: dict) -> dict:
    """Nest backbone variables {"params": P, "batch_stats": S} as a `FrameEmbedder`'s.

    Returns {"params": {"backbone": P}, "batch_stats": {"backbone": S}}; other collections are
    nested the same way.
    """
    return {collection: {BACKBONE_NAME: tree} for collection, tree in variables.items()}


def build_embedder(model_config) -> FrameEmbedder:
    """The embedder `config.model` describes (arch, dtype, freeze_bn, remat).

    remat "auto" (left to a training run's plan, `tam_jax.plan`) builds with none: only a train step
    differentiates, and it is built from the planned config.
    """
    remat = model_config.remat
    return FrameEmbedder(arch=model_config.arch, dtype=jnp.dtype(model_config.dtype),
                         freeze_bn=model_config.freeze_bn, remat="none" if remat == "auto" else remat)
