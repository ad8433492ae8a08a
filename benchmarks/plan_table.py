"""The plan `--mode=plan` prints for a dataset config on cards of several sizes, from one machine.

    python benchmarks/plan_table.py [--configs kinetics:shot=1,kinetics:shot=5] [--gib 12,16,24,40,80,141]
        [--devices 1] [--out FILE.json]

For each config, every candidate setting of `tam_jax.plan.candidates` is compiled at most once (on this
machine's backend, from abstract inputs) and `tam_jax.plan.make_plan` then picks, for each budget
(`train.memory_limit_gib`), exactly what `python -m tam_jax.main --config=... --mode=plan
--config.train.memory_limit_gib=N` prints there. On a CPU the bytes are XLA:CPU's analysis of the step a
GPU would run (a budget keeps loops as loops), not a GPU's own figures: run it on the GPU for those.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tam_jax import plan  # noqa: E402
from tam_jax.configuration import PLAN_AUTO  # noqa: E402
from tests.helpers import load_config  # noqa: E402


def plans_for(config, budgets_gib: list[float]) -> list[dict]:
    """One row per budget: the plan's settings and GiB, or the error when nothing fits."""
    measured = {}

    def measure(candidate, mesh, unroll):
        key = json.dumps({k: candidate[k.split(".")[0]][k.split(".")[1]] for k in PLAN_AUTO}, sort_keys=True)
        if key not in measured:
            began = time.time()
            measured[key] = plan.compile_step(candidate, mesh, unroll=unroll)[1]
            gib = measured[key].total / plan.GIB
            print(f"  compiled {key}: {gib:.2f} GiB in {time.time() - began:.0f} s", flush=True)
        return None, measured[key]

    rows = []
    for gib in budgets_gib:
        budgeted = plan.with_overrides(config, {"train.memory_limit_gib": gib})
        try:
            chosen = plan.make_plan(budgeted, measure=measure)[0]
            rows.append({"gib": gib, "line": chosen.line(), **chosen.settings(),
                         "step_gib": chosen.step_bytes / plan.GIB})
        except plan.PlanError as e:
            rows.append({"gib": gib, "error": str(e)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default="kinetics:shot=1,kinetics:shot=5")
    p.add_argument("--gib", default="12,16,24,40,80,141")
    p.add_argument("--devices", type=int, default=1, help="mesh.num_devices (memory is per device)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    budgets = [float(g) for g in args.gib.split(",")]
    result = {"jax": jax.__version__, "device_kind": jax.devices()[0].device_kind, "configs": {}}
    for spec in args.configs.split(","):
        name, _, arg = spec.partition(":")
        config = plan.with_overrides(load_config(name, arg or None), {"mesh.num_devices": args.devices})
        print(f"{spec}:", flush=True)
        result["configs"][spec] = plans_for(config, budgets)
    print("| GiB | " + " | ".join(result["configs"]) + " |\n|---|" + "---|" * len(result["configs"]))
    for i, gib in enumerate(budgets):
        cells = []
        for rows in result["configs"].values():
            r = rows[i]
            cells.append("nothing fits" if "error" in r else
                         f"episodes_per_device_step={r['train.episodes_per_device_step']} "
                         f"embed_chunks={r['train.embed_chunks']} remat={r['model.remat']} "
                         f"({r['step_gib']:.1f} GiB)")
        print(f"| {gib:g} | " + " | ".join(cells) + " |")
    print(f"jax {result['jax']}, {result['device_kind']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
