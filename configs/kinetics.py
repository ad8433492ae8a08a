"""Kinetics-100 (CMN split: 64/12/24 classes of 100 videos), with the paper's settings.

    python -m tam_jax.main --config=configs/kinetics.py:shot=5 --workdir=runs/kinetics_5shot \
        --config.data.root=FRAMES_DIR --config.data.split_dir=SPLIT_LIST_DIR

See `tam_jax.dataset_configs` for what is set and README.md for the data layouts.
"""

from tam_jax.dataset_configs import paper_config


def get_config(arg=None):
    return paper_config("kinetics", arg)
