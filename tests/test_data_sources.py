"""Frame folders and video files on disk: layouts, decoding, and every kind of bad input."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from tam_jax.data import videos
from tam_jax.data.frames import read_frames, write_frame_folder
from tam_jax.data.report import SkipReport, VideoError
from tam_jax.data.sources import (
    FrameFolderSource,
    VideoFileSource,
    VideoSource,
    build_source,
    find_usable,
)
from tam_jax.data.splits import Split


def counting_video(num_frames, h=32, w=48):
    """uint8 [num_frames, h, w, 3]: frame t is grey 6 * t (+ a little texture), so that
    `frame_number` recovers t even after lossy coding."""
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = 6 * t + 4
    frames[:, : h // 2, : w // 2] += 2
    return frames


def frame_number(frames):
    return np.round((frames.reshape(len(frames), -1).mean(1) - 4.5) / 6).astype(int)


def test_frame_folder_in_both_layouts(tmp_path):
    write_frame_folder(tmp_path / "air drumming" / "vid_a", counting_video(12))
    write_frame_folder(tmp_path / "vid_b", counting_video(7))  # flat: class only in the list
    split = Split(
        "train", ("air drumming", "zumba"), {"air drumming": ("vid_a",), "zumba": ("vid_b",)}
    )
    source = FrameFolderSource(tmp_path, split)
    assert isinstance(source, VideoSource)
    assert len(source) == 2 and [source.label(i) for i in range(2)] == [0, 1]
    assert source.num_frames(0) == 12 and source.num_frames(1) == 7
    frames = source.read(0, [0, 3, 3, 11])
    assert frames.shape == (4, 32, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frame_number(frames), [0, 3, 3, 11])


def test_frames_are_ordered_by_number_not_by_name(tmp_path):
    folder = tmp_path / "v"
    write_frame_folder(folder, counting_video(12))
    for t, path in enumerate(sorted(folder.iterdir())):
        path.rename(folder / f"img_{t + 1}.jpg")  # img_10.jpg sorts before img_2.jpg as text
    np.testing.assert_array_equal(frame_number(read_frames(folder, range(12))), range(12))


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_video_files_decode_the_requested_frames(tmp_path, suffix):
    video = counting_video(20)
    videos.write_video(tmp_path / "blasting_sand" / f"x{suffix}", video)
    split = Split("test", ("blasting sand",), {"blasting sand": ("x",)})  # spaces -> underscores
    source = VideoFileSource(tmp_path, split)
    if suffix == ".webm":  # WebM stores no frame count: it must be counted by decoding.
        import av

        with av.open(str(tmp_path / "blasting_sand" / "x.webm")) as container:
            assert container.streams.video[0].frames == 0
    assert source.num_frames(0) == 20
    frames = source.read(0, [19, 0, 7, 7])
    np.testing.assert_array_equal(frame_number(frames), [19, 0, 7, 7])


def test_list_paths_of_the_hyrsm_format_are_followed(tmp_path):
    videos.write_video(tmp_path / "train_256" / "air_drumming" / "y.mp4", counting_video(10))
    split = Split("train", ("air_drumming",), {"air_drumming": ("train_256/air_drumming/y.mp4",)})
    assert VideoFileSource(tmp_path, split).num_frames(0) == 10


def test_decoding_stops_after_the_last_needed_frame(tmp_path):
    # A web-style MP4 (index first) missing its last quarter still opens and reports 40 frames;
    # early frames decode as decoding never reaches the missing part; late ones are "truncated".
    path = tmp_path / "cut.mp4"
    videos.write_video(path, counting_video(40), faststart=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    np.testing.assert_array_equal(frame_number(videos.read_video(path, [0, 5])), [0, 5])
    with pytest.raises(VideoError, match="truncated") as error:
        videos.read_video(path, [0, 39])
    assert error.value.path == str(path)


def test_metadata_counting_one_frame_too_many_is_tolerated(tmp_path):
    path = tmp_path / "v.mp4"
    videos.write_video(path, counting_video(30))
    frames = videos.read_video(path, [29, 30], num_frames=31)
    np.testing.assert_array_equal(frame_number(frames), [29, 29])


@pytest.fixture
def broken_dataset(tmp_path):
    """A split whose class 'good' is fine and whose class 'bad' holds each kind of bad input."""
    root = tmp_path / "data"
    good = [f"g{i}" for i in range(3)]
    for name in good:
        videos.write_video(root / "good" / f"{name}.mp4", counting_video(12))
    bad = root / "bad"
    bad.mkdir(parents=True)
    (bad / "zero_bytes.mp4").write_bytes(b"")
    (bad / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    videos.write_video(bad / "cut.mp4", counting_video(40))  # index at the end: cut, it cannot open
    (bad / "cut.mp4").write_bytes((bad / "cut.mp4").read_bytes()[:1500])
    videos.write_video(bad / "fine.mp4", counting_video(12))
    listed = ("zero_bytes", "garbage", "cut", "not_there", "fine")
    split = Split("train", ("good", "bad"), {"good": tuple(good), "bad": listed})
    return root, split


def test_bad_video_files_are_reported_and_skipped(broken_dataset):
    root, split = broken_dataset
    source = VideoFileSource(root, split)
    report = SkipReport()
    usable = find_usable(source, report, num_threads=2, progress=False)
    np.testing.assert_array_equal(usable, [0, 1, 2, 7])
    skipped = {e.path.rsplit("/", 1)[1]: e.reason for e in report.entries}
    assert set(skipped) == {"zero_bytes.mp4", "garbage.mp4", "cut.mp4", "not_there.mp4"}
    assert "missing" in skipped["not_there.mp4"] and "cannot be opened" in skipped["garbage.mp4"]
    summary = report.summary()
    assert summary.startswith("Skipped 4 ") and str(root / "bad" / "garbage.mp4") in summary
    with pytest.raises(VideoError, match="missing"):
        source.read(6, [0])


def test_bad_frame_folders_are_reported_and_skipped(tmp_path):
    write_frame_folder(tmp_path / "c" / "ok", counting_video(6))
    write_frame_folder(tmp_path / "c" / "corrupt", counting_video(6))
    (tmp_path / "c" / "corrupt" / "00000004.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    write_frame_folder(tmp_path / "c" / "cut", counting_video(6))
    cut = tmp_path / "c" / "cut" / "00000002.jpg"
    cut.write_bytes(cut.read_bytes()[:200])
    (tmp_path / "c" / "empty").mkdir()
    split = Split("val", ("c",), {"c": ("ok", "corrupt", "cut", "empty", "gone")})
    source = FrameFolderSource(tmp_path, split)
    report = SkipReport()
    np.testing.assert_array_equal(find_usable(source, report, progress=False), [0, 1, 2])
    assert {e.path for e in report.entries} == {
        str(tmp_path / "c" / "empty"),
        str(tmp_path / "c" / "gone"),
    }
    source.read(1, [0, 1, 2])  # the corrupt frame is not needed here
    with pytest.raises(VideoError, match="corrupt image") as error:
        source.read(1, [0, 3])
    assert error.value.path == str(tmp_path / "c" / "corrupt" / "00000004.jpg")
    with pytest.raises(VideoError) as error:
        source.read(2, [1])
    assert error.value.path == str(cut)


def test_video_errors_survive_pickling_between_processes():
    error = pickle.loads(pickle.dumps(VideoError("/x/y.mp4", "truncated")))
    assert (error.path, error.reason, str(error)) == (
        "/x/y.mp4",
        "truncated",
        "/x/y.mp4: truncated",
    )


def test_skip_report_counts_each_path_once():
    report = SkipReport()
    assert report.add("/a.mp4", "missing") and not report.add("/a.mp4", "missing again")
    report.add_error(VideoError("/b.mp4", "truncated"))
    assert len(report) == 2 and report.entries[0].reason == "missing"
    assert SkipReport().summary().startswith("Skipped 0")


def test_build_source_from_plain_values(tmp_path):
    write_frame_folder(tmp_path / "frames" / "k" / "v1", counting_video(5))
    videos.write_video(tmp_path / "videos" / "k" / "v1.mp4", counting_video(5))
    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("trainlist01.txt", "vallist01.txt", "testlist01.txt"):
        (splits / name).write_text("k/v1\n")
    frames = build_source("frames", "val", root=tmp_path / "frames", split_dir=splits)
    files = build_source(
        "videos", "test", root=tmp_path / "videos", split_list=splits / "testlist01.txt"
    )
    assert isinstance(frames, FrameFolderSource) and isinstance(files, VideoFileSource)
    assert frames.num_frames(0) == files.num_frames(0) == 5
    assert len(build_source("demo", "test", demo_options={"videos_per_class": 3})) == 30
    with pytest.raises(ValueError, match="needs root"):
        build_source("frames", "train", split_dir=splits)
    with pytest.raises(ValueError, match="Unknown data source kind"):
        build_source("hdf5", "train")


@pytest.mark.e2e
def test_importing_the_package_loads_neither_pyav_nor_tfds():
    code = "import sys, tam_jax.data as d; d.ClipSpec; d.build_source; d.TrainBatches; " + (
        "print(sorted(m for m in ('av', 'tensorflow_datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
