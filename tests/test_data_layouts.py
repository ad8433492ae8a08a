"""Datasets as users have them, read from real files: split folders with or without the public lists,
`<split>_256` folders, RGB + optical-flow frame folders, hidden clutter, and what each bad case says."""

import logging
import shutil

import numpy as np
import pytest

from tam_jax.config_checks import validate
from tam_jax.data.clips import ClipSpec
from tam_jax.data.episodes import EpisodeSampler
from tam_jax.data.frames import list_frames, read_frames
from tam_jax.data.loader import TrainBatches, load_split, read_options
from tam_jax.data.report import SkipReport, VideoError
from tam_jax.data.sources import FrameFolderSource, VideoFileSource, build_source, find_usable
from tests import realdata
from tests.helpers import load_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The three layouts, written once: {"frames": (root, counts), "videos": ..., "ssv2": (root, lists,
    counts)}."""
    base = tmp_path_factory.mktemp("layouts")
    return {
        "frames": (base / "frames", realdata.split_folders_of_frames(base / "frames")),
        "videos": (base / "videos", realdata.split_folders_of_mp4s(base / "videos")),
        "ssv2": (base / "ssv2", base / "lists",
                 realdata.otam_lists_over_split_folders(base / "ssv2", base / "lists")),
    }


def test_split_folders_of_frames_name_classes_and_videos_and_skip_clutter(data, caplog):
    root, counts = data["frames"]
    with caplog.at_level(logging.INFO, logger="tam_jax.data.layouts"):
        source = build_source("frames", "train", root=root)
    assert "Reading split folders" in caplog.text and str(root / "train") in caplog.text
    assert isinstance(source, FrameFolderSource)
    assert source.class_names == realdata.CLASSES["train"]  # sorted; .ipynb_checkpoints is no class
    assert len(source) == 9 and [source.label(i) for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(len(source)):
        key = source.location(i).removeprefix(f"{root}/")
        assert source.num_frames(i) == counts[key]  # RGB frames only: no flow, no ._ or hidden files
        frames = source.read(i, range(counts[key]))
        np.testing.assert_array_equal(realdata.frame_numbers(frames), range(counts[key]))
    shapes = {source.read(i, [0]).shape[1:3] for i in range(3)}
    assert shapes == {realdata.SQUARE, realdata.KINETICS_340, realdata.KINETICS_455}


def test_split_folders_of_h264_with_b_frames_at_29_97(data):
    import av

    root, counts = data["videos"]
    with av.open(str(root / "test" / "golf" / "v0.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == realdata.NTSC and stream.codec_context.name == "h264"
        b_frame = 3  # AV_PICTURE_TYPE_B: stored out of display order
        assert b_frame in {int(frame.pict_type) for frame in container.decode(stream)}
    source = build_source("videos", "test", root=root)
    assert isinstance(source, VideoFileSource)
    assert source.class_names == ("golf", "hurdling") and len(source) == 6  # no ._v0.mp4
    for i in range(len(source)):
        n = counts[source.location(i).removeprefix(f"{root}/")]
        assert source.num_frames(i) == n
        wanted = [n - 1, 0, 4, 4]
        np.testing.assert_array_equal(realdata.frame_numbers(source.read(i, wanted)), wanted)


def test_otam_lists_over_split_folders_find_every_line(data):
    root, lists, counts = data["ssv2"]
    source = build_source("frames", "test", root=root, split_dir=lists)
    assert source.class_names == ("test0", "test1")
    report = SkipReport()
    assert len(find_usable(source, report, progress=False)) == 6 and not len(report)
    assert source.location(0) == str(root / "test" / "test0" / "10445")  # the list's first test line
    assert [source.num_frames(i) for i in range(3)] == [counts["test0/10445"], 8, 9]
    frames = source.read(1, [0, 7])
    assert frames.shape == (2, 240, 351, 3)  # SSv2: 240 high, odd width
    np.testing.assert_array_equal(realdata.frame_numbers(frames), [0, 7])


def test_cmn_lists_over_split_256_folders_of_mp4s(tmp_path):
    root, lists = tmp_path / "k100", tmp_path / "lists"
    realdata.write_mp4(root / "val_256" / "air_drumming" / "-VtLx-mcPds_000012_000022.mp4",
                       realdata.clip(9, realdata.KINETICS_340))
    lists.mkdir()
    (lists / "vallist03.txt").write_text("air drumming/-VtLx-mcPds_000012_000022\n")
    source = build_source("videos", "val", root=root, split_list=lists / "vallist03.txt")
    assert source.location(0) == str(root / "val_256" / "air_drumming" / "-VtLx-mcPds_000012_000022.mp4")
    assert source.num_frames(0) == 9


def test_a_missing_listed_video_is_skipped_naming_the_paths_tried(data, tmp_path):
    root, lists, _ = data["ssv2"]
    extra = tmp_path / "lists"
    shutil.copytree(lists, extra)
    with open(extra / "testlist07.txt", "a") as f:
        f.write("test1/99999\n")
    source = build_source("frames", "test", root=root, split_dir=extra)
    report = SkipReport()
    assert len(find_usable(source, report, progress=False)) == 6
    [entry] = report.entries
    assert "missing" in entry.reason and "tried" in entry.reason
    assert str(root / "test" / "test1" / "99999") in entry.reason
    assert str(root / "test1" / "99999") in entry.reason


def test_a_split_found_nowhere_says_what_was_tried_and_what_is_on_disk(data, tmp_path):
    root, lists, _ = data["ssv2"]
    # The root one level too high: the videos are in root/test/..., the user gave its parent.
    with pytest.raises(FileNotFoundError) as info:
        build_source("frames", "test", root=root.parent, split_dir=lists)
    message = str(info.value)
    assert f"None of the 6 videos of the test list {lists / 'testlist07.txt'} was found" in message
    assert f"tried: {root.parent / 'test0' / '10445'}" in message and "Layouts read:" in message
    found = root / "test" / "test0" / "10445"
    assert f"Found {found}: this looks like split folders one level down" in message
    assert f"--config.data.root={root}" in message
    # Frame folders read as video files.
    with pytest.raises(FileNotFoundError, match="a frame folder; set --config.data.kind=frames"):
        build_source("videos", "test", root=root, split_dir=lists)
    # Lists of another dataset.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"which holds: readme.txt\. Check that the split lists"):
        build_source("frames", "test", root=tmp_path / "other", split_dir=lists)


def test_split_folder_mistakes_are_named(data, tmp_path):
    root, _ = data["videos"]
    with pytest.raises(ValueError, match=r"These are video files: set --config.data.kind=videos"):
        build_source("frames", "train", root=root)
    partial = tmp_path / "partial"
    (partial / "train" / "a" / "v").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has no folder for the val split: add .*partial/val"):
        build_source("frames", "val", root=partial)
    (partial / "test" / ".ipynb_checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"test holds no class folders"):
        build_source("frames", "test", root=partial)
    with pytest.raises(ValueError, match="needs split_list or split_dir, or split folders"):
        build_source("frames", "test", root=tmp_path)


def test_flow_frames_are_not_rgb_frames(tmp_path):
    rgb = realdata.clip(5, realdata.SQUARE)
    folder = realdata.write_jpegs(tmp_path / "v", rgb, "img_{:05d}.jpg", "flow_")
    assert list_frames(folder) == [f"img_{t:05d}.jpg" for t in range(1, 6)]
    np.testing.assert_array_equal(realdata.frame_numbers(read_frames(folder, range(5))), range(5))
    mm = realdata.write_jpegs(tmp_path / "mm", realdata.clip(4, realdata.SQUARE), "img_{:05d}.jpg", "")
    assert len(list_frames(mm)) == 4
    for name in list(folder.glob("img_*")):
        name.unlink()
    with pytest.raises(VideoError, match="only optical-flow frames"):
        list_frames(folder)


def test_validate_reads_split_folders_without_split_dir(data, tmp_path):
    config = load_config("folder")
    config.data.root = str(data["frames"][0])
    validate(config, training=False)
    config.data.root = str(tmp_path)
    with pytest.raises(ValueError, match=r"config.data.split_dir: is empty and data.root=.* has no train/"):
        validate(config, training=False)


def test_loading_with_more_threads_than_prefetch_logs_no_grain_warning(data, caplog):
    assert read_options(num_threads=4, prefetch=2) == (4, 4)
    assert read_options(num_threads=0, prefetch=8) == (1, 8)
    root, _ = data["frames"]
    source = build_source("frames", "val", root=root)
    spec = ClipSpec(num_frames=2, resize=32, crop=28)
    with caplog.at_level(logging.WARNING):
        load_split(source, spec, num_threads=4, progress=False)
        sampler = EpisodeSampler(np.array([source.label(i) for i in range(len(source))]), way=2, shot=1,
                                 queries=1, seed=0)
        batches = TrainBatches(source, sampler, spec, num_batches=1, num_threads=4, prefetch=2)
        next(batches)
        batches.close()
    assert "prefetch_buffer_size" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
