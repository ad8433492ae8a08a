"""Something-Something-V2 small (CMN split: 64/12/24 classes of 100 videos), with the paper's settings.

    python -m tam_jax.main --config=configs/ssv2_small.py:shot=5 --workdir=runs/ssv2_small_5shot \
        --config.data.root=FRAMES_DIR --config.data.split_dir=SPLIT_LIST_DIR

The paper's settings are in configs/common.py; data layouts in docs/data.md.
"""

from configs import common


def get_config(arg=None):
    return common.paper_config(tfds_name="ssv2_fewshot/small", flip=False, arg=arg)
