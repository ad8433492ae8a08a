"""Backbones (torchvision-layout ResNets), the frame embedder and backbone files."""

from tam_jax.models.backbone_files import load_backbone, read_backbone_metadata, save_backbone
from tam_jax.models.embedder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrameEmbedder,
    build_embedder,
    embedder_variables_from_backbone,
    normalize_imagenet,
)
from tam_jax.models.resnet import ARCHS, ResNet, create_backbone, feature_dim

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FrameEmbedder",
    "ResNet",
    "build_embedder",
    "create_backbone",
    "embedder_variables_from_backbone",
    "feature_dim",
    "load_backbone",
    "normalize_imagenet",
    "read_backbone_metadata",
    "save_backbone",
]
