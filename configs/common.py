"""The paper's settings for its datasets (Sec. 4.1-4.2), shared by kinetics.py, ssv2_*.py, ucf101.py and
hmdb51.py. Every other key keeps its default from `tam_jax.configuration.default_config`, which holds the
paper's training settings: 5-way, T = 8, SGD lr 0.001 momentum 0.9, x0.1 every 30 epochs, lambda 0.1.

The user supplies the data (`--config.data.root`, `--config.data.split_dir`, or a TFDS build) and an
ImageNet backbone from `python -m tam_jax.tools.import_weights` at `weights/resnet50` (or elsewhere via
`--config.model.init_from`). How a step runs (devices, micro-batches, chunks, remat) is not set here:
`tam_jax.plan` chooses the fastest that fits at start (`--mode=plan` shows it).
"""

import ml_collections

from tam_jax.configuration import apply_config_arg, default_config


def paper_config(*, tfds_name: str, flip: bool, arg: str | None) -> ml_collections.ConfigDict:
    """The paper's setting on one dataset; `arg` is the config string (`shot=5`, `way=10`)."""
    c = default_config()
    c.data.kind = "frames"
    c.data.tfds_name = tfds_name  # with --config.data.kind=tfds
    c.data.flip = flip  # Something-Something's labels say left and right: no flips there
    c.data.square_resize = True  # "resize each frame to 256 x 256" (Sec. 4.2), then the 224 crop
    c.data.resize = 256
    c.data.image_size = 224
    c.data.num_frames = 8
    c.model.arch = "resnet50"
    c.model.init_from = "weights/resnet50"
    c.fewshot.way = 5
    c.fewshot.queries = 5  # training episodes (the paper does not give its count)
    c.eval.queries = 1  # n queries per test episode, one per class: n(k+1) videos
    c.eval.num_episodes = 10_000
    # Not the paper's (float32): bfloat16 activations, float32 parameters and loss.
    c.model.dtype = "bfloat16"
    return apply_config_arg(c, arg)  # shot=N, way=N
