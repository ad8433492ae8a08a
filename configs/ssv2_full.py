"""Something-Something-V2 full (the TAM paper's split, 64/12/24 classes), with the paper's settings.

    python -m tam_jax.main --config=configs/ssv2_full.py:shot=5 --workdir=runs/ssv2_full_5shot \
        --config.data.root=FRAMES_DIR --config.data.split_dir=SPLIT_LIST_DIR

The paper's settings are in configs/common.py; data layouts in docs/data.md.
"""

from configs import common


def get_config(arg=None):
    return common.paper_config(tfds_name="ssv2_fewshot/full", flip=False, arg=arg)
