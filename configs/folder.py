"""A user's own dataset of frame folders (or video files with `--config.data.kind=videos`).

    python -m tam_jax.main --config=configs/folder.py:shot=5 --workdir=runs/mine --config.data.root=DATA_DIR

with DATA_DIR/{train,val,test}/<class>/<video>/ (frame folders) or .../<video>.mp4 (videos); or, with split
lists, add `--config.data.split_dir=SPLIT_DIR`. The layouts read, the split-list formats and what a
missing video does are in docs/data.md ("Layouts"). The model starts from an ImageNet ResNet-50 at
weights/resnet50 (`python -m tam_jax.tools.import_weights`); `--config.model.init_from=` trains from scratch.
"""

from tam_jax.configuration import apply_config_arg, default_config


def get_config(arg=None):
    c = default_config()
    c.data.kind = "frames"
    c.model.init_from = "weights/resnet50"
    return apply_config_arg(c, arg)  # shot=N, way=N
