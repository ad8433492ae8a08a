"""What a loop inside the train step costs on XLA:CPU: scanned, unrolled, and the same work without it.

    python benchmarks/cpu_loops.py [--steps 7] [--out FILE.json]

The demo's step (`configs/demo.py`: tiny ResNet, 5-way 1-shot, 3 queries per class, T=8, 32 pixels) on
one device and random frames, in two families:
  - accumulation: 4 episodes at once (no loop) against 4 micro-batches of 1
    (`train.episodes_per_device_step`);
  - chunks: 1 episode's 20 videos at once against 4 chunks of 5 (`train.embed_chunks`);
each loop as a `lax.scan` and unrolled (`tam_jax.train_step`, `unroll=`). Prints the median seconds per
step and the ratio to the same work without the loop; the plan (`tam_jax.plan`) unrolls loops on the CPU
unless a memory budget is set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from remat_time import median_step_seconds  # noqa: E402

from tam_jax.plan import with_overrides  # noqa: E402
from tests.helpers import load_config  # noqa: E402


# family -> (the work without a loop, the same work with one): plan-key overrides of configs/demo.py
def _setting(episodes: int, at_once: int, chunks: int) -> dict:
    return {"train.episodes_per_step": episodes, "train.episodes_per_device_step": at_once,
            "train.embed_chunks": chunks}


FAMILIES = {
    "accumulation": (_setting(4, 4, 1), _setting(4, 1, 1)),
    "chunks": (_setting(1, 1, 1), _setting(1, 1, 4)),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    base = with_overrides(load_config(), {"mesh.num_devices": 1, "model.remat": "none"})
    rows = []
    for family, (plain, looped) in FAMILIES.items():
        without = median_step_seconds(with_overrides(base, plain), args.steps)
        for unroll in (False, True):
            seconds = median_step_seconds(with_overrides(base, looped), args.steps, unroll=unroll)
            rows.append({"family": family, "loop": "unrolled" if unroll else "scan",
                         "without_loop_s": without, "with_loop_s": seconds, "ratio": seconds / without})
    print("| work | loop | s/step without the loop | s/step with it | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['loop']} | {r['without_loop_s']:.3f} | {r['with_loop_s']:.3f} | "
              f"{r['ratio']:.2f}x |")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.steps} steps")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
