"""Turn a folder of videos and its few-shot split lists into the split folders of JPEG frames that
`configs/folder.py` reads.

    python -m tam_jax.tools.extract_frames --videos VIDEOS --splits SPLIT_DIR --out DATA \\
        [--short-side 256] [--max-frames 0] [--workers N] [--quality 90] [--no-progress]

`SPLIT_DIR` holds a train, a val and a test list (`tam_jax.data.splits.find_split_files`) in either public
format: ``<class>/<video>`` (CMN, ARN) or ``<split><index>/<video>`` (OTAM's SSv2 lists). Each listed
video is looked up under `VIDEOS` as training looks it up (`tam_jax.data.sources.resolve_video`):
``VIDEOS/<class>/<video>.mp4``, ``VIDEOS/<video>.webm``, inside ``VIDEOS/<split>/``, with the suffixes
.mp4 .webm .avi .mkv .mov. Videos are decoded with PyAV and resized with PIL (no ffmpeg binary), in
`--workers` processes. Written:

- ``DATA/<split>/<class>/<video>/00000001.jpg, 00000002.jpg, ...`` (ffmpeg's ``%08d.jpg``): every frame,
  or `--max-frames` evenly spaced ones (the middle frame of each of N equal segments), the short side
  resized to `--short-side` pixels (0: as stored). Train on it with
  ``python -m tam_jax.main --config=configs/folder.py --config.data.root=DATA``.
- ``DATA/extract_report.json``: the settings, per split the videos listed, extracted, already done and
  skipped, and every skipped video (not found, unreadable) with the reason. Each skip is also one
  line on stderr as it happens, and the skips are summed up at the end.

Resuming: a video's frames are written into a hidden ``.<video>.partial`` folder beside its final one and
renamed into place when the last frame is written, so a final folder is always complete; a rerun skips
the videos whose folder exists, and redoes the others (a killed run's ``.partial`` folder is deleted
first, never trusted). Videos that failed are tried again. The exit status is 0 when every split has at
least one video written; otherwise the report is still written and one `error:` line says which split
came out empty (status 1), as do bad arguments (status 1, or 2 for argparse's own).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from tam_jax import cli, errors, log_setup
from tam_jax.data import videos as videos_lib
from tam_jax.data.layouts import format_tried
from tam_jax.data.report import VideoError
from tam_jax.data.sampling import tsn_frame_indices
from tam_jax.data.sources import DirListings, candidate_paths, resolve_video
from tam_jax.data.splits import Split, read_splits, video_id
from tam_jax.errors import UserError

REPORT_NAME = "extract_report.json"
PARTIAL_SUFFIX = ".partial"
FRAME_NAME = "{:08d}.jpg"
_SUMMARY_LINES = 20  # skipped videos named in the closing summary; the report lists them all
_log = logging.getLogger(__spec__.name if __spec__ else __name__)  # not "__main__" under python -m


class ExtractError(UserError):
    """A flag of extract_frames that cannot run, or a split of which no video could be written."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How frames are written; recorded in the report, so a rerun with others can say so."""

    short_side: int = 256  # pixels of the short side after resizing; 0: as stored
    max_frames: int = 0  # evenly spaced frames kept per video; 0: all
    quality: int = 90  # JPEG quality, 1..100


@dataclasses.dataclass(frozen=True)
class Job:
    """One listed video: where it is (None: not found) and the frame folder it becomes."""

    split: str
    class_name: str
    reference: str  # as listed
    source: Path | None
    dest: Path
    why_missing: str = ""  # for source None: the paths tried


# ---------------------------------------------------------------------------------------------------
# One video -> one frame folder (runs in the worker processes)


def partial_folder(dest: Path) -> Path:
    """The hidden folder a video's frames are written into before it is renamed to `dest`; hidden names
    are never read as videos (`tam_jax.data.layouts.is_hidden`)."""
    return dest.with_name(f".{dest.name}{PARTIAL_SUFFIX}")


def is_complete(dest: Path) -> bool:
    """Whether `dest` holds a finished video: only a complete `partial_folder` is ever renamed to it."""
    return dest.is_dir()


def _save(image: Image.Image, path: Path, settings: Settings) -> None:
    if settings.short_side:
        width, height = image.size
        scale = settings.short_side / min(width, height)
        if scale != 1:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
    image.save(path, format="JPEG", quality=settings.quality)


def _reason(error: Exception) -> str:
    """FFmpeg's words without the path they repeat: "Invalid data found when processing input"."""
    return getattr(error, "strerror", None) or str(error)


def _decoded_frames(source: Path) -> Iterator[Image.Image]:
    """Every frame of a video file in display order, as RGB images; VideoError if it cannot be opened or
    decoding fails part-way (its frames so far are not worth keeping: the folder would look complete)."""
    import av

    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(source, f"video cannot be opened ({_reason(e)})") from None
    with container:
        if not container.streams.video:
            raise VideoError(source, "file has no video stream")
        count = 0
        try:
            for frame in container.decode(container.streams.video[0]):
                count += 1
                yield frame.to_image()
        except av.FFmpegError as e:
            raise VideoError(source, f"decoding failed after {count} frames ({_reason(e)})") from None
    if count == 0:
        raise VideoError(source, "video has no frames")


def extract_video(source: Path, folder: Path, settings: Settings) -> int:
    """Writes the frames of video file `source` as ``folder/00000001.jpg, ...``; returns how many.

    All frames, streamed; with `settings.max_frames` and a longer video, the middle frame of each of
    `max_frames` equal segments (`tsn_frame_indices` at test time), read with `videos.read_video`, which
    tolerates the usual off-by-a-few metadata frame counts. VideoError for an unreadable video.
    """
    if settings.max_frames:
        count = videos_lib.count_frames(source)
        if count > settings.max_frames:
            indices = tsn_frame_indices(count, settings.max_frames)
            frames = videos_lib.read_video(source, indices, count)
            for number, frame in enumerate(frames, 1):
                _save(Image.fromarray(frame), folder / FRAME_NAME.format(number), settings)
            return len(frames)
    number = 0
    for number, image in enumerate(_decoded_frames(source), 1):
        _save(image, folder / FRAME_NAME.format(number), settings)
    return number


@dataclasses.dataclass(frozen=True)
class Outcome:
    frames: int  # written; 0 when skipped
    error: str | None = None  # why the video was skipped


def run_job(source: Path, dest: Path, settings: Settings) -> Outcome:
    """Extracts one video into `partial_folder(dest)` (a leftover one deleted first) and renames it to
    `dest` when complete; a video that cannot be read leaves nothing behind."""
    partial = partial_folder(dest)
    if partial.exists():  # a killed run's half folder: never trusted
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        frames = extract_video(source, partial, settings)
    except VideoError as e:
        shutil.rmtree(partial, ignore_errors=True)
        return Outcome(0, e.reason)
    os.rename(partial, dest)
    return Outcome(frames)


# ---------------------------------------------------------------------------------------------------
# The whole run (main process)


def plan(videos: Path, splits: dict[str, Split], out: Path) -> list[Job]:
    """Every listed video of every split, found under `videos` or not, with its frame folder under `out`."""
    listings = DirListings()
    jobs = []
    for name, split in splits.items():
        for reference, c in split.items():
            class_name = split.classes[c]
            # A `<class>/<video>` line's class may itself hold a "/": one folder level, as layouts read it.
            dest = out / name / class_name.replace("/", "_") / video_id(reference)
            found, _ = resolve_video(videos, class_name, reference, "videos", listings, name)
            why = ""
            if found is None:
                tried = candidate_paths(videos, class_name, reference, "videos", name)
                why = f"not found under {videos}; tried {format_tried(list(tried))}"
            jobs.append(Job(name, class_name, reference, found, dest, why))
    return jobs


def _earlier_settings(report_path: Path, settings: Settings) -> list[dict]:
    """The settings other than `settings` that earlier runs wrote `out` with, from its report."""
    try:
        before = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(before, dict):
        return []
    earlier = [*before.get("earlier_settings", []), before.get("settings")]
    now = dataclasses.asdict(settings)
    return [s for i, s in enumerate(earlier) if s and s != now and s not in earlier[:i]]


def _outcomes(todo: list[Job], settings: Settings, workers: int) -> Iterator[tuple[Job, Outcome]]:
    """(job, outcome) of each job as it finishes; in this process when `workers` is 1."""
    if workers == 1:
        for job in todo:
            yield job, run_job(job.source, job.dest, settings)
        return
    # spawn: a forked child would inherit whatever threads (PyAV's, JAX's) the parent has started.
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(run_job, job.source, job.dest, settings): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()
    finally:  # on an error or Ctrl-C, stop at the videos under way rather than finish the queue
        pool.shutdown(wait=True, cancel_futures=True)


def _progress_bar(total: int, enabled: bool):
    # tqdm itself, not `tam_jax.progress.bar`: that asks JAX whether this is the chief process, which would
    # start a JAX backend (and claim a GPU) in a tool that never uses one.
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Extracting frames", unit="video", dynamic_ncols=True, disable=not enabled)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _lines_above(bar) -> contextlib.AbstractContextManager:
    """Log lines printed above a shown bar rather than through it."""
    if bar.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def extract(videos: str | Path, split_dir: str | Path, out: str | Path, settings: Settings | None = None,
            workers: int | None = None, progress: bool = True) -> dict:
    """Extracts the frames of every listed video (see the module docstring); returns the report, also
    written to ``out/extract_report.json``. Raises ExtractError for bad arguments and, after writing the
    report, when a split has no video written."""
    videos, out, settings = Path(videos), Path(out), settings or Settings()
    if not videos.is_dir():
        raise ExtractError(f"--videos {videos}: no such folder; give the folder that holds the videos "
                           "(as <class>/<video>.mp4 or <video>.mp4, .webm, .avi, .mkv or .mov).")
    if not Path(split_dir).is_dir():
        raise ExtractError(f"--splits {split_dir}: no such folder; give the folder that holds the train, "
                           "val and test lists (e.g. trainlist03.txt, vallist03.txt, testlist03.txt).")
    splits = read_splits(split_dir)
    jobs = plan(videos, splits, out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / REPORT_NAME

    counts = {name: {"listed": 0, "extracted": 0, "already_done": 0, "skipped": 0} for name in splits}
    skipped: list[dict] = []
    todo: list[Job] = []
    seen: dict[Path, Job] = {}

    def skip(job: Job, reason: str) -> None:
        counts[job.split]["skipped"] += 1
        skipped.append({"split": job.split, "class": job.class_name, "video": job.reference,
                        "path": str(job.source) if job.source else None, "reason": reason})
        _log.warning("skipped: %s: %s", job.source or f"{job.class_name}/{job.reference}", reason)

    for job in jobs:
        counts[job.split]["listed"] += 1
        if job.source is None:
            skip(job, job.why_missing)
        elif job.dest in seen:
            skip(job, f"same frame folder {job.dest} as {seen[job.dest].source}")
        else:
            seen[job.dest] = job
            if is_complete(job.dest):
                counts[job.split]["already_done"] += 1
            else:
                todo.append(job)

    done = sum(c["already_done"] for c in counts.values())
    earlier = _earlier_settings(report_path, settings) if done else []
    if earlier:
        _log.warning("%s holds videos extracted with %s; they are kept as they are (delete them to "
                     "extract them again with %s).", out, " or ".join(map(str, earlier)),
                     dataclasses.asdict(settings))
    workers = max(1, min(workers or available_cpus(), len(todo)))
    _log.info("Extracting the frames of %d video%s into %s with %d process%s (%d already done, %d not "
              "found).", len(todo), "" if len(todo) == 1 else "s", out, workers, "" if workers == 1 else "es",
              done, sum(job.source is None for job in jobs))
    with _progress_bar(len(todo), progress) as bar, _lines_above(bar):
        for job, outcome in _outcomes(todo, settings, workers):
            if outcome.error is None:
                counts[job.split]["extracted"] += 1
            else:
                skip(job, outcome.error)
            bar.update(1)

    report = {"videos": str(videos), "splits": str(split_dir), "out": str(out),
              "settings": dataclasses.asdict(settings), "earlier_settings": earlier, "counts": counts,
              "skipped": skipped}
    partial = report_path.with_name(f".{REPORT_NAME}{PARTIAL_SUFFIX}")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(partial, report_path)
    _summarize(report, report_path)
    empty = [name for name, c in counts.items() if c["extracted"] + c["already_done"] == 0]
    if empty:
        raise ExtractError(
            f"no video of the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} was written "
            f"(all skipped: see {report_path}); check that --videos {videos} holds the videos that "
            f"--splits {split_dir} lists."
        )
    return report


def _summarize(report: dict, report_path: Path) -> None:
    for name, c in report["counts"].items():
        _log.info("%s: %d of %d videos written (%d extracted now, %d already done), %d skipped.", name,
                  c["extracted"] + c["already_done"], c["listed"], c["extracted"], c["already_done"],
                  c["skipped"])
    skipped = report["skipped"]
    if skipped:
        _log.warning("Skipped %d video%s (all listed in %s):", len(skipped), "" if len(skipped) == 1 else "s",
                     report_path)
        for entry in skipped[:_SUMMARY_LINES]:
            _log.warning("  %s: %s", entry["path"] or f"{entry['class']}/{entry['video']}", entry["reason"])
        if len(skipped) > _SUMMARY_LINES:
            _log.warning("  ... and %d more.", len(skipped) - _SUMMARY_LINES)


def _quality(text: str) -> int:
    value = cli.int_at_least(1, "JPEG quality 1..100")(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be <= 100 (JPEG quality 1..100), got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tam_jax.tools.extract_frames", description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--videos", required=True, help="folder of the video files the lists name")
    parser.add_argument("--splits", required=True, help="folder of the train, val and test lists "
                        "(<class>/<video> or <split><index>/<video> lines)")
    parser.add_argument("--out", required=True,
                        help="data root to write: OUT/{train,val,test}/<class>/<video>/%%08d.jpg")
    parser.add_argument("--short-side", type=cli.int_at_least(0, "0: keep the size"), default=256,
                        help="resize frames so their short side is this many pixels (0: as stored; "
                        "default 256)")
    parser.add_argument("--max-frames", type=cli.int_at_least(0, "0: all frames"), default=0,
                        help="keep at most this many evenly spaced frames per video (0: all, the default)")
    parser.add_argument("--workers", type=cli.int_at_least(1, "processes"), default=None,
                        help="parallel processes (default: the CPUs this process may use; 1: no subprocess)")
    parser.add_argument("--quality", type=_quality, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    log_setup.setup()
    settings = Settings(short_side=args.short_side, max_frames=args.max_frames, quality=args.quality)

    def body() -> int:
        extract(args.videos, args.splits, args.out, settings, workers=args.workers,
                progress=not args.no_progress)
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
