"""The check at start reads what training will read: a frame folder of zero-byte or garbage JPEGs is
unusable, and a class left without a readable video (in any split the run uses) stops the run before
step 1 with one DataError naming the split, the class and the fix."""

import numpy as np
import pytest

from tam_jax import train
from tam_jax.data.demo import DemoConfig, DemoSource
from tam_jax.data.frames import write_frame_folder
from tam_jax.data.report import SkipReport
from tam_jax.data.sources import FrameFolderSource, find_usable
from tam_jax.data.splits import Split
from tam_jax.errors import DataError
from tests.helpers import tiny_config


def frames(num_frames=4, size=32, grey=100):
    """uint8 [num_frames, size, size, 3], a flat grey per frame."""
    return np.stack([np.full((size, size, 3), grey + 10 * t, np.uint8) for t in range(num_frames)])


def spoil(folder, content: bytes) -> None:
    """Overwrite every JPEG of a frame folder with `content` (b"": zero bytes, as a failed copy leaves)."""
    for path in folder.iterdir():
        path.write_bytes(content)


def test_frame_folders_of_zero_byte_or_garbage_jpegs_are_unusable(tmp_path):
    for name in ("ok", "zero_bytes", "garbage"):
        write_frame_folder(tmp_path / "c" / name, frames())
    spoil(tmp_path / "c" / "zero_bytes", b"")
    spoil(tmp_path / "c" / "garbage", np.random.default_rng(0).bytes(300))
    source = FrameFolderSource(tmp_path, Split("train", ("c",), {"c": ("ok", "zero_bytes", "garbage")}))
    report = SkipReport()
    np.testing.assert_array_equal(find_usable(source, report, num_threads=2, progress=False), [0])
    reasons = {e.path: e.reason for e in report.entries}
    assert reasons == {
        str(tmp_path / "c" / "zero_bytes" / "00000001.jpg"): "corrupt image (empty file, 0 bytes)",
        str(tmp_path / "c" / "garbage" / "00000001.jpg"):
            "corrupt image (not a readable JPEG/PNG: unknown format or damaged header)",
    }
    assert "BytesIO" not in report.summary()
    # Counting alone, as the check did before, takes them for videos.
    assert len(find_usable(source, SkipReport(), read_frame=False, progress=False)) == 3


def test_sources_whose_frames_were_verified_are_only_counted(monkeypatch):
    def no_reading(self, index, frame_indices):
        raise AssertionError("the start check rendered a demo frame")

    monkeypatch.setattr(DemoSource, "read", no_reading)
    source = DemoSource(DemoConfig(videos_per_class=2), "test")
    assert len(find_usable(source, SkipReport(), progress=False)) == len(source) == 20


CLASSES = {"train": ("archery", "bowling"), "val": ("diving", "fencing"), "test": ("golf", "hurdling")}


def frame_dataset(root, broken_split: str, broken_class: str, videos_per_class=3):
    """Split folders ``root/<split>/<class>/v<i>/<JPEGs>`` of 32-pixel frames; every video of
    `broken_split`/`broken_class` holds zero-byte JPEGs."""
    for split, classes in CLASSES.items():
        for c, name in enumerate(classes):
            for v in range(videos_per_class):
                folder = root / split / name / f"v{v}"
                write_frame_folder(folder, frames(grey=60 * c + 10 * v))
                if (split, name) == (broken_split, broken_class):
                    spoil(folder, b"")
    return root


@pytest.mark.parametrize("split, broken", [("test", "hurdling"), ("train", "bowling"), ("val", "diving")])
def test_a_class_without_a_readable_video_stops_the_run_before_step_1(tmp_path, split, broken):
    config = tiny_config()
    config.data.kind, config.data.root = "frames", str(frame_dataset(tmp_path / "data", split, broken))
    config.fewshot.way, config.fewshot.shot, config.fewshot.queries = 2, 1, 1
    config.mesh.num_devices = 1
    workdir = tmp_path / "run"
    with pytest.raises(DataError) as error:
        train.train(config, str(workdir))
    message = str(error.value)
    assert message.startswith(f"The {split} split cannot make 2-way 1-shot episodes")
    first_frame = tmp_path / "data" / split / broken / "v0" / "00000001.jpg"
    assert message.endswith(f"No video of class(es) '{broken}' is readable (e.g. {first_frame}: "
                            "corrupt image (empty file, 0 bytes)): repair or re-extract them.")
    assert "\n" not in message and "BytesIO" not in message
    checkpoints = workdir / "checkpoints"
    assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())
    assert not (workdir / "train_log.jsonl").exists()


@pytest.mark.e2e
def test_through_the_command_line_a_broken_test_class_is_one_line_before_step_1(tmp_path):
    from tests.helpers import flags_for
    from tests.test_main_errors import assert_one_error, run_main

    root = frame_dataset(tmp_path / "data", "test", "hurdling")
    workdir = tmp_path / "run"
    result = run_main("--config=configs/demo.py", *flags_for(tiny_config()), f"--workdir={workdir}",
                      "--config.data.kind=frames", f"--config.data.root={root}", "--config.fewshot.way=2",
                      "--config.fewshot.queries=1", "--config.mesh.num_devices=1")
    assert_one_error(result, 1, "The test split cannot make 2-way", "'hurdling'", "00000001.jpg",
                     "repair or re-extract them")
    assert "training:" not in result.stderr  # stopped before the first step
    assert not workdir.exists()  # nothing was written: no workdir left behind
