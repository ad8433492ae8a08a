"""The paper's settings for its datasets, shared by the dataset files in `configs/`.

Each config file is `get_config(arg)` -> `paper_config(dataset, arg)`; `arg` takes `shot=1` or `shot=5`.
The user supplies the data (`--config.data.root`, `--config.data.split_dir`, or a TFDS build) and an
ImageNet backbone from `python -m tam_jax.tools.import_weights` at `weights/resnet50` (or elsewhere via
`--config.model.init_from`).
"""

from __future__ import annotations

import ml_collections

from tam_jax.configuration import apply_config_arg, default_config

# dataset -> (TFDS name, horizontal flips, the public split lists it is usually trained with)
DATASETS = {
    "kinetics": ("kinetics100_fewshot", True, "kinetics_CMN"),
    "ssv2_full": ("ssv2_fewshot/full", False, "ssv2_OTAM"),
    "ssv2_small": ("ssv2_fewshot/small", False, "ssv2_CMN"),
    "ucf101": ("", True, "ucf_ARN"),
    "hmdb51": ("", True, "hmdb_ARN"),
}


def paper_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's Sec. 4.1-4.2: ResNet-50 from ImageNet, T=8, frames resized to 256 x 256 then cropped to
    224, 5-way, SGD lr 0.001 momentum 0.9, x0.1 every 30 epochs; test episodes of one query per class
    (n(k+1) videos), 10,000 of them.

    Training episodes keep `fewshot.queries` = 5 per class (the paper does not give its training count).
    `--config.data.square_resize=False` resizes the short side to 256 and keeps the aspect ratio instead.

    How a step runs (devices, micro-batches, chunks, remat) is not set here: `tam_jax.plan` chooses the
    fastest that fits at start (`--mode=plan` shows it).
    """
    tfds_name, flip, _ = DATASETS[dataset]
    c = default_config()
    c.data.kind = "frames"
    c.data.tfds_name = tfds_name
    c.data.flip = flip  # Something-Something's labels say left and right: no flips there
    c.data.square_resize = True  # "resize each frame to 256 x 256" (Sec. 4.2), then the 224 crop
    c.model.arch = "resnet50"
    c.model.init_from = "weights/resnet50"
    c.eval.queries = 1  # n queries per test episode, one per class
    c.eval.num_episodes = 10_000
    # Not the paper's (float32): bfloat16 activations, float32 parameters and loss; the memory plan
    # (episodes per device at once, chunks, remat) is chosen at start for the GPU the run lands on.
    c.model.dtype = "bfloat16"
    return apply_config_arg(c, arg)  # shot=N, way=N
