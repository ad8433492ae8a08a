"""What the check at start costs: `find_usable` counting frames only against counting and decoding frame 0.

    python benchmarks/start_checks.py [--dir DIR] [--threads 4] [--out FILE.json]

Writes (in DIR, else a temporary folder removed afterwards; an existing DIR with a train/ folder is reused)
a split-folder dataset of JPEG frame folders, by default 64/12/24 classes x 100 videos = 10,000 videos of 8
frames of 128x171 pixels (the C3D/R(2+1)D frame size; textured, about 8 KB a JPEG), then times on a fresh
`FrameFolderSource` each: opening the train split (listing the folders), `find_usable` on its 6,400 videos
with `read_frame=False` (the check before: a listdir per video) and `read_frame=True` (the check now: also
reads and decodes frame 0), and the same check on the 2,400 test videos, which a training run now also
checks at start. The files were just written, so they are in the page cache: a cold network disk adds
its latency per file to both columns.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tam_jax.data.frames import encode_jpeg  # noqa: E402
from tam_jax.data.report import SkipReport  # noqa: E402
from tam_jax.data.sources import build_source, find_usable  # noqa: E402

SPLITS = ("train", "val", "test")


def frame_pool(height: int, width: int, count: int = 16, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs of textured frames (a gradient, blocks and noise): real-looking sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pool = []
    for i in range(count):
        base = (yy * (i + 1) + xx * 2) % 256
        blocks = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)
        frame = 0.5 * base[..., None] + 0.4 * blocks[:height, :width] + rng.normal(0, 12, (height, width, 3))
        pool.append(encode_jpeg(np.clip(frame, 0, 255).astype(np.uint8)))
    return pool


def write_dataset(root: Path, classes: tuple[int, ...], videos: int, frames: int, pool: list[bytes]) -> int:
    """``root/<split>/c<k>/v<i>/00000001.jpg ...``; returns the number of files written."""
    written = 0
    for split, num_classes in zip(SPLITS, classes, strict=True):
        for c in range(num_classes):
            for v in range(videos):
                folder = root / split / f"c{c:03d}" / f"v{v:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                for t in range(frames):
                    (folder / f"{t + 1:08d}.jpg").write_bytes(pool[(c + v + t) % len(pool)])
                    written += 1
    return written


def time_check(root: Path, split: str, threads: int, read_frame: bool) -> dict:
    """Seconds to open `split` (a fresh source) and to run `find_usable` on all its videos."""
    start = time.perf_counter()
    source = build_source("frames", split, root=root)
    opened = time.perf_counter()
    usable = find_usable(source, SkipReport(), num_threads=threads, progress=False, read_frame=read_frame)
    done = time.perf_counter()
    assert len(usable) == len(source), "every generated video must be usable"
    return {"split": split, "videos": len(source), "read_frame": read_frame, "open_s": opened - start,
            "check_s": done - opened, "videos_per_s": len(source) / (done - opened)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", default="", help="where the dataset is (or is written); default: a temp dir")
    p.add_argument("--classes", default="64,12,24", help="train,val,test classes")
    p.add_argument("--videos", type=int, default=100, help="videos per class")
    p.add_argument("--frames", type=int, default=8, help="JPEG frames per video")
    p.add_argument("--size", default="128x171", help="frame HEIGHTxWIDTH")
    p.add_argument("--threads", type=int, default=4, help="checking threads (config.data.num_threads)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    height, width = (int(n) for n in args.size.split("x"))
    classes = tuple(int(n) for n in args.classes.split(","))
    with tempfile.TemporaryDirectory(prefix="start_checks_") as scratch:
        root = Path(args.dir or scratch)
        result = {"classes": classes, "videos_per_class": args.videos, "frames": args.frames,
                  "size": [height, width], "threads": args.threads, "rows": []}
        if not (root / "train").is_dir():
            start = time.perf_counter()
            pool = frame_pool(height, width)
            result["files_written"] = write_dataset(root, classes, args.videos, args.frames, pool)
            result["generate_s"] = time.perf_counter() - start
            result["jpeg_bytes"] = int(np.mean([len(b) for b in pool]))
        # Warm-up: the first call imports what a run has imported already (jax, via the progress bar).
        find_usable(build_source("frames", "val", root=root), SkipReport(), indices=[0], progress=False)
        for split, read_frame in (("train", False), ("train", True), ("test", False), ("test", True)):
            result["rows"].append(time_check(root, split, args.threads, read_frame))
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    lines = [f"{sum(result['classes']) * result['videos_per_class']} videos of {result['frames']} "
             f"{result['size'][0]}x{result['size'][1]} JPEGs, {result['threads']} threads"
             + (f"; written in {result['generate_s']:.1f} s" if "generate_s" in result else ""),
             "| split | videos | check | open split (s) | find_usable (s) | videos/s |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        check = "count + decode frame 0" if r["read_frame"] else "count only"
        lines.append(f"| {r['split']} | {r['videos']} | {check} | {r['open_s']:.2f} | {r['check_s']:.2f} | "
                     f"{r['videos_per_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
