"""The paper's settings for its datasets, shared by the dataset files in `configs/`.

Each config file is `get_config(arg)` -> `paper_config(dataset, arg)`; `arg` takes `shot=1` or `shot=5`.
The user supplies the data (`--config.data.root`, `--config.data.split_dir`, or a TFDS build) and an
ImageNet backbone from `python -m tam_jax.tools.import_weights` at `weights/resnet50` (or elsewhere via
`--config.model.init_from`).
"""

from __future__ import annotations

import ml_collections

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
    """ResNet-50 from ImageNet, T=8, 224 crops, 5-way, SGD lr 0.001 momentum 0.9, x0.1 every 30 epochs."""
    args = parse_config_arg(arg, shot=1)
    tfds_name, flip, _ = DATASETS[dataset]
    c = default_config()
    c.data.kind = "frames"
    c.data.tfds_name = tfds_name
    c.data.flip = flip  # Something-Something's labels say left and right: no flips there
    c.model.arch = "resnet50"
    c.model.init_from = "weights/resnet50"
    c.fewshot.shot = args["shot"]
    return c
