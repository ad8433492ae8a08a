r"""TFDS builders `kinetics100_fewshot` and `ssv2_fewshot` ("full", "small"), built without TF.

They read the user's own copy of the videos (files or frame folders) from the manual folder, keep at
most `max_frames` evenly spaced frames of each video, shrink frames whose short side exceeds
`short_side`, and store them as JPEGs in ArrayRecord files. Read them back with
`tam_jax.data.tfds_source.TfdsSource` (or plain `tfds.data_source`). Each example:

    frames: Sequence(Image, jpeg)  the stored frames, [n <= max_frames, H, W, 3] once decoded
    label: ClassLabel             over all classes: train classes, then val, then test
    video_id: Text                the video's id (file or folder name without suffix)
    num_source_frames: int32      frames in the original video

Records keep the split list's order (shuffling is disabled); ``metadata.json`` holds, per split, the
class names, every record's split-local label, stored frame count and video id, and the videos that
were skipped with the reason. Unreadable or missing videos are logged, counted and skipped; the
build goes on.

Build (split lists in <manual_dir>, <manual_dir>/splits or --split_dir, or no lists and split
folders <manual_dir>/{train,val,test}/<class>/<video>; videos below <manual_dir>):

    python -m tam_jax.data.tfds_builders kinetics100_fewshot --manual_dir ~/k100 --data_dir ~/tfds
    python -m tam_jax.data.tfds_builders ssv2_fewshot --config full \
        --manual_dir ~/20bn-something-something-v2 --split_dir ~/splits/ssv2_OTAM --data_dir ~/tfds

(`tfds build` needs TensorFlow; this entry point does not.)

This module imports tensorflow_datasets and registers the builders; `tam_jax.data` imports it only
on request.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from tam_jax import cli, errors
from tam_jax.data import frames as frames_lib
from tam_jax.data import videos as videos_lib
from tam_jax.data.layouts import has_split_folders, read_split_folder
from tam_jax.data.report import Skipped, VideoError
from tam_jax.data.sampling import tsn_frame_indices
from tam_jax.data.sources import DirListings, resolve_video
from tam_jax.data.splits import SPLIT_NAMES, Split, read_splits, video_id
from tam_jax.data.transforms import resize_frames
from tam_jax.errors import UserError

_log = logging.getLogger(__name__)

_INSTRUCTIONS = """\
Put in the manual folder (--manual_dir):

1. The three split lists, at its top level or in a `splits/` subfolder, one file per split with
   train / val / test in its name, in either public format: `<class>/<video>` lines (CMN/ARN
   lists, e.g. trainlist03.txt) or `<split><index>//<path>` / `<split><index>/<id>` lines (e.g.
   train_few_shot.txt). {lists}
   (Or give their folder with --split_dir, the builder argument `split_dir`.) Without lists,
   split folders `train/<class>/<video>`, `val/...`, `test/...` name the classes and videos.
2. The videos, as files (.mp4 .webm .avi .mkv .mov) or as folders of numbered JPEG frames, laid
   out as the lists name them: `<class>/<video>.mp4` or `<class>/<video>/00000001.jpg` (class
   folders with spaces or underscores), a list line's own relative path, or flat: `<video>.webm`;
   or any of these inside the split's folder (`test/test0/10430` for the line `test0/10430`).
   {videos}
   Symbolic links to an existing copy work.

Listed videos that are missing or unreadable are logged and skipped, and recorded in metadata.json.
"""


@dataclasses.dataclass(eq=False)
class FewshotVideoConfig(tfds.core.BuilderConfig):
    """Builder settings besides the name and description.

    short_side: frames whose short side is longer are shrunk to it, in pixels.
    max_frames: evenly spaced frames kept per video.
    expected_classes / videos_per_class: the benchmark's sizes; other lists only log a warning.
    """

    short_side: int = 256
    max_frames: int = 32
    jpeg_quality: int = 90
    expected_classes: tuple[int, int, int] = (64, 12, 24)
    videos_per_class: int | None = None


def _encode_video(task: tuple[str | None, str, int, int, int]) -> dict | Skipped:
    """(path or None, expected path, short_side, max_frames, quality) -> fields, or Skipped."""
    path, expected, short_side, max_frames, quality = task
    try:
        if path is None:
            raise VideoError(expected, "missing: no video file or frame folder found")
        if Path(path).is_dir():
            names = frames_lib.list_frames(path)
            count = len(names)
            indices = tsn_frame_indices(count, min(count, max_frames))
            frames = frames_lib.read_frames(path, indices)
        else:
            count = videos_lib.count_frames(path)
            indices = tsn_frame_indices(count, min(count, max_frames))
            frames = videos_lib.read_video(path, indices, count)
        if min(frames.shape[1:3]) > short_side:
            frames = resize_frames(frames, short_side)
        jpegs = [frames_lib.encode_jpeg(frame, quality) for frame in frames]
    except VideoError as e:
        return Skipped(e.path, e.reason)
    except Exception as e:  # noqa: BLE001 - one odd file must not end a build of many hours
        return Skipped(path or expected, f"unexpected error: {e!r}")
    return {"frames": jpegs, "num_source_frames": count}


class _FewshotVideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Both builders: split lists + videos in the manual folder -> JPEG frames in ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> tfds.core.Path:
        # TFDS's own lookup imports `importlib_resources`, which it only declares for Python < 3.9
        # (tensorflow/datasets#11212); this file is the answer it would find.
        return tfds.core.Path(__file__)

    def __init__(
        self, *, split_dir: str | os.PathLike | None = None, num_workers: int = 1, **kwargs
    ):
        """split_dir: folder with the split lists (default: the manual folder or its `splits/`).
        num_workers: processes decoding videos in parallel."""
        self._split_dir = split_dir
        self._num_workers = num_workers
        # ArrayRecord: the format `tfds.data_source` reads, and one that needs no TensorFlow to
        # write.
        kwargs["file_format"] = kwargs.get("file_format") or "array_record"
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"{self.builder_config.description} as JPEG frames (short side <= "
                f"{self.builder_config.short_side}, <= {self.builder_config.max_frames} per video)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "frames": tfds.features.Sequence(
                        tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
                    ),
                    # Names come from the split lists, read when building.
                    "label": tfds.features.ClassLabel(),
                    "video_id": tfds.features.Text(),
                    "num_source_frames": np.int32,
                }
            ),
            # Records follow the split lists, so metadata.json can index them.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = Path(dl_manager.manual_dir)
        splits, split_dir = self._read_splits(manual_dir)
        self._check_sizes(splits, split_dir)
        names = [name for s in SPLIT_NAMES for name in splits[s].classes]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                f"Split lists in {split_dir} share classes {dup[:5]}; few-shot splits are disjoint."
            )
        self.info.features["label"].names = names
        self.info.metadata["classes"] = {s: list(splits[s].classes) for s in SPLIT_NAMES}
        self.info.metadata["splits"] = {}
        generators, offset = {}, 0
        for s in SPLIT_NAMES:
            generators[s] = self._generate_examples(manual_dir, splits[s], label_offset=offset)
            offset += len(splits[s].classes)
        return generators

    def _read_splits(self, manual_dir: Path) -> tuple[dict[str, Split], Path]:
        """The splits and where they were read: `split_dir`, else ``manual_dir/splits``, else lists in
        `manual_dir`, else `manual_dir`'s split folders (``train/<class>/<video>``, ...)."""
        if self._split_dir:
            return read_splits(self._split_dir), Path(self._split_dir)
        if (manual_dir / "splits").is_dir():
            return read_splits(manual_dir / "splits"), manual_dir / "splits"
        if not any(manual_dir.glob("*.txt")) and has_split_folders(manual_dir):
            return {s: read_split_folder(manual_dir, s, "any") for s in SPLIT_NAMES}, manual_dir
        return read_splits(manual_dir), manual_dir

    def _check_sizes(self, splits: dict[str, Split], split_dir: Path) -> None:
        config = self.builder_config
        for split, expected in zip(SPLIT_NAMES, config.expected_classes, strict=True):
            got = splits[split]
            counts = {len(v) for v in got.videos.values()}
            if len(got.classes) != expected or (
                config.videos_per_class and counts != {config.videos_per_class}
            ):
                _log.warning(
                    "%s/%s: the %s list in %s has %d classes (%s videos each); "
                    "the benchmark has %d classes%s.",
                    self.name,
                    config.name,
                    split,
                    split_dir,
                    len(got.classes),
                    sorted(counts),
                    expected,
                    f" of {config.videos_per_class}" if config.videos_per_class else "",
                )

    def _generate_examples(
        self, root: Path, split: Split, label_offset: int
    ) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        listings = DirListings()
        items = split.items()
        tasks = []
        for reference, c in items:
            found, expected = resolve_video(
                root, split.classes[c], reference, "any", listings, split.name
            )
            path = str(found) if found else None
            tasks.append(
                (path, str(expected), config.short_side, config.max_frames, config.jpeg_quality)
            )
        meta = {"labels": [], "num_frames": [], "video_ids": [], "skipped": []}
        with _ordered_map(self._num_workers) as map_fn:
            for (reference, c), result in zip(items, map_fn(_encode_video, tasks), strict=True):
                if isinstance(result, Skipped):
                    _log.warning("Skipping %s: %s", result.path, result.reason)
                    meta["skipped"].append([result.path, result.reason])
                    continue
                meta["labels"].append(c)
                meta["num_frames"].append(len(result["frames"]))
                meta["video_ids"].append(video_id(reference))
                example = dict(result, label=label_offset + c, video_id=video_id(reference))
                yield f"{split.classes[c]}/{reference}", example
        _log.warning(
            "%s %s: stored %d videos, skipped %d unreadable or missing (listed in metadata.json).",
            self.name,
            split.name,
            len(meta["labels"]),
            len(meta["skipped"]),
        )
        self.info.metadata["splits"][split.name] = meta


@contextlib.contextmanager
def _ordered_map(num_workers: int):
    """`map` here (num_workers <= 1), or an order-keeping map over `num_workers` processes."""
    if num_workers <= 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield lambda fn, tasks: pool.imap(fn, tasks, chunksize=4)


class Kinetics100Fewshot(_FewshotVideoBuilder):
    """Kinetics-100 (CMN split: 64/12/24 classes of 100 videos) from your Kinetics-400 copy."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        lists="For Kinetics-100: kinetics_CMN/*list03.txt (or hyrsm_kinetics100/*_few_shot.txt).",
        videos="Kinetics files are <youtube id>_<start>_<end>.mp4 in class folders.",
    )
    BUILDER_CONFIGS = [
        FewshotVideoConfig(
            name="default",
            description="Kinetics-100 (CMN split, 64/12/24 classes, 100 videos each)",
            videos_per_class=100,
        )
    ]


class Ssv2Fewshot(_FewshotVideoBuilder):
    """Something-Something-V2: configs "full" (the TAM/OTAM split) and "small" (the CMN split)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        lists="For ssv2_fewshot/full: ssv2_OTAM/*list07.txt; for /small: ssv2_CMN/*list03.txt.",
        videos="SSv2 files are <id>.webm, flat: point --manual_dir at 20bn-something-something-v2/"
        " itself and give the lists with --split_dir.",
    )
    BUILDER_CONFIGS = [
        FewshotVideoConfig(
            name="full",
            description="Something-Something-V2, full few-shot split of TAM/OTAM "
            "(64/12/24 classes, 67013/1926/2857 videos)",
        ),
        FewshotVideoConfig(
            name="small",
            description="Something-Something-V2, small CMN split (64/12/24 classes, 100 each)",
            videos_per_class=100,
        ),
    ]


BUILDERS = {"kinetics100_fewshot": Kinetics100Fewshot, "ssv2_fewshot": Ssv2Fewshot}


def make_builder(
    name: str,
    *,
    data_dir: str | os.PathLike,
    config: str | None = None,
    short_side: int | None = None,
    max_frames: int | None = None,
    split_dir: str | os.PathLike | None = None,
    num_workers: int = 1,
) -> _FewshotVideoBuilder:
    """A builder for `name`; other `short_side`/`max_frames` make a config like "full_s128_f16"."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}; use one of {sorted(BUILDERS)}.")
    cls = BUILDERS[name]
    configs = {c.name: c for c in cls.BUILDER_CONFIGS}
    base = configs.get(config or cls.BUILDER_CONFIGS[0].name)
    if base is None:
        raise ValueError(f"{name} has no config {config!r}; use one of {sorted(configs)}.")
    short_side = short_side or base.short_side
    max_frames = max_frames or base.max_frames
    config_or_name = base.name
    if (short_side, max_frames) != (base.short_side, base.max_frames):
        config_or_name = dataclasses.replace(
            base,
            name=f"{base.name}_s{short_side}_f{max_frames}",
            short_side=short_side,
            max_frames=max_frames,
        )
    return cls(
        config=config_or_name, data_dir=data_dir, split_dir=split_dir, num_workers=num_workers
    )


def check_folders(args: argparse.Namespace) -> None:
    """Raise a UserError naming the flag when --manual_dir or --split_dir is not a folder."""
    for flag, folder in (("--manual_dir", args.manual_dir), ("--split_dir", args.split_dir)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            what = "is not a folder" if Path(folder).expanduser().exists() else "does not exist"
            raise UserError(f"{flag} {folder} {what}; give the folder holding the split lists and videos.")


def main(argv: list[str] | None = None) -> int:
    """Build a dataset; exit status 1 with one `error:` line for a bad input (see tam_jax.errors)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(BUILDERS))
    parser.add_argument(
        "--manual_dir", required=True, help="folder with the split lists and the videos"
    )
    parser.add_argument("--data_dir", required=True, help="where TFDS writes the dataset")
    parser.add_argument("--config", help="ssv2_fewshot: full or small")
    parser.add_argument("--split_dir", help="folder with the split lists, if not in --manual_dir")
    parser.add_argument(
        "--short_side", type=cli.int_at_least(1), help="shrink frames to this short side (default 256)"
    )
    parser.add_argument(
        "--max_frames", type=cli.int_at_least(1), help="evenly spaced frames kept per video (default 32)"
    )
    parser.add_argument(
        "--num_workers", type=cli.int_at_least(1), default=os.cpu_count() or 1, help="decoding processes"
    )
    args = parser.parse_args(argv)

    def body() -> None:
        check_folders(args)
        logging.basicConfig(level=logging.INFO)
        builder = make_builder(
            args.dataset,
            data_dir=args.data_dir,
            config=args.config,
            short_side=args.short_side,
            max_frames=args.max_frames,
            split_dir=args.split_dir,
            num_workers=args.num_workers,
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir)
        )
        _log.info("Wrote %s/%s to %s", builder.name, builder.builder_config.name, builder.data_dir)

    # ValueError: split lists and dataset configs that cannot be read (tam_jax.data.splits names them).
    return errors.run_command(body, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
