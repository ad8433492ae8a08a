"""The paper's settings for its datasets, shared by the dataset files in `configs/`.

Each config file is `get_config(arg)` -> `paper_config(dataset, arg)`; `arg` takes `shot=1` or `shot=5`.
The user supplies the data (`--config.data.root`, `--config.data.split_dir`, or a TFDS build) and an
ImageNet backbone from `python -m tam_jax.tools.import_weights` at `weights/resnet50` (or elsewhere via
`--config.model.init_from`).
"""

from __future__ import annotations

import ml_collections

from tam_jax import frame_chunks
from tam_jax.configuration import default_config, parse_config_arg

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

    Memory: 4 episodes per step accumulated one episode per device at a time, bfloat16 activations;
    1-shot: remat "block"; 5-shot (400 frames an episode): chunks of 5 videos, each recomputed alone.
    """
    args = parse_config_arg(arg, shot=1)
    tfds_name, flip, _ = DATASETS[dataset]
    c = default_config()
    c.data.kind = "frames"
    c.data.tfds_name = tfds_name
    c.data.flip = flip  # Something-Something's labels say left and right: no flips there
    c.data.square_resize = True  # "resize each frame to 256 x 256" (Sec. 4.2), then the 224 crop
    c.model.arch = "resnet50"
    c.model.init_from = "weights/resnet50"
    c.fewshot.shot = args["shot"]
    c.eval.queries = 1  # n queries per test episode, one per class
    c.eval.num_episodes = 10_000
    # Memory (benchmarks/README.md, "Memory"): one episode per device at a time, 4 per step by accumulation,
    # bfloat16 activations. 1-shot: blocks recomputed in the backward pass (9.7 GiB per device by XLA:CPU's
    # analysis). 5-shot: blocks alone leave 15.9 GiB, so the episode's 50 videos are embedded in 10 chunks
    # of 5, each recomputed alone (6.4 GiB), for the same compute (one more forward pass either way). Both
    # fit the paper's 12 GB cards.
    c.train.episodes_per_device_step = 1
    c.model.dtype = "bfloat16"
    c.model.remat = "block"
    if c.fewshot.shot > 1:
        c.model.remat = "none"
        c.train.embed_chunks = frame_chunks.chunks_for(c, 5)
    return c
