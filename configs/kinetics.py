"""Kinetics-100 (CMN split: 64/12/24 classes of 100 videos), with the paper's settings.

    python -m tam_jax.main --config=configs/kinetics.py:shot=5 --workdir=runs/kinetics_5shot \
        --config.data.root=FRAMES_DIR --config.data.split_dir=SPLIT_LIST_DIR

The paper's settings are in configs/common.py; data layouts in docs/data.md.
"""

from configs import common


def get_config(arg=None):
    return common.paper_config(tfds_name="kinetics100_fewshot", flip=True, arg=arg)
