"""TFDS builders, built without TensorFlow from tiny videos laid out as upstream lays them out."""

import json
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from tam_jax.data import tfds_builders  # noqa: E402
from tam_jax.data.clips import ClipSpec  # noqa: E402
from tam_jax.data.frames import write_frame_folder  # noqa: E402
from tam_jax.data.loader import load_split  # noqa: E402
from tam_jax.data.tfds_source import TfdsSource  # noqa: E402
from tam_jax.data.videos import write_video  # noqa: E402

CLASSES = {"train": 3, "val": 2, "test": 2}


def grey_video(num_frames, start, h=48, w=64):
    """Frame t is flat grey 10 * (start + t): `frame_ids` reads the numbers back."""
    return np.stack([np.full((h, w, 3), 10 * (start + t), np.uint8) for t in range(num_frames)])


def frame_ids(frames):
    return np.round(frames.reshape(len(frames), -1).mean(1) / 10).astype(int)


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
    """CMN lists in manual_dir/splits; class folders with underscores; some videos as frame folders;
    one listed video missing and one zero-byte file. Built by the command line entry point, decoding
    in 2 worker processes."""
    manual = tmp_path_factory.mktemp("kinetics_manual")
    lines = {}
    for split, num_classes in CLASSES.items():
        lines[split] = []
        for c in range(num_classes):
            name = f"{split} class {c}"
            for v in range(2):
                video = f"{split}{c}v{v}_000010_000020"
                folder = manual / name.replace(" ", "_")
                if split == "val":
                    write_frame_folder(folder / video, grey_video(6, v))
                else:
                    write_video(folder / f"{video}.mp4", grey_video(12, v))
                lines[split].append(f"{name}/{video}")
    lines["train"].append("train class 0/gone_000000_000010")
    (manual / "train_class_1" / "empty_000000_000010.mp4").write_bytes(b"")
    lines["train"].append("train class 1/empty_000000_000010")
    (manual / "splits").mkdir()
    for split, text in lines.items():
        (manual / "splits" / f"{split}list03.txt").write_text("\n".join(text) + "\n")
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_builders.main(
        [
            "kinetics100_fewshot",
            "--manual_dir",
            str(manual),
            "--data_dir",
            str(data_dir),
            "--num_workers",
            "2",
        ]
    )
    return data_dir


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    """OTAM-format lists passed as split_dir; flat .webm files; 4 frames kept, short side 32
    (a custom config, named "full_s32_f4")."""
    manual = tmp_path_factory.mktemp("ssv2_videos")
    lists = tmp_path_factory.mktemp("ssv2_lists")
    video_id = 100
    for split, num_classes in CLASSES.items():
        text = []
        for c in range(num_classes):
            for _ in range(2):
                write_video(manual / f"{video_id}.webm", grey_video(20, 0))
                text.append(f"{split}{c}/{video_id}")
                video_id += 1
        (lists / f"{split}list07.txt").write_text("\n".join(text) + "\n")
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = tfds_builders.make_builder(
        "ssv2_fewshot",
        data_dir=data_dir,
        config="full",
        short_side=32,
        max_frames=4,
        split_dir=lists,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    return data_dir


def test_kinetics_builds_and_reads_back(kinetics):
    train = TfdsSource("kinetics100_fewshot", "train", data_dir=kinetics)
    assert train.class_names == ("train class 0", "train class 1", "train class 2")
    assert len(train) == 6 and [train.label(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert train.num_frames(0) == 12
    frames = train.read(1, [0, 11, 11])
    assert frames.shape == (3, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frame_ids(frames), [1, 12, 12])
    assert train.location(1) == "tfds://kinetics100_fewshot/train/train0v1_000010_000020"

    val = TfdsSource("kinetics100_fewshot", "val", data_dir=kinetics)  # built from frame folders
    assert val.class_names == ("val class 0", "val class 1") and val.num_frames(0) == 6
    np.testing.assert_array_equal(frame_ids(val.read(3, range(6))), range(1, 7))


def test_kinetics_build_reports_what_it_skipped(kinetics):
    [info] = (kinetics / "kinetics100_fewshot").glob("*/1.0.0/metadata.json")
    skipped = json.loads(info.read_text())["splits"]["train"]["skipped"]
    assert [path.rsplit("/", 1)[1] for path, _ in skipped] == [
        "gone_000000_000010",
        "empty_000000_000010.mp4",
    ]
    assert "missing" in skipped[0][1] and "cannot be opened" in skipped[1][1]


def test_plain_tfds_data_source_sees_global_labels_and_jpeg_frames(kinetics):
    source = tfds.data_source("kinetics100_fewshot", split="test", data_dir=kinetics)
    names = source.dataset_info.features["label"].names
    assert names[:3] == ["train class 0", "train class 1", "train class 2"] and len(names) == 7
    example = source[2]
    assert names[example["label"]] == "test class 1"
    assert len(example["frames"]) == 12 and example["frames"][0].shape == (48, 64, 3)


def test_ssv2_keeps_evenly_spaced_frames_at_the_short_side(ssv2):
    test = TfdsSource("ssv2_fewshot/full_s32_f4", "test", data_dir=ssv2)
    assert test.class_names == ("test0", "test1") and len(test) == 4
    assert test.num_frames(0) == 4
    frames = test.read(0, range(4))
    assert frames.shape == (4, 32, 43, 3)  # 48x64 -> 32x42.7
    np.testing.assert_array_equal(frame_ids(frames), [2, 7, 12, 17])  # middles of 4 segments of 20


def test_tfds_source_feeds_the_loader(ssv2):
    train = TfdsSource("ssv2_fewshot/full_s32_f4", "train", data_dir=ssv2)
    loaded = load_split(train, ClipSpec(num_frames=4, resize=32, crop=32), progress=False)
    assert loaded.frames.shape == (6, 4, 32, 32, 3) and loaded.skipped == 0
    np.testing.assert_array_equal(loaded.labels, [0, 0, 1, 1, 2, 2])


def test_building_and_reading_needed_no_tensorflow(kinetics, ssv2):
    assert "tensorflow" not in sys.modules


def test_unknown_dataset_or_config_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no config 'medium'"):
        tfds_builders.make_builder("ssv2_fewshot", data_dir=tmp_path, config="medium")
    with pytest.raises(ValueError, match="Unknown dataset"):
        tfds_builders.make_builder("ucf101_fewshot", data_dir=tmp_path)
