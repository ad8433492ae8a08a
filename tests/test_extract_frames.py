"""`python -m tam_jax.tools.extract_frames`: videos + public split lists -> split folders of JPEG frames.

Real files, made here: H.264 MP4s (4:4:4, as odd sizes need) and VP9 WebMs at odd sizes, found under the
videos folder as ``<class>/<id>.mp4`` (train), ``<id>.webm`` (val) and ``test/<class>/<id>.mp4`` (test);
a file of random bytes named .mp4 and a listed video that does not exist. Frame t of every clip is grey
`realdata.level(t)`, so `realdata.frame_numbers` says which frames were written, in which order.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tam_jax.data import frames as frames_lib
from tam_jax.data import layouts, sources
from tam_jax.data.report import SkipReport
from tam_jax.data.sampling import tsn_frame_indices
from tam_jax.tools import extract_frames as ef
from tests import realdata

REPO = Path(__file__).resolve().parents[1]  # not tests.helpers': that imports JAX
HAVE_VP9 = "libvpx-vp9" in av.codecs_available
NO_VP9 = "this PyAV's FFmpeg has no libvpx-vp9 encoder, so no VP9 WebM can be made to extract"
CLASSES = {"train": ("archery", "bowling"), "val": ("cooking", "diving"), "test": ("golf", "hurdling")}
H264_SIZE, VP9_SIZE = (33, 47), (50, 31)  # (height, width), both odd somewhere
BROKEN = "archery/broken"  # random bytes named broken.mp4
GHOST = "bowling/ghost"  # listed, no file
SHORT = 24  # --short-side of the shared run
EXTRACT_VIDEO = ef.extract_video  # as the tool has it, whatever a test patches


def write_clip(path: Path, num_frames: int, vp9: bool) -> Path:
    """`realdata.clip` as H.264 in 4:4:4 (4:2:0 needs even sizes) or VP9 in 4:2:0, 12 frames/s."""
    size = VP9_SIZE if vp9 else H264_SIZE
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9" if vp9 else "libx264", rate=12)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p" if vp9 else "yuv444p"
        for frame in realdata.clip(num_frames, size):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(videos folder, split folder, {"<split>/<class>/<id>": (frames, (height, width))} of the good ones)."""
    base = tmp_path_factory.mktemp("extract")
    videos, lists = base / "videos", base / "lists"
    lists.mkdir()
    expected = {}
    for split, classes in CLASSES.items():
        lines = []
        for c, name in enumerate(classes):
            for v in range(2):
                vid, num_frames = f"{name[:3]}{v}", 7 + (c + v) % 3
                vp9 = v == 1 and HAVE_VP9
                suffix = ".webm" if vp9 else ".mp4"
                folder = {"train": videos / name, "val": videos, "test": videos / "test" / name}[split]
                write_clip(folder / f"{vid}{suffix}", num_frames, vp9)
                expected[f"{split}/{name}/{vid}"] = (num_frames, VP9_SIZE if vp9 else H264_SIZE)
                lines.append(f"{name}/{vid}")
        if split == "train":
            (videos / BROKEN).with_suffix(".mp4").write_bytes(np.random.default_rng(0).bytes(3000))
            lines += [BROKEN, GHOST]
        (lists / f"{split}list01.txt").write_text("\n".join(lines) + "\n")
    return videos, lists, expected


class Records(logging.Handler):
    """The tool's log lines (what its command line prints on stderr), kept as text."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(data, out, *flags, workers=1):
    """`main` in this process; returns (exit status, the tool's log lines)."""
    videos, lists, _ = data
    handler, logger = Records(), logging.getLogger(ef.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as `log_setup.setup()` has it outside pytest
    try:
        status = ef.main(["--videos", str(videos), "--splits", str(lists), "--out", str(out),
                          "--workers", str(workers), "--no-progress", *flags])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return status, handler.lines


@pytest.fixture(scope="module")
def extracted(data, tmp_path_factory):
    """One run in 2 processes, short side 24: (out, exit status, log lines)."""
    out = tmp_path_factory.mktemp("extracted") / "DATA"
    status, lines = run(data, out, "--short-side", str(SHORT), workers=2)
    return out, status, lines


def short_side_size(size, short):
    h, w = size
    return (short, round(w * short / h)) if h <= w else (round(h * short / w), short)


def count_decodes(monkeypatch):
    """Records the source of every `extract_video` call (the in-process runs, --workers 1)."""
    decoded = []

    def counting(source, folder, settings):
        decoded.append(Path(source))
        return EXTRACT_VIDEO(source, folder, settings)

    monkeypatch.setattr(ef, "extract_video", counting)
    return decoded


def files_state(out: Path) -> dict:
    """{relative path: (inode, mtime ns)} of every video folder and frame under `out` (class folders change
    when a failed video is tried again: its partial folder comes and goes)."""
    paths = [*out.glob("*/*/*"), *out.glob("*/*/*/*")]
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(paths)}


# ----------------------------------------------------------------------------------------------------
# 1. The layout


def test_every_frame_is_written_numbered_from_1_with_the_short_side_resized(data, extracted):
    _, _, expected = data
    out, status, _ = extracted
    assert status == 0
    written = {str(p.relative_to(out)) for p in out.glob("*/*/*")}
    assert written == set(expected)
    for key, (num_frames, size) in expected.items():
        names = sorted(os.listdir(out / key))
        assert names == [f"{t:08d}.jpg" for t in range(1, num_frames + 1)], key
        frames = frames_lib.read_frames(out / key, range(num_frames))
        assert frames.shape[1:3] == short_side_size(size, SHORT), key
        np.testing.assert_array_equal(realdata.frame_numbers(frames), range(num_frames), err_msg=key)
    # 33x47 -> 24x34, 50x31 -> 39x24: the short side is 24, the aspect ratio kept.
    assert short_side_size(H264_SIZE, SHORT) == (24, 34) and short_side_size(VP9_SIZE, SHORT) == (39, 24)


def test_max_frames_keeps_evenly_spaced_frames_and_short_side_0_the_size(data, tmp_path):
    _, _, expected = data
    out = tmp_path / "DATA"
    assert run(data, out, "--max-frames", "4", "--short-side", "0", "--quality", "95")[0] == 0
    for key, (num_frames, size) in expected.items():
        assert sorted(os.listdir(out / key)) == [f"{t:08d}.jpg" for t in range(1, 5)], key
        frames = frames_lib.read_frames(out / key, range(4))
        assert frames.shape[1:3] == size, key
        # The middle frame of each of 4 equal segments, as TSN samples at test time.
        want = {7: [0, 2, 4, 6], 8: [1, 3, 5, 7], 9: [1, 3, 5, 7]}[num_frames]
        assert list(tsn_frame_indices(num_frames, 4)) == want
        np.testing.assert_array_equal(realdata.frame_numbers(frames), want, err_msg=key)


@pytest.mark.skipif(not HAVE_VP9, reason=NO_VP9)
def test_vp9_webms_are_extracted(data, extracted):
    videos, _, expected = data
    out, _, _ = extracted
    webms = sorted(p.stem for p in videos.glob("*.webm"))
    assert webms == ["coo1", "div1"]  # val's second video of each class, found flat under --videos
    for key in ("val/cooking/coo1", "val/diving/div1"):
        assert len(os.listdir(out / key)) == expected[key][0]
        with Image.open(out / key / "00000001.jpg") as image:
            assert image.size == (24, 39)  # (width, height) of 50x31 at short side 24


# ----------------------------------------------------------------------------------------------------
# 2. Unreadable and missing videos


def test_a_broken_and_a_missing_video_are_reported_and_skipped(data, extracted):
    videos, _, _ = data
    out, status, lines = extracted
    assert status == 0  # every split has videos written
    broken = videos / f"{BROKEN}.mp4"
    report = json.loads((out / ef.REPORT_NAME).read_text())
    reasons = {(e["split"], e["class"], e["video"]): e for e in report["skipped"]}
    assert set(reasons) == {("train", "archery", "broken"), ("train", "bowling", "ghost")}
    assert reasons["train", "archery", "broken"]["path"] == str(broken)
    assert "cannot be opened" in reasons["train", "archery", "broken"]["reason"]
    assert reasons["train", "bowling", "ghost"]["path"] is None
    assert reasons["train", "bowling", "ghost"]["reason"].startswith(f"not found under {videos}; tried ")
    assert report["counts"]["train"] == {"listed": 6, "extracted": 4, "already_done": 0, "skipped": 2}
    assert report["counts"]["val"] == {"listed": 4, "extracted": 4, "already_done": 0, "skipped": 0}
    assert report["settings"] == {"short_side": SHORT, "max_frames": 0, "quality": 90}
    # One line as it happens, and again in the closing summary.
    assert [line for line in lines if line.startswith("skipped: ")] == [
        f"skipped: {GHOST}: {reasons['train', 'bowling', 'ghost']['reason']}",
        f"skipped: {broken}: {reasons['train', 'archery', 'broken']['reason']}",
    ]
    assert f"Skipped 2 videos (all listed in {out / ef.REPORT_NAME}):" in lines
    assert f"  {broken}: {reasons['train', 'archery', 'broken']['reason']}" in lines
    assert not (out / "train" / "archery" / "broken").exists()
    assert not [p for p in out.rglob(".*") if p.name != ef.REPORT_NAME]  # no partial folder left


# ----------------------------------------------------------------------------------------------------
# 3, 4. Resuming


def test_a_rerun_decodes_nothing_already_written(data, tmp_path, monkeypatch):
    videos, _, expected = data
    out = tmp_path / "DATA"
    decoded = count_decodes(monkeypatch)
    assert run(data, out, "--short-side", "16")[0] == 0
    assert len(decoded) == len(expected) + 1  # and the broken file
    before = files_state(out)

    decoded.clear()
    status, lines = run(data, out, "--short-side", "16")
    assert status == 0
    assert decoded == [videos / f"{BROKEN}.mp4"]  # failures are tried again; nothing else
    assert files_state(out) == before
    report = json.loads((out / ef.REPORT_NAME).read_text())
    assert report["counts"]["train"] == {"listed": 6, "extracted": 0, "already_done": 4, "skipped": 2}
    assert "train: 4 of 6 videos written (0 extracted now, 4 already done), 2 skipped." in lines

    assert run(data, out, "--short-side", "16", workers=2)[0] == 0  # the process pool, too
    assert files_state(out) == before

    decoded.clear()  # other settings: what is there is kept, and said to be
    status, lines = run(data, out, "--short-side", "20")
    assert status == 0 and decoded == [videos / f"{BROKEN}.mp4"] and files_state(out) == before
    earlier = {"short_side": 16, "max_frames": 0, "quality": 90}
    said = f"{out} holds videos extracted with {earlier}; they are kept as they are"
    assert sum(line.startswith(said) for line in lines) == 1
    assert json.loads((out / ef.REPORT_NAME).read_text())["earlier_settings"] == [earlier]


class Killed(BaseException):
    """The run stops here, as when killed (not an Exception: nothing in the tool handles it)."""


def test_an_interrupted_video_is_redone_not_trusted(data, tmp_path, monkeypatch):
    videos, _, expected = data
    out = tmp_path / "DATA"
    key, source = "train/archery/arc0", videos / "archery" / "arc0.mp4"
    def killed_after_two_frames(src, folder, settings):
        if Path(src) == source:
            EXTRACT_VIDEO(src, folder, settings)
            for extra in sorted(os.listdir(folder))[2:]:
                os.remove(folder / extra)
            raise Killed  # with this video half written
        return EXTRACT_VIDEO(src, folder, settings)

    monkeypatch.setattr(ef, "extract_video", killed_after_two_frames)
    with pytest.raises(Killed):
        run(data, out, "--short-side", "16")
    partial = out / "train" / "archery" / ".arc0.partial"
    assert len(os.listdir(partial)) == 2 and not (out / key).exists()
    assert layouts.list_videos(out / "train" / "archery", "frames") == []  # a half folder is no video

    decoded = count_decodes(monkeypatch)
    assert run(data, out, "--short-side", "16")[0] == 0
    assert source in decoded and not partial.exists()
    assert len(os.listdir(out / key)) == expected[key][0]
    assert {str(p.relative_to(out)) for p in out.glob("*/*/*")} == set(expected)


# ----------------------------------------------------------------------------------------------------
# 5. The package reads what was written


def test_the_split_folders_and_the_original_lists_find_every_written_video(data, extracted):
    _, lists, expected = data
    out, _, _ = extracted
    for split in CLASSES:
        source = sources.build_source("frames", split, root=out)  # split folders, no lists
        assert source.class_names == CLASSES[split]
        locations = {str(Path(source.location(i)).relative_to(out)) for i in range(len(source))}
        assert locations == {k for k in expected if k.startswith(f"{split}/")}
        assert len(sources.find_usable(source, SkipReport(), progress=False)) == len(source)

        listed = sources.build_source("frames", split, root=out, split_dir=lists)  # the lists given
        report = SkipReport()
        usable = sources.find_usable(listed, report, progress=False)
        assert len(usable) == len(locations)
        assert len(report.entries) == (2 if split == "train" else 0)  # the broken and the missing video


@pytest.mark.e2e
def test_the_command_line_extracts_and_training_runs_on_the_result(data, tmp_path):
    videos, lists, expected = data
    out, workdir = tmp_path / "DATA", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-m", "tam_jax.tools.extract_frames", "--videos", str(videos),
                           "--splits", str(lists), "--out", str(out), "--short-side", "40", "--workers", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    broken_lines = [line for line in done.stderr.splitlines() if f"{BROKEN}.mp4: " in line]
    assert len(broken_lines) == 2, done.stderr  # as it happens, and in the summary
    assert broken_lines[0].startswith("skipped: ") and "cannot be opened" in broken_lines[0]
    assert "Extracting frames" in done.stderr  # the progress bar
    assert {str(p.relative_to(out)) for p in out.glob("*/*/*")} == set(expected)

    done = subprocess.run(
        [sys.executable, "-m", "tam_jax.main", "--config=configs/folder.py", f"--workdir={workdir}",
         f"--config.data.root={out}", "--config.model.init_from=", "--config.model.arch=tiny",
         "--config.data.image_size=32", "--config.data.resize=40", "--config.data.num_frames=2",
         "--config.fewshot.way=2", "--config.fewshot.shot=1", "--config.fewshot.queries=1",
         "--config.train.num_steps=2", "--config.train.val_every_steps=0",
         "--config.train.episodes_per_step=1", "--config.train.log_every_steps=1",
         "--config.eval.num_episodes=4", "--config.eval.episodes_per_batch=4",
         "--config.eval.embed_batch_size=4", "--config.mesh.num_devices=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "test"):  # no validation: val_every_steps=0
        assert f"Reading split folders: {out / split}, 2 classes" in done.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert results and all(r["split"] == "test" and r["episodes"] == 4 for r in results)


# ----------------------------------------------------------------------------------------------------
# 6. Bad arguments


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error: " in line]


def exit_status(argv) -> int:
    """`main`'s exit status, argparse's own (2, by SystemExit) included."""
    try:
        return ef.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("videos, splits, flags, status, word", [
    ("nope", "lists", [], 1, "--videos"),
    ("videos", "nope", [], 1, "--splits"),
    ("videos", "no_lists", [], 1, "no *.txt file with 'train'"),
    ("videos", "lists", ["--max-frames", "-1"], 2, "--max-frames"),
    ("videos", "lists", ["--quality", "101"], 2, "--quality"),
    ("videos", "lists", ["--workers", "0"], 2, "--workers"),
])
def test_bad_arguments_end_in_one_error_line(data, tmp_path, capsys, videos, splits, flags, status, word):
    folders = {"videos": data[0], "lists": data[1], "no_lists": tmp_path / "no_lists",
               "nope": tmp_path / "nope"}
    folders["no_lists"].mkdir()
    argv = ["--videos", str(folders[videos]), "--splits", str(folders[splits]),
            "--out", str(tmp_path / "DATA"), "--no-progress", *flags]
    assert exit_status(argv) == status
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and word in lines[0], lines
    assert not (tmp_path / "DATA").exists()  # nothing written before the arguments were checked


def test_a_split_with_nothing_written_is_an_error_after_the_report(data, tmp_path, capsys):
    videos, lists, _ = data
    own = tmp_path / "lists"
    shutil.copytree(lists, own)
    (own / "vallist01.txt").write_text("cooking/nothing\n")
    status = ef.main(["--videos", str(videos), "--splits", str(own), "--out", str(tmp_path / "DATA"),
                      "--workers", "1", "--no-progress"])
    lines = error_lines(capsys.readouterr().err)
    assert status == 1 and len(lines) == 1 and "no video of the val split was written" in lines[0]
    report = json.loads((tmp_path / "DATA" / ef.REPORT_NAME).read_text())
    assert report["counts"]["val"] == {"listed": 1, "extracted": 0, "already_done": 0, "skipped": 1}
