"""UCF101 few-shot (ARN split: 70/10/21 classes), with the paper's settings.

    python -m tam_jax.main --config=configs/ucf101.py:shot=5 --workdir=runs/ucf101_5shot \
        --config.data.root=FRAMES_DIR --config.data.split_dir=SPLIT_LIST_DIR

See `tam_jax.dataset_configs` for what is set and README.md for the data layouts.
"""

from tam_jax.dataset_configs import paper_config


def get_config(arg=None):
    return paper_config("ucf101", arg)
