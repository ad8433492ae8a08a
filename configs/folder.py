"""A user's own dataset of frame folders (or video files with `--config.data.kind=videos`).

Split folders, as the public PyTorch few-shot codebases lay data out (no split lists needed):

    python -m tam_jax.main --config=configs/folder.py:shot=5 --workdir=runs/mine --config.data.root=DATA_DIR

    DATA_DIR/train/<class>/<video>/00000001.jpg     (kind "frames": a folder of numbered JPEGs per video)
    DATA_DIR/train/<class>/<video>.mp4              (kind "videos": .mp4 .webm .avi .mkv .mov)
    DATA_DIR/val/...  DATA_DIR/test/...             (or train_256/, val_256/, test_256/)

A split's classes are its sub-folders (sorted by name), their videos the entries inside; the run logs
"Reading split folders: DATA_DIR/train, N classes, M videos". With split lists instead:

    python -m tam_jax.main --config=configs/folder.py:shot=5 --workdir=runs/mine \
        --config.data.root=DATA_DIR --config.data.split_dir=SPLIT_DIR

SPLIT_DIR holds one list per split, each found by the word train, val or test in its file name
(`trainlist03.txt`, `test.txt`, ...), in the `<class>/<video>` format (CMN/ARN lists) or the
`<split><index>/<video>` format (the OTAM SSv2 lists, e.g. `test0/10430`). A listed video is looked up as
DATA_DIR/<class>/<video>, DATA_DIR/<video>, and both inside the split's folder: `test0/10430` of the test
list is found at DATA_DIR/test/test0/10430 (or DATA_DIR/test_256/...).

Hidden entries (`.DS_Store`, `._*`, `.ipynb_checkpoints`) are never classes, videos or frames; a frame
folder that also holds optical flow (`img_00001.jpg` beside `flow_x_00001.jpg` / `flow_y_...`, or `x_` /
`y_`) is read as its RGB frames. A listed video that is missing is skipped, its skip entry naming the paths
tried; a split none of whose videos is found stops the run, saying which layouts were tried and what was
seen on disk (e.g. "found DATA/ssv2/test/test0/10430: this looks like split folders one level down; set
--config.data.root=DATA/ssv2").

The model defaults to an ImageNet ResNet-50 at weights/resnet50 (`python -m tam_jax.tools.import_weights
--src resnet50-11ad3fa6.pth --arch resnet50 --out weights/resnet50`); `--config.model.init_from=` trains
from scratch. To evaluate a backbone trained elsewhere without training: `--mode=eval` with an empty
--workdir and `--config.model.init_from=DIR`.
"""

from tam_jax.configuration import apply_config_arg, default_config


def get_config(arg=None):
    c = default_config()
    c.data.kind = "frames"
    c.model.init_from = "weights/resnet50"
    return apply_config_arg(c, arg)  # shot=N, way=N
