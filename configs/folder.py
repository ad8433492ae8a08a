"""A user's own dataset of frame folders (or video files with `--config.data.kind=videos`).

    python -m tam_jax.main --config=configs/folder.py:shot=5 --workdir=runs/mine \
        --config.data.root=DATA_DIR --config.data.split_dir=SPLIT_DIR

DATA_DIR holds `<class>/<video>/<numbered>.jpg` (or `<class>/<video>.mp4`); SPLIT_DIR holds one list per
split in the `class/video` format, each found by the word train, val or test in its file name
(`trainlist03.txt`, `test.txt`, ...). The model defaults to an ImageNet ResNet-50 at weights/resnet50.
"""

from tam_jax.configuration import default_config, parse_config_arg


def get_config(arg=None):
    args = parse_config_arg(arg, shot=1)
    c = default_config()
    c.data.kind = "frames"
    c.model.init_from = "weights/resnet50"
    c.fewshot.shot = args["shot"]
    return c
