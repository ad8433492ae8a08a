"""HMDB51 few-shot (ARN split: 31/10/10 classes), with the paper's settings.

    python -m tam_jax.main --config=configs/hmdb51.py:shot=5 --workdir=runs/hmdb51_5shot \
        --config.data.root=FRAMES_DIR --config.data.split_dir=SPLIT_LIST_DIR

The paper's settings are in configs/common.py; data layouts in docs/data.md.
"""

from configs import common


def get_config(arg=None):
    return common.paper_config(tfds_name="", flip=True, arg=arg)
