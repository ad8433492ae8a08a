"""Device memory of the compiled train step for the dataset configs, per remat / dtype / micro-batch setting.

    python benchmarks/memory.py --out memory.json --markdown memory.md        # the default grid (slow on CPU)
    python benchmarks/memory.py --datasets kinetics --shots 5 --remat none,block --dtypes bfloat16 \
        --episodes_per_device_step 1                                          # one row per setting
    python benchmarks/memory.py --arch tiny --image_size 32 --num_frames 4    # seconds, for a quick look

For each dataset config (`configs/<name>.py:shot=S`, `configs/common.py`) the train step
(`train_step.make_train_step`) is compiled on one device from abstract inputs (`tam_jax.plan.compile_step`:
`jax.ShapeDtypeStruct`s and `jax.eval_shape`, so no ResNet-50 weights or 224-pixel frames are made) and
XLA's buffer assignment is read (`compiled.memory_analysis()`): argument, output, temporary and aliased
bytes per device, and the total the step holds (arguments + outputs + temporaries - aliased). Dataset
configs with the same shapes share one compile (all five have ResNet-50, T=8, 224 px, 5-way, 5 queries).

The step processes the config's `train.episodes_per_step` episodes (4) as micro-batches of
`--episodes_per_device_step` episodes, so the rows show what accumulation saves. Memory per device with D
devices and the same episodes per device step is about the same: each device embeds its own episodes.

The figures are the backend's compile-time estimate. On this machine that is XLA:CPU, which does not always
keep what a GPU keeps (benchmarks/README.md says where it differs); a GPU run of the same command gives the
GPU's own figures. `--max_seconds` stops starting new compiles; the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tam_jax import hosts, plan  # noqa: E402

DATASETS = ("kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51")  # configs/<name>.py

GIB = 2**30
# Cards people train on, in GiB of device memory, and the share of it a step may take here: JAX's default
# XLA_PYTHON_CLIENT_MEM_FRACTION is 0.75; with it set to 0.9 or more, 0.9 of the card is usable.
CARDS_GIB = (11, 12, 16, 24, 40, 80)
USABLE_FRACTION = 0.9


def csv(text: str, convert=str) -> list:
    return [convert(x.strip()) for x in text.split(",") if x.strip()]


def shape_key(config) -> tuple:
    """What the step's memory depends on: configs with equal keys share a compile."""
    d, f, m = config.data, config.fewshot, config.model
    return (m.arch, d.image_size, d.num_frames, f.way, f.shot, f.queries, f.scorer, f.learn_temperature,
            config.train.episodes_per_step, config.train.optimizer)


def settings_grid(args) -> list[dict]:
    return [{"model.remat": r, "model.dtype": d, "train.episodes_per_device_step": e, "train.embed_chunks": c}
            for r, d, e, c in itertools.product(args.remat, args.dtypes, args.episodes_per_device_step,
                                                args.embed_chunks)]


def base_config(dataset: str, shot: int, args):
    config = importlib.import_module(f"configs.{dataset}").get_config(f"shot={shot}")
    config.model.init_from = ""  # shapes only: no weights are read
    if args.arch:
        config.model.arch = args.arch
    if args.image_size:
        config.data.image_size = args.image_size
        config.data.resize = max(config.data.resize, args.image_size)
    if args.num_frames:
        config.data.num_frames = args.num_frames
    if args.episodes_per_step:
        config.train.episodes_per_step = args.episodes_per_step
    return config


def fits_table(rows: list[dict]) -> str:
    """Markdown: for each card size, the settings whose total fits in USABLE_FRACTION of it, per shot."""
    lines = ["| GPU memory | shot | settings that fit (total GiB per device) |", "|---|---|---|"]
    measured = [r for r in rows if "total" in r]
    for card, shot in itertools.product(CARDS_GIB, sorted({r["shot"] for r in measured})):
        usable = USABLE_FRACTION * card * GIB
        fit = sorted((r for r in measured if r["shot"] == shot and r["total"] <= usable),
                     key=lambda r: r["total"], reverse=True)
        text = "; ".join(f"{label(r)} ({r['total'] / GIB:.1f})" for r in fit) or "none measured"
        lines.append(f"| {card} GB | {shot} | {text} |")
    return "\n".join(lines)


def label(row: dict) -> str:
    return (f"remat={row['model.remat']}, {row['model.dtype']}, "
            f"episodes_per_device_step={row['train.episodes_per_device_step']}, "
            f"embed_chunks={row.get('train.embed_chunks', 1)}")


def rows_table(rows: list[dict]) -> str:
    lines = ["| datasets | shot | remat | dtype | episodes/device step | micro-batches | embed chunks | "
             "temp GiB | argument GiB | output GiB | total GiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['datasets']} | {r['shot']} | {r['model.remat']} | {r['model.dtype']} | "
                f"{r['train.episodes_per_device_step']} | {r.get('micro_batches', '-')} | "
                f"{r.get('train.embed_chunks', 1)} |")
        if "total" not in r:
            lines.append(f"{head} {r.get('error', r.get('skipped', 'not measured'))[:80]} |")
            continue
        lines.append(f"{head} {r['temp'] / GIB:.2f} | {r['argument'] / GIB:.2f} | {r['output'] / GIB:.2f} | "
                     f"{r['total'] / GIB:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", type=csv, default=list(DATASETS), help="comma-separated dataset configs")
    p.add_argument("--shots", type=lambda t: csv(t, int), default=[1, 5])
    p.add_argument("--remat", type=csv, default=["none", "block"], help="model.remat values")
    p.add_argument("--dtypes", type=csv, default=["float32", "bfloat16"], help="model.dtype values")
    p.add_argument("--episodes_per_device_step", type=lambda t: csv(t, int), default=[1, 2])
    p.add_argument("--embed_chunks", type=lambda t: csv(t, int), default=[1],
                   help="train.embed_chunks values (chunks of an episode's videos, recomputed one at a time)")
    p.add_argument("--episodes_per_step", type=int, default=0, help="0: the config's (4)")
    p.add_argument("--arch", default="", help="override model.arch (e.g. tiny, for a quick run)")
    p.add_argument("--image_size", type=int, default=0)
    p.add_argument("--num_frames", type=int, default=0)
    p.add_argument("--max_seconds", type=float, default=1e9, help="start no compile after this many seconds")
    p.add_argument("--out", default=None, help="JSON file, rewritten after every row")
    p.add_argument("--markdown", default=None, help="write the tables here too")
    return p


def run(args) -> dict:
    start = time.time()
    mesh = hosts.make_mesh(1)
    device = jax.devices()[0]
    result = {"settings": vars(args).copy(), "rows": [], "meta": {
        "jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
        "python": platform.python_version(), "load_average_start": os.getloadavg()}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    for shot in args.shots:
        groups: dict[tuple, list[str]] = {}
        for dataset in args.datasets:
            groups.setdefault(shape_key(base_config(dataset, shot, args)), []).append(dataset)
        for datasets in groups.values():
            for setting in settings_grid(args):
                config = plan.with_overrides(base_config(datasets[0], shot, args), setting)
                row = {"datasets": ",".join(datasets), "shot": shot, **setting,
                       "episodes_per_step": config.train.episodes_per_step}
                if time.time() - start > args.max_seconds:
                    row["skipped"] = "past --max_seconds"
                else:
                    try:
                        row["micro_batches"] = (config.train.episodes_per_step
                                                // config.train.episodes_per_device_step)
                        began = time.time()
                        row.update(plan.compile_step(config, mesh)[1].as_dict())
                        row["compile_s"] = time.time() - began
                    except Exception as e:  # a setting that does not compile is recorded, the rest go on
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
    result["meta"]["wall_s"] = time.time() - start
    result["meta"]["load_average_end"] = os.getloadavg()
    save()
    text = rows_table(result["rows"]) + "\n\n" + fits_table(result["rows"])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return result


def main(argv=None) -> dict:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
